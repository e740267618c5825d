//! systemd's file-descriptor store: how `systemctl restart nbd-s3` keeps clients connected.
//! systemd stops the old process (SIGTERM) before it starts the new one, so the two never
//! meet; instead the old process leaves its listening sockets and parked client connections
//! with systemd (`FDSTORE=1`, one descriptor per message, each with its own `FDNAME=`), plus a
//! memfd holding what each connection negotiated. systemd passes them all to the next
//! process (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), which takes them out of the store
//! again (`FDSTOREREMOVE=1`) before it reads from any of them: were it to crash later, the
//! store must not offer the same sockets with a state that no longer matches their streams.
//!
//! Whether a store exists is not visible to the process: systemd ≥ 254 sets `$FDSTORE` to
//! `FileDescriptorStoreMax=`, and older ones (Debian 12 has 252) need the unit to set it too
//! (`Environment=FDSTORE=…`, the same number). Without it a SIGTERM closes everything.
//!
//! Blocking calls on purpose: each side does this once, while no client is served.

use crate::daemon::Handover;
use crate::server::handover::{ConnState, ParkedConnection};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, IoSlice, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;
use tracing::{info, warn};

/// Every name this daemon gives a stored descriptor starts with this; the process id that
/// follows keeps two stops' entries apart should one ever be left behind.
const PREFIX: &str = "nbd-s3.";
/// Format of the state memfd; a newer one is refused (the sockets are then closed).
const FORMAT: u32 = 1;
/// Largest state accepted per received descriptor: a connection's state with a full read
/// buffer (128 KiB) in hex is well below it.
const STATE_PER_FD: u64 = 1024 * 1024;
/// How long one message to the service manager may block (or the manager take to confirm
/// them) before the stop gives up on it.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The service manager keeps descriptors for this service.
#[derive(Debug, Clone)]
pub struct FdStore {
    /// Entries the store takes (`FileDescriptorStoreMax=`).
    max: usize,
    socket: OsString,
}

impl std::fmt::Display for FdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the service manager keeps up to {} descriptors",
            self.max
        )
    }
}

/// What the state memfd says, next to the descriptors it names.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: u32,
    #[serde(default)]
    parked_at_ns: Option<u64>,
    #[serde(default)]
    handovers: u64,
    listeners: Vec<StoredListener>,
    connections: Vec<StoredConnection>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredListener {
    name: String,
    /// The configured address (`show_addr`).
    addr: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredConnection {
    name: String,
    state: ConnState,
}

/// What a stop left in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub listeners: usize,
    pub connections: usize,
}

impl FdStore {
    /// A store when `NOTIFY_SOCKET` is set and `FDSTORE` is a positive count.
    pub fn from_env() -> Option<FdStore> {
        let socket = std::env::var_os("NOTIFY_SOCKET")?;
        let max = parse_max(&std::env::var("FDSTORE").ok()?)?;
        Some(FdStore { max, socket })
    }

    /// Leaves `kept` with the service manager: every descriptor in a message of its own, the
    /// state memfd last (a stop cut short leaves no state, and the next process then closes
    /// what it finds instead of guessing). Connections beyond the store's size are closed.
    pub fn keep(&self, kept: Handover) -> io::Result<Kept> {
        let Handover {
            listeners,
            mut connections,
            parked_at_ns,
            handovers,
        } = kept;
        let room = self.max.checked_sub(1 + listeners.len()).ok_or_else(|| {
            io::Error::other(format!(
                "FDSTORE={} leaves no room for the state and {} listener(s)",
                self.max,
                listeners.len()
            ))
        })?;
        if connections.len() > room {
            warn!(
                "the fd store takes {} entries: closing {} connection(s) that do not fit",
                self.max,
                connections.len() - room
            );
            connections.truncate(room);
        }
        let notify = Notify::connect(&self.socket)?;
        let tag = format!("{PREFIX}{}", std::process::id());
        let mut state = State {
            format: FORMAT,
            parked_at_ns,
            handovers,
            listeners: Vec::with_capacity(listeners.len()),
            connections: Vec::with_capacity(connections.len()),
        };
        for (i, (addr, fd)) in listeners.into_iter().enumerate() {
            let name = format!("{tag}.listen.{i}");
            notify.store(&name, fd.as_fd())?;
            state.listeners.push(StoredListener { name, addr });
        }
        for (i, conn) in connections.into_iter().enumerate() {
            let name = format!("{tag}.conn.{i}");
            notify.store(&name, conn.fd.as_fd())?;
            state.connections.push(StoredConnection {
                name,
                state: conn.state,
            });
        }
        let json = serde_json::to_vec(&state).map_err(io::Error::other)?;
        let memfd = memfd_create(c"nbd-s3-state", MemFdCreateFlag::MFD_CLOEXEC)?;
        let mut file = File::from(memfd);
        file.write_all(&json)?;
        notify.store(&format!("{tag}.state"), file.as_fd())?;
        // The process exits right after this: make sure systemd has read the messages while
        // it can still tell which service sent them.
        if let Err(e) = notify.barrier(SEND_TIMEOUT) {
            warn!("the service manager did not confirm the fd store messages: {e}");
        }
        Ok(Kept {
            listeners: state.listeners.len(),
            connections: state.connections.len(),
        })
    }
}

/// A datagram socket to the service manager.
struct Notify(UnixDatagram);

impl Notify {
    fn connect(path: &std::ffi::OsStr) -> io::Result<Notify> {
        use std::os::unix::ffi::OsStrExt;
        let sock = UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.connect_addr(&addr)?;
            }
            None => sock.connect(path)?,
        }
        sock.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Notify(sock))
    }

    fn send(&self, message: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let iov = [IoSlice::new(message.as_bytes())];
        let sent = sendmsg::<()>(self.0.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
        if sent != message.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"));
        }
        Ok(())
    }

    fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.send(&format!("FDSTORE=1\nFDNAME={name}\n"), Some(fd))
    }

    /// Returns once the manager has processed every message sent before: it closes the
    /// descriptor that comes with `BARRIER=1` (and any it does not keep) when it gets there.
    fn barrier(&self, timeout: Duration) -> io::Result<()> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        self.send("BARRIER=1\n", Some(theirs.as_fd()))?;
        drop(theirs);
        ours.set_read_timeout(Some(timeout))?;
        match (&ours).read(&mut [0u8; 1])? {
            0 => Ok(()),
            _ => Err(io::Error::other("unexpected data on the barrier")),
        }
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), None)
    }
}

/// Takes what a previous process left in the store, if systemd passed anything to this
/// process, and removes it from the store. Descriptors without a valid state to go with them
/// are closed (listeners are then bound afresh). Call before any thread starts reading.
pub fn inherit() -> Option<Handover> {
    let received: Vec<(OwnedFd, String)> = match sd_notify::listen_fds_with_names(false) {
        // SAFETY: systemd passed these descriptors to this process (LISTEN_PID is ours) and
        // nothing else in the process knows them; each is owned exactly once from here.
        Ok(fds) => fds
            .map(|(fd, name)| (unsafe { OwnedFd::from_raw_fd(fd) }, name))
            .collect(),
        Err(e) => {
            warn!("ignoring the descriptors passed by the service manager: {e}");
            return None;
        }
    };
    if received.is_empty() {
        return None;
    }
    forget(received.iter().map(|(_, name)| name.as_str()));
    let (handover, unused) = adopt(received);
    if !unused.is_empty() {
        warn!(
            "closing descriptor(s) from the service manager that no stored state describes: {}",
            unused.join(", ")
        );
    }
    handover
}

/// `$FDSTORE`: the number of entries the store takes; none at zero or when unreadable.
fn parse_max(value: &str) -> Option<usize> {
    value.trim().parse::<usize>().ok().filter(|n| *n > 0)
}

/// Takes `names` out of the store (one message each: `FDNAME` selects what is removed).
fn forget<'a>(names: impl Iterator<Item = &'a str>) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let notify = match Notify::connect(&socket) {
        Ok(n) => n,
        Err(e) => return warn!("cannot empty the fd store: {e}"),
    };
    let mut seen = std::collections::HashSet::new();
    for name in names.filter(|n| seen.insert(*n)) {
        if let Err(e) = notify.remove(name) {
            warn!("cannot remove {name} from the fd store: {e}");
        }
    }
}

/// Matches the received descriptors to the newest state among them. Returns the handover
/// (if a state was found) and the names of descriptors left unused (closed on return).
fn adopt(received: Vec<(OwnedFd, String)>) -> (Option<Handover>, Vec<String>) {
    let limit = STATE_PER_FD.saturating_mul(received.len() as u64);
    let mut fds: HashMap<String, OwnedFd> = HashMap::new();
    let mut states = Vec::new();
    let mut unused = Vec::new();
    for (fd, name) in received {
        if !name.starts_with(PREFIX) {
            unused.push(name);
        } else if name.ends_with(".state") {
            match read_state(fd, limit) {
                Ok(state) => states.push(state),
                Err(e) => {
                    warn!("fd store state {name} unusable: {e}");
                    unused.push(name);
                }
            }
        } else if let Some(fd) = fds.insert(name.clone(), fd) {
            drop(fd);
            unused.push(name);
        }
    }
    // Several states mean an earlier stop's entries were never taken out: the latest stop's
    // describes the sockets as they are now.
    states.sort_by_key(|s| s.parked_at_ns);
    let Some(state) = states.pop() else {
        unused.extend(fds.into_keys());
        return (None, unused);
    };
    let mut out = Handover {
        parked_at_ns: state.parked_at_ns,
        handovers: state.handovers,
        ..Handover::default()
    };
    for l in state.listeners {
        match fds.remove(&l.name) {
            Some(fd) => out.listeners.push((l.addr, fd)),
            None => warn!("listener {} was not passed back by the fd store", l.addr),
        }
    }
    for c in state.connections {
        match fds.remove(&c.name) {
            Some(fd) => out
                .connections
                .push(ParkedConnection { state: c.state, fd }),
            // systemd drops a stored socket that reports a hang-up: the client left.
            None => info!(
                export = %c.state.export,
                "a stored connection was not passed back (its client hung up meanwhile)"
            ),
        }
    }
    unused.extend(fds.into_keys());
    info!(
        "fd store: received {} listener(s) and {} connection(s)",
        out.listeners.len(),
        out.connections.len()
    );
    (Some(out), unused)
}

fn read_state(fd: OwnedFd, limit: u64) -> io::Result<State> {
    let mut file = File::from(fd);
    file.rewind()?;
    let mut json = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut json)?;
    if json.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {limit} bytes"),
        ));
    }
    let state: State = serde_json::from_slice(&json).map_err(io::Error::other)?;
    if state.format != FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("format {} (this daemon reads {FORMAT})", state.format),
        ));
    }
    Ok(state)
}

#[cfg(test)]
mod tests;

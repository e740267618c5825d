//! A stand-in for systemd as far as a restart is concerned (this machine has no systemd as
//! PID 1): the `NOTIFY_SOCKET` receiver, with the file-descriptor store (`FDSTORE=1` with its
//! SCM_RIGHTS descriptors and `FDNAME=`, `FDSTOREREMOVE=1`), and the start of the next
//! process with the stored descriptors at 3.. and `LISTEN_FDS`, `LISTEN_FDNAMES` and
//! `LISTEN_PID` (the child's own pid, set by a shell that then execs the daemon).

use super::proc::LogBuffer;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the manager holds between two processes.
#[derive(Default)]
struct Shared {
    /// The store, in the order entries arrived.
    store: Mutex<Vec<(String, OwnedFd)>>,
    /// Where notify lines of the current process go.
    log: Mutex<LogBuffer>,
    /// Every FDSTOREREMOVE name received, in order.
    removed: Mutex<Vec<String>>,
}

/// The fake service manager; its receiving thread stops when it is dropped.
pub struct ServiceManager {
    path: PathBuf,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    /// The notify socket, held while a datagram is received and handled, so `drain` knows
    /// that nothing is half handled.
    sock: Arc<Mutex<UnixDatagram>>,
}

impl ServiceManager {
    /// Binds the notify socket in `dir` and starts receiving.
    pub fn start(dir: &Path) -> ServiceManager {
        let path = dir.join("notify-manager");
        let sock = UnixDatagram::bind(&path).expect("bind the manager's NOTIFY_SOCKET");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let sock = Arc::new(Mutex::new(sock));
        let (s, st, so) = (Arc::clone(&shared), Arc::clone(&stop), Arc::clone(&sock));
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let sock = so.lock().unwrap();
                if let Some((text, fds)) = receive(&sock, MsgFlags::empty()) {
                    s.handle(&text, fds);
                }
            }
        });
        ServiceManager {
            path,
            shared,
            stop,
            sock,
        }
    }

    /// Handles every datagram already sent, as systemd does before it acts on a process's
    /// exit: what a process stored before it exited is in the store when the next one starts.
    /// (The receiving thread alone may lag behind on a loaded machine.)
    fn drain(&self) {
        let sock = self.sock.lock().unwrap();
        while let Some((text, fds)) = receive(&sock, MsgFlags::MSG_DONTWAIT) {
            self.shared.handle(&text, fds);
        }
    }

    /// The `NOTIFY_SOCKET` path.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Notify lines from now on go to `log` (one buffer per process).
    pub fn follow_into(&self, log: LogBuffer) {
        // What the previous process sent still goes to its own log.
        self.drain();
        *self.shared.log.lock().unwrap() = log;
    }

    /// Names of the entries now in the store.
    pub fn stored(&self) -> Vec<String> {
        let store = self.shared.store.lock().unwrap();
        store.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Names the daemon asked to remove so far.
    pub fn removed(&self) -> Vec<String> {
        self.shared.removed.lock().unwrap().clone()
    }

    /// Empties the store, closing its descriptors: what `systemctl stop` does once the
    /// service is down and no job is queued for it.
    pub fn close_store(&self) {
        self.shared.store.lock().unwrap().clear();
    }

    /// A command that starts `bin` as systemd starts a service with a non-empty store: the
    /// stored descriptors (copies; the store keeps its own until told to remove them) at 3..,
    /// in reverse order of arrival (the order is not something a service may rely on), and
    /// the environment that describes them (to set after any scrubbing of the environment).
    pub fn command(&self, bin: &Path) -> (Command, Vec<(String, String)>) {
        self.drain();
        let store = self.shared.store.lock().unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "export LISTEN_PID=$$; exec \"$0\" \"$@\"",
            &*bin.to_string_lossy(),
        ]);
        if store.is_empty() {
            return (cmd, vec![]);
        }
        let n = store.len();
        let first_free = RawFd::try_from(3 + n).expect("few descriptors");
        // Copies above every target number, so placing one never overwrites another; they
        // are close-on-exec, the placed ones (made by dup2) are not.
        let high: Vec<OwnedFd> = store
            .iter()
            .rev()
            .map(|(_, fd)| {
                let raw = nix::fcntl::fcntl(
                    fd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(first_free),
                )
                .expect("dup a stored descriptor");
                unsafe { OwnedFd::from_raw_fd(raw) }
            })
            .collect();
        let names: Vec<&str> = store.iter().rev().map(|(n, _)| n.as_str()).collect();
        let env = vec![
            ("LISTEN_FDS".to_owned(), n.to_string()),
            ("LISTEN_FDNAMES".to_owned(), names.join(":")),
        ];
        let raws: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: only dup2 between fork and exec (async-signal-safe); `high` outlives the
        // spawn because the closure owns it.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = &high;
                for (i, fd) in raws.iter().enumerate() {
                    let target = RawFd::try_from(3 + i).map_err(std::io::Error::other)?;
                    nix::unistd::dup2(*fd, target)?;
                }
                Ok(())
            });
        }
        (cmd, env)
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Shared {
    fn handle(&self, text: &str, fds: Vec<OwnedFd>) {
        let lines: Vec<&str> = text.lines().collect();
        {
            let log = self.log.lock().unwrap();
            for l in &lines {
                log.push((*l).to_owned());
            }
        }
        let name = lines
            .iter()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("stored")
            .to_owned();
        if lines.contains(&"FDSTORE=1") {
            let mut store = self.store.lock().unwrap();
            store.extend(fds.into_iter().map(|fd| (name.clone(), fd)));
        } else if lines.contains(&"FDSTOREREMOVE=1") {
            self.store.lock().unwrap().retain(|(n, _)| *n != name);
            self.removed.lock().unwrap().push(name);
        }
    }
}

/// One datagram and its descriptors; `None` on timeout (or none waiting, with
/// `MSG_DONTWAIT`).
fn receive(sock: &UnixDatagram, flags: MsgFlags) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 8192];
    let mut space = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )
    .ok()?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}

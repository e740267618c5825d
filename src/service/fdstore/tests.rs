use super::*;
use nix::sys::socket::{recvmsg, ControlMessageOwned};
use std::io::IoSliceMut;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A stand-in for systemd's notify socket: a thread receives every datagram, keeps the
/// descriptors of `FDSTORE=1` messages and closes the others at once (which is what
/// confirms a `BARRIER=1`).
struct Manager {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    got: Arc<Received>,
    barriers: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

type Received = Mutex<Vec<(String, Vec<OwnedFd>)>>;

/// Keeps the descriptors of an `FDSTORE=1` message; closes any other's (a barrier's).
fn keep_or_close(got: &Received, barriers: &AtomicUsize, text: String, fds: Vec<OwnedFd>) {
    if text.lines().any(|l| l == "FDSTORE=1") {
        got.lock().unwrap().push((text, fds));
        return;
    }
    if text.lines().any(|l| l == "BARRIER=1") {
        barriers.fetch_add(1, Ordering::SeqCst);
    }
    drop(fds);
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind");
        let got = Arc::new(Mutex::new(Vec::new()));
        let barriers = Arc::new(AtomicUsize::new(0));
        let (g, b) = (Arc::clone(&got), Arc::clone(&barriers));
        sock.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                if let Some((text, fds)) = receive(&sock) {
                    keep_or_close(&g, &b, text, fds);
                }
            }
        });
        Manager {
            _dir: dir,
            path,
            got,
            barriers,
            stop,
        }
    }

    fn store(&self, max: usize) -> FdStore {
        FdStore {
            max,
            socket: self.path.clone().into_os_string(),
        }
    }

    fn saw_barrier(&self) -> bool {
        self.barriers.load(Ordering::SeqCst) > 0
    }

    /// What the store would pass back, taken out of the manager: (descriptor, FDNAME) of
    /// each FDSTORE=1 message, in order of arrival.
    fn stored(&self) -> Vec<(OwnedFd, String)> {
        std::mem::take(&mut *self.got.lock().unwrap())
            .into_iter()
            .map(|(m, mut fds)| {
                assert_eq!(fds.len(), 1, "one descriptor per message: {m}");
                let name = m
                    .lines()
                    .find_map(|l| l.strip_prefix("FDNAME="))
                    .expect("FDNAME")
                    .to_owned();
                (fds.remove(0), name)
            })
            .collect()
    }
}

/// One datagram and its descriptors; `None` on timeout.
fn receive(sock: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    let mut buf = [0u8; 4096];
    let mut space = nix::cmsg_space!([i32; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(r) = cmsg {
            fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let n = msg.bytes;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}

fn conn(export: &str, pending: &str) -> (ParkedConnection, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let state = ConnState {
        export: export.into(),
        size: 1 << 20,
        read_only: false,
        structured: true,
        block_status: false,
        unix: Some("unix:/x".into()),
        pending: pending.into(),
    };
    (
        ParkedConnection {
            state,
            fd: OwnedFd::from(ours),
        },
        theirs,
    )
}

fn listener() -> OwnedFd {
    OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
}

#[test]
fn kept_sockets_come_back_by_name_in_any_order_with_their_state() {
    let m = Manager::new();
    let (c1, mut peer1) = conn("a", "00ff");
    let (c2, _peer2) = conn("b", "");
    let kept = Handover {
        listeners: vec![("127.0.0.1:0".into(), listener())],
        connections: vec![c1, c2],
        parked_at_ns: Some(42),
        handovers: 4,
    };
    let n = m.store(16).keep(kept).expect("kept");
    assert_eq!(
        n,
        Kept {
            listeners: 1,
            connections: 2
        }
    );
    let mut stored = m.stored();
    assert_eq!(stored.len(), 4, "listener, two connections, state");
    assert!(m.saw_barrier(), "a barrier after the entries");
    assert!(stored.last().expect("entries").1.ends_with(".state"));
    // Older systemd passes the store back in reverse.
    stored.reverse();
    let (got, unused) = adopt(stored);
    assert!(unused.is_empty(), "{unused:?}");
    let got = got.expect("a handover");
    assert_eq!(got.parked_at_ns, Some(42));
    assert_eq!(got.handovers, 4);
    assert_eq!(got.listeners.len(), 1);
    assert_eq!(got.listeners[0].0, "127.0.0.1:0");
    let a = got
        .connections
        .iter()
        .find(|c| c.state.export == "a")
        .expect("connection a");
    assert_eq!(a.state.pending, "00ff");
    // The descriptor is the very socket: what its peer writes arrives on it.
    peer1.write_all(b"hi").expect("write");
    let mut back = UnixStream::from(a.fd.try_clone().expect("dup"));
    let mut buf = [0u8; 2];
    back.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hi");
}

#[test]
fn connections_beyond_the_store_size_are_closed_and_a_too_small_store_keeps_nothing() {
    let m = Manager::new();
    let (c1, _p1) = conn("a", "");
    let (c2, _p2) = conn("a", "");
    let kept = Handover {
        listeners: vec![("127.0.0.1:0".into(), listener())],
        connections: vec![c1, c2],
        parked_at_ns: Some(1),
        handovers: 0,
    };
    let n = m.store(3).keep(kept).expect("kept");
    assert_eq!(n.connections, 1);
    assert_eq!(m.stored().len(), 3);

    let kept = Handover {
        listeners: vec![("a".into(), listener()), ("b".into(), listener())],
        ..Handover::default()
    };
    assert!(m.store(2).keep(kept).is_err());
    assert!(m.stored().is_empty(), "nothing half-stored");
}

#[test]
fn descriptors_without_a_state_are_closed_and_the_newest_state_wins() {
    let m = Manager::new();
    let (c, _p) = conn("a", "");
    let lone = vec![(listener(), "nbd-s3.1.listen.0".to_owned())];
    let (got, unused) = adopt(lone);
    assert!(got.is_none());
    assert_eq!(unused, vec!["nbd-s3.1.listen.0".to_owned()]);

    // An older stop's leftovers next to the latest stop's entries.
    let stale = Handover {
        listeners: vec![("127.0.0.1:0".into(), listener())],
        parked_at_ns: Some(10),
        ..Handover::default()
    };
    m.store(8).keep(stale).expect("stale kept");
    let mut all = m.stored();
    // Same process id in both names: rename the stale ones as another pid would have.
    for (_, name) in &mut all {
        *name = name.replacen("nbd-s3.", "nbd-s3.1.", 1);
    }
    let fresh = Handover {
        connections: vec![c],
        parked_at_ns: Some(20),
        ..Handover::default()
    };
    m.store(8).keep(fresh).expect("fresh kept");
    all.extend(m.stored());
    let (got, unused) = adopt(all);
    let got = got.expect("handover");
    assert_eq!(got.parked_at_ns, Some(20));
    assert_eq!(got.connections.len(), 1);
    assert!(got.listeners.is_empty());
    assert_eq!(unused.len(), 1, "the stale listener: {unused:?}");
}

#[test]
fn foreign_names_and_bad_states_are_not_used() {
    let m = Manager::new();
    let memfd = memfd_create(c"x", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    let mut f = File::from(memfd);
    f.write_all(br#"{"format":99,"listeners":[],"connections":[]}"#)
        .expect("write");
    let received = vec![
        (OwnedFd::from(f), "nbd-s3.5.state".to_owned()),
        (listener(), "nbd-s3.5.listen.0".to_owned()),
        (listener(), "socket-activation".to_owned()),
    ];
    let (got, mut unused) = adopt(received);
    assert!(got.is_none());
    unused.sort();
    assert_eq!(
        unused,
        ["nbd-s3.5.listen.0", "nbd-s3.5.state", "socket-activation"]
    );
    drop(m);
}

#[test]
fn a_store_needs_a_positive_count() {
    assert_eq!(parse_max("4096"), Some(4096));
    assert_eq!(parse_max(" 8\n"), Some(8));
    assert_eq!(parse_max("0"), None);
    assert_eq!(parse_max("-1"), None);
    assert_eq!(parse_max("many"), None);
}

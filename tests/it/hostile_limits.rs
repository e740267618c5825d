//! Resource limits against hostile clients, over raw TCP against the real daemon:
//! the connection limit (`server::MAX_CONNECTIONS`) closes the connection past it at once
//! while the others keep working, and frees its slots when clients leave; a client that
//! pipelines huge READs and never reads the replies is held to its in-flight cap and data
//! budget, so the daemon's memory stays bounded and other clients keep being served.

use crate::common::hostile_bed::{HostileBed, EXPORT, SIZE};
use crate::common::raw_nbd::*;
use crate::common::ExportSpec;
use nbd_s3::server::{MAX_CONNECTIONS, MAX_IN_FLIGHT};
use std::io::Read;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The hogs read the first `DATA` bytes, written with non-zero data first.
const DATA: u64 = 8 * MIB;

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (the daemon, a child started
/// afterwards, inherits it): the test holds more than 1024 sockets, and so does the daemon.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    // Raising the soft limit up to the hard one needs no privilege.
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit(RLIMIT_NOFILE)");
    hard
}

/// Whether a new connection is greeted (`false`: the server closed it without a word).
fn greeted(addr: &str) -> bool {
    let mut r = Raw::tcp(addr);
    let mut magic = [0u8; 8];
    match r.s.read_exact(&mut magic) {
        Ok(()) => u64::from_be_bytes(magic) == NBDMAGIC,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof || is_reset(&e) => false,
        Err(e) => panic!("waiting for a greeting: {e}"),
    }
}

/// Connection `i` of the test writes its own 4 KiB and reads it back.
fn check_conn(r: &mut Raw, i: usize) {
    let off = (i as u64 * 4096) % (SIZE / 2);
    let d = pattern(i as u64, off, 4096);
    assert_eq!(r.write_at(i as u64, off, &d), 0, "connection {i} write");
    let back = r.read_at(i as u64, off, 4096).expect("read back");
    assert_bytes(&format!("connection {i} read back"), &back, &d);
}

#[test]
fn connection_past_the_limit_is_closed_at_once_and_slots_free_up() {
    let nofile = raise_nofile();
    assert!(
        nofile as usize > 2 * MAX_CONNECTIONS + 100,
        "RLIMIT_NOFILE hard limit {nofile} is too low for this test"
    );
    let mut bed = HostileBed::new(); // its bystander is connection 1
    let t = Instant::now();
    let mut conns: Vec<Raw> = (1..MAX_CONNECTIONS).map(|_| bed.open()).collect();
    eprintln!(
        "{} connections open after {:?}",
        MAX_CONNECTIONS,
        t.elapsed()
    );

    let t = Instant::now();
    let junk = Raw::tcp(&bed.addr).expect_closed("the connection past the limit");
    let took = t.elapsed();
    assert!(
        junk.is_empty(),
        "connection {} was served: got {junk:02x?}",
        MAX_CONNECTIONS + 1
    );
    // Well inside the 30 s handshake timeout that would close an idle connection anyway.
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    eprintln!("connection {} closed after {took:?}", MAX_CONNECTIONS + 1);

    bed.check_bystander();
    for i in [0, 1, MAX_CONNECTIONS / 2, MAX_CONNECTIONS - 2] {
        check_conn(&mut conns[i], i);
    }
    // Eight clients leave; once the server has noticed, new connections are served again.
    conns.truncate(MAX_CONNECTIONS - 9);
    let t = Instant::now();
    crate::common::wait_until("a new connection to be greeted", IO_TIMEOUT, || {
        greeted(&bed.addr)
    });
    eprintln!("a slot was free again after {:?}", t.elapsed());
    bed.check_served();
    check_conn(&mut conns[MAX_CONNECTIONS - 10], MAX_CONNECTIONS - 10);
}

/// Opens a connection and pipelines `n` READs of `len` bytes (spread over the export) from a
/// thread, never reading a reply; the returned connection must be kept open.
fn hog(addr: &str, n: u64, len: u32) -> Raw {
    let r = Raw::open(addr, EXPORT).0;
    let mut batch = Vec::new();
    let slots = DATA / len as u64;
    for i in 0..n {
        batch.extend(req_bytes(
            0,
            CMD_READ,
            i,
            (i % slots) * len as u64,
            len,
            &[],
        ));
    }
    let mut s = r.s.try_clone().unwrap();
    // The server may stop reading requests too (that is the point); the thread then ends with
    // the connection.
    std::thread::spawn(move || std::io::Write::write_all(&mut s, &batch));
    r
}

/// A client pipelines `n` READs of `len` bytes and never reads the replies: while it does, the
/// daemon's peak RSS grows by less than `bound_mib` over a 3 s measurement and other clients
/// are served. Returns the growth in KiB.
fn hog_is_bounded(n: u64, len: u32, bound_mib: u64) -> u64 {
    // 4 KiB blocks: a READ copies its pieces (large pieces of big blocks would be shared with
    // the cache, and zeros cost nothing), so every unsent reply holds its own memory.
    let spec = ExportSpec::new(EXPORT).size("16MiB").block_size("4KiB");
    let mut bed = HostileBed::with_export(spec);
    let mut w = bed.open();
    for i in 0..DATA / MIB {
        assert_eq!(
            w.write_at(i, i * MIB, &pattern(i, i * MIB, MIB as usize)),
            0
        );
    }
    // Stored before the hostile act, so the FLUSHes of the checks below wait for what the
    // checks wrote, not for 2048 PUTs of setup data (which on a loaded machine took longer
    // than the raw client's read timeout).
    let took = w.flush_patiently(DATA / MIB, 3);
    eprintln!(
        "the setup data ({} MiB in 4 KiB blocks) was stored in {took:?}",
        DATA / MIB
    );
    drop(w);
    let before = bed.peak_rss_kib();
    let hog = hog(&bed.addr, n, len);
    let t = Instant::now();
    bed.check_served();
    eprintln!("served beside the hog in {:?}", t.elapsed());
    let end = Instant::now() + Duration::from_secs(3);
    let mut grew = 0;
    while Instant::now() < end {
        grew = bed.peak_rss_kib().saturating_sub(before);
        assert!(
            grew < bound_mib * 1024,
            "{n} pipelined {len}-byte READs never read: daemon peak RSS grew by {grew} KiB"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    bed.check_served();
    drop(hog);
    bed.check_served();
    grew
}

#[test]
fn huge_reads_never_read_are_held_to_the_data_budget() {
    // 200 × 8 MiB: 1.6 GiB of replies; the in-flight cap alone would allow 1 GiB, the
    // per-connection data budget allows 128 MiB.
    let grew = hog_is_bounded(200, 8 << 20, 256);
    eprintln!("peak RSS grew by {grew} KiB under 200 unread 8 MiB READs");
}

#[test]
fn small_reads_never_read_are_held_to_the_in_flight_cap() {
    // 4000 × 64 KiB: the data budget alone would allow 2048 of them (128 MiB) at once, the
    // in-flight cap MAX_IN_FLIGHT (plus the reply queue) a few hundred.
    assert_eq!(MAX_IN_FLIGHT, 128, "bound below assumes a cap of 128");
    let grew = hog_is_bounded(4000, 64 << 10, 64);
    eprintln!("peak RSS grew by {grew} KiB under 4000 unread 64 KiB READs");
}

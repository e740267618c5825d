//! Hostile clients over raw TCP against the real daemon (issue 3), handshake phase: every
//! malformed option gets exactly the reply the protocol prescribes (or a close), and afterwards
//! both a long-lived "bystander" connection and a fresh connection are still served correctly.
//! The transmission phase is in `hostile_requests.rs`; the raw client in `raw_nbd.rs`.

use crate::common::{wait_until, ExportSpec, NbdS3, S3Server, DAEMON_TIMEOUT};
use crate::raw_nbd::*;
use std::io::Write;
use std::thread;

pub const EXPORT: &str = "hostile";
pub const SIZE: u64 = 16 << 20;

/// A running daemon with one export, plus a bystander connection opened before the hostile act.
pub struct Bed {
    daemon: Daemon,
    pub addr: String,
    bystander: Raw,
    rounds: u64,
}

impl Bed {
    pub fn new() -> Bed {
        Bed::with_export(ExportSpec::new(EXPORT).size("16MiB"))
    }

    /// Like `new`, with the export `spec` (name `EXPORT` and size `SIZE` expected).
    pub fn with_export(spec: ExportSpec) -> Bed {
        let daemon = Daemon::start(spec);
        let addr = daemon.addr();
        let (bystander, info) = Raw::open(&addr, EXPORT);
        assert_eq!(info.size, SIZE, "advertised size");
        let mut bed = Bed {
            daemon,
            addr,
            bystander,
            rounds: 0,
        };
        bed.check_bystander();
        bed
    }

    /// A fresh handshake + transmission on the export.
    pub fn open(&self) -> Raw {
        Raw::open(&self.addr, EXPORT).0
    }

    /// The bystander writes a new pattern in its own 64 KiB region and reads it back.
    pub fn check_bystander(&mut self) {
        self.rounds += 1;
        let off = SIZE - 64 * 1024;
        let data = pattern(self.rounds, off, 64 * 1024);
        let c = 1000 + self.rounds;
        assert_eq!(self.bystander.write_at(c, off, &data), 0, "bystander write");
        let back = self
            .bystander
            .read_at(c, off, 64 * 1024)
            .expect("bystander read");
        assert_bytes("bystander read back", &back, &data);
    }

    /// Peak resident set of the daemon, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.daemon.rss_kib()
    }

    /// After a hostile act: the bystander still works and a fresh connection sees its data.
    pub fn check_served(&mut self) {
        self.check_bystander();
        let mut fresh = self.open();
        let off = SIZE - 64 * 1024;
        let back = fresh.read_at(7, off, 64 * 1024).expect("fresh read");
        assert_bytes(
            "fresh connection reading the bystander's data",
            &back,
            &pattern(self.rounds, off, 64 * 1024),
        );
        let d = pattern(99, 4096, 4096);
        assert_eq!(fresh.write_at(8, 4096, &d), 0, "fresh write");
        assert_eq!(fresh.read_at(9, 4096, 4096).expect("fresh read back"), d);
        assert_eq!(fresh.cmd(0, CMD_FLUSH, 10, 0, 0), 0, "fresh flush");
    }
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut bed = Bed::new();
    for flags in [
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | 4,
        FLAG_FIXED_NEWSTYLE | 0x8000_0000,
    ] {
        let mut r = Raw::greet(&bed.addr);
        r.send(&flags.to_be_bytes());
        let junk = r.expect_closed("unknown client flags");
        assert!(
            junk.is_empty(),
            "server sent {junk:?} after refusing the client flags"
        );
        bed.check_served();
    }
}

#[test]
fn unknown_option_with_data_is_unsupported_and_handshake_continues() {
    let mut bed = Bed::new();
    let mut r = Raw::connect(&bed.addr);
    for (opt, len) in [(0x7777u32, 100usize), (12, 0), (0xFFFF_FFFF, 4000), (4, 8)] {
        r.send_opt(opt, &vec![0xA5; len]);
        let rep = r.opt_reply();
        assert_eq!(rep.option, opt, "reply echoes the option");
        assert_eq!(
            rep.kind, REP_ERR_UNSUP,
            "option {opt:#x} must be ERR_UNSUP, got {rep:?}"
        );
    }
    let info = r.go(EXPORT).expect("GO after unknown options");
    assert_eq!(info.size, SIZE);
    let d = pattern(1, 0, 512);
    assert_eq!(r.write_at(1, 0, &d), 0);
    assert_eq!(r.read_at(2, 0, 512).unwrap(), d);
    bed.check_served();
}

#[test]
fn hundreds_of_options_are_answered_or_capped_without_hanging() {
    let mut bed = Bed::new();
    let mut r = Raw::connect(&bed.addr);
    let mut answered = 0;
    for i in 0..600u32 {
        if r.try_send(&opt_bytes(0x1000 + i, &[1, 2, 3])).is_err() {
            break;
        }
        match r.try_opt_reply() {
            Some(rep) => {
                assert_eq!(
                    (rep.option, rep.kind),
                    (0x1000 + i, REP_ERR_UNSUP),
                    "option #{i}"
                );
                answered += 1;
            }
            None => break,
        }
    }
    if answered == 600 {
        // No cap (or a generous one): the connection must still be usable.
        r.go(EXPORT).expect("GO after 600 options");
        assert_eq!(r.read_at(1, 0, 512).map(|d| d.len()), Ok(512));
    } else {
        assert!(
            answered >= 16,
            "server closed after only {answered} options"
        );
        r.expect_closed("option cap");
    }
    // The same flood pipelined without waiting for replies: answered, then GO, or closed.
    let mut p = Raw::connect(&bed.addr);
    let mut flood = Vec::new();
    for i in 0..600u32 {
        flood.extend_from_slice(&opt_bytes(0x2000 + i, &[9; 16]));
    }
    flood.extend_from_slice(&opt_bytes(OPT_GO, &go_data(EXPORT, &[])));
    let writer = {
        let mut s = p.s.try_clone().unwrap();
        thread::spawn(move || s.write_all(&flood))
    };
    let mut n = 0;
    let mut acked = false;
    while let Some(rep) = p.try_opt_reply() {
        if rep.option == OPT_GO {
            assert_eq!(n, 600, "GO answered before the options sent ahead of it");
            assert!(
                rep.kind == REP_INFO || rep.kind == REP_ACK,
                "GO after flood: {rep:?}"
            );
            acked = rep.kind == REP_ACK;
            if acked {
                break;
            }
            continue;
        }
        assert_eq!(
            (rep.option, rep.kind),
            (0x2000 + n, REP_ERR_UNSUP),
            "pipelined option #{n}"
        );
        n += 1;
    }
    let _ = writer.join();
    if acked {
        assert_eq!(
            p.read_at(1, 0, 512).map(|d| d.len()),
            Ok(512),
            "transmission after flood"
        );
    } else {
        // Closing with most of the flood unread makes the kernel send a reset, which may
        // discard replies already on their way, so fewer than 256 may arrive; more never may.
        assert!(
            n <= 256,
            "answered {n} pipelined options, past the cap of 256"
        );
        wait_until(
            "the option cap logged for both floods",
            DAEMON_TIMEOUT,
            || bed.daemon.nbd.log_lines("more than 256 options").len() >= 2,
        );
    }
    bed.check_served();
}

#[test]
fn huge_option_length_closes_without_allocating() {
    let mut bed = Bed::new();
    let rss_before = bed.daemon.rss_kib();
    for opt in [OPT_GO, 0x7777, OPT_LIST, OPT_EXPORT_NAME] {
        let mut r = Raw::connect(&bed.addr);
        r.send_opt_raw(opt, 0xFFFF_FFF0, &[0u8; 64]);
        // An error reply before the close is tolerated; waiting for 4 GiB of data is not.
        r.expect_closed(&format!("option {opt} with length 0xFFFFFFF0"));
        bed.check_served();
    }
    let rss_after = bed.daemon.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "daemon peak RSS grew from {rss_before} KiB to {rss_after} KiB after huge option lengths"
    );
}

#[test]
fn go_with_lying_name_length_is_invalid() {
    let mut bed = Bed::new();
    let mut r = Raw::connect(&bed.addr);
    for namelen in [100u32, 4, 0xFFFF_FFFF] {
        let mut d = Vec::new();
        d.extend_from_slice(&namelen.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&0u16.to_be_bytes());
        r.send_opt(OPT_GO, &d);
        let rep = r.opt_reply();
        assert_eq!(
            (rep.option, rep.kind),
            (OPT_GO, REP_ERR_INVALID),
            "name length {namelen}"
        );
    }
    // Info request count that lies too: says 5 requests, carries 1.
    let mut d = go_data(EXPORT, &[]);
    let n = d.len();
    d[n - 2..].copy_from_slice(&5u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    r.send_opt(OPT_INFO, &d);
    let rep = r.opt_reply();
    assert_eq!(
        (rep.option, rep.kind),
        (OPT_INFO, REP_ERR_INVALID),
        "info count that lies"
    );
    // An unknown export is ERR_UNKNOWN and the handshake still continues.
    let err = r.go("no-such-export").expect_err("GO on an unknown export");
    assert_eq!(err.kind, REP_ERR_UNKNOWN);
    r.go(EXPORT).expect("GO after the bad ones");
    assert_eq!(r.read_at(1, 0, 4096).map(|d| d.len()), Ok(4096));
    bed.check_served();
}

#[test]
fn list_with_data_starttls_and_early_set_meta_context_are_refused() {
    let mut bed = Bed::new();
    let mut r = Raw::connect(&bed.addr);
    r.send_opt(OPT_LIST, b"junk");
    let rep = r.opt_reply();
    assert_eq!(
        (rep.option, rep.kind),
        (OPT_LIST, REP_ERR_INVALID),
        "LIST with data"
    );

    r.send_opt(OPT_STARTTLS, &[]);
    let rep = r.opt_reply();
    assert_eq!(
        (rep.option, rep.kind),
        (OPT_STARTTLS, REP_ERR_POLICY),
        "STARTTLS without TLS"
    );

    r.send_opt(
        OPT_SET_META_CONTEXT,
        &meta_data(EXPORT, &["base:allocation"]),
    );
    let rep = r.opt_reply();
    assert_eq!(
        (rep.option, rep.kind),
        (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
        "SET_META_CONTEXT before STRUCTURED_REPLY"
    );

    // A correct LIST still works afterwards and names the export.
    r.send_opt(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let rep = r.opt_reply();
        match rep.kind {
            REP_SERVER => {
                let n = u32::from_be_bytes(rep.data[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(rep.data[4..4 + n].to_vec()).unwrap());
            }
            REP_ACK => break,
            k => panic!("LIST reply {k:#x}"),
        }
    }
    assert_eq!(names, vec![EXPORT.to_string()]);
    r.go(EXPORT).expect("GO after refusals");
    bed.check_served();
}

#[test]
fn export_name_unknown_closes_and_abort_is_acknowledged() {
    let mut bed = Bed::new();
    let mut r = Raw::connect(&bed.addr);
    r.send_opt(OPT_EXPORT_NAME, b"no-such-export");
    let tail = r.expect_closed("EXPORT_NAME of an unknown export");
    assert!(
        tail.is_empty(),
        "server answered EXPORT_NAME of an unknown export: {tail:?}"
    );

    let mut r = Raw::connect(&bed.addr);
    r.send_opt(OPT_ABORT, &[]);
    let rep = r.try_opt_reply();
    if let Some(rep) = rep {
        assert_eq!((rep.option, rep.kind), (OPT_ABORT, REP_ACK), "ABORT reply");
    }
    r.expect_closed("after ABORT");

    // EXPORT_NAME of the real export: size, flags, no zeroes (NO_ZEROES negotiated).
    let mut r = Raw::connect(&bed.addr);
    r.send_opt(OPT_EXPORT_NAME, EXPORT.as_bytes());
    assert_eq!(r.u64(), SIZE, "EXPORT_NAME size");
    let _flags = r.u16();
    let d = pattern(77, 0, 4096);
    assert_eq!(r.write_at(1, 8192, &d), 0);
    assert_bytes(
        "EXPORT_NAME session read",
        &r.read_at(2, 8192, 4096).unwrap(),
        &d,
    );
    bed.check_served();
}

#[test]
fn stalled_handshakes_do_not_block_other_clients() {
    let mut bed = Bed::new();
    // Clients stuck at every handshake stage, held open for the whole test.
    let mut stalled = Vec::new();
    for i in 0..48 {
        let mut r = Raw::greet(&bed.addr);
        match i % 3 {
            0 => {}
            1 => r.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()),
            _ => {
                r.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
                r.send_opt_raw(OPT_GO, 100, &[0, 0]);
            }
        }
        stalled.push(r);
    }
    // Connections that completed GO and then sent half a request header.
    for _ in 0..16 {
        let mut r = bed.open();
        r.send(&req_bytes(0, CMD_READ, 1, 0, 512, &[])[..13]);
        stalled.push(r);
    }
    bed.check_served();
    let mut more = Vec::new();
    for _ in 0..8 {
        more.push(bed.open());
    }
    for (i, r) in more.iter_mut().enumerate() {
        assert_eq!(
            r.read_at(i as u64, 0, 4096).map(|d| d.len()),
            Ok(4096),
            "client {i}"
        );
    }
    drop(stalled);
    bed.check_served();
}

/// SET/LIST_META_CONTEXT data: export name, query count, queries.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn opt_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The real daemon with one 16 MiB export on a real S3 server (dropped in this order).
struct Daemon {
    nbd: NbdS3,
    _s3: S3Server,
}

impl Daemon {
    fn start(spec: ExportSpec) -> Daemon {
        let s3 = S3Server::start();
        let nbd = NbdS3::builder(&s3).export(spec).start();
        Daemon { nbd, _s3: s3 }
    }
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd.port())
    }
    /// Peak resident set of the daemon, KiB.
    fn rss_kib(&self) -> u64 {
        crate::store_bed::proc_status_kib(self.nbd.pid(), "VmHWM:")
    }
}

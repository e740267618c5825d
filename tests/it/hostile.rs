//! Hostile clients over raw TCP against the real daemon (issue 3): every malformed handshake or
//! request gets exactly the reply the protocol prescribes (or a close), and afterwards both a
//! long-lived "bystander" connection and a fresh connection are still served correctly.

use crate::common::{ExportSpec, NbdS3, S3Server};
use crate::raw_nbd::*;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::thread;

const EXPORT: &str = "hostile";
const SIZE: u64 = 16 << 20;
const MIB: u32 = 1 << 20;

/// A running daemon with one export, plus a bystander connection opened before the hostile act.
struct Bed {
    daemon: Daemon,
    addr: String,
    bystander: Raw,
    rounds: u64,
}

impl Bed {
    fn new() -> Bed {
        let daemon = Daemon::start();
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
    fn open(&self) -> Raw {
        Raw::open(&self.addr, EXPORT).0
    }

    /// The bystander writes a new pattern in its own 64 KiB region and reads it back.
    fn check_bystander(&mut self) {
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

    /// After a hostile act: the bystander still works and a fresh connection sees its data.
    fn check_served(&mut self) {
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
        assert!((16..600).contains(&n), "closed after {n} pipelined options");
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
fn requests_past_the_end() {
    let mut bed = Bed::new();
    let mut r = bed.open();
    assert_eq!(r.read_at(1, SIZE, 1), Err(EINVAL), "READ at size");
    assert_eq!(
        r.read_at(2, SIZE - 512, 1024),
        Err(EINVAL),
        "READ across the end"
    );
    assert_eq!(
        r.read_at(3, u64::MAX - 100, 4096),
        Err(EINVAL),
        "READ whose end overflows"
    );
    // WRITE past the end: ENOSPC, and its payload must be consumed (not parsed as requests).
    let poison = req_bytes(0, CMD_WRITE, 0xBAD, 0, 512, &[0xEE; 512]);
    let mut payload = poison.repeat(8);
    payload.resize(8192, 0xEE);
    assert_eq!(
        r.write_at(4, SIZE - 4096, &payload),
        ENOSPC,
        "WRITE across the end"
    );
    assert_eq!(
        r.write_at(5, u64::MAX - 100, &payload[..4096]),
        ENOSPC,
        "WRITE whose end overflows"
    );
    assert_eq!(
        r.cmd(0, CMD_TRIM, 6, SIZE, 4096),
        EINVAL,
        "TRIM past the end"
    );
    assert_eq!(
        r.cmd(0, CMD_WRITE_ZEROES, 7, SIZE - 1, 2),
        ENOSPC,
        "WRITE_ZEROES past the end"
    );
    // The same connection goes on, and none of the poison payload was executed.
    let d = pattern(5, 0, 512);
    assert_eq!(r.write_at(8, 8192, &d), 0);
    assert_eq!(r.read_at(9, 8192, 512).unwrap(), d);
    assert_eq!(
        r.read_at(10, 0, 512).unwrap(),
        vec![0u8; 512],
        "poison payload was executed"
    );
    assert_eq!(
        r.read_at(11, SIZE - 512, 512).map(|d| d.len()),
        Ok(512),
        "last sector readable"
    );
    bed.check_served();
}

#[test]
fn unknown_commands_and_bad_flags_are_einval() {
    let mut bed = Bed::new();
    let mut r = bed.open();
    for (i, typ) in [8u16, 99, 0x7FFF, 0xFFFF].into_iter().enumerate() {
        assert_eq!(
            r.cmd(0, typ, 100 + i as u64, 0, 512),
            EINVAL,
            "command type {typ}"
        );
    }
    let bad: [(u16, u16, &str); 4] = [
        (0x4000, CMD_READ, "unknown flag on READ"),
        (CMDFLAG_FAST_ZERO, CMD_READ, "FAST_ZERO on READ"),
        (CMDFLAG_REQ_ONE, CMD_FLUSH, "REQ_ONE on FLUSH"),
        (0x8000, CMD_TRIM, "unknown flag on TRIM"),
    ];
    for (i, (flags, typ, what)) in bad.into_iter().enumerate() {
        r.send_req(flags, typ, 200 + i as u64, 0, 512, &[]);
        let rep = r.reply_nodata();
        assert_eq!((rep.cookie, rep.error), (200 + i as u64, EINVAL), "{what}");
    }
    // Still in sync.
    assert_eq!(r.read_at(1, 0, 512).map(|d| d.len()), Ok(512));
    bed.check_served();
}

#[test]
fn a_33_mib_read_is_einval() {
    let mut bed = Bed::new();
    let mut r = bed.open();
    assert_eq!(r.read_at(1, 0, 33 * MIB), Err(EINVAL), "33 MiB read");
    assert_eq!(r.read_at(2, 0, u32::MAX), Err(EINVAL), "4 GiB read");
    assert_eq!(r.read_at(3, 0, 4096).map(|d| d.len()), Ok(4096));
    bed.check_served();
}

#[test]
fn zero_length_requests_get_a_reply() {
    let mut bed = Bed::new();
    let mut r = bed.open();
    for (i, typ) in [
        CMD_READ,
        CMD_WRITE,
        CMD_TRIM,
        CMD_WRITE_ZEROES,
        CMD_CACHE,
        CMD_FLUSH,
    ]
    .into_iter()
    .enumerate()
    {
        // Any errno is acceptable (proto.md leaves it open); a disconnect or desync is not.
        let _errno = r.cmd(0, typ, 50 + i as u64, 4096, 0);
    }
    assert_eq!(r.read_at(60, 0, 512).map(|d| d.len()), Ok(512));
    bed.check_served();
}

#[test]
fn client_dying_mid_write_payload_changes_nothing() {
    let mut bed = Bed::new();
    let off = 1 << 20;
    let mut w = bed.open();
    let base = pattern(3, off, 65536);
    assert_eq!(w.write_at(1, off, &base), 0);
    // Clean close half-way through the payload.
    let mut a = bed.open();
    a.send(&req_bytes(0, CMD_WRITE, 2, off, 65536, &[0xCC; 1000]));
    drop(a);
    // Reset (SO_LINGER 0) half-way through the payload.
    let mut b = bed.open();
    b.send(&req_bytes(0, CMD_WRITE, 3, off, 65536, &[0xDD; 30000]));
    set_linger_zero(&b.s);
    drop(b);
    // Half-close: the server sees EOF mid-payload but could still write to us.
    let mut c = bed.open();
    c.send(&req_bytes(0, CMD_WRITE, 4, off, 65536, &[0xEE; 4000]));
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    c.expect_closed("EOF mid-payload");
    bed.check_served();
    let back = w.read_at(5, off, 65536).unwrap();
    assert_bytes("region under torn writes (must be unchanged)", &back, &base);
}

#[test]
fn disc_with_requests_outstanding_answers_them_then_closes() {
    let mut bed = Bed::new();
    let mut r = bed.open();
    let mut batch = Vec::new();
    for i in 0..8u64 {
        let off = (2 << 20) + i * 65536;
        batch.extend(req_bytes(
            0,
            CMD_WRITE,
            i,
            off,
            65536,
            &pattern(i, off, 65536),
        ));
        batch.extend(req_bytes(0, CMD_READ, 100 + i, 0, 4096, &[]));
    }
    batch.extend(req_bytes(0, CMD_FLUSH, 200, 0, 0, &[]));
    batch.extend(req_bytes(0, CMD_DISC, 300, 0, 0, &[]));
    let writer = {
        let mut s = r.s.try_clone().unwrap();
        thread::spawn(move || s.write_all(&batch))
    };
    let mut seen = HashSet::new();
    for _ in 0..17 {
        let rep = r.reply(|c, e| {
            if e == 0 && (100..108).contains(&c) {
                4096
            } else {
                0
            }
        });
        assert_eq!(rep.error, 0, "request {} failed", rep.cookie);
        assert!(
            seen.insert(rep.cookie),
            "cookie {} answered twice",
            rep.cookie
        );
    }
    let expected: HashSet<u64> = (0..8).chain(100..108).chain([200]).collect();
    assert_eq!(seen, expected);
    let tail = r.expect_closed("DISC");
    assert!(tail.is_empty(), "server replied to DISC: {tail:?}");
    writer.join().unwrap().unwrap();
    let mut f = bed.open();
    for i in 0..8u64 {
        let off = (2 << 20) + i * 65536;
        let back = f.read_at(i, off, 65536).unwrap();
        assert_bytes(
            &format!("write {i} before DISC"),
            &back,
            &pattern(i, off, 65536),
        );
    }
    bed.check_served();
}

#[test]
fn sixty_four_pipelined_requests() {
    let mut bed = Bed::new();
    let mut r = bed.open();
    let base = 4u64 << 20;
    // Known content for the reads.
    for i in 0..32u64 {
        let off = base + i * 8192;
        assert_eq!(r.write_at(i, off, &pattern(7, off, 8192)), 0);
    }
    // 32 reads of that content interleaved with 32 writes elsewhere, all sent at once.
    let mut batch = Vec::new();
    let mut lens = HashMap::new();
    for i in 0..32u64 {
        let roff = base + i * 8192;
        batch.extend(req_bytes(0, CMD_READ, 1000 + i, roff, 8192, &[]));
        lens.insert(1000 + i, (roff, 8192usize));
        let woff = base + (1 << 20) + i * 4096;
        batch.extend(req_bytes(
            0,
            CMD_WRITE,
            2000 + i,
            woff,
            4096,
            &pattern(8, woff, 4096),
        ));
        lens.insert(2000 + i, (woff, 0));
    }
    assert_eq!(lens.len(), 64);
    let writer = {
        let mut s = r.s.try_clone().unwrap();
        thread::spawn(move || s.write_all(&batch))
    };
    let mut seen = HashSet::new();
    for _ in 0..64 {
        let rep = r.reply(|c, e| {
            if e == 0 {
                lens.get(&c).map_or(0, |l| l.1)
            } else {
                0
            }
        });
        assert_eq!(rep.error, 0, "request {} failed", rep.cookie);
        let (off, n) = *lens
            .get(&rep.cookie)
            .unwrap_or_else(|| panic!("unknown cookie {}", rep.cookie));
        assert!(
            seen.insert(rep.cookie),
            "cookie {} answered twice",
            rep.cookie
        );
        if n > 0 {
            let what = format!("pipelined read {}", rep.cookie);
            assert_bytes(&what, &rep.data, &pattern(7, off, n));
        }
    }
    writer.join().unwrap().unwrap();
    assert_eq!(seen.len(), 64);
    for i in 0..32u64 {
        let woff = base + (1 << 20) + i * 4096;
        let back = r.read_at(i, woff, 4096).unwrap();
        assert_bytes(
            &format!("pipelined write {i}"),
            &back,
            &pattern(8, woff, 4096),
        );
    }
    bed.check_served();
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let mut bed = Bed::new();
    let mut r = bed.open();
    assert_eq!(r.read_at(1, 0, 512).map(|d| d.len()), Ok(512));
    let mut req = req_bytes(0, CMD_READ, 2, 0, 512, &[]);
    req[0] ^= 0xFF;
    r.send(&req);
    let tail = r.expect_closed("bad request magic");
    assert!(
        tail.is_empty(),
        "server answered a request with bad magic: {tail:?}"
    );
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

fn set_linger_zero(s: &std::net::TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

/// The real daemon with one 16 MiB export on a real S3 server (dropped in this order).
struct Daemon {
    nbd: NbdS3,
    _s3: S3Server,
}

impl Daemon {
    fn start() -> Daemon {
        let s3 = S3Server::start();
        let nbd = NbdS3::builder(&s3)
            .export(ExportSpec::new(EXPORT).size("16MiB"))
            .start();
        Daemon { nbd, _s3: s3 }
    }
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd.port())
    }
    /// Peak resident set of the daemon, KiB.
    fn rss_kib(&self) -> u64 {
        crate::store::proc_status_kib(self.nbd.pid(), "VmHWM:")
    }
}

//! Hostile clients over raw TCP against the real daemon, transmission phase:
//! requests past the end, unknown commands and flags, oversized and zero-length requests,
//! clients dying mid-payload, DISC with requests in flight, deep pipelines, bad magic. After
//! each, the bystander and a fresh connection are still served (see `hostile.rs`).

use crate::common::hostile_bed::{HostileBed, EXPORT, SIZE};
use crate::common::raw_nbd::*;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::thread;

const MIB: u32 = 1 << 20;

#[test]
fn requests_past_the_end() {
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
    let mut r = bed.open();
    assert_eq!(r.read_at(1, 0, 33 * MIB), Err(EINVAL), "33 MiB read");
    assert_eq!(r.read_at(2, 0, u32::MAX), Err(EINVAL), "4 GiB read");
    assert_eq!(r.read_at(3, 0, 4096).map(|d| d.len()), Ok(4096));
    bed.check_served();
}

#[test]
fn zero_length_requests_get_a_reply() {
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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

fn set_linger_zero(s: &std::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt::Linger};
    let l = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, Linger, &l).expect("SO_LINGER");
}

#[test]
fn structured_reads_report_errors_and_holes_as_chunks() {
    let mut bed = HostileBed::new();
    let mut r = Raw::connect(&bed.addr);
    r.expect_opt(OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID, "with data");
    r.expect_opt(OPT_STRUCTURED_REPLY, &[], REP_ACK, "STRUCTURED_REPLY");
    r.go(EXPORT).expect("GO");

    assert_eq!(
        r.read_structured(1, SIZE, 512),
        Err(EINVAL),
        "READ past the end"
    );
    assert_eq!(
        r.read_structured(2, SIZE - 512, 1024),
        Err(EINVAL),
        "READ across the end"
    );
    assert_eq!(
        r.read_structured(3, 0, 33 * MIB),
        Err(EINVAL),
        "33 MiB READ"
    );
    r.send_req(0x4000, CMD_READ, 4, 0, 512, &[]);
    let c = r.chunk();
    assert_eq!(
        (c.cookie, c.kind),
        (4, CHUNK_ERROR),
        "READ with an unknown flag"
    );
    assert_eq!(
        u32::from_be_bytes(c.payload[..4].try_into().unwrap()),
        EINVAL
    );
    assert!(c.flags & CHUNK_FLAG_DONE != 0, "error chunk ends the reply");

    // Data then hole: reassembled from OFFSET_DATA / OFFSET_HOLE chunks, byte-exact.
    let off = 3 << 20;
    let d = pattern(88, off, 4096);
    assert_eq!(
        bed.open().write_at(5, off, &d),
        0,
        "write on a simple-reply connection"
    );
    let mut want = d.clone();
    want.resize(256 * 1024, 0);
    let got = r
        .read_structured(6, off, 256 * 1024)
        .expect("structured READ");
    assert_bytes("structured READ of data + hole", &got, &want);
    bed.check_served();
}

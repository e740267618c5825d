//! Hostile clients over raw TCP against the real daemon, handshake phase: every
//! malformed option gets exactly the reply the protocol prescribes (or a close), and afterwards
//! both a long-lived "bystander" connection and a fresh connection are still served correctly.
//! The transmission phase is in `hostile_requests.rs`; the bed and the raw client are in
//! `tests/common`.

use crate::common::hostile_bed::{HostileBed, EXPORT, SIZE};
use crate::common::raw_nbd::*;
use crate::common::{wait_until, DAEMON_TIMEOUT};
use std::io::Write;
use std::thread;

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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
            || bed.nbd.log_lines("more than 256 options").len() >= 2,
        );
    }
    bed.check_served();
}

#[test]
fn huge_option_length_closes_without_allocating() {
    let mut bed = HostileBed::new();
    let rss_before = bed.peak_rss_kib();
    for opt in [OPT_GO, 0x7777, OPT_LIST, OPT_EXPORT_NAME] {
        let mut r = Raw::connect(&bed.addr);
        r.send_opt_raw(opt, 0xFFFF_FFF0, &[0u8; 64]);
        // An error reply before the close is tolerated; waiting for 4 GiB of data is not.
        r.expect_closed(&format!("option {opt} with length 0xFFFFFFF0"));
        bed.check_served();
    }
    let rss_after = bed.peak_rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "daemon peak RSS grew from {rss_before} KiB to {rss_after} KiB after huge option lengths"
    );
}

#[test]
fn go_with_lying_name_length_is_invalid() {
    let mut bed = HostileBed::new();
    let mut r = Raw::connect(&bed.addr);
    for namelen in [100u32, 4, 0xFFFF_FFFF] {
        let mut d = Vec::new();
        d.extend_from_slice(&namelen.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&0u16.to_be_bytes());
        r.expect_opt(
            OPT_GO,
            &d,
            REP_ERR_INVALID,
            &format!("name length {namelen}"),
        );
    }
    // Info request count that lies too: says 5 requests, carries 1.
    let mut d = go_data(EXPORT, &[]);
    let n = d.len();
    d[n - 2..].copy_from_slice(&5u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    r.expect_opt(OPT_INFO, &d, REP_ERR_INVALID, "info count that lies");
    // An unknown export is ERR_UNKNOWN and the handshake still continues.
    let err = r.go("no-such-export").expect_err("GO on an unknown export");
    assert_eq!(err.kind, REP_ERR_UNKNOWN);
    r.go(EXPORT).expect("GO after the bad ones");
    assert_eq!(r.read_at(1, 0, 4096).map(|d| d.len()), Ok(4096));
    bed.check_served();
}

#[test]
fn list_with_data_starttls_and_early_set_meta_context_are_refused() {
    let mut bed = HostileBed::new();
    let mut r = Raw::connect(&bed.addr);
    r.expect_opt(OPT_LIST, b"junk", REP_ERR_INVALID, "LIST with data");

    r.expect_opt(OPT_STARTTLS, &[], REP_ERR_POLICY, "STARTTLS without TLS");

    r.expect_opt(
        OPT_SET_META_CONTEXT,
        &meta_data(EXPORT, &["base:allocation"]),
        REP_ERR_INVALID,
        "SET_META_CONTEXT before STRUCTURED_REPLY",
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
    let mut bed = HostileBed::new();
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
    let mut bed = HostileBed::new();
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

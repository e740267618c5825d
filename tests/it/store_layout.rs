//! The bucket layout clients and admins rely on, through the real daemon: sparse (only non-zero blocks
//! are objects; zeroing, TRIM and WRITE_ZEROES delete them), exact keys and object sizes, the
//! manifest, the block-size mismatch refusal, and partial-block writes at every alignment.

use crate::common::raw_nbd::{pattern, Raw, REP_ERR_UNKNOWN};
use crate::common::store_bed::*;
use crate::common::{nbdinfo, nbdsh, run_fails, tool, wait_until, ExportSpec, DAEMON_TIMEOUT};
use std::time::Duration;

#[test]
fn sparse_export_stores_only_nonzero_blocks() {
    let (size, bs) = (2 * MIB, 64 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("sp").size("2MiB").block_size("64KiB")]);
    let uri = bed.uri("sp");
    assert_eq!(
        bed.keys("sp/"),
        vec!["sp/nbd-s3.json".to_string()],
        "a fresh export"
    );
    check_manifest(&bed, "sp/", size, bs);
    assert!(
        nbd_read(&uri, 0, size).iter().all(|&b| b == 0),
        "a fresh export reads as zeros"
    );

    let ops: Vec<(u64, Vec<u8>)> = (0..8)
        .map(|i| (i * bs, pattern(30 + i, 0, bs as usize)))
        .collect();
    let mut image = vec![0u8; size as usize];
    apply(&mut image, &ops);
    nbd_write(&uri, &ops, true);
    assert_eq!(bed.keys("sp/"), expected_keys("sp/", &image, bs));
    assert_map_matches_objects(&bed, &uri, "sp/", size, bs);

    // Block 0: zeros written; 1: trimmed; 2: WRITE_ZEROES; 3 + first half of 4: one trim;
    // 5: a partial zero (kept, zeroed in place); 6-7 zeroed by two half-block writes;
    // 12: zeros written where nothing was stored.
    let z = |o: u64, n: u64| (o, vec![0u8; n as usize]);
    let zero_ops = vec![
        z(0, bs),
        z(6 * bs, bs / 2),
        z(6 * bs + bs / 2, bs / 2 + bs),
        z(12 * bs, bs),
    ];
    apply(&mut image, &zero_ops);
    for (o, n) in [
        (bs, bs),
        (2 * bs, bs),
        (3 * bs, bs + bs / 2),
        (5 * bs + 100, 4000),
    ] {
        image[o as usize..(o + n) as usize].fill(0);
    }
    nbd_write(&uri, &zero_ops, false);
    let code = format!(
        "h.trim({bs}, {bs})\nh.zero({bs}, {})\nh.trim({}, {})\nh.zero(4000, {})\nh.flush()",
        2 * bs,
        bs + bs / 2,
        3 * bs,
        5 * bs + 100
    );
    nbdsh(&uri, &[&code]);
    let keys = bed.keys("sp/");
    assert_eq!(
        keys,
        expected_keys("sp/", &image, bs),
        "zeroed whole blocks must be deleted"
    );
    assert_eq!(
        keys,
        vec![
            block_key("sp/", 4),
            block_key("sp/", 5),
            "sp/nbd-s3.json".into()
        ]
    );
    assert_objects_match(&bed, "sp/", &image, bs);
    assert_image("after zeroing", &nbd_read(&uri, 0, size), &image, bs);
    assert_map_matches_objects(&bed, &uri, "sp/", size, bs);
    bed.stop_and_restart();
    // The presence map rebuilt from listing the prefix at open says the same.
    assert_map_matches_objects(&bed, &bed.uri("sp"), "sp/", size, bs);
    bed.assert_reads("sp", &image, bs, "after restart");
    check_manifest(&bed, "sp/", size, bs);
}

#[test]
fn object_layout_keys_and_sizes() {
    let bs = 64 * KIB;
    let size = 48 * bs + 4096;
    let prefix = "lay/x-";
    let mut bed = Bed::start(vec![ExportSpec::new("lay")
        .size(&format!("{size}B"))
        .block_size("64KiB")
        .prefix(prefix)]);
    let uri = bed.uri("lay");
    let info = nbdinfo(&["--size", &uri]);
    assert_eq!(info.trim(), size.to_string(), "advertised size");
    let ops: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(40, 0, bs as usize)),
        (bs + 5, pattern(41, 0, 100)),
        (42 * bs, pattern(42, 0, bs as usize)),
        (47 * bs, pattern(43, 0, bs as usize)),
        (48 * bs, pattern(44, 0, 4096)),
    ];
    let mut image = vec![0u8; size as usize];
    apply(&mut image, &ops);
    nbd_write(&uri, &ops, true);
    let want: Vec<String> = [
        "lay/x-0000000000000000",
        "lay/x-0000000000000001",
        "lay/x-000000000000002a",
    ]
    .into_iter()
    .chain([
        "lay/x-000000000000002f",
        "lay/x-0000000000000030",
        "lay/x-nbd-s3.json",
    ])
    .map(String::from)
    .collect();
    assert_eq!(bed.keys("lay/"), want, "object keys");
    assert_objects_match(&bed, prefix, &image, bs);
    let last = bed
        .s3
        .read_object(BUCKET, "lay/x-0000000000000030")
        .unwrap();
    assert_eq!(
        last.len() as u64,
        bs,
        "the last partial block is a full block_size object"
    );
    assert!(
        last[4096..].iter().all(|&b| b == 0),
        "bytes past the end are zeros"
    );
    check_manifest(&bed, prefix, size, bs);
    // Objects written behind the daemon's back are what it serves after a restart.
    bed.nbd.kill9();
    let doctored = pattern(45, 0, bs as usize);
    bed.s3
        .write_object(BUCKET, "lay/x-0000000000000011", &doctored);
    bed.nbd.restart();
    image[17 * bs as usize..18 * bs as usize].copy_from_slice(&doctored);
    bed.assert_reads("lay", &image, bs, "served from objects");
    assert_map_matches_objects(&bed, &bed.uri("lay"), prefix, size, bs);
}

#[test]
fn block_size_mismatch_refuses_only_that_export() {
    let mut bed = Bed::start(vec![
        ExportSpec::new("mm").size("1MiB").block_size("64KiB"),
        ExportSpec::new("ok").size("1MiB").block_size("64KiB"),
    ]);
    let (a, b) = (pattern(50, 0, 70_000), pattern(51, 0, 70_000));
    nbd_write(&bed.uri("mm"), &[(1000, a.clone())], true);
    nbd_write(&bed.uri("ok"), &[(1000, b.clone())], true);
    let before = bed.keys("mm/");
    let manifest = bed.s3.read_object(BUCKET, "mm/nbd-s3.json").unwrap();

    bed.nbd.sigterm();
    assert!(
        bed.nbd.wait_exit(DAEMON_TIMEOUT).success(),
        "SIGTERM exit status"
    );
    bed.nbd
        .rewrite_config(|c| c.export_mut("mm").block_size = Some("128KiB".into()));
    bed.nbd.restart();

    let names_both = |l: &str| {
        (l.contains("65536") || l.contains("64KiB") || l.contains("64 KiB"))
            && (l.contains("131072") || l.contains("128KiB") || l.contains("128 KiB"))
    };
    let logged = || bed.nbd.log_lines("").iter().any(|l| names_both(l));
    if !logged() {
        wait_until(
            "a log line naming both block sizes",
            Duration::from_secs(20),
            logged,
        );
    }

    // Raw GO: ERR_UNKNOWN carrying the message.
    let mut r = Raw::connect(&format!("127.0.0.1:{}", bed.nbd.port()));
    let err = r.go("mm").expect_err("GO on the refused export");
    assert_eq!(err.kind, REP_ERR_UNKNOWN, "refused export error type");
    let msg = String::from_utf8_lossy(&err.data).into_owned();
    eprintln!("refused export: ERR_UNKNOWN {msg:?}");
    assert!(
        names_both(&msg),
        "ERR_UNKNOWN message {msg:?} must name both block sizes"
    );
    // A real client fails too; the other export is served with its data.
    run_fails(tool("nbdinfo").arg(bed.uri("mm")));
    assert_eq!(
        nbd_read(&bed.uri("ok"), 1000, b.len() as u64),
        b,
        "the other export's data"
    );
    // Nothing of the refused export was touched.
    assert_eq!(bed.keys("mm/"), before, "refused export's objects changed");
    assert_eq!(
        bed.s3.read_object(BUCKET, "mm/nbd-s3.json").unwrap(),
        manifest,
        "manifest rewritten"
    );

    // Back to the stored block size: served again with its data.
    bed.nbd
        .rewrite_config(|c| c.export_mut("mm").block_size = Some("64KiB".into()));
    bed.stop_and_restart();
    assert_eq!(
        nbd_read(&bed.uri("mm"), 1000, a.len() as u64),
        a,
        "data after the fix"
    );
}

/// Each write of the grid gets a window of this many blocks to itself, so no later write
/// hides it: offsets up to 2bs+1 plus lengths up to 3bs+7 stay below 6 blocks.
const WINDOW: u64 = 6;
/// Windows 0..16 and 32 hold stored data before the writes; 16..32 and 33 start absent.
const WINDOWS: u64 = 34;

/// Offsets bs±1, 2bs±1 × lengths 1, 511, bs, 3bs+7, each in its own window, over stored
/// (windows 0..16) and absent (16..32) blocks; then the whole grid again piled up in one
/// window of each kind (32, 33), so later writes modify blocks that are still dirty.
fn alignment_ops(bs: u64) -> Vec<(u64, Vec<u8>)> {
    let offs = [bs - 1, bs + 1, 2 * bs - 1, 2 * bs + 1];
    let lens = [1, 511, bs, 3 * bs + 7];
    let grid: Vec<(u64, u64)> = offs
        .iter()
        .flat_map(|&o| lens.iter().map(move |&l| (o, l)))
        .collect();
    let mut ops = Vec::new();
    let mut seed = 100;
    let mut push = |at: u64, len: u64| {
        seed += 1;
        ops.push((at, pattern(seed, at, len as usize)));
    };
    for (i, &(off, len)) in grid.iter().enumerate() {
        push(i as u64 * WINDOW * bs + off, len);
        push((16 + i as u64) * WINDOW * bs + off, len);
    }
    for w in [32, 33] {
        for &(off, len) in &grid {
            push(w * WINDOW * bs + off, len);
        }
    }
    ops
}

fn check_alignment(bed: &mut Bed, name: &str, bs: u64) {
    let size = WINDOWS * WINDOW * bs;
    let uri = bed.uri(name);
    let prefix = format!("{name}/");
    let base: Vec<(u64, Vec<u8>)> = (0..16)
        .chain([32])
        .map(|w| (w * WINDOW * bs, pattern(99, w, (WINDOW * bs) as usize)))
        .collect();
    let mut image = vec![0u8; size as usize];
    apply(&mut image, &base);
    nbd_write(&uri, &base, true);
    // Cold cache, so partial writes must read-modify-write from S3.
    bed.crash_and_restart();
    let uri = bed.uri(name);
    let ops = alignment_ops(bs);
    apply(&mut image, &ops);
    nbd_write(&uri, &ops, false);
    assert_image(
        &format!("{name}: after partial writes"),
        &nbd_read(&uri, 0, size),
        &image,
        bs,
    );
    nbdsh(&uri, &["h.flush()"]);
    bed.assert_stored(&prefix, &image, bs, &format!("{name}: after FLUSH"));
    bed.crash_and_restart();
    bed.assert_reads(name, &image, bs, &format!("{name}: after restart"));
}

#[test]
fn partial_block_writes_at_every_alignment_4k() {
    let size = format!("{}B", WINDOWS * WINDOW * 4 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("p4").size(&size).block_size("4KiB")]);
    check_alignment(&mut bed, "p4", 4 * KIB);
}

#[test]
fn partial_block_writes_at_every_alignment_default_block_size() {
    let size = WINDOWS * WINDOW * 128 * KIB;
    let mut bed = Bed::start(vec![ExportSpec::new("p128").size(&format!("{size}B"))]);
    check_alignment(&mut bed, "p128", 128 * KIB);
    check_manifest(&bed, "p128/", size, 128 * KIB);
}

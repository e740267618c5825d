//! The block store against the real daemon and a real S3 server: read-your-writes
//! across connections, FLUSH (also across connections), FUA and SIGTERM durability. Layout,
//! sparseness, refusal and alignment are in `store_layout.rs`; memory and a real filesystem in
//! `store_load.rs`; the bed and byte-exact checks in `store_bed.rs`.

use crate::common::raw_nbd::pattern;
use crate::common::store_bed::*;
use crate::common::{nbdsh, ExportSpec};

#[test]
fn read_your_writes_across_connections() {
    let bed = Bed::start(vec![ExportSpec::new("ryw")
        .size("8MiB")
        .block_size("64KiB")]);
    check_read_your_writes(&bed.uri("ryw"));
}

/// Two simultaneous connections see each other's writes and zeroes at once, no FLUSH.
fn check_read_your_writes(uri: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (pattern(1, 0, 200_000), pattern(2, 0, 70_000));
    std::fs::write(dir.path().join("a"), &a).unwrap();
    std::fs::write(dir.path().join("b"), &b).unwrap();
    let code = format!(
        r#"
a = open({a:?}, 'rb').read(); b = open({b:?}, 'rb').read()
h2 = nbd.NBD(); h2.connect_uri({uri:?})
assert h2.can_multi_conn(), 'CAN_MULTI_CONN not advertised'
h.pwrite(a, 65536 * 3 + 100)
assert h2.pread(len(a), 65536 * 3 + 100) == a, 'second connection does not see the first one\'s write'
h2.pwrite(b, 65536 * 4 - 7)
want = bytearray(a); want[65536 - 107:65536 - 107 + len(b)] = b
assert h.pread(len(a), 65536 * 3 + 100) == bytes(want), 'first connection does not see the overlapping write'
h2.zero(65536, 65536 * 5)
want[65536 * 2 - 100:65536 * 3 - 100] = bytes(65536)
assert h.pread(len(a), 65536 * 3 + 100) == bytes(want), 'zeroing on one connection not seen on the other'
h2.shutdown()
print('ok')
"#,
        a = dir.path().join("a").to_str().unwrap(),
        b = dir.path().join("b").to_str().unwrap(),
    );
    let out = nbdsh(uri, &[&code]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// Writes a mix of whole, partial and spanning blocks; returns the reference image.
fn mixed_writes(uri: &str, size: u64, bs: u64, seed: u64, flush: bool) -> Vec<u8> {
    let ops: Vec<(u64, Vec<u8>)> = vec![
        (0, pattern(seed, 0, bs as usize)),
        (3 * bs, pattern(seed + 1, 3 * bs, 2 * bs as usize)),
        (6 * bs + 123, pattern(seed + 2, 0, 1000)),
        (9 * bs - 10, pattern(seed + 3, 0, bs as usize + 20)),
        (size - 4096, pattern(seed + 4, 0, 4096)),
    ];
    let mut image = vec![0u8; size as usize];
    apply(&mut image, &ops);
    nbd_write(uri, &ops, flush);
    image
}

#[test]
fn flush_durability_survives_kill9() {
    let (size, bs) = (4 * MIB, 64 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("fl").size("4MiB").block_size("64KiB")]);
    let image = mixed_writes(&bed.uri("fl"), size, bs, 10, true);
    // Flushed means stored: every non-zero block is an object with exactly those bytes, now.
    bed.assert_stored("fl/", &image, bs, "after FLUSH");
    bed.crash_and_restart();
    bed.assert_reads("fl", &image, bs, "after kill -9 + restart");
}

#[test]
fn flush_on_another_connection_covers_every_connections_writes() {
    let (size, bs) = (4 * MIB, 64 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("mc").size("4MiB").block_size("64KiB")]);
    let uri = bed.uri("mc");
    // Writes on one connection (closed without FLUSH), FLUSH on another (multi-conn contract).
    let image = mixed_writes(&uri, size, bs, 15, false);
    nbdsh(&uri, &["h.flush()"]);
    bed.assert_stored("mc/", &image, bs, "after FLUSH");
    bed.crash_and_restart();
    bed.assert_reads("mc", &image, bs, "after kill -9 + restart");
}

#[test]
fn sigterm_flushes_unflushed_writes() {
    let (size, bs) = (4 * MIB, 64 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("st").size("4MiB").block_size("64KiB")]);
    let image = mixed_writes(&bed.uri("st"), size, bs, 20, false);
    bed.stop_and_restart();
    bed.assert_stored("st/", &image, bs, "after SIGTERM");
    bed.assert_reads("st", &image, bs, "after SIGTERM + restart");
}

#[test]
fn fua_writes_are_stored_before_their_reply() {
    let (size, bs) = (MIB, 64 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("fua")
        .size("1MiB")
        .block_size("64KiB")]);
    let uri = bed.uri("fua");
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(60, 0, bs as usize + 100);
    std::fs::write(dir.path().join("d"), &data).unwrap();
    let mut image = vec![0u8; size as usize];
    apply(&mut image, &[(2 * bs, pattern(61, 0, bs as usize))]);
    nbd_write(
        &uri,
        &[(2 * bs, image[2 * bs as usize..3 * bs as usize].to_vec())],
        true,
    );
    // No FLUSH from here on: only FUA makes these durable.
    let code = format!(
        "h.pwrite(open({:?}, 'rb').read(), {}, nbd.CMD_FLAG_FUA)\nh.trim({bs}, {}, nbd.CMD_FLAG_FUA)",
        dir.path().join("d").to_str().unwrap(),
        5 * bs - 50,
        2 * bs
    );
    nbdsh(&uri, &[&code]);
    apply(&mut image, &[(5 * bs - 50, data)]);
    image[2 * bs as usize..3 * bs as usize].fill(0);
    // Stored at reply time, before any flush or shutdown: check the bucket right away.
    bed.assert_stored("fua/", &image, bs, "after FUA");
    bed.crash_and_restart();
    bed.assert_reads("fua", &image, bs, "FUA data after kill -9");
}

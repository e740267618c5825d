//! The block store against the real daemon and a real S3 server (issue 4): read-your-writes,
//! FLUSH and SIGTERM durability, sparseness, the exact object layout, the block-size mismatch
//! refusal, partial-block writes at every alignment. Memory and filesystem tests live in
//! `store_load.rs`. Data is checked byte for byte against a reference image kept here.

use crate::common::{
    nbdinfo, nbdsh, run_fails, tool, wait_until, ExportSpec, NbdS3, S3Server, DAEMON_TIMEOUT,
};
use crate::raw_nbd::{pattern, Raw, REP_ERR_UNKNOWN};
use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
const BUCKET: &str = "nbd";

/// A daemon and its S3 server (the daemon is dropped first).
pub struct Bed {
    pub nbd: NbdS3,
    pub s3: S3Server,
}

impl Bed {
    /// Starts S3 and the daemon with `exports`.
    pub fn start(exports: Vec<ExportSpec>) -> Bed {
        Self::start_with(exports, |b| b)
    }

    /// Like `start`, with builder tweaks (cache sizes, …).
    pub fn start_with(
        exports: Vec<ExportSpec>,
        f: impl FnOnce(crate::common::daemon::NbdS3Builder) -> crate::common::daemon::NbdS3Builder,
    ) -> Bed {
        let s3 = S3Server::start();
        let mut b = NbdS3::builder(&s3);
        for e in exports {
            b = b.export(e);
        }
        let nbd = f(b).start();
        Bed { nbd, s3 }
    }

    pub fn uri(&self, export: &str) -> String {
        self.nbd.uri(export)
    }

    /// Keys under `prefix` in the bucket, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.s3.list_keys(BUCKET, prefix)
    }

    /// SIGTERM, expect exit 0 within the deadline, start again.
    pub fn stop_and_restart(&mut self) {
        self.nbd.sigterm();
        let st = self.nbd.wait_exit(DAEMON_TIMEOUT);
        assert!(
            st.success(),
            "nbd-s3 exited with {st} on SIGTERM:\n{}",
            self.nbd.logs()
        );
        self.nbd.restart();
    }
}

/// Writes every `(offset, data)` in order through one nbdsh connection, then FLUSH if asked.
pub fn nbd_write(uri: &str, ops: &[(u64, Vec<u8>)], flush: bool) {
    let dir = tempfile::tempdir().unwrap();
    let pay = dir.path().join("payload");
    let mut all = Vec::new();
    let mut spans = Vec::new();
    for (off, d) in ops {
        spans.push(format!("({off},{},{})", all.len(), all.len() + d.len()));
        all.extend_from_slice(d);
    }
    std::fs::write(&pay, &all).unwrap();
    let code = format!(
        "d = open({:?}, 'rb').read()\nfor off, a, b in [{}]:\n    h.pwrite(d[a:b], off)\n{}",
        pay.to_str().unwrap(),
        spans.join(","),
        if flush { "h.flush()" } else { "" }
    );
    nbdsh(uri, &[&code]);
}

/// Reads `len` bytes at `off` through nbdsh (chunked below the 32 MiB request limit).
pub fn nbd_read(uri: &str, off: u64, len: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let code = format!(
        "f = open({:?}, 'wb')\no, e = {off}, {}\nwhile o < e:\n    n = min(e - o, 8 << 20)\n    f.write(h.pread(n, o))\n    o += n\nf.close()",
        out.to_str().unwrap(),
        off + len
    );
    nbdsh(uri, &[&code]);
    let d = std::fs::read(&out).unwrap();
    assert_eq!(d.len() as u64, len, "nbdsh read length");
    d
}

/// Applies `ops` to the reference image.
pub fn apply(reference: &mut [u8], ops: &[(u64, Vec<u8>)]) {
    for (off, d) in ops {
        reference[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
}

/// Asserts `got == want`, naming the first differing offset and its block.
pub fn assert_image(what: &str, got: &[u8], want: &[u8], bs: u64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let n = got[i..]
            .iter()
            .zip(&want[i..])
            .take_while(|(a, b)| a != b)
            .count();
        panic!(
            "{what}: first difference at byte {i} (block {}, offset {} in block), {n} bytes differ \
             there: got {:02x?}…, want {:02x?}…",
            i as u64 / bs,
            i as u64 % bs,
            &got[i..(i + 8).min(got.len())],
            &want[i..(i + 8).min(want.len())]
        );
    }
}

/// `<prefix>` + 16 lowercase hex digits.
pub fn block_key(prefix: &str, i: u64) -> String {
    format!("{prefix}{i:016x}")
}

/// The exact key set a flushed export must hold: the manifest plus every non-zero block.
pub fn expected_keys(prefix: &str, image: &[u8], bs: u64) -> Vec<String> {
    let mut keys: Vec<String> = image
        .chunks(bs as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| block_key(prefix, i as u64))
        .collect();
    keys.push(format!("{prefix}nbd-s3.json"));
    keys.sort();
    keys
}

/// Checks every stored block object is exactly `bs` bytes equal to the image (zero-padded).
pub fn assert_objects_match(bed: &Bed, prefix: &str, image: &[u8], bs: u64) {
    for (i, chunk) in image.chunks(bs as usize).enumerate() {
        let key = block_key(prefix, i as u64);
        if let Some(obj) = bed.s3.read_object(BUCKET, &key) {
            let mut want = chunk.to_vec();
            want.resize(bs as usize, 0);
            assert_eq!(
                obj.len() as u64,
                bs,
                "object {key} must be exactly block_size bytes"
            );
            assert_image(&format!("object {key}"), &obj, &want, bs);
        }
    }
}

/// `nbdinfo --map` (base:allocation) as `(offset, length, type)`.
pub fn allocation_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let text = nbdinfo(&["--map", uri]);
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match (num(0), num(1), num(2)) {
                (Some(o), Some(n), Some(t)) => (o, n, t as u32),
                _ => panic!("unparsable nbdinfo --map line {l:?} in:\n{text}"),
            }
        })
        .collect()
}

/// After a FLUSH, BLOCK_STATUS must agree with the bucket: blocks with an object are data
/// (type 0), blocks without are hole|zero (3), and the map covers the export exactly.
pub fn assert_map_matches_objects(bed: &Bed, uri: &str, prefix: &str, size: u64, bs: u64) {
    let map = allocation_map(uri);
    let mut at = 0;
    for &(off, len, typ) in &map {
        assert_eq!(off, at, "map not contiguous: {map:?}");
        at += len;
        for block in off / bs..(off + len).div_ceil(bs) {
            let stored = bed
                .s3
                .read_object(BUCKET, &block_key(prefix, block))
                .is_some();
            let want = if stored { 0 } else { 3 };
            assert_eq!(
                typ, want,
                "block {block} (stored: {stored}) in map entry {off}+{len}: {map:?}"
            );
        }
    }
    assert_eq!(at, size, "map covers the export: {map:?}");
}

/// A field of /proc/PID/status in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn read_your_writes_across_connections() {
    let bed = Bed::start(vec![ExportSpec::new("ryw")
        .size("8MiB")
        .block_size("64KiB")]);
    check_read_your_writes(&bed.uri("ryw"));
}

/// Two simultaneous connections see each other's writes and zeroes at once, no FLUSH.
pub fn check_read_your_writes(uri: &str) {
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
    assert_eq!(
        bed.keys("fl/"),
        expected_keys("fl/", &image, bs),
        "objects after FLUSH"
    );
    assert_objects_match(&bed, "fl/", &image, bs);
    bed.nbd.kill9();
    bed.nbd.restart();
    assert_image(
        "after kill -9 + restart",
        &nbd_read(&bed.uri("fl"), 0, size),
        &image,
        bs,
    );
}

#[test]
fn flush_on_another_connection_covers_every_connections_writes() {
    let (size, bs) = (4 * MIB, 64 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("mc").size("4MiB").block_size("64KiB")]);
    let uri = bed.uri("mc");
    // Writes on one connection (closed without FLUSH), FLUSH on another (multi-conn contract).
    let image = mixed_writes(&uri, size, bs, 15, false);
    nbdsh(&uri, &["h.flush()"]);
    assert_eq!(
        bed.keys("mc/"),
        expected_keys("mc/", &image, bs),
        "objects after FLUSH"
    );
    assert_objects_match(&bed, "mc/", &image, bs);
    bed.nbd.kill9();
    bed.nbd.restart();
    assert_image(
        "after kill -9 + restart",
        &nbd_read(&bed.uri("mc"), 0, size),
        &image,
        bs,
    );
}

#[test]
fn sigterm_flushes_unflushed_writes() {
    let (size, bs) = (4 * MIB, 64 * KIB);
    let mut bed = Bed::start(vec![ExportSpec::new("st").size("4MiB").block_size("64KiB")]);
    let image = mixed_writes(&bed.uri("st"), size, bs, 20, false);
    bed.stop_and_restart();
    assert_eq!(
        bed.keys("st/"),
        expected_keys("st/", &image, bs),
        "objects after SIGTERM"
    );
    assert_objects_match(&bed, "st/", &image, bs);
    assert_image(
        "after SIGTERM + restart",
        &nbd_read(&bed.uri("st"), 0, size),
        &image,
        bs,
    );
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
    assert_eq!(
        bed.keys("fua/"),
        expected_keys("fua/", &image, bs),
        "objects after FUA"
    );
    assert_objects_match(&bed, "fua/", &image, bs);
    bed.nbd.kill9();
    bed.nbd.restart();
    assert_image(
        "FUA data after kill -9",
        &nbd_read(&bed.uri("fua"), 0, size),
        &image,
        bs,
    );
}

/// Checks the manifest: format 1, block_size, size, created as RFC 3339.
fn check_manifest(bed: &Bed, prefix: &str, size: u64, bs: u64) {
    let raw = bed
        .s3
        .read_object(BUCKET, &format!("{prefix}nbd-s3.json"))
        .expect("manifest exists");
    let v: serde_json::Value = serde_json::from_slice(&raw).expect("manifest is JSON");
    assert_eq!(v["format"], 1, "manifest format in {v}");
    assert_eq!(v["block_size"], bs, "manifest block_size in {v}");
    assert_eq!(v["size"], size, "manifest size in {v}");
    let created = v["created"]
        .as_str()
        .unwrap_or_else(|| panic!("manifest created in {v}"));
    assert!(
        is_rfc3339(created),
        "manifest created {created:?} is not RFC 3339"
    );
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20 || !(digits(0..4) && digits(5..7) && digits(8..10) && digits(11..13)) {
        return false;
    }
    if !(b[4] == b'-' && b[7] == b'-' && matches!(b[10], b'T' | b't') && b[13] == b':') {
        return false;
    }
    if !(digits(14..16) && b[16] == b':' && digits(17..19)) {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &r[n..];
    }
    rest == "Z"
        || rest == "z"
        || (rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":")
}

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
    assert_image(
        "after restart",
        &nbd_read(&bed.uri("sp"), 0, size),
        &image,
        bs,
    );
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
    assert_image(
        "served from objects",
        &nbd_read(&bed.uri("lay"), 0, size),
        &image,
        bs,
    );
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
    bed.nbd.kill9();
    bed.nbd.restart();
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
    assert_eq!(
        bed.keys(&prefix),
        expected_keys(&prefix, &image, bs),
        "{name}: objects"
    );
    assert_objects_match(bed, &prefix, &image, bs);
    bed.nbd.kill9();
    bed.nbd.restart();
    assert_image(
        &format!("{name}: after restart"),
        &nbd_read(&bed.uri(name), 0, size),
        &image,
        bs,
    );
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

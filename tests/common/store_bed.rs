//! The store bed: a daemon + S3 bed, nbdsh-driven writes and reads, and checks
//! of the bucket (exact keys, object bytes, manifest, BLOCK_STATUS) against a reference image
//! kept in the test, so every assertion is on exact bytes and exact keys.

use super::{nbdinfo, nbdsh, ExportSpec, NbdS3, S3Server, DAEMON_TIMEOUT};
use std::path::Path;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const BUCKET: &str = "nbd";

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
        f: impl FnOnce(super::daemon::NbdS3Builder) -> super::daemon::NbdS3Builder,
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
        // The export lease (`nbd-s3.lock`) is a control object held while a daemon runs, not
        // part of the layout these tests check.
        let mut keys = self.s3.list_keys(BUCKET, prefix);
        keys.retain(|k| !k.ends_with("nbd-s3.lock"));
        keys
    }

    /// The bucket holds exactly what a flushed `image` must under `prefix`: the manifest plus
    /// one object per non-zero block, each exactly that block. `when` names the moment.
    pub fn assert_stored(&self, prefix: &str, image: &[u8], bs: u64, when: &str) {
        assert_eq!(
            self.keys(prefix),
            expected_keys(prefix, image, bs),
            "objects {when}"
        );
        assert_objects_match(self, prefix, image, bs);
    }

    /// Reading all of `export` through NBD gives `image`.
    pub fn assert_reads(&self, export: &str, image: &[u8], bs: u64, when: &str) {
        let got = nbd_read(&self.uri(export), 0, image.len() as u64);
        assert_image(when, &got, image, bs);
    }

    /// Kill -9 (a crash) and start again, so every later read is a GET from S3.
    pub fn crash_and_restart(&mut self) {
        self.nbd.kill9();
        self.nbd.restart();
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

/// Python code that loads `ops` from a payload file in `dir` as `ops = [(offset, bytes), …]`:
/// the bytes travel in a file, so a script of any size stays small.
pub fn ops_code(dir: &Path, ops: &[(u64, Vec<u8>)]) -> String {
    let pay = dir.join("payload");
    let mut all = Vec::new();
    let mut spans = Vec::new();
    for (off, d) in ops {
        spans.push(format!("({off},{},{})", all.len(), all.len() + d.len()));
        all.extend_from_slice(d);
    }
    std::fs::write(&pay, &all).expect("write payload");
    format!(
        "d = open({:?}, 'rb').read()\nops = [(o, d[a:b]) for o, a, b in [{}]]\n",
        pay.to_str().expect("UTF-8 temp path"),
        spans.join(",")
    )
}

/// Writes every `(offset, data)` in order through one nbdsh connection, then FLUSH if asked;
/// any error fails the test.
pub fn nbd_write(uri: &str, ops: &[(u64, Vec<u8>)], flush: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let code = format!(
        "{}for o, b in ops:\n    h.pwrite(b, o)\n{}",
        ops_code(dir.path(), ops),
        if flush { "h.flush()" } else { "" }
    );
    nbdsh(uri, &[&code]);
}

/// FLUSH until it succeeds (write-back may still be in its backoff after S3 or the lease
/// comes back); every failure must be EIO, and more than `max_attempts` fail the test.
/// Returns the number of attempts.
pub fn flush_until_ok(uri: &str, max_attempts: u32) -> u32 {
    let code = format!(
        "n = 0\nwhile True:\n    n += 1\n    try:\n        h.flush()\n        break\n    \
         except nbd.Error as e:\n        assert e.errno == 'EIO', e\n        \
         assert n < {max_attempts}, 'FLUSH keeps failing'\nprint('attempts', n)"
    );
    let out = nbdsh(uri, &[&code]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix("attempts ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("flush loop printed {text:?}"))
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

/// Every block of the image is in the bucket as written (non-zero blocks as exact objects,
/// zero blocks absent or zero), read from s3s-fs's files, not through the daemon.
pub fn assert_bucket_matches(s3: &S3Server, prefix: &str, image: &[u8], bs: u64) {
    for (i, chunk) in image.chunks(bs as usize).enumerate() {
        let key = block_key(prefix, i as u64);
        let mut want = chunk.to_vec();
        want.resize(bs as usize, 0);
        match s3.read_object(BUCKET, &key) {
            Some(obj) => assert_image(&format!("object {key}"), &obj, &want, bs),
            None => assert!(
                want.iter().all(|&b| b == 0),
                "block {i} holds data but {key} is not in the bucket"
            ),
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

/// Checks the manifest: format 1, block_size, size, created as RFC 3339.
pub fn check_manifest(bed: &Bed, prefix: &str, size: u64, bs: u64) {
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

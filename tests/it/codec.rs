//! Compression and encryption per export, through the real daemon, s3s-fs and real NBD
//! clients: data round-trips with every combination; compressible data takes fewer bytes in
//! the bucket; an encrypted export leaves no plaintext on the server's disk; objects that were
//! swapped, truncated, bit-flipped or copied from another export read as EIO (never wrong
//! data), logged with the key file and counted; a wrong key or a changed codec refuses that
//! export while the others are served; `check-config` checks the key file.

use crate::common::metrics::{get, Metrics, ANY_PORT};
use crate::common::raw_nbd::{Raw, REP_ERR_UNKNOWN};
use crate::common::s3::set_mode;
use crate::common::store_bed::*;
use crate::common::{nbdcopy, nbdsh, pattern, run, tool, wait_until, ExportSpec, S3Server};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A key file (mode 0600) in `dir`: 64 hex digits and a newline.
fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", format!("{byte:02x}").repeat(32))).expect("key");
    set_mode(&path, 0o600);
    path
}

/// The bucket of encrypted exports in these tests: nothing in it may be plaintext.
const SEALED: &str = "sealed";

fn spec(name: &str, zstd: bool, key: Option<&Path>) -> ExportSpec {
    let bucket = if key.is_some() { SEALED } else { BUCKET };
    let mut s = ExportSpec::new(name)
        .size("4MiB")
        .block_size("64KiB")
        .bucket(bucket);
    if zstd {
        s = s.line("compression = \"zstd\"");
    }
    if let Some(k) = key {
        s = s.line(&format!(
            "encryption_key_file = {:?}",
            k.display().to_string()
        ));
    }
    s
}

/// Text that compresses well and is easy to find on disk.
const NEEDLE: &[u8] = b"nbd-s3 plaintext canary ";

fn text(len: usize) -> Vec<u8> {
    NEEDLE.iter().copied().cycle().take(len).collect()
}

/// Bytes of the block objects under `prefix` in `bucket` (manifest and lease excluded).
fn stored_bytes(s3: &S3Server, bucket: &str, prefix: &str) -> u64 {
    s3.list_keys(bucket, prefix)
        .iter()
        .filter(|k| !k.ends_with(".json") && !k.ends_with(".lock"))
        .map(|k| s3.read_object(bucket, k).map_or(0, |o| o.len() as u64))
        .sum()
}

/// Whether `grep -r` finds `needle` in any file of `bucket` on the S3 server's disk.
fn on_disk(s3: &S3Server, bucket: &str, needle: &[u8]) -> bool {
    let out = run(tool("grep")
        .args(["-rlF", "--", std::str::from_utf8(needle).expect("ascii")])
        .arg(s3.root().join(bucket)));
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("grep failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn manifest(s3: &S3Server, bucket: &str, prefix: &str) -> serde_json::Value {
    let raw = s3
        .read_object(bucket, &format!("{prefix}nbd-s3.json"))
        .expect("manifest");
    serde_json::from_slice(&raw).expect("manifest JSON")
}

/// 2 MiB: the first half compressible text, the second half incompressible.
fn image() -> Vec<u8> {
    let mut image = text(MIB as usize);
    image.extend(pattern(MIB as usize, 7));
    image
}

#[test]
fn every_combination_round_trips_and_the_bucket_holds_what_each_promises() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "k.key", 0x5a);
    let combos: [(&str, bool, Option<&Path>); 4] = [
        ("off", false, None),
        ("zstd", true, None),
        ("enc", false, Some(&key)),
        ("both", true, Some(&key)),
    ];
    let mut bed = Bed::start(combos.iter().map(|(n, z, k)| spec(n, *z, *k)).collect());
    let data = image();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image");
    std::fs::write(&file, &data).unwrap();
    for (name, ..) in &combos {
        // nbdcopy writes (and flushes) the image over several connections at once, so text
        // and random blocks arrive, and are encoded by write-back, in no fixed order: whether
        // a block is compressed must depend on its bytes alone. nbdsh then writes a partial
        // block on top.
        nbdcopy(&[file.to_str().unwrap(), &bed.uri(name)]);
        nbd_write(&bed.uri(name), &[(100_000, text(1000))], true);
    }
    let mut want = data.clone();
    want[100_000..101_000].copy_from_slice(&text(1000));
    want.resize(4 * MIB as usize, 0);
    // Restarted: every read below is a GET and a decode.
    bed.stop_and_restart();
    for (name, zstd, key) in &combos {
        let back = dir.path().join(format!("back-{name}"));
        nbdcopy(&[&bed.uri(name), back.to_str().unwrap()]);
        assert_image(name, &std::fs::read(&back).unwrap(), &want, 64 * KIB);
        let bucket = if key.is_some() { SEALED } else { BUCKET };
        let m = manifest(&bed.s3, bucket, &format!("{name}/"));
        let plain = !zstd && key.is_none();
        assert_eq!(m["format"], if plain { 1 } else { 2 }, "{name}: {m}");
        assert_eq!(m["id"].as_str().map(str::len), Some(32), "{name}: {m}");
        assert_eq!(
            m["compression"].as_str(),
            zstd.then_some("zstd:3"),
            "{name}: {m}"
        );
        let fp = m["encryption"]["key_fingerprint"].as_str();
        assert_eq!(fp.is_some(), key.is_some(), "{name}: {m}");
        assert!(!m.to_string().contains("5a5a"), "key bytes in {m}");
        // 32 blocks hold data: 16 of text, 16 random.
        let stored = stored_bytes(&bed.s3, bucket, &format!("{name}/"));
        eprintln!("{name}: {stored} bytes stored for 2 MiB");
        match zstd {
            // The random half raw (1 MiB plus headers), the text half in a few KiB: one text
            // block stored raw would add 64 KiB.
            true => assert!(
                stored < MIB + 32 * KIB,
                "{name}: {stored} bytes: text blocks stored uncompressed"
            ),
            false => assert!(stored >= 2 * MIB, "{name}: {stored} bytes"),
        }
    }
    // The text is on disk for the clear exports (so the grep can find it), never for the
    // encrypted ones.
    assert!(on_disk(&bed.s3, BUCKET, NEEDLE), "grep finds clear text");
    assert!(
        !on_disk(&bed.s3, SEALED, NEEDLE),
        "plaintext on the S3 server's disk for an encrypted export"
    );
}

/// s3s-fs keeps each object's user metadata (our CRC32C) in a file beside the buckets. An
/// object replaced through S3 by someone else carries no checksum of ours, so the codec alone
/// must catch it: this drops every checksum, as if all objects had been uploaded that way.
fn drop_checksums(s3: &S3Server) {
    for e in std::fs::read_dir(s3.root()).expect("s3s-fs root").flatten() {
        if e.file_name().to_string_lossy().ends_with(".metadata.json") {
            std::fs::remove_file(e.path()).expect("remove metadata");
        }
    }
}

/// Replaces object `key` with `data`.
fn forge(s3: &S3Server, bucket: &str, key: &str, data: &[u8]) {
    s3.write_object(bucket, key, data);
}

/// Reads `len` bytes at `off` with nbdsh and returns the errno name of the failure, or "ok".
fn read_errno(uri: &str, off: u64, len: u64) -> String {
    let code = format!(
        "try:\n    h.pread({len}, {off})\n    print('ok')\nexcept nbd.Error as e:\n    print(e.errno)"
    );
    let out = nbdsh(uri, &[&code]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn swapped_truncated_flipped_and_foreign_objects_read_as_eio_never_as_data() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "k.key", 0x11);
    let mut bed = Bed::start_with(
        vec![spec("v", true, Some(&key)), spec("w", true, Some(&key))],
        |b| b.config(|c| c.metrics = Some(ANY_PORT.into())),
    );
    let bs = 64 * KIB;
    let blocks: Vec<(u64, Vec<u8>)> = (0..6)
        .map(|i| (i * bs, text(bs as usize - i as usize)))
        .collect();
    nbd_write(&bed.uri("v"), &blocks, true);
    nbd_write(&bed.uri("w"), &blocks, true);
    bed.nbd.sigterm();
    assert!(bed.nbd.wait_exit(crate::common::DAEMON_TIMEOUT).success());

    let k = |i: u64| block_key("v/", i);
    let obj = |i: u64| bed.s3.read_object(SEALED, &k(i)).expect("stored");
    let (o0, o1, o2, o3) = (obj(0), obj(1), obj(2), obj(3));
    // Swapped, truncated, one bit flipped, copied from the same block of another export.
    forge(&bed.s3, SEALED, &k(0), &o1);
    forge(&bed.s3, SEALED, &k(1), &o0);
    forge(&bed.s3, SEALED, &k(2), &o2[..o2.len() - 1]);
    let mut flipped = o3.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x04;
    forge(&bed.s3, SEALED, &k(3), &flipped);
    let foreign = bed
        .s3
        .read_object(SEALED, &block_key("w/", 4))
        .expect("w's block");
    forge(&bed.s3, SEALED, &k(4), &foreign);
    drop_checksums(&bed.s3);
    bed.nbd.restart();

    let uri = bed.uri("v");
    for i in 0..5 {
        assert_eq!(read_errno(&uri, i * bs + 10, 100), "EIO", "block {i}");
    }
    // Untouched neighbours and the other export still read right.
    assert_eq!(nbd_read(&uri, 5 * bs, 100), text(100));
    assert_eq!(nbd_read(&bed.uri("w"), 4 * bs, 100), text(100));
    // The daemon's stderr reaches the test through a reader thread: wait for the line.
    let key_path = key.display().to_string();
    wait_until(
        "a log line naming the key file and the object",
        Duration::from_secs(20),
        || {
            bed.nbd
                .log_lines(&key_path)
                .iter()
                .any(|l| l.contains(&k(0)))
        },
    );
    let samples = Metrics::of(&bed.nbd).scrape();
    let count = |m: &str| get(&samples, m, &[("export", "v")]);
    assert!(
        count("nbd_s3_export_decrypt_errors_total") >= 3.0,
        "{samples:?}"
    );
    assert!(
        count("nbd_s3_export_decode_errors_total") >= 1.0,
        "truncated"
    );
}

#[test]
fn a_wrong_key_or_a_changed_codec_refuses_that_export_and_serves_the_others() {
    let keys = tempfile::tempdir().unwrap();
    let (k1, k2) = (
        key_file(keys.path(), "k1.key", 1),
        key_file(keys.path(), "k2.key", 2),
    );
    let mut bed = Bed::start(vec![spec("c", true, Some(&k1)), spec("p", false, None)]);
    let data = text(300_000);
    nbd_write(&bed.uri("c"), &[(0, data.clone())], true);
    nbd_write(&bed.uri("p"), &[(0, data.clone())], true);
    let objects = |bed: &Bed| {
        let mut keys = bed.s3.list_keys(SEALED, "c/");
        keys.retain(|k| !k.ends_with("nbd-s3.lock"));
        keys
    };
    let before = objects(&bed);

    let refusal = |bed: &Bed| -> String {
        let mut r = Raw::connect(&format!("127.0.0.1:{}", bed.nbd.port()));
        let err = r.go("c").expect_err("GO on the refused export");
        assert_eq!(err.kind, REP_ERR_UNKNOWN);
        assert_eq!(
            nbd_read(&bed.uri("p"), 0, data.len() as u64),
            data,
            "other export"
        );
        String::from_utf8_lossy(&err.data).into_owned()
    };
    let set = |bed: &mut Bed, zstd: bool, key: &Path| {
        bed.nbd
            .rewrite_config(|c| *c.export_mut("c") = spec("c", zstd, Some(key)));
        bed.stop_and_restart();
    };

    set(&mut bed, true, &k2);
    let msg = refusal(&bed);
    assert!(msg.contains("wrong key") && msg.contains("k2.key"), "{msg}");
    assert!(!msg.contains("0202"), "key bytes in {msg:?}");
    set(&mut bed, false, &k1);
    let msg = refusal(&bed);
    assert!(
        msg.contains("\"zstd:3\"") && msg.contains("\"off\""),
        "{msg}"
    );
    // Encryption off: the stored data is not served in its encrypted form.
    bed.nbd
        .rewrite_config(|c| *c.export_mut("c") = spec("c", true, None).bucket(SEALED));
    bed.stop_and_restart();
    let msg = refusal(&bed);
    assert!(
        msg.contains("encryption") && msg.contains("aes-256-gcm-siv"),
        "{msg}"
    );
    wait_until("the refusal in the log", Duration::from_secs(10), || {
        !bed.nbd.log_lines("aes-256-gcm-siv").is_empty()
    });
    assert_eq!(objects(&bed), before, "refusals changed nothing");

    set(&mut bed, true, &k1);
    assert_eq!(
        nbd_read(&bed.uri("c"), 0, data.len() as u64),
        data,
        "back with the right key"
    );
}

#[test]
fn a_reload_that_changes_the_codec_refuses_the_export_and_keeps_the_others() {
    let mut bed = Bed::start(vec![spec("r", true, None), spec("q", false, None)]);
    let data = text(200_000);
    nbd_write(&bed.uri("r"), &[(0, data.clone())], true);
    let mark = bed.nbd.log_mark();
    bed.nbd
        .rewrite_config(|c| *c.export_mut("r") = spec("r", false, None));
    bed.nbd.sighup();
    bed.nbd
        .wait_for_log_after(mark, "compression changed", Duration::from_secs(30));
    // The log line comes from opening the new store; the registry swaps right after. A GO
    // in between may also be refused for the moment ("a reload replaced it; connect again"):
    // wait for the refusal that names the change.
    wait_until(
        "GO refused for the codec change after the reload",
        Duration::from_secs(30),
        || {
            let mut r = Raw::connect(&format!("127.0.0.1:{}", bed.nbd.port()));
            let said = match r.go("r") {
                Ok(_) => "served".into(),
                Err(err) => String::from_utf8_lossy(&err.data).into_owned(),
            };
            said.contains("\"zstd:3\"") && said.contains("\"off\"")
        },
    );
    nbd_write(&bed.uri("q"), &[(0, data.clone())], true);
    assert_eq!(nbd_read(&bed.uri("q"), 0, data.len() as u64), data);
    // Back to the setting the data was written with: served again by the next reload.
    bed.nbd
        .rewrite_config(|c| *c.export_mut("r") = spec("r", true, None));
    bed.nbd.sighup();
    wait_until("the export served again", Duration::from_secs(30), || {
        Raw::connect(&format!("127.0.0.1:{}", bed.nbd.port()))
            .go("r")
            .is_ok()
    });
    assert_eq!(nbd_read(&bed.uri("r"), 0, data.len() as u64), data);
}

/// `nbd-s3 check-config` on `toml` written into `dir`: (exit code, stdout, stderr).
fn check_config(dir: &Path, toml: &str) -> (Option<i32>, String, String) {
    let path = dir.join("exports.toml");
    std::fs::write(&path, toml).unwrap();
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_nbd-s3"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env_remove("NBD_S3_CONFIG")
        .env_remove("RUST_LOG"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn check_config_checks_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "vm1.key", 9);
    let toml = "[[export]]\nname = \"vm1\"\nsize = \"1GiB\"\nbucket = \"nbd\"\n\
                compression = \"zstd:7\"\nencryption_key_file = \"vm1.key\"\n";
    let (code, stdout, stderr) = check_config(dir.path(), toml);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("compression zstd:7") && stdout.contains("vm1.key"),
        "{stdout}"
    );
    assert!(!stdout.contains("0909"), "key bytes printed: {stdout}");

    let cases: [(&str, &dyn Fn(), &str); 4] = [
        ("group-readable", &|| set_mode(&key, 0o640), "chmod 600"),
        (
            "missing",
            &|| std::fs::remove_file(&key).unwrap(),
            "cannot read",
        ),
        (
            "short",
            &|| {
                std::fs::write(&key, "abcdef\n").unwrap();
                set_mode(&key, 0o600);
            },
            "32 raw bytes or 64 hex",
        ),
        (
            "not hex",
            &|| std::fs::write(&key, "x".repeat(64)).unwrap(),
            "64 hex",
        ),
    ];
    for (what, break_it, says) in cases {
        break_it();
        let (code, stdout, stderr) = check_config(dir.path(), toml);
        assert_eq!(code, Some(1), "{what}: {stdout}{stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains("exports.toml:6:")
                && first.contains("encryption_key_file")
                && first.contains(says),
            "{what}: {stderr}"
        );
    }
}

#[test]
fn an_encrypted_clone_reads_its_base_and_its_flattened_copies() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "k.key", 0x33);
    let mut bed = Bed::start(vec![spec("gold", true, Some(&key))]);
    let bs = 64 * KIB;
    let base = [
        (0, text(3 * bs as usize)),
        (5 * bs, pattern(bs as usize, 3)),
    ];
    nbd_write(&bed.uri("gold"), &base, true);
    bed.nbd.admin_ok(&["snapshot", "create", "gold", "v1"]);
    let clone = spec("kid", true, Some(&key)).line("base = \"gold@v1\"");
    bed.nbd.rewrite_config(|c| c.exports.push(clone));
    bed.stop_and_restart();
    let mine = (bs, pattern(100, 4));
    nbd_write(&bed.uri("kid"), std::slice::from_ref(&mine), true);
    let mut want = text(3 * bs as usize);
    want.extend(vec![0; 2 * bs as usize]);
    want.extend(pattern(bs as usize, 3));
    want[bs as usize..bs as usize + 100].copy_from_slice(&mine.1);
    let len = want.len() as u64;
    assert_eq!(nbd_read(&bed.uri("kid"), 0, len), want, "through the base");
    bed.nbd.admin_ok(&["flatten", "kid"]);
    bed.stop_and_restart();
    assert_eq!(
        nbd_read(&bed.uri("kid"), 0, len),
        want,
        "flattened, after a restart"
    );
    assert!(!on_disk(&bed.s3, SEALED, NEEDLE), "plaintext on disk");
}

//! Real NBD clients against nbd-s3 backed by a real S3 server, plus
//! checks that the shared fixtures themselves work (S3 server, nbdkit reference, helpers).

use crate::common::*;
use std::time::Duration;

/// The S3 fixture answers HTTP, exposes its objects as files and survives stop/resume on
/// the same port.
#[test]
fn fixture_s3_server_stop_resume() {
    let mut s3 = S3Server::start();
    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    let secret = std::fs::read_to_string(s3.secret_file()).unwrap();
    assert_eq!(secret.trim_end(), s3.secret_key);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s3.secret_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    s3.create_bucket("b");
    s3.write_object("b", "p/0000000000000001", b"hello");
    s3.write_object("b", "q/x", b"other");
    assert_eq!(
        s3.list_keys("b", "p/"),
        vec!["p/0000000000000001".to_string()]
    );
    assert_eq!(
        s3.read_object("b", "p/0000000000000001").as_deref(),
        Some(&b"hello"[..])
    );

    let port = s3.port();
    s3.stop();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening"
    );
    s3.resume();
    assert_eq!(s3.port(), port);
    assert_eq!(s3.list_keys("b", ""), vec!["p/0000000000000001", "q/x"]);
}

/// The client helpers drive a reference server (nbdkit memory) and fail when they should.
#[test]
fn fixture_clients_against_nbdkit() {
    let nbdkit = Nbdkit::memory("16M");
    let uri = nbdkit.uri();
    assert_eq!(nbdinfo(&["--size", &uri]).trim(), "16777216");
    qemu_io(&uri, &["write -P 0xab 0 64k", "read -P 0xab 0 64k"]);
    let bad = run(tool("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0xcd 0 64k"]));
    assert!(
        !bad.status.success(),
        "pattern mismatch must fail: {}",
        show(&bad)
    );
    let out = nbdsh(
        &uri,
        &["assert h.pread(2, 0) == b'\\xab\\xab'", "print('ok')"],
    );
    assert_eq!(stdout(&out).trim(), "ok");
    let out = nbdsh_script(&[
        "h.set_request_structured_replies(False)",
        &format!("h.connect_uri({uri:?})"),
        "print(h.get_structured_replies_negotiated())",
    ]);
    assert_eq!(stdout(&out).trim(), "False");
    run_fails(tool("nbdsh").args(["-u", &uri, "-c", "assert h.pread(1, 0) == b'\\x00'"]));
}

/// A LogBuffer wait returns the first matching line, or None when the process ends.
#[test]
fn fixture_log_wait() {
    let mut p = crate::common::proc::Process::spawn(
        std::process::Command::new("sh").args(["-c", "echo 'x listening on 127.0.0.1:5' >&2"]),
        "sh",
    );
    let line = p.logs.wait_for("listening on", Duration::from_secs(10));
    assert_eq!(line.as_deref(), Some("x listening on 127.0.0.1:5"));
    assert!(p.logs.wait_for("never", Duration::from_secs(10)).is_none());
    assert!(p.wait_exit(Duration::from_secs(10)).unwrap().success());
}

// ---- nbd-s3 with real clients -------------------------------------------------------------

const MIB: u64 = 1 << 20;
/// Block size of the test exports: small objects so a few MiB exercise many blocks.
const BS: u64 = 64 * 1024;

/// S3 + a daemon with a writable "disk" (32 MiB, 64 KiB blocks) and a read-only "ro".
fn bed() -> (S3Server, NbdS3) {
    let s3 = S3Server::start();
    let nbd = NbdS3::builder(&s3)
        .export(
            ExportSpec::new("disk")
                .size("32MiB")
                .block_size("64KiB")
                .description("test disk"),
        )
        .export(
            ExportSpec::new("ro")
                .size("8MiB")
                .read_only(true)
                .description("read-only disk"),
        )
        .start();
    (s3, nbd)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

/// `nbdinfo --can FLAG` / `--is FLAG`: exit 0 = yes, 2 = no, anything else is an error.
fn nbdinfo_bool(kind: &str, flag: &str, uri: &str) -> bool {
    let out = run(tool("nbdinfo").args([kind, flag, uri]));
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!("nbdinfo {kind} {flag} {uri}: {}", show(&out)),
    }
}

#[test]
fn nbdinfo_size_flags_and_contexts() {
    let (_s3, nbd) = bed();
    let uri = nbd.uri("disk");
    assert_eq!(nbdinfo(&["--size", &uri]).trim(), (32 * MIB).to_string());
    for flag in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "cache",
        "df",
        "multi-conn",
        "structured-reply",
    ] {
        assert!(
            nbdinfo_bool("--can", flag, &uri),
            "disk: --can {flag} is false"
        );
    }
    assert!(!nbdinfo_bool("--is", "read-only", &uri));
    let info = json(&nbdinfo(&["--json", &uri]));
    let e = &info["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["export-size"], 32 * MIB);
    assert_eq!(e["description"], "test disk");
    let contexts = e["contexts"].as_array().expect("contexts");
    assert!(
        contexts.iter().any(|c| c == "base:allocation"),
        "no base:allocation: {info}"
    );
    assert_eq!(e["block_size_minimum"], 1, "minimum block size: {info}");
    assert_eq!(
        e["block_size_preferred"], BS,
        "preferred block size: {info}"
    );
    assert_eq!(e["block_size_maximum"], 32 * MIB, "maximum request: {info}");

    let ro = nbd.uri("ro");
    assert!(nbdinfo_bool("--is", "read-only", &ro));
    assert!(
        !nbdinfo_bool("--can", "write", &ro),
        "ro export allows writes"
    );
    assert!(nbdinfo_bool("--can", "read", &ro));
    assert_eq!(nbdinfo(&["--size", &ro]).trim(), (8 * MIB).to_string());
}

#[test]
fn nbdinfo_list_and_nbd_client_list_every_export() {
    let (_s3, nbd) = bed();
    let list = json(&nbdinfo(&["--list", "--json", &nbd.uri("")]));
    let mut seen: Vec<(String, String)> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            let name = e["export-name"].as_str().unwrap_or_default().to_string();
            (
                name,
                e["description"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("disk".into(), "test disk".into()),
            ("ro".into(), "read-only disk".into())
        ]
    );
    let text = nbdinfo(&["--list", &nbd.uri("")]);
    assert!(
        text.contains("test disk") && text.contains("read-only disk"),
        "{text}"
    );

    let listed = nbd_client(&["-l", "127.0.0.1", &nbd.port().to_string()]);
    let mut names: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    names.retain(|l| !l.starts_with("Negotiation"));
    names.sort();
    // NBD_REP_SERVER carries the name and, after it, the description
    assert_eq!(
        names,
        vec!["disk: test disk", "ro: read-only disk"],
        "nbd-client -l printed:\n{listed}"
    );
}

/// `nbdinfo --map --json` as (offset, length, type) triples.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let v = json(&nbdinfo(&["--map", "--json", uri]));
    v.as_array()
        .expect("map array")
        .iter()
        .map(|e| {
            let f = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
            (f("offset"), f("length"), f("type"))
        })
        .collect()
}

#[test]
fn nbdinfo_map_shows_holes_then_data() {
    let (s3, nbd) = bed();
    let uri = nbd.uri("disk");
    assert_eq!(
        map(&uri),
        vec![(0, 32 * MIB, 3)],
        "a new export is one hole"
    );
    nbdsh(&uri, &["h.pwrite(b'\\x5a' * 65536, 1048576)", "h.flush()"]);
    assert_eq!(
        map(&uri),
        vec![(0, MIB, 3), (MIB, BS, 0), (MIB + BS, 31 * MIB - BS, 3)],
        "one data block at 1 MiB"
    );
    let key = format!("disk/{:016x}", MIB / BS);
    assert_eq!(
        s3.read_object("nbd", &key),
        Some(vec![0x5a; BS as usize]),
        "object {key}"
    );
}

/// Python for nbdsh: writes, unaligned overwrite, zero, trim (whole and partial blocks),
/// flush, checking every read against a model; with structured replies also block status.
/// Layout (64 KiB blocks): 0 never written, 1 data, 2 zeroed, 3 trimmed.
fn io_script(uri: &str, structured: bool) -> Vec<String> {
    let mut py = vec![
        format!(
            "h.set_request_structured_replies({})",
            if structured { "True" } else { "False" }
        ),
        "h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)".to_string(),
        format!("h.connect_uri({uri:?})"),
        format!(
            "assert h.get_structured_replies_negotiated() == {}",
            if structured { "True" } else { "False" }
        ),
        r#"
bs = 65536
model = bytearray(5 * bs)
def check():
    assert h.pread(len(model), 0) == bytes(model), "read differs from model"
data = bytes((i * 7 + 3) % 251 for i in range(3 * bs))
h.pwrite(data, bs); model[bs:4 * bs] = data; check()
h.pwrite(b'\xee' * 1000, 2 * bs - 500); model[2 * bs - 500:2 * bs + 500] = b'\xee' * 1000; check()
h.pwrite(b'\x11' * 10, bs + 5, nbd.CMD_FLAG_FUA); model[bs + 5:bs + 15] = b'\x11' * 10; check()
h.zero(bs, 2 * bs); model[2 * bs:3 * bs] = bytes(bs); check()
h.trim(bs, 3 * bs); model[3 * bs:4 * bs] = bytes(bs); check()
h.trim(100, bs + 200); model[bs + 200:bs + 300] = bytes(100); check()
h.zero(50, bs + 1000, nbd.CMD_FLAG_NO_HOLE); model[bs + 1000:bs + 1050] = bytes(50); check()
h.cache(bs, 0)
h.flush()
check()
"#
        .to_string(),
    ];
    if structured {
        py.push(
            r#"
ext = []
def cb(meta, off, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        ext.append((off, list(entries)))
    return 0
pos = 0
flags = []
while pos < 4 * bs:
    ext.clear()
    h.block_status(4 * bs - pos, pos, cb)
    assert len(ext) == 1, ext
    off, e = ext[0]
    assert off == pos and len(e) >= 2, (pos, ext)
    for i in range(0, len(e), 2):
        flags.append((pos, e[i], e[i + 1]))
        pos += e[i]
def flag_at(o):
    return next(f for (p, n, f) in flags if p <= o < p + n)
assert flag_at(0) == 3, flags
assert flag_at(bs) == 0, flags
assert flag_at(2 * bs) & 2, flags
assert flag_at(3 * bs) & 2, flags
ext.clear()
h.block_status(4 * bs, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(ext[0][1]) == 2 and ext[0][1][0] <= 4 * bs, ext
"#
            .to_string(),
        );
    }
    py.push("print('ok')".to_string());
    py
}

/// Runs `io_script`, then checks what S3 holds: only block 1, with the model's bytes.
fn nbdsh_io(structured: bool) {
    let (s3, nbd) = bed();
    let py = io_script(&nbd.uri("disk"), structured);
    let lines: Vec<&str> = py.iter().map(String::as_str).collect();
    let out = nbdsh_script(&lines);
    assert_eq!(stdout(&out).trim(), "ok", "{}", show(&out));
    assert_eq!(
        s3.list_keys("nbd", "disk/0"),
        vec!["disk/0000000000000001".to_string()]
    );
    let block = s3
        .read_object("nbd", "disk/0000000000000001")
        .expect("block 1 stored");
    assert_eq!(block.len() as u64, BS);
    assert_eq!(&block[5..15], &[0x11; 10]);
    assert_eq!(
        &block[200..300],
        &[0; 100][..],
        "partial trim stored as zeros"
    );
    assert_eq!(
        &block[1000..1050],
        &[0; 50][..],
        "partial zero stored as zeros"
    );
    assert_eq!(&block[BS as usize - 500..], &[0xee; 500][..]);
}

#[test]
fn nbdsh_io_structured_replies() {
    nbdsh_io(true);
}

#[test]
fn nbdsh_io_simple_replies() {
    nbdsh_io(false);
}

#[test]
fn nbdsh_read_only_export_refuses_writes() {
    let (_s3, nbd) = bed();
    let connect = format!("h.connect_uri({:?})", nbd.uri("ro"));
    let out = nbdsh_script(&[
        "h.set_strict_mode(0)", // let the write reach the server
        &connect,
        "assert h.is_read_only()",
        "assert h.pread(4096, 0) == bytes(4096)",
        "try:\n    h.pwrite(b'x', 0)\n    raise SystemExit('write succeeded')\nexcept nbd.Error as e:\n    assert e.errno == 'EPERM', e.errno",
        "try:\n    h.trim(4096, 0)\n    raise SystemExit('trim succeeded')\nexcept nbd.Error as e:\n    assert e.errno == 'EPERM', e.errno",
        "print('ok')",
    ]);
    assert_eq!(stdout(&out).trim(), "ok");
}

#[test]
fn qemu_io_patterns_zero_discard_flush() {
    let (_s3, nbd) = bed();
    let uri = nbd.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 12345 70000",
            "read -P 0xab 0 12345",
            "read -P 0xcd 12345 70000",
            "write -P 0x77 8M 2M",
            "write -z 8M 1M",
            "read -P 0 8M 1M",
            "read -P 0x77 9M 1M",
            "discard 9M 64k",
            "read -P 0 9M 64k",
            "read -P 0x77 9280k 960k",
            "discard 9M 100",
            "write -z -u 20M 3M",
            "read -P 0 20M 3M",
            "flush",
        ],
    );
    // a second process (new connection) sees the same data
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 12345",
            "read -P 0xcd 12345 70000",
            "read -P 0 8M 1088k",
        ],
    );
}

/// A 16 MiB sparse image: data at 0..100000, one aligned block at 5 MiB, 2000 bytes at
/// 12 MiB+1000; holes elsewhere. Returns the path and the 64 KiB block indexes holding data.
fn sparse_image(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u64>) {
    use std::os::unix::fs::FileExt;
    let path = dir.join("sparse.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&pattern(100_000, 1), 0).unwrap();
    f.write_all_at(&pattern(BS as usize, 2), 5 * MIB).unwrap();
    f.write_all_at(&pattern(2000, 3), 12 * MIB + 1000).unwrap();
    (path, vec![0, 1, 5 * MIB / BS, 12 * MIB / BS])
}

fn block_keys(prefix: &str, blocks: &[u64]) -> Vec<String> {
    blocks.iter().map(|b| format!("{prefix}{b:016x}")).collect()
}

#[test]
fn qemu_img_convert_and_compare_sparse_image() {
    let (s3, nbd) = bed();
    let uri = nbd.uri("disk");
    let (img, blocks) = sparse_image(nbd.scratch());
    let img = img.to_str().unwrap();
    qemu_img(&["convert", "-n", "-f", "raw", "-O", "raw", img, &uri]);
    qemu_img(&["compare", "-f", "raw", "-F", "raw", img, &uri]);
    nbdsh(&uri, &["h.flush()"]);
    assert_eq!(
        s3.list_keys("nbd", "disk/0"),
        block_keys("disk/", &blocks),
        "zero blocks stored"
    );

    let m = json(&qemu_img(&["map", "--output=json", "-f", "raw", &uri]));
    let data_at = |off: u64| {
        let e = m.as_array().unwrap().iter().find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= off && off < s + e["length"].as_u64().unwrap()
        });
        e.unwrap_or_else(|| panic!("{off} not in map {m}"))["data"]
            .as_bool()
            .unwrap()
    };
    assert!(
        data_at(0) && data_at(5 * MIB) && data_at(12 * MIB + 1500),
        "{m}"
    );
    assert!(
        !data_at(2 * MIB) && !data_at(14 * MIB) && !data_at(30 * MIB),
        "{m}"
    );

    // a changed byte is noticed: the comparison can fail
    qemu_io(&uri, &["write -P 0x01 3M 512"]);
    let diff = run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", img, &uri]));
    assert_eq!(
        diff.status.code(),
        Some(1),
        "compare must report a difference: {}",
        show(&diff)
    );
}

#[test]
fn nbdcopy_round_trip() {
    let (_s3, nbd) = bed();
    let uri = nbd.uri("disk");
    let (img, _) = sparse_image(nbd.scratch());
    let back = nbd.scratch().join("back.img");
    nbdcopy(&["--flush", img.to_str().unwrap(), &uri]);
    nbdcopy(&[&uri, back.to_str().unwrap()]);
    let src = std::fs::read(&img).unwrap();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len() as u64, 32 * MIB);
    assert!(got[..src.len()] == src[..], "nbdcopy round trip differs");
    assert!(got[src.len()..].iter().all(|&b| b == 0), "tail not zero");
}

#[test]
fn fio_verify_crc32c_two_jobs_multi_conn() {
    let (_s3, nbd) = bed();
    let uri = format!("--uri={}", nbd.uri("disk"));
    let common = [
        "--name=verify",
        "--ioengine=nbd",
        &uri,
        "--rw=randwrite",
        "--bs=4k",
        "--size=8m",
        "--offset_increment=8m",
        "--numjobs=2",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
    ];
    // each job is its own connection: write then read back and verify
    let mut args = common.to_vec();
    args.push("--do_verify=1");
    fio(&args);
    // two new connections verify what the first two wrote
    let mut args = common.to_vec();
    args.push("--verify_only");
    let out = fio(&args);
    assert!(out.contains("err= 0"), "{out}");
}

#[test]
fn daemon_restart_keeps_flushed_and_sigterm_flushed_data() {
    let (s3, mut nbd) = bed();
    nbdsh(
        &nbd.uri("disk"),
        &["h.pwrite(b'\\xa1' * 4096, 0)", "h.flush()"],
    );
    nbd.restart();
    nbdsh(
        &nbd.uri("disk"),
        &["assert h.pread(4096, 0) == b'\\xa1' * 4096"],
    );
    // not flushed by the client: SIGTERM must store it before exiting 0
    nbdsh(&nbd.uri("disk"), &["h.pwrite(b'\\xb2' * 4096, 3 * 65536)"]);
    nbd.sigterm();
    let status = nbd.wait_exit(DAEMON_TIMEOUT);
    assert!(status.success(), "exit {status}:\n{}", nbd.logs());
    assert!(
        s3.read_object("nbd", "disk/0000000000000003").is_some(),
        "not flushed at SIGTERM"
    );
    nbd.restart();
    nbdsh(
        &nbd.uri("disk"),
        &["assert h.pread(4096, 3 * 65536) == b'\\xb2' * 4096"],
    );
}

#[test]
fn unix_socket_and_tcp_listeners_serve_the_same_export() {
    let s3 = S3Server::start();
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("nbd.sock");
    let unix = format!("unix:{}", sock.display());
    let nbd = NbdS3::builder(&s3)
        .listen(&["127.0.0.1:0", &unix])
        .export(ExportSpec::new("disk").size("8MiB"))
        .start();
    assert!(nbd.addrs().contains(&unix), "addresses: {:?}", nbd.addrs());
    let unix_uri = NbdS3::uri_via(&unix, "disk");
    assert_eq!(
        nbdinfo(&["--size", &unix_uri]).trim(),
        (8 * MIB).to_string()
    );
    qemu_io(&unix_uri, &["write -P 0x3c 100k 200k", "flush"]);
    qemu_io(
        &nbd.uri("disk"),
        &["read -P 0x3c 100k 200k", "read -P 0 0 100k"],
    );
}

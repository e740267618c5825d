//! Real NBD clients against nbd-s3 backed by a real S3 server (issue 3's client list), plus
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

//! The control socket and `nbd-s3 status` through the real binary: exit codes 0/1/2/3, the
//! table and `--json`, clients attached, refused exports with their reason, the socket's
//! mode, and `--config` finding the socket (or saying it is off).

use crate::common::nbdsh_session::NbdshSession;
use crate::common::{ExportSpec, NbdS3, S3Server};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_nbd-s3");

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn export<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["exports"]
        .as_array()
        .expect("exports array")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no export {name} in {status}"))
}

#[test]
fn status_shows_state_clients_and_lease_as_table_and_json() {
    let s3 = S3Server::start();
    s3.create_bucket("nbd");
    s3.write_object("nbd", "broken/nbd-s3.json", b"{ not json");
    let d = NbdS3::builder(&s3)
        .export(ExportSpec::new("vm1").size("8MiB"))
        .export(ExportSpec::new("broken").size("8MiB"))
        .start();

    let socket = d.config().control.clone().expect("control socket");
    let mode = std::fs::metadata(&socket)
        .expect("socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "control socket mode");

    let idle = json(&d.admin_ok(&["status", "--json"]));
    let vm1 = export(&idle, "vm1");
    assert_eq!(vm1["state"], "serving", "{idle}");
    assert_eq!(vm1["clients"], 0, "{idle}");
    assert_eq!(vm1["dirty_bytes"], 0, "{idle}");
    // Idle: the lease is taken when a client attaches, so nobody holds it now.
    assert!(vm1["lease_holder"].is_null(), "{idle}");
    let broken = export(&idle, "broken");
    assert_eq!(broken["state"], "refused", "{idle}");
    assert!(
        broken["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nbd-s3.json")),
        "the reason names the manifest: {idle}"
    );

    // An attached client counts; LIST and INFO do not.
    let mut session = NbdshSession::open(&d.uri("vm1"));
    session.run("h.pwrite(b'x' * 4096, 0)", &d);
    let _ = crate::common::nbdinfo(&["--list", &d.uri("")]);
    let busy = json(&d.admin_ok(&["status", "--json"]));
    assert_eq!(export(&busy, "vm1")["clients"], 1, "{busy}");
    assert!(
        export(&busy, "vm1")["lease_holder"]
            .as_str()
            .is_some_and(|h| h.contains("this daemon")),
        "{busy}"
    );

    let table = d.admin_ok(&["status"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        ["EXPORT", "STATE", "CLIENTS", "DIRTY", "LEASE", "REQ/GIB"],
        "{table}"
    );
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .to_owned()
    };
    let vm1_row = row("vm1");
    let cells: Vec<&str> = vm1_row.split_whitespace().collect();
    assert_eq!(&cells[1..3], ["serving", "1"], "{table}");
    assert!(row("broken").contains("refused: "), "{table}");
    session.close();
}

#[test]
fn exit_codes_say_done_usage_and_unreachable() {
    let s3 = S3Server::start();
    let d = NbdS3::builder(&s3).export(ExportSpec::new("vm1")).start();
    assert_eq!(d.admin(&["status"]).status.code(), Some(0));
    // Usage errors: 2.
    assert_eq!(d.admin(&["status", "--bogus"]).status.code(), Some(2));
    assert_eq!(d.admin(&["status", "extra"]).status.code(), Some(2));

    // No daemon on the socket: 3, naming it.
    let dir = tempfile::tempdir().expect("tempdir");
    let nowhere = dir.path().join("none.sock");
    let out = Command::new(BIN)
        .args(["status", "--control"])
        .arg(&nowhere)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("none.sock"),
        "{out:?}"
    );

    // --config finds the socket in the daemon's own file.
    let out = Command::new(BIN)
        .args(["status", "--json", "--config"])
        .arg(d.config_path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        json(&String::from_utf8_lossy(&out.stdout))["exports"][0]["name"],
        "vm1"
    );

    // A file whose control socket is off: 3, saying so.
    let off = dir.path().join("off.toml");
    std::fs::write(&off, "[server]\ncontrol = \"off\"\n").expect("write");
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&off)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("off"),
        "{out:?}"
    );
}

#[test]
fn a_stale_socket_file_is_replaced_and_removed_at_exit() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("ctl.sock");
    // Left by a crashed daemon: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let mut d = NbdS3::builder(&s3)
        .export(ExportSpec::new("vm1"))
        .config(|c| c.control = Some(socket.to_string_lossy().into_owned()))
        .start();
    assert_eq!(d.admin(&["status"]).status.code(), Some(0), "{}", d.logs());
    d.sigterm();
    assert!(d.wait_exit(crate::common::DAEMON_TIMEOUT).success());
    assert!(!socket.exists(), "socket file removed at exit");
}

#[test]
fn a_control_path_that_is_not_a_socket_is_never_removed() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // A mistaken `control = "exports.toml"`: a regular file the daemon must not delete.
    let file = dir.path().join("exports.toml");
    std::fs::write(&file, b"precious").expect("write");
    let mut d = NbdS3::builder(&s3)
        .export(ExportSpec::new("vm1"))
        .config(|c| c.control = Some(file.to_string_lossy().into_owned()))
        .start();
    // The daemon serves its exports without the control socket and says why.
    crate::common::wait_until("refusal logged", crate::common::DAEMON_TIMEOUT, || {
        d.logs().contains("not a socket")
    });
    assert_eq!(
        std::fs::read(&file).expect("file kept"),
        b"precious",
        "{}",
        d.logs()
    );
    assert_eq!(d.admin(&["status"]).status.code(), Some(3), "{}", d.logs());
    d.sigterm();
    assert!(d.wait_exit(crate::common::DAEMON_TIMEOUT).success());
    assert_eq!(
        std::fs::read(&file).expect("file kept at exit"),
        b"precious"
    );
}

#[test]
fn a_daemon_that_accepts_but_never_answers_is_exit_3_after_the_answer_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stuck.sock");
    // Accepts (the kernel queues the connection) and never reads or answers.
    let _stuck = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let started = std::time::Instant::now();
    let out = Command::new(BIN)
        .args(["snapshot", "list", "--control"])
        .arg(&path)
        .env("NBD_S3_ADMIN_TIMEOUT", "1")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stderr.contains("did not answer within 1s") && stderr.contains("stuck.sock"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // A malformed override is a usage error.
    let out = Command::new(BIN)
        .args(["status", "--control"])
        .arg(&path)
        .env("NBD_S3_ADMIN_TIMEOUT", "soon")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

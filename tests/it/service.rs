//! The daemon as systemd sees it: sd_notify readiness/reload/stop messages on a real
//! `NOTIFY_SOCKET`, the journald/stderr output switch, startup failures, and the SIGTERM flush
//! (data written without FLUSH is in S3 after an orderly stop).

use crate::common::bare_daemon::BareDaemon;
use crate::common::{nbdsh, stdout, DaemonConfig, ExportSpec, NbdS3, S3Server, DAEMON_TIMEOUT};
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn config_with(s3: &S3Server, listen: Vec<String>) -> DaemonConfig {
    s3.create_bucket("nbd");
    let mut cfg = DaemonConfig::for_s3(s3);
    cfg.listen = listen;
    cfg.exports.push(ExportSpec::new("disk"));
    cfg
}

/// A file that receives the daemon's stderr, plus its `dev:ino` as systemd would write it.
fn stderr_file(dir: &Path) -> (PathBuf, std::fs::File, String) {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join("stderr.log");
    let file = std::fs::File::create(&path).expect("stderr file");
    let meta = file.metadata().expect("stat");
    let journal_stream = format!("{}:{}", meta.dev(), meta.ino());
    (path, file, journal_stream)
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .expect("read log");
    s
}

fn monotonic_usec() -> u128 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec() as u128 * 1_000_000 + ts.tv_nsec() as u128 / 1000
}

#[test]
fn ready_arrives_only_when_every_listener_accepts() {
    let s3 = S3Server::start();
    let sockdir = tempfile::tempdir().expect("tempdir");
    let sock = sockdir.path().join("nbd.sock");
    let port = free_port();
    let cfg = config_with(
        &s3,
        vec![
            format!("127.0.0.1:{port}"),
            format!("unix:{}", sock.display()),
        ],
    );
    let mut d = BareDaemon::spawn(&cfg, &[], Stdio::null());
    let ready = d
        .wait_notify("READY=1", DAEMON_TIMEOUT)
        .unwrap_or_else(|| panic!("no READY=1; got {:?}", d.received));
    // The very moment READY=1 arrives, both listeners must accept.
    TcpStream::connect(("127.0.0.1", port)).expect("TCP listener accepts at READY=1");
    UnixStream::connect(&sock).expect("unix listener accepts at READY=1");
    let status = ready.iter().find(|l| l.starts_with("STATUS=")).cloned();
    assert!(
        status
            .as_deref()
            .is_some_and(|s| s.contains("serving 1 export")),
        "READY=1 should carry a STATUS= line naming the exports: {ready:?}"
    );
    assert_eq!(
        d.received.iter().filter(|l| *l == "READY=1").count(),
        1,
        "exactly one READY=1 at startup: {:?}",
        d.received
    );
}

#[test]
fn port_in_use_fails_startup_with_exit_1_and_no_ready() {
    let s3 = S3Server::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let cfg = config_with(&s3, vec![addr.clone()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, file, _) = stderr_file(dir.path());
    let mut d = BareDaemon::spawn(&cfg, &[], Stdio::from(file));
    assert!(
        d.wait_notify("READY=1", DAEMON_TIMEOUT).is_none(),
        "READY=1 sent although {addr} is taken"
    );
    let status = d.wait_exit(DAEMON_TIMEOUT);
    let text = read(&log);
    assert_eq!(
        status.code(),
        Some(1),
        "exit status {status:?}; log:\n{text}"
    );
    assert!(
        text.contains(&format!("cannot listen on {addr}")),
        "the log should name the address: {text}"
    );
}

#[test]
fn sighup_sends_reloading_with_monotonic_usec_then_ready() {
    let s3 = S3Server::start();
    let d = NbdS3::with_export(&s3, "disk");
    let before = monotonic_usec();
    let startup = d.notify_messages().lines().count();
    d.sighup();
    d.wait_for_notify("RELOADING=1", DAEMON_TIMEOUT);
    let after_ready = || {
        let all: Vec<String> = d.notify_messages().lines().map(str::to_owned).collect();
        let reloading = all.iter().skip(startup).position(|l| l == "RELOADING=1");
        reloading.and_then(|i| {
            let rest = &all[startup + i..];
            rest.iter()
                .position(|l| l == "READY=1")
                .map(|_| rest.to_vec())
        })
    };
    crate::common::wait_until("READY=1 after RELOADING=1", DAEMON_TIMEOUT, || {
        after_ready().is_some()
    });
    let lines = after_ready().expect("checked above");
    let usec: u128 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {lines:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    let now = monotonic_usec();
    assert!(
        before <= usec && usec <= now,
        "MONOTONIC_USEC {usec} not between {before} and {now} (CLOCK_MONOTONIC µs)"
    );
    d.wait_for_log("reload", DAEMON_TIMEOUT);
}

#[test]
fn sigterm_sends_stopping_and_exits_0() {
    let s3 = S3Server::start();
    let mut d = NbdS3::with_export(&s3, "disk");
    d.sigterm();
    d.wait_for_notify("STOPPING=1", DAEMON_TIMEOUT);
    let status = d.wait_exit(DAEMON_TIMEOUT);
    assert!(status.success(), "exit {status:?}:\n{}", d.logs());
    // After STOPPING=1 nothing may claim readiness again.
    let msgs = d.notify_messages();
    let stop_at = msgs.find("STOPPING=1").expect("seen above");
    assert!(
        !msgs[stop_at..].contains("READY=1"),
        "READY after STOPPING:\n{msgs}"
    );
}

/// Starts a daemon with stderr in a file and `JOURNAL_STREAM` set as given; returns its log.
fn run_with_journal_stream(s3: &S3Server, journal: Option<&str>) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, file, matching) = stderr_file(dir.path());
    let value = match journal {
        Some("match") => Some(matching),
        Some(other) => Some(other.to_owned()),
        None => None,
    };
    let env: Vec<(&str, String)> = value.into_iter().map(|v| ("JOURNAL_STREAM", v)).collect();
    let cfg = config_with(s3, vec!["127.0.0.1:0".into()]);
    let mut d = BareDaemon::spawn(&cfg, &env, Stdio::from(file));
    assert!(
        d.wait_notify("READY=1", DAEMON_TIMEOUT).is_some(),
        "not ready:\n{}",
        read(&log)
    );
    d.signal(nix::sys::signal::Signal::SIGTERM);
    let status = d.wait_exit(DAEMON_TIMEOUT);
    let text = read(&log);
    assert!(status.success(), "exit {status:?}:\n{text}");
    text
}

/// Human format: `2026-01-01T00:00:00.000000Z  INFO nbd_s3::…: message`.
fn is_human(line: &str) -> bool {
    line.len() > 20
        && line.as_bytes()[4] == b'-'
        && line.contains('T')
        && ["INFO", "WARN", "ERROR", "DEBUG"]
            .iter()
            .any(|l| line.contains(l))
}

#[test]
fn journal_stream_switches_stderr_format() {
    let s3 = S3Server::start();

    let plain = run_with_journal_stream(&s3, None);
    let ready = plain.lines().find(|l| l.contains("ready"));
    assert!(
        ready.is_some_and(is_human),
        "without JOURNAL_STREAM: human lines with timestamps expected:\n{plain}"
    );

    // A stale variable (stderr redirected elsewhere) must not switch to journal mode.
    let stale = run_with_journal_stream(&s3, Some("1:1"));
    assert!(
        stale.lines().any(|l| l.contains("ready") && is_human(l)),
        "a JOURNAL_STREAM not matching stderr must keep human output:\n{stale}"
    );

    let journal = run_with_journal_stream(&s3, Some("match"));
    assert!(
        !journal.lines().any(is_human),
        "JOURNAL_STREAM matching stderr: no human-format lines expected:\n{journal}"
    );
    if !Path::new("/run/systemd/journal/socket").exists() {
        // No journald here: the documented fallback is `<N>`-prefixed lines, no timestamps.
        assert!(
            journal
                .lines()
                .any(|l| l.starts_with("<6>") && l.contains("ready")),
            "expected `<6>ready…` on stderr when journald's socket is absent:\n{journal}"
        );
        assert!(
            journal.lines().all(|l| l.starts_with('<')),
            "every line needs a priority prefix:\n{journal}"
        );
    }
}

#[test]
fn unflushed_writes_reach_s3_on_sigterm() {
    let s3 = S3Server::start();
    let mut d = NbdS3::with_export(&s3, "disk");
    // Two blocks' worth of writes, no FLUSH, no FUA; the client disconnects.
    nbdsh(
        &d.uri("disk"),
        &[
            "h.pwrite(b'\\xab' * 4096, 0)",
            "h.pwrite(b'nbd-s3 sigterm test', 1048576 + 100)",
        ],
    );
    d.sigterm();
    let status = d.wait_exit(DAEMON_TIMEOUT);
    assert!(status.success(), "exit {status:?}:\n{}", d.logs());
    assert!(status.signal().is_none());
    let keys = s3.list_keys("nbd", "disk/");
    assert!(
        keys.iter().any(|k| k.ends_with("0000000000000000")),
        "block 0 not in S3 after SIGTERM: {keys:?}\n{}",
        d.logs()
    );
    let block0 = s3
        .read_object("nbd", "disk/0000000000000000")
        .expect("block 0 object");
    assert_eq!(&block0[..4096], &[0xab; 4096][..]);

    d.restart();
    let out = nbdsh(
        &d.uri("disk"),
        &[
            "assert h.pread(4096, 0) == b'\\xab' * 4096",
            "print(h.pread(19, 1048576 + 100).decode())",
        ],
    );
    assert_eq!(stdout(&out).trim(), "nbd-s3 sigterm test");
}

/// Writes one whole 128 KiB block (no read-modify-write, so no S3 GET) without FLUSH.
fn write_block_no_flush(d: &NbdS3, export: &str) {
    nbdsh(&d.uri(export), &["h.pwrite(b'\\x5a' * 131072, 0)"]);
}

#[test]
fn second_sigterm_aborts_flush_with_exit_2_naming_what_was_lost() {
    let s3 = S3Server::start();
    let mut d = NbdS3::with_export(&s3, "disk");
    // S3 hangs from now on: the write is acknowledged from the cache, write-back cannot finish.
    s3.freeze();
    write_block_no_flush(&d, "disk");
    d.sigterm();
    d.wait_for_notify("STOPPING=1", DAEMON_TIMEOUT);
    let status = d.wait_for_notify("STATUS=stopping: flushing", DAEMON_TIMEOUT);
    assert!(
        status.contains("0.1 MiB"),
        "STATUS should say how much is left to flush (128 KiB): {status}"
    );
    d.wait_for_log("stopping: flushing", DAEMON_TIMEOUT);
    d.sigterm();
    let status = d.wait_exit(DAEMON_TIMEOUT);
    s3.thaw();
    let logs = d.logs();
    assert_eq!(status.code(), Some(2), "exit {status:?}:\n{logs}");
    let line = logs
        .lines()
        .find(|l| l.contains("second SIGTERM"))
        .unwrap_or_else(|| panic!("no abort message:\n{logs}"));
    assert!(
        line.contains("NOT flushed") && line.contains("disk"),
        "the abort message must name the export that lost data: {line}"
    );
}

#[test]
fn s3_refusing_the_final_flush_exits_1_naming_the_export() {
    let mut s3 = S3Server::start();
    let mut d = NbdS3::builder(&s3)
        .export(ExportSpec::new("disk"))
        .flush_timeout("2s")
        .start();
    s3.stop();
    write_block_no_flush(&d, "disk");
    d.sigterm();
    let status = d.wait_exit(DAEMON_TIMEOUT);
    let logs = d.logs();
    assert_eq!(status.code(), Some(1), "exit {status:?}:\n{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("NOT flushed") && l.contains("disk")),
        "the log must name the export whose data was not stored:\n{logs}"
    );
    assert!(
        logs.contains("disk/0000000000000000"),
        "the log must name the block that was not stored:\n{logs}"
    );
}

#[test]
fn refused_reload_is_reported_in_status_and_changes_nothing() {
    let s3 = S3Server::start();
    let d = NbdS3::with_export(&s3, "disk");
    d.write_config_raw("[server]\nlisten = [\"127.0.0.1:0\"]\nbogus_key = 1\n");
    d.sighup();
    let status = d.wait_for_notify("last reload failed", DAEMON_TIMEOUT);
    let path = d.config_path().display().to_string();
    assert!(
        status.starts_with("STATUS=serving 1 export") && status.contains(&format!("{path}:")),
        "STATUS should keep the export and name the file:line: {status}"
    );
    let list = crate::common::nbdinfo(&["--list", &d.uri("disk")]);
    assert!(
        list.contains("disk"),
        "export gone after a refused reload:\n{list}"
    );
}

#[test]
fn watchdog_pings_only_when_systemd_asks_for_it() {
    let s3 = S3Server::start();
    let cfg = config_with(&s3, vec!["127.0.0.1:0".into()]);
    // WatchdogSec=0.4s → a ping every 0.2s.
    let mut d = BareDaemon::spawn(&cfg, &[("WATCHDOG_USEC", "400000".into())], Stdio::null());
    for n in 1..=3 {
        assert!(
            d.wait_notify("WATCHDOG=1", DAEMON_TIMEOUT).is_some(),
            "WATCHDOG=1 #{n} missing; got {:?}",
            d.received
        );
    }
    assert!(d.received.iter().any(|l| l == "READY=1"));

    // Without WATCHDOG_USEC there is no watchdog: READY, then nothing but STATUS updates.
    let mut quiet = BareDaemon::spawn(&cfg, &[], Stdio::null());
    assert!(quiet.wait_notify("READY=1", DAEMON_TIMEOUT).is_some());
    quiet.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(quiet.wait_exit(DAEMON_TIMEOUT).success());
    while quiet
        .wait_notify("WATCHDOG=1", Duration::from_millis(200))
        .is_some()
    {}
    assert!(
        !quiet.received.iter().any(|l| l == "WATCHDOG=1"),
        "WATCHDOG=1 sent although systemd did not ask: {:?}",
        quiet.received
    );
}

#[test]
fn sigterm_cancels_a_reload_stuck_on_s3() {
    let s3 = S3Server::start();
    let mut d = NbdS3::with_export(&s3, "disk");
    // Opening the added export needs S3, which now hangs.
    s3.freeze();
    d.rewrite_config(|c| c.exports.push(ExportSpec::new("second")));
    d.sighup();
    d.wait_for_notify("RELOADING=1", DAEMON_TIMEOUT);
    d.sigterm();
    let status = d.wait_exit(DAEMON_TIMEOUT);
    s3.thaw();
    let logs = d.logs();
    assert!(status.success(), "exit {status:?}:\n{logs}");
    assert!(
        logs.contains("reload abandoned"),
        "the stuck reload should have been cancelled:\n{logs}"
    );
}

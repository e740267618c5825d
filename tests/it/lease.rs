//! Export leases and automatic reopening (issue 7), with real daemons on one s3s-fs bucket:
//! a second daemon refuses a leased export naming the holder, serves it read-only, takes it
//! over by itself once the holder is killed; a daemon whose lease renewals fail stops writing
//! to S3 (FLUSH gets EIO, nothing reaches the bucket) and resumes when renewals work again;
//! `lease = "off"` opts out; an export refused because S3 was down at start comes up by
//! itself once S3 is reachable, in the same process.

use crate::common::config::quote;
use crate::common::daemon::DAEMON_TIMEOUT;
use crate::common::fault_proxy::{Fault, FaultProxy, Rule};
use crate::common::S3Server;
use crate::common::{nbdsh, run, tool, DaemonConfig, ExportSpec, NbdS3};
use std::path::PathBuf;
use std::time::Duration;

const LOG: &str = "nbd_s3=info";
const BLOCK: u64 = 128 * 1024;

/// A daemon whose exports carry `lease = LEASE` (the fixture's ExportSpec has no lease key, so
/// the config file is written here and passed with `--config`).
struct Leased {
    nbd: NbdS3,
    _dir: tempfile::TempDir,
}

fn start(s3: &S3Server, endpoint: Option<String>, exports: &[ExportSpec], lease: &str) -> Leased {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("exports.toml");
    let mut cfg = DaemonConfig::for_s3(s3);
    if let Some(e) = endpoint.clone() {
        cfg.endpoint = e;
    }
    cfg.exports = exports.to_vec();
    cfg.flush_timeout = Some("2s".into());
    let text = cfg.render().replace(
        "\n[[export]]\n",
        &format!("\n[[export]]\nlease = {}\n", quote(lease)),
    );
    std::fs::write(&path, text).unwrap();
    let mut b = NbdS3::builder(s3)
        .args(&["serve", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", LOG);
    if let Some(e) = endpoint {
        b = b.config(|c| c.endpoint = e);
    }
    for e in exports {
        b = b.export(e.clone());
    }
    Leased {
        nbd: b.start(),
        _dir: dir,
    }
}

/// Polls until `nbd` serves `export`; panics with the daemon's log after `DAEMON_TIMEOUT`.
fn wait_served(nbd: &NbdS3, export: &str, what: &str) {
    let deadline = std::time::Instant::now() + DAEMON_TIMEOUT;
    while !served(&nbd.uri(export)) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; daemon log:\n{}",
            nbd.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn served(uri: &str) -> bool {
    run(tool("nbdinfo").arg(uri)).status.success()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn second_daemon_refuses_then_takes_over_after_the_holder_dies() {
    let s3 = S3Server::start();
    let vm = ExportSpec::new("vm").size("8MiB");
    let mut first = start(&s3, None, std::slice::from_ref(&vm), "3s");
    assert!(served(&first.nbd.uri("vm")));
    let lock = s3
        .read_object("nbd", "vm/nbd-s3.lock")
        .expect("lease object");
    let lock = String::from_utf8_lossy(&lock).into_owned();
    assert!(
        lock.contains(&format!("\"pid\": {}", first.nbd.pid())),
        "{lock}"
    );

    let second = start(&s3, None, std::slice::from_ref(&vm), "3s");
    let line = second.nbd.wait_for_log("export refused", DAEMON_TIMEOUT);
    let holder = format!("host {} (pid {}", hostname(), first.nbd.pid());
    assert!(line.contains(&holder), "refusal must name {holder}: {line}");
    assert!(
        !served(&second.nbd.uri("vm")),
        "two daemons serve one export"
    );

    let reader = start(&s3, None, &[vm.clone().read_only(true)], "3s");
    assert!(
        served(&reader.nbd.uri("vm")),
        "read-only export needs no lease"
    );

    first.nbd.kill9();
    let pid = second.nbd.pid();
    wait_served(
        &second.nbd,
        "vm",
        "the second daemon to take over by itself",
    );
    assert_eq!(second.nbd.pid(), pid);
    second
        .nbd
        .wait_for_log("took over export lease", DAEMON_TIMEOUT);
    let lock = s3
        .read_object("nbd", "vm/nbd-s3.lock")
        .expect("lease object");
    assert!(String::from_utf8_lossy(&lock).contains(&format!("\"pid\": {pid}")));
}

/// nbdsh: write `n` bytes of `byte` at `off`, then FLUSH; prints `flushed` or `flush EIO`.
fn write_and_flush(uri: &str, off: u64, byte: u8) -> String {
    let code = format!(
        "h.pwrite(b'\\x{byte:02x}' * 4096, {off})\ntry:\n    h.flush()\n    print('flushed')\n\
         except nbd.Error as e:\n    print('flush', e.errno)\n"
    );
    String::from_utf8_lossy(&nbdsh(uri, &[&code]).stdout).into_owned()
}

#[test]
fn failed_renewals_stop_s3_writes_before_expiry_and_recovery_resumes_them() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port(), 7);
    let bed = start(
        &s3,
        Some(proxy.endpoint()),
        &[ExportSpec::new("vm").size("8MiB")],
        "3s",
    );
    let uri = bed.nbd.uri("vm");
    assert_eq!(write_and_flush(&uri, 0, 0x11).trim(), "flushed");

    let mark = bed.nbd.log_mark();
    let cut = Rule::new(Fault::InternalError).key_contains("nbd-s3.lock");
    proxy.add(cut.for_period(Duration::from_secs(8)));
    bed.nbd.wait_for_log_after(
        mark,
        "could not be renewed in time",
        Duration::from_secs(20),
    );
    let out = write_and_flush(&uri, BLOCK, 0x22);
    assert_eq!(out.trim(), "flush EIO", "FLUSH while the lease is in doubt");
    let key = "vm/0000000000000001";
    assert!(
        s3.read_object("nbd", key).is_none(),
        "written to S3 without a lease"
    );

    bed.nbd
        .wait_for_log_after(mark, "export lease renewed", Duration::from_secs(30));
    let code = "for i in range(20):\n    try:\n        h.flush()\n        print('flushed')\n        break\n    \
                except nbd.Error as e:\n        assert e.errno == 'EIO', e\n";
    let out = String::from_utf8_lossy(&nbdsh(&uri, &[code]).stdout).into_owned();
    assert_eq!(out.trim(), "flushed");
    let stored = s3
        .read_object("nbd", key)
        .expect("block stored after recovery");
    assert!(stored[..4096].iter().all(|b| *b == 0x22));
}

#[test]
fn lease_off_lets_the_admin_opt_out() {
    let s3 = S3Server::start();
    let vm = ExportSpec::new("vm").size("8MiB");
    let a = start(&s3, None, std::slice::from_ref(&vm), "off");
    let b = start(&s3, None, &[vm], "off");
    assert!(served(&a.nbd.uri("vm")) && served(&b.nbd.uri("vm")));
    assert!(s3.read_object("nbd", "vm/nbd-s3.lock").is_none());
}

#[test]
fn export_refused_while_s3_is_down_at_start_comes_up_by_itself() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port(), 3);
    proxy.set_outage(true);
    let bed = start(
        &s3,
        Some(proxy.endpoint()),
        &[ExportSpec::new("vm").size("8MiB")],
        "3s",
    );
    bed.nbd.wait_for_log("export refused", DAEMON_TIMEOUT);
    let uri = bed.nbd.uri("vm");
    assert!(!served(&uri), "served while S3 is unreachable");
    let pid = bed.nbd.pid();
    proxy.set_outage(false);
    wait_served(&bed.nbd, "vm", "the export to come up without a reload");
    assert_eq!(bed.nbd.pid(), pid);
    bed.nbd
        .wait_for_log("opened again by itself", DAEMON_TIMEOUT);
    assert_eq!(write_and_flush(&uri, 0, 0x33).trim(), "flushed");
}

#[test]
fn clean_shutdown_releases_the_lease_for_the_next_daemon() {
    let s3 = S3Server::start();
    let vm = ExportSpec::new("vm").size("8MiB");
    let mut first = start(&s3, None, std::slice::from_ref(&vm), "30s");
    assert_eq!(
        write_and_flush(&first.nbd.uri("vm"), 0, 0x44).trim(),
        "flushed"
    );
    assert!(s3.read_object("nbd", "vm/nbd-s3.lock").is_some());
    first.nbd.sigterm();
    assert!(first.nbd.wait_exit(DAEMON_TIMEOUT).success());
    assert!(
        s3.read_object("nbd", "vm/nbd-s3.lock").is_none(),
        "lease left behind by a clean shutdown"
    );
    // A daemon started right after needs no takeover (a 30 s lease would otherwise block it).
    let next = start(&s3, None, &[vm], "30s");
    assert!(served(&next.nbd.uri("vm")));
}

#[test]
fn partitioned_holder_loses_the_lease_and_never_writes_over_the_new_one() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port(), 11);
    let vm = ExportSpec::new("vm").size("8MiB");
    let a = start(&s3, Some(proxy.endpoint()), std::slice::from_ref(&vm), "3s");
    assert_eq!(write_and_flush(&a.nbd.uri("vm"), 0, 0x11).trim(), "flushed");
    let b = start(&s3, None, std::slice::from_ref(&vm), "3s");
    b.nbd.wait_for_log("export refused", DAEMON_TIMEOUT);

    // A cannot reach its lease for a while (B can): A pauses S3 writes, B takes over.
    let cut = Rule::new(Fault::InternalError).key_contains("nbd-s3.lock");
    proxy.add(cut.for_period(Duration::from_secs(10)));
    a.nbd
        .wait_for_log("could not be renewed in time", Duration::from_secs(20));
    let out = write_and_flush(&a.nbd.uri("vm"), BLOCK, 0x55);
    assert_eq!(out.trim(), "flush EIO", "FLUSH without a lease");
    wait_served(&b.nbd, "vm", "B to take the export over");
    assert_eq!(
        write_and_flush(&b.nbd.uri("vm"), 2 * BLOCK, 0x66).trim(),
        "flushed"
    );

    // A's link heals: it finds B's lease, gives up, and never writes its cached data.
    a.nbd
        .wait_for_log("was taken over by", Duration::from_secs(30));
    let line = a
        .nbd
        .wait_for_log("export lease lost", Duration::from_secs(30));
    assert!(line.contains(&format!("pid {}", b.nbd.pid())), "{line}");
    assert!(
        !served(&a.nbd.uri("vm")),
        "A still serves an export B holds"
    );
    assert!(
        s3.read_object("nbd", "vm/0000000000000001").is_none(),
        "A wrote after losing the lease"
    );
    let lock = s3
        .read_object("nbd", "vm/nbd-s3.lock")
        .expect("lease object");
    let pid = format!("\"pid\": {}", b.nbd.pid());
    assert!(String::from_utf8_lossy(&lock).contains(&pid));
}

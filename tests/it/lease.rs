//! Export leases and automatic reopening, with real daemons on one s3s-fs bucket. The lease
//! is held while a client is attached (or data is dirty), so each test keeps a client
//! attached where it needs the lease held:
//! a second daemon refuses clients of a leased export naming the holder, serves it read-only,
//! takes it over as soon as the holder is killed; a daemon whose lease renewals fail stops writing
//! to S3 (FLUSH gets EIO, nothing reaches the bucket) and resumes when renewals work again;
//! `lease = "off"` opts out; an export refused because S3 was down at start comes up by
//! itself once S3 is reachable, in the same process.

use crate::common::config::quote;
use crate::common::daemon::DAEMON_TIMEOUT;
use crate::common::fault_proxy::{Fault, FaultProxy, Rule};
use crate::common::raw_nbd::{Raw, REP_ERR_UNKNOWN};
use crate::common::store_bed::flush_until_ok;
use crate::common::S3Server;
use crate::common::{nbdsh, poll_until, run, tool, ExportSpec, NbdS3};
use std::time::Duration;

const LOG: &str = "nbd_s3=info";
const BLOCK: u64 = 128 * 1024;

/// A daemon on `s3` (or on `endpoint`, a fault proxy in front of it) whose exports all carry
/// `lease = LEASE`; FLUSH gives up after 2 s.
fn start(s3: &S3Server, endpoint: Option<String>, exports: &[ExportSpec], lease: &str) -> NbdS3 {
    let mut b = NbdS3::builder(s3).flush_timeout("2s").env("RUST_LOG", LOG);
    if let Some(e) = endpoint {
        b = b.config(|c| c.endpoint = e);
    }
    for e in exports {
        b = b.export(e.clone().line(&format!("lease = {}", quote(lease))));
    }
    b.start()
}

/// Polls until `nbd` serves `export`; panics with the daemon's log after `DAEMON_TIMEOUT`.
fn wait_served(nbd: &NbdS3, export: &str, what: &str) {
    assert!(
        poll_until(DAEMON_TIMEOUT, || served(&nbd.uri(export))),
        "timed out waiting for {what}; daemon log:\n{}",
        nbd.logs()
    );
}

/// A client attached to `export` of `nbd` (in transmission) until dropped: the lease stays held.
fn hold(nbd: &NbdS3, export: &str) -> Raw {
    Raw::open(&format!("127.0.0.1:{}", nbd.port()), export).0
}

/// The lease object as text, if there is one.
fn lock_text(s3: &S3Server) -> Option<String> {
    let raw = s3.read_object("nbd", "vm/nbd-s3.lock")?;
    Some(String::from_utf8_lossy(&raw).into_owned())
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
    assert!(
        lock_text(&s3).is_none(),
        "lease taken with no client attached"
    );
    let _attached = hold(&first, "vm");
    let lock = lock_text(&s3).expect("lease object");
    assert!(
        lock.contains(&format!("\"pid\": {}", first.pid())),
        "{lock}"
    );

    let second = start(&s3, None, std::slice::from_ref(&vm), "3s");
    assert!(!served(&second.uri("vm")), "two daemons serve one export");
    let line = second.wait_for_log("refused export vm", DAEMON_TIMEOUT);
    let holder = format!("host {} (pid {}", hostname(), first.pid());
    assert!(line.contains(&holder), "refusal must name {holder}: {line}");
    // Clients get ERR_UNKNOWN carrying the holder (nbdinfo shows only the error type).
    let mut raw = Raw::connect(&format!("127.0.0.1:{}", second.port()));
    let err = raw.go("vm").expect_err("GO on the leased export");
    assert_eq!(err.kind, REP_ERR_UNKNOWN);
    let told = String::from_utf8_lossy(&err.data);
    assert!(
        told.contains(&holder),
        "the client is not told who holds it: {told}"
    );

    let reader = start(&s3, None, &[vm.clone().read_only(true)], "3s");
    assert!(served(&reader.uri("vm")), "read-only export needs no lease");

    first.kill9();
    let pid = second.pid();
    wait_served(&second, "vm", "the second daemon to take over by itself");
    assert_eq!(second.pid(), pid);
    second.wait_for_log("took over export lease", DAEMON_TIMEOUT);
    let lock = lock_text(&s3).expect("lease object");
    assert!(lock.contains(&format!("\"pid\": {pid}")), "{lock}");
}

/// nbdsh: write 4 KiB of `byte` at `off` (then FLUSH if `flush`); prints `written`,
/// `flushed`, or the errno of the command that failed (`write EIO`, `flush EIO`).
fn write(uri: &str, off: u64, byte: u8, flush: bool) -> String {
    let lines = [
        "try:".to_string(),
        format!("    h.pwrite(b'\\x{byte:02x}' * 4096, {off})"),
        "except nbd.Error as e:".into(),
        "    print('write', e.errno)".into(),
        "    raise SystemExit(0)".into(),
        format!("if not {}:", if flush { "True" } else { "False" }),
        "    print('written')".into(),
        "    raise SystemExit(0)".into(),
        "try:".into(),
        "    h.flush()".into(),
        "    print('flushed')".into(),
        "except nbd.Error as e:".into(),
        "    print('flush', e.errno)".into(),
    ];
    let out = nbdsh(uri, &[&lines.join("\n")]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write_and_flush(uri: &str, off: u64, byte: u8) -> String {
    write(uri, off, byte, true)
}

#[test]
fn failed_renewals_fence_the_export_before_expiry_and_recovery_resumes_it() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port(), 7);
    let vm = ExportSpec::new("vm").size("8MiB");
    let bed = start(&s3, Some(proxy.endpoint()), &[vm], "3s");
    let uri = bed.uri("vm");
    let _attached = hold(&bed, "vm");
    assert_eq!(write_and_flush(&uri, 0, 0x11), "flushed");
    // Dirty, not flushed: a partial block waits in the cache for its FLUSH.
    assert_eq!(write(&uri, BLOCK, 0x22, false), "written");

    // Only the lease object is cut off: blocks could still be stored, the fence must stop it.
    let mark = bed.log_mark();
    let cut = Rule::new(Fault::InternalError).key_contains("nbd-s3.lock");
    proxy.add(cut.for_period(Duration::from_secs(8)));
    let fenced = bed.wait_for_log_after(
        mark,
        "could not be renewed in time",
        Duration::from_secs(20),
    );
    assert!(fenced.contains("vm/nbd-s3.lock"), "{fenced}");
    assert_eq!(write(&uri, 2 * BLOCK, 0x33, false), "write EIO");
    assert_eq!(try_flush(&uri), "flush EIO");
    assert!(
        s3.read_object("nbd", "vm/0000000000000001").is_none(),
        "written to S3 without a lease"
    );

    bed.wait_for_log_after(mark, "export lease renewed", Duration::from_secs(30));
    flush_until_ok(&uri, 30);
    let stored = s3
        .read_object("nbd", "vm/0000000000000001")
        .expect("dirty block stored once the lease is back");
    assert!(stored[..4096].iter().all(|b| *b == 0x22));
    assert!(
        s3.read_object("nbd", "vm/0000000000000002").is_none(),
        "a write refused with EIO was stored"
    );
    assert_eq!(write_and_flush(&uri, 3 * BLOCK, 0x44), "flushed");
}

/// One FLUSH: `flushed` or `flush ERRNO`.
fn try_flush(uri: &str) -> String {
    let code = "try:\n    h.flush()\n    print('flushed')\nexcept nbd.Error as e:\n    print('flush', e.errno)";
    String::from_utf8_lossy(&nbdsh(uri, &[code]).stdout)
        .trim()
        .to_string()
}

#[test]
fn lease_off_lets_the_admin_opt_out() {
    let s3 = S3Server::start();
    let vm = ExportSpec::new("vm").size("8MiB");
    let a = start(&s3, None, std::slice::from_ref(&vm), "off");
    let b = start(&s3, None, &[vm], "off");
    assert!(served(&a.uri("vm")) && served(&b.uri("vm")));
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
    bed.wait_for_log("export refused", DAEMON_TIMEOUT);
    let uri = bed.uri("vm");
    assert!(!served(&uri), "served while S3 is unreachable");
    let pid = bed.pid();
    proxy.set_outage(false);
    wait_served(&bed, "vm", "the export to come up without a reload");
    assert_eq!(bed.pid(), pid);
    bed.wait_for_log("opened again by itself", DAEMON_TIMEOUT);
    assert_eq!(write_and_flush(&uri, 0, 0x33), "flushed");
}

#[test]
fn clean_shutdown_releases_the_lease_for_the_next_daemon() {
    let s3 = S3Server::start();
    let vm = ExportSpec::new("vm").size("8MiB");
    let mut first = start(&s3, None, std::slice::from_ref(&vm), "30s");
    let attached = hold(&first, "vm");
    assert_eq!(write_and_flush(&first.uri("vm"), 0, 0x44).trim(), "flushed");
    assert!(lock_text(&s3).is_some_and(|l| !l.contains("released")));
    first.sigterm();
    assert!(first.wait_exit(DAEMON_TIMEOUT).success());
    drop(attached);
    let lock = lock_text(&s3).unwrap_or_default();
    assert!(
        lock.contains("\"released\": true"),
        "lease not released by a clean shutdown: {lock}"
    );
    // A daemon started right after needs no takeover (a 30 s lease would otherwise block it).
    let next = start(&s3, None, &[vm], "30s");
    assert!(served(&next.uri("vm")));
}

#[test]
fn partitioned_holder_loses_the_lease_and_never_writes_over_the_new_one() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port(), 11);
    let vm = ExportSpec::new("vm").size("8MiB");
    let a = start(&s3, Some(proxy.endpoint()), std::slice::from_ref(&vm), "3s");
    let a_uri = a.uri("vm");
    let a_client = hold(&a, "vm");
    assert_eq!(write_and_flush(&a_uri, 0, 0x11), "flushed");
    assert_eq!(write(&a_uri, BLOCK, 0x55, false), "written");
    let b = start(&s3, None, std::slice::from_ref(&vm), "3s");
    assert!(!served(&b.uri("vm")), "B serves an export A holds");

    // A cannot reach its lease for a while (B can): A fences itself, B takes over.
    let cut = Rule::new(Fault::InternalError).key_contains("nbd-s3.lock");
    proxy.add(cut.for_period(Duration::from_secs(10)));
    a.wait_for_log("could not be renewed in time", Duration::from_secs(20));
    assert_eq!(write(&a_uri, 2 * BLOCK, 0x56, false), "write EIO");
    wait_served(&b, "vm", "B to take the export over");
    let _b_client = hold(&b, "vm");
    assert_eq!(write_and_flush(&b.uri("vm"), 2 * BLOCK, 0x66), "flushed");

    // A's link heals: it finds B's lease, gives up, and never writes its cached data.
    a.wait_for_log("was taken over by", Duration::from_secs(30));
    drop(a_client);
    let line = a.wait_for_log("export lease lost", Duration::from_secs(30));
    assert!(line.contains(&format!("pid {}", b.pid())), "{line}");
    assert!(!served(&a_uri), "A still serves an export B holds");
    assert!(
        s3.read_object("nbd", "vm/0000000000000001").is_none(),
        "A wrote after losing the lease"
    );
    let ours = s3
        .read_object("nbd", "vm/0000000000000002")
        .expect("B's block");
    assert!(ours[..4096].iter().all(|b| *b == 0x66));
    let lock = lock_text(&s3).expect("lease object");
    let pid = format!("\"pid\": {}", b.pid());
    assert!(lock.contains(&pid), "{lock}");
}

#[test]
fn a_takeover_passes_the_lease_to_the_new_process() {
    use crate::common::raw_nbd::{CMD_FLUSH, CMD_WRITE};
    let s3 = S3Server::start();
    let vm = ExportSpec::new("vm").size("8MiB");
    let mut first = start(&s3, None, std::slice::from_ref(&vm), "30s");
    let mut attached = hold(&first, "vm");
    let old_pid = first.pid();
    assert!(lock_text(&s3).is_some_and(|l| l.contains(&format!("\"pid\": {old_pid}"))));
    let mut old = first.take_over();
    assert!(old.wait_exit(DAEMON_TIMEOUT).expect("old exited").success());
    let new_pid = first.pid();
    // The old process released the lease before passing the connection on; the new one
    // takes it when it adopts the connection (no takeover of a live lease, no waiting for
    // a 30 s lease to run out).
    assert!(
        poll_until(DAEMON_TIMEOUT, || lock_text(&s3).is_some_and(|l| l
            .contains(&format!("\"pid\": {new_pid}"))
            && !l.contains("released"))),
        "the new process does not hold the lease: {:?}\n{}",
        lock_text(&s3),
        first.logs()
    );
    assert!(
        first.log_lines("took over export lease").is_empty(),
        "{}",
        first.logs()
    );
    // The adopted client writes through the new process's lease.
    attached.send_req(0, CMD_WRITE, 1, 0, 4096, &[0x5a; 4096]);
    assert_eq!(attached.reply_nodata().error, 0, "write after the takeover");
    assert_eq!(
        attached.cmd(0, CMD_FLUSH, 2, 0, 0),
        0,
        "flush after the takeover"
    );
    // A third daemon is refused, naming the new process.
    let third = start(&s3, None, &[vm], "30s");
    assert!(!served(&third.uri("vm")), "two daemons serve one export");
    let line = third.wait_for_log("refused export vm", DAEMON_TIMEOUT);
    let holder = format!("host {} (pid {new_pid}", hostname());
    assert!(line.contains(&holder), "refusal must name {holder}: {line}");
}

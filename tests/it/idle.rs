//! Idle exports cost nothing: once the last client has gone and its data is stored, the
//! export lease is given up and the daemon makes no S3 request at all, counted both by the
//! daemon (`nbd_s3_export_s3_requests_total`, per export) and by the S3 side (the fault
//! proxy sees every request). A client coming back takes the lease again and finds its data,
//! without re-reading what nobody else could have changed.

use crate::common::fault_proxy::{FaultProxy, Op};
use crate::common::metrics::{get, Metrics, ANY_PORT, S3_OPS};
use crate::common::{nbdsh, ExportSpec, NbdS3, S3Server};
use std::time::Duration;

const OPS: [Op; 7] = [
    Op::Get,
    Op::Put,
    Op::Delete,
    Op::List,
    Op::Head,
    Op::DeleteObjects,
    Op::Other,
];

fn proxy_total(proxy: &FaultProxy) -> u64 {
    OPS.iter().map(|op| proxy.requests(*op)).sum()
}

/// The daemon's own count of S3 requests made for `export`.
fn daemon_count(metrics: &Metrics, export: &str) -> u64 {
    let samples = metrics.scrape();
    S3_OPS
        .iter()
        .map(|op| {
            get(
                &samples,
                "nbd_s3_export_s3_requests_total",
                &[("export", export), ("op", op)],
            ) as u64
        })
        .sum()
}

fn released(s3: &S3Server, prefix: &str) -> bool {
    s3.read_object("nbd", &format!("{prefix}nbd-s3.lock"))
        .is_some_and(|raw| String::from_utf8_lossy(&raw).contains("\"released\": true"))
}

/// Writes to `vm`, leaves, then watches both exports (`vm` and the never used `spare`)
/// for `quiet`: not one request may reach S3.
fn quiet_period_costs_nothing(lease: &str, quiet: Duration) {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port(), 5);
    let line = format!("lease = \"{lease}\"");
    let nbd = NbdS3::builder(&s3)
        .config(|c| {
            c.endpoint = proxy.endpoint();
            c.metrics = Some(ANY_PORT.into());
        })
        .export(ExportSpec::new("vm").size("8MiB").line(&line))
        .export(ExportSpec::new("spare").size("8MiB").line(&line))
        .start();
    let metrics = Metrics::of(&nbd);
    let uri = nbd.uri("vm");
    let wrote = nbdsh(
        &uri,
        &["h.pwrite(b'\\x5a' * 65536, 4096)\nh.flush()\nprint('flushed')"],
    );
    assert!(String::from_utf8_lossy(&wrote.stdout).contains("flushed"));
    // The daemon logs the release once the write has returned (and so has been counted);
    // S3 holds the released record from then on.
    nbd.wait_for_log("export lease released", Duration::from_secs(20));
    assert!(released(&s3, "vm/"), "no released record in S3");
    let (proxy_before, vm_before, spare_before) = (
        proxy_total(&proxy),
        daemon_count(&metrics, "vm"),
        daemon_count(&metrics, "spare"),
    );
    assert!(vm_before > 0, "the export's requests are not counted");
    // An observation window, not a wait for readiness: nothing may happen in it.
    std::thread::sleep(quiet);
    assert_eq!(
        (
            daemon_count(&metrics, "vm"),
            daemon_count(&metrics, "spare")
        ),
        (vm_before, spare_before),
        "idle exports made S3 requests (daemon's count)"
    );
    assert_eq!(
        proxy_total(&proxy),
        proxy_before,
        "idle exports made S3 requests (S3 side): {}",
        proxy.summary()
    );

    // A client comes back: the lease is taken again and the data read from the cache that
    // nobody else could have made stale (no LIST, no block GET: one GET of the lease).
    let (gets, lists) = (proxy.requests(Op::Get), proxy.requests(Op::List));
    let read = nbdsh(&uri, &["print(h.pread(4, 4096).hex())"]);
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "5a5a5a5a");
    assert_eq!(
        proxy.requests(Op::List),
        lists,
        "listed again after our own release"
    );
    assert!(
        proxy.requests(Op::Get) <= gets + 1,
        "cached blocks were fetched again: {}",
        proxy.summary()
    );
}

#[test]
fn idle_exports_make_no_request_in_a_quiet_period() {
    // A 3 s lease would renew every 0.5 s if it were still held: 10 s shows it clearly.
    quiet_period_costs_nothing("3s", Duration::from_secs(10));
}

#[test]
fn idle_exports_make_no_request_in_a_quiet_minute() {
    quiet_period_costs_nothing("on", Duration::from_secs(60));
}

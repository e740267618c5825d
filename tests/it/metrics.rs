//! Prometheus metrics through the real binary: `[server] metrics` on port 0, the
//! address learnt from the `metrics on ADDR` log line, `/metrics` parsed with prometheus-parse
//! (every line must parse), real NBD clients as the workload, a real S3 server behind.

use crate::common::fault_proxy::{Fault, FaultProxy, Op, Rule};
use crate::common::metrics::{get, http, scrape, Metrics, ANY_PORT};
use crate::common::nbdsh_session::NbdshSession;
use crate::common::{qemu_io, wait_until, ExportSpec, NbdS3, S3Server};
use std::time::Duration;

/// Bound for things with no stated target (S3 PUTs, reloads, process exits).
const SLOW: Duration = Duration::from_secs(30);

/// A daemon with exports `m1` and `m2` and metrics on `127.0.0.1:0`; returns it with the
/// metrics address it logged.
fn daemon(s3: &S3Server) -> (NbdS3, String) {
    daemon_via(s3, None)
}

/// `daemon`, talking to S3 through `proxy` when given.
fn daemon_via(s3: &S3Server, proxy: Option<&FaultProxy>) -> (NbdS3, String) {
    let endpoint = proxy.map_or_else(|| s3.endpoint(), FaultProxy::endpoint);
    let d = NbdS3::builder(s3)
        .export(ExportSpec::new("m1").size("16MiB"))
        .export(ExportSpec::new("m2").size("16MiB"))
        .config(|c| {
            c.metrics = Some(ANY_PORT.into());
            c.endpoint = endpoint;
        })
        .start();
    let addr = Metrics::of(&d).addr().to_owned();
    (d, addr)
}

fn cmd<'a>(export: &'a str, command: &'a str) -> [(&'a str, &'a str); 2] {
    [("export", export), ("command", command)]
}

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn counters_follow_a_qemu_io_workload() {
    let s3 = S3Server::start();
    let (d, addr) = daemon(&s3);
    let before = scrape(&addr);
    assert_eq!(get(&before, "nbd_s3_export_up", &[("export", "m1")]), 1.0);
    assert_eq!(get(&before, "nbd_s3_connections", &[]), 0.0);
    let put_ok = [("bucket", "nbd"), ("op", "put"), ("outcome", "ok")];
    let puts_before = get(&before, "nbd_s3_backend_requests_total", &put_ok);

    qemu_io(
        &d.uri("m1"),
        &["write -P 0xab 0 2M", "flush", "read -P 0xab 0 2M"],
    );
    let after = scrape(&addr);
    let delta = |m: &str, l: &[(&str, &str)]| get(&after, m, l) - get(&before, m, l);
    assert!(delta("nbd_s3_request_bytes_total", &cmd("m1", "write")) >= 2.0 * MIB);
    assert!(delta("nbd_s3_request_bytes_total", &cmd("m1", "read")) >= 2.0 * MIB);
    assert!(delta("nbd_s3_requests_total", &cmd("m1", "flush")) >= 1.0);
    let writes = delta("nbd_s3_requests_total", &cmd("m1", "write"));
    assert!(writes >= 1.0);
    assert_eq!(
        get(
            &after,
            "nbd_s3_request_duration_seconds",
            &cmd("m1", "write")
        ),
        get(&after, "nbd_s3_requests_total", &cmd("m1", "write")),
        "every counted request has a latency"
    );
    assert_eq!(
        get(&after, "nbd_s3_requests_total", &cmd("m2", "write")),
        0.0
    );
    // 2 MiB of 128 KiB blocks must be in S3 after the FLUSH, and nothing left dirty.
    assert!(get(&after, "nbd_s3_backend_requests_total", &put_ok) - puts_before >= 16.0);
    assert!(
        get(
            &after,
            "nbd_s3_backend_sent_bytes_total",
            &[("bucket", "nbd")]
        ) >= 2.0 * MIB
    );
    assert!(delta("nbd_s3_export_block_puts_total", &[("export", "m1")]) >= 16.0);
    assert_eq!(
        get(&after, "nbd_s3_export_dirty_bytes", &[("export", "m1")]),
        0.0
    );
    assert!(delta("nbd_s3_export_flush_duration_seconds", &[("export", "m1")]) >= 1.0);
    let hits = delta("nbd_s3_export_cache_hits_total", &[("export", "m1")]);
    let misses = delta("nbd_s3_export_cache_misses_total", &[("export", "m1")]);
    assert!(hits + misses >= 16.0, "hits {hits} misses {misses}");
}

#[test]
fn connections_clients_and_reloads_follow_the_daemon() {
    let s3 = S3Server::start();
    let (mut d, addr) = daemon(&s3);
    let session = NbdshSession::open(&d.uri("m2"));
    let s = scrape(&addr);
    assert_eq!(get(&s, "nbd_s3_connections", &[]), 1.0);
    assert_eq!(get(&s, "nbd_s3_export_clients", &[("export", "m2")]), 1.0);
    assert_eq!(get(&s, "nbd_s3_export_clients", &[("export", "m1")]), 0.0);
    // Both exports are writable with the default lease, which this daemon holds.
    assert_eq!(get(&s, "nbd_s3_export_lease", &[("export", "m2")]), 1.0);
    session.close();
    wait_until("the connection gauge back at 0", SLOW, || {
        get(&scrape(&addr), "nbd_s3_connections", &[]) == 0.0
    });

    // A reload that removes m2: its series go, the ok counter moves.
    let mark = d.log_mark();
    d.rewrite_config(|c| c.exports.retain(|e| e.name != "m2"));
    d.wait_for_log_after(mark, "reload complete", SLOW);
    wait_until("m2 gone from the scrape", SLOW, || {
        let s = scrape(&addr);
        !s.iter().any(|x| x.labels.get("export") == Some("m2"))
    });
    let s = scrape(&addr);
    assert!(get(&s, "nbd_s3_reloads_total", &[("outcome", "ok")]) >= 1.0);
    assert_eq!(get(&s, "nbd_s3_last_reload_successful", &[]), 1.0);
    assert_eq!(get(&s, "nbd_s3_export_up", &[("export", "m1")]), 1.0);

    // A refused file: the failure counter moves, the gauge says so.
    let mark = d.log_mark();
    d.write_config_raw("[server]\nnot_a_key = 1\n");
    d.wait_for_log_after(mark, "reload refused", SLOW);
    wait_until("the failed reload counted", SLOW, || {
        get(
            &scrape(&addr),
            "nbd_s3_reloads_total",
            &[("outcome", "failed")],
        ) >= 1.0
    });
    assert_eq!(
        get(&scrape(&addr), "nbd_s3_last_reload_successful", &[]),
        0.0
    );
}

#[test]
fn other_paths_and_garbage_are_refused_and_the_daemon_serves_on() {
    let s3 = S3Server::start();
    let (d, addr) = daemon(&s3);
    let (status, _) = http(&addr, "GET / HTTP/1.1\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    let (status, _) = http(&addr, "DELETE /metrics HTTP/1.1\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    let (status, _) = http(&addr, "\x16\x03\x01 garbage\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    let (status, body) = http(
        &addr,
        &format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(16 * 1024)
        ),
    );
    assert!(status.starts_with("HTTP/1.1 431"), "{status} {body}");
    let (status, body) = http(&addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", ""));
    qemu_io(&d.uri("m1"), &["write -P 0x11 0 64k", "read -P 0x11 0 64k"]);
    let s = scrape(&addr);
    assert!(get(&s, "nbd_s3_requests_total", &cmd("m1", "read")) >= 1.0);
}

#[test]
fn s3_errors_and_retries_are_counted_per_bucket() {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.port(), 8);
    let (d, addr) = daemon_via(&s3, Some(&proxy));
    // Three block PUTs of m1 get 503 SlowDown; the backend retries them.
    proxy.add(
        Rule::new(Fault::SlowDown)
            .only(&[Op::Put])
            .key_contains("m1/00")
            .times(3),
    );
    qemu_io(&d.uri("m1"), &["write -P 0x5a 0 1M", "flush"]);
    assert_eq!(proxy.injected(Fault::SlowDown), 3, "{}", proxy.summary());
    let s = scrape(&addr);
    let bucket = [("bucket", "nbd")];
    let transient = [("bucket", "nbd"), ("op", "put"), ("outcome", "transient")];
    assert!(get(&s, "nbd_s3_backend_requests_total", &transient) >= 3.0);
    assert!(get(&s, "nbd_s3_backend_retries_total", &bucket) >= 3.0);
    assert_eq!(get(&s, "nbd_s3_backend_failures_total", &bucket), 0.0);
    let put_latency = [("bucket", "nbd"), ("op", "put")];
    let put_ok = [("bucket", "nbd"), ("op", "put"), ("outcome", "ok")];
    assert!(
        get(&s, "nbd_s3_backend_request_duration_seconds", &put_latency)
            >= get(&s, "nbd_s3_backend_requests_total", &put_ok) + 3.0,
        "every attempt, failed or not, has a latency"
    );
    assert_eq!(
        get(&s, "nbd_s3_export_dirty_bytes", &[("export", "m1")]),
        0.0
    );
}

//! The daemon's `/metrics` as a test reads it: the address learnt from the `metrics on ADDR`
//! log line, one plain HTTP/1.1 request, every line checked by the Prometheus parser before
//! the samples are handed out. Tests count what the daemon did (retries, PUTs) from here
//! rather than from its debug log, so a reworded log line cannot silently zero a count.

use super::daemon::NbdS3;
use prometheus_parse::{LineInfo, Sample, Scrape, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Bound for the metrics listener to come up and for one scrape.
const SLOW: Duration = Duration::from_secs(30);

/// `127.0.0.1:0`: the config value that makes the daemon serve metrics on a free port.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// Every `op` label of the per-export S3 request counter: summed, the export's whole bill.
pub const S3_OPS: [&str; 7] = [
    "get",
    "put",
    "delete",
    "list",
    "conditional_put",
    "delete_objects",
    "copy",
];

/// The metrics endpoint of one daemon process (a restart moves it: ask again).
pub struct Metrics {
    addr: String,
}

impl Metrics {
    /// The endpoint of `nbd`'s current process, which must run with `[server] metrics`.
    pub fn of(nbd: &NbdS3) -> Metrics {
        let line = nbd.wait_for_log("metrics on ", SLOW);
        let addr = line
            .split("metrics on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Metrics { addr }
    }

    /// `HOST:PORT` of the listener.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET /metrics`, parsed.
    pub fn scrape(&self) -> Vec<Sample> {
        scrape(&self.addr)
    }
}

/// One HTTP/1.1 request; returns (status line, body).
pub fn http(addr: &str, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(SLOW)).expect("read timeout");
    s.write_all(request.as_bytes())
        .unwrap_or_else(|e| panic!("send to {addr}: {e}"));
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// `GET /metrics` at `addr`, checked line by line with the parser, then parsed.
pub fn scrape(addr: &str) -> Vec<Sample> {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    for line in body.lines() {
        assert_ne!(
            LineInfo::parse(line),
            LineInfo::Ignored,
            "unparsable: {line:?}"
        );
    }
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    Scrape::parse(lines).expect("Prometheus text").samples
}

/// The value of `metric` with `labels` (a histogram gives its count), or 0 when absent
/// (a series not yet created).
pub fn get(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found = samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)));
    found.map_or(0.0, value)
}

/// The sum of `metric` over every label set (e.g. retries of all buckets).
pub fn total(samples: &[Sample], metric: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == metric)
        .map(value)
        .sum()
}

/// A sample's number: counters and gauges as they are, a histogram's count.
fn value(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(b) => b.last().map_or(0.0, |c| c.count),
        Value::Summary(_) => 0.0,
    }
}

/// Object-store retries of the daemon's current process, all buckets.
pub fn backend_retries(nbd: &NbdS3) -> u64 {
    total(&Metrics::of(nbd).scrape(), "nbd_s3_backend_retries_total") as u64
}

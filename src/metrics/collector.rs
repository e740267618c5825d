//! The scrape: reads the daemon's own counters (server, cache budget, object-store stats,
//! exports' request counters, reloads) at the moment Prometheus asks, and writes them with prometheus-client's
//! text encoder. Reading at scrape time means no second set of counters to keep in step, and
//! exports that a reload removed simply stop appearing.

use super::exports;
use crate::backend::stats::{BackendStats, Op, Outcome};
use crate::backend::StoreFactory;
use crate::daemon::Observed;
use crate::export::{Export, Registry};
use crate::histogram::Snapshot;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

/// Label pairs of one sample.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// The prometheus-client collector over the daemon's observed parts.
#[derive(Debug)]
pub(crate) struct DaemonCollector(pub Observed);

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let exports = live_exports(&self.0.registry);
        process(&mut enc, &self.0)?;
        exports::encode(&mut enc, &exports)?;
        let buckets: BTreeSet<&str> = exports.iter().map(|e| e.config.bucket.as_str()).collect();
        backend(&mut enc, &self.0.factory, &buckets)?;
        let names: BTreeSet<&str> = exports.iter().map(|e| e.name()).collect();
        export_requests(&mut enc, &self.0.factory, &names)?;
        export_concurrency(&mut enc, &self.0.factory, &names)
    }
}

/// Each export's own object-store requests by operation (every attempt, whatever the
/// outcome), and the object bytes it sent: what the export costs, and requests per GiB
/// written. An idle export's series stand still.
fn export_requests(
    enc: &mut DescriptorEncoder,
    factory: &StoreFactory,
    names: &BTreeSet<&str>,
) -> fmt::Result {
    let stats: Vec<Bucket> = of_exports(factory.export_stats(), names);
    let mut requests = Vec::new();
    for (export, s) in &stats {
        for op in Op::ALL {
            let n = Outcome::ALL.iter().map(|o| s.requests(op, *o)).sum();
            let l = vec![("export", export.clone()), ("op", op.name().into())];
            requests.push((l, n));
        }
    }
    counters(
        enc,
        "nbd_s3_export_s3_requests",
        "Object-store requests made for the export (each retry counts) by operation",
        requests,
    )?;
    let sent = stats
        .iter()
        .map(|(e, s)| (label("export", e), s.bytes_written()));
    counters(
        enc,
        "nbd_s3_export_s3_sent_bytes",
        "Object bytes the export sent to the object store (PUT bodies)",
        sent,
    )
}

/// Each export's adaptive limit on object-store calls in flight, the calls in flight, and
/// the throttling answers that lowered it.
fn export_concurrency(
    enc: &mut DescriptorEncoder,
    factory: &StoreFactory,
    names: &BTreeSet<&str>,
) -> fmt::Result {
    let limits = of_exports(factory.export_limits(), names);
    gauges(
        enc,
        "nbd_s3_s3_concurrency_limit",
        "Object-store calls the export may have in flight: lowered by throttling answers, raised again by successes",
        limits.iter().map(|(e, l)| (label("export", e), u64::from(l.limit()))),
    )?;
    gauges(
        enc,
        "nbd_s3_s3_in_flight",
        "Object-store calls of the export in flight now (lease calls not counted)",
        limits
            .iter()
            .map(|(e, l)| (label("export", e), u64::from(l.in_flight()))),
    )?;
    let throttled = of_exports(factory.export_stats(), names)
        .into_iter()
        .map(|(e, s)| (label("export", &e), s.throttled()));
    counters(
        enc,
        "nbd_s3_s3_throttled",
        "Object-store answers asking the export to slow down (503 SlowDown, 429); each one is retried",
        throttled,
    )
}

/// The entries of `by_export` whose export is live (in `names`).
fn of_exports<T>(by_export: Vec<(String, T)>, names: &BTreeSet<&str>) -> Vec<(String, T)> {
    by_export
        .into_iter()
        .filter(|(e, _)| names.contains(e.as_str()))
        .collect()
}

/// Served exports plus removed ones still draining (they may hold dirty data), one per name:
/// a removed export whose name is served again by a different store is left out, since two
/// series with the same labels would make the scrape invalid.
fn live_exports(registry: &Registry) -> Vec<Arc<Export>> {
    let mut live = registry.list();
    let mut named: BTreeSet<String> = live.iter().map(|e| e.name().to_owned()).collect();
    for export in registry.draining() {
        if named.insert(export.name().to_owned()) {
            live.push(export);
        }
    }
    live
}

fn process(enc: &mut DescriptorEncoder, s: &Observed) -> fmt::Result {
    let version = vec![("version", env!("CARGO_PKG_VERSION").to_owned())];
    gauges(
        enc,
        "nbd_s3_build_info",
        "Always 1; the version label says which nbd-s3 runs",
        [(version, 1u64)],
    )?;
    let one = |v: u64| [(Labels::new(), v)];
    let conns = s.server.connection_count() as u64;
    gauges(
        enc,
        "nbd_s3_connections",
        "Open NBD client connections (handshaking or transmitting)",
        one(conns),
    )?;
    let b = &s.budget;
    gauges(
        enc,
        "nbd_s3_cache_bytes",
        "Block buffers in memory, clean and dirty, all exports",
        one(b.used_bytes()),
    )?;
    gauges(
        enc,
        "nbd_s3_cache_limit_bytes",
        "[cache] memory: the limit of nbd_s3_cache_bytes",
        one(b.memory_limit()),
    )?;
    gauges(
        enc,
        "nbd_s3_cache_dirty_bytes",
        "Data acknowledged but not yet in the object store, all exports",
        one(b.dirty_bytes()),
    )?;
    gauges(
        enc,
        "nbd_s3_cache_dirty_limit_bytes",
        "[cache] dirty: writers wait above it",
        one(b.dirty_limit()),
    )?;
    let r = s.reloads.snapshot();
    let outcomes = [
        (label("outcome", "ok"), r.ok),
        (label("outcome", "failed"), r.failed),
    ];
    counters(
        enc,
        "nbd_s3_reloads",
        "Configuration reloads (SIGHUP or file change) by outcome",
        outcomes,
    )?;
    let last = u64::from(!r.last_failed);
    gauges(
        enc,
        "nbd_s3_last_reload_successful",
        "0 when the last reload was refused (the previous configuration still runs)",
        one(last),
    )?;
    handovers(enc, s)
}

/// Restarts that kept clients connected (takeover or the service manager's fd store).
fn handovers(enc: &mut DescriptorEncoder, s: &Observed) -> fmt::Result {
    let h = s.handovers.snapshot();
    counters(
        enc,
        "nbd_s3_handovers",
        "Restarts that passed listeners and client connections on to the next process, \
         counted across the chain of processes",
        [(Labels::new(), h.total)],
    )?;
    let Some(pause) = h.last_pause else {
        return Ok(());
    };
    gauges(
        enc,
        "nbd_s3_handover_pause_seconds",
        "Latest handover: from the old process's last read from clients to this process's \
         first",
        [(Labels::new(), pause.as_secs_f64())],
    )?;
    gauges(
        enc,
        "nbd_s3_handover_connections",
        "Client connections taken over in the latest handover",
        [(Labels::new(), h.last_connections)],
    )
}

/// One bucket's counters.
type Bucket = (String, Arc<BackendStats>);
/// One `BackendStats` total as a metric: name, help text, value.
type BackendField = (&'static str, &'static str, fn(&BackendStats) -> u64);

/// Object-store counters of the buckets in use (`BackendStats`, one per bucket).
fn backend(
    enc: &mut DescriptorEncoder,
    factory: &StoreFactory,
    buckets: &BTreeSet<&str>,
) -> fmt::Result {
    let stats: Vec<Bucket> = factory
        .bucket_stats()
        .into_iter()
        .filter(|(b, _)| buckets.contains(b.as_str()))
        .collect();
    backend_requests(enc, &stats)?;
    let totals: [BackendField; 5] = [
        (
            "nbd_s3_backend_retries",
            "Transient object-store failures that were retried",
            BackendStats::retries,
        ),
        (
            "nbd_s3_backend_throttled",
            "Object-store answers asking to slow down (503 SlowDown, 429)",
            BackendStats::throttled,
        ),
        (
            "nbd_s3_backend_failures",
            "Object-store calls that still failed after all retries",
            BackendStats::exhausted,
        ),
        (
            "nbd_s3_backend_received_bytes",
            "Object bytes received (GET bodies)",
            BackendStats::bytes_read,
        ),
        (
            "nbd_s3_backend_sent_bytes",
            "Object bytes sent (PUT bodies)",
            BackendStats::bytes_written,
        ),
    ];
    for (name, help, field) in totals {
        let samples = stats.iter().map(|(b, s)| (label("bucket", b), field(s)));
        counters(enc, name, help, samples)?;
    }
    Ok(())
}

/// Requests by operation and outcome, and their latency.
fn backend_requests(enc: &mut DescriptorEncoder, stats: &[Bucket]) -> fmt::Result {
    let mut requests = Vec::new();
    let mut latency = Vec::new();
    for (bucket, s) in stats {
        for op in Op::ALL {
            for outcome in Outcome::ALL {
                let n = s.requests(op, outcome);
                // Every op's `ok` series exists from the start (rate() needs a zero); error
                // outcomes appear when they first happen, to keep the scrape small.
                if n > 0 || outcome == Outcome::Ok {
                    let l = vec![
                        ("bucket", bucket.clone()),
                        ("op", op.name().into()),
                        ("outcome", outcome.name().into()),
                    ];
                    requests.push((l, n));
                }
            }
            let h = s.latency(op);
            if h.count > 0 {
                let l = vec![("bucket", bucket.clone()), ("op", op.name().into())];
                latency.push((l, h));
            }
        }
    }
    counters(
        enc,
        "nbd_s3_backend_requests",
        "Object-store requests (each retry counts) by operation and outcome",
        requests,
    )?;
    histograms(
        enc,
        "nbd_s3_backend_request_duration_seconds",
        "Object-store request latency by operation",
        latency,
    )
}

/// One label pair.
pub(crate) fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_owned())]
}

/// A counter family; nothing is written when there are no samples. prometheus-client adds
/// the `_total` suffix.
pub(crate) fn counters(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let samples: Vec<_> = samples.into_iter().collect();
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in &samples {
        metric
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, u64, u64>(value, None)?;
    }
    Ok(())
}

/// A gauge family; nothing is written when there are no samples.
pub(crate) fn gauges<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let samples: Vec<_> = samples.into_iter().collect();
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in &samples {
        metric.encode_family(labels)?.encode_gauge(value)?;
    }
    Ok(())
}

/// A histogram family; nothing is written when there are no samples.
pub(crate) fn histograms(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, Snapshot)>,
) -> fmt::Result {
    let samples: Vec<_> = samples.into_iter().collect();
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in &samples {
        let no_exemplars: Option<&HashMap<usize, _>> = None;
        metric
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, no_exemplars)?;
    }
    Ok(())
}

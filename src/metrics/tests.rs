//! The scrape end to end in-process: real exports on a `file://` store, a real TCP endpoint,
//! the text parsed by prometheus-parse. The child-process test with S3 and NBD clients is
//! tests/it/metrics.rs.

use super::http::{respond, route, Render, Route, MAX_HEAD};
use super::*;
use crate::backend::StoreFactory;
use crate::config::Config;
use crate::daemon::Reloads;
use crate::export::{Export, Registry};
use crate::proto::Command;
use crate::server::Server;
use crate::store::{BlockStore, BlockStoreConfig, CacheBudget};
use crate::test_support::wait_until;
use prometheus_parse::{Sample, Scrape, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A registry with exports `names` (bucket `bucket-NAME`) on a `file://` store in `dir`.
async fn sources(dir: &std::path::Path, names: &[&str]) -> Observed {
    let mut text = format!("[server]\n[s3]\nendpoint = \"file://{}\"\n", dir.display());
    for name in names {
        text.push_str(&format!(
            "[[export]]\nname = \"{name}\"\nsize = \"1MiB\"\nbucket = \"bucket-{name}\"\n\
             prefix = \"{name}/\"\nblock_size = \"4KiB\"\n"
        ));
        std::fs::create_dir_all(dir.join(format!("bucket-{name}"))).unwrap();
    }
    let config = Config::parse(&text, "t.toml", dir).unwrap();
    let factory = StoreFactory::new(&config.s3).await.unwrap();
    let budget = CacheBudget::new(64 << 20, 32 << 20);
    // Stores opened directly (not through export::open_all, whose context grows with leases).
    let mut opened = BTreeMap::new();
    for c in &config.exports {
        let cfg = BlockStoreConfig {
            prefix: c.prefix.clone(),
            size: c.size,
            block_size: c.block_size,
            read_only: c.read_only,
            flush_timeout: Duration::from_secs(5),
            codec: Default::default(),
            base: None,
            journal: None,
        };
        let objects = factory.export_bucket(&c.bucket, &c.name);
        let store = BlockStore::open(objects, cfg, Arc::clone(&budget)).await;
        opened.insert(
            c.name.clone(),
            Export::serving(c.clone(), store.unwrap(), None),
        );
    }
    let registry = Registry::new();
    registry.replace(opened);
    let server = Server::new(Arc::clone(&registry));
    Observed {
        registry,
        server,
        factory,
        budget,
        reloads: Arc::new(Reloads::default()),
        handovers: Default::default(),
    }
}

fn parse(text: &str) -> Vec<Sample> {
    for line in text.lines() {
        let info = prometheus_parse::LineInfo::parse(line);
        assert_ne!(
            info,
            prometheus_parse::LineInfo::Ignored,
            "unparsable line {line:?}"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap()
        .samples
}

fn value(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let s = samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))?;
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(b) => b.last().map(|c| c.count),
        Value::Summary(_) => None,
    }
}

#[tokio::test]
async fn a_scrape_shows_requests_store_and_backend_per_export_and_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let src = sources(dir.path(), &["m-a", "m-b"]).await;
    let a = src.registry.get("m-a").unwrap();
    let store = Arc::clone(a.store().unwrap());
    let _attached = a.attach();
    let counters = a.requests().for_connection();
    {
        let _t = counters.start(Command::Write, 8192);
        store
            .write(0, bytes::Bytes::from(vec![1u8; 8192]), false)
            .await
            .unwrap();
    }
    {
        let _t = counters.start(Command::Flush, 0);
        store.flush().await.unwrap();
    }
    let text = renderer(src.clone())().unwrap();
    let s = parse(&text);
    let ab = [("export", "m-a")];
    let write = [("export", "m-a"), ("command", "write")];
    assert!(
        value(&s, "nbd_s3_requests_total", &write).unwrap() >= 1.0,
        "{text}"
    );
    assert!(value(&s, "nbd_s3_request_bytes_total", &write).unwrap() >= 8192.0);
    assert!(value(&s, "nbd_s3_request_duration_seconds", &write).unwrap() >= 1.0);
    assert_eq!(value(&s, "nbd_s3_export_clients", &ab), Some(1.0));
    assert_eq!(
        value(&s, "nbd_s3_export_clients", &[("export", "m-b")]),
        Some(0.0)
    );
    assert_eq!(value(&s, "nbd_s3_export_up", &ab), Some(1.0));
    assert_eq!(value(&s, "nbd_s3_export_dirty_bytes", &ab), Some(0.0));
    assert_eq!(value(&s, "nbd_s3_export_block_puts_total", &ab), Some(2.0));
    assert_eq!(
        value(&s, "nbd_s3_export_flush_duration_seconds", &ab),
        Some(1.0)
    );
    let put_ok = [("bucket", "bucket-m-a"), ("op", "put"), ("outcome", "ok")];
    let put_b = [("bucket", "bucket-m-b"), ("op", "put"), ("outcome", "ok")];
    let (puts_a, puts_b) = (
        value(&s, "nbd_s3_backend_requests_total", &put_ok).unwrap(),
        value(&s, "nbd_s3_backend_requests_total", &put_b).unwrap(),
    );
    // Opening an export may PUT too (leases); the written blocks come on top, in a's bucket.
    assert!(puts_a >= 2.0 && puts_a > puts_b, "a {puts_a} b {puts_b}");
    // Nothing throttled: each export's limit stands at its ceiling, nothing in flight.
    let ceiling = f64::from(crate::backend::limit::CEILING);
    for e in ["m-a", "m-b"] {
        let l = [("export", e)];
        assert_eq!(value(&s, "nbd_s3_s3_concurrency_limit", &l), Some(ceiling));
        assert_eq!(value(&s, "nbd_s3_s3_in_flight", &l), Some(0.0));
        assert_eq!(value(&s, "nbd_s3_s3_throttled_total", &l), Some(0.0));
    }
    assert_eq!(value(&s, "nbd_s3_connections", &[]), Some(0.0));
    assert!(value(&s, "nbd_s3_reloads_total", &[("outcome", "ok")]).is_some());
    assert!(
        !text.contains("export=\"m-b\",command="),
        "no request series for an export nobody used:\n{text}"
    );
    assert!(text.contains("# TYPE nbd_s3_request_duration_seconds histogram\n"));
    dashboard_queries_exist_in(&text);
}

/// Every metric packaging/grafana/nbd-s3.json queries is in `text` (a renamed metric would
/// otherwise leave an empty panel nobody notices).
fn dashboard_queries_exist_in(text: &str) {
    let json = include_str!("../../packaging/grafana/nbd-s3.json");
    let dashboard: serde_json::Value = serde_json::from_str(json).expect("dashboard is JSON");
    assert_eq!(dashboard["templating"]["list"][0]["query"], "prometheus");
    let mut names = std::collections::BTreeSet::new();
    let mut rest = json;
    while let Some(at) = rest.find("nbd_s3_") {
        rest = &rest[at..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        names.insert(rest[..end].to_owned());
        rest = &rest[end..];
    }
    assert!(names.len() > 15, "{names:?}");
    for name in names {
        let family = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which the scrape lacks"
        );
    }
}

#[tokio::test]
async fn a_draining_export_and_its_successor_share_a_name_but_not_a_series() {
    let dir = tempfile::tempdir().unwrap();
    let src = sources(dir.path(), &["d-a"]).await;
    let old = src.registry.get("d-a").unwrap();
    let _client = old.attach(); // keeps the removed version draining
    let refused = Export::refused(
        old.config.clone(),
        crate::export::Refusal::Other("refused for the test".into()),
    );
    src.registry
        .replace(BTreeMap::from([("d-a".to_string(), refused)]));
    src.registry.retire(Arc::clone(&old));
    assert_eq!(src.registry.draining().len(), 1);
    let text = renderer(src.clone())().unwrap();
    let s = parse(&text);
    let up: Vec<_> = s
        .iter()
        .filter(|x| x.metric == "nbd_s3_export_up")
        .collect();
    assert_eq!(up.len(), 1, "one series per name:\n{text}");
    assert_eq!(
        value(&s, "nbd_s3_export_up", &[("export", "d-a")]),
        Some(0.0)
    );
}

#[tokio::test]
async fn removed_exports_drop_out_of_the_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let src = sources(dir.path(), &["r-keep", "r-gone"]).await;
    let gone = src.registry.get("r-gone").unwrap();
    drop(gone.requests().for_connection().start(Command::Read, 512));
    drop(gone);
    let text = renderer(src.clone())().unwrap();
    assert!(text.contains("export=\"r-gone\""), "{text}");
    let mut kept: BTreeMap<String, _> = (*src.registry.snapshot()).clone();
    let gone = kept.remove("r-gone").unwrap();
    src.registry.replace(kept);
    src.registry.retire(gone);
    // The retired export's final flush holds it briefly; poll until it is released.
    let render = || renderer(src.clone())().unwrap();
    wait_until("the removed export to leave the scrape", || {
        !render().contains("r-gone")
    })
    .await;
    let text = render();
    assert!(text.contains("export=\"r-keep\""));
    assert!(!text.contains("bucket=\"bucket-r-gone\""), "its bucket too");
}

fn fixed(text: &'static str) -> Render {
    Arc::new(move || Ok(text.to_owned()))
}

fn uri(text: &str) -> hyper::Uri {
    text.parse().unwrap()
}

/// The body of `response`, read whole.
async fn body(response: hyper::Response<http_body_util::Full<bytes::Bytes>>) -> String {
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn routes_and_responses() {
    use hyper::{Method, StatusCode};
    assert_eq!(route(&Method::GET, &uri("/metrics")), Route::Metrics);
    assert_eq!(route(&Method::GET, &uri("/metrics?x=1")), Route::Metrics);
    assert_eq!(route(&Method::HEAD, &uri("/metrics")), Route::Metrics);
    assert_eq!(
        route(&Method::POST, &uri("/metrics")),
        Route::MethodNotAllowed
    );
    assert_eq!(route(&Method::GET, &uri("/")), Route::NotFound);
    assert_eq!(route(&Method::GET, &uri("/metricsx")), Route::NotFound);
    assert_eq!(route(&Method::GET, &uri("*")), Route::BadRequest);
    assert_eq!(
        route(&Method::GET, &uri("http://host/metrics")),
        Route::BadRequest
    );
    let ok = respond(Route::Metrics, &fixed("a 1\n"));
    assert_eq!(ok.status(), StatusCode::OK);
    let content_type = ok.headers()["content-type"].to_str().unwrap();
    assert!(content_type.contains("version=0.0.4"), "{content_type}");
    assert_eq!(ok.headers()["connection"], "close");
    assert_eq!(body(ok).await, "a 1\n");
    let failing: Render = Arc::new(|| Err(std::fmt::Error));
    let err = respond(Route::Metrics, &failing);
    assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let not_allowed = respond(Route::MethodNotAllowed, &failing);
    assert_eq!(not_allowed.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(not_allowed.headers()["allow"], "GET, HEAD");
    let missing = respond(Route::NotFound, &failing);
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        respond(Route::BadRequest, &failing).status(),
        StatusCode::BAD_REQUEST
    );
}

/// Sends `request` to `addr` and returns the whole response.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(request).await.unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_endpoint_answers_refuses_and_survives_bad_clients() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(listener, fixed("up 1\n")));
    let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(
        ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("up 1\n"),
        "{ok}"
    );
    assert!(
        ok.contains("\r\nContent-Length: 5\r\n")
            && ok.contains("\r\nCache-Control: no-store\r\n")
            && !ok.contains("\r\nDate:"),
        "{ok}"
    );
    let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 200 OK")
            && head.contains("\r\nContent-Length: 5\r\n")
            && head.ends_with("\r\n\r\n"),
        "HEAD: the length, no body: {head}"
    );
    let missing = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    let not_allowed = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        not_allowed.starts_with("HTTP/1.1 405 ")
            && not_allowed.contains("\r\nAllow: GET, HEAD\r\n"),
        "{not_allowed}"
    );
    for garbage in [
        &b"\x16\x03\x01 garbage\r\n\r\n"[..],
        b"GET /metrics\r\n\r\n",
        b"GET /metrics SPDY/3\r\n\r\n",
    ] {
        let refused = exchange(addr, garbage).await;
        assert!(refused.starts_with("HTTP/1.1 400 "), "{refused}");
    }
    let huge = vec![b'a'; MAX_HEAD + 2048];
    let refused = exchange(addr, &huge).await;
    assert!(refused.starts_with("HTTP/1.1 431 "), "{refused}");
    // A client that connects and leaves, and one that stays silent, hurt nobody else.
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // An HTTP/1.0 client is answered in its own version.
    let again = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(
        again.starts_with("HTTP/1.0 200 OK") && again.ends_with("up 1\n"),
        "{again}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_gets_408_after_the_read_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(http::serve(listener, fixed("up 1\n")));
    let reply = exchange(addr, b"GET /metrics HTTP/1.1\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    let (head, text) = reply.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains(&format!("\r\nContent-Length: {}", text.len())),
        "{reply}"
    );
}

#[tokio::test]
async fn spawn_logs_nothing_and_returns_none_without_an_address_or_when_taken() {
    let dir = tempfile::tempdir().unwrap();
    let src = sources(dir.path(), &[]).await;
    let mut config = Config::parse("[server]\n", "t.toml", dir.path()).unwrap();
    assert_eq!(spawn(config.server.metrics, src.clone()).await, None);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.server.metrics = Some(taken.local_addr().unwrap());
    assert_eq!(spawn(config.server.metrics, src.clone()).await, None);
    config.server.metrics = Some("127.0.0.1:0".parse().unwrap());
    let bound = spawn(config.server.metrics, src.clone()).await;
    let bound = bound.expect("a free port binds");
    let text = exchange(bound, b"GET /metrics HTTP/1.1\r\n\r\n").await;
    assert!(text.contains("nbd_s3_build_info{version="), "{text}");
}

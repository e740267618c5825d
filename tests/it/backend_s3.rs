//! The S3 backend against a real S3 server (s3s-fs over HTTP on loopback): the object
//! operations, pagination, the CRC32C metadata, corruption detection on the server's disk,
//! error classes and conditional writes.

use crate::common::pattern;
use crate::common::s3_store::{canned_server, error_xml, s3_config, setup, store_at, BUCKET};
use bytes::Bytes;
use nbd_s3::backend::conditional::supports_conditional_writes;
use nbd_s3::backend::integrity::{crc32c_hex, S3_METADATA_KEY};
use nbd_s3::backend::s3::{build_client, S3Store};
use nbd_s3::backend::{BackendError, ObjectStore, StoreFactory};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test]
async fn put_get_delete_round_trip() {
    let (s3, store) = setup().await;
    let data = Bytes::from(pattern(128 * 1024, 1));
    assert_eq!(store.get("vm1/0000000000000000").await.unwrap(), None);
    store
        .put("vm1/0000000000000000", data.clone())
        .await
        .unwrap();
    assert_eq!(
        s3.read_object(BUCKET, "vm1/0000000000000000").as_deref(),
        Some(&data[..])
    );
    assert_eq!(store.get("vm1/0000000000000000").await.unwrap(), Some(data));
    let other = Bytes::from(pattern(4096, 2));
    store
        .put("vm1/0000000000000000", other.clone())
        .await
        .unwrap();
    assert_eq!(
        store.get("vm1/0000000000000000").await.unwrap(),
        Some(other)
    );
    store.delete("vm1/0000000000000000").await.unwrap();
    assert_eq!(store.get("vm1/0000000000000000").await.unwrap(), None);
    // Deleting an absent object is success.
    store.delete("vm1/0000000000000000").await.unwrap();
    // Empty objects round-trip too.
    store.put("vm1/empty", Bytes::new()).await.unwrap();
    assert_eq!(store.get("vm1/empty").await.unwrap(), Some(Bytes::new()));
}

#[tokio::test]
async fn list_paginates_past_1000_keys() {
    let (s3, store) = setup().await;
    let store = Arc::new(store);
    let n = 1100u64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let store = store.clone();
        tasks.spawn(async move {
            let key = format!("vm1/{i:016x}");
            store.put(&key, Bytes::from(i.to_le_bytes().to_vec())).await
        });
        while tasks.len() >= 32 {
            tasks.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    store.put("vm10/x", Bytes::from_static(b"x")).await.unwrap();
    store
        .put("other/x", Bytes::from_static(b"x"))
        .await
        .unwrap();

    let mut keys = store.list("vm1/").await.unwrap();
    keys.sort();
    let expected: Vec<String> = (0..n).map(|i| format!("vm1/{i:016x}")).collect();
    assert_eq!(keys, expected);
    assert_eq!(store.list("vm1").await.unwrap().len(), 1101);
    assert!(store.list("nothing/").await.unwrap().is_empty());
    assert_eq!(s3.list_keys(BUCKET, "vm1/").len(), 1100);
}

#[tokio::test]
async fn checksum_metadata_round_trips() {
    let (s3, store) = setup().await;
    let data = Bytes::from(pattern(128 * 1024, 3));
    store
        .put("vm1/000000000000002a", data.clone())
        .await
        .unwrap();
    let client = build_client(&s3_config(&s3)).await.unwrap();
    let head = client
        .head_object()
        .bucket(BUCKET)
        .key("vm1/000000000000002a")
        .send()
        .await
        .unwrap();
    let stored = head
        .metadata()
        .and_then(|m| m.get(S3_METADATA_KEY))
        .cloned();
    assert_eq!(stored, Some(crc32c_hex(&data)));
    assert_eq!(head.content_length(), Some(128 * 1024));
}

#[tokio::test]
async fn bit_flip_on_server_disk_is_corrupt() {
    let (s3, store) = setup().await;
    let key = "vm1/0000000000000007";
    store
        .put(key, Bytes::from(pattern(65536, 4)))
        .await
        .unwrap();
    let mut on_disk = s3.read_object(BUCKET, key).unwrap();
    on_disk[12345] ^= 0x01;
    overwrite_in_place(&s3.object_path(BUCKET, key), &on_disk);
    match store.get(key).await {
        Err(BackendError::Corrupt { key: k, reason }) => {
            assert_eq!(k, key);
            assert!(reason.contains("CRC32C"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn truncated_object_on_server_disk_is_corrupt() {
    let (s3, store) = setup().await;
    let key = "vm1/0000000000000008";
    store
        .put(key, Bytes::from(pattern(65536, 5)))
        .await
        .unwrap();
    let path = s3.object_path(BUCKET, key);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let err = store.get(key).await.unwrap_err();
    assert!(matches!(err, BackendError::Corrupt { .. }), "{err:?}");
}

/// Rewrites a file's bytes without replacing the file (s3s-fs keeps metadata beside it).
fn overwrite_in_place(path: &std::path::Path, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, 0).unwrap();
}

#[tokio::test]
async fn objects_without_checksum_are_read() {
    let (s3, store) = setup().await;
    s3.write_object(BUCKET, "legacy/0", b"written by another tool");
    let got = store.get("legacy/0").await.unwrap().unwrap();
    assert_eq!(got, &b"written by another tool"[..]);
}

#[tokio::test]
async fn oversized_object_is_refused_before_download() {
    let (s3, store) = setup().await;
    s3.write_object(BUCKET, "vm1/huge", b"");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s3.object_path(BUCKET, "vm1/huge"))
        .unwrap();
    f.set_len(nbd_s3::backend::MAX_OBJECT_SIZE + 1).unwrap(); // sparse
    let err = store.get("vm1/huge").await.unwrap_err();
    assert!(matches!(err, BackendError::Corrupt { .. }), "{err:?}");
}

#[tokio::test]
async fn missing_bucket_is_permanent_and_named() {
    let (s3, _store) = setup().await;
    let client = build_client(&s3_config(&s3)).await.unwrap();
    let store = S3Store::new(client, "no-such-bucket");
    // LIST is what an export does first when it opens (s3s-fs, unlike AWS, answers GET with
    // NoSuchKey and lets PUT create the bucket, so those two are not checked here).
    for result in [
        store.list("k/").await.map(|_| ()),
        store.delete("k/1").await,
    ] {
        match result {
            Err(BackendError::Permanent(msg)) => {
                assert!(msg.contains("no-such-bucket"), "{msg}");
                assert!(msg.contains("NoSuchBucket"), "{msg}");
            }
            other => panic!("expected Permanent, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn wrong_secret_is_permanent() {
    let (s3, _store) = setup().await;
    let mut cfg = s3_config(&s3);
    cfg.secret_access_key = Some("not-the-secret".into());
    let store = S3Store::new(build_client(&cfg).await.unwrap(), BUCKET);
    let err = store.put("k", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(err, BackendError::Permanent(_)), "{err:?}");
    assert!(!err.to_string().contains("not-the-secret"), "{err}");
}

#[tokio::test]
async fn connection_refused_is_transient() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = store_at(port).await;
    let start = Instant::now();
    let err = store.get("k").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn outage_is_retried_then_reported_transient() {
    let (mut s3, _store) = setup().await;
    let factory = StoreFactory::new(&s3_config(&s3)).await.unwrap();
    let store = factory.bucket(BUCKET);
    store
        .put("vm1/a", Bytes::from_static(b"before"))
        .await
        .unwrap();
    s3.stop();
    let err = store.get("vm1/a").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(factory.stats().retries() >= 1);
    s3.resume();
    assert_eq!(store.get("vm1/a").await.unwrap().unwrap(), &b"before"[..]);
}

#[tokio::test]
async fn conditional_writes() {
    let (_s3, store) = setup().await;
    let e1 = store
        .put_if_absent("vm1/nbd-s3.lock", Bytes::from_static(b"owner-a"))
        .await
        .unwrap()
        .expect("first create wins");
    let second = store
        .put_if_absent("vm1/nbd-s3.lock", Bytes::from_static(b"owner-b"))
        .await
        .unwrap();
    assert_eq!(
        second, None,
        "If-None-Match: * must refuse an existing object"
    );
    let (data, tag) = store
        .get_with_etag("vm1/nbd-s3.lock")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&data[..], &tag), (&b"owner-a"[..], &e1));
    let e2 = store
        .put_if_match("vm1/nbd-s3.lock", Bytes::from_static(b"owner-a2"), &e1)
        .await
        .unwrap()
        .expect("matching ETag replaces");
    assert_ne!(e1, e2);
    let stale = store
        .put_if_match("vm1/nbd-s3.lock", Bytes::from_static(b"owner-c"), &e1)
        .await
        .unwrap();
    assert_eq!(stale, None, "If-Match with a stale ETag must fail");
    assert_eq!(
        store.get("vm1/nbd-s3.lock").await.unwrap().unwrap(),
        &b"owner-a2"[..]
    );
    // The probe leases rely on agrees, and cleans up after itself.
    assert!(supports_conditional_writes(&store, "vm1/nbd-s3.probe")
        .await
        .unwrap());
    assert_eq!(store.get("vm1/nbd-s3.probe").await.unwrap(), None);
}

/// Raw parallel PUT/GET rate of 128 KiB objects: the ceiling the block store's write-back and
/// read paths are compared against. A benchmark, not a test: run it with
/// `cargo test --release --test it backend_s3::raw_parallel -- --ignored --nocapture`
/// (`BENCH_OBJECTS`, `BENCH_INFLIGHT`, `BENCH_OBJECT_SIZE` override the defaults).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; run explicitly"]
async fn raw_parallel_put_get_rate() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let objects = env("BENCH_OBJECTS", 2000);
    let inflight = env("BENCH_INFLIGHT", 32);
    let size = env("BENCH_OBJECT_SIZE", 128 * 1024);
    let (_s3, store) = setup().await;
    let store = Arc::new(store);
    let data = Bytes::from(pattern(size, 9));

    let puts = run_parallel(objects, inflight, |i| {
        let (store, data) = (store.clone(), data.clone());
        async move { store.put(&format!("b/{i:016x}"), data).await }
    })
    .await;
    let gets = run_parallel(objects, inflight, |i| {
        let (store, len) = (store.clone(), data.len());
        async move {
            let got = store.get(&format!("b/{i:016x}")).await?;
            assert_eq!(got.map(|b| b.len()), Some(len));
            Ok(())
        }
    })
    .await;
    for (what, t) in [("PUT", puts), ("GET", gets)] {
        let secs = t.as_secs_f64();
        eprintln!(
            "raw {what}: {objects} x {} KiB, {inflight} in flight: {:.0} objects/s, {:.1} MiB/s",
            size / 1024,
            objects as f64 / secs,
            (objects * size) as f64 / secs / (1024.0 * 1024.0)
        );
    }
}

/// Runs `op(0..n)` with at most `inflight` at once; returns the elapsed time.
async fn run_parallel<F, Fut>(n: usize, inflight: usize, op: F) -> Duration
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), BackendError>> + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tasks.spawn(op(i));
        while tasks.len() >= inflight {
            tasks.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    start.elapsed()
}

#[tokio::test]
async fn server_error_replies_are_classified() {
    // (status, code, retried, a throttling answer that lowers the concurrency limit)
    let cases: [(&'static str, &'static str, bool, bool); 8] = [
        ("503 Service Unavailable", "SlowDown", true, true),
        ("503 Service Unavailable", "ServiceUnavailable", true, true),
        ("500 Internal Server Error", "InternalError", true, false),
        ("429 Too Many Requests", "Throttling", true, true),
        ("400 Bad Request", "SlowDown", true, true),
        ("400 Bad Request", "RequestTimeout", true, false),
        ("403 Forbidden", "AccessDenied", false, false),
        ("400 Bad Request", "InvalidArgument", false, false),
    ];
    for (status, code, retryable, throttling) in cases {
        let body: &'static str = Box::leak(error_xml(code).into_boxed_str());
        let store = store_at(canned_server(status, body, None).await).await;
        for result in [
            store
                .put("vm1/k", Bytes::from_static(b"x"))
                .await
                .map(|_| ()),
            store.get("vm1/k").await.map(|_| ()),
            store.list("vm1/").await.map(|_| ()),
        ] {
            let err = result.expect_err(status);
            assert_eq!(err.is_retryable(), retryable, "{status} {code}: {err:?}");
            let throttled = matches!(err, BackendError::Throttled(_));
            assert_eq!(throttled, throttling, "{status} {code}: {err:?}");
            if !retryable {
                assert!(matches!(err, BackendError::Permanent(_)), "{err:?}");
                assert!(
                    err.to_string().contains(&format!("s3://{BUCKET}/vm1/")),
                    "{err}"
                );
                assert!(err.to_string().contains(code), "{err}");
            }
        }
    }
}

#[tokio::test]
async fn body_cut_short_is_transient() {
    // Promises 1000 bytes, sends 10, closes: a proxy or server dying mid-response.
    let store = store_at(canned_server("200 OK", "0123456789", Some(1000)).await).await;
    let err = store.get("vm1/k").await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn conditional_put_on_server_without_support_is_unsupported() {
    let body: &'static str = Box::leak(error_xml("NotImplemented").into_boxed_str());
    let store = store_at(canned_server("501 Not Implemented", body, None).await).await;
    let err = store
        .put_if_absent("vm1/nbd-s3.lock", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Unsupported(_)), "{err:?}");
}

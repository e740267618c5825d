//! Layout, manifest, read-your-writes, single-flight reads, read errors.

use super::*;

#[tokio::test]
async fn writes_at_every_alignment_around_block_edges_match_a_reference() {
    let mem = Arc::new(MemoryStore::new());
    let bs = u64::from(BS);
    let size = 8 * bs + 100; // last block partial
    let store = open_with(&mem, config(BS, size), big_budget()).await;
    let mut reference = vec![0u8; size as usize];
    let mut seed = 1u8;
    for base in [bs, 2 * bs] {
        for off in [base - 1, base, base + 1] {
            for len in [1, 511, bs, 3 * bs + 7] {
                seed = seed.wrapping_add(1);
                let data = pattern(len as usize, seed);
                store
                    .write(off, Bytes::from(data.clone()), false)
                    .await
                    .unwrap();
                reference[off as usize..(off + len) as usize].copy_from_slice(&data);
                assert_eq!(
                    read_bytes(&store, off - 1, len as u32 + 2).await,
                    reference[off as usize - 1..(off + len + 1) as usize],
                    "off {off} len {len}"
                );
            }
        }
    }
    let tail = pattern(100, 9);
    store
        .write(8 * bs, Bytes::from(tail.clone()), false)
        .await
        .unwrap();
    reference[8 * bs as usize..].copy_from_slice(&tail);
    assert_eq!(read_bytes(&store, 0, size as u32).await, reference);
    store.flush().await.unwrap();
    for (k, v) in mem
        .keys()
        .iter()
        .filter_map(|k| mem.peek(k).map(|v| (k.clone(), v)))
    {
        if k != "t/nbd-s3.json" {
            assert_eq!(v.len(), BS as usize, "{k} is not a whole block");
        }
    }
    let last = mem.peek(&key(8)).unwrap();
    assert!(
        last[100..].iter().all(|b| *b == 0),
        "tail past the end must be zeros"
    );
    drop(store);
    let again = open_with(&mem, config(BS, size), big_budget()).await;
    assert_eq!(read_bytes(&again, 0, size as u32).await, reference);
}

#[tokio::test]
async fn cache_is_shared_so_every_handle_sees_a_write_at_once() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    let data = pattern(1000, 3);
    store
        .write(5000, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    let other = Arc::clone(&store);
    let got = tokio::spawn(async move { read_bytes(&other, 5000, 1000).await })
        .await
        .unwrap();
    assert_eq!(got, data);
    assert_eq!(mem.gets(), 0, "no GET for data that is in the cache");
}

#[tokio::test]
async fn absent_blocks_read_as_zeros_without_any_get() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 64).await;
    let ext = store.read(0, 64 * BS).await.unwrap();
    assert_eq!(ext, vec![Extent::Zero(64 * BS)]);
    assert_eq!(mem.gets(), 0);
}

#[tokio::test]
async fn hundred_concurrent_readers_of_a_missing_block_cause_one_get() {
    let mem = Arc::new(MemoryStore::new());
    let data = pattern(BS as usize, 7);
    mem.insert(&key(3), Bytes::from(data.clone()));
    let store = open(&mem, 16).await;
    mem.reset_counts();
    mem.pause();
    let readers: Vec<_> = (0..100)
        .map(|i| {
            let s = Arc::clone(&store);
            tokio::spawn(async move { s.read(3 * u64::from(BS) + i, 100).await })
        })
        .collect();
    eventually("the GET reaches the store", || mem.waiting() == 1).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(mem.waiting(), 1, "only one GET may be in flight");
    mem.resume();
    for (i, r) in readers.into_iter().enumerate() {
        let got = flatten(&r.await.unwrap().unwrap());
        assert_eq!(got, data[i..i + 100]);
    }
    assert_eq!(mem.gets(), 1);
}

#[tokio::test]
async fn manifest_is_written_once_with_the_layout() {
    let mem = Arc::new(MemoryStore::new());
    let store = BlockStore::open(objects(&mem), config(BS, 16 * u64::from(BS)), big_budget())
        .await
        .unwrap();
    assert_eq!(mem.puts(), 1);
    let raw = mem.peek("t/nbd-s3.json").expect("manifest");
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["format"], 1);
    assert_eq!(v["block_size"], BS);
    assert_eq!(v["size"], 16 * BS);
    let created = v["created"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    drop(store);
    mem.reset_counts();
    let _again = BlockStore::open(objects(&mem), config(BS, 16 * u64::from(BS)), big_budget())
        .await
        .unwrap();
    assert_eq!(mem.puts(), 0, "an existing manifest is not rewritten");
    assert_eq!(mem.lists(), 1, "one LIST at open");
    assert_eq!(
        mem.keys(),
        vec!["t/nbd-s3.json"],
        "a fresh export holds only the manifest"
    );
}

#[tokio::test]
async fn a_different_block_size_is_refused_naming_both() {
    let mem = Arc::new(MemoryStore::new());
    drop(open(&mem, 16).await);
    let err = BlockStore::open(objects(&mem), config(8192, 16 * 8192), big_budget())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::BlockSizeMismatch {
                stored: 4096,
                configured: 8192
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("4096") && msg.contains("8192"), "{msg}");
    assert_eq!(err.kind(), ErrorKind::Io);
}

#[tokio::test]
async fn read_only_export_writes_no_manifest_and_refuses_writes() {
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = config(BS, 16 * u64::from(BS));
    cfg.read_only = true;
    let store = open_with(&mem, cfg, big_budget()).await;
    assert!(mem.is_empty());
    let err = store
        .write(0, Bytes::from_static(b"x"), false)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ReadOnly));
    assert!(matches!(
        store.trim(0, BS, false).await,
        Err(StoreError::ReadOnly)
    ));
    assert_eq!(read_bytes(&store, 0, 10).await, vec![0; 10]);
}

#[tokio::test]
async fn a_bad_manifest_refuses_the_export() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert("t/nbd-s3.json", Bytes::from_static(b"{not json"));
    let err = BlockStore::open(objects(&mem), config(BS, 1 << 20), big_budget())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BadManifest(_)), "{err}");
}

#[tokio::test]
async fn transient_get_failures_are_retried_then_give_eio() {
    let mem = Arc::new(MemoryStore::new());
    let data = pattern(BS as usize, 1);
    mem.insert(&key(0), Bytes::from(data.clone()));
    mem.insert(&key(1), Bytes::from(data.clone()));
    let store = open(&mem, 4).await;
    mem.reset_counts();
    mem.fail_next(2);
    assert_eq!(
        read_bytes(&store, 0, BS).await,
        data,
        "two failures are hidden by retries"
    );
    assert_eq!(mem.gets(), 3);
    mem.fail_next(1000);
    let err = store.read(u64::from(BS), 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(
        mem.gets() < 3 + 10,
        "reads give up after a bounded number of retries"
    );
    mem.fail_next(0);
    assert_eq!(
        read_bytes(&store, u64::from(BS), BS).await,
        data,
        "a later read tries again"
    );
}

#[tokio::test]
async fn a_truncated_object_is_eio_never_data() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&key(2), Bytes::from(vec![1u8; 100]));
    let store = open(&mem, 4).await;
    let err = store.read(2 * u64::from(BS), 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains(&key(2)), "{err}");
}

#[tokio::test]
async fn prefetch_caches_the_range() {
    let mem = Arc::new(MemoryStore::new());
    for b in [1, 5] {
        mem.insert(&key(b), Bytes::from(pattern(BS as usize, 2)));
    }
    let store = open(&mem, 8).await;
    store.prefetch(0, 8 * BS).await.unwrap();
    assert_eq!(mem.gets(), 2);
    read_bytes(&store, 0, 8 * BS).await;
    assert_eq!(mem.gets(), 2, "CACHE left the blocks in memory");
}

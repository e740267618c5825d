//! FLUSH, FUA, write-back retries, flush timeouts, shutdown.

use super::*;

const HOUR: Duration = Duration::from_secs(3600);
/// Blocks of several dirty pages, so a small write leaves its block partly written.
const BIG: u32 = 4 * BS;

async fn open_big(mem: &Arc<MemoryStore>) -> Arc<BlockStore> {
    open_with(mem, config(BIG, 16 * u64::from(BIG)), big_budget()).await
}

#[tokio::test]
async fn flush_waits_for_earlier_writes_only() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    store.set_write_back_age(HOUR);
    let a = pattern(100, 1);
    store
        .write(10, Bytes::from(a.clone()), false)
        .await
        .unwrap();
    mem.pause();
    let s = Arc::clone(&store);
    let flush = tokio::spawn(async move { s.flush().await });
    eventually("block 0's PUT is in flight", || mem.waiting() == 1).await;
    // Written after the flush started: the flush must not wait for it.
    let b = pattern(100, 2);
    store
        .write(2 * u64::from(BIG) + 10, Bytes::from(b.clone()), false)
        .await
        .unwrap();
    assert!(
        !flush.is_finished(),
        "flush returned before block 0 was stored"
    );
    mem.resume();
    flush.await.unwrap().unwrap();
    assert_eq!(&mem.peek(&key(0)).unwrap()[10..110], &a[..]);
    assert!(
        mem.peek(&key(2)).is_none(),
        "a later write was stored by an earlier flush"
    );
    assert_eq!(store.dirty_bytes(), 4096, "one dirty page");
    store.flush().await.unwrap();
    assert_eq!(&mem.peek(&key(2)).unwrap()[10..110], &b[..]);
    assert_eq!(store.dirty_bytes(), 0);
}

#[tokio::test]
async fn a_block_rewritten_during_its_put_is_stored_again() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    store.set_write_back_age(HOUR);
    store
        .write(0, Bytes::from(pattern(100, 1)), false)
        .await
        .unwrap();
    mem.pause();
    let s = Arc::clone(&store);
    let flush = tokio::spawn(async move { s.flush().await });
    eventually("PUT in flight", || mem.waiting() == 1).await;
    let newer = pattern(50, 9);
    store
        .write(20, Bytes::from(newer.clone()), false)
        .await
        .unwrap(); // copy-on-write
    mem.resume();
    flush.await.unwrap().unwrap();
    store.flush().await.unwrap();
    let stored = mem.peek(&key(0)).unwrap();
    let mut expect = pattern(100, 1);
    expect[20..70].copy_from_slice(&newer);
    assert_eq!(&stored[..100], &expect[..]);
    assert_eq!(read_bytes(&store, 0, 100).await, expect);
}

#[tokio::test]
async fn fua_write_is_in_the_store_when_it_returns() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    store.set_write_back_age(HOUR);
    store
        .write(3 * u64::from(BIG), Bytes::from(pattern(10, 5)), false)
        .await
        .unwrap();
    let data = pattern(300, 4);
    store
        .write(u64::from(BIG) - 100, Bytes::from(data.clone()), true)
        .await
        .unwrap();
    let b0 = mem.peek(&key(0)).expect("block 0 stored");
    let b1 = mem.peek(&key(1)).expect("block 1 stored");
    assert_eq!(&b0[BIG as usize - 100..], &data[..100]);
    assert_eq!(&b1[..200], &data[100..]);
    assert!(
        mem.peek(&key(3)).is_none(),
        "FUA stores its own blocks, not everything"
    );
}

#[tokio::test]
async fn write_back_retries_injected_failures_until_stored() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    mem.reset_counts();
    mem.fail_next(3);
    let data = pattern(BIG as usize, 6);
    store
        .write(0, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(mem.peek(&key(0)).unwrap(), &data[..]);
    assert_eq!(mem.puts(), 4, "three failed attempts, then success");
    assert_eq!(store.stats().write_back_failures, 3);
    mem.fail_next_permanent(2);
    store.trim(0, BIG, false).await.unwrap();
    store.flush().await.unwrap();
    assert!(
        mem.peek(&key(0)).is_none(),
        "permanent errors are retried too"
    );
}

#[tokio::test]
async fn flush_timeout_is_eio_and_the_data_stays_dirty() {
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = config(BIG, 16 * u64::from(BIG));
    cfg.flush_timeout = Duration::from_millis(200);
    let store = open_with(&mem, cfg, big_budget()).await;
    mem.pause();
    let data = pattern(BIG as usize, 8);
    store
        .write(0, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    let err = store.flush().await.unwrap_err();
    assert!(matches!(err, StoreError::FlushTimeout(_)), "{err}");
    assert_eq!(err.kind(), ErrorKind::Io);
    let err = store
        .write(u64::from(BIG), Bytes::from(data.clone()), true)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::FlushTimeout(_)),
        "FUA is bounded too: {err}"
    );
    assert_eq!(store.dirty_bytes(), 2 * u64::from(BIG));
    mem.resume();
    store.flush().await.unwrap();
    assert_eq!(mem.peek(&key(0)).unwrap(), &data[..]);
    assert_eq!(mem.peek(&key(1)).unwrap(), &data[..]);
}

#[tokio::test]
async fn shutdown_flush_names_blocks_the_store_refuses_then_succeeds() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    store.set_write_back_age(HOUR);
    for b in [2u64, 7] {
        store
            .write(b * u64::from(BIG) + 1, Bytes::from(pattern(10, 1)), false)
            .await
            .unwrap();
    }
    mem.fail_next_permanent(u64::MAX);
    let err = store
        .shutdown_flush(Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, StoreError::Unflushed { count: 2, .. }),
        "{msg}"
    );
    assert!(msg.contains(&key(2)) && msg.contains(&key(7)), "{msg}");
    mem.fail_next_permanent(0);
    store.shutdown_flush(None).await.unwrap();
    assert!(mem.peek(&key(2)).is_some() && mem.peek(&key(7)).is_some());
}

#[tokio::test]
async fn dropping_the_store_still_writes_dirty_data_back() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    store.set_write_back_age(HOUR);
    store
        .write(5, Bytes::from(pattern(10, 3)), false)
        .await
        .unwrap();
    drop(store);
    eventually("dirty block stored after drop", || {
        mem.peek(&key(0)).is_some()
    })
    .await;
}

#[tokio::test]
async fn fully_written_blocks_go_out_without_a_flush_partial_ones_wait() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    store.set_write_back_age(HOUR);
    store
        .write(u64::from(BIG) + 5, Bytes::from(pattern(10, 2)), false)
        .await
        .unwrap();
    // block 0 filled by several small sequential writes, not one whole-block write
    for page in 0..4u64 {
        let data = Bytes::from(pattern(4096, page as u8));
        store.write(page * 4096, data, false).await.unwrap();
    }
    eventually("block 0 stored unasked", || mem.peek(&key(0)).is_some()).await;
    assert!(
        mem.peek(&key(1)).is_none(),
        "a partly written block waits for FLUSH or age"
    );
    assert_eq!(store.dirty_bytes(), 4096);
}

/// Once S3 is back, a FLUSH stores the dirty blocks at once instead of after their retry
/// backoff (which grows to 10 s during an outage) runs out.
#[tokio::test(start_paused = true)]
async fn flush_after_an_outage_does_not_wait_out_the_retry_backoff() {
    let mem = Arc::new(MemoryStore::new());
    let store = open_big(&mem).await;
    mem.fail_next(u64::MAX);
    let data = pattern(BIG as usize, 9);
    store
        .write(0, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    let err = store.flush().await.unwrap_err();
    assert!(matches!(err, StoreError::FlushTimeout(_)), "{err}");
    tokio::time::sleep(Duration::from_secs(60)).await;
    mem.fail_next(0);
    let t = tokio::time::Instant::now();
    store.flush().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "FLUSH after the outage took {:?}",
        t.elapsed()
    );
    assert_eq!(mem.peek(&key(0)).unwrap(), &data[..]);
}

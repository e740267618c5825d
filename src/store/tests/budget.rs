//! The memory budget and dirty limit hold whatever the clients do.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_storm_larger_than_the_budget_stays_inside_it() {
    let mem = Arc::new(MemoryStore::new());
    let bs = u64::from(BS);
    let budget = CacheBudget::new(32 * bs, 8 * bs);
    let blocks = 512u64;
    let store = open_with(&mem, config(BS, (blocks + 1) * bs), Arc::clone(&budget)).await;
    mem.pause();
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let s = Arc::clone(&store);
            tokio::spawn(async move {
                for b in (w..blocks).step_by(8) {
                    // unaligned, so most pieces are read-modify-writes of two blocks
                    let data = pattern(BS as usize, b as u8);
                    s.write(b * bs + 7, Bytes::from(data), false).await.unwrap();
                }
            })
        })
        .collect();
    eventually("writers block at the dirty limit", || mem.waiting() > 0).await;
    for _ in 0..200 {
        tokio::task::yield_now().await;
        assert!(budget.used_bytes() <= budget.memory_limit(), "{budget:?}");
        assert!(budget.dirty_bytes() <= budget.dirty_limit(), "{budget:?}");
    }
    assert!(
        writers.iter().any(|w| !w.is_finished()),
        "writers must wait while S3 is stuck"
    );
    mem.resume();
    let sampler = {
        let budget = Arc::clone(&budget);
        tokio::spawn(async move {
            let mut max = 0;
            for _ in 0..20_000 {
                max = max.max(budget.used_bytes());
                tokio::task::yield_now().await;
            }
            max
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    store.flush().await.unwrap();
    let max = sampler.await.unwrap();
    assert!(
        max <= budget.memory_limit(),
        "peak {max} over {}",
        budget.memory_limit()
    );
    for b in [0u64, 100, 511] {
        let got = read_bytes(&store, b * bs + 7, BS).await;
        assert_eq!(got, pattern(BS as usize, b as u8), "block {b}");
    }
    assert!(budget.used_bytes() <= budget.memory_limit());
}

#[tokio::test]
async fn reading_more_than_the_budget_evicts_least_recently_used() {
    let mem = Arc::new(MemoryStore::new());
    let bs = u64::from(BS);
    for b in 0..64 {
        mem.insert(&key(b), Bytes::from(pattern(BS as usize, b as u8)));
    }
    let budget = CacheBudget::new(8 * bs, 4 * bs);
    let store = open_with(&mem, config(BS, 64 * bs), Arc::clone(&budget)).await;
    // random-ish order so read-ahead stays off
    for b in (0..64u64).map(|i| (i * 37) % 64) {
        assert_eq!(
            read_bytes(&store, b * bs, BS).await,
            pattern(BS as usize, b as u8)
        );
        assert!(budget.used_bytes() <= budget.memory_limit(), "{budget:?}");
    }
    assert!(store.stats().cached_blocks <= 8);
    let before = mem.gets();
    let last = (63 * 37) % 64;
    read_bytes(&store, last * bs, BS).await;
    assert_eq!(mem.gets(), before, "the most recent block is still cached");
    read_bytes(&store, 0, BS).await;
    assert_eq!(mem.gets(), before + 1, "the oldest block was evicted");
}

#[tokio::test]
async fn two_exports_share_one_budget() {
    let mem = Arc::new(MemoryStore::new());
    let bs = u64::from(BS);
    let budget = CacheBudget::new(8 * bs, 4 * bs);
    let a = open_with(&mem, config(BS, 64 * bs), Arc::clone(&budget)).await;
    let mut cfg = config(BS, 64 * bs);
    cfg.prefix = "u/".into();
    let b = open_with(&mem, cfg, Arc::clone(&budget)).await;
    for i in 0..32u64 {
        let s = if i % 2 == 0 { &a } else { &b };
        s.write(i * bs, Bytes::from(pattern(BS as usize, i as u8)), false)
            .await
            .unwrap();
        assert!(budget.used_bytes() <= budget.memory_limit(), "{budget:?}");
    }
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(read_bytes(&a, 30 * bs, BS).await, pattern(BS as usize, 30));
    assert_eq!(read_bytes(&b, 31 * bs, BS).await, pattern(BS as usize, 31));
}

#[tokio::test]
async fn the_dirty_limit_counts_written_pages_not_whole_blocks() {
    let mem = Arc::new(MemoryStore::new());
    let bs = 32 * u64::from(BS); // 128 KiB blocks, 32 pages each
    let budget = CacheBudget::new(64 * bs, 64 * u64::from(BS));
    let store = open_with(&mem, config(bs as u32, 64 * bs), Arc::clone(&budget)).await;
    store.set_write_back_age(Duration::from_secs(3600));
    for b in 0..16u64 {
        // one 4 KiB page in each of 16 blocks, twice: the second write is free
        for _ in 0..2 {
            let data = Bytes::from(pattern(BS as usize, b as u8));
            store.write(b * bs + 8192, data, false).await.unwrap();
        }
    }
    assert_eq!(store.dirty_bytes(), 16 * u64::from(BS));
    assert_eq!(budget.dirty_bytes(), 16 * u64::from(BS));
    // straddling a page edge dirties two pages
    store
        .write(20 * bs + 4000, Bytes::from(pattern(200, 1)), false)
        .await
        .unwrap();
    assert_eq!(store.dirty_bytes(), 18 * u64::from(BS));
    store.flush().await.unwrap();
    assert_eq!((store.dirty_bytes(), budget.dirty_bytes()), (0, 0));
}

//! Zero blocks are never stored: zero writes, TRIM and WRITE_ZEROES become DELETEs or nothing;
//! BLOCK_STATUS comes from the presence map.

use super::*;

fn all_stored_blocks_non_zero(mem: &MemoryStore) {
    for k in mem.keys().iter().filter(|k| *k != "t/nbd-s3.json") {
        let v = mem.peek(k).unwrap();
        assert!(v.iter().any(|b| *b != 0), "{k} was stored as zeros");
    }
}

#[tokio::test]
async fn zeroing_whole_blocks_deletes_and_never_puts_zeros() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    let bs = u64::from(BS);
    store
        .write(0, Bytes::from(pattern(4 * BS as usize, 1)), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    mem.reset_counts();
    store
        .write(0, Bytes::from(vec![0u8; BS as usize]), false)
        .await
        .unwrap(); // zero data
    store.trim(bs, BS, false).await.unwrap();
    store.write_zeroes(2 * bs, BS, false).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!((mem.puts(), mem.deletes()), (0, 3));
    assert_eq!(
        mem.keys(),
        vec!["t/0000000000000003".to_string(), "t/nbd-s3.json".into()]
    );
    assert_eq!(
        read_bytes(&store, 0, 3 * BS).await,
        vec![0; 3 * BS as usize]
    );
    assert_eq!(mem.gets(), 0);
}

#[tokio::test]
async fn zeroing_absent_blocks_costs_nothing() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    mem.reset_counts();
    store.trim(0, 16 * BS, false).await.unwrap();
    store.write_zeroes(100, 5000, true).await.unwrap();
    store
        .write(7, Bytes::from(vec![0u8; 9000]), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(
        mem.counts().puts + mem.counts().deletes + mem.counts().gets,
        0
    );
    assert_eq!(store.dirty_bytes(), 0);
}

#[tokio::test]
async fn partial_zeroing_zeroes_in_place_and_deletes_when_nothing_is_left() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    store
        .write(100, Bytes::from(pattern(200, 1)), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    store.trim(150, 10, false).await.unwrap();
    let got = read_bytes(&store, 100, 200).await;
    let mut expect = pattern(200, 1);
    expect[50..60].fill(0);
    assert_eq!(got, expect);
    store.flush().await.unwrap();
    assert_eq!(&mem.peek(&key(0)).unwrap()[100..300], &expect[..]);
    mem.reset_counts();
    store.write_zeroes(0, 150, false).await.unwrap();
    store.trim(160, 500, false).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(
        (mem.puts(), mem.deletes()),
        (0, 1),
        "the now-zero block is deleted"
    );
    assert!(mem.peek(&key(0)).is_none());
    all_stored_blocks_non_zero(&mem);
}

#[tokio::test]
async fn data_written_then_trimmed_before_write_back_needs_no_s3_call() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    store.set_write_back_age(Duration::from_secs(3600));
    mem.reset_counts();
    store
        .write(10, Bytes::from(pattern(10, 1)), false)
        .await
        .unwrap();
    store.trim(0, BS, false).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(mem.counts().puts + mem.counts().deletes, 0);
}

#[tokio::test]
async fn block_status_merges_runs_from_the_presence_map() {
    let mem = Arc::new(MemoryStore::new());
    for b in [1u64, 2, 5] {
        mem.insert(&key(b), Bytes::from(pattern(BS as usize, 1)));
    }
    mem.insert("t/not-a-block", Bytes::from_static(b"x"));
    let store = open(&mem, 8).await;
    let hole = |len| StatusExtent {
        len,
        allocation: Allocation::Hole,
    };
    let data = |len| StatusExtent {
        len,
        allocation: Allocation::Data,
    };
    assert_eq!(
        store.block_status(0, 8 * BS),
        vec![hole(BS), data(2 * BS), hole(2 * BS), data(BS), hole(2 * BS)]
    );
    assert_eq!(store.block_status(u64::from(BS) + 10, 100), vec![data(100)]);
    assert_eq!(
        store.block_status(2 * u64::from(BS) - 5, 10),
        vec![data(10)]
    );
    assert_eq!(
        store.block_status(3 * u64::from(BS) - 5, 10),
        vec![data(5), hole(5)]
    );
    store.set_write_back_age(Duration::from_secs(3600));
    store
        .write(7 * u64::from(BS) + 3, Bytes::from_static(b"dirty"), false)
        .await
        .unwrap();
    store.trim(u64::from(BS), BS, false).await.unwrap();
    assert_eq!(
        store.block_status(0, 8 * BS),
        vec![
            hole(2 * BS),
            data(BS),
            hole(2 * BS),
            data(BS),
            hole(BS),
            data(BS)
        ]
    );
    assert_eq!(mem.gets(), 0, "block status never reads objects");
}

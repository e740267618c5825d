//! Whole-block writes from handed-over buffers (`write_blocks`): same results as copying
//! writes, in place when the cached buffer is unshared, zero blocks become deletes, and
//! anything unaligned falls back to the copying path.

use super::*;

fn boxed(len: usize, seed: u8) -> Box<[u8]> {
    pattern(len, seed).into_boxed_slice()
}

#[tokio::test]
async fn whole_blocks_are_cached_stored_and_read_back() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    let bs = BS as usize;
    let blocks = vec![boxed(bs, 1), boxed(bs, 2), boxed(bs, 3)];
    let expect: Vec<u8> = blocks.concat();
    store
        .write_blocks(2 * u64::from(BS), blocks, false)
        .await
        .unwrap();
    assert_eq!(read_bytes(&store, 2 * u64::from(BS), 3 * BS).await, expect);
    store.flush().await.unwrap();
    assert_eq!(mem.peek(&key(3)).unwrap()[..], expect[bs..2 * bs]);
    // Rewrite the cached blocks (buffers swapped in place), one of them all zeros.
    let again = vec![boxed(bs, 7), vec![0u8; bs].into_boxed_slice()];
    store
        .write_blocks(2 * u64::from(BS), again, true)
        .await
        .unwrap();
    assert_eq!(mem.peek(&key(2)).unwrap()[..], pattern(bs, 7)[..]);
    assert!(mem.peek(&key(3)).is_none(), "a zero block is deleted");
    assert_eq!(mem.peek(&key(4)).unwrap()[..], expect[2 * bs..]);
    let mut want = pattern(bs, 7);
    want.extend(vec![0u8; bs]);
    want.extend_from_slice(&expect[2 * bs..]);
    assert_eq!(read_bytes(&store, 2 * u64::from(BS), 3 * BS).await, want);
}

#[tokio::test]
async fn a_block_shared_with_a_put_in_flight_is_replaced_not_changed() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 4).await;
    let bs = BS as usize;
    mem.pause();
    // A whole block is stored at once: its PUT now holds the buffer.
    store
        .write_blocks(0, vec![boxed(bs, 1)], false)
        .await
        .unwrap();
    eventually("the PUT reaches the store", || mem.waiting() == 1).await;
    store
        .write_blocks(0, vec![boxed(bs, 2)], false)
        .await
        .unwrap();
    assert!(read_bytes(&store, 0, BS).await == pattern(bs, 2));
    mem.resume();
    store.flush().await.unwrap();
    assert!(
        mem.peek(&key(0)).unwrap()[..] == pattern(bs, 2)[..],
        "the later write is stored"
    );
}

#[tokio::test]
async fn unaligned_blocks_fall_back_to_the_copying_write() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 4).await;
    let bs = BS as usize;
    store
        .write_blocks(10, vec![boxed(bs, 5)], false)
        .await
        .unwrap();
    assert_eq!(read_bytes(&store, 10, BS).await, pattern(bs, 5));
    store
        .write_blocks(0, vec![boxed(100, 6)], false)
        .await
        .unwrap();
    assert_eq!(read_bytes(&store, 0, 100).await, pattern(100, 6));
}

#[tokio::test]
async fn finished_blocks_share_a_few_puts_until_a_flush_asks_for_all() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 64).await;
    let bs = BS as usize;
    mem.pause();
    let blocks: Vec<Box<[u8]>> = (0..20).map(|i| boxed(bs, i)).collect();
    store.write_blocks(0, blocks, false).await.unwrap();
    eventually("quiet PUTs reach the store", || mem.waiting() == 8).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        mem.waiting(),
        8,
        "below half the dirty limit, 8 PUTs at most"
    );
    let flushing = {
        let s = Arc::clone(&store);
        tokio::spawn(async move { s.flush().await })
    };
    eventually("FLUSH sends the rest at once", || mem.waiting() == 20).await;
    mem.resume();
    flushing.await.unwrap().unwrap();
    for i in 0..20u8 {
        assert!(mem.peek(&key(u64::from(i))).unwrap()[..] == pattern(bs, i)[..]);
    }
}

/// A fenced export (its lease in doubt) refuses whole-block writes like every other write:
/// the client gets EIO and nothing reaches the cache.
#[tokio::test]
async fn a_closed_write_gate_refuses_whole_block_writes() {
    #[derive(Debug)]
    struct Closed;
    impl WriteGate for Closed {
        fn check(&self) -> Result<(), String> {
            Err("lease lost".into())
        }
    }
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    store.set_write_gate(Arc::new(Closed));
    let err = store
        .write_blocks(0, vec![boxed(BS as usize, 1)], false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    assert_eq!(store.dirty_bytes(), 0, "a refused write reached the cache");
}

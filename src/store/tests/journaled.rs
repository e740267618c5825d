//! `durability = "local"`: FLUSH waits for the journal only, write-back goes epoch by epoch,
//! a block rewritten in a later epoch keeps its earlier version, the journal is replayed at
//! open.

use super::*;
use crate::journal::{self, Entry, Journal, Space};

fn journaled(dir: &std::path::Path, blocks: u64) -> BlockStoreConfig {
    BlockStoreConfig {
        journal: Some(JournalSpec {
            dir: dir.to_path_buf(),
            space: Space::new(64 << 20),
            replay: true,
        }),
        ..config(BS, blocks * u64::from(BS))
    }
}

#[tokio::test]
async fn flush_returns_once_journaled_while_s3_stalls() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&mem, journaled(dir.path(), 8), big_budget()).await;
    mem.pause();
    store
        .write(0, Bytes::from(pattern(BS as usize, 1)), false)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), store.flush())
        .await
        .expect("FLUSH does not wait for S3")
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        store.write(BS.into(), Bytes::from(pattern(10, 2)), true),
    )
    .await
    .expect("FUA does not wait for S3")
    .unwrap();
    assert!(mem.peek(&key(0)).is_none());
    let scanned = journal::scan(dir.path()).unwrap();
    assert_eq!(scanned.records.len(), 3, "write, flush, FUA write");
    mem.resume();
    store.shutdown_flush(None).await.unwrap();
    assert_eq!(
        &mem.peek(&key(0)).unwrap()[..],
        &pattern(BS as usize, 1)[..]
    );
}

#[tokio::test]
async fn a_later_epoch_is_uploaded_only_after_the_earlier_one_and_keeps_its_version() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&mem, journaled(dir.path(), 8), big_budget()).await;
    let bs = u64::from(BS);
    let v1 = pattern(BS as usize, 1);
    let v2 = pattern(BS as usize, 2);
    mem.pause();
    // Epoch 1: blocks 0 and 1. Epoch 2: blocks 1 (again) and 2.
    store
        .write(0, Bytes::from(v1.clone()), false)
        .await
        .unwrap();
    store
        .write(bs, Bytes::from(v1.clone()), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    store
        .write(bs, Bytes::from(v2.clone()), false)
        .await
        .unwrap();
    store
        .write(2 * bs, Bytes::from(v2.clone()), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    let s = Arc::clone(&store);
    let drain = tokio::spawn(async move { s.shutdown_flush(None).await });
    eventually("epoch 1's two PUTs are in flight", || mem.waiting() == 2).await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(
            mem.waiting(),
            2,
            "an epoch-2 PUT started before epoch 1 was stored"
        );
    }
    mem.resume();
    drain.await.unwrap().unwrap();
    assert_eq!(&mem.peek(&key(0)).unwrap()[..], &v1[..]);
    assert_eq!(&mem.peek(&key(1)).unwrap()[..], &v2[..]);
    assert_eq!(&mem.peek(&key(2)).unwrap()[..], &v2[..]);
    assert_eq!(
        mem.puts(),
        4,
        "block 1 stored twice: its epoch-1 version, then epoch 2's"
    );
    assert_eq!(read_bytes(&store, bs, BS).await, v2);
    assert_eq!(store.dirty_bytes(), 0);
}

#[tokio::test]
async fn a_journal_left_behind_is_replayed_and_stored_before_the_store_opens() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let bs = u64::from(BS);
    {
        let j = Journal::create(dir.path(), 0, Space::new(64 << 20)).unwrap();
        let a = pattern(100, 7);
        let entries = [
            Entry::Write {
                offset: 10,
                data: a.clone(),
            },
            Entry::Flush,
            Entry::Zero {
                offset: 10,
                len: 50,
            },
            Entry::Write {
                offset: 3 * bs,
                data: a,
            },
            Entry::Flush,
        ];
        for e in &entries {
            if matches!(e, Entry::Flush) {
                let p = j.mark_flush(1);
                j.sync(p).await.unwrap();
                continue;
            }
            let kind = e.as_kind();
            let room = j.reserve(kind.encoded_len() as u64, || {}).await;
            j.append(kind, room, 1);
        }
        // A torn record at the end (a write cut short by the crash).
        let p = j.position();
        j.sync(p).await.unwrap();
    }
    let files = journal::scan(dir.path()).unwrap().files;
    let last = files.last().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    std::io::Write::write_all(&mut f, &journal::record::MAGIC).unwrap();
    drop(f);

    let store = open_with(&mem, journaled(dir.path(), 8), big_budget()).await;
    let mut want = vec![0u8; 110];
    want[60..110].copy_from_slice(&pattern(100, 7)[50..]);
    assert_eq!(
        &mem.peek(&key(0)).unwrap()[..110],
        &want[..],
        "stored before open returned"
    );
    assert_eq!(&mem.peek(&key(3)).unwrap()[..100], &pattern(100, 7)[..]);
    assert_eq!(read_bytes(&store, 0, 110).await, want);
    let left = journal::scan(dir.path()).unwrap();
    assert!(
        left.records.is_empty() && left.torn.is_none(),
        "old segments deleted: {left:?}"
    );
    // New changes are journaled again.
    store
        .write(0, Bytes::from(pattern(10, 3)), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(journal::scan(dir.path()).unwrap().records.len(), 2);
}

#[tokio::test]
async fn a_snapshot_holds_data_flushed_only_to_the_journal() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&mem, journaled(dir.path(), 8), big_budget()).await;
    store.set_write_back_age(Duration::from_secs(3600));
    let data = pattern(100, 5);
    store
        .write(10, Bytes::from(data.clone()), false)
        .await
        .unwrap();
    mem.pause();
    store.flush().await.unwrap(); // journaled; its upload is held
    let s = Arc::clone(&store);
    let create = tokio::spawn(async move { s.create_snapshot("s").await });
    eventually("the upload is in flight", || mem.waiting() >= 1).await;
    assert!(mem.peek(&key(0)).is_none(), "journaled, not yet uploaded");
    mem.resume();
    create.await.unwrap().expect("create");
    store
        .write(10, Bytes::from(pattern(100, 6)), false)
        .await
        .unwrap();
    let view = store.snapshot_view("s").expect("view");
    assert_eq!(read_bytes(&view, 10, 100).await, data);
}

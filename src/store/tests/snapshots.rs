//! Snapshot steps against awkward timing: a manifest write that landed without a reply, a
//! block GET still in flight across a rollback, an object missing under a layer, writes
//! during the snapshot's flush.

use super::*;
use crate::backend::ETag;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::watch;

/// A conditional store that can apply the next conditional manifest PUT and then report a
/// failure (a lost reply, or the lease fence giving up on a PUT still in flight), and can
/// hold block GETs (not manifest ones) at a gate.
#[derive(Debug)]
struct LostReply {
    mem: Arc<MemoryStore>,
    armed: AtomicBool,
    hold_gets: watch::Sender<bool>,
    held: AtomicU64,
}

#[async_trait::async_trait]
impl crate::backend::ObjectStore for LostReply {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        let mut rx = self.hold_gets.subscribe();
        if *rx.borrow() && !key.ends_with("nbd-s3.json") {
            self.held.fetch_add(1, Ordering::SeqCst);
            // The sender lives in `self`, so this ends only when the gate opens.
            let _ = rx.wait_for(|hold| !*hold).await;
            self.held.fetch_sub(1, Ordering::SeqCst);
        }
        self.mem.get(key).await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.mem.put(key, Bytes::copy_from_slice(&data)).await
    }
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.mem.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.mem.list(prefix).await
    }
    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        self.mem.get_with_etag(key).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        self.mem.put_if_absent(key, data).await
    }
    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        let done = self.mem.put_if_match(key, data, etag).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            return Err(BackendError::Permanent("reply lost".into()));
        }
        Ok(done)
    }
}

async fn open_lost_reply() -> (Arc<MemoryStore>, Arc<LostReply>, Arc<BlockStore>) {
    let mem = Arc::new(MemoryStore::new());
    let backend = Arc::new(LostReply {
        mem: Arc::clone(&mem),
        armed: AtomicBool::new(false),
        hold_gets: watch::channel(false).0,
        held: AtomicU64::new(0),
    });
    let objects: DynObjectStore = backend.clone();
    let store = BlockStore::open(objects, config(BS, 16 * u64::from(BS)), big_budget())
        .await
        .expect("open");
    (mem, backend, store)
}

/// The head layer S3's manifest names, and the one this store writes to.
async fn heads(mem: &Arc<MemoryStore>, store: &BlockStore) -> (u64, u64) {
    let objects: DynObjectStore = mem.clone();
    let (m, _) = manifest::read(&objects, "t/").await.expect("manifest");
    (m.head(), store.inner.objects.layers().head())
}

#[tokio::test]
async fn a_create_whose_manifest_write_landed_without_a_reply_takes_effect() {
    let (mem, backend, store) = open_lost_reply().await;
    backend.armed.store(true, Ordering::SeqCst);
    store
        .create_snapshot("s")
        .await
        .expect("create settles as done");
    let (in_s3, in_memory) = heads(&mem, &store).await;
    assert_eq!(in_s3, in_memory, "writes must go to the head S3 names");
    assert_eq!(store.snapshots().await.len(), 1);
    // A second create sees the same state in S3 and in memory.
    store.create_snapshot("t").await.expect("second create");
}

#[tokio::test]
async fn a_rollback_whose_manifest_write_landed_without_a_reply_takes_effect() {
    let (mem, backend, store) = open_lost_reply().await;
    store.create_snapshot("s").await.expect("create");
    backend.armed.store(true, Ordering::SeqCst);
    store.rollback("s").await.expect("rollback settles as done");
    let (in_s3, in_memory) = heads(&mem, &store).await;
    assert_eq!(in_s3, in_memory, "writes must go to the head S3 names");
}

#[tokio::test]
async fn writes_go_on_while_snapshot_create_flushes_what_was_dirty() {
    let mem = Arc::new(MemoryStore::new());
    let store = open(&mem, 16).await;
    store.set_write_back_age(Duration::from_secs(3600));
    let block = BS as usize;
    store
        .write(0, Bytes::from(pattern(block, 1)), false)
        .await
        .expect("write");
    mem.pause();
    let s = Arc::clone(&store);
    let create = tokio::spawn(async move { s.create_snapshot("s").await });
    eventually("the dirty block's PUT is in flight", || mem.waiting() == 1).await;
    // A whole-block write needs no GET: only the snapshot's change barrier could hold it.
    let write = store.write(2 * u64::from(BS), Bytes::from(pattern(block, 2)), false);
    tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("a write waited for the snapshot's flush")
        .expect("write");
    assert!(!create.is_finished(), "create returned before its flush");
    mem.resume();
    create.await.expect("join").expect("create");
    assert_eq!(store.dirty_bytes(), 0, "the snapshot holds both blocks");
}

#[tokio::test]
async fn a_get_in_flight_across_a_rollback_changes_nothing_after_it() {
    let (_mem, backend, store) = open_lost_reply().await;
    let block = BS as usize;
    let before = pattern(block, 1);
    store
        .write(0, Bytes::from(before.clone()), false)
        .await
        .expect("write");
    store.create_snapshot("s").await.expect("create");
    store
        .write(0, Bytes::from(pattern(block, 2)), false)
        .await
        .expect("overwrite");
    store.flush().await.expect("flush");
    store.inner.cache.drop_clean();
    // A read (as read-ahead for a client that just left) whose GET of the head's object is
    // still in flight while the rollback runs and deletes that object.
    backend.hold_gets.send_replace(true);
    let s = Arc::clone(&store);
    let stale = tokio::spawn(async move { s.read(0, BS).await });
    eventually("the GET is in flight", || {
        backend.held.load(Ordering::SeqCst) == 1
    })
    .await;
    store.rollback("s").await.expect("rollback");
    backend.hold_gets.send_replace(false);
    let _ = stale.await.expect("join");
    let now = store.read(0, BS).await.expect("read after rollback");
    assert_eq!(
        flatten(&now),
        before,
        "the rolled-back export reads the snapshot"
    );
}

#[tokio::test]
async fn a_block_object_missing_under_a_layer_reads_as_eio_not_zeros() {
    let (mem, _backend, store) = open_lost_reply().await;
    store
        .write(0, Bytes::from(pattern(BS as usize, 1)), false)
        .await
        .expect("write");
    store.create_snapshot("s").await.expect("create");
    store.inner.cache.drop_clean();
    let held: Vec<String> = mem
        .keys()
        .into_iter()
        .filter(|k| !k.ends_with(".json"))
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    crate::backend::ObjectStore::delete(&*mem, &held[0])
        .await
        .expect("delete behind the daemon's back");
    assert!(store.read(0, BS).await.is_err(), "zeros where data was");
}

#[tokio::test]
async fn layers_no_snapshot_reads_and_holding_nothing_leave_the_manifest() {
    let (mem, _backend, store) = open_lost_reply().await;
    let objects: DynObjectStore = mem.clone();
    let block = |v: u8| Bytes::from(vec![v; BS as usize]);
    store.write(0, block(1), true).await.expect("write");
    store.create_snapshot("s").await.expect("create");
    // Each rollback starts a new head and leaves the old one (emptied by its collect).
    for round in 2..8u8 {
        store.write(0, block(round), true).await.expect("write");
        store.rollback("s").await.expect("rollback");
        let (m, _) = manifest::read(&objects, "t/").await.expect("manifest");
        assert!(
            m.layers.len() <= 3,
            "round {round}: the chain grows with every rollback: {:?}",
            m.layers
        );
        let got = store.read(0, BS).await.expect("read");
        assert_eq!(got, vec![Extent::Data(block(1))], "round {round}");
    }
    // A deleted snapshot's layer goes once nothing reads it and it is empty.
    store.write(0, block(9), true).await.expect("write");
    store.create_snapshot("t").await.expect("create t");
    store.write(0, block(10), true).await.expect("write");
    store.delete_snapshot("s").await.expect("delete s");
    store.delete_snapshot("t").await.expect("delete t");
    store.create_snapshot("u").await.expect("create u");
    let (m, _) = manifest::read(&objects, "t/").await.expect("manifest");
    assert!(m.layers.len() <= 3, "{:?}", m.layers);
    assert_eq!(
        store.inner.objects.layers().chain().len(),
        m.layers.len().min(3)
    );
    let got = store.read(0, BS).await.expect("read");
    assert_eq!(got, vec![Extent::Data(block(10))]);
    // What S3 says reads the same after a reopen.
    drop(store);
    let reopened = BlockStore::open(objects, config(BS, 16 * u64::from(BS)), big_budget())
        .await
        .expect("reopen");
    let got = reopened.read(0, BS).await.expect("read");
    assert_eq!(got, vec![Extent::Data(block(10))]);
    let u = reopened.snapshot_view("u").expect("view u");
    assert_eq!(
        u.read(0, BS).await.expect("read u"),
        vec![Extent::Data(block(10))]
    );
}

//! Export life cycle on in-memory stores: removal keeps dirty data until S3 takes it,
//! attachments across versions, leases (plain stores, taken on attach, loss, release when
//! idle and on removal, the cache re-read after another daemon held the export).

use super::*;
use crate::backend::memory::MemoryStore;
use crate::backend::{BackendError, DynObjectStore};
use crate::lease::{LeaseError, LeaseManager};
use crate::store::CacheBudget;
use crate::store::StoreError;
use crate::test_support::wait_until;
use std::time::Duration;

/// Every bucket is the same in-memory store, so the test can look inside.
struct One(Arc<MemoryStore>);

impl BucketSource for One {
    fn bucket(&self, _bucket: &str) -> Result<DynObjectStore, BackendError> {
        Ok(Arc::clone(&self.0) as DynObjectStore)
    }
}

fn cfg() -> ExportConfig {
    ExportConfig {
        name: "a".into(),
        size: 1 << 20,
        bucket: "nbd".into(),
        prefix: "a/".into(),
        block_size: 4096,
        read_only: false,
        description: None,
        allow: None,
        lease: crate::config::LeaseMode::Off,
        codec: Default::default(),
        base: None,
        auto_snapshots: None,
        durability: crate::config::Durability::S3,
    }
}

#[tokio::test]
async fn removed_export_is_kept_until_s3_takes_its_data() {
    let mem = Arc::new(MemoryStore::new());
    let budget = CacheBudget::new(64 << 20, 32 << 20);
    let ctx = OpenContext {
        budget,
        flush_timeout: Duration::from_millis(50),
        leases: LeaseManager::new(),
        manifest_turn: Default::default(),
        journal: None,
    };
    let export = open_export(&cfg(), &One(Arc::clone(&mem)), &ctx).await;
    let store = Arc::clone(export.store().expect("store opens"));
    mem.fail_next_permanent(u64::MAX);
    store
        .write(0, bytes::Bytes::from(vec![7u8; 4096]), false)
        .await
        .expect("write lands in the cache");
    drop(store);
    let registry = Registry::new();
    registry.retire(export);
    let puts = mem.puts();
    wait_until("repeated failed flush attempts", || mem.puts() >= puts + 3).await;
    assert_eq!(
        registry.draining().len(),
        1,
        "removed export dropped with dirty data"
    );
    mem.fail_next_permanent(0);
    wait_until("the block in S3", || {
        mem.peek("a/0000000000000000").is_some()
    })
    .await;
    wait_until("the export released", || registry.draining().is_empty()).await;
}

fn leased(ttl: Duration) -> ExportConfig {
    ExportConfig {
        lease: LeaseMode::On { ttl },
        base: None,
        auto_snapshots: None,
        durability: crate::config::Durability::S3,
        ..cfg()
    }
}

fn ctx() -> OpenContext {
    OpenContext {
        budget: CacheBudget::new(64 << 20, 32 << 20),
        flush_timeout: Duration::from_millis(200),
        leases: LeaseManager::new(),
        manifest_turn: Default::default(),
        journal: None,
    }
}

/// A store with no conditional writes at all (the trait's defaults).
#[derive(Debug, Default)]
struct Plain(MemoryStore);

#[async_trait::async_trait]
impl crate::backend::ObjectStore for Plain {
    async fn get(&self, key: &str) -> Result<Option<bytes::Bytes>, BackendError> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), BackendError> {
        self.0.put(key, data).await
    }
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.0.list(prefix).await
    }
}

struct PlainSource(Arc<Plain>);

impl BucketSource for PlainSource {
    fn bucket(&self, _bucket: &str) -> Result<DynObjectStore, BackendError> {
        Ok(Arc::clone(&self.0) as DynObjectStore)
    }
}

#[tokio::test]
async fn store_without_conditional_writes_needs_lease_off() {
    let src = PlainSource(Arc::default());
    let refused = open_export(&leased(Duration::from_secs(30)), &src, &ctx()).await;
    let reason = refused
        .refusal()
        .expect("leased export on a plain store refused");
    assert!(
        matches!(reason, Refusal::NoConditionalWrites { .. }),
        "{reason:?}"
    );
    let msg = reason.to_string();
    assert!(msg.contains("lease = \"off\""), "{msg}");
    assert_eq!(
        reason.retry(),
        Retry::Never,
        "an admin must act; do not spin"
    );
    assert_eq!(refused.reopen_rule(), None);
    let off = open_export(&cfg(), &src, &ctx()).await;
    assert!(off.is_serving() && off.lease().is_none());
    let mut ro = leased(Duration::from_secs(30));
    ro.read_only = true;
    let ro = open_export(&ro, &src, &ctx()).await;
    assert!(ro.is_serving(), "read-only exports need no lease");
}

async fn bytes_at(store: &crate::store::BlockStore, offset: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for e in store.read(offset, len).await.expect("read") {
        match e {
            crate::store::Extent::Data(b) => out.extend_from_slice(&b),
            crate::store::Extent::Zero(n) => out.resize(out.len() + n as usize, 0),
        }
    }
    out
}

fn lock_record(mem: &MemoryStore) -> Option<crate::lease::record::LeaseRecord> {
    crate::lease::record::LeaseRecord::parse(&mem.peek("a/nbd-s3.lock")?)
}

fn other_daemon() -> crate::lease::record::Identity {
    crate::lease::record::Identity {
        owner: "other".into(),
        host: "elsewhere".into(),
        pid: 1,
        boot_id: None,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn lease_lost_to_another_daemon_fails_writes_and_removal_releases_it() {
    let mem = Arc::new(MemoryStore::new());
    let src = One(Arc::clone(&mem));
    let ttl = Duration::from_secs(3);
    let export = open_export(&leased(ttl), &src, &ctx()).await;
    assert!(
        lock_record(&mem).is_none(),
        "an export without clients took its lease"
    );
    let store = Arc::clone(export.store().expect("leased export opens"));
    let client = export.attach_client().await.expect("lease free");
    store
        .write(0, bytes::Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert!(lock_record(&mem).is_some_and(|r| !r.released));

    // Another daemon takes the lease (as after a partition): the next renewal sees it.
    let theirs = crate::lease::record::LeaseRecord::new(&other_daemon(), now_ms(), ttl);
    mem.insert("a/nbd-s3.lock", theirs.to_bytes());
    wait_until("the lease to be lost", || {
        export.lease().is_some_and(|l| l.is_lost())
    })
    .await;
    // Lost: reopened (so new clients hear who holds it) only once nobody uses this store.
    assert_eq!(export.reopen_rule(), None, "a client still uses the store");
    let refused = export
        .attach_client()
        .await
        .expect_err("attach to a lost lease");
    assert!(refused.to_string().contains("elsewhere"), "{refused}");
    drop(client);
    assert_eq!(export.reopen_rule(), Some(Retry::lease_held(ttl)));
    let err = store
        .write(0, bytes::Bytes::from(vec![2u8; 4096]), false)
        .await;
    let err = err.expect_err("write after losing the lease");
    assert_eq!(err.kind(), crate::store::ErrorKind::Fenced, "{err}");
    assert!(err.to_string().contains("elsewhere"), "{err}");
    drop((store, export));

    // Removal of an export we still hold releases the lease once its store is gone.
    let mem = Arc::new(MemoryStore::new());
    let export = open_export(&leased(ttl), &One(Arc::clone(&mem)), &ctx()).await;
    let client = export.attach_client().await.expect("lease free");
    assert!(lock_record(&mem).is_some_and(|r| !r.released));
    Registry::new().retire(export);
    drop(client);
    wait_until("the lease released", || {
        lock_record(&mem).is_some_and(|r| r.released)
    })
    .await;
}

#[tokio::test]
async fn idle_export_stores_its_data_then_gives_the_lease_up_and_rereads_after_others() {
    let mem = Arc::new(MemoryStore::new());
    let ttl = Duration::from_secs(3);
    let export = open_export(&leased(ttl), &One(Arc::clone(&mem)), &ctx()).await;
    let store = Arc::clone(export.store().expect("opens"));
    store.set_write_back_age(Duration::from_secs(3600));
    let client = export.attach_client().await.expect("lease free");
    store
        .write(0, bytes::Bytes::from(vec![3u8; 100]), false)
        .await
        .unwrap();
    assert!(store.dirty_bytes() > 0);
    // The last client leaves without a FLUSH: the data is stored, then the lease given up.
    drop(client);
    wait_until("the idle export to release its lease", || {
        lock_record(&mem).is_some_and(|r| r.released)
    })
    .await;
    assert_eq!(store.dirty_bytes(), 0);
    assert_eq!(
        &mem.peek("a/0000000000000000").unwrap()[..100],
        &[3u8; 100][..]
    );
    assert!(export.lease().is_none());
    // Idle: no request at all while nothing happens.
    let quiet = mem.counts();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(mem.counts(), quiet, "an idle export made requests");

    // Back, with nobody in between: the cache is kept (no GET for the cached block).
    let client = export.attach_client().await.expect("lease free");
    let gets = mem.gets();
    assert_eq!(&bytes_at(&store, 0, 100).await[..], &[3u8; 100][..]);
    assert_eq!(
        mem.gets(),
        gets,
        "cache dropped although nobody else held the export"
    );
    drop(client);
    wait_until("released again", || {
        lock_record(&mem).is_some_and(|r| r.released)
    })
    .await;

    // Another daemon held it and wrote block 0 (and 1): the view is rebuilt from S3.
    let theirs = crate::lease::record::LeaseRecord::new(&other_daemon(), now_ms(), ttl);
    mem.insert("a/nbd-s3.lock", theirs.to_bytes());
    mem.insert("a/0000000000000000", bytes::Bytes::from(vec![9u8; 4096]));
    mem.insert("a/0000000000000001", bytes::Bytes::from(vec![8u8; 4096]));
    let released = crate::lease::record::LeaseRecord::released(&other_daemon(), now_ms());
    mem.insert("a/nbd-s3.lock", released.to_bytes());
    let _client = export
        .attach_client()
        .await
        .expect("released by the other daemon");
    assert_eq!(&bytes_at(&store, 0, 8).await[..], &[9u8; 8][..]);
    assert_eq!(&bytes_at(&store, 4096, 8).await[..], &[8u8; 8][..]);
}

#[tokio::test]
async fn attachments_are_counted_across_versions() {
    let e = Export::refused(cfg(), Refusal::Other("refused".into()));
    let a1 = e.attach();
    let grown = e.with_config(ExportConfig {
        size: 2 << 20,
        ..cfg()
    });
    let a2 = grown.attach();
    assert_eq!((e.attached(), grown.attached()), (2, 2));
    assert!(grown.same_instance(&e) && grown.size() == 2 << 20 && e.size() == 1 << 20);
    drop(a1);
    drop(a2);
    assert_eq!(e.attached(), 0);
}

#[test]
fn each_refusal_has_its_retry_rule_and_keeps_its_message() {
    let corrupt = || BackendError::Corrupt {
        key: "a/nbd-s3.lock".into(),
        reason: "crc mismatch".into(),
    };
    let torn = Refusal::lease(LeaseError::Backend(corrupt()), Duration::from_secs(30));
    assert!(matches!(
        torn,
        Refusal::Corrupt {
            step: Step::Lease,
            ..
        }
    ));
    assert_eq!(
        torn.retry(),
        Retry::Backoff,
        "a torn lease read passes by itself"
    );
    assert!(torn
        .to_string()
        .starts_with("cannot take the export lease: object a/nbd-s3.lock is corrupt"));
    let manifest = Refusal::from(StoreError::Backend(corrupt()));
    assert_eq!(manifest.retry(), Retry::Every(refusal::SLOW_RETRY));
    assert!(manifest
        .to_string()
        .starts_with("object store: object a/nbd-s3.lock"));

    let down = Refusal::from(StoreError::Backend(BackendError::Transient(
        "timeout".into(),
    )));
    assert!(matches!(
        down,
        Refusal::Unreachable {
            step: Step::Open,
            ..
        }
    ));
    assert_eq!(down.retry(), Retry::Backoff);
    let denied = Refusal::backend(Step::Bucket, BackendError::Permanent("AccessDenied".into()));
    assert!(matches!(denied, Refusal::Denied { .. }));
    assert_eq!(denied.retry(), Retry::Every(refusal::SLOW_RETRY));
    assert_eq!(
        denied.to_string(),
        "object store refused the request: AccessDenied"
    );

    let held = LeaseError::Held {
        holder: "host b (pid 7)".into(),
        bucket: "nbd".into(),
        key: "a/nbd-s3.lock".into(),
    };
    let message = held.to_string();
    let held = Refusal::lease(held, Duration::from_secs(30));
    assert_eq!(held.to_string(), message);
    assert_eq!(held.retry(), Retry::Every(Duration::from_secs(10)));

    let mismatch = Refusal::from(StoreError::BlockSizeMismatch {
        stored: 4096,
        configured: 65536,
    });
    assert_eq!(mismatch.retry(), Retry::Never);
    assert_eq!(
        mismatch.to_string(),
        "export's stored block size 4096 differs from configured block size 65536"
    );
    let refused = Export::refused(cfg(), mismatch);
    assert!(!refused.is_serving() && refused.store().is_none() && refused.lease().is_none());
    assert_eq!(refused.reopen_rule(), None, "an admin must act");
    assert_eq!(
        Export::refused(cfg(), down).reopen_rule(),
        Some(Retry::Backoff)
    );
}

#[test]
fn a_journal_is_replayed_only_when_this_host_crashed_holding_the_export() {
    use crate::lease::record::{Identity, LeaseRecord};
    let me = Identity {
        owner: "a".into(),
        host: "here".into(),
        pid: 1,
        boot_id: None,
    };
    let other = Identity {
        host: "elsewhere".into(),
        ..me.clone()
    };
    let bytes = |r: LeaseRecord| serde_json::to_vec(&r).unwrap();
    let held = bytes(LeaseRecord::new(&me, 0, Duration::from_secs(60)));
    let released = bytes(LeaseRecord::released(&me, 0));
    let taken_over = bytes(LeaseRecord::new(&other, 0, Duration::from_secs(60)));
    assert!(open::journal_applies(None, "here"), "no lease object");
    assert!(
        open::journal_applies(Some(&held), "here"),
        "crashed holding it"
    );
    assert!(
        !open::journal_applies(Some(&released), "here"),
        "released: everything was stored first"
    );
    assert!(
        !open::journal_applies(Some(&taken_over), "here"),
        "another host held it since"
    );
}

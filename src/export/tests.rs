//! Export life cycle on in-memory stores: removal keeps dirty data until S3 takes it,
//! attachments across versions, leases at open (plain stores, loss, release on removal).

use super::*;
use crate::backend::memory::MemoryStore;

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
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
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
    };
    let export = open_export(&cfg(), &One(Arc::clone(&mem)), &ctx).await;
    let store = export.store.clone().expect("store opens");
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
        ..cfg()
    }
}

fn ctx() -> OpenContext {
    OpenContext {
        budget: CacheBudget::new(64 << 20, 32 << 20),
        flush_timeout: Duration::from_millis(200),
        leases: LeaseManager::new(),
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
    let msg = refused
        .store
        .as_ref()
        .expect_err("leased export on a plain store");
    assert!(msg.contains("lease = \"off\""), "{msg}");
    assert_eq!(
        refused.retry,
        Retry::Never,
        "an admin must act; do not spin"
    );
    let off = open_export(&cfg(), &src, &ctx()).await;
    assert!(off.store.is_ok() && off.lease.is_none());
    let mut ro = leased(Duration::from_secs(30));
    ro.read_only = true;
    let ro = open_export(&ro, &src, &ctx()).await;
    assert!(ro.store.is_ok(), "read-only exports need no lease");
}

#[tokio::test]
async fn lease_lost_to_another_daemon_fails_writes_and_removal_releases_it() {
    let mem = Arc::new(MemoryStore::new());
    let src = One(Arc::clone(&mem));
    let ttl = Duration::from_secs(3);
    let export = open_export(&leased(ttl), &src, &ctx()).await;
    let store = export.store.clone().expect("leased export opens");
    store
        .write(0, bytes::Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert!(mem.peek("a/nbd-s3.lock").is_some());

    // Another daemon takes the lease (as after a partition): the next renewal sees it.
    let other = crate::lease::record::Identity {
        owner: "other".into(),
        host: "elsewhere".into(),
        pid: 1,
        boot_id: None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let theirs = crate::lease::record::LeaseRecord::new(&other, now, ttl);
    mem.insert("a/nbd-s3.lock", theirs.to_bytes());
    wait_until("the lease to be lost", || {
        export.lease.as_ref().is_some_and(|l| l.is_lost())
    })
    .await;
    let err = store
        .write(0, bytes::Bytes::from(vec![2u8; 4096]), false)
        .await;
    let err = err.expect_err("write after losing the lease");
    assert_eq!(err.errno(), 5, "{err}");
    assert!(err.to_string().contains("elsewhere"), "{err}");
    drop((store, export));

    // Removal of an export we still hold releases the lease once its store is gone.
    let mem = Arc::new(MemoryStore::new());
    let export = open_export(&leased(ttl), &One(Arc::clone(&mem)), &ctx()).await;
    assert!(mem.peek("a/nbd-s3.lock").is_some());
    Registry::new().retire(export);
    wait_until("the lease released", || mem.peek("a/nbd-s3.lock").is_none()).await;
}

#[tokio::test]
async fn attachments_are_counted_across_versions() {
    let e = Export::new(cfg(), Err("refused".into()));
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

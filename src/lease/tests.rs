//! Lease state machine on the memory store and tokio's paused clock: taking, refusing,
//! takeover (expired, unchanged for a ttl, dead pid), renewal, fencing and recovery, loss to
//! another daemon, release, and stores that ignore conditional writes.

use super::fence::FencedStore;
use super::record::{Identity, LeaseRecord};
use super::*;
use crate::backend::memory::{CarelessStore, MemoryStore};
use crate::backend::ObjectStore;
use crate::store::WriteGate;
use crate::test_support::wait_until;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};

const TTL: Duration = Duration::from_secs(3);
const KEY: &str = "vm/nbd-s3.lock";
const WALL0: u64 = 1_800_000_000_000;

/// A view of a shared store that one simulated daemon can lose contact with.
#[derive(Debug)]
struct Link {
    inner: Arc<MemoryStore>,
    down: AtomicBool,
}

impl Link {
    fn new(inner: &Arc<MemoryStore>) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::clone(inner),
            down: AtomicBool::new(false),
        })
    }
    fn check(&self) -> Result<(), BackendError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BackendError::Transient("link down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for Link {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.check()?;
        self.inner.put(key, data).await
    }
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        self.check()?;
        self.inner.get_with_etag(key).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        self.check()?;
        self.inner.put_if_absent(key, data).await
    }
    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        self.check()?;
        self.inner.put_if_match(key, data, etag).await
    }
}

fn identity(host: &str, pid: u32) -> Identity {
    Identity {
        owner: format!("{host}-{pid}"),
        host: host.into(),
        pid,
        boot_id: Some("boot".into()),
    }
}

fn manager(host: &str, pid: u32) -> Arc<LeaseManager> {
    LeaseManager::with(
        identity(host, pid),
        Clock::Virtual {
            wall0_ms: WALL0,
            mono0: Instant::now(),
        },
    )
}

fn stored(mem: &MemoryStore) -> LeaseRecord {
    LeaseRecord::parse(&mem.peek(KEY).expect("lease object")).expect("lease JSON")
}

/// A pid that surely no longer exists: a child we started and reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

async fn take(m: &LeaseManager, store: &DynObjectStore) -> Result<Arc<Lease>, LeaseError> {
    m.acquire(store, "b", "vm/", TTL).await
}

#[tokio::test(start_paused = true)]
async fn second_daemon_is_refused_naming_the_holder() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    let a = manager("alpha", 1);
    let lease = take(&a, &store).await.unwrap();
    let rec = stored(&mem);
    assert_eq!((rec.host.as_str(), rec.pid, rec.format), ("alpha", 1, 1));
    assert_eq!(rec.expires_unix_ms, WALL0 + 3000);
    assert!(
        rec.expires.starts_with("2027-01-15T08:00:03"),
        "{}",
        rec.expires
    );

    let err = take(&manager("beta", 2), &store).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LeaseError::Held { .. }), "{msg}");
    assert!(msg.contains("host alpha") && msg.contains("pid 1"), "{msg}");
    // The same daemon opening the export again shares its lease.
    assert!(Arc::ptr_eq(&lease, &take(&a, &store).await.unwrap()));
}

#[tokio::test(start_paused = true)]
async fn renewal_keeps_the_lease_and_a_live_holder_is_never_taken_over() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    let lease = take(&manager("alpha", 1), &store).await.unwrap();
    let b = manager("beta", 2);
    for _ in 0..10 {
        tokio::time::sleep(TTL).await;
        assert!(
            lease.write_deadline().is_ok(),
            "renewed lease stays writable"
        );
        assert!(take(&b, &store).await.is_err(), "live holder taken over");
    }
    assert!(stored(&mem).expires_unix_ms > WALL0 + 30_000);
}

#[tokio::test(start_paused = true)]
async fn expired_lease_is_taken_over() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    let crashed = LeaseRecord::new(&identity("gone", 7), WALL0 - 10_000, TTL);
    mem.insert(KEY, crashed.to_bytes());
    let lease = take(&manager("beta", 2), &store).await.unwrap();
    assert_eq!(stored(&mem).host, "beta");
    assert!(lease.check().is_ok());
}

#[tokio::test(start_paused = true)]
async fn lease_unchanged_for_a_ttl_is_taken_over_whatever_its_clock_says() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    // A holder whose clock runs an hour ahead, then crashed.
    let ahead = LeaseRecord::new(&identity("skewed", 7), WALL0 + 3_600_000, TTL);
    mem.insert(KEY, ahead.to_bytes());
    let b = manager("beta", 2);
    assert!(take(&b, &store).await.is_err());
    tokio::time::sleep(TTL / 2).await;
    assert!(take(&b, &store).await.is_err(), "taken before a whole ttl");
    tokio::time::sleep(TTL).await;
    take(&b, &store).await.unwrap();
    assert_eq!(stored(&mem).host, "beta");
}

#[tokio::test(start_paused = true)]
async fn dead_holder_on_this_host_is_taken_over_at_once() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    let live = LeaseRecord::new(&identity("here", 1), WALL0, TTL);
    mem.insert(KEY, live.to_bytes());
    let me = manager("here", 2);
    let err = take(&me, &store).await.unwrap_err();
    assert!(err.to_string().contains("pid 1"), "{err}");
    let dead = LeaseRecord::new(&identity("here", dead_pid()), WALL0, TTL);
    mem.insert(KEY, dead.to_bytes());
    take(&me, &store).await.unwrap();
    assert_eq!(stored(&mem).pid, 2);
    // The same pid on another host proves nothing.
    mem.insert(KEY, dead.clone().to_bytes());
    let mut elsewhere = dead;
    elsewhere.host = "there".into();
    mem.insert(KEY, elsewhere.to_bytes());
    assert!(take(&manager("here", 3), &store).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn failed_renewals_fence_before_expiry_and_recovery_unfences() {
    let mem = Arc::new(MemoryStore::new());
    let link = Link::new(&mem);
    let store: DynObjectStore = link.clone();
    let slot = Arc::new(slot::LeaseSlot::new(
        manager("alpha", 1),
        Arc::clone(&store),
        "b",
        "vm/",
        TTL,
    ));
    slot.take(no_refresh).await.unwrap();
    let lease = slot.current().expect("held");
    let fenced = FencedStore::new(Arc::clone(&store), Arc::clone(&slot));
    fenced.put("vm/0", Bytes::from_static(b"x")).await.unwrap();
    link.down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    wait_until("failed renewals to fence writes", || {
        lease.write_deadline().is_err()
    })
    .await;
    let fenced_after = started.elapsed();
    assert!(fenced_after < TTL, "fenced only after {fenced_after:?}");
    assert!(
        lease.check().is_err(),
        "clients still accepted without a valid lease"
    );
    link.down.store(false, Ordering::SeqCst);
    let put = fenced.put("vm/1", Bytes::from_static(b"y")).await;
    assert!(put.is_err(), "write-back PUT while fenced");
    assert!(mem.peek("vm/1").is_none());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        lease.write_deadline().is_ok() && lease.check().is_ok(),
        "lease re-taken after the outage"
    );
    fenced.put("vm/1", Bytes::from_static(b"y")).await.unwrap();
}

/// A 30 s S3 outage must not fence a leased export: an outage of just under two thirds
/// of the ttl (40 s of the default 60 s), starting right before a renewal was due, leaves
/// writes accepted throughout.
#[tokio::test(start_paused = true)]
async fn outage_shorter_than_two_thirds_of_the_ttl_never_fences() {
    let mem = Arc::new(MemoryStore::new());
    let link = Link::new(&mem);
    let store: DynObjectStore = link.clone();
    let lease = take(&manager("alpha", 1), &store).await.unwrap();
    let interval = TTL / RENEWALS_PER_TTL;
    tokio::time::sleep(interval - Duration::from_millis(1)).await;
    link.down.store(true, Ordering::SeqCst);
    let outage = TTL * 2 / 3 - Duration::from_millis(50);
    let until = Instant::now() + outage;
    while Instant::now() < until {
        assert!(
            lease.check().is_ok() && lease.write_deadline().is_ok(),
            "fenced {:?} into an outage of {outage:?}",
            outage - (until - Instant::now())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    link.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(interval).await;
    assert!(lease.write_deadline().is_ok(), "renewed after the outage");
}

#[tokio::test(start_paused = true)]
async fn lease_lost_to_another_daemon_stays_fenced() {
    let mem = Arc::new(MemoryStore::new());
    let link = Link::new(&mem);
    let a_store: DynObjectStore = link.clone();
    let lease = take(&manager("alpha", 1), &a_store).await.unwrap();
    let b = manager("beta", 2); // clocks in step with alpha's
    link.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    let b_store: DynObjectStore = mem.clone();
    let _b_lease = take(&b, &b_store).await.unwrap();
    link.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(TTL).await;
    assert!(lease.is_lost());
    let why = lease.check().unwrap_err();
    assert!(why.contains("host beta"), "{why}");
    assert_eq!(stored(&mem).host, "beta", "loser overwrote the winner");
    drop(lease);
    tokio::time::sleep(TTL).await;
    assert!(mem.peek(KEY).is_some(), "loser deleted the winner's lease");
}

#[tokio::test(start_paused = true)]
async fn release_leaves_a_released_record_anyone_takes_at_once() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    let lease = take(&manager("alpha", 1), &store).await.unwrap();
    assert!(lease.release().await.is_some());
    assert!(stored(&mem).released, "{:?}", stored(&mem));
    assert!(lease.check().is_err(), "released lease still writable");
    // Another daemon takes a released lease without waiting for it to expire.
    let beta = take(&manager("beta", 2), &store).await.unwrap();
    assert_eq!(stored(&mem).host, "beta");
    // Dropping the last handle releases too.
    drop(beta);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let left = stored(&mem);
    assert!(left.released && left.host == "beta", "{left:?}");
}

async fn no_refresh() -> Result<(), BackendError> {
    Ok(())
}

fn slot_of(m: &Arc<LeaseManager>, store: &DynObjectStore) -> slot::LeaseSlot {
    slot::LeaseSlot::new(Arc::clone(m), Arc::clone(store), "b", "vm/", TTL)
}

/// Takes the slot's lease, counting into `refreshes` whether the view had to be rebuilt.
async fn take_counting(
    slot: &slot::LeaseSlot,
    refreshes: &std::sync::atomic::AtomicUsize,
) -> Result<(), LeaseError> {
    slot.take(|| async {
        refreshes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn idle_slot_keeps_its_view_unless_another_daemon_held_the_export() {
    use std::sync::atomic::AtomicUsize;
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    let (alpha, beta) = (manager("alpha", 1), manager("beta", 2));
    let a = slot_of(&alpha, &store);
    let refreshes = AtomicUsize::new(0);
    // No lease object when observed (a new export) and none at the take: nobody held it.
    a.observe().await.unwrap();
    take_counting(&a, &refreshes).await.unwrap();
    assert_eq!(refreshes.load(Ordering::SeqCst), 0);
    // Held: shared, no request and no rebuild.
    let before = mem.counts();
    take_counting(&a, &refreshes).await.unwrap();
    assert_eq!(mem.counts(), before);
    // Not idle: kept.
    assert!(!a.release_if(|| false).await);
    assert!(a.current().is_some());
    // Released and taken again with nobody in between: the view is kept.
    assert!(a.release_if(|| true).await);
    assert!(a.current().is_none() && stored(&mem).released);
    take_counting(&a, &refreshes).await.unwrap();
    assert_eq!(refreshes.load(Ordering::SeqCst), 0);
    // Another daemon held it in between: rebuilt.
    assert!(a.release_if(|| true).await);
    let b = slot_of(&beta, &store);
    take_counting(&b, &AtomicUsize::new(0)).await.unwrap();
    let err = take_counting(&a, &refreshes).await.unwrap_err();
    assert!(err.to_string().contains("host beta"), "{err}");
    assert!(b.release_if(|| true).await);
    take_counting(&a, &refreshes).await.unwrap();
    assert_eq!(refreshes.load(Ordering::SeqCst), 1);
    // A rebuild that fails refuses the client and is tried again by the next one.
    assert!(a.release_if(|| true).await);
    take_counting(&b, &AtomicUsize::new(0)).await.unwrap();
    assert!(b.release_if(|| true).await);
    let failed = a
        .take(|| async { Err(BackendError::Transient("list failed".into())) })
        .await;
    assert!(failed.is_err());
    take_counting(&a, &refreshes).await.unwrap();
    assert_eq!(refreshes.load(Ordering::SeqCst), 2);
    // Without a lease held, the slot's fence is closed.
    assert!(a.release_if(|| true).await);
    assert!(a.write_deadline().is_err() && a.check().is_err());
}

/// A release whose write did not reach S3 (an outage as the last client left) leaves our
/// live record: taken again later, that record of ours proves nobody held the export in
/// between, so the view is kept; and a client arriving during the outage is admitted.
#[tokio::test(start_paused = true)]
async fn a_release_that_never_reached_s3_keeps_the_view() {
    use std::sync::atomic::AtomicUsize;
    let mem = Arc::new(MemoryStore::new());
    let link = Link::new(&mem);
    let store: DynObjectStore = link.clone();
    let a = slot_of(&manager("alpha", 1), &store);
    let refreshes = AtomicUsize::new(0);
    a.observe().await.unwrap();
    take_counting(&a, &refreshes).await.unwrap();
    link.down.store(true, Ordering::SeqCst);
    assert!(a.release_if(|| true).await);
    assert!(!stored(&mem).released, "the release reached S3");
    // Admitted while S3 is away (writes would wait for the lease).
    a.take(no_refresh)
        .await
        .expect("admitted during the outage");
    assert!(a.is_pending());
    link.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.resume().await.unwrap();
    assert!(a.release_if(|| true).await);
    take_counting(&a, &refreshes).await.unwrap();
    assert_eq!(refreshes.load(Ordering::SeqCst), 0, "view rebuilt");
}

#[tokio::test(start_paused = true)]
async fn client_admitted_during_an_outage_stores_its_writes_once_the_lease_is_taken() {
    let mem = Arc::new(MemoryStore::new());
    let link = Link::new(&mem);
    let store: DynObjectStore = link.clone();
    let beta = manager("beta", 2); // clocks in step with alpha's
    let a = slot_of(&manager("alpha", 1), &store);
    a.observe().await.unwrap();
    link.down.store(true, Ordering::SeqCst);
    // S3 away, view current (no lease object when looked): admitted, writes accepted,
    // nothing stored (no lease), until S3 answers again.
    a.take(no_refresh)
        .await
        .expect("admitted during the outage");
    assert!(a.is_pending() && a.current().is_none());
    assert!(
        a.check().is_ok(),
        "client writes refused during a short outage"
    );
    // (S3 is asked at most once a second.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.resume().await.is_err());
    assert!(a.resume().await.is_err(), "asked again at once");
    link.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.resume().await.unwrap();
    assert!(!a.is_pending() && a.current().is_some() && a.write_deadline().is_ok());
    assert_eq!(stored(&mem).host, "alpha");

    // The same while another daemon takes the export meanwhile: a conflict, never stored.
    assert!(a.release_if(|| true).await);
    link.down.store(true, Ordering::SeqCst);
    a.take(no_refresh)
        .await
        .expect("admitted during the outage");
    let b = slot_of(&beta, &(mem.clone() as DynObjectStore));
    b.take(no_refresh).await.unwrap();
    link.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let err = a.resume().await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(a.lost_reason().is_some() && a.check().is_err() && a.write_deadline().is_err());
    assert_eq!(
        stored(&mem).host,
        "beta",
        "the conflicting daemon overwrote the lease"
    );
    let refused = a.take(no_refresh).await.unwrap_err();
    assert!(matches!(refused, LeaseError::Lost(_)), "{refused}");

    // With no view known current (never observed), an outage refuses the client.
    let c = slot_of(&manager("gamma", 3), &store);
    link.down.store(true, Ordering::SeqCst);
    assert!(c.take(no_refresh).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn lease_read_mid_rewrite_is_read_again_not_taken_for_a_fault() {
    let mem = Arc::new(MemoryStore::new());
    let store: DynObjectStore = mem.clone();
    let _held = take(&manager("alpha", 1), &store).await.unwrap();
    let beta = manager("beta", 2);
    let first = take(&beta, &store).await.unwrap_err();
    assert!(matches!(first, LeaseError::Held { .. }), "{first}");
    // Two reads in a row fail their checksum, as while the holder rewrites the object.
    mem.fail_next_corrupt(2);
    let err = take(&beta, &store).await.unwrap_err();
    assert!(matches!(err, LeaseError::Held { .. }), "{err}");
    assert!(err.to_string().contains("host alpha"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn store_ignoring_conditions_is_refused_with_advice() {
    let store: DynObjectStore = Arc::new(CarelessStore::default());
    let err = take(&manager("alpha", 1), &store).await.unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("lease = \"off\""), "{err}");
}

#[tokio::test(start_paused = true)]
async fn unreachable_store_is_a_retryable_error_not_a_verdict() {
    let mem = Arc::new(MemoryStore::new());
    let link = Link::new(&mem);
    let store: DynObjectStore = link.clone();
    let m = manager("alpha", 1);
    link.down.store(true, Ordering::SeqCst);
    let err = take(&m, &store).await.unwrap_err();
    assert!(
        err.is_retryable() && matches!(err, LeaseError::Backend(_)),
        "{err}"
    );
    link.down.store(false, Ordering::SeqCst);
    take(&m, &store).await.unwrap();
}

//! Export leases: so two daemons never write one export. A writable export is served only
//! while this daemon holds `<prefix>nbd-s3.lock`, taken with a conditional write
//! (`If-None-Match: *`) and renewed every sixth of its ttl with `If-Match`. A daemon that
//! cannot renew fences the export a sixth of the ttl before the lease runs out (writes get
//! EIO, write-back stops; see [`fence`]), so a daemon taking over an expired lease never races
//! its writes; it resumes if it renews in time, and stays fenced if another daemon took over.
//!
//! - [`record`]: the lease JSON and the pure "may we take it?" decision;
//! - [`fence`]: the write gate and the fenced object store;
//! - `renew`: the renewal task and release (a released record, not a deletion);
//! - [`slot`]: an export's lease, held only while clients or dirty data need it;
//! - this file: [`LeaseManager`] (one per daemon: identity, the leases it holds, which buckets
//!   honour conditional writes) and [`Lease`] (one held lease).

pub mod fence;
pub mod record;
mod renew;
pub mod slot;

#[cfg(test)]
mod tests;

use crate::backend::conditional::supports_conditional_writes;
use crate::backend::{BackendError, DynObjectStore, ETag};
use crate::retry::Policy;
use record::{Identity, LeaseRecord, Verdict};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Renewals (and the fencing margin) come every `ttl / RENEWALS_PER_TTL`. With the default
/// 60 s lease that is every 10 s and fencing 10 s before expiry, so an S3 outage of up to
/// 40 s (ttl minus one interval minus the margin, whenever it starts) never fences an export:
/// a 30 s outage must let writes continue into the cache.
pub(crate) const RENEWALS_PER_TTL: u32 = 6;

/// Name of the lease object under the export's prefix.
pub const LEASE_NAME: &str = "nbd-s3.lock";

/// Why the lease could not be taken, and so what the daemon should do about the export.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Another live daemon holds it: refuse the export, retry slowly (it may expire).
    #[error("export is in use by {holder}; stop that daemon or wait for its lease to expire (lease object s3://{bucket}/{key})")]
    Held {
        holder: String,
        bucket: String,
        key: String,
    },
    /// The store ignores conditional writes: refuse until the admin opts out.
    #[error("bucket {bucket:?} does not honour conditional writes (If-None-Match/If-Match), so the export lease cannot protect it; if only one nbd-s3 daemon ever serves this export, set lease = \"off\" in its [[export]] section")]
    Unsupported { bucket: String },
    /// The store could not be asked (unreachable, denied): retry with backoff.
    #[error("cannot take the export lease: {0}")]
    Backend(#[from] BackendError),
    /// Another daemon took the lease from us: this export version never writes again (it is
    /// reopened once no client uses it).
    #[error("{0}")]
    Lost(String),
}

impl crate::retry::Classify for LeaseError {
    /// Only the store's own trouble is worth another try; a holder or a lost lease is not.
    fn kind(&self) -> crate::retry::Kind {
        match self {
            LeaseError::Backend(b) => b.kind(),
            _ => crate::retry::Kind::Permanent,
        }
    }
}

impl LeaseError {
    /// Whether retrying later may succeed without an admin changing anything.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, LeaseError::Unsupported { .. })
    }
}

/// Wall-clock source. Leases carry wall-clock expiries; unit tests run on tokio's paused
/// clock, so they derive wall time from it.
#[derive(Debug, Clone, Copy)]
enum Clock {
    System,
    #[cfg_attr(not(test), allow(dead_code))]
    Virtual {
        wall0_ms: u64,
        mono0: Instant,
    },
}

impl Clock {
    fn now_ms(&self) -> u64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Clock::Virtual { wall0_ms, mono0 } => {
                let ms = u64::try_from(mono0.elapsed().as_millis()).unwrap_or(u64::MAX);
                wall0_ms.saturating_add(ms)
            }
        }
    }
}

type Key = (String, String);

/// What the lease object was when this daemon took it: tells whether another daemon may have
/// changed the export since we last looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prior {
    /// No lease object (never leased, or deleted by hand or by an older daemon).
    Absent,
    /// A released record with this version.
    Released(ETag),
    /// A record of ours: our own release, or a write of ours whose reply was lost (or that
    /// was given up on); nobody else wrote the lease object since, so nobody held the export.
    Ours,
    /// Another daemon's record that was still held (taken over).
    Held,
}

/// One per daemon: who we are, the leases we hold (an export reopened by a reload shares its
/// predecessor's lease instead of fighting it), and which buckets passed the conditional-write
/// probe.
#[derive(Debug)]
pub struct LeaseManager {
    me: Identity,
    clock: Clock,
    held: parking_lot::Mutex<HashMap<Key, Weak<Lease>>>,
    /// Serialises take and release of one lease object within this process.
    locks: parking_lot::Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    conditional: parking_lot::Mutex<HashMap<String, bool>>,
    /// Other daemons' lease versions as first seen: a version unchanged for a whole ttl by our
    /// own clock is abandoned, whatever the holder's clock said.
    seen: parking_lot::Mutex<HashMap<Key, (ETag, Instant)>>,
}

impl LeaseManager {
    /// The manager of this process (fresh random owner id).
    pub fn new() -> Arc<Self> {
        Self::with(Identity::current(), Clock::System)
    }

    fn with(me: Identity, clock: Clock) -> Arc<Self> {
        Arc::new(Self {
            me,
            clock,
            held: Default::default(),
            locks: Default::default(),
            conditional: Default::default(),
            seen: Default::default(),
        })
    }

    /// Takes (or shares, if this process already holds it) the lease of the export at
    /// `prefix` in `bucket`, valid for `ttl` per renewal, and starts renewing it.
    pub async fn acquire(
        &self,
        objects: &DynObjectStore,
        bucket: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<Arc<Lease>, LeaseError> {
        Ok(self.acquire_noting(objects, bucket, prefix, ttl).await?.0)
    }

    /// [`LeaseManager::acquire`], also saying what the lease object was when it was taken
    /// (`None`: this process already held it, nobody else can have changed the export).
    pub async fn acquire_noting(
        &self,
        objects: &DynObjectStore,
        bucket: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Result<(Arc<Lease>, Option<Prior>), LeaseError> {
        let id: Key = (bucket.to_string(), format!("{prefix}{LEASE_NAME}"));
        if let Some(lease) = self.held_lease(&id) {
            return Ok((lease, None));
        }
        let lock = Arc::clone(self.locks.lock().entry(id.clone()).or_default());
        let _one_at_a_time = lock.lock().await;
        if let Some(lease) = self.held_lease(&id) {
            return Ok((lease, None));
        }
        self.check_conditional(objects, bucket, prefix).await?;
        let (etag, sent, prior) = self.take(objects, &id, ttl).await?;
        let lease = Arc::new(Lease {
            objects: Arc::clone(objects),
            bucket: id.0.clone(),
            key: id.1.clone(),
            ttl,
            me: self.me.clone(),
            clock: self.clock,
            state: parking_lot::Mutex::new(State {
                etag: Some(etag),
                valid_until: sent + ttl,
                lost: None,
                released: false,
            }),
            wake: Arc::new(tokio::sync::Notify::new()),
            lock: Arc::clone(&lock),
            closed: AtomicBool::new(false),
            born: sent,
            fence_at_ms: AtomicU64::new(0),
        });
        lease.publish(sent + ttl);
        self.held.lock().insert(id, Arc::downgrade(&lease));
        tokio::spawn(renew::renew_loop(
            Arc::downgrade(&lease),
            Arc::clone(&lease.wake),
        ));
        Ok((lease, Some(prior)))
    }

    fn held_lease(&self, id: &Key) -> Option<Arc<Lease>> {
        let mut held = self.held.lock();
        let lease = held.get(id).and_then(Weak::upgrade);
        if lease.is_none() {
            held.remove(id);
        }
        // A released lease is not shared: it is taken afresh (and re-read from S3).
        lease.filter(|l| {
            let st = l.state.lock();
            st.lost.is_none() && !st.released
        })
    }

    /// Probes the bucket once (verdict cached for the daemon's life; an unreachable store is
    /// not a verdict and is asked again next time).
    pub async fn check_conditional(
        &self,
        objects: &DynObjectStore,
        bucket: &str,
        prefix: &str,
    ) -> Result<(), LeaseError> {
        let known = self.conditional.lock().get(bucket).copied();
        let ok = match known {
            Some(ok) => ok,
            None => {
                // A key of our own: concurrent probes by other daemons must not interfere.
                let probe = format!("{prefix}nbd-s3.probe-{}", self.me.owner);
                let ok = supports_conditional_writes(objects.as_ref(), &probe).await?;
                self.conditional.lock().insert(bucket.to_string(), ok);
                ok
            }
        };
        if ok {
            Ok(())
        } else {
            Err(LeaseError::Unsupported {
                bucket: bucket.to_string(),
            })
        }
    }

    /// Creates, renews or takes over the lease object; returns its new ETag, when the
    /// winning write was sent (validity counts from then, never from the reply) and what the
    /// object was before.
    async fn take(
        &self,
        objects: &DynObjectStore,
        id: &Key,
        ttl: Duration,
    ) -> Result<(ETag, Instant, Prior), LeaseError> {
        let key = id.1.as_str();
        // Each lost race means someone else wrote the object; a few rounds settle it.
        for _ in 0..4 {
            let sent = Instant::now();
            let body = LeaseRecord::new(&self.me, self.clock.now_ms(), ttl).to_bytes();
            // The holder rewrites the object in place: a read that catches it half-written
            // fails its checksum and is simply read again (`Policy::LEASE`).
            let current = Policy::LEASE.run(|| objects.get_with_etag(key)).await?;
            let (won, prior) = match current {
                None => (objects.put_if_absent(key, body).await?, Prior::Absent),
                Some((raw, etag)) => {
                    let record = LeaseRecord::parse(&raw);
                    // A record of ours, live or released, was the last one written: nobody
                    // else held the export since (they would have written their own owner).
                    let prior = match &record {
                        Some(r) if r.owner == self.me.owner => Prior::Ours,
                        Some(r) if r.released => Prior::Released(etag.clone()),
                        _ => Prior::Held,
                    };
                    let won = match self.judge(id, record.as_ref(), &etag) {
                        Verdict::Ours => objects.put_if_match(key, body, &etag).await?,
                        Verdict::Free { why } => {
                            let won = objects.put_if_match(key, body, &etag).await?;
                            if won.is_some() && prior == Prior::Held {
                                tracing::warn!(lease = key, "took over export lease: {why}");
                            } else if won.is_some() {
                                tracing::debug!(lease = key, "took export lease: {why}");
                            }
                            won
                        }
                        Verdict::Held { holder } => {
                            return Err(LeaseError::Held {
                                holder,
                                bucket: id.0.clone(),
                                key: key.to_string(),
                            })
                        }
                    };
                    (won, prior)
                }
            };
            if let Some(etag) = won {
                self.seen.lock().remove(id);
                return Ok((etag, sent, prior));
            }
        }
        Err(LeaseError::Backend(BackendError::Transient(format!(
            "lease object {key} kept changing while taking it"
        ))))
    }

    /// The verdict on a lease object, remembering when this version was first seen.
    fn judge(&self, id: &Key, record: Option<&LeaseRecord>, etag: &str) -> Verdict {
        let now = Instant::now();
        let unchanged_for = {
            let mut seen = self.seen.lock();
            let entry = seen
                .entry(id.clone())
                .or_insert_with(|| (etag.to_string(), now));
            if entry.0 != etag {
                *entry = (etag.to_string(), now);
            }
            now.saturating_duration_since(entry.1)
        };
        record::judge(
            record,
            &record::Context {
                me: &self.me,
                now_ms: self.clock.now_ms(),
                unchanged_for,
                alive: &record::pid_alive,
            },
        )
    }
}

/// The mutable part of a held lease.
#[derive(Debug)]
struct State {
    /// Version of our lease object; `None` after it vanished (re-created on next renewal).
    etag: Option<ETag>,
    /// When the lease runs out by our monotonic clock (last winning write sent + ttl).
    valid_until: Instant,
    /// Another daemon took the lease: fenced for good, with this reason.
    lost: Option<String>,
    /// Released at shutdown or removal: nothing may write any more.
    released: bool,
}

/// A lease this daemon holds on one export. Renewed in the background for as long as any
/// `Arc` of it lives (the export's lease slot holds it); released when the last one goes, or
/// earlier by [`Lease::release`].
#[derive(Debug)]
pub struct Lease {
    objects: DynObjectStore,
    bucket: String,
    key: String,
    ttl: Duration,
    me: Identity,
    clock: Clock,
    state: parking_lot::Mutex<State>,
    wake: Arc<tokio::sync::Notify>,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Set with `lost` or `released`. With `fence_at_ms`, the write gate's lock-free fast path
    /// (it is checked on every client write).
    closed: AtomicBool,
    /// Time origin of `fence_at_ms`.
    born: Instant,
    /// When writes must stop (ms after `born`), unless renewed before.
    fence_at_ms: AtomicU64,
}

impl Lease {
    /// Writes must stop this long before the lease runs out: room for clock skew and for
    /// a write already on the wire.
    fn margin(&self) -> Duration {
        self.ttl / RENEWALS_PER_TTL
    }

    /// When writes must stop for a lease valid until `valid_until`.
    fn fence_at(&self, valid_until: Instant) -> Instant {
        valid_until
            .checked_sub(self.margin())
            .unwrap_or(valid_until)
    }

    /// Makes a new expiry visible to the lock-free write gate.
    fn publish(&self, valid_until: Instant) {
        let fence_at = self.fence_at(valid_until);
        let ms = fence_at.saturating_duration_since(self.born).as_millis();
        self.fence_at_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Whether client writes may proceed now: the lease is held and not about to run out.
    /// Lock-free on the happy path; the reason comes from [`Lease::write_deadline`].
    pub fn writable(&self) -> Result<(), String> {
        let now_ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !self.closed.load(Ordering::Relaxed) && now_ms < self.fence_at_ms.load(Ordering::Relaxed)
        {
            return Ok(());
        }
        self.write_deadline().map(|_| ())
    }

    /// The instant until which a write may still run, or why none may start.
    pub fn write_deadline(&self) -> Result<Instant, String> {
        let st = self.state.lock();
        if st.released {
            return Err("the export lease was released".into());
        }
        if let Some(lost) = &st.lost {
            return Err(lost.clone());
        }
        if Instant::now() >= self.fence_at(st.valid_until) {
            return Err(format!(
                "renewing lease s3://{}/{} keeps failing; writes resume once it is renewed",
                self.bucket, self.key
            ));
        }
        Ok(st.valid_until - self.margin() / 2)
    }

    /// Whether another daemon took the lease (this export can no longer write).
    pub fn is_lost(&self) -> bool {
        self.state.lock().lost.is_some()
    }

    /// Why the lease was lost (names the daemon that took it), if it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.state.lock().lost.clone()
    }

    /// Whether this daemon gave the lease up.
    pub fn is_released(&self) -> bool {
        self.state.lock().released
    }
}

//! The lease of one export, held only while it is needed: taken when a client attaches,
//! given up once the last client has gone and nothing is dirty. An idle export so makes no
//! request at all (no renewals). The slot also remembers whether the export's objects may
//! have changed while we did not hold it, so the block store's view (cache and presence map)
//! is thrown away and rebuilt exactly when another daemon may have written.

use super::{Lease, LeaseError, LeaseManager, Prior, LEASE_NAME};
use crate::backend::{BackendError, DynObjectStore, ETag};
use crate::retry::Policy;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// What we know about the export's objects relative to the lease object.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// Our view matches the objects as of this released lease record: while the record is
    /// unchanged, so are the objects (any holder replaces the record before writing).
    AsOf(ETag),
    /// Our view was built while there was no lease object at all (a new export): while
    /// there still is none, nobody held the export. (An older daemon deleted its lease when it
    /// let go; such a deletion looks the same.)
    Absent,
    /// We held the lease last and let it go (or tried to: a release whose write failed or
    /// whose lease had run out). A lease record of ours found later proves nobody held the
    /// export since (any other holder writes its own owner id over it).
    Released,
    /// Our view may be stale: rebuild it when the lease is next taken.
    Unknown,
    /// We hold the lease and our view is the truth.
    Holding,
}

#[derive(Debug)]
struct State {
    current: Option<Arc<Lease>>,
    known: Known,
    /// Clients were admitted while S3 could not be asked for the lease (since this instant):
    /// their writes wait in the cache, and storing them takes the lease first.
    pending: Option<Instant>,
    /// When S3 was last asked for a pending lease.
    tried: Option<Instant>,
    /// The lease was taken (or found held) after pending writes were accepted on a view
    /// another daemon may have changed: they are never stored (the export is reopened).
    conflict: Option<String>,
}

impl Known {
    /// Whether our view was current when we last looked, so a client may be admitted before
    /// the lease can be taken (writes then wait for it).
    fn is_current(&self) -> bool {
        matches!(self, Known::AsOf(_) | Known::Absent | Known::Released)
    }
}

/// Whether the view as of `known` is still true given what the lease object was (`prior`)
/// when we took it: only if nobody can have held the export in between.
fn still_true(prior: &Option<Prior>, known: &Known) -> bool {
    match (prior, known) {
        (Some(Prior::Released(now)), Known::AsOf(then)) => now == then,
        (Some(Prior::Absent), Known::Absent) => true,
        (Some(Prior::Ours), Known::AsOf(_) | Known::Absent | Known::Released) => true,
        _ => false,
    }
}

/// How long a client attaching waits for S3 to hand over the lease when it could be admitted
/// without it: far above a healthy store's round trips, well below a client's patience.
const PROMPT: Duration = Duration::from_secs(1);

/// The lease slot of one writable export (shared by every version of it a reload makes).
#[derive(Debug)]
pub struct LeaseSlot {
    manager: Arc<LeaseManager>,
    objects: DynObjectStore,
    bucket: String,
    prefix: String,
    ttl: Duration,
    state: parking_lot::Mutex<State>,
    /// Serialises taking and giving up, so a client attaching while the lease is being
    /// released waits and then takes it afresh.
    turn: tokio::sync::Mutex<()>,
}

impl LeaseSlot {
    /// A slot for the export at `prefix` in `bucket`, holding nothing yet; `objects` is the
    /// unfenced store the lease object is written through.
    pub fn new(
        manager: Arc<LeaseManager>,
        objects: DynObjectStore,
        bucket: &str,
        prefix: &str,
        ttl: Duration,
    ) -> Self {
        Self {
            manager,
            objects,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            ttl,
            state: parking_lot::Mutex::new(State {
                current: None,
                known: Known::Unknown,
                pending: None,
                tried: None,
                conflict: None,
            }),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// The lease time of each renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long an export stays leased after its last client left: one renewal interval
    /// (at most one more renewal), so a client that reconnects at once (a tool opening the
    /// export again, a kernel client's reconnect) costs no release and retake.
    pub fn idle_grace(&self) -> Duration {
        self.ttl / super::RENEWALS_PER_TTL
    }

    /// At open, before the block store lists the export: checks that the bucket honours
    /// conditional writes, and notes the lease object's version when it is a released record,
    /// so the first client does not pay for a second listing when nobody held the export since.
    pub async fn observe(&self) -> Result<(), LeaseError> {
        self.manager
            .check_conditional(&self.objects, &self.bucket, &self.prefix)
            .await?;
        let key = self.key();
        let known = match Policy::LEASE
            .run(|| self.objects.get_with_etag(&key))
            .await?
        {
            None => Known::Absent,
            Some((raw, etag)) => match super::record::LeaseRecord::parse(&raw) {
                Some(r) if r.released => Known::AsOf(etag),
                _ => Known::Unknown,
            },
        };
        let mut st = self.state.lock();
        if st.current.is_none() {
            st.known = known;
        }
        Ok(())
    }

    /// Holds the lease for a client: shares it if held, else takes it. When another daemon
    /// may have written the export since we last held it, `refresh` rebuilds the caller's view
    /// first (under the slot's turn, so no other client is served from the stale view); a
    /// refresh that fails is tried again by the next client.
    ///
    /// When S3 cannot be asked but our view is known to be current as of the last time we
    /// looked, the client is admitted anyway (an S3 outage must not lock clients out): its
    /// writes wait in the cache, and storing them takes the lease first ([`LeaseSlot::resume`]).
    pub async fn take<F, Fut>(&self, refresh: F) -> Result<(), LeaseError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), BackendError>>,
    {
        let _turn = self.turn.lock().await;
        if self.usable()? {
            return Ok(());
        }
        if self.is_pending() {
            // Writes already wait on the view as it was: take the lease for them, or admit
            // this client too while S3 still cannot be asked.
            return match self.resume_in_turn().await {
                Ok(()) => Ok(()),
                Err(e) => match self.lost_reason() {
                    Some(lost) => Err(LeaseError::Lost(lost)),
                    None if self.may_wait(&e) => Ok(()),
                    None => Err(LeaseError::Backend(e)),
                },
            };
        }
        let acquired = self.acquire().await;
        let (lease, prior) = match acquired {
            Ok(taken) => taken,
            Err(LeaseError::Backend(e)) if self.may_wait(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let stale = {
            let mut st = self.state.lock();
            st.current = Some(lease);
            // Anything but our own release record, unchanged (or still no lease object at
            // all), may hide another writer; this includes a lease another version of the
            // export holds in this process (it writes through its own cache) and a refresh
            // that failed last time.
            let fresh = still_true(&prior, &st.known);
            if fresh {
                st.known = Known::Holding;
            }
            !fresh
        };
        if stale {
            tracing::info!(
                lease = %self.key(),
                "export lease taken after another daemon may have held it: dropping cached blocks and listing the export again"
            );
            refresh().await?;
            self.state.lock().known = Known::Holding;
        }
        Ok(())
    }

    /// Takes the lease from the manager. When our view is current, a client may be admitted
    /// without it, so an S3 that does not answer promptly is not waited for (a write given up
    /// on is recognised as ours next time, [`Prior::Ours`]).
    async fn acquire(&self) -> Result<(Arc<Lease>, Option<Prior>), LeaseError> {
        let taking =
            self.manager
                .acquire_noting(&self.objects, &self.bucket, &self.prefix, self.ttl);
        let current_view = self.state.lock().known.is_current();
        if !current_view {
            return taking.await;
        }
        tokio::time::timeout(PROMPT, taking)
            .await
            .unwrap_or_else(|_| {
                Err(LeaseError::Backend(BackendError::Transient(format!(
                    "no answer within {PROMPT:?}"
                ))))
            })
    }

    /// After `e` (S3 unreachable) while taking the lease: whether the client may be admitted
    /// with the lease pending, i.e. our view was current when we last looked.
    fn may_wait(&self, e: &BackendError) -> bool {
        use crate::retry::{Classify, Kind};
        let mut st = self.state.lock();
        let current_view = st.known.is_current();
        if e.kind() != Kind::Transient || !current_view || st.current.is_some() {
            return false;
        }
        if st.pending.is_none() {
            tracing::warn!(
                lease = %self.key(),
                "cannot take the export lease ({e}): client admitted, writes wait in memory until it is taken"
            );
            st.pending = Some(Instant::now());
        }
        true
    }

    /// Takes the lease for writes accepted while it was pending (the write-back calls this
    /// before storing anything). `Err` while S3 still cannot be asked; a conflict (another
    /// daemon held the export meanwhile) fences the export for good.
    pub async fn resume(&self) -> Result<(), BackendError> {
        // Many write-back tasks call this at once: one asks S3, the others fail fast and
        // retry by their own rule, so a client attaching never queues behind all of them.
        let Ok(_turn) = self.turn.try_lock() else {
            return Err(BackendError::Transient(
                "the export lease is being taken".into(),
            ));
        };
        self.resume_in_turn().await
    }

    /// [`LeaseSlot::resume`], the caller holding the slot's turn.
    async fn resume_in_turn(&self) -> Result<(), BackendError> {
        {
            let mut st = self.state.lock();
            if st.pending.is_none() {
                return Ok(());
            }
            // At most one try per `PROMPT`: S3 is asked again soon enough.
            if st.tried.is_some_and(|t| t.elapsed() < PROMPT) {
                return Err(BackendError::Transient(
                    "the export lease could not be taken a moment ago".into(),
                ));
            }
            st.tried = Some(Instant::now());
        }
        let acquired = self.acquire().await;
        let mut st = self.state.lock();
        let why = match acquired {
            Err(LeaseError::Backend(e)) => return Err(e),
            Ok((lease, prior)) if still_true(&prior, &st.known) => {
                st.current = Some(lease);
                st.known = Known::Holding;
                st.pending = None;
                tracing::info!(lease = %self.key(), "export lease taken; writes made while it was pending are stored now");
                return Ok(());
            }
            Ok((lease, _)) => {
                // Not ours to keep: give it back at once (in the background).
                drop(lease);
                "another daemon held the export while its lease could not be taken".to_string()
            }
            Err(e) => e.to_string(),
        };
        let msg = format!(
            "{why}: writes accepted meanwhile were made on a stale view and are never stored (the export is reopened once no client uses it)"
        );
        tracing::error!(lease = %self.key(), "{msg}");
        st.pending = None;
        st.conflict = Some(msg.clone());
        Err(BackendError::Permanent(msg))
    }

    /// Whether writes wait for a lease S3 could not be asked for.
    pub fn is_pending(&self) -> bool {
        self.state.lock().pending.is_some()
    }

    /// Why this export version never writes again: its lease was taken over, or pending
    /// writes conflicted with another daemon's.
    pub fn lost_reason(&self) -> Option<String> {
        let st = self.state.lock();
        st.conflict
            .clone()
            .or_else(|| st.current.as_ref().and_then(|l| l.lost_reason()))
    }

    fn key(&self) -> String {
        format!("{}{LEASE_NAME}", self.prefix)
    }

    /// Whether the lease is held and may be shared; an error if it is lost.
    fn usable(&self) -> Result<bool, LeaseError> {
        let st = self.state.lock();
        if let Some(c) = &st.conflict {
            return Err(LeaseError::Lost(c.clone()));
        }
        let Some(lease) = &st.current else {
            return Ok(false);
        };
        if let Some(lost) = lease.lost_reason() {
            return Err(LeaseError::Lost(lost));
        }
        Ok(!lease.is_released() && st.known == Known::Holding)
    }

    /// Gives the lease up if `idle()` still holds once it is our turn (no client attached,
    /// nothing dirty). A lease another version of the export still uses is left to it; a
    /// lost one stays (the export is reopened). Returns whether the slot now holds nothing.
    pub async fn release_if(&self, idle: impl Fn() -> bool) -> bool {
        let _turn = self.turn.lock().await;
        if !idle() {
            return false;
        }
        let lease = {
            let mut st = self.state.lock();
            match &st.current {
                None => {
                    st.pending = None;
                    return true;
                }
                Some(l) if l.is_lost() => return false,
                Some(_) => {}
            }
            let lease = st.current.take();
            st.known = Known::Released;
            st.pending = None;
            lease
        };
        let Some(lease) = lease else { return true };
        // Ours is the only reference left unless another export version (a reload's) still
        // uses the lease: that one gives it up itself (or its last reference does, on drop).
        if Arc::strong_count(&lease) > 1 {
            return true;
        }
        if let Some(etag) = lease.release().await {
            self.state.lock().known = Known::AsOf(etag);
        }
        true
    }

    /// Gives the lease up whoever else uses it (shutdown and takeover, once everything is
    /// flushed): waits for a release already under way, so the released record is written
    /// before the process exits or passes its clients on. A lost lease is left alone.
    pub async fn release_now(&self) {
        let _turn = self.turn.lock().await;
        let lease = {
            let mut st = self.state.lock();
            if st.current.as_ref().is_some_and(|l| l.is_lost()) {
                return;
            }
            st.pending = None;
            st.known = Known::Released;
            st.current.take()
        };
        if let Some(etag) = match lease {
            Some(lease) => lease.release().await,
            None => None,
        } {
            self.state.lock().known = Known::AsOf(etag);
        }
    }

    /// The lease held now, if any (status, metrics, fencing).
    pub fn current(&self) -> Option<Arc<Lease>> {
        self.state.lock().current.clone()
    }

    /// Until when a write to the store may run, or why none may start (no lease held, or the
    /// held one in doubt).
    pub fn write_deadline(&self) -> Result<Instant, String> {
        if let Some(c) = &self.state.lock().conflict {
            return Err(c.clone());
        }
        match self.current() {
            Some(lease) => lease.write_deadline(),
            None => Err(format!(
                "the export lease s3://{}/{} is not held",
                self.bucket,
                self.key()
            )),
        }
    }
}

impl crate::store::WriteGate for LeaseSlot {
    /// Client writes: while the lease is held and valid; while it is pending, for as long as
    /// an outage would be ridden out with the lease held (two thirds of its time), so a
    /// client admitted during an outage is treated like one attached before it.
    fn check(&self) -> Result<(), String> {
        let pending = {
            let st = self.state.lock();
            if let Some(c) = &st.conflict {
                return Err(c.clone());
            }
            st.pending
        };
        match (self.current(), pending) {
            (Some(lease), _) => lease.writable(),
            (None, Some(since)) if since.elapsed() < self.ttl * 2 / 3 => Ok(()),
            (None, Some(_)) => Err(format!(
                "the export lease s3://{}/{} could not be taken (S3 unreachable); writes resume once it is",
                self.bucket,
                self.key()
            )),
            (None, None) => self.write_deadline().map(|_| ()),
        }
    }
}

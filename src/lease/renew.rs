//! Keeping a lease: renewal every sixth of the ttl (sooner after a failure), re-taking it after
//! an outage if nobody else did, giving up for good if somebody did, and deleting it when the
//! export no longer needs it.

use super::record::LeaseRecord;
use super::Lease;
use crate::backend::{BackendError, DynObjectStore, ETag};
use crate::retry::{Backoff, Policy};
use std::sync::{Arc, Weak};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// Outcome of one renewal attempt.
enum Renewal {
    Renewed,
    Failed(String),
    Lost,
}

/// Renews the lease until it is released, lost, or dropped. Holds only a `Weak`, so the task
/// never keeps a lease alive by itself. Logs when the export gets fenced and when it resumes.
pub(super) async fn renew_loop(lease: Weak<Lease>, wake: Arc<tokio::sync::Notify>) {
    let mut failing: Option<Backoff> = None;
    let mut fenced = false;
    loop {
        let next = {
            let Some(l) = lease.upgrade() else { return };
            let retry = failing.as_mut().and_then(Backoff::next_delay);
            match retry {
                Some(delay) => Instant::now() + delay,
                None => l.state.lock().valid_until - l.ttl + l.ttl / super::RENEWALS_PER_TTL,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = wake.notified() => {}
        }
        let Some(l) = lease.upgrade() else { return };
        if l.state.lock().released {
            return;
        }
        match l.renew_once().await {
            _ if l.state.lock().released => return,
            Renewal::Renewed => failing = None,
            Renewal::Lost => return,
            Renewal::Failed(e) => {
                if failing.is_none() {
                    warn!(lease = %l.key, "lease renewal failed ({e}); retrying");
                }
                failing.get_or_insert_with(|| Policy::renewal(l.ttl).backoff());
            }
        }
        let now_fenced = l.write_deadline().is_err();
        if now_fenced && !fenced {
            error!(lease = %l.key, "export lease could not be renewed in time: writes, trims and flushes get EIO and nothing more is written to S3 until it is (dirty data stays in memory)");
        } else if fenced && !now_fenced {
            info!(lease = %l.key, "export lease renewed; writes resume");
        }
        fenced = now_fenced;
    }
}

impl Lease {
    /// One renewal: a conditional write bounded by a third of the ttl, then sorting out a
    /// failed precondition (our own lost reply, a vanished object, or a takeover).
    async fn renew_once(&self) -> Renewal {
        // Never races a release: a renewal landing after the released record would make the
        // lease live again (and its retry would take our own released record for a lost reply).
        let _one_at_a_time = self.lock.lock().await;
        if self.state.lock().released {
            return Renewal::Renewed;
        }
        let (etag, attempt_timeout) = (self.state.lock().etag.clone(), self.ttl / 3);
        let attempt = tokio::time::timeout(attempt_timeout, self.write(etag.as_deref())).await;
        match attempt {
            Ok(Ok(true)) => Renewal::Renewed,
            Ok(Ok(false)) => self.reconcile().await,
            Ok(Err(e)) => Renewal::Failed(e.to_string()),
            Err(_) => Renewal::Failed(format!("no answer within {attempt_timeout:?}")),
        }
    }

    /// Writes a fresh record over `etag` (or creates it when `None`); `Ok(false)` when the
    /// precondition failed.
    async fn write(&self, etag: Option<&str>) -> Result<bool, BackendError> {
        let sent = Instant::now();
        let body = LeaseRecord::new(&self.me, self.clock.now_ms(), self.ttl).to_bytes();
        let won = match etag {
            Some(etag) => self.objects.put_if_match(&self.key, body, etag).await?,
            None => self.objects.put_if_absent(&self.key, body).await?,
        };
        let Some(new) = won else { return Ok(false) };
        let mut st = self.state.lock();
        st.etag = Some(new);
        st.valid_until = st.valid_until.max(sent + self.ttl);
        self.publish(st.valid_until);
        Ok(true)
    }

    /// After a failed precondition: whose is the object now?
    async fn reconcile(&self) -> Renewal {
        let current = match self.objects.get_with_etag(&self.key).await {
            Ok(c) => c,
            Err(e) => return Renewal::Failed(e.to_string()),
        };
        let retry_with = match &current {
            None => None,
            Some((raw, etag)) => match LeaseRecord::parse(raw) {
                // Our own write whose reply was lost (the retry saw its own precondition).
                Some(r) if r.owner == self.me.owner => Some(etag.clone()),
                other => return self.lose(other.as_ref()),
            },
        };
        self.state.lock().etag = retry_with.clone();
        match self.write(retry_with.as_deref()).await {
            Ok(true) => Renewal::Renewed,
            Ok(false) => Renewal::Failed("the lease object changed again".into()),
            Err(e) => Renewal::Failed(e.to_string()),
        }
    }

    fn lose(&self, by: Option<&LeaseRecord>) -> Renewal {
        let holder = by.map_or_else(|| "an unreadable lease object".into(), |r| r.describe());
        let msg = format!(
            "export lease s3://{}/{} was taken over by {holder}; this daemon no longer writes the export",
            self.bucket, self.key
        );
        error!(lease = %self.key, "{msg}; dirty data not yet stored is kept in memory but will not be written");
        self.state.lock().lost = Some(msg);
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        Renewal::Lost
    }

    /// Gives the lease up now (no client left and nothing dirty, or clean shutdown after the
    /// final flush): writes stop, renewal stops, and the object becomes a released record if
    /// it is still ours and valid. Returns the released record's version (`None` when none
    /// was written), which tells the next taker whether anybody held the export in between.
    pub async fn release(&self) -> Option<ETag> {
        // Taken before the version is read: a renewal in flight finishes first.
        let one_at_a_time = Arc::clone(&self.lock);
        let _turn = one_at_a_time.lock().await;
        let snapshot = {
            let mut st = self.state.lock();
            if st.released {
                return None;
            }
            st.released = true;
            self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            Released::of(self, st.etag.clone(), st.valid_until)
        };
        self.wake.notify_one();
        snapshot.write_in_turn().await
    }
}

/// What releasing a lease needs once the `Lease` itself may be gone.
struct Released {
    objects: DynObjectStore,
    key: String,
    me: super::record::Identity,
    clock: super::Clock,
    etag: Option<ETag>,
    valid_until: Instant,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Released {
    fn of(lease: &Lease, etag: Option<ETag>, valid_until: Instant) -> Self {
        Self {
            objects: Arc::clone(&lease.objects),
            key: lease.key.clone(),
            me: lease.me.clone(),
            clock: lease.clock,
            etag,
            valid_until,
            lock: Arc::clone(&lease.lock),
        }
    }

    /// Replaces the object by a released record, only if it is exactly our last version and
    /// still valid (the write is conditional on that version, so no other daemon can have
    /// taken it in between). The record is kept rather than deleted: a deleted lease would
    /// not tell the next holder whether another daemon wrote the export meanwhile.
    async fn write(self) -> Option<ETag> {
        let lock = Arc::clone(&self.lock);
        let _one_at_a_time = lock.lock().await;
        self.write_in_turn().await
    }

    /// [`Released::write`], the caller holding the lease's lock.
    async fn write_in_turn(self) -> Option<ETag> {
        let ours = self.etag.as_ref()?;
        if Instant::now() >= self.valid_until {
            return None;
        }
        let body = LeaseRecord::released(&self.me, self.clock.now_ms()).to_bytes();
        match self.objects.put_if_match(&self.key, body, ours).await {
            Ok(Some(etag)) => {
                info!(lease = %self.key, "export lease released");
                Some(etag)
            }
            // Someone else's now, or our own lost reply: either way it is not held by us.
            Ok(None) => None,
            Err(e) => {
                warn!(lease = %self.key, "cannot release export lease ({e}); it expires by itself");
                None
            }
        }
    }
}

impl Drop for Lease {
    /// The last user is gone (export removed and its write-back finished): release in the
    /// background if a runtime is still there; otherwise the lease simply expires.
    fn drop(&mut self) {
        let (etag, valid_until) = {
            let st = self.state.get_mut();
            if st.released || st.lost.is_some() {
                return;
            }
            (st.etag.clone(), st.valid_until)
        };
        let snapshot = Released::of(self, etag, valid_until);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(snapshot.write());
        }
    }
}

//! Journal space shared by every export of the daemon (`[cache] journal_size`): a writer
//! reserves room for its record before it touches the cache and waits while the journal is
//! full; room comes back when a segment's records are all in S3 and the segment is deleted.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use tokio::sync::Notify;

/// Bytes of journal in use across all exports, against the configured size.
#[derive(Debug)]
pub struct Space {
    capacity: u64,
    used: Mutex<u64>,
    freed: Notify,
    /// Writers waiting for room: journals then close their open segment and push uploads
    /// instead of waiting for the next one to fill.
    waiting: AtomicUsize,
}

impl Space {
    pub fn new(capacity: u64) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: Mutex::new(0),
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Configured size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved or held by segments now.
    pub fn used(&self) -> u64 {
        *self.used.lock()
    }

    /// Whether some writer waits for room now.
    pub fn is_wanted(&self) -> bool {
        self.waiting.load(SeqCst) > 0
    }

    /// Takes `n` bytes now if they fit (or the journal is empty: a record bigger than the
    /// whole journal must still go through, alone).
    pub fn try_reserve(self: &Arc<Self>, n: u64) -> Option<Reservation> {
        let mut used = self.used.lock();
        if *used == 0 || used.saturating_add(n) <= self.capacity {
            *used += n;
            return Some(Reservation {
                space: Arc::clone(self),
                bytes: n,
            });
        }
        None
    }

    /// Takes `n` bytes, waiting while they do not fit. `on_wait` runs each time before
    /// waiting (the journal pushes uploads so space comes back).
    pub async fn reserve(self: &Arc<Self>, n: u64, mut on_wait: impl FnMut()) -> Reservation {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(r) = self.try_reserve(n) {
                return r;
            }
            self.waiting.fetch_add(1, SeqCst);
            on_wait();
            // Bounded so a free that raced the registration is seen within a second.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), freed).await;
            self.waiting.fetch_sub(1, SeqCst);
        }
    }

    /// Takes `n` bytes whatever the fill (a FLUSH record: FLUSH never waits for room).
    pub fn force(self: &Arc<Self>, n: u64) -> Reservation {
        *self.used.lock() += n;
        Reservation {
            space: Arc::clone(self),
            bytes: n,
        }
    }

    /// Returns `n` bytes a deleted segment held.
    pub fn free(&self, n: u64) {
        {
            let mut used = self.used.lock();
            *used = used.saturating_sub(n);
        }
        self.freed.notify_waiters();
    }
}

/// Room for one record; handed to the journal when the record is appended (the bytes then
/// belong to its segment), returned on drop otherwise.
#[derive(Debug)]
pub struct Reservation {
    space: Arc<Space>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The record was appended: its segment holds the bytes from now on.
    pub fn commit(mut self) {
        self.bytes = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.space.free(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_full_journal_makes_writers_wait_until_a_segment_is_freed() {
        let space = Space::new(100);
        let a = space.reserve(60, || {}).await;
        a.commit();
        assert!(space.try_reserve(50).is_none());
        let s2 = Arc::clone(&space);
        let waiter = tokio::spawn(async move { s2.reserve(50, || {}).await.bytes() });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !space.is_wanted() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the writer waits");
        space.free(60);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the free")
            .expect("task");
        assert_eq!(got, 50);
        assert_eq!(
            space.used(),
            0,
            "an uncommitted reservation is returned on drop"
        );
    }

    #[test]
    fn a_record_bigger_than_the_journal_goes_through_alone_and_flush_never_waits() {
        let space = Space::new(10);
        let big = space
            .try_reserve(50)
            .expect("empty journal admits anything");
        assert!(space.try_reserve(1).is_none());
        let f = space.force(32);
        assert_eq!(space.used(), 82);
        drop(big);
        drop(f);
        assert_eq!(space.used(), 0);
    }
}

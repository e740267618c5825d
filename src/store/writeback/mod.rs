//! Write-back: dirty blocks go to S3 in the background with many PUTs in flight; FLUSH and FUA
//! wait for exactly the changes they must cover, using sequence numbers.
//!
//! Every change gets a sequence number. A block's "oldest unstored change" is kept in the
//! [`Queue`]; a FLUSH started when the counter read S returns once no entry below S remains.
//! Later writes get numbers ≥ S and never delay it. A failing PUT is retried forever (with
//! backoff) by the task that owns the block; the block stays dirty meanwhile.
//!
//! - `queue`: dirty blocks by sequence number and due time, and every unstored change
//! - `choice`: what to store next, a pure function of the queue and the moment
//! - `dispatch`: the per-export task that hands PUT slots to the chosen blocks
//! - `put`: one block's PUT or DELETE, retried until it succeeds
//! - `flush`: FLUSH, FUA and shutdown waiting for the changes they cover
//!
//! Ordered write-back (exports with a local journal): a FLUSH closes an *epoch* at the
//! current change number. Versions of epoch k+1 are uploaded only once every version of
//! epoch k is in S3, so S3 always holds the export as of some FLUSH plus some of the writes
//! after it, even if the journal is lost. A block that is dirty from epoch k and written
//! again in a later epoch keeps its epoch-k content as a frozen version (the buffer is
//! shared, the new write copies it), uploaded with epoch k; the later content follows in its
//! own epoch. Waiting for epoch k's upload instead would make the second write cost an S3
//! round trip, which is what the journal exists to avoid.

mod choice;
mod dispatch;
mod flush;
mod put;
mod queue;

pub(crate) use dispatch::dispatcher;
pub(crate) use queue::Queue;

use super::budget::Pressure;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// How long a partly written block may stay dirty before write-back stores it unasked.
pub(crate) const AGE_BEFORE_WRITE_BACK: Duration = Duration::from_secs(30);
/// PUTs in flight for background write-back (dirty data above half the limit).
const BACKGROUND_PUTS: usize = 4;
/// PUTs in flight for blocks that are merely due (a sequential writer finished them, or a
/// partial block aged) while dirty data is below half the dirty limit. Write-back goes on
/// during a client's burst without taking most of the CPU and store bandwidth from it (on a
/// 2-core machine, 64 parallel PUTs to a local S3 server halved a 1 MiB writer); above half
/// the limit, or when FLUSH or FUA asks, every PUT slot is used.
const QUIET_PUTS: usize = 8;
/// Background write-back only takes blocks nobody wrote for this long: a block that is still
/// being written would be dirty again right after its PUT.
const COLD: Duration = Duration::from_secs(1);

/// The write-back state of one export: what is dirty, what FLUSH waits for, the PUT slots
/// and the signals between writers, the dispatcher and the PUT tasks.
#[derive(Debug)]
pub(crate) struct WriteBack {
    pub queue: Mutex<Queue>,
    /// Sequence number of the next change (FLUSH waits for changes below its start value).
    pub next_seq: AtomicU64,
    /// Write-back stores everything below this at once (raised by FLUSH and shutdown).
    pub flush_target: AtomicU64,
    /// Wakes the dispatcher (new dirty block, flush, a PUT slot freed).
    pub kick: Notify,
    /// The pressure level writers last woke the dispatcher for (see `kick_on_pressure`).
    signalled: AtomicU8,
    /// A block finished write-back: FLUSH/FUA waiters re-check.
    pub stored: Notify,
    /// Cuts write-back retry backoffs short: a FLUSH arrived, or a block that had been
    /// failing was stored (S3 is back), so blocks waiting out a backoff of up to 10 s retry now.
    pub retry_now: Notify,
    pub put_slots: Arc<Semaphore>,
    /// Write-back tasks nobody asked for (due blocks below half the dirty limit, cold blocks
    /// above it), bounded by the dispatcher; FLUSH, FUA and hard pressure are not counted.
    pub background_puts: AtomicUsize,
    /// Dirty bytes of this export not yet stored.
    pub dirty: AtomicU64,
    /// The store handle is gone: the dispatcher stores everything, then exits.
    pub closed: AtomicBool,
    /// How long a partly written block may stay dirty unasked (ms; tests stretch it).
    pub age_ms: AtomicU64,
    /// How long FLUSH and FUA wait for S3 before failing.
    pub flush_timeout: Duration,
    /// Journaled export: versions go to S3 epoch by epoch (a FLUSH closes an epoch), and a
    /// block changed in a later epoch keeps its earlier version until that is stored.
    pub ordered: bool,
    /// The change number at which the last FLUSH closed an epoch (ordered exports).
    pub last_boundary: AtomicU64,
    /// While a write-back task gathers blocks that read as zeros into multi-object deletes
    /// (`put::store_zeroed`), the others the dispatcher picks are handed to it here.
    pub zeroed: Mutex<Option<Vec<u64>>>,
}

impl WriteBack {
    pub fn new(put_slots: usize, flush_timeout: Duration, ordered: bool) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            next_seq: AtomicU64::new(1),
            flush_target: AtomicU64::new(0),
            kick: Notify::new(),
            signalled: AtomicU8::new(0),
            stored: Notify::new(),
            retry_now: Notify::new(),
            put_slots: Arc::new(Semaphore::new(put_slots)),
            background_puts: AtomicUsize::new(0),
            dirty: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            age_ms: AtomicU64::new(AGE_BEFORE_WRITE_BACK.as_millis() as u64),
            flush_timeout,
            ordered,
            last_boundary: AtomicU64::new(0),
            zeroed: Mutex::new(None),
        }
    }

    /// Versions numbered below this may be uploaded now (see [`Queue::upload_limit`]).
    pub fn upload_limit(&self, queue: &mut Queue) -> u64 {
        if self.ordered {
            queue.upload_limit()
        } else {
            u64::MAX
        }
    }

    /// How long a partly written block waits before write-back stores it unasked.
    pub fn age(&self) -> Duration {
        Duration::from_millis(self.age_ms.load(SeqCst))
    }

    /// Wakes the dispatcher when dirty data reaches a higher pressure level. Below that it
    /// has nothing new to do, and waking it on every small write cost more CPU than the write
    /// itself.
    pub fn kick_on_pressure(&self, level: Pressure) {
        let level = level as u8;
        if self.signalled.swap(level, SeqCst) < level {
            self.kick.notify_one();
        }
    }

    /// The store handle is gone: store everything, then let the dispatcher end.
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
        self.flush_target.store(u64::MAX, SeqCst);
        self.kick.notify_one();
    }
}

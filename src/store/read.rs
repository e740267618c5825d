//! Reads: cache hits are a hash lookup and a memcpy; misses become one GET per block however
//! many requests want it (single-flight through a `Loading` state); sequential readers get
//! read-ahead; absent blocks cost nothing.

use super::block::Chunk;
use super::cache::{BlockBuf, Buf, BufOwner, Content, LoadResult, Shard, Slot};
use super::stats::Counters;
use super::{Extent, Inner, StatusExtent, StoreError};
use crate::backend::BackendError;
use crate::store::backoff::Backoff;
use bytes::Bytes;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// GET attempts before a read fails with EIO. The backend already retries transient errors
/// for several seconds; these extra attempts mainly cover a body cut short or corrupted on the
/// way (`Corrupt`), which a fresh GET usually fixes.
const READ_ATTEMPTS: u32 = 3;
/// Reads starting this close (in blocks) to where the previous one ended count as sequential;
/// concurrent pipelined requests arrive slightly out of order.
const SEQ_WINDOW: u64 = 64;
/// Most blocks fetched ahead of a sequential reader.
const READAHEAD_MAX: u64 = 64;

/// Sequential-read detector of one export.
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    /// Block just past the furthest read so far.
    expect: u64,
    /// Consecutive reads that looked sequential.
    run: u32,
    /// First block not yet fetched ahead.
    next: u64,
}

/// Pieces at least this long are sent straight from the cached block (the reply shares the
/// buffer) instead of being copied: a 1 MiB read then costs no allocation, page faults or
/// memcpy. Smaller pieces are copied, since sharing would make a concurrent write to the
/// block copy all of it (copy-on-write) to change a few bytes.
const SHARE_MIN: usize = 32 * 1024;

/// Accumulates a read's result, merging adjacent copied data and adjacent zeros.
struct Extents {
    out: Vec<Extent>,
    cur: Vec<u8>,
    remaining: usize,
}

impl Extents {
    fn new(len: usize) -> Self {
        Self {
            out: Vec::new(),
            cur: Vec::new(),
            remaining: len,
        }
    }
    /// `range` of a cached block: shared when large, copied when small.
    fn data(&mut self, buf: &Buf, range: std::ops::Range<usize>) {
        self.remaining -= range.len();
        if range.len() >= SHARE_MIN {
            self.flush_data();
            let shared = Bytes::from_owner(BufOwner(Arc::clone(buf))).slice(range);
            self.out.push(Extent::Data(shared));
            return;
        }
        if self.cur.capacity() == 0 {
            self.cur = Vec::with_capacity((range.len() + self.remaining).min(SHARE_MIN));
        }
        self.cur.extend_from_slice(&buf.data[range]);
    }
    fn flush_data(&mut self) {
        if !self.cur.is_empty() {
            self.out
                .push(Extent::Data(Bytes::from(std::mem::take(&mut self.cur))));
        }
    }
    fn zero(&mut self, n: usize) {
        self.flush_data();
        self.remaining -= n;
        let n = n as u32;
        match self.out.last_mut() {
            Some(Extent::Zero(z)) => *z += n,
            _ => self.out.push(Extent::Zero(n)),
        }
    }
    fn finish(mut self) -> Vec<Extent> {
        self.flush_data();
        if self.out.is_empty() {
            self.out.push(Extent::Zero(0));
        }
        self.out
    }
}

/// What one attempt to read a block piece found.
enum Found {
    Done,
    Wait(watch::Receiver<LoadResult>),
}

impl Inner {
    /// Reads `len` bytes at `offset` as data/zero extents covering the range in order.
    pub(crate) async fn read(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>, StoreError> {
        let chunks = self
            .geo
            .chunks(offset, u64::from(len), self.size.load(SeqCst))?;
        if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
            if chunks.len() > 1 {
                // All GETs of a multi-block read go out together.
                for c in &chunks {
                    self.ensure_loading(c.block);
                }
            }
            self.note_read(first.block, last.block);
        }
        let mut out = Extents::new(len as usize);
        for c in &chunks {
            self.read_chunk(c, &mut out).await?;
        }
        Ok(out.finish())
    }

    async fn read_chunk(self: &Arc<Self>, c: &Chunk, out: &mut Extents) -> Result<(), StoreError> {
        loop {
            let found = {
                let mut shard = self.cache.lock(c.block);
                self.copy_out(&mut shard, c, out)
            };
            match found {
                Found::Done => return Ok(()),
                Found::Wait(rx) => self.wait_load(c.block, rx).await?,
            }
        }
    }

    /// Under the shard lock: copies the piece if known, else returns what to wait for.
    fn copy_out(self: &Arc<Self>, shard: &mut Shard, c: &Chunk, out: &mut Extents) -> Found {
        let Some(slot) = shard.slots.get(&c.block) else {
            if !self.presence.get(c.block) {
                Counters::bump(&self.counters.hits);
                out.zero(c.len);
                return Found::Done;
            }
            Counters::bump(&self.counters.misses);
            return Found::Wait(self.start_load(shard, c.block));
        };
        match &slot.content {
            Content::Loading(rx) => Found::Wait(rx.clone()),
            Content::Ready(None) => {
                out.zero(c.len);
                Found::Done
            }
            Content::Ready(Some(buf)) => {
                Counters::bump(&self.counters.hits);
                out.data(buf, c.start..c.start + c.len);
                if slot.tick != 0 {
                    shard.relink(c.block, self.budget.next_tick());
                }
                Found::Done
            }
        }
    }

    /// Waits for a GET started by anyone; `Ok` means "look again".
    pub(crate) async fn wait_load(
        &self,
        block: u64,
        mut rx: watch::Receiver<LoadResult>,
    ) -> Result<(), StoreError> {
        let outcome = rx.wait_for(|r| r.is_some()).await.map(|r| r.clone());
        match outcome {
            Ok(Some(Ok(()))) | Ok(None) => Ok(()),
            Ok(Some(Err(e))) => Err(StoreError::Backend(clone_error(&e))),
            Err(_) => {
                // The loading task vanished (runtime shutting down): forget its slot so the
                // next reader starts a fresh GET instead of waiting forever.
                let mut shard = self.cache.lock(block);
                let stale = matches!(shard.slots.get(&block),
                    Some(Slot { content: Content::Loading(r), .. }) if r.same_channel(&rx));
                if stale {
                    shard.slots.remove(&block);
                }
                Err(StoreError::ShuttingDown)
            }
        }
    }

    /// Starts a GET unless the block is cached, loading or absent (read-ahead, CACHE, RMW).
    pub(crate) fn ensure_loading(
        self: &Arc<Self>,
        block: u64,
    ) -> Option<watch::Receiver<LoadResult>> {
        let mut shard = self.cache.lock(block);
        match shard.slots.get(&block) {
            Some(Slot {
                content: Content::Loading(rx),
                ..
            }) => Some(rx.clone()),
            Some(_) => None,
            None if self.presence.get(block) => Some(self.start_load(&mut shard, block)),
            None => None,
        }
    }

    /// Under the shard lock: marks the block `Loading` and spawns the one GET for it. The GET
    /// runs in its own task so a reader that goes away cannot strand the others.
    pub(crate) fn start_load(
        self: &Arc<Self>,
        shard: &mut Shard,
        block: u64,
    ) -> watch::Receiver<LoadResult> {
        let (tx, rx) = watch::channel(None);
        shard.slots.insert(block, Slot::loading(rx.clone()));
        let inner = Arc::clone(self);
        tokio::spawn(async move { inner.load(block, tx).await });
        rx
    }

    async fn load(self: Arc<Self>, block: u64, tx: watch::Sender<LoadResult>) {
        let permit = Arc::clone(&self.get_slots).acquire_owned().await;
        let charge = self.budget.reserve_memory(self.geo.block_size).await;
        let fetched = self.get_block(block).await;
        drop(permit);
        let outcome = {
            let mut shard = self.cache.lock(block);
            match fetched {
                Ok(Some(data)) => {
                    let buf = BlockBuf {
                        data: Vec::from(data).into_boxed_slice(),
                        _charge: charge,
                    };
                    if let Some(slot) = shard.slots.get_mut(&block) {
                        slot.content = Content::Ready(Some(Arc::new(buf)));
                        slot.stored = true;
                    }
                    shard.relink(block, self.budget.next_tick());
                    Ok(())
                }
                Ok(None) => {
                    // Listed at open but gone now (deleted behind our back): reads as zeros.
                    shard.slots.remove(&block);
                    self.presence.set(block, false);
                    Ok(())
                }
                Err(e) => {
                    shard.slots.remove(&block);
                    Err(Arc::new(e))
                }
            }
        };
        tx.send_replace(Some(outcome));
    }

    /// GET with a few retries; a wrong-sized object is corrupt (never served as data).
    async fn get_block(&self, block: u64) -> Result<Option<Bytes>, BackendError> {
        let key = self.key(block);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            Counters::bump(&self.counters.gets);
            let res = self.objects.get(&key).await.and_then(|o| match o {
                Some(d) if d.len() != self.bs() => Err(BackendError::Corrupt {
                    key: key.clone(),
                    reason: format!("{} bytes, expected {}", d.len(), self.bs()),
                }),
                other => Ok(other),
            });
            match res {
                Ok(v) => return Ok(v),
                Err(e)
                    if !matches!(e, BackendError::Permanent(_))
                        && backoff.attempts() + 1 < READ_ATTEMPTS =>
                {
                    Counters::bump(&self.counters.get_retries);
                    tracing::debug!(key = %key, error = %e, "GET failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::error!(key = %key, error = %e, "reading block failed; returning EIO");
                    return Err(e);
                }
            }
        }
    }

    /// Feeds the sequential detector; fetches ahead once reads look sequential.
    fn note_read(self: &Arc<Self>, first: u64, last: u64) {
        let (from, to) = {
            let mut ra = self.readahead.lock();
            let near = first.abs_diff(ra.expect) <= SEQ_WINDOW;
            if near {
                ra.run = ra.run.saturating_add(1);
                ra.expect = ra.expect.max(last + 1);
            } else {
                *ra = ReadAhead {
                    expect: last + 1,
                    run: 0,
                    next: 0,
                };
            }
            if ra.run < 2 {
                return;
            }
            let budget_blocks = self.budget.memory_limit() / 8 / self.geo.block_size;
            let window = READAHEAD_MAX.min(budget_blocks);
            let end = self.geo.block_count(self.size.load(SeqCst));
            let from = ra.next.max(last + 1);
            let to = (last + 1 + window).min(end);
            ra.next = ra.next.max(to);
            (from, to)
        };
        for b in from..to {
            if self.ensure_loading(b).is_some() {
                Counters::bump(&self.counters.readahead);
            }
        }
    }

    /// NBD_CMD_CACHE: fetches the range and returns once it is cached.
    pub(crate) async fn prefetch(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
    ) -> Result<(), StoreError> {
        let chunks = self
            .geo
            .chunks(offset, u64::from(len), self.size.load(SeqCst))?;
        let waits: Vec<_> = chunks
            .iter()
            .filter_map(|c| self.ensure_loading(c.block).map(|rx| (c.block, rx)))
            .collect();
        for (block, rx) in waits {
            self.wait_load(block, rx).await?;
        }
        Ok(())
    }

    /// `base:allocation` from the presence map: adjacent equal blocks merge into one extent.
    pub(crate) fn block_status(&self, offset: u64, len: u32) -> Vec<StatusExtent> {
        let size = self.size.load(SeqCst);
        let end = offset.saturating_add(u64::from(len)).min(size);
        if end <= offset {
            return vec![StatusExtent {
                length: len,
                flags: 3,
            }];
        }
        let bs = self.geo.block_size;
        let first = offset / bs;
        let runs = self.presence.runs(first, (end - 1) / bs - first + 1);
        let mut out = Vec::with_capacity(runs.len());
        let mut pos = offset;
        let mut block = first;
        for (present, n) in runs {
            block += n;
            let run_end = block.saturating_mul(bs).min(end);
            let flags = if present { 0 } else { 3 };
            out.push(StatusExtent {
                length: (run_end - pos) as u32,
                flags,
            });
            pos = run_end;
        }
        out
    }
}

/// Waiters of one GET each need their own error value (same kind, same message).
fn clone_error(e: &BackendError) -> BackendError {
    match e {
        BackendError::Corrupt { key, reason } => BackendError::Corrupt {
            key: key.clone(),
            reason: reason.clone(),
        },
        other if other.is_retryable() => BackendError::Transient(other.to_string()),
        other => BackendError::Permanent(other.to_string()),
    }
}

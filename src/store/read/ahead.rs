//! Read-ahead: a reader that moves forward block after block is detected and the blocks in
//! front of it fetched before it asks; prefetch fetches a range on a client's hint.
//!
//! The window starts small and doubles each time the reader reaches blocks that read-ahead
//! fetched (so it only grows while the fetched blocks are actually used), up to a ceiling
//! taken from the memory budget; a read away from the stream ends it and the window starts
//! over. Random reads almost never look like a stream (two reads in a row would each have to
//! land on the next block), so they reach the object store one GET per block.

use crate::store::stats::Counters;
use crate::store::{Inner, StoreError};
use std::ops::Range;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

/// Reads that moved the stream forward before anything is fetched ahead.
const TRIGGER: u32 = 2;
/// The first window, in blocks.
const FIRST_WINDOW: u64 = 4;
/// The largest window in bytes, whatever the memory budget allows: at 128 KiB blocks two
/// rounds of GET slots, far more than a distant store needs to keep a reader busy.
const MAX_WINDOW_BYTES: u64 = 16 << 20;
/// Pipelined requests are noted slightly out of order: a read this many times its own length
/// (in blocks, at most `MAX_SLACK`) behind or past the stream's end still belongs to it.
const SLACK_PER_BLOCK: u64 = 4;
const MAX_SLACK: u64 = 64;

/// Sequential-read detector of one export (one stream).
#[derive(Debug, Default)]
pub(crate) struct ReadAhead {
    /// Block just past the furthest read of the stream.
    frontier: u64,
    /// Reads in a row that moved the frontier forward (a read within the blocks already read
    /// neither counts nor breaks the stream).
    run: u32,
    /// Blocks fetched per batch now; 0 = not fetching ahead.
    window: u64,
    /// First block not fetched ahead yet.
    next: u64,
    /// First block of the latest batch: the reader reaching it has used what was fetched,
    /// which sends the next, twice as large, batch.
    mark: u64,
}

impl ReadAhead {
    /// Notes a read of blocks `first..=last` and returns the blocks to fetch ahead now (empty
    /// for most reads). `ceiling` is the largest window, `end` the block count.
    pub(crate) fn observe(&mut self, first: u64, last: u64, ceiling: u64, end: u64) -> Range<u64> {
        let len = last.saturating_sub(first).saturating_add(1);
        let slack = len.saturating_mul(SLACK_PER_BLOCK).min(MAX_SLACK);
        let past = last.saturating_add(1);
        let in_stream = self.frontier != 0
            && first <= self.frontier.saturating_add(slack)
            && past.saturating_add(slack) >= self.frontier;
        if !in_stream {
            *self = ReadAhead {
                frontier: past,
                run: 0,
                window: 0,
                next: past,
                mark: past,
            };
            return 0..0;
        }
        if past <= self.frontier {
            return 0..0;
        }
        self.frontier = past;
        self.run = self.run.saturating_add(1);
        let ceiling = ceiling.max(1);
        if self.window == 0 {
            if self.run < TRIGGER {
                return 0..0;
            }
            self.window = FIRST_WINDOW.min(ceiling);
        } else if last >= self.mark {
            self.window = self.window.saturating_mul(2).min(ceiling);
        } else {
            return 0..0;
        }
        let from = self.next.max(past);
        let to = from.saturating_add(self.window).min(end);
        self.mark = from;
        self.next = to.max(self.next);
        from..to.max(from)
    }

    /// Blocks fetched per batch now (0: the reader is not a stream).
    #[cfg(test)]
    pub(crate) fn window(&self) -> u64 {
        self.window
    }
}

impl Inner {
    /// Feeds the sequential detector and starts the GETs it asks for.
    pub(super) fn note_read(self: &Arc<Self>, first: u64, last: u64) {
        let ceiling = (self.budget.memory_limit() / 8).min(MAX_WINDOW_BYTES) / self.geo.block_size;
        let end = self.geo.block_count(self.size.load(SeqCst));
        let fetch = self.rd.readahead.lock().observe(first, last, ceiling, end);
        for b in fetch {
            if self.ensure_loading(b).is_some() {
                Counters::bump(&self.counters.readahead);
            }
        }
    }

    /// A client's hint that it will read the range: fetches it and returns once it is cached.
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
}

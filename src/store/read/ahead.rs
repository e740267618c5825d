//! Read-ahead: reads that follow each other are detected and the blocks after them fetched
//! before they are asked for; prefetch fetches a range on a client's hint.

use crate::store::stats::Counters;
use crate::store::{Inner, StoreError};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

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

impl Inner {
    /// Feeds the sequential detector; fetches ahead once reads look sequential.
    pub(super) fn note_read(self: &Arc<Self>, first: u64, last: u64) {
        let (from, to) = {
            let mut ra = self.rd.readahead.lock();
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

//! The shapes a read and a status query answer in: a read's data and zero pieces, and the
//! allocation runs of a range from the presence map.

use crate::store::cache::{Buf, BufOwner};
use crate::store::{Allocation, Extent, Inner, StatusExtent};
use bytes::Bytes;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

/// Pieces at least this long are sent straight from the cached block (the reply shares the
/// buffer) instead of being copied: a 1 MiB read then costs no allocation, page faults or
/// memcpy. Smaller pieces are copied, since sharing would make a concurrent write to the
/// block copy all of it (copy-on-write) to change a few bytes.
const SHARE_MIN: usize = 32 * 1024;

/// Accumulates a read's result, merging adjacent copied data and adjacent zeros.
pub(super) struct Extents {
    out: Vec<Extent>,
    cur: Vec<u8>,
    remaining: usize,
}

impl Extents {
    pub fn new(len: usize) -> Self {
        Self {
            out: Vec::new(),
            cur: Vec::new(),
            remaining: len,
        }
    }
    /// `range` of a cached block: shared when large, copied when small.
    pub fn data(&mut self, buf: &Buf, range: std::ops::Range<usize>) {
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
    pub fn zero(&mut self, n: usize) {
        self.flush_data();
        self.remaining -= n;
        let n = n as u32;
        match self.out.last_mut() {
            Some(Extent::Zero(z)) => *z += n,
            _ => self.out.push(Extent::Zero(n)),
        }
    }
    pub fn finish(mut self) -> Vec<Extent> {
        self.flush_data();
        if self.out.is_empty() {
            self.out.push(Extent::Zero(0));
        }
        self.out
    }
}

impl Inner {
    /// Allocation of the range from the presence map: adjacent equal blocks merge into one
    /// extent.
    pub(crate) fn block_status(&self, offset: u64, len: u32) -> Vec<StatusExtent> {
        let size = self.size.load(SeqCst);
        let end = offset.saturating_add(u64::from(len)).min(size);
        if end <= offset {
            return vec![StatusExtent {
                len,
                allocation: Allocation::Hole,
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
            let allocation = if present {
                Allocation::Data
            } else {
                Allocation::Hole
            };
            out.push(StatusExtent {
                len: (run_end - pos) as u32,
                allocation,
            });
            pos = run_end;
        }
        out
    }
}

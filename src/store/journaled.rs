//! `durability = "local"`: the store's side of the journal. Every change is appended to the
//! journal under the block's shard lock (so journal order and cache order agree for each
//! block), FLUSH and FUA wait for an fsync of the journal instead of S3, and write-back is
//! ordered by epochs (see `writeback`). At open the journal a previous process left is
//! replayed, epoch by epoch, and uploaded before the export is served.

use super::cache::{Content, Frozen, Slot};
use super::crash::crash_point;
use super::{Inner, StoreError};
use crate::journal::{self, Entry, Journal, Kind, Reservation};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

/// What replay did, for the log line.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    pub writes: u64,
    pub zeroes: u64,
    pub flushes: u64,
    pub bytes: u64,
}

impl Inner {
    /// The journal, once replay is over and changes are journaled.
    pub(crate) fn live_journal(&self) -> Option<&Journal> {
        self.journal
            .as_ref()
            .filter(|_| self.journal_live.load(SeqCst))
    }

    /// Room for a record of `payload` bytes (none without a live journal). Waits while the
    /// journal is full, pushing uploads meanwhile so its space comes back.
    pub(crate) async fn journal_room(&self, payload: usize) -> Option<Reservation> {
        let j = self.live_journal()?;
        let bytes = (journal::record::HEADER + payload) as u64;
        Some(j.reserve(bytes, || self.push_uploads()).await)
    }

    /// The journal is full: everything dirty now is stored as soon as epoch order allows,
    /// and the open segment is closed as soon as nothing is pending.
    fn push_uploads(&self) {
        let wb = &self.wb;
        wb.flush_target.fetch_max(wb.next_seq.load(SeqCst), SeqCst);
        wb.kick.notify_one();
        self.release_journal(false);
    }

    /// Tells the journal how far S3 has caught up (after each stored version).
    pub(crate) fn release_journal(&self, all: bool) {
        let Some(j) = &self.journal else { return };
        let (stored_below, next) = self.stored_progress();
        j.release(stored_below, next, all);
    }

    /// (every change below this is stored, the next change number), read together.
    fn stored_progress(&self) -> (u64, u64) {
        let q = self.wb.queue.lock();
        let next = self.wb.next_seq.load(SeqCst);
        (q.oldest_unstored().unwrap_or(next), next)
    }

    /// After a complete shutdown flush: the journal holds nothing S3 lacks, so its segments
    /// go now (a clean stop leaves nothing to replay).
    pub(crate) async fn settle_journal(&self) {
        let Some(j) = &self.journal else { return };
        let (stored_below, next) = self.stored_progress();
        if stored_below >= next {
            j.settle(stored_below, next, std::time::Duration::from_secs(5))
                .await;
        }
    }

    /// Under the shard lock, before a change to a dirty block: if its unstored changes
    /// belong to an epoch a FLUSH has closed, they become a frozen version (the buffer is
    /// shared; the change about to be made copies it).
    pub(crate) fn freeze_if_crossing(&self, slot: &mut Slot) {
        if !self.wb.ordered {
            return;
        }
        let Some(seq) = slot.dirty_seq else { return };
        if seq >= self.wb.last_boundary.load(SeqCst) {
            return;
        }
        let Content::Ready(content) = &slot.content else {
            return; // a dirty block is never loading
        };
        let content = content.clone();
        let pages = slot.pages.take();
        slot.dirty_seq = None;
        slot.frozen.push(Frozen {
            seq,
            content,
            pages,
        });
    }

    /// Under the shard lock, once a change is applied: its record joins the journal.
    pub(crate) fn journal_change(&self, kind: Kind<'_>, room: Option<Reservation>) {
        let Some(j) = self.live_journal() else { return };
        let room = match room {
            Some(r) => r,
            // Not reserved (cannot happen: the caller reserves first); never lose the record.
            None => j.force_room(kind.encoded_len() as u64),
        };
        j.append(kind, room, self.wb.next_seq.load(SeqCst));
    }

    /// FLUSH of a journaled export: closes the epoch, then waits for the journal's fsync.
    pub(crate) async fn flush_local(&self, j: &Journal) -> Result<(), StoreError> {
        let position = {
            let mut q = self.wb.queue.lock();
            let boundary = self.wb.next_seq.load(SeqCst);
            self.wb.last_boundary.store(boundary, SeqCst);
            q.add_boundary(boundary);
            j.mark_flush(boundary)
        };
        self.sync_journal(j, position).await
    }

    /// FUA on a journaled export: the records so far are fsynced.
    pub(crate) async fn sync_fua(&self) -> Result<(), StoreError> {
        match self.live_journal() {
            Some(j) => self.sync_journal(j, j.position()).await,
            None => Ok(()),
        }
    }

    async fn sync_journal(&self, j: &Journal, position: u64) -> Result<(), StoreError> {
        j.sync(position)
            .await
            .map_err(|e| StoreError::Journal(e.to_string()))?;
        crash_point("journal-synced");
        Ok(())
    }

    /// Applies what a previous process journaled, in order, with its epochs, then stores
    /// it all in S3 (flush order kept) before the export is served. Records are not
    /// journaled again: the old segments stay until S3 has everything, then go.
    pub(crate) async fn replay(
        self: &Arc<Self>,
        scanned: journal::Scanned,
    ) -> Result<Replayed, StoreError> {
        let mut done = Replayed::default();
        let size = self.size.load(SeqCst);
        for rec in scanned.records {
            let (offset, len) = match &rec.entry {
                Entry::Write { offset, data } => (*offset, data.len() as u64),
                Entry::Zero { offset, len } => (*offset, u64::from(*len)),
                Entry::Flush => {
                    done.flushes += 1;
                    let mut q = self.wb.queue.lock();
                    let boundary = self.wb.next_seq.load(SeqCst);
                    self.wb.last_boundary.store(boundary, SeqCst);
                    q.add_boundary(boundary);
                    continue;
                }
            };
            if offset.checked_add(len).map_or(true, |end| end > size) {
                return Err(StoreError::Journal(format!(
                    "journal record {} writes {len} bytes at {offset}, beyond the export's \
                     {size} bytes; the journal was left by a larger export (it is kept)",
                    rec.number
                )));
            }
            match &rec.entry {
                Entry::Write { data, .. } => {
                    done.writes += 1;
                    done.bytes += len;
                    self.write(offset, Some(data), len, false).await?;
                }
                _ => {
                    done.zeroes += 1;
                    self.write(offset, None, len, false).await?;
                }
            }
        }
        crash_point("journal-replay-applied");
        self.shutdown_flush(None).await?;
        crash_point("journal-replay-stored");
        Ok(done)
    }
}

//! The dirty queue: blocks waiting for a write-back task, ordered by their first change and
//! by when they fall due, and the oldest unstored change of every block FLUSH must wait for.
//! A journaled export also keeps its epoch boundaries here (the change numbers at which
//! FLUSHes closed an epoch), so the dispatcher can tell which versions may go to S3 now.

use std::collections::{BTreeMap, BTreeSet};
use tokio::time::Instant;

/// Dirty blocks waiting for a write-back task, and every block not yet stored.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Waiting blocks by the sequence number of their first change: seq → (block, due).
    pub(super) by_seq: BTreeMap<u64, (u64, Instant)>,
    /// The same blocks by due time: (due, seq) → block.
    pub(super) by_due: BTreeMap<(Instant, u64), u64>,
    /// Oldest unstored change of every dirty or in-flight block: seq → block.
    unstored: BTreeMap<u64, u64>,
    /// Journaled exports: change numbers at which a FLUSH closed an epoch, not yet passed.
    boundaries: BTreeSet<u64>,
}

impl Queue {
    /// A block became dirty with change `seq` (first change, or changed again while its PUT
    /// was in flight): it is unstored and waits for write-back until `due`.
    pub fn add(&mut self, seq: u64, block: u64, due: Instant) {
        self.unstored.insert(seq, block);
        self.by_seq.insert(seq, (block, due));
        self.by_due.insert((due, seq), block);
    }

    /// Moves a queued block to the front of the due order (it became fully written);
    /// true if it moved.
    pub fn make_due(&mut self, seq: u64, now: Instant) -> bool {
        match self.by_seq.get_mut(&seq) {
            Some((block, due)) if *due > now => {
                let block = *block;
                self.by_due.remove(&(*due, seq));
                *due = now;
                self.by_due.insert((now, seq), block);
                true
            }
            _ => false,
        }
    }

    /// Takes the block queued under `seq` (a write-back task now owns it); it stays unstored.
    pub fn take(&mut self, seq: u64) -> Option<u64> {
        let (block, due) = self.by_seq.remove(&seq)?;
        self.by_due.remove(&(due, seq));
        Some(block)
    }

    /// Change `seq` is in the object store.
    pub fn stored(&mut self, seq: u64) {
        self.unstored.remove(&seq);
    }

    /// The oldest queued changes (background write-back looks for a cold one among them).
    pub fn oldest(&self, n: usize) -> Vec<(u64, u64)> {
        self.by_seq
            .iter()
            .take(n)
            .map(|(s, (b, _))| (*s, *b))
            .collect()
    }

    /// Whether any change below `seq` is still unstored.
    pub fn pending_below(&self, seq: u64) -> bool {
        self.unstored
            .first_key_value()
            .is_some_and(|(s, _)| *s < seq)
    }

    /// A FLUSH closed an epoch: changes numbered `seq` and above belong to later ones.
    pub fn add_boundary(&mut self, seq: u64) {
        if self.boundaries.last().map_or(true, |&b| b < seq) {
            self.boundaries.insert(seq);
        }
    }

    /// Versions numbered below this may be uploaded now: the end of the oldest epoch that
    /// still has an unstored change (`u64::MAX` when that is the open epoch, or nothing is
    /// unstored). A version is uploaded only once every earlier epoch is in S3.
    pub fn upload_limit(&mut self) -> u64 {
        let Some(&oldest) = self.unstored.keys().next() else {
            self.boundaries.clear();
            return u64::MAX;
        };
        while self.boundaries.first().is_some_and(|&b| b <= oldest) {
            self.boundaries.pop_first();
        }
        self.boundaries.first().copied().unwrap_or(u64::MAX)
    }

    /// The oldest unstored change, if any.
    pub fn oldest_unstored(&self) -> Option<u64> {
        self.unstored.keys().next().copied()
    }

    /// Blocks with unstored changes.
    pub fn unstored_count(&self) -> usize {
        self.unstored.len()
    }

    /// The blocks with unstored changes, oldest change first.
    pub fn unstored_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.unstored.values().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn taken_blocks_stay_unstored_until_stored() {
        let now = Instant::now();
        let mut q = Queue::default();
        q.add(1, 10, now + Duration::from_secs(5));
        q.add(2, 20, now);
        assert!(q.make_due(1, now), "a later due time moves forward");
        assert!(!q.make_due(2, now), "already due");
        assert_eq!(q.oldest(5), vec![(1, 10), (2, 20)]);
        assert_eq!(q.take(1), Some(10));
        assert_eq!(q.take(1), None);
        assert_eq!(q.oldest(5), vec![(2, 20)]);
        assert!(q.pending_below(2) && !q.pending_below(1));
        q.stored(1);
        assert!(!q.pending_below(2) && q.pending_below(3));
        assert_eq!(q.unstored_blocks().collect::<Vec<_>>(), vec![20]);
        assert_eq!(q.unstored_count(), 1);
        assert_eq!(q.by_due.len(), 1);
    }

    #[test]
    fn the_upload_limit_is_the_end_of_the_oldest_unfinished_epoch() {
        let now = Instant::now();
        let mut q = Queue::default();
        assert_eq!(q.upload_limit(), u64::MAX);
        q.add(1, 10, now);
        q.add(2, 20, now);
        q.add_boundary(3);
        q.add(3, 30, now);
        q.add_boundary(4);
        q.add_boundary(4);
        q.add(5, 50, now);
        assert_eq!(q.upload_limit(), 3, "epoch [1, 3) first");
        q.stored(1);
        assert_eq!(q.upload_limit(), 3, "block 20 of that epoch is still out");
        q.stored(2);
        assert_eq!(q.upload_limit(), 4);
        q.stored(3);
        assert_eq!(q.upload_limit(), u64::MAX, "only the open epoch is left");
        q.stored(5);
        assert_eq!(q.upload_limit(), u64::MAX);
        assert!(q.boundaries.is_empty());
    }
}

//! The dirty queue: blocks waiting for a write-back task, ordered by their first change and
//! by when they fall due, and the oldest unstored change of every block FLUSH must wait for.

use std::collections::BTreeMap;
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
}

//! Which blocks hold data, as seen by readers: built from one LIST at open (by `layers`), then kept current by
//! every write. A read of a block that is neither cached nor present costs no S3 call, and
//! block status is answered from here alone.
//!
//! Stored as a sparse bitmap (4096 blocks per 512-byte leaf), so memory follows the data
//! written, not the export size: a 100 TiB thin export that holds 1 GiB costs a few KiB.

use parking_lot::RwLock;
use std::collections::BTreeMap;

const LEAF_BITS: u64 = 4096;
const WORDS: usize = (LEAF_BITS / 64) as usize;

/// Sparse set of block indices holding non-zero data.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    leaves: RwLock<BTreeMap<u64, Box<[u64; WORDS]>>>,
}

fn split(block: u64) -> (u64, usize, u64) {
    let leaf = block / LEAF_BITS;
    let bit = block % LEAF_BITS;
    (leaf, (bit / 64) as usize, 1u64 << (bit % 64))
}

impl Presence {
    /// Whether the block holds data.
    pub fn get(&self, block: u64) -> bool {
        let (leaf, word, mask) = split(block);
        self.leaves
            .read()
            .get(&leaf)
            .is_some_and(|w| w[word] & mask != 0)
    }

    /// Records that the block now holds data (`true`) or reads as zeros (`false`).
    pub fn set(&self, block: u64, present: bool) {
        let (leaf, word, mask) = split(block);
        if self.get(block) == present {
            return;
        }
        let mut leaves = self.leaves.write();
        if present {
            leaves.entry(leaf).or_insert_with(|| Box::new([0; WORDS]))[word] |= mask;
        } else if let Some(w) = leaves.get_mut(&leaf) {
            w[word] &= !mask;
            if w.iter().all(|x| *x == 0) {
                leaves.remove(&leaf);
            }
        }
    }

    /// Takes over `other`'s blocks (a rollback changed what the export reads as).
    pub fn replace(&self, other: Presence) {
        *self.leaves.write() = other.leaves.into_inner();
    }

    /// An independent copy (a snapshot's view of a frozen layer).
    pub fn copy(&self) -> Self {
        Self {
            leaves: RwLock::new(self.leaves.read().clone()),
        }
    }

    /// Calls `f` with every present block, in order. `f` runs without the lock held, so it
    /// may look at this map (or change it) itself.
    pub fn for_each(&self, mut f: impl FnMut(u64)) {
        let mut blocks = Vec::new();
        {
            let leaves = self.leaves.read();
            for (leaf, words) in leaves.iter() {
                for (w, word) in words.iter().enumerate() {
                    let mut bits = *word;
                    while bits != 0 {
                        let bit = u64::from(bits.trailing_zeros());
                        blocks.push(leaf * LEAF_BITS + w as u64 * 64 + bit);
                        bits &= bits - 1;
                    }
                }
            }
        }
        blocks.into_iter().for_each(&mut f);
    }

    /// Number of present blocks (metrics, tests).
    pub fn count(&self) -> u64 {
        let leaves = self.leaves.read();
        leaves
            .values()
            .flat_map(|w| w.iter())
            .map(|x| u64::from(x.count_ones()))
            .sum()
    }

    /// Runs of equal presence over `[first, first+count)`, in order, adjacent runs merged.
    pub fn runs(&self, first: u64, count: u64) -> Vec<(bool, u64)> {
        let leaves = self.leaves.read();
        let mut out: Vec<(bool, u64)> = Vec::new();
        let end = first.saturating_add(count);
        let mut b = first;
        while b < end {
            let (leaf, _, _) = split(b);
            let leaf_end = (leaf + 1).saturating_mul(LEAF_BITS).min(end);
            match leaves.get(&leaf) {
                None => push_run(&mut out, false, leaf_end - b),
                Some(words) => {
                    for x in b..leaf_end {
                        let (_, word, mask) = split(x);
                        push_run(&mut out, words[word] & mask != 0, 1);
                    }
                }
            }
            b = leaf_end;
        }
        out
    }
}

fn push_run(out: &mut Vec<(bool, u64)>, present: bool, n: u64) {
    match out.last_mut() {
        Some((p, len)) if *p == present => *len += n,
        _ => out.push((present, n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_runs_merge_adjacent_equal_blocks() {
        let p = Presence::default();
        for b in [1, 2, 5, 4095, 4096, 9000] {
            p.set(b, true);
        }
        p.set(9000, false);
        assert!(!p.get(9000));
        assert_eq!(
            p.runs(0, 10000),
            vec![
                (false, 1),
                (true, 2),
                (false, 2),
                (true, 1),
                (false, 4089),
                (true, 2),
                (false, 5903)
            ]
        );
        assert_eq!(p.runs(2, 2), vec![(true, 1), (false, 1)]);
        assert_eq!(p.count(), 5);
        let mut seen = Vec::new();
        p.copy().for_each(|b| seen.push(b));
        assert_eq!(seen, [1, 2, 5, 4095, 4096]);
    }
}

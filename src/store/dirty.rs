//! Which pages of a cached block changed since write-back last took it. The dirty limit counts
//! these pages, not whole blocks: a 4 KiB write is 4 KiB of data at risk, so random small
//! writes can use the whole dirty allowance before writers wait (whole blocks are still
//! bounded by the memory budget, and write-back still sends whole blocks).

/// Accounting granularity of dirty data (or the block size, if smaller).
pub(crate) const PAGE: usize = 4096;

/// Dirty-page bitmap of one block.
#[derive(Debug, Default)]
pub(crate) struct PageMap {
    words: Vec<u64>,
    count: u32,
}

/// Page geometry of an export.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pages {
    pub size: usize,
    pub per_block: usize,
}

impl Pages {
    /// Pages of `block_size`-byte blocks.
    pub fn new(block_size: usize) -> Self {
        let size = PAGE.min(block_size).max(1);
        Self {
            size,
            per_block: block_size.div_ceil(size),
        }
    }
    /// Pages touched by `len` bytes at `start` within a block (inclusive range).
    pub fn span(&self, start: usize, len: usize) -> (usize, usize) {
        (start / self.size, (start + len.max(1) - 1) / self.size)
    }
    /// Bytes of `n` pages.
    pub fn bytes(&self, n: u32) -> u64 {
        u64::from(n) * self.size as u64
    }
}

impl PageMap {
    fn ensure(&mut self, pages: Pages) {
        if self.words.is_empty() {
            self.words = vec![0; pages.per_block.div_ceil(64)];
        }
    }

    /// How many of pages `first..=last` are not dirty yet.
    pub fn clean_in(&self, first: usize, last: usize) -> u32 {
        if self.words.is_empty() {
            return (last - first + 1) as u32;
        }
        (first..=last)
            .filter(|p| self.words[p / 64] & (1 << (p % 64)) == 0)
            .count() as u32
    }

    /// Marks pages `first..=last` dirty; returns how many were clean before.
    pub fn mark(&mut self, pages: Pages, first: usize, last: usize) -> u32 {
        self.ensure(pages);
        let mut fresh = 0;
        for p in first..=last {
            let w = &mut self.words[p / 64];
            if *w & (1 << (p % 64)) == 0 {
                *w |= 1 << (p % 64);
                fresh += 1;
            }
        }
        self.count += fresh;
        fresh
    }

    /// Dirty pages now.
    #[cfg(test)]
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether every page of the block is dirty (a sequential writer finished it).
    pub fn is_full(&self, pages: Pages) -> bool {
        self.count as usize >= pages.per_block
    }

    /// Clears the map (write-back took a snapshot); returns the pages that were dirty.
    pub fn take(&mut self) -> u32 {
        self.words.iter_mut().for_each(|w| *w = 0);
        std::mem::take(&mut self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_counts_and_clears_pages() {
        let pages = Pages::new(128 * 1024);
        assert_eq!(pages.per_block, 32);
        assert_eq!(pages.span(4095, 2), (0, 1));
        assert_eq!(pages.span(0, 128 * 1024), (0, 31));
        let mut m = PageMap::default();
        assert_eq!(m.clean_in(0, 1), 2);
        assert_eq!(m.mark(pages, 0, 1), 2);
        assert_eq!(m.mark(pages, 1, 3), 2);
        assert_eq!(m.clean_in(0, 4), 1);
        assert_eq!(m.count(), 4);
        assert!(!m.is_full(pages));
        m.mark(pages, 0, 31);
        assert!(m.is_full(pages));
        assert_eq!(m.take(), 32);
        assert_eq!(m.count(), 0);
        assert_eq!(m.clean_in(0, 31), 32);
    }

    #[test]
    fn small_blocks_are_one_page() {
        let pages = Pages::new(512);
        assert_eq!((pages.size, pages.per_block), (512, 1));
        assert_eq!(pages.span(0, 512), (0, 0));
        assert_eq!(pages.bytes(3), 1536);
    }
}

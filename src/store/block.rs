//! Byte-range → block arithmetic. Every request is cut into per-block pieces here, once, with
//! checked arithmetic, so the cache code never does offset math of its own.

use super::StoreError;

/// The part of one block a request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// Block index (object number).
    pub block: u64,
    /// First byte inside the block.
    pub start: usize,
    /// Bytes inside the block.
    pub len: usize,
    /// Where this piece starts inside the request's buffer.
    pub buf_off: usize,
}

impl Chunk {
    /// Whether the piece covers the whole block (no read-modify-write needed).
    pub fn is_whole(&self, block_size: usize) -> bool {
        self.start == 0 && self.len == block_size
    }
}

/// Block geometry of one export.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub block_size: u64,
}

impl Geometry {
    /// Cuts `[offset, offset+len)` into block pieces after checking it lies inside `size`.
    pub fn chunks(&self, offset: u64, len: u64, size: u64) -> Result<Vec<Chunk>, StoreError> {
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= size)
            .ok_or(StoreError::OutOfRange { offset, len, size })?;
        let bs = self.block_size;
        let mut out = Vec::with_capacity((len / bs + 2) as usize);
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let start = pos % bs;
            let piece = (bs - start).min(end - pos);
            out.push(Chunk {
                block,
                start: start as usize,
                len: piece as usize,
                buf_off: (pos - offset) as usize,
            });
            pos += piece;
        }
        Ok(out)
    }

    /// Number of blocks needed to hold `size` bytes (the last one may be partly past the end).
    pub fn block_count(&self, size: u64) -> u64 {
        size.div_ceil(self.block_size)
    }
}

/// Cheap all-zero test: ORs 512-byte pieces (the compiler vectorises the fold) and stops at
/// the first piece with a set bit, so non-zero data is rejected almost immediately.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    data.chunks(512)
        .all(|piece| piece.iter().fold(0u8, |acc, b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(bs: u64) -> Geometry {
        Geometry { block_size: bs }
    }

    #[test]
    fn cuts_unaligned_range_into_pieces() {
        let c = g(16).chunks(10, 30, 100).unwrap();
        assert_eq!(
            c,
            vec![
                Chunk {
                    block: 0,
                    start: 10,
                    len: 6,
                    buf_off: 0
                },
                Chunk {
                    block: 1,
                    start: 0,
                    len: 16,
                    buf_off: 6
                },
                Chunk {
                    block: 2,
                    start: 0,
                    len: 8,
                    buf_off: 22
                },
            ]
        );
        assert!(c[1].is_whole(16));
        assert!(!c[0].is_whole(16));
    }

    #[test]
    fn empty_range_has_no_pieces() {
        assert!(g(16).chunks(16, 0, 16).unwrap().is_empty());
    }

    #[test]
    fn refuses_ranges_past_the_end_or_overflowing() {
        assert!(matches!(
            g(16).chunks(90, 11, 100),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            g(16).chunks(u64::MAX, 2, u64::MAX),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(g(16).chunks(90, 10, 100).is_ok());
    }

    #[test]
    fn block_count_rounds_up() {
        assert_eq!(g(16).block_count(0), 0);
        assert_eq!(g(16).block_count(16), 1);
        assert_eq!(g(16).block_count(17), 2);
    }

    #[test]
    fn zero_test_finds_a_single_set_byte_anywhere() {
        let mut v = vec![0u8; 1027];
        assert!(is_zero(&v[1..]));
        for i in [0, 1, 7, 8, 500, 1026] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            assert!(!is_zero(&v[i..]), "slice from {i}");
            v[i] = 0;
        }
    }
}

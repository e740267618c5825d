//! Recycles large buffers: cache blocks and big WRITE payloads. The allocator is pinned to
//! give every allocation of 64 KiB or more its own mapping (`service::allocator`), so freed
//! blocks go back to the OS and RSS stays within `[cache] memory`; the price was a fresh
//! mmap, one page fault per 4 KiB and a munmap for every such buffer (about a fifth of the
//! CPU of large sequential I/O). The pool keeps freed buffers for reuse instead, up to a
//! fixed number of bytes, so the memory bound still holds: RSS may exceed the budget by at
//! most the pool's limit. One pool belongs to the process-wide [`CacheBudget`], so it is
//! created, sized and dropped with it (no process static: tests get their own).
//!
//! [`CacheBudget`]: super::CacheBudget

use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

/// Smallest pooled size (2^16 = 64 KiB): below it malloc's arenas recycle memory well.
const MIN_SHIFT: u32 = 16;
/// Largest pooled size (2^25 = 32 MiB, the largest request the server accepts).
const MAX_SHIFT: u32 = 25;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Free buffers by size class (powers of two only).
pub(crate) struct BufferPool {
    lists: Mutex<[Vec<Box<[u8]>>; CLASSES]>,
    held: AtomicUsize,
    limit: AtomicUsize,
}

const EMPTY: Vec<Box<[u8]>> = Vec::new();

/// The size class of a `len`-byte buffer, if such buffers are pooled.
fn class(len: usize) -> Option<usize> {
    let shift = len.trailing_zeros();
    (len.is_power_of_two() && (MIN_SHIFT..=MAX_SHIFT).contains(&shift))
        .then(|| (shift - MIN_SHIFT) as usize)
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("held", &self.held.load(SeqCst))
            .field("limit", &self.limit.load(SeqCst))
            .finish()
    }
}

impl BufferPool {
    /// A pool keeping at most `limit` bytes of free buffers.
    pub(crate) fn new(limit: usize) -> Self {
        BufferPool {
            lists: Mutex::new([EMPTY; CLASSES]),
            held: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
        }
    }

    /// A recycled buffer of exactly `len` bytes, if one is free.
    fn reuse(&self, len: usize) -> Option<Box<[u8]>> {
        let buf = self.lists.lock()[class(len)?].pop()?;
        self.held.fetch_sub(len, SeqCst);
        Some(buf)
    }

    /// Hands a buffer back for reuse; it is freed instead if it is not a pooled size or the
    /// pool is full.
    pub(crate) fn give(&self, buf: Box<[u8]>) {
        let len = buf.len();
        let Some(c) = class(len) else { return };
        let limit = self.limit.load(SeqCst);
        if self.held.fetch_add(len, SeqCst) + len > limit {
            self.held.fetch_sub(len, SeqCst);
            return; // dropped here, outside the lock
        }
        self.lists.lock()[c].push(buf);
    }
}

/// Whether buffers of `len` bytes are pooled (powers of two from 64 KiB to 32 MiB).
pub(crate) fn is_pooled(len: usize) -> bool {
    class(len).is_some()
}

impl BufferPool {
    /// A buffer of exactly `len` bytes whose content is unspecified (old data when
    /// recycled): for callers that overwrite all of it.
    pub(crate) fn take(&self, len: usize) -> Box<[u8]> {
        self.reuse(len)
            .unwrap_or_else(|| vec![0u8; len].into_boxed_slice())
    }

    /// A buffer of exactly `len` zero bytes.
    pub(crate) fn take_zeroed(&self, len: usize) -> Box<[u8]> {
        match self.reuse(len) {
            Some(mut buf) => {
                buf.fill(0);
                buf
            }
            None => vec![0u8; len].into_boxed_slice(),
        }
    }

    /// A `len`-byte buffer (content unspecified) that comes back here when dropped.
    pub(crate) fn take_owned(self: &Arc<Self>, len: usize) -> Pooled {
        Pooled {
            buf: self.take(len),
            pool: Arc::clone(self),
        }
    }
}

/// A pooled buffer that goes back to the pool when dropped; as the owner of a [`Bytes`]
/// (`Bytes::from_owner`) it lets a WRITE payload be read without a fresh mapping.
///
/// [`Bytes`]: bytes::Bytes
pub(crate) struct Pooled {
    buf: Box<[u8]>,
    pool: Arc<BufferPool>,
}

impl Pooled {
    /// Wraps `buf` so that it returns to `pool` unless taken out with [`Pooled::into_inner`].
    pub(crate) fn new(buf: Box<[u8]>, pool: &Arc<BufferPool>) -> Self {
        Pooled {
            buf,
            pool: Arc::clone(pool),
        }
    }

    /// The buffer, which the caller now owns (it no longer returns to the pool on its own).
    pub(crate) fn into_inner(mut self) -> Box<[u8]> {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn buf_mut(&mut self) -> &mut Box<[u8]> {
        &mut self.buf
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_powers_of_two_from_64k_to_32m_are_pooled() {
        assert_eq!(class(64 * 1024), Some(0));
        assert_eq!(class(128 * 1024), Some(1));
        assert_eq!(class(32 << 20), Some(CLASSES - 1));
        assert_eq!(class(32 * 1024), None);
        assert_eq!(class(64 << 20), None);
        assert_eq!(class(100_000), None);
        assert_eq!(class(0), None);
    }

    #[test]
    fn buffers_are_reused_up_to_the_limit() {
        let pool = BufferPool::new(256 * 1024);
        let len = 128 * 1024;
        pool.give(vec![0u8; len].into_boxed_slice());
        pool.give(vec![0u8; len].into_boxed_slice());
        pool.give(vec![0u8; len].into_boxed_slice()); // past the limit: freed
        pool.give(vec![0u8; 1000].into_boxed_slice()); // not a pooled size
        assert_eq!(pool.held.load(SeqCst), 2 * len);
        let again = pool.reuse(len).unwrap();
        assert_eq!(again.len(), len);
        assert!(pool.reuse(len).is_some());
        assert!(pool.reuse(len).is_none());
        assert!(pool.reuse(64 * 1024).is_none());
        assert_eq!(pool.held.load(SeqCst), 0);
    }

    #[test]
    fn zeroed_buffers_are_zero_even_when_recycled() {
        let pool = BufferPool::new(16 << 20);
        let len = 8 << 20;
        let mut b = pool.take(len);
        b.fill(7);
        pool.give(b);
        let z = pool.take_zeroed(len);
        assert_eq!(z.len(), len);
        assert!(z.iter().all(|&x| x == 0));
    }
}

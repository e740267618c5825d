//! zstd with one reusable context per thread and level (a context costs far more to build
//! than a 128 KiB block costs to compress), and the rule that decides when to try at all.

use crate::store::presence::Presence;
use std::cell::RefCell;
use std::io::Cursor;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use zstd::bulk::{Compressor, Decompressor};

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Appends the zstd frame of `data` to `out` if it is shorter than `data`; `false` (and `out`
/// unchanged) when it would not shrink.
pub fn compress_into(level: i32, data: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    // Room for exactly one byte less than the input: zstd stops as soon as the frame would
    // not fit, so an incompressible block fails without producing its whole frame.
    out.reserve_exact(data.len().saturating_sub(1));
    let limit = start + data.len().saturating_sub(1);
    let written = COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().map_or(true, |(l, _)| *l != level) {
            *cell = Compressor::new(level).ok().map(|c| (level, c));
        }
        let (_, c) = cell.as_mut()?;
        let mut cursor = Cursor::new(&mut *out);
        cursor.set_position(start as u64);
        c.compress_to_buffer(data, &mut cursor).ok()
    });
    match written {
        Some(n) if start + n <= limit => true,
        _ => {
            out.truncate(start);
            false
        }
    }
}

/// The block in the zstd frame `frame`, which must decode to exactly `len` bytes (a frame
/// claiming more is refused without allocating more than `len`).
pub fn decompress(frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(len);
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
        }
        let Some(d) = cell.as_mut() else {
            return Err("zstd: no context".to_string());
        };
        d.decompress_to_buffer(frame, &mut out)
            .map_err(|e| format!("zstd: {e}"))
    })?;
    if out.len() != len {
        return Err(format!(
            "decompressed to {} bytes, expected {len}",
            out.len()
        ));
    }
    Ok(out)
}

/// When to try compressing: always, until several blocks in a row did not shrink (an
/// incompressible stream: encrypted files, media, a guest's own compressed data); from then
/// on one block in `PROBE_EVERY`, so a stream that turns compressible is noticed soon and an
/// incompressible one does not pay for a useless attempt on every write. A block that shrank
/// the last time it was tried is always tried: a compressible block rewritten in the middle
/// of an incompressible stream (file-system metadata between data writes) stays compressed.
#[derive(Debug, Default)]
pub struct Adaptive {
    /// Blocks whose last attempt shrank (a sparse bitmap: memory follows those blocks).
    shrank: Presence,
    /// Attempts in a row that did not shrink.
    misses: AtomicU32,
    /// Blocks stored raw without an attempt since the last probe.
    skipped: AtomicU32,
}

/// Misses in a row after which attempts become probes.
const MISSES_BEFORE_SKIPPING: u32 = 4;
/// While skipping, one block in this many is still tried.
const PROBE_EVERY: u32 = 16;

impl Adaptive {
    /// Whether to try compressing block `block` now.
    pub fn should_try(&self, block: u64) -> bool {
        if self.misses.load(Relaxed) < MISSES_BEFORE_SKIPPING || self.shrank.get(block) {
            return true;
        }
        let n = self.skipped.fetch_add(1, Relaxed);
        n % PROBE_EVERY == PROBE_EVERY - 1
    }

    /// Records the outcome of an attempt on `block`.
    pub fn record(&self, block: u64, shrank: bool) {
        self.shrank.set(block, shrank);
        if shrank {
            self.misses.store(0, Relaxed);
            self.skipped.store(0, Relaxed);
        } else {
            self.misses.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn compressible_data_shrinks_and_round_trips() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let mut out = b"head".to_vec();
        assert!(compress_into(3, &data, &mut out));
        assert!(out.len() < 1000, "{}", out.len());
        assert_eq!(&out[..4], b"head");
        assert_eq!(decompress(&out[4..], data.len()).expect("round trip"), data);
        // Another level in the same thread gets its own context.
        let mut out19 = Vec::new();
        assert!(compress_into(19, &data, &mut out19));
        assert_eq!(decompress(&out19, data.len()).expect("round trip"), data);
    }

    #[test]
    fn random_data_does_not_shrink_and_leaves_out_alone() {
        let mut data = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut data);
        let mut out = b"head".to_vec();
        assert!(!compress_into(3, &data, &mut out));
        assert_eq!(out, b"head");
    }

    #[test]
    fn frames_of_the_wrong_size_or_garbage_are_refused() {
        let data = vec![5u8; 4096];
        let mut frame = Vec::new();
        assert!(compress_into(3, &data, &mut frame));
        assert!(decompress(&frame, 4095).is_err(), "too big for the block");
        assert!(decompress(&frame, 8192)
            .expect_err("short")
            .contains("4096"));
        assert!(decompress(b"not zstd at all", 4096).is_err());
        assert!(decompress(&frame[..frame.len() - 2], 4096).is_err());
    }

    #[test]
    fn adaptive_skips_after_misses_and_probes_now_and_then() {
        let a = Adaptive::default();
        a.record(1000, true);
        for block in 0..u64::from(MISSES_BEFORE_SKIPPING) {
            assert!(a.should_try(block));
            a.record(block, false);
        }
        let tries = (0..PROBE_EVERY * 4).filter(|_| a.should_try(7)).count();
        assert_eq!(tries, 4);
        assert!(
            a.should_try(1000),
            "a block that shrank before is always tried"
        );
        a.record(5, true);
        assert!(a.should_try(6), "a block that shrank ends skipping");
    }
}

//! zstd with one reusable context per thread and level (a context costs far more to build
//! than a 128 KiB block costs to compress), and the rule that decides when to try at all.

use std::cell::RefCell;
use std::io::Cursor;
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

/// Bytes of each of the three slices (start, middle, end) a larger block is judged by.
const SLICE: usize = 4096;

/// Whether compressing `data` is worth a full attempt, judged by its bytes alone: a block of
/// more than three slices is tried only if its first, middle and last `SLICE` bytes, compressed
/// together, shrink. Incompressible data (encrypted files, media, a guest's own compressed
/// data) so costs an attempt on a tenth of each 128 KiB block instead of all of it, and the
/// decision never depends on other blocks: not on what was written before, nor on the order
/// in which write-back, many PUTs at once, happens to encode a flush's blocks.
pub fn worth_trying(level: i32, data: &[u8]) -> bool {
    if data.len() <= 3 * SLICE {
        return true;
    }
    let mid = data.len() / 2 - SLICE / 2;
    let mut sample = Vec::with_capacity(3 * SLICE);
    for at in [0, mid, data.len() - SLICE] {
        sample.extend_from_slice(&data[at..at + SLICE]);
    }
    let mut frame = Vec::new();
    compress_into(level, &sample, &mut frame)
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
    fn only_blocks_whose_sample_shrinks_are_tried() {
        let mut random = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut random);
        assert!(!worth_trying(3, &random), "random data is not tried");
        let text: Vec<u8> = b"nbd-s3 ".iter().copied().cycle().take(65536).collect();
        assert!(worth_trying(3, &text));
        // Half of every 4 KiB zero (what fio's buffer_compress_percentage=50 writes).
        let mut half = random.clone();
        for chunk in half.chunks_mut(4096) {
            chunk[2048..].fill(0);
        }
        assert!(worth_trying(3, &half));
        // Compressible only where the sample looks: start, middle or end.
        for at in [0, 30 * 1024, 60 * 1024] {
            let mut b = random.clone();
            b[at..at + 4096].fill(7);
            assert!(worth_trying(3, &b), "compressible slice at {at}");
        }
        // Small blocks are simply tried.
        assert!(worth_trying(3, &random[..12288]));
    }
}

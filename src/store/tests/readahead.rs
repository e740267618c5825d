//! Read-ahead: the window grows only while the reader uses what was fetched, stops at its
//! ceiling, starts over when the stream breaks, and random reads never trigger it.

use super::*;
use crate::store::read::ReadAhead;
use std::ops::Range;

/// Blocks of a device big enough that its end never cuts a batch short here.
const END: u64 = 1 << 30;

/// Reads blocks `from..to` one by one and returns every batch read-ahead asked for.
fn read_one_by_one(ra: &mut ReadAhead, from: u64, to: u64, ceiling: u64) -> Vec<Range<u64>> {
    (from..to)
        .map(|b| ra.observe(b, b, ceiling, END))
        .filter(|r| !r.is_empty())
        .collect()
}

/// A uniform number below `n` from a seeded xorshift (the same figures every run).
fn roll(x: &mut u64, n: u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x % n
}

#[test]
fn the_window_doubles_each_time_the_reader_reaches_what_was_fetched() {
    let mut ra = ReadAhead::default();
    let batches = read_one_by_one(&mut ra, 0, 200, 1 << 20);
    let sizes: Vec<u64> = batches.iter().map(|r| r.end - r.start).collect();
    assert_eq!(&sizes[..5], &[4, 8, 16, 32, 64], "{batches:?}");
    // The third read starts the stream; each batch follows the previous one without a gap
    // and goes out when the reader reaches the first block of the previous batch.
    assert_eq!(batches[0], 3..7);
    for pair in batches.windows(2) {
        assert_eq!(pair[0].end, pair[1].start, "{batches:?}");
    }
    assert!(batches.iter().all(|r| r.start > 0), "{batches:?}");
}

#[test]
fn the_window_stops_at_its_ceiling() {
    let mut ra = ReadAhead::default();
    let batches = read_one_by_one(&mut ra, 0, 2_000, 20);
    let sizes: Vec<u64> = batches.iter().map(|r| r.end - r.start).collect();
    assert_eq!(&sizes[..4], &[4, 8, 16, 20], "{batches:?}");
    assert!(sizes[3..].iter().all(|&s| s == 20), "{sizes:?}");
    assert_eq!(ra.window(), 20);
    // Never more than two windows in front of the reader.
    let fetched_to = batches.last().map_or(0, |r| r.end);
    assert!(fetched_to <= 2_000 + 2 * 20, "{fetched_to}");
}

#[test]
fn the_device_end_cuts_the_last_batch() {
    let mut ra = ReadAhead::default();
    let batches: Vec<_> = (0..10)
        .map(|b| ra.observe(b, b, 64, 10))
        .filter(|r| !r.is_empty())
        .collect();
    assert!(batches.iter().all(|r| r.end <= 10), "{batches:?}");
    assert_eq!(batches.last().map(|r| r.end), Some(10), "{batches:?}");
}

#[test]
fn a_read_away_from_the_stream_starts_the_window_over() {
    let mut ra = ReadAhead::default();
    read_one_by_one(&mut ra, 0, 40, 1 << 20);
    assert!(ra.window() >= 16, "{ra:?}");
    assert!(ra.observe(5_000, 5_000, 1 << 20, END).is_empty());
    assert_eq!(ra.window(), 0, "a jump ends the stream");
    let again = read_one_by_one(&mut ra, 5_001, 5_010, 1 << 20);
    assert_eq!(
        again.first(),
        Some(&(5_003..5_007)),
        "the new stream starts small"
    );
}

#[test]
fn reads_within_the_blocks_already_read_neither_break_nor_grow_the_stream() {
    // 4 KiB reads of 128 KiB blocks: 32 reads per block, several in flight.
    let mut ra = ReadAhead::default();
    let mut batches = vec![];
    for b in 0..12u64 {
        for _ in 0..32 {
            let r = ra.observe(b, b, 1 << 20, END);
            if !r.is_empty() {
                batches.push(r);
            }
        }
        // One read of the previous block arriving late.
        assert!(ra
            .observe(b.saturating_sub(1), b.saturating_sub(1), 1 << 20, END)
            .is_empty());
    }
    let sizes: Vec<u64> = batches.iter().map(|r| r.end - r.start).collect();
    assert_eq!(sizes, [4, 8, 16], "{batches:?}");
}

#[test]
fn pipelined_reads_noted_out_of_order_stay_one_stream() {
    // 1 MiB reads of 128 KiB blocks (8 blocks each), each group of four noted shuffled.
    let mut ra = ReadAhead::default();
    let mut x = 7;
    let mut fetched = 0;
    for group in 0..32u64 {
        let mut reads: Vec<u64> = (0..4).map(|i| (group * 4 + i) * 8).collect();
        for i in (1..reads.len()).rev() {
            let j = roll(&mut x, i as u64 + 1) as usize;
            reads.swap(i, j);
        }
        for first in reads {
            fetched += ra.observe(first, first + 7, 128, END).count() as u64;
        }
    }
    assert_eq!(ra.window(), 128, "{ra:?}");
    assert!(
        fetched >= 32 * 4 * 8 - 8 * 3,
        "the stream was fetched ahead: {fetched}"
    );
}

#[test]
fn random_reads_fetch_nothing_ahead() {
    // 4 KiB random reads over 128 MiB of 128 KiB blocks, as the cold random-read benchmark.
    let mut ra = ReadAhead::default();
    let mut x = 0x9E37_79B9;
    let reads = 100_000;
    let mut fetched = 0;
    for _ in 0..reads {
        let b = roll(&mut x, 1024);
        fetched += ra.observe(b, b, 128, 1024).count();
    }
    assert!(
        fetched * 1_000 < reads,
        "{fetched} blocks fetched ahead for {reads} random reads"
    );
}

#[tokio::test]
async fn sequential_reads_fetch_ahead_and_are_served_from_memory() {
    let mem = Arc::new(MemoryStore::new());
    for b in 0..64 {
        mem.insert(&key(b), Bytes::from(pattern(BS as usize, b as u8)));
    }
    let store = open(&mem, 64).await;
    for b in 0..4u64 {
        assert_eq!(
            read_bytes(&store, b * u64::from(BS), BS).await,
            pattern(BS as usize, b as u8)
        );
    }
    // Reads 0..=2 start the stream (blocks 3..7 ahead), read 3 reaches them (7..15 ahead).
    assert_eq!(store.stats().readahead_blocks, 12, "{:?}", store.stats());
    eventually("read-ahead GETs finish", || mem.gets() == 15).await;
    assert_eq!(
        read_bytes(&store, 10 * u64::from(BS), BS).await,
        pattern(BS as usize, 10)
    );
    assert_eq!(
        mem.gets(),
        15,
        "a block fetched ahead is served from memory"
    );
}

#[tokio::test]
async fn random_reads_reach_the_store_once_per_block() {
    let mem = Arc::new(MemoryStore::new());
    let blocks = 1024;
    for b in 0..blocks {
        mem.insert(&key(b), Bytes::from(pattern(BS as usize, b as u8)));
    }
    let store = open(&mem, blocks).await;
    let mut x = 12_345;
    let mut read = std::collections::HashSet::new();
    for _ in 0..300 {
        let b = roll(&mut x, blocks);
        read.insert(b);
        assert_eq!(
            read_bytes(&store, b * u64::from(BS) + 512, 512).await,
            pattern(BS as usize, b as u8)[512..1024]
        );
    }
    assert_eq!(store.stats().readahead_blocks, 0, "{:?}", store.stats());
    assert_eq!(
        mem.gets(),
        read.len() as u64,
        "one GET per block read, none more"
    );
}

#[tokio::test]
async fn the_ceiling_follows_the_memory_budget() {
    let mem = Arc::new(MemoryStore::new());
    for b in 0..256 {
        mem.insert(&key(b), Bytes::from(pattern(BS as usize, 1)));
    }
    // 80 blocks of memory: read-ahead may hold an eighth of it, 10 blocks per batch.
    let budget = CacheBudget::new(80 * u64::from(BS), 40 * u64::from(BS));
    let store = open_with(&mem, config(BS, 256 * u64::from(BS)), budget).await;
    let mut before = 0;
    let mut largest = 0;
    for b in 0..200u64 {
        read_bytes(&store, b * u64::from(BS), BS).await;
        let now = store.stats().readahead_blocks;
        largest = largest.max(now - before);
        before = now;
    }
    assert_eq!(largest, 10, "batches never exceed the ceiling");
    assert!(before > 150, "the stream was fetched ahead: {before}");
}

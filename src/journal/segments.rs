//! The live journal of one export: records are appended to a memory buffer (under the
//! caller's lock, so the journal order of two changes to one block is the order the cache
//! applied them), and one writer thread per journal writes them to segment files and
//! fsyncs on demand. Several FLUSHes waiting at once share one fsync.
//!
//! A segment is closed once it reaches its size (or, when S3 has caught up, early) with the
//! store's change number at that moment: once every change numbered below it is in S3, the
//! segment is deleted and its space returned. Before the next segment is created the
//! previous one is fsynced, so after a crash a segment never survives while an earlier
//! one lost its tail.

use super::record::{self, Kind};
use super::scan::SUFFIX;
use super::space::{Reservation, Space};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Appended bytes not yet written to the file that make the writer thread start writing
/// without a FLUSH asking (keeps the file close behind and the buffer small).
const WRITE_AHEAD: usize = 256 << 10;
/// Most appended bytes the writer may lag behind; writers wait above it.
const BUFFER_LIMIT: u64 = 64 << 20;

/// How far the writer thread got, published to async waiters.
#[derive(Debug, Clone, Default)]
struct Progress {
    written: u64,
    synced: u64,
    failed: Option<String>,
}

/// What the writer thread is asked to do, in order.
#[derive(Debug)]
enum Item {
    Bytes(Vec<u8>),
    /// Fsync the current segment, then start the segment whose first record is this number.
    Roll(u64),
}

#[derive(Debug)]
struct Segment {
    first: u64,
    /// Journal position (bytes since this journal opened) of its end, once closed.
    end: Option<u64>,
    /// Change number at closing: deletable once nothing below it is unstored.
    close_seq: u64,
    bytes: u64,
    /// When its first record was appended (oldest un-uploaded age).
    since: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Item>,
    buffered: usize,
    appended: u64,
    next_number: u64,
    segments: VecDeque<Segment>,
    sync_wanted: u64,
    deletes: Vec<PathBuf>,
    /// Segment files freed but not yet unlinked by the writer thread.
    unlinking: usize,
    closed: bool,
    /// Records since the last FLUSH record.
    since_flush: bool,
    /// Every change numbered below this is in S3 (reported by the store).
    stored_below: u64,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    space: Arc<Space>,
    segment_size: u64,
    state: Mutex<State>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
}

/// Gauges for metrics and the status line.
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalStats {
    /// Bytes in segments not yet deleted.
    pub bytes: u64,
    /// Age of the oldest record not known to be in S3.
    pub oldest: Option<Duration>,
}

/// One export's journal. Dropping it stops the writer thread once the buffer is written.
#[derive(Debug)]
pub struct Journal {
    shared: Arc<Shared>,
}

impl Journal {
    /// Starts a journal in `dir` (created if missing) whose first record gets `first`.
    /// Files already there are left alone (the caller replays and deletes them).
    pub fn create(dir: &Path, first: u64, space: Arc<Space>) -> io::Result<Self> {
        create_dir_durably(dir)?;
        let segment_size = (space.capacity() / 8).clamp(256 << 10, 1 << 30);
        let mut state = State {
            next_number: first,
            ..State::default()
        };
        state.items.push_back(Item::Roll(first));
        state.segments.push_back(Segment::open(first));
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            space,
            segment_size,
            state: Mutex::new(state),
            wake: Condvar::new(),
            progress: watch::channel(Progress::default()).0,
        });
        let worker = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("nbd-s3-journal".into())
            .spawn(move || writer(&worker))?;
        Ok(Self { shared })
    }

    /// Room for a record of `bytes`: waits while the journal is full (calling `on_wait`
    /// first, so the store can push uploads) or the writer lags too far behind.
    pub async fn reserve(&self, bytes: u64, on_wait: impl FnMut()) -> Reservation {
        let mut rx = self.shared.progress.subscribe();
        let appended = self.shared.state.lock().appended;
        let _ = rx
            .wait_for(|p| p.failed.is_some() || p.written + BUFFER_LIMIT >= appended)
            .await;
        self.shared.space.reserve(bytes, on_wait).await
    }

    /// Room taken whatever the fill (never needed when callers reserve first).
    pub fn force_room(&self, bytes: u64) -> Reservation {
        self.shared.space.force(bytes)
    }

    /// Appends one record. Call under the lock that ordered the change, with the store's
    /// next change number (every change of this record is numbered below it).
    pub fn append(&self, kind: Kind<'_>, room: Reservation, next_seq: u64) {
        let mut st = self.shared.state.lock();
        self.push(&mut st, kind, next_seq);
        room.commit();
    }

    /// Appends a FLUSH record (if anything was appended since the last one) and returns the
    /// position a sync must reach to cover every record so far.
    pub fn mark_flush(&self, next_seq: u64) -> u64 {
        let mut st = self.shared.state.lock();
        if st.since_flush {
            let room = self.shared.space.force(record::HEADER as u64);
            self.push(&mut st, Kind::Flush, next_seq);
            room.commit();
            st.since_flush = false;
        }
        st.appended
    }

    /// The position covering every record appended so far (FUA).
    pub fn position(&self) -> u64 {
        self.shared.state.lock().appended
    }

    fn push(&self, st: &mut State, kind: Kind<'_>, next_seq: u64) {
        let len = kind.encoded_len();
        let number = st.next_number;
        st.next_number += 1;
        match st.items.back_mut() {
            Some(Item::Bytes(b)) => record::encode(b, number, kind),
            _ => {
                let mut b = Vec::with_capacity(len.max(64 << 10));
                record::encode(&mut b, number, kind);
                st.items.push_back(Item::Bytes(b));
            }
        }
        st.buffered += len;
        st.appended += len as u64;
        st.since_flush |= !matches!(kind, Kind::Flush);
        let appended = st.appended;
        let full = match st.segments.back_mut() {
            Some(seg) => {
                seg.bytes += len as u64;
                seg.since.get_or_insert_with(Instant::now);
                seg.bytes >= self.shared.segment_size
            }
            None => false,
        };
        if full {
            close_segment(st, appended, next_seq);
        }
        if st.buffered >= WRITE_AHEAD {
            self.shared.wake.notify_one();
        }
    }

    /// Waits until every record up to `position` is fsynced. Fails if the journal cannot be
    /// written (the data stays in the cache and still goes to S3; FLUSH reports the error).
    pub async fn sync(&self, position: u64) -> io::Result<()> {
        let mut rx = self.shared.progress.subscribe();
        {
            let mut st = self.shared.state.lock();
            if st.sync_wanted < position {
                st.sync_wanted = position;
                self.shared.wake.notify_one();
            }
        }
        let done = rx
            .wait_for(|p| p.failed.is_some() || p.synced >= position)
            .await
            .map_err(|_| io::Error::other("journal writer stopped"))?;
        match &done.failed {
            Some(why) => Err(io::Error::other(why.clone())),
            None => Ok(()),
        }
    }

    /// Every change numbered below `stored_below` is in S3: deletes the segments that held
    /// only such changes. When nothing is pending at all (`stored_below == next_seq`) and
    /// the open segment is worth it (or a writer waits for room), it is closed so it can go
    /// too.
    /// `all`: close the open segment whenever nothing is pending (shutdown).
    pub fn release(&self, stored_below: u64, next_seq: u64, all: bool) {
        let mut st = self.shared.state.lock();
        st.stored_below = st.stored_below.max(stored_below);
        let idle = stored_below >= next_seq;
        let worth = self.shared.space.is_wanted() || all;
        let open_bytes = st.segments.back().map_or(0, |s| s.bytes);
        if idle && open_bytes > 0 && (worth || open_bytes >= self.shared.segment_size / 16) {
            let appended = st.appended;
            close_segment(&mut st, appended, next_seq);
        }
        let written = self.shared.progress.borrow().written;
        if free_segments(&self.shared, &mut st, written) {
            self.shared.wake.notify_one();
        }
    }

    /// Once everything is in S3 (shutdown): closes the open segment and waits, at most
    /// `limit`, until every segment holding records is deleted, so a clean stop leaves no
    /// journal to replay.
    pub async fn settle(&self, stored_below: u64, next_seq: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.release(stored_below, next_seq, true);
            let done = {
                let st = self.shared.state.lock();
                st.unlinking == 0
                    && st.segments.len() == 1
                    && st.segments.back().is_some_and(|s| s.bytes == 0)
            };
            if done || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Bytes held and the oldest record's age.
    pub fn stats(&self) -> JournalStats {
        let st = self.shared.state.lock();
        JournalStats {
            bytes: st.segments.iter().map(|s| s.bytes).sum(),
            oldest: st
                .segments
                .iter()
                .find_map(|s| s.since)
                .map(|t| t.elapsed()),
        }
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

impl Segment {
    fn open(first: u64) -> Self {
        Self {
            first,
            end: None,
            close_seq: 0,
            bytes: 0,
            since: None,
        }
    }
}

/// Closes the open segment at `end` and opens the next one.
fn close_segment(st: &mut State, end: u64, close_seq: u64) {
    if let Some(seg) = st.segments.back_mut() {
        seg.end = Some(end);
        seg.close_seq = close_seq;
    }
    let next = st.next_number;
    st.segments.push_back(Segment::open(next));
    st.items.push_back(Item::Roll(next));
}

/// Drops closed, fully written segments whose changes are all in S3; true if any.
fn free_segments(shared: &Shared, st: &mut State, written: u64) -> bool {
    let mut any = false;
    while let Some(seg) = st.segments.front() {
        let done = matches!(seg.end, Some(end) if end <= written)
            && seg.close_seq <= st.stored_below
            && st.segments.len() > 1;
        if !done {
            break;
        }
        let Some(seg) = st.segments.pop_front() else {
            break;
        };
        st.deletes.push(segment_path(&shared.dir, seg.first));
        st.unlinking += 1;
        shared.space.free(seg.bytes);
        any = true;
    }
    any
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:016x}{SUFFIX}"))
}

/// Creates `dir` (and missing parents) and makes the new entry durable.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// The writer thread: writes what was appended, rolls segments, fsyncs when asked, deletes
/// freed segments. Ends when the journal is dropped and everything is written.
fn writer(shared: &Shared) {
    let mut file: Option<File> = None;
    let mut progress = Progress::default();
    loop {
        let (items, want, deletes, appended_end) = {
            let mut st = shared.state.lock();
            while st.items.is_empty()
                && st.deletes.is_empty()
                && st.sync_wanted <= progress.synced
                && !st.closed
            {
                shared.wake.wait(&mut st);
            }
            if st.closed && st.items.is_empty() && st.deletes.is_empty() {
                break;
            }
            // Appends wake the thread only for big batches (or a FLUSH), so small writes
            // between FLUSHes reach the file in a few large writes.
            let items = std::mem::take(&mut st.items);
            st.buffered = 0;
            (
                items,
                st.sync_wanted,
                std::mem::take(&mut st.deletes),
                st.appended,
            )
        };
        let unlinked = deletes.len();
        for path in deletes {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete journal segment");
                }
            }
        }
        if unlinked > 0 {
            let mut st = shared.state.lock();
            st.unlinking = st.unlinking.saturating_sub(unlinked);
        }
        if progress.failed.is_none() {
            if let Err(e) = write_items(shared, &mut file, items, want > progress.synced) {
                tracing::error!(dir = %shared.dir.display(), error = %e,
                    "journal write failed; FLUSH fails until the export is reopened");
                progress.failed = Some(format!("journal {}: {e}", shared.dir.display()));
            }
        }
        progress.written = appended_end;
        if progress.failed.is_none() && want > progress.synced {
            progress.synced = appended_end;
        }
        shared.progress.send_replace(progress.clone());
        let mut st = shared.state.lock();
        if free_segments(shared, &mut st, progress.written) {
            shared.wake.notify_one();
        }
    }
    if let Some(f) = file {
        let _ = f.sync_data();
    }
}

fn write_items(
    shared: &Shared,
    file: &mut Option<File>,
    items: VecDeque<Item>,
    sync: bool,
) -> io::Result<()> {
    for item in items {
        match item {
            Item::Bytes(b) => match file.as_mut() {
                Some(f) => f.write_all(&b)?,
                None => return Err(io::Error::other("no open segment (bug)")),
            },
            Item::Roll(first) => {
                if let Some(f) = file.take() {
                    f.sync_data()?;
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(segment_path(&shared.dir, first))?;
                File::open(&shared.dir)?.sync_all()?;
                *file = Some(f);
            }
        }
    }
    if sync {
        if let Some(f) = file.as_ref() {
            f.sync_data()?;
        }
    }
    Ok(())
}

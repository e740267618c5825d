//! Writes, TRIM and WRITE_ZEROES land in the cache: a whole-block write replaces the buffer
//! (never reads), a partial one reads the block once (read-modify-write), and content that
//! becomes all zeros drops its buffer so write-back turns it into a DELETE, never a zero PUT.
//! Room (memory, dirty limit) is reserved before the shard lock is taken, never under it.

use super::block::{is_zero, Chunk};
use super::budget::{Charge, DirtyToken};
use super::cache::{BlockBuf, Buf, Content, LoadResult, Shard, Slot};
use super::pool::Pooled;
use super::{Inner, StoreError};
use crate::journal::{Kind, Reservation};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use tokio::sync::watch;

/// What a piece of a write puts into its block.
#[derive(Debug, Clone, Copy)]
enum Src<'a> {
    Data(&'a [u8]),
    Zero,
}

/// Why applying a piece must step out of the lock first.
enum Step {
    Done,
    Wait(watch::Receiver<LoadResult>),
    NeedDirty,
    NeedMemory,
}

/// Room reserved for one piece; whatever is left unused is returned on drop.
#[derive(Default)]
struct Room {
    dirty: Option<DirtyToken>,
    memory: Option<Charge>,
    /// A whole-block write's own buffer (or, after a swap, the old content's); back to the
    /// pool if it is not adopted.
    block: Option<Pooled>,
    /// Journal space for this piece's record (journaled exports).
    journal: Option<Reservation>,
}

impl Inner {
    /// Writes `data` (or zeros when `None`) over `len` bytes at `offset`.
    pub(crate) async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        fua: bool,
    ) -> Result<(), StoreError> {
        let chunks = self.geo.chunks(offset, len, self.size.load(SeqCst))?;
        let bs = self.bs();
        // The (at most two) partial blocks start their GETs together.
        for c in [chunks.first(), chunks.last()].into_iter().flatten() {
            if !c.is_whole(bs) {
                self.ensure_loading(c.block);
            }
        }
        for c in &chunks {
            let src = match data {
                Some(d) => {
                    let piece = &d[c.buf_off..c.buf_off + c.len];
                    if is_zero(piece) {
                        Src::Zero
                    } else {
                        Src::Data(piece)
                    }
                }
                None => Src::Zero,
            };
            self.write_chunk(c, src).await?;
        }
        if fua && self.wb.ordered {
            self.sync_fua().await?;
        } else if fua {
            let target = self.wb.next_seq.load(SeqCst);
            self.write_through(chunks.iter().map(|c| c.block), target)
                .await?;
        }
        Ok(())
    }

    /// Writes whole blocks from buffers the caller hands over (a WRITE payload read straight
    /// into block-sized pool buffers): each becomes the cached block as it is, no copy.
    /// `offset` must be block-aligned and every buffer `block_size` long; anything else is
    /// written through the copying path.
    pub(crate) async fn write_blocks(
        self: &Arc<Self>,
        offset: u64,
        blocks: Vec<Box<[u8]>>,
        fua: bool,
    ) -> Result<(), StoreError> {
        let bs = self.bs();
        let len = (blocks.len() * bs) as u64;
        let aligned = offset % bs as u64 == 0 && blocks.iter().all(|b| b.len() == bs);
        if !aligned {
            let flat: Vec<u8> = blocks.concat();
            let len = flat.len() as u64;
            return self.write(offset, Some(&flat), len, fua).await;
        }
        let chunks = self.geo.chunks(offset, len, self.size.load(SeqCst))?;
        for (c, block) in chunks.iter().zip(blocks) {
            if is_zero(&block) {
                self.budget.buffers().give(block);
                self.write_chunk(c, Src::Zero).await?;
            } else {
                self.write_whole(c, block).await?;
            }
        }
        if fua && self.wb.ordered {
            self.sync_fua().await?;
        } else if fua {
            let target = self.wb.next_seq.load(SeqCst);
            self.write_through(chunks.iter().map(|c| c.block), target)
                .await?;
        }
        Ok(())
    }

    /// One whole block from an owned buffer; see [`Inner::write_blocks`].
    async fn write_whole(self: &Arc<Self>, c: &Chunk, block: Box<[u8]>) -> Result<(), StoreError> {
        let mut room = Room {
            journal: self.journal_room(block.len()).await,
            block: Some(Pooled::new(block, self.budget.buffers())),
            ..Room::default()
        };
        loop {
            let step = {
                let mut shard = self.cache.lock(c.block);
                self.adopt(&mut shard, c, &mut room)
            };
            match step {
                Step::Done => return Ok(()),
                Step::Wait(rx) => self.wait_load(c.block, rx).await?,
                Step::NeedDirty => {
                    let bytes = self.pages.bytes(self.pages.per_block as u32);
                    room.dirty = Some(self.budget.reserve_dirty(bytes).await)
                }
                Step::NeedMemory => {
                    room.memory = Some(self.budget.reserve_memory(self.geo.block_size).await)
                }
            }
        }
    }

    /// Under the shard lock: makes `room.block` the block's content. An unshared cached
    /// buffer swaps its bytes (keeping its budget charge); otherwise the new buffer needs one.
    fn adopt(self: &Arc<Self>, shard: &mut Shard, c: &Chunk, room: &mut Room) -> Step {
        if let Some(slot) = shard.slots.get_mut(&c.block) {
            self.freeze_if_crossing(slot);
        }
        let fresh = match shard.slots.get(&c.block) {
            None => self.pages.per_block as u32,
            Some(Slot {
                content: Content::Loading(rx),
                ..
            }) => return Step::Wait(rx.clone()),
            Some(slot) => slot.pages.clean_in(0, self.pages.per_block - 1),
        };
        if fresh > 0 && room.dirty.is_none() {
            return Step::NeedDirty;
        }
        let in_place = shard
            .slots
            .get_mut(&c.block)
            .and_then(|slot| match &mut slot.content {
                Content::Ready(Some(buf)) => Arc::get_mut(buf),
                _ => None,
            });
        match (in_place, room.block.as_mut()) {
            (Some(cached), Some(new)) => std::mem::swap(&mut cached.data, new.buf_mut()),
            (_, Some(_)) => {
                let Some(charge) = room.memory.take() else {
                    return Step::NeedMemory;
                };
                let data = room
                    .block
                    .take()
                    .map(Pooled::into_inner)
                    .unwrap_or_default();
                let buf = Arc::new(BlockBuf {
                    data,
                    _charge: charge,
                });
                match shard.slots.get_mut(&c.block) {
                    Some(slot) => slot.content = Content::Ready(Some(buf)),
                    None => {
                        let present = self.presence.get(c.block);
                        let slot = Slot::new(Content::Ready(Some(buf)), present);
                        shard.slots.insert(c.block, slot);
                    }
                }
            }
            (_, None) => {} // applied in an earlier round (cannot happen: Done ends the loop)
        }
        self.presence.set(c.block, true);
        self.mark_dirty(shard, c, room);
        if let Some(Slot {
            content: Content::Ready(Some(buf)),
            ..
        }) = shard.slots.get(&c.block)
        {
            let offset = c.block * self.geo.block_size;
            let kind = Kind::Write {
                offset,
                data: &buf.data,
            };
            self.journal_change(kind, room.journal.take());
        }
        Step::Done
    }

    async fn write_chunk(self: &Arc<Self>, c: &Chunk, src: Src<'_>) -> Result<(), StoreError> {
        let payload = match src {
            Src::Data(d) => d.len(),
            Src::Zero => 0,
        };
        let mut room = Room {
            journal: self.journal_room(payload).await,
            ..Room::default()
        };
        loop {
            let step = {
                let mut shard = self.cache.lock(c.block);
                self.apply(&mut shard, c, src, &mut room)
            };
            match step {
                Step::Done => return Ok(()),
                Step::Wait(rx) => self.wait_load(c.block, rx).await?,
                Step::NeedDirty => {
                    let (first, last) = self.pages.span(c.start, c.len);
                    let bytes = self.pages.bytes((last - first + 1) as u32);
                    room.dirty = Some(self.budget.reserve_dirty(bytes).await)
                }
                Step::NeedMemory => {
                    room.memory = Some(self.budget.reserve_memory(self.geo.block_size).await)
                }
            }
        }
    }

    /// Under the shard lock: applies the piece, or says what must happen first.
    fn apply(
        self: &Arc<Self>,
        shard: &mut Shard,
        c: &Chunk,
        src: Src<'_>,
        room: &mut Room,
    ) -> Step {
        let bs = self.bs();
        let whole = c.is_whole(bs);
        let (first, last) = self.pages.span(c.start, c.len);
        let Some(slot) = shard.slots.get_mut(&c.block) else {
            let present = self.presence.get(c.block);
            if !present && matches!(src, Src::Zero) {
                return Step::Done; // zeroing a block that has no object: nothing to do
            }
            if present && !whole {
                return Step::Wait(self.start_load(shard, c.block));
            }
            if room.dirty.is_none() {
                return Step::NeedDirty;
            }
            let content = match src {
                Src::Zero => None,
                Src::Data(d) => match room.memory.take() {
                    Some(charge) => Some(new_buf(bs, charge, c.start, d)),
                    None => return Step::NeedMemory,
                },
            };
            self.presence.set(c.block, content.is_some());
            shard
                .slots
                .insert(c.block, Slot::new(Content::Ready(content), present));
            self.mark_dirty(shard, c, room);
            self.journal_piece(c, src, room);
            return Step::Done;
        };
        self.freeze_if_crossing(slot);
        let fresh = slot.pages.clean_in(first, last);
        let cur = match &mut slot.content {
            Content::Loading(rx) => return Step::Wait(rx.clone()),
            Content::Ready(cur) => cur,
        };
        if cur.is_none() && matches!(src, Src::Zero) {
            return Step::Done; // already all zeros
        }
        if fresh > 0 && room.dirty.is_none() {
            return Step::NeedDirty;
        }
        if !modify(cur, bs, c, src, &mut room.memory) {
            return Step::NeedMemory;
        }
        let has_data = cur.is_some();
        self.presence.set(c.block, has_data);
        self.mark_dirty(shard, c, room);
        self.journal_piece(c, src, room);
        Step::Done
    }

    /// Under the shard lock, once a piece is applied: its journal record.
    fn journal_piece(&self, c: &Chunk, src: Src<'_>, room: &mut Room) {
        let offset = c.block * self.geo.block_size + c.start as u64;
        let kind = match src {
            Src::Data(data) => Kind::Write { offset, data },
            Src::Zero => Kind::Zero {
                offset,
                len: c.len as u32,
            },
        };
        self.journal_change(kind, room.journal.take());
    }

    /// Under the shard lock, after a change: counts the newly dirty pages, gives the block's
    /// first change a sequence number and queues the block for write-back.
    fn mark_dirty(&self, shard: &mut Shard, c: &Chunk, room: &mut Room) {
        let block = c.block;
        let Some(slot) = shard.slots.get_mut(&block) else {
            return;
        };
        let (first, last) = self.pages.span(c.start, c.len);
        let fresh = self.pages.bytes(slot.pages.mark(self.pages, first, last));
        if fresh > 0 {
            if let Some(token) = room.dirty.as_mut() {
                token.commit(fresh);
            }
            self.wb.dirty.fetch_add(fresh, SeqCst);
            self.wb.kick_on_pressure(self.budget.pressure_level());
        }
        // A block a sequential writer just finished (this write made it full and ends at its
        // end) is unlikely to change again soon: store it at once. Others wait a little so
        // neighbouring writes share one PUT; a block that random writes happened to fill
        // would be dirty again right after its PUT.
        let full = fresh > 0 && slot.pages.is_full(self.pages) && c.start + c.len == self.bs();
        let now = tokio::time::Instant::now();
        slot.last_write = Some(now);
        if let Some(seq) = slot.dirty_seq {
            if full && slot.inflight_seq.is_none() && self.wb.queue.lock().make_due(seq, now) {
                self.wb.kick.notify_one();
            }
            return;
        }
        // Numbered under the queue lock: a FLUSH reads the next number under it to close an
        // epoch, and the journal frees space by the oldest unstored number read under it.
        let mut queue = self.wb.queue.lock();
        let seq = self.wb.next_seq.fetch_add(1, SeqCst);
        slot.dirty_seq = Some(seq);
        if slot.inflight_seq.is_some() || !slot.frozen.is_empty() {
            // The write-back task picks the change up when its PUT ends; a block with a
            // frozen version is queued under that version's number already.
            return;
        }
        let due = if full { now } else { now + self.wb.age() };
        queue.add(seq, block, due);
        drop(queue);
        shard.unlink(block);
        self.wb.kick.notify_one();
    }
}

/// A fresh block of zeros with `data` at `start`.
fn new_buf(bs: usize, charge: Charge, start: usize, data: &[u8]) -> Buf {
    let buffers = charge.buffers();
    let mut v = if start == 0 && data.len() == bs {
        buffers.take(bs)
    } else {
        buffers.take_zeroed(bs)
    };
    v[start..start + data.len()].copy_from_slice(data);
    Arc::new(BlockBuf {
        data: v,
        _charge: charge,
    })
}

/// Applies `src` to the block content in place (copy-on-write if an in-flight PUT shares the
/// buffer). Returns false when a new buffer is needed and `memory` holds no charge for it.
fn modify(
    cur: &mut Option<Buf>,
    bs: usize,
    c: &Chunk,
    src: Src<'_>,
    memory: &mut Option<Charge>,
) -> bool {
    let range = c.start..c.start + c.len;
    let whole = c.is_whole(bs);
    match (src, cur.as_mut()) {
        (Src::Zero, _) if whole => *cur = None,
        (Src::Zero, None) => {}
        (Src::Zero, Some(buf)) => {
            let Some(bytes) = writable(buf, memory) else {
                return false;
            };
            bytes[range].fill(0);
            if is_zero(bytes) {
                *cur = None;
            }
        }
        (Src::Data(d), Some(buf)) if !whole => {
            let Some(bytes) = writable(buf, memory) else {
                return false;
            };
            bytes[range].copy_from_slice(d);
        }
        (Src::Data(d), Some(buf)) => match Arc::get_mut(buf) {
            Some(b) => b.data.copy_from_slice(d),
            // A PUT still holds the buffer: a whole-block write needs no copy of it.
            None => {
                let Some(charge) = memory.take() else {
                    return false;
                };
                *cur = Some(new_buf(bs, charge, c.start, d));
            }
        },
        (Src::Data(d), None) => {
            let Some(charge) = memory.take() else {
                return false;
            };
            *cur = Some(new_buf(bs, charge, c.start, d));
        }
    }
    true
}

/// The buffer's bytes for writing; copies it first if an in-flight PUT shares it.
fn writable<'b>(buf: &'b mut Buf, memory: &mut Option<Charge>) -> Option<&'b mut [u8]> {
    if Arc::get_mut(buf).is_none() {
        let charge = memory.take()?;
        let mut data = charge.buffers().take(buf.data.len());
        data.copy_from_slice(&buf.data);
        *buf = Arc::new(BlockBuf {
            data,
            _charge: charge,
        });
    }
    Arc::get_mut(buf).map(|b| &mut b.data[..])
}

//! Executes one validated request against the export's block store and builds its reply.
//! READ turns store extents into OFFSET_DATA/OFFSET_HOLE chunks (structured), one data chunk
//! (DF) or a flat byte stream (simple); BLOCK_STATUS reports the presence map.

use super::writer::{Head, Part, Reply};
use crate::proto::consts::*;
use crate::proto::reply;
use crate::proto::{Command, Request};
use crate::store::{Allocation, BlockStore, Change, ErrorKind, Extent, StoreError};
use bytes::Bytes;
use std::sync::Arc;
use tracing::warn;

/// What every request task of a connection shares.
pub(crate) struct ConnCtx {
    pub store: Arc<BlockStore>,
    pub structured: bool,
    pub peer: String,
    pub export: String,
    /// This export's request counters, taken once per connection.
    pub metrics: Arc<crate::export::ExportRequests>,
}

/// A request's WRITE payload as the reader got it.
pub(crate) enum Payload {
    /// Contiguous bytes (small or unaligned writes; empty for other commands).
    Bytes(Bytes),
    /// Whole blocks at a block-aligned offset, each read into its own block-sized buffer,
    /// which the store keeps as the cached block without copying it.
    Blocks(Vec<Box<[u8]>>),
}

/// A simple reply with no data.
pub(crate) fn simple(errno: u32, cookie: u64) -> Reply {
    Reply::one(Head::build(|b| reply::simple_reply(b, errno, cookie)))
}

/// The error reply for `command`: an ERROR chunk where the client expects chunks (READ and
/// BLOCK_STATUS with structured replies), a simple reply otherwise.
pub(crate) fn error(
    ctx: &ConnCtx,
    command: Option<Command>,
    cookie: u64,
    errno: u32,
    msg: &str,
) -> Reply {
    let chunked = matches!(command, Some(Command::Read | Command::BlockStatus));
    if ctx.structured && chunked {
        let mut v = Vec::with_capacity(32 + msg.len());
        reply::error_chunk(&mut v, cookie, errno, msg);
        Reply::many(vec![Part::Data(Bytes::from(v))])
    } else {
        simple(errno, cookie)
    }
}

fn store_error(ctx: &ConnCtx, req: &Request, e: &StoreError) -> Reply {
    ctx.metrics.failed(req.command);
    warn!(
        peer = %ctx.peer, export = %ctx.export,
        "{:?} of {} bytes at {} failed: {e}", req.command, req.length, req.offset
    );
    error(ctx, Some(req.command), req.cookie, errno(e), &e.to_string())
}

/// The errno a client sees for a store failure: EIO for anything about data (a fenced export
/// included: its data cannot be stored here now), EPERM for a change to a read-only export,
/// EINVAL for a range the store refused, ESHUTDOWN while stopping.
pub(crate) fn errno(e: &StoreError) -> u32 {
    match e.kind() {
        ErrorKind::Io | ErrorKind::Fenced => EIO,
        ErrorKind::Invalid => EINVAL,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::ShuttingDown => ESHUTDOWN,
    }
}

/// The `base:allocation` flags of a store extent: a hole also reads as zeros.
fn state_flags(allocation: Allocation) -> u32 {
    match allocation {
        Allocation::Data => 0,
        Allocation::Hole => STATE_HOLE | STATE_ZERO,
    }
}

/// Runs `req` (never DISC) with its WRITE payload and returns the reply to send.
pub(crate) async fn execute(ctx: &ConnCtx, req: Request, payload: Payload) -> Reply {
    let _counted = ctx.metrics.start(req.command, req.length); // metrics, on every exit
    let (store, offset, len, fua) = (&ctx.store, req.offset, req.length, req.flags.fua());
    let result = match req.command {
        Command::Read => return read(ctx, &req).await,
        Command::BlockStatus => return block_status(ctx, &req),
        Command::Flush => store.change(Change::Flush).await,
        Command::Disconnect => Ok(()),
        // Zero-length data commands are valid no-ops: answer without bothering the store.
        _ if len == 0 => Ok(()),
        Command::Write => {
            let change = match payload {
                Payload::Bytes(data) => Change::Write { offset, data, fua },
                Payload::Blocks(blocks) => Change::WriteBlocks {
                    offset,
                    blocks,
                    fua,
                },
            };
            store.change(change).await
        }
        Command::Trim => store.change(Change::Trim { offset, len, fua }).await,
        // FAST_ZERO: zeroing is always fast here (it only drops blocks), so just do it.
        Command::WriteZeroes => store.change(Change::Zero { offset, len, fua }).await,
        // CACHE is only a hint: warm at most one maximum-size request's worth, so a 4 GiB
        // CACHE cannot make us fetch (and hold) gigabytes (the spec allows refusing it).
        Command::Cache => store.prefetch(offset, len.min(MAX_PAYLOAD)).await,
    };
    match result {
        Ok(()) => simple(0, req.cookie),
        Err(e) => store_error(ctx, &req, &e),
    }
}

async fn read(ctx: &ConnCtx, req: &Request) -> Reply {
    if req.length == 0 {
        return if ctx.structured {
            Reply::one(Head::build(|b| reply::none_chunk(b, req.cookie)))
        } else {
            simple(0, req.cookie)
        };
    }
    let extents = match ctx.store.read(req.offset, req.length).await {
        Ok(x) => x,
        Err(e) => return store_error(ctx, req, &e),
    };
    let total: u64 = extents.iter().map(extent_len).sum();
    if total != u64::from(req.length) {
        // Sending this would desynchronise the stream; refuse it instead.
        let e = StoreError::BadManifest(format!(
            "store returned {total} bytes for a read of {}",
            req.length
        ));
        return store_error(ctx, req, &e);
    }
    if !ctx.structured {
        let mut parts = Vec::with_capacity(extents.len() + 1);
        parts.push(Part::Head(Head::build(|b| {
            reply::simple_reply(b, 0, req.cookie)
        })));
        parts.extend(extents.into_iter().map(data_part));
        return Reply::many(parts);
    }
    if req.flags.df() {
        let mut parts = Vec::with_capacity(extents.len() + 1);
        let (cookie, off, len) = (req.cookie, req.offset, req.length);
        parts.push(Part::Head(Head::build(|b| {
            reply::offset_data_header(b, REPLY_FLAG_DONE, cookie, off, len)
        })));
        parts.extend(extents.into_iter().map(data_part));
        return Reply::many(parts);
    }
    Reply::many(chunks(req, extents))
}

fn extent_len(e: &Extent) -> u64 {
    match e {
        Extent::Data(b) => b.len() as u64,
        Extent::Zero(n) => u64::from(*n),
    }
}

fn data_part(e: Extent) -> Part {
    match e {
        Extent::Data(b) => Part::Data(b),
        Extent::Zero(n) => Part::Zeros(n),
    }
}

/// OFFSET_DATA / OFFSET_HOLE chunks covering the read, DONE on the last one. Adjacent data
/// extents (one per cached block when the store shares its buffers) become one chunk.
fn chunks(req: &Request, extents: Vec<Extent>) -> Vec<Part> {
    let runs = runs(extents);
    let last = runs.len().saturating_sub(1);
    let mut parts = Vec::with_capacity(runs.len() + runs.iter().map(Vec::len).sum::<usize>());
    let mut offset = req.offset;
    let cookie = req.cookie;
    for (i, run) in runs.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let len: u64 = run.iter().map(extent_len).sum();
        let len = len as u32; // a run never exceeds the request's u32 length
        if let [Extent::Zero(n)] = run[..] {
            parts.push(Part::Head(Head::build(|h| {
                reply::offset_hole(h, flags, cookie, offset, n)
            })));
        } else {
            parts.push(Part::Head(Head::build(|h| {
                reply::offset_data_header(h, flags, cookie, offset, len)
            })));
            parts.extend(run.into_iter().map(data_part));
        }
        offset += u64::from(len);
    }
    parts
}

/// Groups non-empty extents into runs: each zero extent alone, adjacent data extents together.
fn runs(extents: Vec<Extent>) -> Vec<Vec<Extent>> {
    let mut runs: Vec<Vec<Extent>> = Vec::new();
    for e in extents.into_iter().filter(|e| extent_len(e) > 0) {
        let joins = matches!(e, Extent::Data(_))
            && matches!(runs.last().and_then(|r| r.last()), Some(Extent::Data(_)));
        match runs.last_mut() {
            Some(run) if joins => run.push(e),
            _ => runs.push(vec![e]),
        }
    }
    runs
}

/// `base:allocation` descriptors, clipped to the request (one only with REQ_ONE).
fn block_status(ctx: &ConnCtx, req: &Request) -> Reply {
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut left = req.length;
    for x in ctx.store.block_status(req.offset, req.length) {
        if left == 0 {
            break;
        }
        let len = x.len.min(left);
        if len == 0 {
            continue;
        }
        extents.push((len, state_flags(x.allocation)));
        left -= len;
        if req.flags.req_one() {
            break;
        }
    }
    if extents.is_empty() {
        // The store must cover the range; if it did not, claim nothing (data, length 1+).
        extents.push((req.length, 0));
    }
    let mut v = Vec::with_capacity(CHUNK_LEN + 8 * extents.len());
    reply::block_status(
        &mut v,
        req.cookie,
        super::handshake::BASE_ALLOCATION_ID,
        &extents,
    );
    Reply::many(vec![Part::Data(Bytes::from(v))])
}

const CHUNK_LEN: usize = reply::CHUNK_HEADER_LEN + 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Extent {
        Extent::Data(Bytes::from(vec![7u8; n]))
    }

    #[test]
    fn adjacent_data_extents_share_one_chunk_and_zeros_stay_holes() {
        let extents = vec![data(3), data(5), Extent::Zero(4), Extent::Zero(0), data(2)];
        let runs = runs(extents);
        let lens: Vec<Vec<u64>> = runs
            .iter()
            .map(|r| r.iter().map(extent_len).collect())
            .collect();
        assert_eq!(lens, vec![vec![3, 5], vec![4], vec![2]]);
    }

    #[test]
    fn chunks_cover_the_read_with_done_on_the_last() {
        let req = Request {
            flags: crate::proto::CommandFlags(0),
            command: Command::Read,
            cookie: 9,
            offset: 100,
            length: 14,
        };
        let parts = chunks(&req, vec![data(3), data(5), Extent::Zero(4), data(2)]);
        // head + 2 data, hole head, head + 1 data
        assert_eq!(parts.len(), 6);
        let heads: Vec<&[u8]> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Head(h) => Some(h.bytes()),
                _ => None,
            })
            .collect();
        assert_eq!(heads.len(), 3);
        let flags = |h: &[u8]| u16::from_be_bytes([h[4], h[5]]);
        let kind = |h: &[u8]| u16::from_be_bytes([h[6], h[7]]);
        let off = |h: &[u8]| u64::from_be_bytes(h[20..28].try_into().unwrap());
        assert_eq!(kind(heads[0]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(
            u32::from_be_bytes(heads[0][16..20].try_into().unwrap()),
            8 + 8
        );
        assert_eq!((off(heads[0]), flags(heads[0])), (100, 0));
        assert_eq!(kind(heads[1]), REPLY_TYPE_OFFSET_HOLE);
        assert_eq!(off(heads[1]), 108);
        assert_eq!((off(heads[2]), flags(heads[2])), (112, REPLY_FLAG_DONE));
    }

    #[test]
    fn store_failures_map_to_the_errno_clients_expect() {
        let cases = [
            (StoreError::ReadOnly, EPERM),
            (StoreError::Fenced("lease lost".into()), EIO),
            (StoreError::ShuttingDown, ESHUTDOWN),
            (
                StoreError::OutOfRange {
                    offset: 1,
                    len: 2,
                    size: 2,
                },
                EINVAL,
            ),
            (
                StoreError::FlushTimeout(std::time::Duration::from_secs(1)),
                EIO,
            ),
            (
                StoreError::Backend(crate::backend::BackendError::Transient("x".into())),
                EIO,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(errno(&e), want, "{e}");
        }
    }

    #[test]
    fn holes_read_as_zeros_and_data_has_no_flags() {
        assert_eq!(state_flags(Allocation::Hole), STATE_HOLE | STATE_ZERO);
        assert_eq!(state_flags(Allocation::Data), 0);
    }
}

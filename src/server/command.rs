//! Executes one validated request against the export's block store and builds its reply.
//! READ turns store extents into OFFSET_DATA/OFFSET_HOLE chunks (structured), one data chunk
//! (DF) or a flat byte stream (simple); BLOCK_STATUS reports the presence map.

use super::writer::{Head, Part, Reply};
use crate::proto::consts::*;
use crate::proto::reply;
use crate::proto::{Command, Request};
use crate::store::{BlockStore, Extent, StoreError};
use bytes::Bytes;
use std::sync::Arc;
use tracing::warn;

/// What every request task of a connection shares.
pub(crate) struct ConnCtx {
    pub store: Arc<BlockStore>,
    pub structured: bool,
    pub peer: String,
    pub export: String,
    /// This export's request counters (metrics), looked up once per connection.
    pub metrics: Arc<crate::metrics::ExportRequests>,
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
    error(
        ctx,
        Some(req.command),
        req.cookie,
        e.errno(),
        &e.to_string(),
    )
}

/// Runs `req` (never DISC) with its WRITE payload and returns the reply to send.
pub(crate) async fn execute(ctx: &ConnCtx, req: Request, payload: Bytes) -> Reply {
    let _counted = ctx.metrics.start(req.command, req.length); // metrics, on every exit
    let (store, off, len, fua) = (&ctx.store, req.offset, req.length, req.flags.fua());
    let result = match req.command {
        Command::Read => return read(ctx, &req).await,
        Command::BlockStatus => return block_status(ctx, &req),
        Command::Flush => store.flush().await,
        Command::Disconnect => Ok(()),
        // Zero-length data commands are valid no-ops: answer without bothering the store.
        _ if len == 0 => Ok(()),
        Command::Write => store.write(off, payload, fua).await,
        Command::Trim => store.trim(off, len, fua).await,
        // FAST_ZERO: zeroing is always fast here (it only drops blocks), so just do it.
        Command::WriteZeroes => store.write_zeroes(off, len, fua).await,
        // CACHE is only a hint: warm at most one maximum-size request's worth, so a 4 GiB
        // CACHE cannot make us fetch (and hold) gigabytes (the spec allows refusing it).
        Command::Cache => store.prefetch(off, len.min(MAX_PAYLOAD)).await,
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

/// OFFSET_DATA / OFFSET_HOLE chunks covering the read, DONE on the last one.
fn chunks(req: &Request, extents: Vec<Extent>) -> Vec<Part> {
    let extents: Vec<Extent> = extents.into_iter().filter(|e| extent_len(e) > 0).collect();
    let last = extents.len().saturating_sub(1);
    let mut parts = Vec::with_capacity(extents.len() * 2);
    let mut offset = req.offset;
    for (i, e) in extents.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let len = extent_len(&e) as u32;
        let cookie = req.cookie;
        match e {
            Extent::Data(b) => {
                parts.push(Part::Head(Head::build(|h| {
                    reply::offset_data_header(h, flags, cookie, offset, len)
                })));
                parts.push(Part::Data(b));
            }
            Extent::Zero(n) => {
                parts.push(Part::Head(Head::build(|h| {
                    reply::offset_hole(h, flags, cookie, offset, n)
                })));
            }
        }
        offset += u64::from(len);
    }
    parts
}

/// `base:allocation` descriptors, clipped to the request (one only with REQ_ONE).
fn block_status(ctx: &ConnCtx, req: &Request) -> Reply {
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut left = req.length;
    for x in ctx.store.block_status(req.offset, req.length) {
        if left == 0 {
            break;
        }
        let len = x.length.min(left);
        if len == 0 {
            continue;
        }
        extents.push((len, x.flags & (STATE_HOLE | STATE_ZERO)));
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

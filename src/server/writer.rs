//! The single task that owns a connection's write half. Request tasks hand it complete
//! replies through a bounded channel; it writes whatever is queued with vectored writes (read
//! data straight from the cache's buffers) and flushes only when the queue is empty, so
//! pipelined clients get few, large writes.

use bytes::Bytes;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Size of the small inline header buffer; every fixed-size reply or chunk header fits.
const HEAD_CAP: usize = 32;

/// A reply header built on the stack (no allocation for the common replies).
#[derive(Clone, Copy)]
pub(crate) struct Head {
    buf: [u8; HEAD_CAP],
    len: u8,
}

impl Head {
    /// Builds a header with one of the `proto::reply` encoders (which must fit in 32 bytes).
    pub fn build(encode: impl FnOnce(&mut &mut [u8])) -> Head {
        let mut buf = [0u8; HEAD_CAP];
        let mut slice = &mut buf[..];
        encode(&mut slice);
        let len = (HEAD_CAP - slice.len()) as u8;
        Head { buf, len }
    }
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// One piece of a reply as it goes on the wire.
pub(crate) enum Part {
    Head(Head),
    Data(Bytes),
    /// This many zero bytes (holes in a simple or DF reply).
    Zeros(u32),
}

enum Body {
    One(Head),
    Many(Vec<Part>),
}

/// A complete reply; the writer never interleaves two replies. It may carry the connection's
/// memory-budget permit of its request, released only once the bytes are on the socket, so a
/// client that stops reading cannot make us queue unbounded read data.
pub(crate) struct Reply {
    body: Body,
    budget: Option<OwnedSemaphorePermit>,
}

impl Reply {
    /// A reply that is a single small header.
    pub fn one(head: Head) -> Reply {
        Reply {
            body: Body::One(head),
            budget: None,
        }
    }
    /// A reply made of several pieces (headers and data).
    pub fn many(parts: Vec<Part>) -> Reply {
        Reply {
            body: Body::Many(parts),
            budget: None,
        }
    }
    /// Keeps `permit` until this reply has been written.
    pub fn hold(mut self, permit: Option<OwnedSemaphorePermit>) -> Reply {
        self.budget = permit;
        self
    }
}

/// Zero bytes for replies that hold holes (a constant: read-only, shared by every writer).
const ZEROS: &[u8; 64 * 1024] = &[0u8; 64 * 1024];

/// Most replies taken from the queue for one round of vectored writes.
const BATCH_REPLIES: usize = 64;
/// Most slices per `writev` (Linux allows 1024).
const MAX_SLICES: usize = 512;

/// Appends the reply's bytes as slices: headers, data shared with the cache, shared zeros.
fn push_slices<'a>(reply: &'a Reply, out: &mut Vec<&'a [u8]>) {
    match &reply.body {
        Body::One(h) => out.push(h.bytes()),
        Body::Many(parts) => parts.iter().for_each(|p| push_part(p, out)),
    }
}

fn push_part<'a>(part: &'a Part, out: &mut Vec<&'a [u8]>) {
    match part {
        Part::Head(h) => out.push(h.bytes()),
        Part::Data(b) => out.push(b),
        Part::Zeros(n) => {
            let mut left = *n as usize;
            while left > 0 {
                let k = left.min(ZEROS.len());
                out.push(&ZEROS[..k]);
                left -= k;
            }
        }
    }
}

/// Writes every slice with as few (vectored) writes as the socket takes. Large data goes
/// straight from the cache's buffers to the socket; small replies are gathered by the
/// `BufWriter`.
async fn write_slices<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    mut slices: &[&[u8]],
) -> io::Result<()> {
    let mut skip = 0; // bytes of slices[0] already written
    while let Some(first) = slices.first() {
        if skip == first.len() {
            (slices, skip) = (&slices[1..], 0);
            continue;
        }
        let n = slices.len().min(MAX_SLICES);
        let mut iov = Vec::with_capacity(n);
        iov.push(IoSlice::new(&first[skip..]));
        iov.extend(slices[1..n].iter().map(|s| IoSlice::new(s)));
        let mut written = w.write_vectored(&iov).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Advance past what was written.
        while let Some(s) = slices.first() {
            let left = s.len() - skip;
            if written < left {
                skip += written;
                break;
            }
            written -= left;
            (slices, skip) = (&slices[1..], 0);
        }
    }
    Ok(())
}

/// Writes a batch of replies, in order, never interleaving two of them.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    batch: &mut Vec<Reply>,
) -> io::Result<()> {
    let mut slices: Vec<&[u8]> = Vec::with_capacity(batch.len() * 3);
    for reply in batch.iter() {
        push_slices(reply, &mut slices);
    }
    write_slices(w, &slices).await?;
    drop(slices);
    // The replies' budget permits drop here: their bytes are buffered or on the socket.
    batch.clear();
    Ok(())
}

/// Writes replies until every sender is gone, then flushes and shuts the write half down.
/// Whatever is queued goes out in one round of vectored writes; the buffer is flushed only
/// when the queue is empty, so pipelined clients get few, large writes. An error (the
/// client went away) ends the task; dropping `rx` tells the reader.
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
    keep_open: Arc<AtomicBool>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(BATCH_REPLIES);
    while rx.recv_many(&mut batch, BATCH_REPLIES).await > 0 {
        write_batch(&mut w, &mut batch).await?;
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    if keep_open.load(Ordering::Acquire) {
        // The socket moves to another process: dropping a write half would shut it down
        // (the client would see EOF), so this half is never dropped.
        std::mem::forget(w);
        return Ok(());
    }
    w.shutdown().await
}

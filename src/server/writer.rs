//! The single task that owns a connection's write half. Request tasks hand it complete
//! replies through a bounded channel; it batches whatever is queued into one buffered write
//! and flushes only when the queue is empty, so pipelined clients get few, large writes.

use bytes::Bytes;
use std::io;
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
    fn bytes(&self) -> &[u8] {
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

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

async fn write_part<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, part: &Part) -> io::Result<()> {
    match part {
        Part::Head(h) => w.write_all(h.bytes()).await,
        Part::Data(b) => w.write_all(b).await,
        Part::Zeros(n) => {
            let mut left = *n as usize;
            while left > 0 {
                let k = left.min(ZEROS.len());
                w.write_all(&ZEROS[..k]).await?;
                left -= k;
            }
            Ok(())
        }
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, reply: Reply) -> io::Result<()> {
    match &reply.body {
        Body::One(h) => w.write_all(h.bytes()).await,
        Body::Many(parts) => {
            for p in parts {
                write_part(w, p).await?;
            }
            Ok(())
        }
    }
    // `reply.budget` drops here: the bytes are in the buffer or on the socket.
}

/// Writes replies until every sender is gone, then flushes and shuts the write half down.
/// An error (the client went away) ends the task; dropping `rx` tells the reader.
pub(crate) async fn run<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
) -> io::Result<()> {
    while let Some(reply) = rx.recv().await {
        write_reply(&mut w, reply).await?;
        while let Ok(more) = rx.try_recv() {
            write_reply(&mut w, more).await?;
        }
        w.flush().await?;
    }
    w.flush().await?;
    w.shutdown().await
}

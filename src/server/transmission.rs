//! The transmission phase of one connection (`connection` ran the handshake). A single reader loop
//! parses requests (always consuming WRITE payloads, to stay in sync) and runs each valid
//! request in place when it needs no waiting, else as its own task, at most `MAX_IN_FLIGHT`
//! at once; replies go to the writer task in completion order, which the protocol allows
//! (cookies tell them apart).

use super::command::{self, ConnCtx, Payload};
use super::handover::{self, ConnState, ParkedConnection, Ticket};
use super::handshake::Negotiated;
use super::writer::{self, Reply};
use super::{Inner, State, MAX_IN_FLIGHT};
use crate::proto::consts::*;
use crate::proto::{parse_header, validate, Command, FatalError, Limits, Request, RequestHeader};
use crate::store::pool::{self, BufferPool};
use bytes::{Bytes, BytesMut};
use std::future::{pending, Future};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Context;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

/// Userspace socket buffers: big enough to batch many small requests per syscall, small
/// enough that a thousand idle connections stay cheap (large payloads bypass them).
const READ_BUF: usize = 128 * 1024;
const WRITE_BUF: usize = 128 * 1024;
/// Replies queued for the writer; request tasks wait (not the reader) when it is full.
const REPLY_QUEUE: usize = MAX_IN_FLIGHT * 2;
/// Data bytes (WRITE payloads read, READ replies not yet written) one connection may hold,
/// in units of 64 KiB: 128 MiB, four maximum-size requests. Without it, 128 pipelined 32 MiB
/// READs from a client that never reads its replies would pin 4 GiB.
const BUDGET_UNIT: u32 = 64 * 1024;
const BUDGET_UNITS: u32 = 2048;

/// Budget units a request needs before its payload is read or its data fetched.
fn budget_cost(h: &RequestHeader) -> u32 {
    let moves_data = matches!(h.command, CMD_READ | CMD_WRITE) && h.length <= MAX_PAYLOAD;
    if moves_data {
        h.length.div_ceil(BUDGET_UNIT).max(1)
    } else {
        0
    }
}

/// Why a connection in transmission ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Fatal(#[from] FatalError),
    #[error("reply writer failed: {0}")]
    Writer(io::Error),
}

/// Serves a connection whose handshake picked an export (`connection::serve_connection` ran
/// it, TLS included), to the end; errors are logged here and go no further.
pub(crate) async fn serve_negotiated<R, W>(
    inner: &Arc<Inner>,
    neg: Negotiated,
    peer: &str,
    reader: R,
    writer: W,
    ticket: Option<Ticket>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let reader = BufReader::with_capacity(READ_BUF, reader);
    let writer = BufWriter::with_capacity(WRITE_BUF, writer);
    let export = neg.attachment.export().name().to_owned();
    info!(%peer, %export, structured = neg.structured, "client connected");
    match transmit(inner, neg, peer, reader, writer, ticket).await {
        Ok(Ended::Closed) => debug!(%peer, %export, "client disconnected"),
        Ok(Ended::Parked) => info!(%peer, %export, "connection parked for a handover"),
        Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            info!(%peer, %export, "client closed the connection without NBD_CMD_DISC")
        }
        Err(e) => warn!(%peer, %export, "connection closed: {e}"),
    }
}

/// How a connection's transmission phase ended without error.
enum Ended {
    Closed,
    /// Handed over: socket and state wait in `Inner::parked`.
    Parked,
}

struct Conn {
    /// Whether a handover parks this connection (plain socket) or closes it (TLS).
    movable: bool,
    ctx: Arc<ConnCtx>,
    limits: Limits,
    tx: mpsc::Sender<Reply>,
    sem: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    state: watch::Receiver<State>,
}

async fn transmit<R, W>(
    inner: &Arc<Inner>,
    neg: Negotiated,
    peer: &str,
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    ticket: Option<Ticket>,
) -> Result<Ended, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Negotiated {
        attachment,
        client,
        store,
        size,
        read_only,
        structured,
        block_status,
    } = neg;
    let (tx, rx) = mpsc::channel(REPLY_QUEUE);
    let keep_open = Arc::new(AtomicBool::new(false));
    let writer_task = tokio::spawn(writer::run(writer, rx, Arc::clone(&keep_open)));
    let conn = Conn {
        movable: ticket.is_some(),
        ctx: Arc::new(ConnCtx {
            store,
            structured,
            peer: peer.to_owned(),
            export: attachment.export().name().to_owned(),
            metrics: attachment.export().requests().for_connection(),
        }),
        limits: Limits {
            export_size: size,
            read_only,
            structured,
            block_status,
        },
        tx,
        sem: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        budget: Arc::new(Semaphore::new(BUDGET_UNITS as usize)),
        state: inner.state.subscribe(),
    };
    let result = read_loop(&conn, &mut reader).await;
    let parked = match (&result, ticket) {
        (Ok(Some(pending)), Some(ticket)) => {
            // Every reply must be out before the socket moves: wait for the requests.
            let _all = conn.sem.acquire_many(MAX_IN_FLIGHT as u32).await;
            keep_open.store(true, Ordering::Release);
            let state = ConnState {
                export: conn.ctx.export.clone(),
                size: conn.limits.export_size,
                read_only: conn.limits.read_only,
                structured: conn.limits.structured,
                block_status: conn.limits.block_status,
                unix: ticket.unix,
                pending: handover::to_hex(pending),
            };
            Some(ParkedConnection {
                state,
                fd: ticket.fd,
            })
        }
        _ => None,
    };
    let Conn {
        tx, ctx, mut state, ..
    } = conn;
    drop(tx);
    let written = finish_writer(writer_task, result.is_err(), &mut state).await;
    // Uncounted only once every request is answered: a rollback waits for them.
    drop((ctx, attachment, client));
    result?;
    written.map_err(ConnError::Writer)?;
    Ok(match parked {
        Some(p) => {
            inner.park(p);
            Ended::Parked
        }
        None => Ended::Closed,
    })
}

/// Lets the writer deliver the outstanding replies (DISC waits for them), except after a
/// protocol violation, or once shutdown's grace time is over, when a client that does not
/// read its replies must not keep the connection (and shutdown) alive.
async fn finish_writer(
    mut writer_task: tokio::task::JoinHandle<io::Result<()>>,
    violated: bool,
    state: &mut watch::Receiver<State>,
) -> io::Result<()> {
    if violated {
        writer_task.abort();
    }
    let joined = tokio::select! {
        r = &mut writer_task => r,
        _ = async {
            expired(state).await;
            // Time for the ESHUTDOWN replies to go out.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        } => {
            writer_task.abort();
            return Ok(());
        }
    };
    match joined {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Serves requests until the client leaves (`None`) or a handover stops reading between two
/// requests (`Some(bytes read but not served)`).
async fn read_loop<R: AsyncRead + Unpin>(
    c: &Conn,
    reader: &mut BufReader<R>,
) -> Result<Option<Vec<u8>>, ConnError> {
    let mut payload_buf = BytesMut::new();
    let mut state = c.state.clone();
    let mut handover = c.state.clone();
    loop {
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        // Waiting for data with `fill_buf` consumes nothing, so a handover can stop here
        // and pass on whatever is buffered, byte-exact.
        let park = tokio::select! {
            biased;
            _ = handing_over(&mut handover, c.movable) => true,
            _ = drained(&mut state, &c.sem, c.movable) => return Ok(None),
            _ = c.tx.closed() => return Ok(None),
            r = reader.fill_buf() => {
                // EOF between requests: the client simply went away.
                if r?.is_empty() {
                    return Ok(None);
                }
                false
            }
        };
        if park {
            return Ok(Some(reader.buffer().to_vec()));
        }
        match or_expired(&mut state, reader.read_exact(&mut hb)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(None),
        }
        let header = parse_header(&hb)?;
        let payload_len = header.payload_len()?;
        // A client stalling mid-payload, or not reading replies, must not outlive shutdown.
        let Some(budget) = or_expired(&mut state, acquire_budget(c, &header)).await else {
            return Ok(None);
        };
        let payload = match payload_len {
            0 => Payload::Bytes(Bytes::new()),
            n => {
                let store = &c.ctx.store;
                let (bs, buffers) = (store.block_size() as usize, store.buffers());
                let read = read_payload(
                    reader,
                    &mut payload_buf,
                    header.offset,
                    n as usize,
                    bs,
                    buffers,
                );
                match or_expired(&mut state, read).await {
                    Some(r) => r?,
                    None => return Ok(None),
                }
            }
        };
        let req = match validate(&header, &c.limits) {
            Ok(req) => req,
            Err(e) => {
                debug!(peer = %c.ctx.peer, "request refused: {e}");
                let cmd = Command::from_wire(header.command);
                let reply =
                    command::error(&c.ctx, cmd, header.cookie, e.to_errno(), &e.to_string());
                send(c, reply).await;
                continue;
            }
        };
        if req.command == Command::Disconnect {
            return Ok(None);
        }
        if state.borrow().stopping() {
            let reply = command::error(
                &c.ctx,
                Some(req.command),
                req.cookie,
                ESHUTDOWN,
                "server is shutting down",
            );
            send(c, reply).await;
            continue;
        }
        let Ok(permit) = Arc::clone(&c.sem).acquire_owned().await else {
            return Ok(None);
        };
        let task = RequestTask {
            ctx: Arc::clone(&c.ctx),
            tx: c.tx.clone(),
            permit,
            budget,
            state: c.state.clone(),
        };
        run_or_spawn(task.run(req, payload));
    }
}

async fn acquire_budget(c: &Conn, header: &RequestHeader) -> Option<OwnedSemaphorePermit> {
    match budget_cost(header) {
        0 => None,
        // The semaphore is never closed, so this only waits.
        n => Arc::clone(&c.budget).acquire_many_owned(n).await.ok(),
    }
}

async fn send(c: &Conn, reply: Reply) {
    // A closed channel means the writer died; the select in the loop notices and ends it.
    let _ = c.tx.send(reply).await;
}

/// Resolves once shutdown (or a handover, for a connection that cannot move) began and
/// nothing is in flight: the connection may close.
async fn drained(state: &mut watch::Receiver<State>, sem: &Semaphore, movable: bool) {
    let ends = |s: &State| s.stopping() || (*s == State::HandingOver && !movable);
    if state.wait_for(ends).await.is_err() {
        pending::<()>().await;
    }
    let _all = sem.acquire_many(MAX_IN_FLIGHT as u32).await;
}

/// Resolves when a handover began, for a connection that can move.
async fn handing_over(state: &mut watch::Receiver<State>, movable: bool) {
    if !movable || state.wait_for(|s| *s == State::HandingOver).await.is_err() {
        pending::<()>().await;
    }
}

/// Runs `f` unless shutdown's grace time ends first (`None`).
async fn or_expired<F: std::future::Future>(
    state: &mut watch::Receiver<State>,
    f: F,
) -> Option<F::Output> {
    tokio::select! {
        r = f => Some(r),
        _ = expired(state) => None,
    }
}

/// Resolves when the shutdown grace time is over.
async fn expired(state: &mut watch::Receiver<State>) {
    if state.wait_for(|s| *s == State::Expired).await.is_err() {
        pending::<()>().await;
    }
}

/// Small WRITE payloads are read into shared chunks of this size: below the allocator's
/// mmap threshold (`service::allocator`), so chunks come from and go back to malloc's arenas
/// without page faults.
const SMALL_CHUNK: usize = 32 * 1024;

/// Reads exactly `len` payload bytes without zero-filling a buffer first. A block-aligned
/// payload of whole blocks is read straight into block-sized pool buffers that the store
/// keeps as the cached blocks (no copy, no fresh mapping); other large payloads of a pooled
/// size (1 MiB, ...) into one recycled pool buffer.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut BytesMut,
    offset: u64,
    len: usize,
    block_size: usize,
    buffers: &Arc<BufferPool>,
) -> io::Result<Payload> {
    let whole_blocks = block_size > SMALL_CHUNK
        && pool::is_pooled(block_size)
        && len % block_size == 0
        && offset % block_size as u64 == 0;
    if whole_blocks {
        let mut blocks = Vec::with_capacity(len / block_size);
        for _ in 0..len / block_size {
            // Back to the pool if the read fails half way.
            let mut b = buffers.take_owned(block_size);
            read_direct(reader, b.buf_mut()).await?;
            blocks.push(b.into_inner());
        }
        return Ok(Payload::Blocks(blocks));
    }
    if len > SMALL_CHUNK && pool::is_pooled(len) {
        let mut owned = buffers.take_owned(len);
        read_direct(reader, owned.buf_mut()).await?;
        return Ok(Payload::Bytes(Bytes::from_owner(owned)));
    }
    // Small writes share one allocation; big ones get their own.
    buf.reserve(len.max(SMALL_CHUNK));
    let mut limited = reader.take(len as u64);
    while buf.len() < len {
        if limited.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Payload::Bytes(buf.split_to(len).freeze()))
}

/// Fills `dst` with what the read buffer holds, then straight from the socket: a large
/// payload read through the buffer would be copied once more on the way.
async fn read_direct<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    dst: &mut [u8],
) -> io::Result<()> {
    let buffered = reader.buffer();
    let n = buffered.len().min(dst.len());
    dst[..n].copy_from_slice(&buffered[..n]);
    std::pin::Pin::new(&mut *reader).consume(n);
    if n < dst.len() {
        reader.get_mut().read_exact(&mut dst[n..]).await?;
    }
    Ok(())
}

/// Runs a request right here if it completes without waiting (cache hits, writes into the
/// cache: most requests), else hands it to its own task. Spawning every request, and
/// waking another thread to run it, cost as much CPU as a cached 4 KiB read itself.
///
/// The first poll uses a no-op waker; a future that returns `Pending` is polled again at
/// once by the runtime with the task's real waker, and futures must wake only the waker of
/// their latest poll, so no wake-up is lost.
fn run_or_spawn<F: Future<Output = ()> + Send + 'static>(fut: F) {
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    if fut.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(fut);
    }
}

struct RequestTask {
    ctx: Arc<ConnCtx>,
    tx: mpsc::Sender<Reply>,
    permit: OwnedSemaphorePermit,
    /// Released by the writer once the reply is out (see `BUDGET_UNITS`).
    budget: Option<OwnedSemaphorePermit>,
    state: watch::Receiver<State>,
}

impl RequestTask {
    async fn run(mut self, req: Request, payload: Payload) {
        let op = command::execute(&self.ctx, req, payload);
        tokio::pin!(op);
        let reply = tokio::select! {
            biased;
            r = &mut op => r,
            _ = expired(&mut self.state) => {
                // Out of time: answer now, free the connection, let the store finish quietly.
                let reply = command::error(&self.ctx, Some(req.command), req.cookie, ESHUTDOWN, "server is shutting down");
                let _ = self.tx.send(reply).await;
                drop((self.tx, self.permit));
                let _ = op.await;
                return;
            }
        };
        let _ = self.tx.send(reply.hold(self.budget)).await;
        drop(self.permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(command: u16, length: u32) -> RequestHeader {
        RequestHeader {
            flags: 0,
            command,
            cookie: 0,
            offset: 0,
            length,
        }
    }

    #[test]
    fn budget_cost_covers_data_commands_only() {
        assert_eq!(budget_cost(&h(CMD_READ, 0)), 1);
        assert_eq!(budget_cost(&h(CMD_WRITE, 4096)), 1);
        assert_eq!(budget_cost(&h(CMD_READ, BUDGET_UNIT + 1)), 2);
        assert_eq!(
            budget_cost(&h(CMD_READ, MAX_PAYLOAD)),
            MAX_PAYLOAD / BUDGET_UNIT
        );
        assert!(budget_cost(&h(CMD_READ, MAX_PAYLOAD)) * 4 <= BUDGET_UNITS);
        // oversized requests are refused before they could use memory
        assert_eq!(budget_cost(&h(CMD_READ, MAX_PAYLOAD + 1)), 0);
        assert_eq!(budget_cost(&h(CMD_TRIM, u32::MAX)), 0);
        assert_eq!(budget_cost(&h(CMD_BLOCK_STATUS, 1 << 30)), 0);
    }
}

//! One accepted connection from start to end: the handshake (with STARTTLS, the TLS handshake
//! and a second round of options over TLS), all under one timeout, then the transmission
//! phase. Kept apart from `transmission` (the request data path) so the negotiation side (TLS,
//! access control) and the data path can change independently.

use super::handover::Ticket;
use super::handshake::{self, Context, NegotiateError, Negotiated, Outcome, MAX_OPTIONS};
use super::listener::{Accepted, BoxRead, BoxWrite, Duplex, Peer};
use super::transmission::serve_negotiated;
use super::{Inner, HANDSHAKE_TIMEOUT};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, BufReader};
use tracing::{debug, info, warn};

/// Serves one accepted connection to the end; errors are logged here and go no further.
pub(crate) async fn serve_connection(inner: &Arc<Inner>, conn: Accepted) {
    let peer = conn.peer;
    let negotiated = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake_phase(inner, conn.stream, &peer),
    )
    .await;
    let (neg, reader, writer, fd) = match negotiated {
        Ok(Ok(ready)) => ready,
        Err(_) => return warn!(%peer, "handshake timed out"),
        Ok(Err(NegotiateError::Aborted | NegotiateError::ShuttingDown)) => {
            return debug!(%peer, "handshake ended without an export")
        }
        Ok(Err(NegotiateError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return debug!(%peer, "client left during the handshake")
        }
        Ok(Err(e)) => return warn!(%peer, "handshake failed: {e}"),
    };
    let ticket = Ticket::new(fd, &peer);
    serve_negotiated(inner, neg, &peer.to_string(), reader, writer, ticket).await;
}

/// The handshake's result: the export, the stream's halves, and a second descriptor of the
/// socket when the connection can be handed over (plain socket, nothing read ahead).
type Ready = (Negotiated, BoxRead, BoxWrite, Option<OwnedFd>);

/// Negotiates an export, upgrading to TLS on STARTTLS; returns the stream's halves for the
/// transmission phase (any bytes already read behind the last option stay in front).
async fn handshake_phase(
    inner: &Inner,
    stream: Box<dyn Duplex>,
    peer: &Peer,
) -> Result<Ready, NegotiateError> {
    // One snapshot per connection: a reload never changes the rules mid-handshake.
    let policy = inner.tls.snapshot();
    let mut io = BufReader::new(stream);
    let flags = handshake::greet(&mut io).await?;
    let mut budget = MAX_OPTIONS;
    let plain = Context {
        flags,
        peer,
        tls: policy.as_deref(),
        tls_active: false,
    };
    let acceptor = match handshake::options(inner, &mut io, plain, &mut budget).await? {
        Outcome::Export(neg) => {
            let leftover = io.buffer().to_vec();
            // Bytes read ahead sit in front of the socket where a handover could not see
            // them: such a (rare) connection closes at a handover instead.
            let fd = match leftover.is_empty() {
                true => io.get_ref().socket_fd(),
                false => None,
            };
            let (r, w) = io.into_inner().into_halves();
            return Ok((neg, prepend(leftover, r), w, fd));
        }
        Outcome::StartTls(acceptor) => acceptor,
    };
    if !io.buffer().is_empty() {
        return Err(NegotiateError::DataAfterStartTls);
    }
    let tls = acceptor
        .accept(io.into_inner())
        .await
        .map_err(NegotiateError::Tls)?;
    debug!(%peer, "TLS established");
    let mut io = BufReader::new(tls);
    let secured = Context {
        flags,
        peer,
        tls: policy.as_deref(),
        tls_active: true,
    };
    match handshake::options(inner, &mut io, secured, &mut budget).await? {
        Outcome::Export(neg) => {
            info!(%peer, "export negotiated over TLS");
            let leftover = io.buffer().to_vec();
            let (r, w) = tokio::io::split(io.into_inner());
            // TLS state cannot move to another process: no handover for this connection.
            Ok((neg, prepend(leftover, Box::new(r)), Box::new(w), None))
        }
        // `options` answers a second STARTTLS with ERR_INVALID and carries on.
        Outcome::StartTls(_) => Err(NegotiateError::Aborted),
    }
}

/// The read half with `leftover` (bytes a buffered handshake read ahead) in front of it.
pub(crate) fn prepend(leftover: Vec<u8>, reader: BoxRead) -> BoxRead {
    if leftover.is_empty() {
        reader
    } else {
        Box::new(io::Cursor::new(leftover).chain(reader))
    }
}

#[cfg(test)]
mod tests;

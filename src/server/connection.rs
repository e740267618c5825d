//! One accepted connection from start to end: the handshake under its timeout, then the
//! transmission phase. Kept apart from `transmission` (the request data path) so the
//! negotiation side (TLS, access control) and the data path can change independently.

use super::handshake::{self, NegotiateError};
use super::listener::Accepted;
use super::transmission::serve_negotiated;
use super::{Inner, HANDSHAKE_TIMEOUT};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, BufReader};
use tracing::{debug, warn};

/// Serves one accepted connection to the end; errors are logged here and go no further.
pub(crate) async fn serve_connection(inner: &Arc<Inner>, conn: Accepted) {
    let peer = conn.peer;
    let mut reader = BufReader::new(conn.reader);
    let mut writer = conn.writer;
    let negotiated = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::negotiate(inner, &mut reader, &mut writer),
    )
    .await;
    let neg = match negotiated {
        Ok(Ok(n)) => n,
        Err(_) => return warn!(%peer, "handshake timed out"),
        Ok(Err(NegotiateError::Aborted | NegotiateError::ShuttingDown)) => {
            return debug!(%peer, "handshake ended without an export")
        }
        Ok(Err(NegotiateError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return debug!(%peer, "client left during the handshake")
        }
        Ok(Err(e)) => return warn!(%peer, "handshake failed: {e}"),
    };
    // Bytes the client sent right behind its last option stay in front of the socket.
    let leftover = reader.buffer().to_vec();
    let reader = io::Cursor::new(leftover).chain(reader.into_inner());
    serve_negotiated(inner, neg, &peer, reader, writer).await;
}

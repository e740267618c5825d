//! Passing live connections to another process (a takeover): each connection stops reading
//! between two requests, finishes what it has in flight, and parks its socket with what the
//! transmission phase needs (`ConnState`); the next process adopts it and goes on reading
//! where this one stopped. The client sees a pause, never a reset.

use super::listener::Peer;
use super::transmission::serve_negotiated;
use super::{ConnGuard, Inner, Server, State};
use crate::export::ExportState;
use serde::{Deserialize, Serialize};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// What a connection negotiated (and the client relies on), plus the bytes it sent that were
/// read but not yet served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnState {
    /// Export name as negotiated.
    pub export: String,
    /// Size the client was told.
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` selected.
    pub block_status: bool,
    /// `unix:/path` of the listener for a Unix-socket client, `None` for TCP.
    #[serde(default)]
    pub unix: Option<String>,
    /// Requests (or their start) already read from the socket, in hex.
    #[serde(default)]
    pub pending: String,
}

/// A connection's socket and state, between two processes.
#[derive(Debug)]
pub struct ParkedConnection {
    pub state: ConnState,
    pub fd: OwnedFd,
}

/// What a connection may be parked with: its socket (a second descriptor) and peer.
pub(crate) struct Ticket {
    pub fd: OwnedFd,
    pub unix: Option<String>,
}

impl Ticket {
    /// A ticket for a plain socket connection whose handshake left no bytes read ahead.
    pub(crate) fn new(fd: Option<OwnedFd>, peer: &Peer) -> Option<Ticket> {
        let unix = match peer {
            Peer::Tcp(_) => None,
            Peer::Unix(shown) => Some(shown.to_string()),
        };
        fd.map(|fd| Ticket { fd, unix })
    }
}

impl Inner {
    pub(crate) fn park(&self, conn: ParkedConnection) {
        self.parked.lock().push(conn);
    }
}

impl Server {
    /// Stops accepting and reading; every connection finishes its in-flight requests (within
    /// `grace`, then ESHUTDOWN) and is parked. Connections that cannot move (TLS, or still in
    /// the handshake) close. Returns the parked connections; listeners are taken from their
    /// handles (`ListenerHandle::into_listener`).
    pub async fn hand_over(&self, grace: Duration) -> Vec<ParkedConnection> {
        self.inner.state.send_replace(State::HandingOver);
        info!(
            "handover: reading stopped; parking {} connection(s)",
            self.connection_count()
        );
        let mut conns = self.inner.connections.subscribe();
        let done = tokio::time::timeout(grace, conns.wait_for(|c| *c == 0))
            .await
            .is_ok();
        if !done {
            self.inner.state.send_replace(State::Expired);
            let last = Duration::from_secs(5);
            if tokio::time::timeout(last, conns.wait_for(|c| *c == 0))
                .await
                .is_err()
            {
                warn!(
                    "handover: {} connection(s) neither parked nor closed",
                    self.connection_count()
                );
            }
        }
        std::mem::take(&mut *self.inner.parked.lock())
    }

    /// Back to serving after a handover that did not happen (listeners are spawned again by
    /// the caller, parked connections adopted again).
    pub fn resume(&self) {
        self.inner.state.send_replace(State::Running);
    }

    /// Serves connections another process parked: each goes on with the export of the same
    /// name in this process's registry. One whose export is gone, not served, or of another
    /// size is closed (the client would misread its device otherwise).
    pub fn adopt(&self, parked: Vec<ParkedConnection>) {
        for conn in parked {
            if let Err(e) = self.adopt_one(conn) {
                warn!("cannot take over a connection: {e}");
            }
        }
    }

    fn adopt_one(&self, conn: ParkedConnection) -> Result<(), String> {
        let ParkedConnection { state, fd } = conn;
        let export = self
            .inner
            .registry
            .find(&state.export)
            .ok_or_else(|| format!("export '{}' does not exist", state.export))?;
        let store = match export.state() {
            ExportState::Serving { store, .. } => Arc::clone(store),
            ExportState::Refused { reason } => {
                return Err(format!("export '{}': {reason}", state.export))
            }
        };
        if store.size() != state.size {
            return Err(format!(
                "export '{}' is {} bytes now, the client was told {}",
                state.export,
                store.size(),
                state.size
            ));
        }
        let pending = from_hex(&state.pending).ok_or("bad pending bytes")?;
        let (peer, stream): (Peer, Box<dyn super::listener::Duplex>) = match &state.unix {
            None => {
                let std = std::net::TcpStream::from(fd);
                std.set_nonblocking(true).map_err(|e| e.to_string())?;
                let peer = std.peer_addr().map_err(|e| e.to_string())?;
                let s = tokio::net::TcpStream::from_std(std).map_err(|e| e.to_string())?;
                let _ = s.set_nodelay(true);
                (Peer::Tcp(peer), Box::new(s))
            }
            Some(shown) => {
                let std = std::os::unix::net::UnixStream::from(fd);
                std.set_nonblocking(true).map_err(|e| e.to_string())?;
                let s = tokio::net::UnixStream::from_std(std).map_err(|e| e.to_string())?;
                (Peer::Unix(Arc::from(shown.as_str())), Box::new(s))
            }
        };
        let neg = super::handshake::Negotiated {
            attachment: export.attach(),
            client: store.adopt_client(),
            store,
            size: state.size,
            read_only: state.read_only,
            structured: state.structured,
            block_status: state.block_status,
        };
        let ticket = Ticket::new(stream.socket_fd(), &peer);
        let (r, w) = stream.into_halves();
        let reader = super::connection::prepend(pending, r);
        let guard = ConnGuard::new(&self.inner);
        info!(%peer, export = %state.export, "connection taken over");
        let leased = Arc::clone(&export);
        tokio::spawn(async move {
            // The old process gave the lease up: take it before serving the client's writes.
            if let Err(reason) = leased.take_lease().await {
                tracing::warn!(%peer, "connection taken over, but the export lease cannot be taken: {reason}");
                return;
            }
            let inner = &guard.0;
            serve_negotiated(inner, neg, &peer.to_string(), reader, w, ticket).await;
        });
        Ok(())
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_garbage() {
        let bytes = [0u8, 1, 0x25, 0x60, 0x95, 0xff];
        assert_eq!(from_hex(&to_hex(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(from_hex(""), Some(vec![]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
    }

    #[test]
    fn state_is_stable_json() {
        let s = ConnState {
            export: "e".into(),
            size: 1 << 20,
            read_only: false,
            structured: true,
            block_status: true,
            unix: None,
            pending: "00ff".into(),
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ConnState>(&json).unwrap(), s);
    }
}

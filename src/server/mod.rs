//! The NBD server: listeners accept connections, each connection negotiates an export
//! (`handshake`) and then serves requests concurrently (`transmission`, `command`, `writer`).
//! A broken or hostile connection only ever closes itself. Shutdown is two-phase: `Draining`
//! (no new connections, options get ERR_SHUTDOWN, new requests ESHUTDOWN, in-flight ones
//! finish) and, once the grace time is over, `Expired` (whatever is still running is answered
//! with ESHUTDOWN and the connection closes).

mod command;
mod connection;
pub mod handover;
mod handshake;
mod listener;
pub mod tls;
mod transmission;
mod writer;

#[cfg(test)]
mod tests;

pub use listener::Listener;
pub use tls::TlsAcceptorSource;

use crate::export::Registry;
use crate::tls::TlsError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Connections beyond this are closed right after accept, with a log line.
pub const MAX_CONNECTIONS: usize = 1024;
/// Requests of one connection served at once; the reader stops reading beyond it.
pub const MAX_IN_FLIGHT: usize = 128;
/// A client must finish negotiating within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a handover lets a connection still in the handshake finish negotiating (so it
/// moves with the others instead of being cut); clients negotiate in milliseconds.
pub const HANDOVER_HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

/// Lifecycle of the server as every connection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Running,
    /// Shutdown started: finish what is in flight, refuse anything new.
    Draining,
    /// Grace time over: answer whatever still runs with ESHUTDOWN and close.
    Expired,
    /// Another process takes over: stop reading between requests, finish what is in flight,
    /// park each connection (socket and negotiated state) for it. Nothing is refused; a
    /// connection still negotiating may finish first (`HANDOVER_HANDSHAKE_GRACE`).
    HandingOver,
}

impl State {
    /// Draining or expired: new requests are answered with ESHUTDOWN.
    fn stopping(self) -> bool {
        matches!(self, State::Draining | State::Expired)
    }
}

pub(crate) struct Inner {
    registry: Arc<Registry>,
    /// `[server.tls]` as last applied; each connection takes a snapshot.
    tls: TlsAcceptorSource,
    state: watch::Sender<State>,
    connections: watch::Sender<usize>,
    /// Connections parked by a handover, waiting to be passed on.
    parked: parking_lot::Mutex<Vec<handover::ParkedConnection>>,
}

/// The NBD server; clones share listeners, connections and shutdown state.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("connections", &self.connection_count())
            .finish()
    }
}

/// Stops one listener when closed; connections it accepted keep running.
#[derive(Debug)]
pub struct ListenerHandle {
    task: JoinHandle<Option<Listener>>,
    addr: String,
}

impl ListenerHandle {
    /// Stops accepting on this listener (a Unix socket file is removed).
    pub fn close(self) {
        self.task.abort();
    }
    /// The listener itself once a handover stopped its accept loop (`Server::hand_over`).
    pub async fn into_listener(self) -> Option<Listener> {
        self.task.await.ok().flatten()
    }
    /// The address this listener serves, as `Listener::local_addr()` gave it.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// Counts a connection for as long as it lives, so shutdown can wait for them.
struct ConnGuard(Arc<Inner>);

impl ConnGuard {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.connections.send_modify(|c| *c += 1);
        ConnGuard(Arc::clone(inner))
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.send_modify(|c| *c -= 1);
    }
}

impl Server {
    /// A server answering from `registry`, which reloads may swap under it at any time.
    pub fn new(registry: Arc<Registry>) -> Server {
        Server {
            inner: Arc::new(Inner {
                registry,
                tls: TlsAcceptorSource::default(),
                state: watch::channel(State::Running).0,
                connections: watch::channel(0).0,
                parked: parking_lot::Mutex::new(Vec::new()),
            }),
        }
    }

    /// Starts accepting on `listener`; logs `listening on <addr>` (tests parse it).
    pub fn spawn_listener(&self, listener: Listener) -> ListenerHandle {
        let addr = listener.local_addr();
        info!("listening on {addr}");
        let inner = Arc::clone(&self.inner);
        let task = tokio::spawn(accept_loop(inner, listener));
        ListenerHandle { task, addr }
    }

    /// Applies `[server.tls]` (at start and on every reload, which re-reads the files).
    /// Connections already open keep what they negotiated. Files that do not load keep the
    /// credentials in service; the error (already logged) is returned.
    pub fn set_tls(&self, tls: Option<&crate::config::TlsConfig>) -> Result<(), TlsError> {
        self.inner.tls.apply(tls)
    }

    /// Connections currently open (handshaking or transmitting).
    pub fn connection_count(&self) -> usize {
        *self.inner.connections.borrow()
    }

    /// Stops every listener, lets in-flight requests finish within `grace`, answers the rest
    /// with ESHUTDOWN, and returns when the connections are gone.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.state.send_replace(State::Draining);
        let mut conns = self.inner.connections.subscribe();
        let drained = tokio::time::timeout(grace, no_connections(&mut conns)).await;
        if drained.is_ok() {
            return;
        }
        self.inner.state.send_replace(State::Expired);
        // Connections now close as soon as their replies are written; a client that stops
        // reading could still hold its writer, so do not wait for it forever.
        let last = grace.max(Duration::from_secs(5));
        if tokio::time::timeout(last, no_connections(&mut conns))
            .await
            .is_err()
        {
            warn!(
                "shutdown: {} connection(s) still open after the grace time",
                self.connection_count()
            );
        }
    }
}

async fn no_connections(conns: &mut watch::Receiver<usize>) {
    // The sender lives in `Inner`, which the caller holds: `wait_for` cannot fail here.
    let _ = conns.wait_for(|c| *c == 0).await;
}

/// Accepts until shutdown or a handover; returns the listener to a handover.
async fn accept_loop(inner: Arc<Inner>, listener: Listener) -> Option<Listener> {
    let mut state = inner.state.subscribe();
    let addr = listener.local_addr();
    loop {
        let accepted = tokio::select! {
            s = state.wait_for(|s| *s != State::Running) => {
                if s.is_ok_and(|s| *s == State::HandingOver) {
                    debug!("handing over the listener on {addr}");
                    return Some(listener);
                }
                break;
            }
            r = listener.accept() => r,
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                warn!("accept on {addr} failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if *inner.connections.borrow() >= MAX_CONNECTIONS {
            warn!(peer = %conn.peer, "connection limit {MAX_CONNECTIONS} reached; closing");
            continue;
        }
        let guard = ConnGuard::new(&inner);
        tokio::spawn(async move {
            let _guard = guard;
            connection::serve_connection(&_guard.0, conn).await;
        });
    }
    debug!("stopped accepting on {addr}");
    None
}

//! Listening sockets: TCP (with TCP_NODELAY on every connection, since NBD replies are small
//! and latency-bound) and Unix sockets. A stale Unix socket file left by a crashed daemon is
//! removed before binding; a live one (something answers on it) is an error.

use crate::config::{AllowRule, ListenAddr};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A bound, listening socket, ready for `Server::spawn_listener`.
#[derive(Debug)]
pub struct Listener {
    kind: Kind,
    display: String,
}

#[derive(Debug)]
enum Kind {
    Tcp(TcpListener),
    Unix(UnixListener, UnixPath),
}

/// Removes the socket file when the listener goes away, so the next bind finds a clean slate.
#[derive(Debug)]
struct UnixPath {
    path: PathBuf,
    /// `unix:/path`, shared by the `Peer` of every client of this listener.
    shown: Arc<str>,
}

impl Drop for UnixPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The read half of a connection, owned by the transmission reader loop.
pub(crate) type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The write half of a connection, owned by the reply writer task.
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// A connected byte stream. The handshake needs it whole (STARTTLS wraps it in TLS); the
/// transmission phase wants independent halves, which TCP and Unix sockets give without the
/// lock `tokio::io::split` takes on every read and write.
pub(crate) trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {
    /// Splits the stream for the reader loop and the writer task.
    fn into_halves(self: Box<Self>) -> (BoxRead, BoxWrite);
    /// A second descriptor of the socket, so a takeover can pass the live connection to
    /// another process; `None` for streams that are not one plain socket.
    fn socket_fd(&self) -> Option<OwnedFd> {
        None
    }
}

impl Duplex for TcpStream {
    fn into_halves(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }
    fn socket_fd(&self) -> Option<OwnedFd> {
        self.as_fd().try_clone_to_owned().ok()
    }
}

impl Duplex for UnixStream {
    fn into_halves(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = self.into_split();
        (Box::new(r), Box::new(w))
    }
    fn socket_fd(&self) -> Option<OwnedFd> {
        self.as_fd().try_clone_to_owned().ok()
    }
}

/// In-memory pipes, for tests that drive a connection without sockets.
impl Duplex for tokio::io::DuplexStream {
    fn into_halves(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(*self);
        (Box::new(r), Box::new(w))
    }
}

/// Who is on the other end: what an export's `allow` list is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Peer {
    /// A TCP client at this address.
    Tcp(SocketAddr),
    /// A client of the Unix-socket listener shown as `unix:/path`.
    Unix(Arc<str>),
}

impl Peer {
    /// Whether `rules` admit this peer: a network rule matches TCP clients in it (IPv4-mapped
    /// IPv6 addresses count as IPv4), `unix` matches every Unix-socket client.
    pub(crate) fn allowed_by(&self, rules: &[AllowRule]) -> bool {
        rules.iter().any(|rule| match self {
            Peer::Tcp(addr) => rule.matches_ip(addr.ip()),
            Peer::Unix(_) => *rule == AllowRule::Unix,
        })
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix(listener) => f.write_str(listener),
        }
    }
}

/// An accepted connection.
pub(crate) struct Accepted {
    pub stream: Box<dyn Duplex>,
    pub peer: Peer,
}

impl Listener {
    /// Binds `addr`. Port 0 picks a free port; `local_addr()` tells which.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(hostport) => {
                let l = TcpListener::bind(hostport.as_str()).await?;
                let display = l.local_addr()?.to_string();
                Ok(Listener {
                    kind: Kind::Tcp(l),
                    display,
                })
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = UnixListener::bind(path)?;
                let display = format!("unix:{}", path.display());
                Ok(Listener {
                    kind: Kind::Unix(
                        l,
                        UnixPath {
                            path: path.clone(),
                            shown: Arc::from(display.as_str()),
                        },
                    ),
                    display,
                })
            }
        }
    }

    /// A listening socket passed on by the process that served before us (a takeover): the
    /// same socket, so clients queued in its backlog are accepted here.
    pub fn from_fd(addr: &ListenAddr, fd: OwnedFd) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(_) => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                let l = TcpListener::from_std(std)?;
                let display = l.local_addr()?.to_string();
                Ok(Listener {
                    kind: Kind::Tcp(l),
                    display,
                })
            }
            ListenAddr::Unix(path) => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                let l = UnixListener::from_std(std)?;
                let display = format!("unix:{}", path.display());
                let shown = Arc::from(display.as_str());
                let path = path.clone();
                Ok(Listener {
                    kind: Kind::Unix(l, UnixPath { path, shown }),
                    display,
                })
            }
        }
    }

    /// The listening socket, to pass to the process taking over. A Unix socket's file stays:
    /// the same socket goes on listening there in the other process.
    pub fn into_fd(self) -> io::Result<OwnedFd> {
        match self.kind {
            Kind::Tcp(l) => Ok(OwnedFd::from(l.into_std()?)),
            Kind::Unix(l, path) => {
                std::mem::forget(path);
                Ok(OwnedFd::from(l.into_std()?))
            }
        }
    }

    /// Where clients reach us: `127.0.0.1:10809` or `unix:/path` (real port when bound to 0).
    pub fn local_addr(&self) -> String {
        self.display.clone()
    }

    /// Waits for the next client. Errors are per-accept (e.g. EMFILE) and not fatal.
    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match &self.kind {
            Kind::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                stream.set_nodelay(true)?;
                Ok(Accepted {
                    stream: Box::new(stream),
                    peer: Peer::Tcp(peer),
                })
            }
            Kind::Unix(l, sock) => {
                let (stream, _) = l.accept().await?;
                Ok(Accepted {
                    stream: Box::new(stream),
                    peer: Peer::Unix(Arc::clone(&sock.shown)),
                })
            }
        }
    }
}

/// Deletes `path` if it is a socket nobody listens on; refuses to touch anything else.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

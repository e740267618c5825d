//! Listening sockets: TCP (with TCP_NODELAY on every connection, since NBD replies are small
//! and latency-bound) and Unix sockets. A stale Unix socket file left by a crashed daemon is
//! removed before binding; a live one (something answers on it) is an error.

use crate::config::ListenAddr;
use std::io;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

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
struct UnixPath(PathBuf);

impl Drop for UnixPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An accepted connection, split into halves that tasks can own independently.
pub(crate) struct Accepted {
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    pub peer: String,
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
                    kind: Kind::Unix(l, UnixPath(path.clone())),
                    display,
                })
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
                let (r, w) = stream.into_split();
                Ok(Accepted {
                    reader: Box::new(r),
                    writer: Box::new(w),
                    peer: peer.to_string(),
                })
            }
            Kind::Unix(l, path) => {
                let (stream, _) = l.accept().await?;
                let (r, w) = stream.into_split();
                let peer = format!("unix:{}", path.0.display());
                Ok(Accepted {
                    reader: Box::new(r),
                    writer: Box::new(w),
                    peer,
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

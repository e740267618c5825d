//! The daemon side of the control socket: binds it (replacing a stale socket file, never a
//! live daemon's), answers each connection's one request from the `Daemon`, and removes the
//! socket file when stopped.

use super::protocol::{Copied, Deleted, ExportStatus, Reply, Request, SnapshotEntry, SnapshotList};
use super::protocol::{Status, MAX_REQUEST};
use crate::daemon::{Daemon, ExportSnapshot};
use crate::export::{ExportState, Refusal};
use crate::proto::request::Command;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

/// How long a client may take to send its request line: a stuck client must not hold a task.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The running control socket; stops accepting and removes the socket file when dropped.
#[derive(Debug)]
pub struct ControlHandle {
    path: PathBuf,
    /// Inode of the socket file we bound: after a takeover the path belongs to the next
    /// process, whose file must stay.
    inode: Option<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.task.abort();
        if inode(&self.path) == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// Binds `path` and answers admin commands from `daemon`. A socket that cannot be bound is
/// logged and skipped: the daemon serves its exports without admin commands rather than not
/// at all (the commands then say the daemon cannot be reached).
///
/// `replace`: the daemon answering there is handing over to us (a takeover) and leaves;
/// its socket file is replaced instead of kept.
pub fn spawn(path: &Path, daemon: Arc<Daemon>, replace: bool) -> Option<ControlHandle> {
    let is_socket =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
    // Only ever a socket: anything else at the path is refused by `bind`, never deleted.
    if replace && is_socket(path) {
        let _ = std::fs::remove_file(path);
    }
    let listener = match bind(path) {
        Ok(l) => l,
        Err(e) => {
            warn!(
                "control socket {} not available ({e}); admin commands cannot reach this daemon",
                path.display()
            );
            return None;
        }
    };
    info!("control socket on {}", path.display());
    let task = tokio::spawn(accept_loop(listener, daemon));
    Some(ControlHandle {
        path: path.to_path_buf(),
        inode: inode(path),
        task,
    })
}

/// Binds the socket with mode 0660. A socket file nobody answers on is a leftover of a
/// crashed daemon and is replaced; one that answers belongs to a running daemon and is kept.
/// Anything that is not a socket (a mistyped path naming the config file, a directory, a
/// symlink) is never removed: the bind is refused instead.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            ));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another daemon answers on it",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

async fn accept_loop(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let daemon = Arc::clone(&daemon);
                tokio::spawn(async move { serve(stream, &daemon).await });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning on the error.
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request line (bounded in size and time), answers it, closes.
async fn serve(stream: UnixStream, daemon: &Arc<Daemon>) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut limited = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST as u64));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, limited.read_until(b'\n', &mut line)).await;
    let reply = match read {
        Ok(Ok(_)) if line.ends_with(b"\n") => match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Takeover) => {
                let read = limited.into_inner().into_inner();
                return match read.reunite(write) {
                    Ok(stream) => takeover(stream, daemon).await,
                    Err(e) => warn!("takeover: cannot use the control connection: {e}"),
                };
            }
            Ok(request) => {
                debug!(?request, "control request");
                answer(daemon, request).await
            }
            Err(e) => Reply::refused(format!("malformed request: {e}")),
        },
        Ok(Ok(_)) => Reply::refused(format!(
            "request not terminated by a newline within {MAX_REQUEST} bytes"
        )),
        Ok(Err(e)) => Reply::refused(format!("cannot read the request: {e}")),
        Err(_) => Reply::refused("no request received in time"),
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

/// How long connections may finish their in-flight requests before a takeover answers the
/// rest with ESHUTDOWN (as a stop would).
const TAKEOVER_GRACE: Duration = Duration::from_secs(10);

/// Hands everything over to the process on `stream`; the daemon then exits (`Daemon::
/// wait_handed_over`). When an export cannot be flushed, the takeover is refused and this
/// daemon serves on.
async fn takeover(stream: UnixStream, daemon: &Arc<Daemon>) {
    info!("takeover requested: parking connections and flushing");
    let started = std::time::Instant::now();
    let std = match stream
        .into_std()
        .and_then(|s| s.set_nonblocking(false).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => return warn!("takeover: cannot use the control connection: {e}"),
    };
    let prepared = daemon.hand_over(TAKEOVER_GRACE).await;
    let parked = match &prepared {
        Ok(h) => format!(
            "{} listener(s), {} connection(s)",
            h.listeners.len(),
            h.connections.len()
        ),
        Err(_) => String::new(),
    };
    let sent = tokio::task::spawn_blocking(move || match prepared {
        Ok(handover) => super::handover::send(&std, handover).map(|()| true),
        Err(error) => super::handover::refuse(&std, error).map(|()| false),
    })
    .await;
    match sent {
        Ok(Ok(true)) => {
            info!(
                "handed over {parked} after {} ms; exiting",
                started.elapsed().as_millis()
            );
            daemon.handed_over(true);
        }
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            warn!("takeover: sending the sockets failed ({e}); clients were disconnected");
            daemon.handed_over(false);
        }
        Err(e) => {
            warn!("takeover: sending task failed ({e})");
            daemon.handed_over(false);
        }
    }
}

/// Runs one command.
pub async fn answer(daemon: &Daemon, request: Request) -> Reply {
    let result =
        match request {
            Request::Takeover => {
                Err("a takeover is its own conversation (nbd-s3 serve --takeover)".to_owned())
            }
            Request::Status => encode(status(daemon)),
            Request::SnapshotCreate { export, snapshot } => daemon
                .snapshot_create(&export, &snapshot)
                .await
                .and_then(|s| encode(entry(s))),
            Request::SnapshotList { export } => daemon
                .snapshot_list(export.as_deref())
                .await
                .and_then(|all| {
                    encode(SnapshotList {
                        snapshots: all.into_iter().map(entry).collect(),
                    })
                }),
            Request::SnapshotDelete { export, snapshot } => daemon
                .snapshot_delete(&export, &snapshot)
                .await
                .and_then(|n| encode(Deleted { deleted_objects: n })),
            Request::SnapshotRollback { export, snapshot } => daemon
                .snapshot_rollback(&export, &snapshot)
                .await
                .and_then(|n| encode(Deleted { deleted_objects: n })),
            Request::Flatten { export } => daemon
                .flatten(&export)
                .await
                .and_then(|n| encode(Copied { copied_blocks: n })),
            Request::Gc { export } => daemon
                .gc(&export)
                .await
                .and_then(|n| encode(Deleted { deleted_objects: n })),
        };
    match result {
        Ok(v) => Reply::done(v),
        Err(e) => Reply::refused(e),
    }
}

fn encode<T: serde::Serialize>(value: T) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|e| format!("cannot encode the reply: {e}"))
}

fn entry(s: ExportSnapshot) -> SnapshotEntry {
    SnapshotEntry {
        export: s.export,
        snapshot: s.snapshot.name,
        created: s.snapshot.created,
        size: s.snapshot.size,
        bytes_held_only: s.snapshot.bytes_held_only,
        clones: s.clones,
    }
}

fn status(daemon: &Daemon) -> Status {
    let exports = daemon
        .registry()
        .list()
        .iter()
        .map(|e| {
            let (state, reason) = match e.state() {
                ExportState::Serving { .. } => ("serving", None),
                ExportState::Refused { reason } => ("refused", Some(reason.to_string())),
            };
            // An idle export holds no lease: nobody (`None`) until a client attaches.
            let held = e.lease().is_some_and(|l| !l.is_lost() && !l.is_released());
            let lease_holder = match e.state() {
                ExportState::Serving { .. } if held => {
                    Some(format!("this daemon (pid {})", std::process::id()))
                }
                ExportState::Refused {
                    reason: Refusal::LeaseHeld { holder, .. },
                } => Some(holder.clone()),
                _ => None,
            };
            ExportStatus {
                name: e.name().to_owned(),
                state: state.to_owned(),
                reason,
                clients: e.attached(),
                dirty_bytes: e.store().map_or(0, |s| s.dirty_bytes()),
                lease_holder,
                journal_bytes: e.store().and_then(|s| s.journal_bytes()),
                s3_requests: daemon.s3_requests(e.name()),
                bytes_written: e.requests().snapshot(Command::Write).bytes,
            }
        })
        .collect();
    Status { exports }
}

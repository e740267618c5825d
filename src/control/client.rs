//! The command-line side of the control socket: finds the socket (`--control`, else the
//! `[server] control` of `--config`, else the default), sends one request and turns the reply
//! into output and an exit code: 0 done, 1 refused (stderr says why), 2 usage error, 3 the
//! daemon cannot be reached.

use super::protocol::{Reply, Request, SnapshotEntry, Status, MAX_REQUEST};
use crate::config::{table, DEFAULT_CONFIG_PATH, DEFAULT_CONTROL};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code: the command was refused (stderr says why).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: the command line was wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no daemon answers on the control socket.
pub const EXIT_UNREACHABLE: u8 = 3;

/// The largest reply read: a snapshot list of many exports stays far below it.
const MAX_REPLY: u64 = 64 << 20;
/// How long to wait to connect and to send: a live daemon accepts at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the answer. A snapshot create may flush twice (each up to
/// `flush_timeout`, 60 s by default), flatten and gc copy or delete many objects; a daemon
/// that has not answered by then is stuck (e.g. retrying an unreadable manifest).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);
/// Environment variable that overrides [`ANSWER_TIMEOUT`], in seconds.
pub const ANSWER_TIMEOUT_ENV: &str = "NBD_S3_ADMIN_TIMEOUT";

/// [`ANSWER_TIMEOUT`], or the whole seconds `NBD_S3_ADMIN_TIMEOUT` sets (at least 1).
fn answer_timeout() -> Result<Duration, ClientError> {
    match std::env::var(ANSWER_TIMEOUT_ENV) {
        Err(_) => Ok(ANSWER_TIMEOUT),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
            _ => Err(ClientError::Usage(format!(
                "{ANSWER_TIMEOUT_ENV}={v:?}: expected a whole number of seconds, at least 1"
            ))),
        },
    }
}

/// Why a command did not complete, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unreachable(String),
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Refused(_) => EXIT_REFUSED,
            ClientError::Usage(_) => EXIT_USAGE,
            ClientError::Unreachable(_) => EXIT_UNREACHABLE,
        }
    }
}

/// The socket to use: `--control` wins; else `[server] control` of the configuration file
/// (`--config`, else the default file when it exists); else the default socket.
pub fn locate(control: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, ClientError> {
    if let Some(socket) = control {
        return Ok(socket);
    }
    let explicit = config.is_some();
    let path = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    if !explicit && !path.exists() {
        return Ok(PathBuf::from(DEFAULT_CONTROL));
    }
    control_of(&path)
}

/// Only `[server] control` is read, not the whole configuration: an admin may run the
/// commands without the right to read the S3 secret the file names.
fn control_of(path: &Path) -> Result<PathBuf, ClientError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientError::Usage(format!("cannot read {shown}: {e}")))?;
    let doc: toml::Table = toml::from_str(&text)
        .map_err(|e| ClientError::Usage(format!("{shown}: not a valid configuration: {e}")))?;
    let control = doc
        .get("server")
        .and_then(|s| s.get("control"))
        .map(|c| c.as_str().map(str::to_owned));
    match control {
        None => Ok(PathBuf::from(DEFAULT_CONTROL)),
        Some(None) => Err(ClientError::Usage(format!(
            "{shown}: [server] control is not a string"
        ))),
        Some(Some(off)) if off == "off" => Err(ClientError::Unreachable(format!(
            "the control socket is off in {shown} ([server] control = \"off\")"
        ))),
        Some(Some(socket)) => {
            let base = path.parent().unwrap_or(Path::new("."));
            Ok(base.join(socket))
        }
    }
}

/// Sends `request` to the daemon at `socket` and returns its result.
pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let unreachable = |e: std::io::Error| {
        ClientError::Unreachable(format!(
            "cannot reach the daemon on {}: {e}",
            socket.display()
        ))
    };
    let answer = answer_timeout()?;
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream
        .set_write_timeout(Some(CONNECT_TIMEOUT))
        .map_err(unreachable)?;
    stream.set_read_timeout(Some(answer)).map_err(unreachable)?;
    let mut line = serde_json::to_vec(request)
        .map_err(|e| ClientError::Usage(format!("cannot encode the request: {e}")))?;
    if line.len() >= MAX_REQUEST {
        return Err(ClientError::Usage("request too long".into()));
    }
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let mut reply = Vec::new();
    BufReader::new(stream.take(MAX_REPLY))
        .read_until(b'\n', &mut reply)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::Unreachable(format!(
                    "the daemon on {} did not answer within {}s (it may be stuck; \
                     {ANSWER_TIMEOUT_ENV}=SECONDS waits longer)",
                    socket.display(),
                    answer.as_secs()
                ))
            }
            _ => unreachable(e),
        })?;
    if reply.is_empty() {
        return Err(ClientError::Unreachable(format!(
            "the daemon on {} closed the connection without answering",
            socket.display()
        )));
    }
    let reply: Reply = serde_json::from_slice(&reply).map_err(|e| {
        ClientError::Unreachable(format!("unreadable reply from {}: {e}", socket.display()))
    })?;
    match (reply.ok, reply.result, reply.error) {
        (true, Some(result), _) => Ok(result),
        (true, None, _) => Ok(serde_json::Value::Null),
        (false, _, error) => Err(ClientError::Refused(
            error.unwrap_or_else(|| "refused".into()),
        )),
    }
}

/// Decodes a command's result into its typed form.
pub fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ClientError> {
    serde_json::from_value(value)
        .map_err(|e| ClientError::Unreachable(format!("unexpected reply from the daemon: {e}")))
}

/// `status` as a table: EXPORT, STATE (serving, or refused and why), CLIENTS, DIRTY (bytes),
/// LEASE (holder), REQ/GIB (object-store requests per GiB clients wrote, `-` before any
/// write), and JOURNAL (bytes in the local journal) when some export has one.
pub fn status_table(status: &Status) -> String {
    let journal = status.exports.iter().any(|e| e.journal_bytes.is_some());
    let mut header = ["EXPORT", "STATE", "CLIENTS", "DIRTY", "LEASE", "REQ/GIB"]
        .map(String::from)
        .to_vec();
    if journal {
        header.push("JOURNAL".into());
    }
    let mut rows = vec![header];
    for e in &status.exports {
        let state = match &e.reason {
            Some(why) => format!("{}: {why}", e.state),
            None => e.state.clone(),
        };
        let mut row = vec![
            e.name.clone(),
            state,
            e.clients.to_string(),
            e.dirty_bytes.to_string(),
            e.lease_holder.clone().unwrap_or_else(|| "-".into()),
            e.requests_per_gib_written()
                .map_or_else(|| "-".into(), |n| n.to_string()),
        ];
        if journal {
            row.push(
                e.journal_bytes
                    .map_or_else(|| "-".into(), |b| b.to_string()),
            );
        }
        rows.push(row);
    }
    table(&rows)
}

/// Snapshots as a table: EXPORT, SNAPSHOT, CREATED, BYTES_HELD_ONLY (what deleting it
/// frees), CLONES (exports based on it).
pub fn snapshot_table(snapshots: &[SnapshotEntry]) -> String {
    let header = ["EXPORT", "SNAPSHOT", "CREATED", "BYTES_HELD_ONLY", "CLONES"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for s in snapshots {
        let clones = if s.clones.is_empty() {
            "-".to_owned()
        } else {
            s.clones.join(",")
        };
        rows.push(vec![
            s.export.clone(),
            s.snapshot.clone(),
            s.created.clone(),
            s.bytes_held_only.to_string(),
            clones,
        ]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::ExportStatus;

    #[test]
    fn socket_comes_from_the_flag_then_the_file_then_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("exports.toml");
        std::fs::write(&file, "[server]\ncontrol = \"ctl.sock\"\n").expect("write");
        let flag = PathBuf::from("/x/y.sock");
        assert_eq!(
            locate(Some(flag.clone()), Some(file.clone())).ok(),
            Some(flag)
        );
        assert_eq!(
            locate(None, Some(file.clone())).ok(),
            Some(dir.path().join("ctl.sock"))
        );
        std::fs::write(&file, "[server]\nlisten = \"127.0.0.1:1\"\n").expect("write");
        assert_eq!(
            locate(None, Some(file.clone())).ok(),
            Some(PathBuf::from(DEFAULT_CONTROL))
        );
        std::fs::write(&file, "[server]\ncontrol = \"off\"\n").expect("write");
        let off = locate(None, Some(file.clone())).expect_err("off");
        assert_eq!(off.exit_code(), EXIT_UNREACHABLE);
        let missing = locate(None, Some(dir.path().join("none.toml"))).expect_err("missing");
        assert_eq!(missing.exit_code(), EXIT_USAGE);
    }

    #[test]
    fn status_table_shows_why_an_export_is_refused() {
        let status = Status {
            exports: vec![
                ExportStatus {
                    name: "vm1".into(),
                    state: "serving".into(),
                    reason: None,
                    clients: 2,
                    dirty_bytes: 4096,
                    lease_holder: Some("this daemon (pid 7)".into()),
                    journal_bytes: None,
                    s3_requests: 300,
                    bytes_written: 512 << 20,
                },
                ExportStatus {
                    name: "vm2".into(),
                    state: "refused".into(),
                    reason: Some("bad".into()),
                    clients: 0,
                    dirty_bytes: 0,
                    lease_holder: None,
                    journal_bytes: None,
                    s3_requests: 0,
                    bytes_written: 0,
                },
            ],
        };
        let text = status_table(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "EXPORT  STATE         CLIENTS  DIRTY  LEASE                REQ/GIB"
        );
        assert_eq!(
            lines[1],
            "vm1     serving       2        4096   this daemon (pid 7)  600"
        );
        assert_eq!(
            lines[2],
            "vm2     refused: bad  0        0      -                    -"
        );
    }
}

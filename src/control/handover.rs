//! A takeover over the control socket: the new process (`nbd-s3 serve --takeover`) sends the
//! request line `{"command":"takeover"}`; the running daemon parks its connections, flushes,
//! releases its leases and answers with records, each a 4-byte big-endian length, a JSON
//! `Record` and, for listeners and connections, exactly one descriptor (SCM_RIGHTS) attached
//! to the record's first byte. `End` closes the list; `Refused` says why nothing comes.
//!
//! Blocking calls on purpose: both sides do this once, off the request path.

use crate::daemon::Handover;
use crate::server::handover::{ConnState, ParkedConnection};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Largest record accepted: a connection's state with a full read buffer (128 KiB) in hex.
const MAX_RECORD: usize = 1024 * 1024;
/// Most records (listeners and connections) one takeover may bring.
const MAX_RECORDS: usize = 4096;
/// How long the new process waits for the old one to park, flush and answer: the flush of a
/// large dirty cache to a slow S3 is what takes time.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// One item of the answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    /// A listening socket, by its configured address.
    Listener { addr: String },
    /// A client connection in transmission.
    Connection { state: ConnState },
    /// Nothing more follows. Also says when the sender stopped reading from its clients and
    /// how many handovers came before (absent from older senders: defaults).
    End {
        #[serde(default)]
        parked_at_ns: Option<u64>,
        #[serde(default)]
        handovers: u64,
    },
    /// The running daemon does not hand over (and keeps serving).
    Refused { error: String },
}

/// Sends `handover` (old process side); descriptors are closed here once sent.
pub fn send(stream: &UnixStream, handover: Handover) -> io::Result<()> {
    for (addr, fd) in handover.listeners {
        send_record(stream, &Record::Listener { addr }, Some(&fd))?;
    }
    for conn in handover.connections {
        let record = Record::Connection { state: conn.state };
        send_record(stream, &record, Some(&conn.fd))?;
    }
    let end = Record::End {
        parked_at_ns: handover.parked_at_ns,
        handovers: handover.handovers,
    };
    send_record(stream, &end, None)
}

/// Tells the new process that no takeover happens, and why.
pub fn refuse(stream: &UnixStream, error: String) -> io::Result<()> {
    send_record(stream, &Record::Refused { error }, None)
}

fn send_record(stream: &UnixStream, record: &Record, fd: Option<&OwnedFd>) -> io::Result<()> {
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    let len = u32::try_from(json.len()).map_err(io::Error::other)?;
    let head = len.to_be_bytes();
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    // The descriptor rides on the first byte; the rest of the record follows as plain data.
    let iov = [IoSlice::new(&head)];
    let sent = sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    if sent != head.len() {
        // A 4-byte write on a blocking socket is written whole or fails.
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    let mut w = stream;
    w.write_all(&json)
}

/// Asks the daemon on `socket` to hand over (new process side). `Ok(None)`: no daemon
/// answers there, start as usual. The time from asking to the last record is returned too.
pub fn receive(socket: &Path) -> io::Result<Option<(Handover, Duration)>> {
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let started = Instant::now();
    (&stream).write_all(b"{\"command\":\"takeover\"}\n")?;
    let mut out = Handover::default();
    for _ in 0..MAX_RECORDS {
        let (record, fd) = recv_record(&stream)?;
        match (record, fd) {
            (Record::Listener { addr }, Some(fd)) => out.listeners.push((addr, fd)),
            (Record::Connection { state }, Some(fd)) => {
                out.connections.push(ParkedConnection { state, fd })
            }
            (
                Record::End {
                    parked_at_ns,
                    handovers,
                },
                None,
            ) => {
                out.parked_at_ns = parked_at_ns;
                out.handovers = handovers;
                return Ok(Some((out, started.elapsed())));
            }
            (Record::Refused { error }, None) => {
                return Err(io::Error::other(format!(
                    "the running daemon refused the takeover: {error}"
                )))
            }
            (record, fd) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "unexpected takeover record {record:?} with {} descriptor(s)",
                        usize::from(fd.is_some())
                    ),
                ))
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("more than {MAX_RECORDS} takeover records"),
    ))
}

fn recv_record(stream: &UnixStream) -> io::Result<(Record, Option<OwnedFd>)> {
    let mut head = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (n, mut fds) = {
        let mut iov = [IoSliceMut::new(&mut head)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // Owned from here on: closed if anything below fails.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the running daemon closed the control connection during the takeover",
        ));
    }
    let mut r = stream;
    r.read_exact(&mut head[n..])?;
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("takeover record of {len} bytes (limit {MAX_RECORD})"),
        ));
    }
    let mut json = vec![0u8; len];
    r.read_exact(&mut json)?;
    let record = serde_json::from_slice(&json).map_err(io::Error::other)?;
    if fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more than one descriptor on a takeover record",
        ));
    }
    Ok((record, fds.pop()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_record_without_timing_still_reads() {
        let old: Record = serde_json::from_str(r#"{"kind":"end"}"#).expect("old end record");
        assert!(matches!(
            old,
            Record::End {
                parked_at_ns: None,
                handovers: 0
            }
        ));
        let new = serde_json::to_string(&Record::End {
            parked_at_ns: Some(7),
            handovers: 2,
        })
        .expect("encode");
        assert!(matches!(
            serde_json::from_str(&new).expect("decode"),
            Record::End {
                parked_at_ns: Some(7),
                handovers: 2
            }
        ));
    }
}

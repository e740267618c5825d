//! HTTP/1.1 message framing for the fault proxy: heads (request line or status line and the
//! headers that decide framing) and bodies (Content-Length, chunked, or to EOF), kept raw so
//! the proxy forwards exactly the bytes it received.

use super::Op;
use std::io;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Largest request/response head the proxy accepts (S3 heads are a few KiB).
const MAX_HEAD: usize = 64 * 1024;

/// A parsed message head, with its raw bytes for forwarding unchanged.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) raw: Vec<u8>,
    /// Request: method. Response: empty.
    pub(crate) method: String,
    /// Request: path and query. Response: empty.
    pub(crate) target: String,
    /// Response status (0 for requests).
    pub(crate) status: u16,
    pub(crate) op: Op,
    pub(crate) content_length: Option<u64>,
    pub(crate) chunked: bool,
    pub(crate) close: bool,
}

impl Head {
    /// The object key of a path-style request (`/bucket/key?query` → `key`).
    pub(crate) fn key(&self) -> &str {
        let path = self.target.split('?').next().unwrap_or("");
        path.trim_start_matches('/')
            .split_once('/')
            .map_or("", |(_, k)| k)
    }
}

/// Reads one head; `Ok(None)` on a clean EOF before any byte.
pub(crate) async fn read_head<R: AsyncBufRead + Unpin>(
    r: &mut R,
    request: bool,
) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        let n = r.read_until(b'\n', &mut raw).await?;
        if n == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if raw.len() > MAX_HEAD {
            return Err(io::Error::other("head too large"));
        }
        let line = &raw[before..];
        if (line == b"\r\n" || line == b"\n") && before > 0 {
            break;
        }
    }
    Ok(Some(parse_head(raw, request)?))
}

fn parse_head(raw: Vec<u8>, request: bool) -> io::Result<Head> {
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (a, b) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut head = Head {
        raw,
        method: String::new(),
        target: String::new(),
        status: 0,
        op: Op::Other,
        content_length: None,
        chunked: false,
        close: false,
    };
    if request {
        head.method = a.to_string();
        head.target = b.to_string();
        head.op = classify(a, b);
    } else {
        head.status = b
            .parse()
            .map_err(|_| io::Error::other(format!("bad status line {first:?}")))?;
    }
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
        match k.as_str() {
            "content-length" => head.content_length = v.parse().ok(),
            "transfer-encoding" => head.chunked = v.contains("chunked"),
            "connection" => head.close = v.contains("close"),
            _ => {}
        }
    }
    Ok(head)
}

/// The request kind, from method and path-style target.
fn classify(method: &str, target: &str) -> Op {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let has_key = path
        .trim_start_matches('/')
        .split_once('/')
        .is_some_and(|(_, k)| !k.is_empty());
    match method {
        "GET" if !has_key || query.contains("list-type") => Op::List,
        "GET" => Op::Get,
        "PUT" => Op::Put,
        "DELETE" => Op::Delete,
        "HEAD" => Op::Head,
        "POST" if query.split('&').any(|q| q == "delete" || q == "delete=") => Op::DeleteObjects,
        _ => Op::Other,
    }
}

/// Reads the body `head` announces, raw (chunk framing kept), so it can be forwarded as is.
pub(crate) async fn read_body<R: AsyncBufRead + Unpin>(
    r: &mut R,
    head: &Head,
    to_eof: bool,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if head.chunked {
        loop {
            let start = body.len();
            if r.read_until(b'\n', &mut body).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let line = String::from_utf8_lossy(&body[start..]).into_owned();
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_hex, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let s = body.len();
                    if r.read_until(b'\n', &mut body).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    if body[s..] == *b"\r\n" || body[s..] == *b"\n" {
                        return Ok(body);
                    }
                }
            }
            let s = body.len();
            body.resize(s + size as usize + 2, 0);
            r.read_exact(&mut body[s..]).await?;
        }
    } else if let Some(n) = head.content_length {
        body.resize(n as usize, 0);
        r.read_exact(&mut body).await?;
    } else if to_eof {
        r.read_to_end(&mut body).await?;
    }
    Ok(body)
}

/// Whether a response to `req` with head `resp` carries a body.
pub(crate) fn response_has_body(req: &Head, resp: &Head) -> bool {
    req.method != "HEAD" && !(100..200).contains(&resp.status) && !matches!(resp.status, 204 | 304)
}

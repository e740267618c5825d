//! A deliberately small HTTP/1.1 responder for `GET /metrics`. Prometheus sends one short GET
//! per scrape, so a request head is read (bounded in size and time), answered, and the
//! connection closed. Nothing here can stop the daemon: a slow, huge or garbled request only
//! ends its own connection, and a flood of connections is capped.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Longest request head accepted; a scrape's is a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After the response, how long and how much unread input is drained before closing.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;
/// Connections served at once; more are closed at accept (a scraper needs one).
pub const MAX_CLIENTS: usize = 16;
/// The Prometheus text exposition format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Produces the metrics text for one scrape.
pub type Render = Arc<dyn Fn() -> Result<String, fmt::Error> + Send + Sync>;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /metrics` (`body`) or `HEAD /metrics`.
    Metrics { body: bool },
    /// Any other method on `/metrics`.
    MethodNotAllowed,
    /// Any other path.
    NotFound,
    /// Not an HTTP/1.x request line.
    BadRequest,
}

/// Routes a request by its request line (`METHOD TARGET HTTP/1.x`); headers are ignored.
pub(crate) fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (path, method) {
        ("/metrics", "GET") => Route::Metrics { body: true },
        ("/metrics", "HEAD") => Route::Metrics { body: false },
        ("/metrics", _) => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// The whole response for `route` (always `Connection: close`).
pub(crate) fn respond(route: Route, render: &Render) -> Vec<u8> {
    match route {
        Route::Metrics { body } => match render() {
            Ok(text) => response("200 OK", CONTENT_TYPE, &text, body, ""),
            Err(_) => plain(
                "500 Internal Server Error",
                "cannot encode the metrics\n",
                "",
            ),
        },
        Route::MethodNotAllowed => plain(
            "405 Method Not Allowed",
            "only GET and HEAD\n",
            "Allow: GET, HEAD\r\n",
        ),
        Route::NotFound => plain("404 Not Found", "metrics are at /metrics\n", ""),
        Route::BadRequest => plain("400 Bad Request", "not an HTTP/1.x request\n", ""),
    }
}

fn plain(status: &str, text: &str, extra: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", text, true, extra)
}

fn response(status: &str, content_type: &str, text: &str, body: bool, extra: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\n{extra}Connection: close\r\n\r\n",
        text.len()
    )
    .into_bytes();
    if body {
        out.extend_from_slice(text.as_bytes());
    }
    out
}

/// Accepts scrapes until the task is dropped. Accept errors (EMFILE) back off instead of
/// spinning; they never end the loop.
pub(crate) async fn serve(listener: TcpListener, render: Render) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "metrics: {MAX_CLIENTS} requests already running; closing");
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = handle(stream, &render).await {
                debug!(%peer, "metrics request ended: {e}");
            }
        });
    }
}

/// Why no request head was read.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("client closed the connection")]
    Closed,
    #[error("request head over {MAX_HEAD} bytes")]
    TooLarge,
}

async fn handle(mut stream: TcpStream, render: &Render) -> io::Result<()> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => respond(route(&head), render),
        Ok(Err(HeadError::TooLarge)) => plain(
            "431 Request Header Fields Too Large",
            "request head too large\n",
            "",
        ),
        Ok(Err(HeadError::Closed)) => return Ok(()),
        Ok(Err(HeadError::Io(e))) => return Err(e),
        Err(_) => plain(
            "408 Request Timeout",
            "request head not received in time\n",
            "",
        ),
    };
    let send = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, send).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response not taken",
            ))
        }
    }
    // Closing with unread input (an oversized head) would send a reset that can destroy the
    // response in the client's buffer: drain a little until the client closes first.
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ok(())
}

/// Reads up to the blank line ending the head (the whole head, so closing afterwards does not
/// reset the connection under the response).
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

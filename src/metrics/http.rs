//! `GET /metrics` over HTTP/1.1, served with hyper. Prometheus sends one short GET per scrape,
//! so each connection answers one request and closes. Nothing here can stop the daemon: a slow,
//! huge or garbled request only ends its own connection, and a flood of connections is capped.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE as TYPE};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Longest request head accepted (hyper's smallest read buffer); a scrape's is a few hundred
/// bytes. Longer heads get 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head; then it gets 408.
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
    /// `GET` or `HEAD /metrics` (hyper leaves the body out for `HEAD`).
    Metrics,
    /// Any other method on `/metrics`.
    MethodNotAllowed,
    /// Any other path.
    NotFound,
    /// A target that is not a plain path (`*`, an absolute URI).
    BadRequest,
}

/// Routes a request by method and target; headers are ignored. A request line hyper cannot
/// parse never gets here: hyper answers it with 400 itself.
pub(crate) fn route(method: &Method, uri: &Uri) -> Route {
    if uri.scheme().is_some() || uri.authority().is_some() || !uri.path().starts_with('/') {
        return Route::BadRequest;
    }
    match (uri.path(), method) {
        ("/metrics", &Method::GET | &Method::HEAD) => Route::Metrics,
        ("/metrics", _) => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// The response for `route` (always `Connection: close`).
pub(crate) fn respond(route: Route, render: &Render) -> Response<Full<Bytes>> {
    match route {
        Route::Metrics => match render() {
            Ok(text) => response(StatusCode::OK, CONTENT_TYPE, text),
            Err(_) => plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            ),
        },
        Route::MethodNotAllowed => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        Route::NotFound => plain(StatusCode::NOT_FOUND, "metrics are at /metrics\n"),
        Route::BadRequest => plain(StatusCode::BAD_REQUEST, "not an HTTP/1.x request\n"),
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", text.to_owned())
}

/// hyper adds `Content-Length` from the body, and sends no body for `HEAD`.
fn response(status: StatusCode, content_type: &'static str, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    r
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

/// hyper closes a connection whose head does not arrive in time without a word; a client
/// that is merely slow learns why from this response instead.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
    Content-Type: text/plain; charset=utf-8\r\nContent-Length: 34\r\n\
    Cache-Control: no-store\r\nConnection: close\r\n\r\n\
    request head not received in time\n";

/// Serves one connection: one request, one response, then an orderly close.
async fn handle(mut stream: TcpStream, render: &Render) -> io::Result<()> {
    let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
        let response = respond(route(req.method(), req.uri()), render);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // Closing after one response, header names as they were always written, no `Date`
    // (a scrape is timestamped by Prometheus).
    http.keep_alive(false)
        .title_case_headers(true)
        .auto_date_header(false)
        .max_buf_size(MAX_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT);
    // The stream is lent, not given: after hyper is done it is still ours to close gently.
    let conn = http.serve_connection(TokioIo::new(&mut stream), service);
    match tokio::time::timeout(READ_TIMEOUT + WRITE_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.is_timeout() => {
            let send = stream.write_all(REQUEST_TIMEOUT);
            tokio::time::timeout(WRITE_TIMEOUT, send)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response not taken"))??;
        }
        // A head too large or unparsable has had its 4xx from hyper; any other error (the
        // client went away) ends the connection.
        Ok(Err(e)) if e.is_parse() || e.is_parse_too_large() => {}
        Ok(Err(e)) => return Err(io::Error::other(e)),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response not taken",
            ))
        }
    }
    let _ = stream.shutdown().await;
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

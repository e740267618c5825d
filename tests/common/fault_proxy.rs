//! A fault-injecting HTTP/1.1 proxy between nbd-s3 and the S3 fixture, on its own loopback
//! port. Point `[s3] endpoint` at `FaultProxy::endpoint()`; requests are forwarded byte for
//! byte (the SigV4 signature covers the Host header the client sent, and s3s-fs checks it
//! against the Host it receives, so nothing is rewritten).
//!
//! The proxy parses request and response framing (Content-Length or chunked bodies, 1xx
//! interim replies, HEAD) so it can decide *per request*, not per pooled connection, whether to
//! inject a fault. Rules (`Rule`) are set at runtime from the test; every injected fault is
//! counted. A throttling mode (`throttle_above`) answers `503 SlowDown` to whatever exceeds a
//! number of requests being served at once, as an S3 prefix does when pushed too hard.
//! Decisions use a seeded xorshift, so a run with the same seed and the same request
//! order injects the same faults.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub(crate) mod http;
use http::{read_body, read_head, response_has_body, Head};

/// What the proxy does to a request a rule picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// `503 SlowDown` with an S3 XML error body; the request never reaches S3.
    SlowDown,
    /// `500 InternalError`; the request never reaches S3.
    InternalError,
    /// `501 NotImplemented`, as a store without that request answers; never reaches S3.
    NotImplemented,
    /// The response is held back for the rule's delay, then sent intact.
    Delay,
    /// The connection is reset before the request is forwarded.
    ResetBefore,
    /// The request is forwarded (S3 executes it), then the connection is reset: a lost reply.
    ResetAfter,
    /// The response head and half the body are sent, then the connection is closed.
    CutBody,
    /// One byte in the middle of the response body is flipped in transit (length kept).
    CorruptBody,
}

/// The kind of S3 request, from method, path and query (path-style addressing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Get,
    Put,
    Delete,
    List,
    Head,
    /// Multi-object delete (`POST /bucket?delete`).
    DeleteObjects,
    Other,
}

/// One fault-injection rule: which requests, how often, for how long.
#[derive(Debug, Clone)]
pub struct Rule {
    fault: Fault,
    ops: Vec<Op>,
    key_contains: Option<String>,
    rate: f64,
    delay: Duration,
    until: Option<Instant>,
    remaining: Option<u64>,
}

impl Rule {
    /// Injects `fault` into every request (narrow it with the other methods).
    pub fn new(fault: Fault) -> Rule {
        Rule {
            fault,
            ops: vec![],
            key_contains: None,
            rate: 1.0,
            delay: Duration::from_millis(500),
            until: None,
            remaining: None,
        }
    }
    /// Only these request kinds (default: all).
    pub fn only(mut self, ops: &[Op]) -> Rule {
        self.ops = ops.to_vec();
        self
    }
    /// Only requests whose object key contains `s`.
    pub fn key_contains(mut self, s: &str) -> Rule {
        self.key_contains = Some(s.to_string());
        self
    }
    /// Probability (0..=1) that a matching request gets the fault.
    pub fn rate(mut self, rate: f64) -> Rule {
        self.rate = rate;
        self
    }
    /// How long `Fault::Delay` holds a response.
    pub fn delay(mut self, d: Duration) -> Rule {
        self.delay = d;
        self
    }
    /// The rule expires `d` from now.
    pub fn for_period(mut self, d: Duration) -> Rule {
        self.until = Some(Instant::now() + d);
        self
    }
    /// The rule expires after injecting `n` faults.
    pub fn times(mut self, n: u64) -> Rule {
        self.remaining = Some(n);
        self
    }

    fn matches(&self, req: &Head) -> bool {
        (self.ops.is_empty() || self.ops.contains(&req.op))
            && self
                .key_contains
                .as_ref()
                .map_or(true, |s| req.key().contains(s.as_str()))
    }
}

/// State shared between the test and the proxy's tasks.
#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    rules: Mutex<Vec<Rule>>,
    outage: AtomicBool,
    /// An outage set with `outage_for` ends by itself at this instant.
    outage_until: Mutex<Option<Instant>>,
    rng: Mutex<u64>,
    injected: Mutex<HashMap<Fault, u64>>,
    refused: AtomicU64,
    requests: Mutex<HashMap<Op, u64>>,
    log_heads: AtomicBool,
    heads: Mutex<Vec<String>>,
    /// Latency mode: no response leaves sooner than this many microseconds after its
    /// request was received (a distant region's round trip), whatever else happens to it.
    latency_us: AtomicU64,
    /// Throttling mode: a request arriving while this many are being served gets `503
    /// SlowDown` instead (`u64::MAX`: off), like an S3 prefix pushed past what it takes.
    throttle_above: AtomicU64,
    /// Requests being served now (forwarded, reply not yet sent), and the most at once.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// Requests the throttling mode answered with 503 SlowDown, and the ones it let through.
    throttled: AtomicU64,
    admitted: AtomicU64,
}

impl State {
    /// Picks the fault for this request (first matching rule whose dice roll hits), if any.
    fn pick(&self, req: &Head) -> Option<(Fault, Duration)> {
        let now = Instant::now();
        let mut rules = self.rules.lock().unwrap();
        rules.retain(|r| r.until.map_or(true, |u| now < u) && r.remaining != Some(0));
        for r in rules.iter_mut() {
            if !r.matches(req) || self.roll() >= r.rate {
                continue;
            }
            if let Some(n) = r.remaining.as_mut() {
                *n -= 1;
            }
            *self.injected.lock().unwrap().entry(r.fault).or_default() += 1;
            return Some((r.fault, r.delay));
        }
        None
    }

    /// Whether S3 is unreachable now (`set_outage` or a running `outage_for`).
    fn in_outage(&self) -> bool {
        let until = *self.outage_until.lock().unwrap();
        self.outage.load(Ordering::SeqCst) || until.is_some_and(|u| Instant::now() < u)
    }

    /// Counts a request as being served, unless the throttling mode refuses it (`None`).
    fn admit(self: &Arc<Self>) -> Option<Serving> {
        let above = self.throttle_above.load(Ordering::SeqCst);
        let before = self.in_flight.fetch_add(1, Ordering::SeqCst);
        if before >= above {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.throttled.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        self.admitted.fetch_add(1, Ordering::SeqCst);
        self.peak_in_flight.fetch_max(before + 1, Ordering::SeqCst);
        Some(Serving(Arc::clone(self)))
    }

    /// A uniform number in [0, 1) from the seeded xorshift.
    fn roll(&self) -> f64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One request being served, for the throttling mode's count.
struct Serving(Arc<State>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the throttling mode did so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Throttling {
    /// Requests answered `503 SlowDown` because too many were being served.
    pub throttled: u64,
    /// Requests let through.
    pub admitted: u64,
    /// The most requests served at once.
    pub peak: u64,
}

impl Throttling {
    /// What happened between `earlier` and this reading (the peak is this reading's).
    pub fn since(self, earlier: Throttling) -> Throttling {
        Throttling {
            throttled: self.throttled - earlier.throttled,
            admitted: self.admitted - earlier.admitted,
            peak: self.peak,
        }
    }

    /// Throttled share of the requests.
    pub fn fraction(self) -> f64 {
        self.throttled as f64 / (self.throttled + self.admitted).max(1) as f64
    }
}

/// A running proxy; stops (and drops all its connections) when dropped.
pub struct FaultProxy {
    state: Arc<State>,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `127.0.0.1:upstream_port` on a kernel-chosen loopback port.
    pub fn start(upstream_port: u16, seed: u64) -> FaultProxy {
        let state = Arc::new(State {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            rules: Mutex::new(vec![]),
            outage: AtomicBool::new(false),
            outage_until: Mutex::new(None),
            rng: Mutex::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            injected: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            requests: Mutex::new(HashMap::new()),
            log_heads: AtomicBool::new(false),
            heads: Mutex::new(vec![]),
            latency_us: AtomicU64::new(0),
            throttle_above: AtomicU64::new(u64::MAX),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                tokio::select! {
                    _ = accept_loop(listener, st) => {}
                    _ = rx => {}
                }
            });
            rt.shutdown_background();
        });
        FaultProxy {
            state,
            port,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, the `[s3] endpoint` to give nbd-s3.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Adds a rule (rules are tried in the order added).
    pub fn add(&self, rule: Rule) {
        self.state.rules.lock().unwrap().push(rule);
    }

    /// Removes every rule (an outage is separate: see `set_outage`).
    pub fn clear(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// While on, every connection and every request is reset: S3 is unreachable.
    pub fn set_outage(&self, on: bool) {
        self.state.outage.store(on, Ordering::SeqCst);
    }

    /// S3 is unreachable from now for `d`, then back by itself (whatever the test is blocked
    /// on meanwhile); returns the instant the outage ends.
    pub fn outage_for(&self, d: Duration) -> Instant {
        let end = Instant::now() + d;
        *self.state.outage_until.lock().unwrap() = Some(end);
        end
    }

    /// Faults injected so far of kind `f`.
    pub fn injected(&self, f: Fault) -> u64 {
        self.state
            .injected
            .lock()
            .unwrap()
            .get(&f)
            .copied()
            .unwrap_or(0)
    }

    /// Faults injected so far, all kinds, outage refusals included.
    pub fn injected_total(&self) -> u64 {
        let rules: u64 = self.state.injected.lock().unwrap().values().sum();
        rules + self.refused()
    }

    /// Connections and requests reset because of an outage.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Requests of kind `op` seen (faulted or not).
    pub fn requests(&self, op: Op) -> u64 {
        self.state
            .requests
            .lock()
            .unwrap()
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    /// Latency mode: every response is sent `d` after its request arrived (zero: off). The
    /// store's own time counts within `d`, so at 20 ms the client sees 20 ms round trips.
    pub fn set_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.state.latency_us.store(us, Ordering::SeqCst);
    }

    /// Throttling mode: while `n` requests are being served, every further one is answered
    /// `503 SlowDown` (an S3 error body with Code SlowDown) without reaching S3; `None`: off.
    /// Also resets the peak of requests served at once.
    pub fn throttle_above(&self, n: Option<u64>) {
        self.state
            .throttle_above
            .store(n.unwrap_or(u64::MAX), Ordering::SeqCst);
        let now = self.state.in_flight.load(Ordering::SeqCst);
        self.state.peak_in_flight.store(now, Ordering::SeqCst);
    }

    /// What the throttling mode did so far.
    pub fn throttling(&self) -> Throttling {
        Throttling {
            throttled: self.state.throttled.load(Ordering::SeqCst),
            admitted: self.state.admitted.load(Ordering::SeqCst),
            peak: self.state.peak_in_flight.load(Ordering::SeqCst),
        }
    }

    /// The port the proxy listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts recording request heads (for finding out what the SDK sends).
    pub fn log_heads(&self, on: bool) {
        self.state.log_heads.store(on, Ordering::SeqCst);
    }

    /// Request heads recorded so far.
    pub fn heads(&self) -> Vec<String> {
        self.state.heads.lock().unwrap().clone()
    }

    /// One line for test output: every counter.
    pub fn summary(&self) -> String {
        let inj = self.state.injected.lock().unwrap().clone();
        let req = self.state.requests.lock().unwrap().clone();
        format!(
            "requests {req:?}; injected {inj:?}; outage resets {}; throttling {:?}",
            self.refused(),
            self.throttling()
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, st: Arc<State>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        if st.in_outage() {
            st.refused.fetch_add(1, Ordering::SeqCst);
            reset(sock);
            continue;
        }
        let st = st.clone();
        tokio::spawn(async move {
            let _ = serve(sock, st).await;
        });
    }
}

/// Closes with RST instead of FIN, like a crashed server or a middlebox dropping state.
fn reset(sock: TcpStream) {
    #[allow(deprecated)] // a zero linger never blocks
    let _ = sock.set_linger(Some(Duration::ZERO));
    drop(sock);
}

/// A canned S3 error reply.
fn s3_error(fault: Fault, req: &Head) -> Vec<u8> {
    let (status, reason, code, msg) = match fault {
        Fault::SlowDown => (
            503,
            "Slow Down",
            "SlowDown",
            "Please reduce your request rate.",
        ),
        Fault::NotImplemented => (
            501,
            "Not Implemented",
            "NotImplemented",
            "A header you provided implies functionality that is not implemented.",
        ),
        _ => (
            500,
            "Internal Server Error",
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{msg}</Message><Resource>{}</Resource><RequestId>fault-proxy</RequestId></Error>",
        req.target
    );
    let len = if req.method == "HEAD" { 0 } else { body.len() };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n\
         x-amz-request-id: fault-proxy\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes();
    if req.method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// One client connection: requests in order, each forwarded (or faulted) in turn.
async fn serve(client: TcpStream, st: Arc<State>) -> io::Result<()> {
    let mut client = BufReader::new(client);
    let mut up: Option<BufReader<TcpStream>> = None;
    loop {
        let Some(req) = read_head(&mut client, true).await? else {
            return Ok(());
        };
        *st.requests.lock().unwrap().entry(req.op).or_default() += 1;
        if st.log_heads.load(Ordering::SeqCst) {
            let text = String::from_utf8_lossy(&req.raw).into_owned();
            st.heads.lock().unwrap().push(text);
        }
        if st.in_outage() {
            st.refused.fetch_add(1, Ordering::SeqCst);
            reset(client.into_inner());
            return Ok(());
        }
        let body = read_body(&mut client, &req, false).await?;
        let due = Instant::now() + Duration::from_micros(st.latency_us.load(Ordering::Relaxed));
        let fault = st.pick(&req);
        let refusal = match fault {
            Some((f @ (Fault::SlowDown | Fault::InternalError | Fault::NotImplemented), _)) => {
                Some(f)
            }
            Some((Fault::ResetBefore, _)) => {
                reset(client.into_inner());
                return Ok(());
            }
            _ => None,
        };
        // Held until the reply is sent: the request counts as being served till then.
        let serving = match refusal {
            None => st.admit(),
            Some(_) => None,
        };
        if let Some(f) = refusal.or(serving.is_none().then_some(Fault::SlowDown)) {
            tokio::time::sleep_until(due.into()).await;
            client.get_mut().write_all(&s3_error(f, &req)).await?;
            if req.close {
                return Ok(());
            }
            continue;
        }
        if up.is_none() {
            match TcpStream::connect(st.upstream).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    up = Some(BufReader::new(s));
                }
                Err(_) => {
                    reset(client.into_inner());
                    return Ok(());
                }
            }
        }
        let upstream = up.as_mut().expect("connected above");
        upstream.get_mut().write_all(&req.raw).await?;
        upstream.get_mut().write_all(&body).await?;
        let (resp, resp_body) = match relay_response(upstream, &mut client, &req).await {
            Ok(r) => r,
            Err(_) => {
                reset(client.into_inner());
                return Ok(());
            }
        };
        if matches!(fault, Some((Fault::ResetAfter, _))) {
            reset(client.into_inner());
            return Ok(());
        }
        let close = req.close || resp.close || (resp.content_length.is_none() && !resp.chunked);
        tokio::time::sleep_until(due.into()).await;
        if !deliver(&mut client, fault, &resp, resp_body).await? || close {
            return Ok(());
        }
    }
}

/// Reads the final response from upstream, passing 1xx interim replies straight through.
async fn relay_response(
    upstream: &mut BufReader<TcpStream>,
    client: &mut BufReader<TcpStream>,
    req: &Head,
) -> io::Result<(Head, Vec<u8>)> {
    loop {
        let resp = read_head(upstream, false)
            .await?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if (100..200).contains(&resp.status) {
            client.get_mut().write_all(&resp.raw).await?;
            continue;
        }
        let body = if response_has_body(req, &resp) {
            read_body(upstream, &resp, true).await?
        } else {
            Vec::new()
        };
        return Ok((resp, body));
    }
}

/// Sends the response to the client, applying a response-side fault; false when the
/// connection was closed on purpose.
async fn deliver(
    client: &mut BufReader<TcpStream>,
    fault: Option<(Fault, Duration)>,
    resp: &Head,
    mut body: Vec<u8>,
) -> io::Result<bool> {
    let sock = client.get_mut();
    match fault {
        Some((Fault::Delay, d)) => tokio::time::sleep(d).await,
        Some((Fault::CutBody, _)) => {
            sock.write_all(&resp.raw).await?;
            sock.write_all(&body[..body.len() / 2]).await?;
            sock.flush().await?;
            return Ok(false);
        }
        Some((Fault::CorruptBody, _)) if !resp.chunked && !body.is_empty() => {
            let mid = body.len() / 2;
            body[mid] ^= 0x5a;
        }
        _ => {}
    }
    sock.write_all(&resp.raw).await?;
    sock.write_all(&body).await?;
    Ok(true)
}

//! The integration tests' fault proxy on its own, in latency mode: every S3 response is held
//! until LATENCY_MS after its request arrived, as a distant region would answer.
//! `benches/latency.sh` puts it between the servers under test and the local S3 server.
//!
//!   cargo build --release --example latency_proxy
//!   target/release/examples/latency_proxy UPSTREAM_PORT LATENCY_MS
//!
//! Prints `port N` (its own loopback port) once it listens, then serves until killed.

// The tests' fixture directory, so the proxy's own submodules resolve as in the tests.
#[allow(dead_code)]
#[path = "../tests/common"]
mod common {
    pub mod fault_proxy;
}
use common::fault_proxy;

use std::io::Write;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const USAGE: &str = "usage: latency_proxy UPSTREAM_PORT LATENCY_MS";
    let mut args = std::env::args().skip(1);
    let upstream: u16 = args.next().ok_or(USAGE)?.parse()?;
    let latency_ms: u64 = args.next().ok_or(USAGE)?.parse()?;
    let proxy = fault_proxy::FaultProxy::start(upstream, 1);
    proxy.set_latency(Duration::from_millis(latency_ms));
    let mut out = std::io::stdout();
    writeln!(out, "port {}", proxy.port())?;
    out.flush()?;
    // The proxy runs on its own threads; this one only keeps the process (and it) alive.
    loop {
        std::thread::park();
    }
}

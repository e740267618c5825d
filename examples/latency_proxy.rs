//! The integration tests' fault proxy on its own, in latency mode: every S3 response is held
//! until LATENCY_MS after its request arrived, as a distant region would answer.
//! `benches/latency.sh` puts it between the servers under test and the local S3 server.
//!
//!   cargo build --release --example latency_proxy
//!   target/release/examples/latency_proxy UPSTREAM_PORT LATENCY_MS [COUNTS_FILE]
//!
//! Prints `port N` (its own loopback port) once it listens, then serves until killed. With
//! COUNTS_FILE it also keeps the requests it has seen there, one `OP COUNT` line per
//! operation (GET PUT DELETE LIST HEAD DELETEOBJECTS OTHER), rewritten whole every 20 ms, so
//! a benchmark can tell how many of a workload's reads reached the object store.

// The tests' fixture directory, so the proxy's own submodules resolve as in the tests.
#[allow(dead_code)]
#[path = "../tests/common"]
mod common {
    pub mod fault_proxy;
}
use common::fault_proxy::{self, Op};

use std::io::Write;
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const USAGE: &str = "usage: latency_proxy UPSTREAM_PORT LATENCY_MS [COUNTS_FILE]";
    let mut args = std::env::args().skip(1);
    let upstream: u16 = args.next().ok_or(USAGE)?.parse()?;
    let latency_ms: u64 = args.next().ok_or(USAGE)?.parse()?;
    let counts = args.next().map(std::path::PathBuf::from);
    let proxy = fault_proxy::FaultProxy::start(upstream, 1);
    proxy.set_latency(Duration::from_millis(latency_ms));
    let mut out = std::io::stdout();
    writeln!(out, "port {}", proxy.port())?;
    out.flush()?;
    // The proxy runs on its own threads; this one keeps the process (and it) alive and the
    // counts file current.
    let Some(path) = counts else {
        loop {
            std::thread::park();
        }
    };
    let part = path.with_extension("part");
    loop {
        let text: String = OPS
            .iter()
            .map(|(name, op)| format!("{name} {}\n", proxy.requests(*op)))
            .collect();
        // Written aside and renamed, so a reader never sees half a file.
        std::fs::write(&part, text)?;
        std::fs::rename(&part, &path)?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The operations counted, by the name they have in the counts file.
const OPS: [(&str, Op); 7] = [
    ("GET", Op::Get),
    ("PUT", Op::Put),
    ("DELETE", Op::Delete),
    ("LIST", Op::List),
    ("HEAD", Op::Head),
    ("DELETEOBJECTS", Op::DeleteObjects),
    ("OTHER", Op::Other),
];

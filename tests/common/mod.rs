//! Shared test fixtures, one place for every integration test module:
//! - `s3`: a real S3 server (s3s-fs child process) on a loopback port, objects inspectable
//!   as files;
//! - `daemon`: the real `nbd-s3` binary with a generated config (`config`), ready via
//!   `NOTIFY_SOCKET`, port read from its `listening on` log line;
//! - `clients`: real NBD clients (nbdsh, nbdinfo, qemu-io, qemu-img, nbdcopy, fio,
//!   nbd-client) that fail loudly when missing;
//! - `nbdkit`: a reference NBD server; `proc`: child processes with collected output.
#![allow(dead_code, unused_imports)]

pub mod clients;
pub mod config;
pub mod daemon;
pub mod fault_proxy;
pub mod nbdkit;
pub mod proc;
pub mod s3;
pub mod tls;

pub use clients::{
    fio, nbd_client, nbdcopy, nbdinfo, nbdsh, nbdsh_script, qemu_img, qemu_io, run, run_fails,
    run_ok, show, stdout, tool, tool_available,
};
pub use config::{DaemonConfig, ExportSpec};
pub use daemon::{NbdS3, StartFailure, DAEMON_TIMEOUT};
pub use nbdkit::Nbdkit;
pub use s3::S3Server;

use std::time::{Duration, Instant};

/// Polls `cond` every 10 ms until it holds; panics with `what` after `timeout`. The way to
/// wait for a real condition instead of sleeping.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a failing test reproduces exactly.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

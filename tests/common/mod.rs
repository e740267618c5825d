//! Shared test fixtures, one place for every integration test module:
//! - `s3`: a real S3 server (s3s-fs child process) on a loopback port, objects inspectable
//!   as files;
//! - `daemon`: the real `nbd-s3` binary with a generated config (`config`), ready via
//!   `NOTIFY_SOCKET`, port read from its `listening on` log line;
//! - `clients`: real NBD clients (nbdsh, nbdinfo, qemu-io, qemu-img, nbdcopy, fio,
//!   nbd-client) that fail loudly when missing;
//! - `nbdkit`: a reference NBD server; `proc`: child processes with collected output;
//! - `store_bed`: daemon + S3 with byte-exact checks of the bucket against a reference image;
//! - `fault_bed`: the same with the S3 fault proxy (`fault_proxy`) in between;
//! - `hostile_bed`: a daemon and a bystander connection for hostile raw clients (`raw_nbd`);
//! - `access_bed`, `tls_bed`: exports with `allow` lists, and with `[server.tls]`;
//! - `bare_daemon`: a daemon started by hand, for tests that watch sd_notify themselves;
//! - `fuse`: an export as a FUSE file for real filesystems;
//! - `metrics`: `/metrics` scraped and parsed, for counting what the daemon did;
//! - `nbdsh_session`: one NBD connection held open while a test does other things;
//! - `qemu_io_session`: the same with qemu's NBD block driver (qemu-io);
//! - `s3_store`: the S3 backend on the test server or on a server with canned replies;
//! - `guest`: a qemu guest running the Linux kernel's NBD client against the daemon;
//! - `service_manager`: systemd's notify socket and fd store, for restarts that keep clients;
//! - `wait_until` / `poll_until` below: the one way to wait for a condition.
#![allow(dead_code, unused_imports)]

pub mod access_bed;
pub mod bare_daemon;
pub mod clients;
pub mod config;
pub mod daemon;
pub mod fault_bed;
pub mod fault_proxy;
pub mod fuse;
pub mod guest;
pub mod hostile_bed;
pub mod metrics;
pub mod nbdkit;
pub mod nbdsh_session;
pub mod proc;
pub mod qemu_io_session;
pub mod raw_nbd;
pub mod s3;
pub mod s3_store;
pub mod service_manager;
pub mod store_bed;
pub mod tls;
pub mod tls_bed;

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
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, cond),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Polls `cond` every 10 ms until it holds (`true`) or `timeout` passes (`false`), for a
/// caller that says more than `wait_until` on a timeout, or for which a timeout is no failure.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
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

//! `nbdkit` as a reference NBD server (on a Unix socket in a tempdir), to check the client
//! helpers and to compare nbd-s3's behaviour with a known-good implementation.

use super::clients::tool;
use super::proc::Process;
use super::wait_until;
use std::time::{Duration, Instant};

/// A running `nbdkit -f -U SOCKET PLUGIN ARGS`; killed on drop.
pub struct Nbdkit {
    dir: tempfile::TempDir,
    proc: Process,
}

impl Nbdkit {
    /// `nbdkit memory SIZE`.
    pub fn memory(size: &str) -> Nbdkit {
        Self::start(&["memory", size])
    }

    /// Starts nbdkit with `plugin_args`; ready when it has written its pidfile (nbdkit does
    /// that only once the socket accepts connections).
    pub fn start(plugin_args: &[&str]) -> Nbdkit {
        let dir = tempfile::Builder::new()
            .prefix("nbdkit.")
            .tempdir()
            .expect("tempdir");
        let sock = dir.path().join("sock");
        let pidfile = dir.path().join("pid");
        let mut cmd = tool("nbdkit");
        cmd.arg("-f")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(&sock)
            .arg("-P")
            .arg(&pidfile);
        cmd.args(plugin_args);
        let mut proc = Process::spawn(&mut cmd, "nbdkit");
        wait_until(
            "nbdkit to write its pid file",
            Duration::from_secs(20),
            || {
                let exited = proc.try_wait();
                assert!(
                    exited.is_none(),
                    "nbdkit exited ({exited:?}):\n{}",
                    proc.logs.text()
                );
                pidfile.exists()
            },
        );
        Nbdkit { dir, proc }
    }

    /// `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///?socket={}",
            self.dir.path().join("sock").display()
        )
    }

    /// nbdkit's output so far.
    pub fn logs(&self) -> String {
        self.proc.logs.text()
    }
}

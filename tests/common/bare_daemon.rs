//! A daemon started by hand, not through the `daemon` fixture, for tests that must observe
//! the very moment of an sd_notify message or control stderr themselves (the journald
//! switch, a port already in use, the watchdog).

use super::{wait_until, DaemonConfig};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A daemon started by hand (not the fixture), for tests that must observe the very moment
/// of a notify message or control stderr themselves.
pub struct BareDaemon {
    child: Child,
    notify: UnixDatagram,
    /// Every notify line received so far, in order.
    pub received: Vec<String>,
    _dir: tempfile::TempDir,
}

impl BareDaemon {
    /// Starts `nbd-s3 serve` on `cfg` with a fresh `NOTIFY_SOCKET`, the fixture's environment
    /// variables removed, `env` added and stderr going to `stderr`.
    pub fn spawn(cfg: &DaemonConfig, env: &[(&str, String)], stderr: Stdio) -> BareDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("exports.toml");
        std::fs::write(&config_path, cfg.render()).expect("write config");
        let sock_path = dir.path().join("notify");
        let notify = UnixDatagram::bind(&sock_path).expect("bind notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let bin = env!("CARGO_BIN_EXE_nbd-s3");
        let mut cmd = if env.iter().any(|(k, _)| *k == "WATCHDOG_USEC") {
            // systemd sets WATCHDOG_PID to the service's pid; a shell's pid survives `exec`.
            let mut sh = Command::new("/bin/sh");
            sh.args(["-c", "export WATCHDOG_PID=$$; exec \"$0\" \"$@\"", bin]);
            sh
        } else {
            Command::new(bin)
        };
        cmd.arg("serve").arg("--config").arg(&config_path);
        for k in [
            "RUST_LOG",
            "JOURNAL_STREAM",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "NBD_LOG_LEVEL",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("NOTIFY_SOCKET", &sock_path)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn nbd-s3");
        BareDaemon {
            child,
            notify,
            received: vec![],
            _dir: dir,
        }
    }

    /// Receives notify datagrams until one has a line equal to `needle`; returns that
    /// datagram's lines. `None` when the process exits or the timeout passes first.
    pub fn wait_notify(&mut self, needle: &str, timeout: Duration) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let lines: Vec<String> = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned)
                    .collect();
                self.received.extend(lines.iter().cloned());
                if lines.iter().any(|l| l == needle) {
                    return Some(lines);
                }
            } else if self.child.try_wait().expect("try_wait").is_some() {
                return None;
            }
        }
        None
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal nbd-s3");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until("nbd-s3 to exit", timeout, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.expect("exited")
    }
}

impl Drop for BareDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A long-lived qemu-io client: qemu's own NBD block driver on one connection held open
//! while a test restarts the daemon under it, driven one command at a time on its stdin
//! (qemu-io reads commands from a pipe as from a terminal).

use super::proc::{LogBuffer, Process};
use super::tool;
use std::io::Write;
use std::process::{ChildStdin, Stdio};
use std::time::Duration;

/// How long one qemu-io command may take (a restart's pause included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// qemu-io connected to one export.
pub struct QemuIoSession {
    proc: Process,
    stdin: ChildStdin,
}

impl QemuIoSession {
    /// Opens `uri` as a raw image; returns once qemu-io answered a first command (so the
    /// NBD connection exists).
    pub fn open(uri: &str) -> QemuIoSession {
        let mut cmd = tool("qemu-io");
        cmd.args(["-f", "raw", uri]).stdin(Stdio::piped());
        let mut proc = Process::spawn(&mut cmd, "qemu-io");
        let stdin = proc.take_stdin().expect("piped stdin");
        let mut s = QemuIoSession { proc, stdin };
        s.run("length", " MiB");
        s
    }

    /// Sends one command and waits for the output line containing `done`. Panics on a
    /// failure message, or when qemu-io exits first.
    pub fn run(&mut self, command: &str, done: &str) {
        let mark = self.logs().mark();
        writeln!(self.stdin, "{command}").expect("write to qemu-io");
        self.stdin.flush().expect("flush to qemu-io");
        if self
            .logs()
            .wait_for_after(mark, done, COMMAND_TIMEOUT)
            .is_none()
        {
            panic!(
                "qemu-io `{command}`: no {done:?} within {COMMAND_TIMEOUT:?}:\n{}",
                self.logs().text()
            );
        }
        assert_no_failure(self.logs());
    }

    /// Writes `len` bytes of `byte` at `offset`.
    pub fn write(&mut self, byte: u8, offset: u64, len: u64) {
        self.run(
            &format!("write -P {byte} {offset} {len}"),
            &format!("wrote {len}/{len} bytes at offset {offset}"),
        );
    }

    /// Reads `len` bytes at `offset`, which must all be `byte` (qemu-io checks).
    pub fn verify(&mut self, byte: u8, offset: u64, len: u64) {
        self.run(
            &format!("read -P {byte} {offset} {len}"),
            &format!("read {len}/{len} bytes at offset {offset}"),
        );
    }

    /// Flushes, quits, and requires exit status 0 (qemu-io exits 1 after any failed command;
    /// a flush prints nothing when it succeeds).
    pub fn close(self) {
        let QemuIoSession {
            mut proc,
            mut stdin,
        } = self;
        writeln!(stdin, "flush\nquit").expect("write to qemu-io");
        drop(stdin);
        let status = proc
            .wait_exit(COMMAND_TIMEOUT)
            .expect("qemu-io exits after quit");
        proc.logs.wait_closed(COMMAND_TIMEOUT);
        assert_no_failure(&proc.logs);
        assert!(status.success(), "qemu-io: {status}\n{}", proc.logs.text());
    }

    fn logs(&self) -> &LogBuffer {
        &self.proc.logs
    }
}

fn assert_no_failure(logs: &LogBuffer) {
    let text = logs.text();
    for bad in ["Pattern verification failed", "error", "Error", "failed"] {
        assert!(!text.contains(bad), "qemu-io reported `{bad}`:\n{text}");
    }
}

//! Child processes whose output is collected line by line in the background, so a test can
//! wait for a log line (with a deadline, never a sleep) and a failure can show what the
//! process said.

use super::poll_until;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines a process printed (stdout and stderr interleaved as they arrive), ANSI colours
/// stripped. Cloning shares the buffer.
#[derive(Clone, Default)]
pub struct LogBuffer {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// Streams that reached EOF; at `streams` the process has stopped writing.
    closed: usize,
    streams: usize,
}

impl LogBuffer {
    /// Starts a thread appending every line of `r` to the buffer.
    pub fn follow(&self, r: impl Read + Send + 'static) {
        self.inner.0.lock().unwrap().streams += 1;
        let me = self.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut raw = Vec::new();
            while matches!(r.read_until(b'\n', &mut raw), Ok(n) if n > 0) {
                let line = strip_ansi(&String::from_utf8_lossy(&raw));
                raw.clear();
                me.push(line.trim_end_matches(['\n', '\r']).to_string());
            }
            let (m, cv) = &*me.inner;
            m.lock().unwrap().closed += 1;
            cv.notify_all();
        });
    }

    /// Appends one line (also used for notify messages).
    pub fn push(&self, line: String) {
        let (m, cv) = &*self.inner;
        m.lock().unwrap().lines.push(line);
        cv.notify_all();
    }

    /// Everything collected so far, one line each.
    pub fn text(&self) -> String {
        self.inner.0.lock().unwrap().lines.join("\n")
    }

    /// Number of lines so far: a mark for `wait_for_after`.
    pub fn mark(&self) -> usize {
        self.inner.0.lock().unwrap().lines.len()
    }

    /// Lines containing `needle`.
    pub fn matching(&self, needle: &str) -> Vec<String> {
        let st = self.inner.0.lock().unwrap();
        st.lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// The first line containing `needle`, waiting up to `timeout`; `None` on timeout or
    /// when every stream has closed without it.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_after(0, needle, timeout)
    }

    /// Waits until every stream reached EOF (the process stopped writing) or `timeout`.
    pub fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        while st.closed < st.streams {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Like `wait_for`, only considering lines from index `mark` on.
    pub fn wait_for_after(&self, mark: usize, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        loop {
            if let Some(l) = st.lines.iter().skip(mark).find(|l| l.contains(needle)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline || (st.streams > 0 && st.closed == st.streams) {
                return None;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }
}

/// Removes ANSI escape sequences (CSI … letter) so log matching ignores colours.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A child process with collected output; SIGKILLed on drop if still running.
pub struct Process {
    child: Child,
    name: String,
    status: Option<ExitStatus>,
    /// stdout + stderr lines.
    pub logs: LogBuffer,
}

impl Process {
    /// Spawns `cmd` with stdout/stderr piped into a fresh `LogBuffer`.
    pub fn spawn(cmd: &mut Command, name: &str) -> Process {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        let logs = LogBuffer::default();
        logs.follow(child.stdout.take().expect("piped stdout"));
        logs.follow(child.stderr.take().expect("piped stderr"));
        Process {
            child,
            name: name.to_string(),
            status: None,
            logs,
        }
    }

    /// The child's stdin, if it was piped (once).
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` unless the process has already been reaped.
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
        }
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, || self.try_wait().is_some());
        self.status
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} survived SIGKILL", self.name))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

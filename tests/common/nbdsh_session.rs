//! A long-lived nbdsh client: one NBD connection held open while a test does other things,
//! and Python lines run on it one at a time.

use super::{tool, NbdS3};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

/// An nbdsh session that stays connected while the test acts (edits the config, scrapes
/// metrics), driven line by line: each command is one line of Python run with the handle `h`, answered by `ok` or
/// the exception.
pub struct NbdshSession {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const SESSION_LOOP: &str = r#"
import sys
print("ok", flush=True)
for line in sys.stdin:
    try:
        exec(line)
        print("ok", flush=True)
    except Exception as e:
        print("error: %r" % (e,), flush=True)
"#;

impl NbdshSession {
    /// Connects to `uri`; returns once the connection is made.
    pub fn open(uri: &str) -> NbdshSession {
        let mut child = tool("nbdsh")
            .args(["-u", uri, "-c", SESSION_LOOP])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nbdsh");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut s = NbdshSession {
            child,
            stdin,
            stdout,
        };
        if let Err(e) = s.answer("connect") {
            panic!("{e}");
        }
        s
    }

    fn answer(&mut self, what: &str) -> Result<(), String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read nbdsh");
        match line.trim() {
            "ok" => Ok(()),
            other => Err(format!("nbdsh session: {what} failed: {other:?}")),
        }
    }

    /// Runs one line of Python in the session; panics (with the daemon's log) if it raised.
    pub fn run(&mut self, python: &str, d: &NbdS3) {
        writeln!(self.stdin, "{python}").expect("write to nbdsh");
        self.stdin.flush().expect("flush to nbdsh");
        if let Err(e) = self.answer(python) {
            panic!("{e}\ndaemon log:\n{}", d.logs());
        }
    }

    /// Ends the session (EOF on its input); nbdsh must exit 0.
    pub fn close(mut self) {
        drop(self.stdin);
        let status = self.child.wait().expect("wait nbdsh");
        assert!(status.success(), "nbdsh exited with {status}");
    }
}

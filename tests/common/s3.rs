//! A real S3 server on loopback: the `s3s-fs` binary as a child process, serving a temporary
//! directory. Tests get a genuine HTTP/SigV4 endpoint (the same one CI and the benchmarks
//! use) and can still look at the stored objects as plain files under `root()`.

use super::poll_until;
use super::proc::Process;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long s3s-fs may take to bind its port.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running s3s-fs; killed on drop. Buckets are directories under `root()`.
pub struct S3Server {
    dir: tempfile::TempDir,
    proc: Option<Process>,
    port: u16,
    /// Access key id the server accepts.
    pub access_key: String,
    /// Secret key the server accepts (also written to `secret_file()`).
    pub secret_key: String,
    /// Region to sign for; s3s-fs accepts any.
    pub region: String,
}

/// Finds the s3s-fs binary: `$S3S_FS`, `~/.cargo/bin/s3s-fs`, then `PATH`.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cargo/bin/s3s-fs");
        if p.is_file() {
            return p;
        }
    }
    if let Some(p) = super::clients::which("s3s-fs") {
        return p;
    }
    panic!(
        "s3s-fs not found (looked at $S3S_FS, ~/.cargo/bin/s3s-fs and PATH). Install it with \
         `cargo install s3s-fs@0.14.1 --features binary --locked` or run scripts/deps.sh"
    );
}

impl S3Server {
    /// Starts s3s-fs on a kernel-chosen loopback port and waits until it answers HTTP.
    pub fn start() -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("nbd-s3-s3.")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("root")).expect("mkdir root");
        let secret_key = format!("secret-{}", std::process::id());
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{secret_key}\n")).expect("write secret");
        set_mode(&secret, 0o600);
        let mut s3 = S3Server {
            dir,
            proc: None,
            port: 0,
            access_key: "nbd-s3-test".into(),
            secret_key,
            region: "us-east-1".into(),
        };
        s3.spawn(0);
        s3
    }

    /// Spawns s3s-fs on `port` (0 = any) and waits for it to answer.
    fn spawn(&mut self, port: u16) {
        let mut cmd = Command::new(s3s_fs_binary());
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--access-key",
                &self.access_key,
                "--secret-key",
                &self.secret_key,
            ])
            .arg(self.root())
            .env("RUST_LOG", "s3s_fs=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        let deadline = Instant::now() + START_TIMEOUT;
        let (proc, line) = loop {
            let mut proc = Process::spawn(&mut cmd, "s3s-fs");
            if let Some(line) = proc
                .logs
                .wait_for("server is running at http://", START_TIMEOUT)
            {
                break (proc, line);
            }
            // A fixed port may still be held by the previous instance: retry until the deadline.
            let exited = proc.wait_exit(Duration::from_secs(1)).is_some();
            assert!(
                exited && port != 0 && Instant::now() < deadline,
                "s3s-fs did not start:\n{}",
                proc.logs.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let addr = line.rsplit("http://").next().unwrap_or_default().trim();
        self.port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse s3s-fs address from {line:?}"));
        self.proc = Some(proc);
        self.wait_answering();
    }

    /// Polls until an HTTP request gets any response (the listener is live).
    fn wait_answering(&self) {
        assert!(
            poll_until(START_TIMEOUT, || http_answers(self.port)),
            "s3s-fs on port {} does not answer HTTP:\n{}",
            self.port,
            self.logs()
        );
    }

    /// `http://127.0.0.1:PORT`, the `[s3] endpoint` to configure.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on (stable across `stop`/`resume`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A file (mode 0600) holding the secret key plus a trailing newline, for
    /// `secret_access_key_file`.
    pub fn secret_file(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    /// The directory s3s-fs serves: `<root>/<bucket>/<key>`.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Creates a bucket (a directory under the root); idempotent.
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root().join(name)).expect("create bucket dir");
    }

    /// Where object `key` of `bucket` lives on disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root().join(bucket).join(key)
    }

    /// The object's bytes, or `None` when it does not exist.
    pub fn read_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.object_path(bucket, key)).ok()
    }

    /// Stores an object behind the server's back (s3s-fs serves plain files).
    pub fn write_object(&self, bucket: &str, key: &str, data: &[u8]) {
        let path = self.object_path(bucket, key);
        std::fs::create_dir_all(path.parent().expect("object has a parent")).expect("mkdir");
        std::fs::write(path, data).expect("write object");
    }

    /// Removes an object behind the server's back; true when it existed.
    pub fn delete_object(&self, bucket: &str, key: &str) -> bool {
        std::fs::remove_file(self.object_path(bucket, key)).is_ok()
    }

    /// Every key in `bucket` starting with `prefix`, sorted (s3s-fs temp files excluded).
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let base = self.root().join(bucket);
        let mut keys = Vec::new();
        collect_files(&base, &base, &mut keys);
        keys.retain(|k| k.starts_with(prefix));
        keys.sort();
        keys
    }

    /// Everything s3s-fs has logged so far.
    pub fn logs(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.logs.text())
            .unwrap_or_default()
    }

    /// Kills the server (S3 outage); `resume` brings it back on the same port and data.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// Restarts a stopped server on the same port, retrying while the port is still held.
    pub fn resume(&mut self) {
        assert!(self.proc.is_none(), "resume() without stop()");
        let port = self.port;
        self.spawn(port);
    }

    /// Freezes the server with SIGSTOP: connections hang instead of failing.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Undoes `freeze` with SIGCONT.
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        self.proc.as_ref().expect("s3s-fs is running").signal(sig);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(p) = self.proc.as_ref() {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
        self.stop();
    }
}

/// One raw HTTP request; true when anything HTTP-like comes back.
fn http_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).is_ok() && &buf == b"HTTP/"
}

fn collect_files(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            collect_files(base, &path, out);
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp.") && name.ends_with(".internal.part") {
            continue;
        }
        let rel = path.strip_prefix(base).expect("under base");
        out.push(rel.to_string_lossy().into_owned());
    }
}

/// chmod, for secret files the daemon insists are private.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

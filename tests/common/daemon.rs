//! The real `nbd-s3` binary as a child process: a generated config in a tempdir, readiness
//! through `NOTIFY_SOCKET` (READY=1), the port learnt from the `listening on ADDR` log line,
//! and stderr collected so tests can wait for log lines.

use super::config::{DaemonConfig, ExportSpec};
use super::proc::{LogBuffer, Process};
use super::s3::S3Server;
use super::service_manager::ServiceManager;
use nix::sys::signal::Signal;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a (debug-build, shared-CPU) daemon may take to become ready or to exit.
pub const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment the daemon must not inherit from the test runner (it would change its mode).
const SCRUBBED_ENV: &[&str] = &[
    "RUST_LOG",
    "JOURNAL_STREAM",
    "NBD_S3_CONFIG",
    "NBD_EXPORT_NAME",
    "NBD_HOST",
    "NBD_PORT",
    "NBD_SIZE",
    "NBD_S3_ENDPOINT",
    "NBD_S3_ACCESS_KEY",
    "NBD_S3_SECRET_KEY",
    "NBD_S3_BUCKET",
    "NBD_S3_REGION",
    "NBD_LOG_LEVEL",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "FDSTORE",
    "WATCHDOG_USEC",
];

/// Builds and starts an `NbdS3`.
pub struct NbdS3Builder {
    config: DaemonConfig,
    s3_root: PathBuf,
    env: Vec<(String, String)>,
    args: Option<Vec<String>>,
    manager: bool,
}

impl NbdS3Builder {
    /// Runs the daemon under the fake service manager (`service_manager`): one notify socket
    /// for every process, and a restart (`systemctl_restart`) passes its fd store on. With
    /// `fd_store: Some(n)` the daemon is told the store takes `n` entries (`FDSTORE`).
    pub fn service_manager(mut self, fd_store: Option<usize>) -> Self {
        self.manager = true;
        if let Some(n) = fd_store {
            self.env.push(("FDSTORE".into(), n.to_string()));
        }
        self
    }
    /// Adds an export.
    pub fn export(mut self, e: ExportSpec) -> Self {
        self.config.exports.push(e);
        self
    }
    /// Replaces the listen addresses (default `127.0.0.1:0`).
    pub fn listen(mut self, addrs: &[&str]) -> Self {
        self.config.listen = addrs.iter().map(|s| s.to_string()).collect();
        self
    }
    /// Sets `[cache] memory` and `dirty`.
    pub fn cache(mut self, memory: &str, dirty: &str) -> Self {
        self.config.cache_memory = Some(memory.into());
        self.config.cache_dirty = Some(dirty.into());
        self
    }
    /// Sets `[cache] flush_timeout`.
    pub fn flush_timeout(mut self, t: &str) -> Self {
        self.config.flush_timeout = Some(t.into());
        self
    }
    /// Edits the config freely before it is written.
    pub fn config(mut self, f: impl FnOnce(&mut DaemonConfig)) -> Self {
        f(&mut self.config);
        self
    }
    /// Sets an environment variable for the daemon (e.g. `RUST_LOG`).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Replaces the default `serve --config PATH` arguments (e.g. ad-hoc mode flags).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }
    /// Starts the daemon and waits for READY=1; panics with its output if it fails.
    pub fn start(self) -> NbdS3 {
        self.try_start().unwrap_or_else(|f| {
            panic!(
                "nbd-s3 did not become ready (exit: {:?}):\n{}",
                f.status, f.logs
            )
        })
    }
    /// Like `start`, but hands back the exit status and output when the daemon fails.
    pub fn try_start(self) -> Result<NbdS3, StartFailure> {
        let dir = tempfile::Builder::new()
            .prefix("nbd-s3-daemon.")
            .tempdir()
            .expect("tempdir");
        let mut config = self.config;
        if config.control.is_none() {
            // Never the system-wide default: tests run many daemons at once.
            let socket = dir.path().join("control.sock");
            config.control = Some(socket.to_string_lossy().into_owned());
        }
        let manager = self.manager.then(|| ServiceManager::start(dir.path()));
        let mut nbd = NbdS3 {
            config_path: dir.path().join("exports.toml"),
            manager,
            dir,
            config,
            s3_root: self.s3_root,
            env: self.env,
            args: self.args,
            proc: None,
            notify: LogBuffer::default(),
            notify_stop: Arc::new(AtomicBool::new(false)),
            generation: 0,
            addrs: vec![],
        };
        nbd.write_config();
        nbd.launch()?;
        Ok(nbd)
    }
}

/// Why a daemon did not start.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status if it exited (`None`: still running but never ready; it was killed).
    pub status: Option<ExitStatus>,
    /// Everything it printed.
    pub logs: String,
}

/// A running `nbd-s3 serve`; SIGKILLed on drop.
pub struct NbdS3 {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: DaemonConfig,
    s3_root: PathBuf,
    env: Vec<(String, String)>,
    args: Option<Vec<String>>,
    proc: Option<Process>,
    notify: LogBuffer,
    notify_stop: Arc<AtomicBool>,
    generation: u32,
    addrs: Vec<String>,
    manager: Option<ServiceManager>,
}

impl NbdS3 {
    /// A builder using `s3` (static credentials, path style) with no exports yet.
    pub fn builder(s3: &S3Server) -> NbdS3Builder {
        NbdS3Builder {
            config: DaemonConfig::for_s3(s3),
            s3_root: s3.root(),
            env: vec![],
            args: None,
            manager: false,
        }
    }

    /// One export of 64MiB named `name` on `s3`, started.
    pub fn with_export(s3: &S3Server, name: &str) -> NbdS3 {
        Self::builder(s3).export(ExportSpec::new(name)).start()
    }

    fn launch(&mut self) -> Result<(), StartFailure> {
        self.generation += 1;
        self.notify_stop.store(true, Ordering::SeqCst);
        self.notify = LogBuffer::default();
        self.notify_stop = Arc::new(AtomicBool::new(false));
        let bin = Path::new(env!("CARGO_BIN_EXE_nbd-s3"));
        let (sock_path, mut cmd, listen_env) = match &self.manager {
            Some(m) => {
                m.follow_into(self.notify.clone());
                let (cmd, env) = m.command(bin);
                (m.socket().to_path_buf(), cmd, env)
            }
            None => {
                let path = self.dir.path().join(format!("notify-{}", self.generation));
                let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
                follow_notify(sock, self.notify.clone(), self.notify_stop.clone());
                (path, Command::new(bin), vec![])
            }
        };
        match &self.args {
            Some(a) => cmd.args(a),
            None => cmd.arg("serve").arg("--config").arg(&self.config_path),
        };
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        cmd.env("NOTIFY_SOCKET", &sock_path)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        for (k, v) in self.env.iter().chain(&listen_env) {
            cmd.env(k, v);
        }
        self.proc = Some(Process::spawn(&mut cmd, "nbd-s3"));
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        let proc = self.proc.as_mut().expect("launched");
        while self
            .notify
            .wait_for("READY=1", Duration::from_millis(100))
            .is_none()
        {
            let status = proc.try_wait();
            if status.is_some() || Instant::now() >= deadline {
                proc.logs.wait_closed(Duration::from_secs(2));
                let logs = format!(
                    "{}\n--- sd_notify ---\n{}",
                    proc.logs.text(),
                    self.notify.text()
                );
                if status.is_none() {
                    proc.kill9();
                }
                return Err(StartFailure { status, logs });
            }
        }
        // Listener lines precede READY=1 on stderr; the reader thread may lag behind a little.
        let want = if self.args.is_some() {
            1
        } else {
            self.config.listen.len()
        };
        let lines = loop {
            let lines = proc.logs.matching("listening on ");
            if lines.len() >= want || Instant::now() >= deadline {
                break lines;
            }
            proc.logs.wait_for_after(
                proc.logs.mark(),
                "listening on ",
                Duration::from_millis(100),
            );
        };
        self.addrs = lines.iter().filter_map(|l| parse_listen(l)).collect();
        Ok(())
    }

    fn proc(&self) -> &Process {
        self.proc.as_ref().expect("nbd-s3 process")
    }

    fn proc_mut(&mut self) -> &mut Process {
        self.proc.as_mut().expect("nbd-s3 process")
    }

    /// Every address the daemon said it listens on (`127.0.0.1:PORT`, `unix:/path`).
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The first TCP port the daemon listens on.
    pub fn port(&self) -> u16 {
        self.addrs
            .iter()
            .filter(|a| !a.starts_with("unix:"))
            .find_map(|a| a.rsplit(':').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no TCP `listening on` line:\n{}", self.logs()))
    }

    /// `nbd://127.0.0.1:PORT/NAME` for the first TCP listener.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port(), export)
    }

    /// The URI of `export` through listener `addr` (TCP or `unix:/path`).
    pub fn uri_via(addr: &str, export: &str) -> String {
        match addr.strip_prefix("unix:") {
            Some(path) => format!("nbd+unix:///{export}?socket={path}"),
            None => format!("nbd://{addr}/{export}"),
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.proc().pid()
    }

    /// The config file the daemon reads.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Runs an admin command (`nbd-s3 ARGS --control SOCKET`) against this daemon; returns
    /// its output whatever the exit status.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        let socket = self
            .config
            .control
            .as_deref()
            .expect("control socket configured");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nbd-s3"));
        cmd.args(args).arg("--control").arg(socket);
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        cmd.stdin(Stdio::null())
            .output()
            .expect("run an nbd-s3 admin command")
    }

    /// `admin`, asserting exit 0; returns stdout.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "nbd-s3 {args:?} failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The config as last written.
    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// A scratch directory that lives as long as this fixture (for sockets, images, …).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Edits the config and writes it atomically (temp file + rename), creating any new
    /// buckets. Follow with `sighup()` or wait for the file watcher.
    pub fn rewrite_config(&mut self, f: impl FnOnce(&mut DaemonConfig)) {
        f(&mut self.config);
        self.write_config();
    }

    /// Replaces the config file with `text` verbatim (atomic rename).
    pub fn write_config_raw(&self, text: &str) {
        let tmp = self.dir.path().join(".exports.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config");
    }

    fn write_config(&self) {
        for e in &self.config.exports {
            std::fs::create_dir_all(self.s3_root.join(&e.bucket)).expect("create bucket");
        }
        self.write_config_raw(&self.config.render());
    }

    /// Everything the daemon printed so far (current process).
    pub fn logs(&self) -> String {
        self.proc().logs.text()
    }

    /// Index to pass to `wait_for_log_after` so only later lines count.
    pub fn log_mark(&self) -> usize {
        self.proc().logs.mark()
    }

    /// Waits for a log line containing `needle`; panics with the log on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_after(0, needle, timeout)
    }

    /// Waits for a line containing `needle` logged after `mark`.
    pub fn wait_for_log_after(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        self.proc()
            .logs
            .wait_for_after(mark, needle, timeout)
            .unwrap_or_else(|| {
                panic!(
                    "nbd-s3 did not log {needle:?} within {timeout:?}:\n{}",
                    self.logs()
                )
            })
    }

    /// The current process's log, shared: still readable after a takeover or restart
    /// replaced the process, and from another thread.
    pub fn log_buffer(&self) -> LogBuffer {
        self.proc().logs.clone()
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.proc().logs.matching(needle)
    }

    /// sd_notify messages received so far (one `KEY=VALUE` per line).
    pub fn notify_messages(&self) -> String {
        self.notify.text()
    }

    /// Waits for an sd_notify message containing `needle` (e.g. `STOPPING=1`).
    pub fn wait_for_notify(&self, needle: &str, timeout: Duration) -> String {
        self.notify.wait_for(needle, timeout).unwrap_or_else(|| {
            panic!(
                "no sd_notify {needle:?} within {timeout:?}; got:\n{}",
                self.notify.text()
            )
        })
    }

    /// Sends SIGHUP (reload).
    pub fn sighup(&self) {
        self.proc().signal(Signal::SIGHUP);
    }

    /// Sends SIGTERM (orderly shutdown: flush, exit 0).
    pub fn sigterm(&self) {
        self.proc().signal(Signal::SIGTERM);
    }

    /// Sends any signal.
    pub fn signal(&self, sig: Signal) {
        self.proc().signal(sig);
    }

    /// Waits for the daemon to exit; panics with its log if it does not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.proc_mut().wait_exit(timeout) {
            Some(s) => s,
            None => panic!("nbd-s3 still running after {timeout:?}:\n{}", self.logs()),
        }
    }

    /// The exit status if the daemon has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.proc_mut().try_wait()
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        self.proc_mut().kill9()
    }

    /// Sets (`Some`) or removes (`None`) an environment variable for the next start.
    pub fn set_env(&mut self, k: &str, v: Option<&str>) {
        self.env.retain(|(key, _)| key != k);
        if let Some(v) = v {
            self.env.push((k.into(), v.into()));
        }
    }

    /// A new process started with `serve --takeover` while this one still runs: it takes the
    /// listeners and client connections over, and the old one exits. Returns the old process
    /// once it exited (panics with both logs if it does not within `DAEMON_TIMEOUT`).
    pub fn take_over(&mut self) -> Process {
        match self.try_take_over() {
            Ok(old) => old,
            Err(f) => panic!(
                "takeover did not start (exit: {:?}):\n{}\n--- old process ---\n{}",
                f.status,
                f.logs,
                self.logs()
            ),
        }
    }

    /// `take_over`, but a new process that fails is returned as the error, and the old one
    /// (still running then) stays this fixture's process.
    pub fn try_take_over(&mut self) -> Result<Process, StartFailure> {
        let mut old = self.proc.take().expect("a running daemon");
        let usual = self.args.clone();
        let mut args = usual.clone().unwrap_or_else(|| {
            vec![
                "serve".into(),
                "--config".into(),
                self.config_path.to_string_lossy().into_owned(),
            ]
        });
        args.push("--takeover".into());
        self.args = Some(args);
        let launched = self.launch();
        self.args = usual;
        if let Err(f) = launched {
            self.proc = Some(old);
            return Err(f);
        }
        if old.wait_exit(DAEMON_TIMEOUT).is_none() {
            panic!(
                "the old process did not exit after a takeover:\n{}\n--- new process ---\n{}",
                old.logs.text(),
                self.logs()
            );
        }
        old.logs.wait_closed(Duration::from_secs(2));
        Ok(old)
    }

    /// The fake service manager (`NbdS3Builder::service_manager`).
    pub fn manager(&self) -> &ServiceManager {
        self.manager
            .as_ref()
            .expect("started under the service manager")
    }

    /// `systemctl restart` under the fake service manager: SIGTERM, wait for the exit, start
    /// the next process with the store's descriptors. Returns the old process (exited) and
    /// when the SIGTERM was sent.
    pub fn systemctl_restart(&mut self) -> (Process, Instant) {
        assert!(self.manager.is_some(), "started under the service manager");
        let mut old = self.proc.take().expect("a running daemon");
        let sent = Instant::now();
        old.signal(Signal::SIGTERM);
        if old.wait_exit(DAEMON_TIMEOUT).is_none() {
            panic!("still running after SIGTERM:\n{}", old.logs.text());
        }
        old.logs.wait_closed(Duration::from_secs(2));
        if let Err(f) = self.launch() {
            panic!(
                "the next process did not start (exit: {:?}):\n{}\n--- old process ---\n{}",
                f.status,
                f.logs,
                old.logs.text()
            );
        }
        (old, sent)
    }

    /// A new process with the same config and S3 (SIGTERM + wait first if still running).
    /// With `listen = 127.0.0.1:0` the port changes: use `uri()` again afterwards.
    pub fn restart(&mut self) {
        if let Err(f) = self.try_restart() {
            panic!("nbd-s3 did not restart (exit: {:?}):\n{}", f.status, f.logs);
        }
    }

    /// Like `restart`, but hands back the exit status and output when the new process does
    /// not become ready.
    pub fn try_restart(&mut self) -> Result<(), StartFailure> {
        if self.try_wait().is_none() {
            self.sigterm();
            self.wait_exit(DAEMON_TIMEOUT);
        }
        self.launch()
    }
}

impl Drop for NbdS3 {
    fn drop(&mut self) {
        self.notify_stop.store(true, Ordering::SeqCst);
        // A failing test shows what the daemon said: a client's error alone (ERR_UNKNOWN,
        // EIO) rarely tells why.
        if std::thread::panicking() {
            if let Some(p) = &self.proc {
                eprintln!("--- nbd-s3 log (pid {}) ---\n{}", p.pid(), p.logs.text());
            }
        }
    }
}

/// Reads sd_notify datagrams into `buf`, one `KEY=VALUE` per line, until `stop`.
fn follow_notify(sock: UnixDatagram, buf: LogBuffer, stop: Arc<AtomicBool>) {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut msg = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) {
            if let Ok(n) = sock.recv(&mut msg) {
                for l in String::from_utf8_lossy(&msg[..n]).lines() {
                    buf.push(l.to_string());
                }
            }
        }
    });
}

/// `... listening on 127.0.0.1:4242 ...` → `127.0.0.1:4242`.
fn parse_listen(line: &str) -> Option<String> {
    let rest = line.split("listening on ").nth(1)?;
    let addr = rest.split_whitespace().next()?;
    let addr = addr.trim_matches(|c: char| c == '"' || c == '\'' || c == ',' || c == '`');
    (!addr.is_empty()).then(|| addr.to_string())
}

//! The running daemon's live state and its life cycle: start, reload, status, shutdown.
//! `service` decides *when* these happen (signals, file watcher, systemd); this module owns
//! *what* happens, so tests and other front ends can drive a daemon without signals.

use crate::backend::{BackendError, StoreFactory};
use crate::config::{Config, ConfigError, ListenAddr};
use crate::export::{Export, OpenContext, Registry};
use crate::lease::LeaseManager;
use crate::server::handover::ParkedConnection;
use crate::server::{Listener, ListenerHandle, Server};
use crate::store::CacheBudget;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

mod admin;
mod auto;
mod handover;
mod reloads;
mod reopen;

pub use admin::ExportSnapshot;
use handover::listener_fds;
pub use handover::{monotonic_ns, HandoverSnapshot, Handovers};
pub use reloads::{ReloadSnapshot, Reloads};

/// Why the daemon could not start; the process logs it and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The `[s3]` section cannot be turned into a client (bad endpoint, credentials file).
    #[error("cannot set up the object store: {0}")]
    Backend(#[from] BackendError),
    /// A listen address is invalid or taken: fix `[server] listen` or stop the other process.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a reload changed nothing; the running exports and listeners stay as they were.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Ad-hoc mode (`--export-name`) has no file to re-read.
    #[error("no configuration file to reload (ad-hoc mode)")]
    NoConfigFile,
    /// The file is unreadable or invalid; each line is `PATH:LINE: message`.
    #[error("{0}")]
    Config(#[from] ConfigError),
}

/// One export whose dirty data could not be stored at shutdown.
#[derive(Debug, Clone)]
pub struct FlushFailure {
    /// Export name.
    pub export: String,
    /// Dirty bytes still only in memory.
    pub dirty_bytes: u64,
    /// The last error from the object store (names the failing block where the store does).
    pub error: String,
}

/// What shutdown achieved; empty `failed` means every acknowledged write is in S3.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Exports that still hold dirty data.
    pub failed: Vec<FlushFailure>,
    /// What a stop that keeps descriptors (`Daemon::stop_keeping`) parked for the next
    /// process; empty after a plain `shutdown`.
    pub kept: Handover,
}

/// What a takeover passes to the next process: the listening sockets, by address as
/// configured (`show_addr`), and the parked client connections. Every export was flushed
/// and its lease released before, so the next process opens them fresh.
#[derive(Debug, Default)]
pub struct Handover {
    pub listeners: Vec<(String, OwnedFd)>,
    pub connections: Vec<ParkedConnection>,
    /// When the sending process stopped reading from clients (`monotonic_ns`, one clock for
    /// every process on the host), so the receiver can tell how long clients waited.
    pub parked_at_ns: Option<u64>,
    /// Handovers that happened before this one (the receiver counts on from there).
    pub handovers: u64,
}

/// The daemon's parts an observer reads (the metrics endpoint), shared, never copied. Handed to
/// the hook of `Daemon::start_observed` before the exports open, so the observer sees a slow
/// start too; the daemon itself knows nothing about who observes it.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Exports as new connections see them (plus removed ones still draining).
    pub registry: Arc<Registry>,
    /// Open connections.
    pub server: Server,
    /// Object-store counters, per bucket.
    pub factory: StoreFactory,
    /// The cache shared by all exports.
    pub budget: Arc<CacheBudget>,
    /// Reload outcomes.
    pub reloads: Arc<Reloads>,
    /// Handovers received (takeovers and restarts through the service manager's store).
    pub handovers: Arc<Handovers>,
}

/// The live daemon. Shared (`Arc`) by the signal loop, the watchdog and status reporting.
pub struct Daemon {
    config: ArcSwap<Config>,
    config_path: Option<PathBuf>,
    registry: Arc<Registry>,
    factory: StoreFactory,
    /// Budget, flush timeout and leases every export open uses.
    ctx: OpenContext,
    server: Server,
    /// Reopens refused exports in the background; stopped at shutdown.
    reopener: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Takes automatic snapshots; stopped at shutdown.
    auto_snapshots: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    listeners: tokio::sync::Mutex<HashMap<ListenAddr, ListenerHandle>>,
    /// Serialises reloads: SIGHUP and the file watcher may fire together.
    reload_lock: tokio::sync::Mutex<()>,
    /// Outcomes of `reload`.
    reloads: Arc<Reloads>,
    /// Set once a takeover passed everything on: `Some(true)` delivered, `Some(false)` lost.
    handed_over: tokio::sync::watch::Sender<Option<bool>>,
    /// Handovers this process received, and the pause its clients saw.
    handovers: Arc<Handovers>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Binds every listener, opens every export, then starts accepting; returns only when
    /// clients can connect, which is the moment the caller may report readiness. Binding comes
    /// first so a taken port fails at once, before any S3 traffic.
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
    ) -> Result<Arc<Daemon>, StartError> {
        Self::start_observed(config, config_path, |_, _| std::future::ready(())).await
    }

    /// `start`, handing the parts an observer reads to `observe` once the listeners are bound
    /// and before the exports open (e.g. to serve metrics while a slow S3 delays the start).
    pub async fn start_observed<F, Fut>(
        config: Config,
        config_path: Option<PathBuf>,
        observe: F,
    ) -> Result<Arc<Daemon>, StartError>
    where
        F: FnOnce(&Config, Observed) -> Fut,
        Fut: std::future::Future,
    {
        Self::start_inheriting(config, config_path, observe, Handover::default()).await
    }

    /// `start_observed` with what a previous process handed over: its listening sockets are
    /// used instead of binding again (clients waiting in their backlog stay), and its client
    /// connections are served once the exports are open.
    pub async fn start_inheriting<F, Fut>(
        config: Config,
        config_path: Option<PathBuf>,
        observe: F,
        inherited: Handover,
    ) -> Result<Arc<Daemon>, StartError>
    where
        F: FnOnce(&Config, Observed) -> Fut,
        Fut: std::future::Future,
    {
        let Handover {
            listeners: mut sockets,
            connections,
            parked_at_ns,
            handovers: before,
        } = inherited;
        let mut bound = Vec::with_capacity(config.server.listen.len());
        for addr in &config.server.listen {
            let shown = show_addr(addr);
            let listener = match sockets.iter().position(|(a, _)| *a == shown) {
                Some(i) => Listener::from_fd(addr, sockets.swap_remove(i).1),
                None => Listener::bind(addr).await,
            };
            let listener = listener.map_err(|source| StartError::Bind {
                addr: shown,
                source,
            })?;
            bound.push((addr.clone(), listener));
        }
        for (addr, _) in &sockets {
            warn!("handed-over listener {addr} is not configured here: closed");
        }
        let factory = StoreFactory::new(&config.s3).await?;
        let budget = CacheBudget::new(config.cache.memory, config.cache.dirty);
        let registry = Registry::new();
        let server = Server::new(Arc::clone(&registry));
        // Validation already parsed the files; a failure now (changed since) fails closed.
        let _ = server.set_tls(config.server.tls.as_ref());
        let reloads = Arc::new(Reloads::default());
        let handovers = Arc::new(Handovers::default());
        let observed = Observed {
            registry: Arc::clone(&registry),
            server: server.clone(),
            factory: factory.clone(),
            budget: Arc::clone(&budget),
            reloads: Arc::clone(&reloads),
            handovers: Arc::clone(&handovers),
        };
        observe(&config, observed).await;
        let daemon = Arc::new(Daemon {
            config: ArcSwap::from_pointee(config.clone()),
            config_path,
            registry,
            factory,
            ctx: OpenContext {
                budget,
                flush_timeout: config.cache.flush_timeout,
                leases: LeaseManager::new(),
                manifest_turn: Default::default(),
                journal: config
                    .cache
                    .journal
                    .as_ref()
                    .map(|j| crate::store::JournalSpec {
                        dir: j.dir.clone(),
                        space: crate::journal::Space::new(j.size),
                        replay: true,
                    }),
            },
            server,
            reopener: parking_lot::Mutex::new(None),
            auto_snapshots: parking_lot::Mutex::new(None),
            listeners: tokio::sync::Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            reloads,
            handed_over: tokio::sync::watch::channel(None).0,
            handovers,
        });
        daemon.open_all(&config).await;
        let reopener = tokio::spawn(reopen::run(Arc::downgrade(&daemon)));
        *daemon.reopener.lock() = Some(reopener);
        let auto = tokio::spawn(auto::run(Arc::downgrade(&daemon)));
        *daemon.auto_snapshots.lock() = Some(auto);
        let mut listeners = daemon.listeners.lock().await;
        for (addr, listener) in bound {
            // `Server::spawn_listener` logs `listening on <addr>` with the real port.
            listeners.insert(addr, daemon.server.spawn_listener(listener));
        }
        drop(listeners);
        let adopted = connections.len();
        if !connections.is_empty() {
            info!("taking over {} client connection(s)", connections.len());
            daemon.server.adopt(connections);
        }
        if let Some(at) = parked_at_ns {
            daemon.handovers.received(before, at, adopted);
        }
        Ok(daemon)
    }

    async fn open_all(&self, config: &Config) {
        let exports = crate::export::open_all(&config.exports, &self.factory, &self.ctx).await;
        self.registry.replace(exports);
    }

    async fn bind(&self, addr: &ListenAddr) -> std::io::Result<ListenerHandle> {
        // `Server::spawn_listener` logs `listening on <addr>` with the real port.
        let listener = Listener::bind(addr).await?;
        Ok(self.server.spawn_listener(listener))
    }

    /// The configuration currently applied.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The export registry connections resolve names in.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Object-store requests made for export `name` since the daemon started (every
    /// operation, outcome and retry).
    pub fn s3_requests(&self, name: &str) -> u64 {
        use crate::backend::stats::{Op, Outcome};
        let stats = self.factory.export_stats();
        let Some((_, s)) = stats.iter().find(|(e, _)| e == name) else {
            return 0;
        };
        Op::ALL
            .iter()
            .flat_map(|op| Outcome::ALL.iter().map(move |o| s.requests(*op, *o)))
            .sum()
    }

    /// How reloads ended so far.
    pub fn reloads(&self) -> &Reloads {
        &self.reloads
    }

    /// Re-reads the file and applies it: exports per `reload::plan`, listeners bound/closed.
    /// An invalid file changes nothing and is returned (and logged) with its file:line. Every
    /// finished reload is counted in `reloads`.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let result = self.reload_once().await;
        self.reloads.record(result.is_ok());
        result
    }

    async fn reload_once(&self) -> Result<(), ReloadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let Some(path) = &self.config_path else {
            warn!("reload requested, but there is no configuration file (ad-hoc mode)");
            return Err(ReloadError::NoConfigFile);
        };
        let new = match Config::load(path) {
            Ok(new) => new,
            Err(e) => {
                for line in e.lines() {
                    error!("reload refused, configuration unchanged: {line}");
                }
                return Err(e.into());
            }
        };
        let old = self.config.load_full();
        let plan = crate::reload::plan(&old, &new, &self.registry);
        let (added, removed) = (plan.listen_added.clone(), plan.listen_removed.clone());
        let mut applied =
            crate::reload::apply_exports(plan, &self.registry, &self.factory, &self.ctx).await;
        let bound = self.apply_listeners(&added, &removed).await;
        // A listener that failed to bind stays out of the effective config, so the next reload
        // tries it again.
        applied
            .effective
            .server
            .listen
            .retain(|a| bound.contains(a));
        // Re-reads the certificate files even when the config is unchanged (renewals).
        let _ = self.server.set_tls(applied.effective.server.tls.as_ref());
        self.config.store(Arc::new(applied.effective));
        info!("reload complete: {}", self.status());
        Ok(())
    }

    /// Closes `removed`, binds `added` (a failure is logged, not fatal: the other listeners
    /// keep serving); returns every address now listening.
    async fn apply_listeners(
        &self,
        added: &[ListenAddr],
        removed: &[ListenAddr],
    ) -> Vec<ListenAddr> {
        let mut listeners = self.listeners.lock().await;
        for addr in removed {
            if let Some(handle) = listeners.remove(addr) {
                info!("closed listener {}", handle.addr());
                handle.close();
            }
        }
        for addr in added {
            if listeners.contains_key(addr) {
                continue;
            }
            match self.bind(addr).await {
                Ok(handle) => {
                    listeners.insert(addr.clone(), handle);
                }
                Err(e) => error!("cannot listen on {}: {e}", show_addr(addr)),
            }
        }
        listeners.keys().cloned().collect()
    }

    /// One line for `systemctl status` and the log: exports, clients, dirty data.
    pub fn status(&self) -> String {
        let exports = self.registry.list();
        let refused = exports.iter().filter(|e| !e.is_serving()).count();
        let served = exports.len() - refused;
        let clients = self.server.connection_count();
        let mut line = format!(
            "serving {served} export{}, {clients} client{}, {} dirty",
            plural(served),
            plural(clients),
            format_mib(self.dirty_bytes())
        );
        if refused > 0 {
            line.push_str(&format!(", {refused} refused"));
        }
        let unleased = exports
            .iter()
            .filter(|e| e.lease().is_some_and(|l| l.write_deadline().is_err()))
            .count();
        if unleased > 0 {
            line.push_str(&format!(", {unleased} without lease (S3 writes paused)"));
        }
        line
    }

    /// Dirty bytes over every export still alive, including removed ones still draining.
    pub fn dirty_bytes(&self) -> u64 {
        self.live_exports()
            .iter()
            .filter_map(|e| e.store())
            .map(|s| s.dirty_bytes())
            .sum()
    }

    /// Exports (name, dirty bytes) still holding data not in S3: what an abort would lose.
    pub fn dirty_exports(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .live_exports()
            .iter()
            .filter_map(|e| {
                let dirty = e.store()?.dirty_bytes();
                (dirty > 0).then(|| (e.name().to_owned(), dirty))
            })
            .collect();
        out.sort();
        out
    }

    /// Number of open client connections.
    pub fn connection_count(&self) -> usize {
        self.server.connection_count()
    }

    /// Served exports plus removed ones still draining: everything that may hold dirty data.
    fn live_exports(&self) -> Vec<Arc<Export>> {
        let mut live = self.registry.list();
        for export in self.registry.draining() {
            if !live.iter().any(|e| e.same_instance(&export)) {
                live.push(export);
            }
        }
        live
    }

    /// Prepares a takeover: stops accepting and reading, lets in-flight requests finish within
    /// `grace`, flushes every export and releases its lease, and returns the sockets to pass
    /// on. When an export cannot be flushed nothing is passed on: this daemon serves on (its
    /// listeners and connections resume) and the error is returned.
    pub async fn hand_over(self: &Arc<Self>, grace: Duration) -> Result<Handover, String> {
        if let Some(reopener) = self.reopener.lock().take() {
            // It would take leases the next process needs.
            reopener.abort();
        }
        let parked_at_ns = monotonic_ns();
        let mut handles = self.listeners.lock().await;
        let (listeners, connections) = self.park(&mut handles, grace).await;
        let failed = self.flush_all(false).await;
        if !failed.is_empty() {
            let names: Vec<&str> = failed.iter().map(|f| f.export.as_str()).collect();
            let error = format!("not flushed: {}; serving on", names.join(", "));
            warn!("takeover refused: {error}");
            self.server.resume();
            for (addr, l) in listeners {
                handles.insert(addr, self.server.spawn_listener(l));
            }
            self.server.adopt(connections);
            let reopener = tokio::spawn(reopen::run(Arc::downgrade(self)));
            *self.reopener.lock() = Some(reopener);
            return Err(error);
        }
        // Released before the sockets go: the next process takes each lease when it adopts
        // a connection. A third daemon asking for an export in between (the few ms until the
        // new process has opened its exports) could take it first; the adopted connections
        // of that export are then closed, never served without the lease.
        for export in self.live_exports() {
            if let Some(slot) = export.lease_slot() {
                slot.release_now().await;
            }
        }
        Ok(Handover {
            listeners: listener_fds(listeners),
            connections,
            parked_at_ns: Some(parked_at_ns),
            handovers: self.handovers.snapshot().total,
        })
    }

    /// Records how the takeover ended (`delivered`: the next process has the sockets).
    pub fn handed_over(&self, delivered: bool) {
        self.handed_over.send_replace(Some(delivered));
    }

    /// Resolves once a takeover ended, with whether the sockets were delivered.
    pub async fn wait_handed_over(&self) -> bool {
        let mut rx = self.handed_over.subscribe();
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map(|v| v.unwrap_or(false));
        match outcome {
            Ok(delivered) => delivered,
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops accepting, lets in-flight requests finish within `grace` (then ESHUTDOWN), and
    /// flushes every export (removed ones still draining too). An export's flush keeps going
    /// while its dirty data shrinks; one `[cache] flush_timeout` without progress fails it.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        self.stop_background();
        for (_, handle) in self.listeners.lock().await.drain() {
            info!("closed listener {}", handle.addr());
            handle.close();
        }
        self.server.shutdown(grace).await;
        ShutdownReport {
            failed: self.flush_all(true).await,
            kept: Handover::default(),
        }
    }

    /// Flushes every live export at once (releasing each lease once flushed, if `release`);
    /// returns the exports that kept dirty data, by name.
    async fn flush_all(&self, release: bool) -> Vec<FlushFailure> {
        let step = self.config().cache.flush_timeout;
        let mut tasks = tokio::task::JoinSet::new();
        for export in self.live_exports() {
            tasks.spawn(flush_export(export, step, release));
        }
        let mut failed = Vec::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Some(failure)) => failed.push(failure),
                Ok(None) => {}
                Err(e) => error!("flush task failed: {e}"),
            }
        }
        failed.sort_by(|a, b| a.export.cmp(&b.export));
        failed
    }
}

/// Flushes one export until it is clean. Each attempt may take `step`; the flush goes on as
/// long as attempts make progress (dirty data shrinks), so a slow S3 is waited for and a dead
/// one is reported, with the blocks it refused, instead of hanging until systemd's SIGKILL.
async fn flush_export(export: Arc<Export>, step: Duration, release: bool) -> Option<FlushFailure> {
    let store = export.store()?;
    let mut before = store.dirty_bytes();
    loop {
        match store.shutdown_flush(Some(step)).await {
            Ok(()) => {
                info!(export = export.name(), "flushed");
                // Everything is in S3: hand the export over to any other daemon at once.
                if let Some(slot) = export.lease_slot().filter(|_| release) {
                    slot.release_now().await;
                }
                return None;
            }
            Err(e) => {
                let now = store.dirty_bytes();
                if now > 0 && now < before {
                    info!(
                        export = export.name(),
                        "flush still progressing ({} left); continuing",
                        format_mib(now)
                    );
                    before = now;
                    continue;
                }
                error!(export = export.name(), "flush failed: {e}");
                return Some(FlushFailure {
                    export: export.name().to_owned(),
                    dirty_bytes: now,
                    error: e.to_string(),
                });
            }
        }
    }
}

/// An address as an admin wrote it.
pub fn show_addr(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(s) => s.clone(),
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `12.0 MiB`: dirty data is what an admin waits for at shutdown, MiB is the useful unit.
pub fn format_mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn status_units() {
        assert_eq!(format_mib(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(format_mib(0), "0.0 MiB");
        assert_eq!(plural(1), "");
        assert_eq!(plural(3), "s");
        assert_eq!(show_addr(&ListenAddr::Unix("/run/x".into())), "unix:/run/x");
    }

    fn write_config(dir: &Path, listen: &str, exports: &[&str]) -> PathBuf {
        let mut text = format!(
            "[server]\nlisten = {listen}\n[s3]\nendpoint = \"file://{}\"\n",
            dir.join("store").display()
        );
        for name in exports {
            text.push_str(&format!(
                "[[export]]\nname = \"{name}\"\nsize = \"1MiB\"\nbucket = \"b\"\nprefix = \"{name}/\"\n"
            ));
        }
        std::fs::create_dir_all(dir.join("store/b")).unwrap();
        let path = dir.join("exports.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn names(d: &Daemon) -> Vec<String> {
        d.registry()
            .list()
            .iter()
            .map(|e| e.name().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn reload_applies_exports_and_listeners_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "\"127.0.0.1:0\"", &["a"]);
        let config = Config::load(&path).unwrap();
        let d = Daemon::start(config, Some(path.clone())).await.unwrap();
        assert_eq!(names(&d), ["a"]);
        assert_eq!(d.status(), "serving 1 export, 0 clients, 0.0 MiB dirty");

        let sock = dir.path().join("nbd.sock");
        let listen = format!("[\"127.0.0.1:0\", \"unix:{}\"]", sock.display());
        write_config(dir.path(), &listen, &["a", "b"]);
        d.reload().await.unwrap();
        assert_eq!(names(&d), ["a", "b"]);
        assert!(sock.exists(), "new unix listener bound");
        assert_eq!(d.config().server.listen.len(), 2);

        std::fs::write(&path, "[server]\nnope = 1\n").unwrap();
        let err = d.reload().await.unwrap_err();
        assert!(err.to_string().contains("exports.toml:2"), "{err}");
        assert_eq!(names(&d), ["a", "b"], "a refused file changes nothing");
        let counted = d.reloads().snapshot();
        assert_eq!((counted.ok, counted.failed), (1, 1));
        assert!(counted.last_failed);

        write_config(dir.path(), "\"127.0.0.1:0\"", &["b"]);
        d.reload().await.unwrap();
        assert_eq!(names(&d), ["b"]);
        // Closing aborts the accept task; the socket file goes when the task is dropped.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sock.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!sock.exists(), "removed unix listener closed");

        let report = d.shutdown(Duration::from_secs(1)).await;
        assert!(report.failed.is_empty(), "{report:?}");
    }

    #[tokio::test]
    async fn a_taken_address_fails_start_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let path = write_config(dir.path(), &format!("\"{addr}\""), &["a"]);
        let err = Daemon::start(Config::load(&path).unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, StartError::Bind { .. }), "{err}");
        assert!(err.to_string().contains(&addr), "{err}");
    }

    #[tokio::test]
    async fn reload_without_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "\"127.0.0.1:0\"", &["a"]);
        let d = Daemon::start(Config::load(&path).unwrap(), None)
            .await
            .unwrap();
        assert!(matches!(d.reload().await, Err(ReloadError::NoConfigFile)));
        assert!(d.shutdown(Duration::from_secs(1)).await.failed.is_empty());
    }
}

//! Hot reload: read → parse → validate (config) → diff (`plan`, pure) → apply (`apply_exports`,
//! one `Registry::replace`). The diff is by export name and errs on the side of attached
//! clients: anything that would pull data from under a connected client is refused for that
//! export, the old definition stays, and the log says why.

mod watcher;

#[cfg(test)]
mod tests;

pub use watcher::{ConfigWatcher, WatchError, DEBOUNCE};

use crate::config::size::format_size;
use crate::config::{Config, ExportConfig, ListenAddr};
use crate::export::{open_export, BucketSource, Export, OpenContext, Refusal, Registry};
use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

/// What a reload does to one export.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportAction {
    /// Identical definition: the running export (and its cache) is kept as is.
    Keep,
    /// New name: opened and served to new connections.
    Add(ExportConfig),
    /// Gone from the file: new connections are refused, attached clients keep working, dirty
    /// data is flushed now and again when the last client detaches.
    Remove,
    /// Same store, new definition for new connections (description, read_only → true, growth).
    Update { new: ExportConfig, grow: bool },
    /// A new store replaces the old one (location changed with no client attached, or the old
    /// one was refused and is retried).
    Reopen { new: ExportConfig, reason: String },
    /// The change is refused; the old definition stays in service.
    Refuse { reason: String },
}

/// What the planner needs to know about a running export: its clients, and whether it is
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunningExport {
    /// Clients attached (every version of the export).
    pub attached: usize,
    /// The export is refused (its store could not be opened); any reload retries it.
    pub refused: bool,
}

/// The whole diff between the running and the new configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadPlan {
    /// One action per export name of the old and new files.
    pub exports: BTreeMap<String, ExportAction>,
    /// Listeners to bind (the daemon does this part).
    pub listen_added: Vec<ListenAddr>,
    /// Listeners to close.
    pub listen_removed: Vec<ListenAddr>,
    /// Sections that changed but only take effect after a restart (`[s3]`, `[cache]`,
    /// `[server] metrics`): logged at warn on every reload until the restart.
    pub restart_needed: Vec<&'static str>,
    /// The configuration in effect after the plan is applied: the new file, except refused
    /// exports keep their old definition and restart-only sections keep their old values.
    pub effective: Config,
}

impl ReloadPlan {
    /// Whether applying the plan changes any export.
    pub fn changes_exports(&self) -> bool {
        self.exports.values().any(|a| *a != ExportAction::Keep)
    }
}

/// Diffs `old` (what runs) against `new` (the file), asking the registry who is attached.
pub fn plan(old: &Config, new: &Config, registry: &Registry) -> ReloadPlan {
    plan_with(old, new, |name| {
        registry.get(name).map(|e| RunningExport {
            attached: e.attached(),
            refused: !e.is_serving(),
        })
    })
}

/// The pure diff; `state` reports on running exports by name.
pub fn plan_with(
    old: &Config,
    new: &Config,
    state: impl Fn(&str) -> Option<RunningExport>,
) -> ReloadPlan {
    let mut exports = BTreeMap::new();
    let mut effective = new.clone();
    for n in &new.exports {
        let action = match old.export(&n.name) {
            None => ExportAction::Add(n.clone()),
            Some(o) => diff_export(o, n, state(&n.name).unwrap_or_default()),
        };
        exports.insert(n.name.clone(), action);
    }
    for o in &old.exports {
        exports
            .entry(o.name.clone())
            .or_insert(ExportAction::Remove);
    }
    for e in effective.exports.iter_mut() {
        if let (Some(ExportAction::Refuse { .. }), Some(o)) =
            (exports.get(&e.name), old.export(&e.name))
        {
            *e = o.clone();
        }
    }
    let mut restart_needed = Vec::new();
    if old.s3 != new.s3 {
        restart_needed.push("[s3]");
        effective.s3 = old.s3.clone();
    }
    if old.cache != new.cache {
        restart_needed.push("[cache]");
        effective.cache = old.cache.clone();
    }
    if old.server.metrics != new.server.metrics {
        restart_needed.push("[server] metrics");
        effective.server.metrics = old.server.metrics;
    }
    if old.server.control != new.server.control {
        restart_needed.push("[server] control");
        effective.server.control = old.server.control.clone();
    }
    let listen_added = new
        .server
        .listen
        .iter()
        .filter(|a| !old.server.listen.contains(a))
        .cloned()
        .collect();
    let listen_removed = old
        .server
        .listen
        .iter()
        .filter(|a| !new.server.listen.contains(a))
        .cloned()
        .collect();
    ReloadPlan {
        exports,
        listen_added,
        listen_removed,
        restart_needed,
        effective,
    }
}

/// The action for an export present in both files.
fn diff_export(o: &ExportConfig, n: &ExportConfig, st: RunningExport) -> ExportAction {
    if o == n {
        return if st.refused {
            ExportAction::Reopen {
                new: n.clone(),
                reason: "retrying a refused export".into(),
            }
        } else {
            ExportAction::Keep
        };
    }
    if st.refused {
        return ExportAction::Reopen {
            new: n.clone(),
            reason: "definition changed (was refused)".into(),
        };
    }
    let moved = !same_store(o, n);
    if moved && st.attached > 0 {
        return ExportAction::Refuse {
            reason: format!(
                "bucket, prefix, block_size, lease, durability, compression or encryption key cannot change while {} client(s) are attached",
                st.attached
            ),
        };
    }
    if n.size < o.size {
        return ExportAction::Refuse {
            reason: format!(
                "shrinking from {} to {} could cut off stored data",
                format_size(o.size),
                format_size(n.size)
            ),
        };
    }
    if moved {
        return ExportAction::Reopen {
            new: n.clone(),
            reason:
                "bucket, prefix, block_size, lease, durability, compression or encryption key changed"
                    .into(),
        };
    }
    if o.read_only && !n.read_only {
        if st.attached > 0 {
            return ExportAction::Refuse {
                reason: format!(
                    "read_only cannot be turned off while {} client(s) are attached",
                    st.attached
                ),
            };
        }
        return ExportAction::Reopen {
            new: n.clone(),
            reason: "read_only turned off".into(),
        };
    }
    ExportAction::Update {
        new: n.clone(),
        grow: n.size > o.size,
    }
}

/// Whether a store opened for `o` can serve `n`: the same objects and every setting fixed
/// when a store opens. A lease switched on (or off) needs a new store: only a fresh open takes
/// the lease and puts the store behind its fence; a codec or durability change is checked
/// against the export's manifest only by a fresh open.
fn same_store(o: &ExportConfig, n: &ExportConfig) -> bool {
    o.bucket == n.bucket
        && o.prefix == n.prefix
        && o.block_size == n.block_size
        && o.lease == n.lease
        && o.codec == n.codec
        && o.durability == n.durability
}

/// Why a GO is refused while a reload replaces the export's store, and after.
const REOPENING: &str = "a reload is reopening it; connect again";
const REOPENED: &str = "a reload replaced it; connect again";

/// Whether the objects of two exports overlap (one prefix contains the other, same bucket).
fn overlaps(a: &ExportConfig, b: &ExportConfig) -> bool {
    a.bucket == b.bucket && (a.prefix.starts_with(&b.prefix) || b.prefix.starts_with(&a.prefix))
}

/// The result of `apply_exports`.
#[derive(Debug)]
pub struct Applied {
    /// Exports opened by this reload (new stores), for the daemon's shutdown bookkeeping.
    pub added: Vec<Arc<Export>>,
    /// The configuration now in effect (`ReloadPlan::effective`).
    pub effective: Config,
}

/// The next registry map being assembled from a plan.
struct Staging {
    next: BTreeMap<String, Arc<Export>>,
    /// Exports leaving service once the new map is in.
    retire: Vec<Arc<Export>>,
    /// Definitions needing a store (new, or replacing a running one).
    to_open: Vec<ExportConfig>,
    effective: Config,
    /// Removed exports still in use (`Registry::draining`).
    draining: Vec<Arc<Export>>,
}

impl Staging {
    /// Whether a removed export still serving clients holds objects `cfg` would use.
    fn overlaps_attached(&self, cfg: &ExportConfig) -> bool {
        self.draining
            .iter()
            .any(|d| d.attached() > 0 && overlaps(&d.config, cfg))
    }

    /// Leaves `old` in service and in the effective configuration, so the next reload retries.
    fn keep_old(&mut self, name: String, old: Arc<Export>) {
        if let Some(e) = self.effective.exports.iter_mut().find(|e| e.name == name) {
            *e = old.config.clone();
        }
        self.next.insert(name, old);
    }

    /// Sorts one export's action into keep / retire / open.
    async fn stage(&mut self, name: String, action: ExportAction, running: Option<Arc<Export>>) {
        match (action, running) {
            (ExportAction::Keep, Some(e)) => drop(self.next.insert(name, e)),
            (ExportAction::Refuse { reason }, running) => {
                warn!(
                    export = name.as_str(),
                    "change refused, keeping the old definition: {reason}"
                );
                if let Some(e) = running {
                    self.next.insert(name, e);
                }
            }
            (ExportAction::Remove, Some(e)) => self.retire.push(e),
            (ExportAction::Remove, None) => {}
            (ExportAction::Update { new, grow }, Some(e)) => {
                if let (true, Some(store)) = (grow, e.store()) {
                    store.resize(new.size);
                }
                info!(
                    export = name.as_str(),
                    "export changed; new connections see the new definition"
                );
                self.next.insert(name, e.with_config(new));
            }
            (ExportAction::Reopen { .. }, Some(old)) if old.is_serving() && old.attached() > 0 => {
                // A client attached between planning and now: never two stores on its objects.
                warn!(
                    export = name.as_str(),
                    "change refused, keeping the old definition: a client attached during the reload; reload again once it disconnects"
                );
                self.keep_old(name, old);
            }
            (ExportAction::Reopen { new, reason }, running) => {
                if let Some(old) = running {
                    if !old.is_serving() && old.config == new && self.overlaps_attached(&new) {
                        // A refused export retried with its definition unchanged, while an
                        // earlier version of it still serves clients (a reload that just
                        // replaced it, run twice by SIGHUP and the file watcher): its refusal
                        // stands. Retrying now could only refuse it for the overlap, and the
                        // admin would lose the reason that matters.
                        self.keep_old(name, old);
                        return;
                    }
                    // Closed before it is flushed: a client attaching while the new store
                    // opens would write to the old one, and two stores would serve one set of
                    // objects, each with its own cache. A GO meanwhile is refused for now.
                    let closed = match old.store().map(|s| s.close_to_clients(REOPENING, &name)) {
                        Some(Err(why)) => {
                            warn!(
                                export = name.as_str(),
                                "change refused, keeping the old definition: {why}; reload again then"
                            );
                            self.keep_old(name, old);
                            return;
                        }
                        Some(Ok(closed)) => Some(closed),
                        None => None,
                    };
                    if let Err(e) = quiesce(&old).await {
                        warn!(
                            export = name.as_str(),
                            "change refused, keeping the old definition: its data is not all in S3 yet ({e})"
                        );
                        self.keep_old(name, old);
                        return;
                    }
                    if let Some(closed) = closed {
                        closed.forever(REOPENED);
                    }
                    self.retire.push(old);
                }
                info!(export = name.as_str(), "reopening export: {reason}");
                self.to_open.push(new);
            }
            (ExportAction::Add(new), _) => self.to_open.push(new),
            // Planned against a registry that lacks the export: open it from the file.
            (ExportAction::Keep | ExportAction::Update { .. }, None) => {
                if let Some(cfg) = self.effective.export(&name) {
                    self.to_open.push(cfg.clone());
                }
            }
        }
    }
}

/// Applies the export part of a plan: builds the next map (reusing unchanged exports), opens
/// new stores concurrently, swaps the map in with ONE `Registry::replace`, then retires
/// removed exports. `plan.restart_needed` is left to the caller to log (the daemon does).
pub async fn apply_exports<F: BucketSource + ?Sized>(
    plan: ReloadPlan,
    registry: &Registry,
    factory: &F,
    ctx: &OpenContext,
) -> Applied {
    let current = registry.snapshot();
    let mut staging = Staging {
        next: BTreeMap::new(),
        retire: Vec::new(),
        to_open: Vec::new(),
        effective: plan.effective,
        draining: registry.draining(),
    };
    for (name, action) in plan.exports {
        let running = current.get(&name).cloned();
        staging.stage(name, action, running).await;
    }
    let Staging {
        mut next,
        retire,
        to_open,
        effective,
        draining,
    } = staging;
    let opens = to_open
        .iter()
        .map(|cfg| open_or_reuse(cfg, &draining, registry, factory, ctx));
    let mut added = Vec::new();
    for (export, fresh) in futures_util::future::join_all(opens).await {
        let export = match current.get(export.name()) {
            Some(previous) if fresh => export.counting_on(previous),
            _ => export,
        };
        info!(
            export = export.name(),
            "export added; served to new connections"
        );
        if fresh {
            added.push(Arc::clone(&export));
        }
        next.insert(export.name().to_string(), export);
    }
    registry.replace(next);
    for export in retire {
        registry.retire(export);
    }
    Applied { added, effective }
}

/// Flushes an export about to be replaced by a new store on possibly the same objects, so the
/// new store reads what the old one acknowledged.
/// `Err` (the flush error) means the old store still holds data S3 has not taken: opening a
/// second store on its objects now would read stale blocks.
async fn quiesce(old: &Export) -> Result<(), String> {
    match old.store() {
        Some(store) => store.flush_dirty().await.map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Opens a store for `cfg`, or revives a removed export still draining on the same objects
/// (re-added while clients were still attached): one cache per set of objects, never two.
/// Returns the export and whether a new store was opened.
async fn open_or_reuse<F: BucketSource + ?Sized>(
    cfg: &ExportConfig,
    draining: &[Arc<Export>],
    registry: &Registry,
    factory: &F,
    ctx: &OpenContext,
) -> (Arc<Export>, bool) {
    let overlapping = draining.iter().filter(|d| overlaps(&d.config, cfg));
    for d in overlapping {
        // Reusing a store with another codec, lease or durability would serve the export as
        // it was, never refusing the change as a fresh open does.
        let same = same_store(&d.config, cfg)
            && d.config.read_only == cfg.read_only
            && d.store().is_some_and(|s| s.admits_clients());
        if same {
            registry.revive(d);
            if let (true, Some(store)) = (cfg.size > d.config.size, d.store()) {
                store.resize(cfg.size);
            }
            info!(
                export = cfg.name.as_str(),
                "reusing the store of removed export {:?} still in use",
                d.name()
            );
            return (d.with_config(cfg.clone()), false);
        }
        if d.attached() > 0 {
            let reason = Refusal::OverlapsAttached {
                other: d.name().to_owned(),
                clients: d.attached(),
            };
            warn!(export = cfg.name.as_str(), "export refused: {reason}");
            return (Export::refused(cfg.clone(), reason), false);
        }
        if let Err(e) = quiesce(d).await {
            let reason = Refusal::OverlapsUnflushed {
                other: d.name().to_owned(),
                error: e,
            };
            warn!(export = cfg.name.as_str(), "export refused: {reason}");
            return (Export::refused(cfg.clone(), reason), false);
        }
    }
    (open_export(cfg, factory, ctx).await, true)
}

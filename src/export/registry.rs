//! The live registry of exports. It is an `ArcSwap` snapshot: a reload builds a whole new map
//! and swaps it in, so a handshake never sees half a reload. Removed exports still in use are
//! remembered (weakly) so a re-added export can reuse their store.

use super::{spawn_flush, Export};
use crate::config::LeaseMode;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use tracing::info;

/// One entry of an export listing: a snapshot is listed under its own name and description,
/// with the export it belongs to (whose `allow` list and state apply).
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub description: Option<String>,
    pub export: Arc<Export>,
}

fn snapshot_description(snap: &str, export: &str) -> String {
    format!("snapshot {snap} of {export}")
}

/// The set of exports new connections can see, replaced atomically on reload, plus the removed
/// exports still draining (attached clients, or a final flush running).
#[derive(Debug, Default)]
pub struct Registry {
    exports: ArcSwap<BTreeMap<String, Arc<Export>>>,
    draining: Mutex<Vec<Weak<Export>>>,
    /// The read-only exports of snapshots (`EXPORT@SNAP`) clients opened, so their clients
    /// are counted on one `Export`.
    views: parking_lot::Mutex<BTreeMap<String, Arc<Export>>>,
}

impl Registry {
    /// An empty registry; fill it with `replace`.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// The export named `name` in the current snapshot.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.load().get(name).cloned()
    }
    /// The export `name` as a client asks for it: a configured export, else the read-only
    /// export of a snapshot, `EXPORT@SNAP`, of a served export (a configured export of that
    /// name wins).
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.get(name).or_else(|| self.snapshot_export(name))
    }
    /// The read-only export `EXPORT@SNAP` of snapshot SNAP of served export EXPORT.
    pub fn snapshot_export(&self, name: &str) -> Option<Arc<Export>> {
        let (base, snap) = name.rsplit_once('@')?;
        let export = self.get(base)?;
        let view = export.store()?.snapshot_view(snap)?;
        let mut views = self.views.lock();
        if let Some(known) = views.get(name) {
            if known.store().is_some_and(|s| Arc::ptr_eq(s, &view)) {
                return Some(Arc::clone(known));
            }
        }
        let mut config = export.config.clone();
        config.name = name.to_owned();
        config.size = view.size();
        config.read_only = true;
        config.lease = LeaseMode::Off;
        config.description = Some(snapshot_description(snap, base));
        let opened = Export::serving(config, view, None);
        views.insert(name.to_owned(), Arc::clone(&opened));
        Some(opened)
    }
    /// Every export a client may ask for, sorted by name: the configured ones and the
    /// snapshots of the served ones (NBD_OPT_LIST). Nothing is opened to list them.
    pub fn list_with_snapshots(&self) -> Vec<Listed> {
        let configured = self.exports.load_full();
        let mut all: BTreeMap<String, Listed> = configured
            .values()
            .map(|e| {
                let listed = Listed {
                    name: e.name().to_owned(),
                    description: e.description().map(str::to_owned),
                    export: Arc::clone(e),
                };
                (listed.name.clone(), listed)
            })
            .collect();
        for export in configured.values() {
            let Some(store) = export.store() else {
                continue;
            };
            for snap in store.snapshot_names() {
                let name = format!("{}@{snap}", export.name());
                all.entry(name.clone()).or_insert_with(|| Listed {
                    name,
                    description: Some(snapshot_description(&snap, export.name())),
                    export: Arc::clone(export),
                });
            }
        }
        all.into_values().collect()
    }
    /// Every export of the current snapshot, sorted by name (NBD_OPT_LIST).
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.exports.load().values().cloned().collect()
    }
    /// The current snapshot as one consistent map.
    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Export>>> {
        self.exports.load_full()
    }
    /// Swaps in a new snapshot in one step.
    pub fn replace(&self, exports: BTreeMap<String, Arc<Export>>) {
        self.exports.store(Arc::new(exports));
    }
    /// Takes an export out of service (call after `replace` dropped it): marks it removed, so
    /// new connections cannot find it and its last detaching client releases it, and flushes
    /// its dirty data now.
    pub fn retire(&self, export: Arc<Export>) {
        export.shared.removed.store(true, Ordering::SeqCst);
        if let Ok(mut draining) = self.draining.lock() {
            draining.retain(|w| w.strong_count() > 0);
            draining.push(Arc::downgrade(&export));
        }
        let clients = export.attached();
        info!(
            export = export.name(),
            clients, "export removed; new connections are refused"
        );
        spawn_flush(export, "export removed");
    }
    /// Removed exports still alive (clients attached or a final flush running). A re-added
    /// export reuses such a store instead of opening a second cache on the same objects.
    pub fn draining(&self) -> Vec<Arc<Export>> {
        match self.draining.lock() {
            Ok(mut d) => {
                d.retain(|w| w.strong_count() > 0);
                d.iter()
                    .filter_map(Weak::upgrade)
                    .filter(|e| e.is_removed())
                    .collect()
            }
            Err(_) => Vec::new(),
        }
    }
    /// Brings a draining export back (re-added with the same bucket, prefix and block size).
    pub fn revive(&self, export: &Export) {
        export.shared.removed.store(false, Ordering::SeqCst);
    }
}

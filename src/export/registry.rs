//! The live registry of exports. It is an `ArcSwap` snapshot: a reload builds a whole new map
//! and swaps it in, so a handshake never sees half a reload. Removed exports still in use are
//! remembered (weakly) so a re-added export can reuse their store.

use super::{spawn_flush, Export};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use tracing::info;

/// The set of exports new connections can see, replaced atomically on reload, plus the removed
/// exports still draining (attached clients, or a final flush running).
#[derive(Debug, Default)]
pub struct Registry {
    exports: ArcSwap<BTreeMap<String, Arc<Export>>>,
    draining: Mutex<Vec<Weak<Export>>>,
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

//! Exports and the live registry the server looks them up in. The registry is an `ArcSwap`
//! snapshot: a reload builds a whole new map and swaps it in, so a handshake never sees half a
//! reload. Connections hold `Arc<Export>`, so a removed export lives until its last client goes.
//!
//! STUB interface (owned by the reload work, issue 5); the server codes against it.

use crate::config::ExportConfig;
use crate::store::BlockStore;
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One served export: its definition and its block store, or why it cannot be served.
#[derive(Debug)]
pub struct Export {
    pub config: ExportConfig,
    /// `Err(message)` when the export is refused (e.g. block-size mismatch); clients asking for
    /// it get ERR_UNKNOWN with this message.
    pub store: Result<Arc<BlockStore>, String>,
}

impl Export {
    /// The export's name as clients ask for it.
    pub fn name(&self) -> &str {
        &self.config.name
    }
    /// Size advertised to new connections.
    pub fn size(&self) -> u64 {
        self.config.size
    }
    /// Optional human description (NBD_INFO_DESCRIPTION).
    pub fn description(&self) -> Option<&str> {
        self.config.description.as_deref()
    }
    /// Whether writes are refused with EPERM.
    pub fn read_only(&self) -> bool {
        self.config.read_only
    }
    /// Preferred I/O size advertised in NBD_INFO_BLOCK_SIZE.
    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }
    /// Marks a client as attached; the export is released (flushed) after the last guard of a
    /// removed export drops.
    pub fn attach(self: &Arc<Self>) -> Attachment {
        Attachment { export: Arc::clone(self) }
    }
}

/// Held by a connection for as long as it uses an export.
#[derive(Debug)]
pub struct Attachment {
    export: Arc<Export>,
}

impl Attachment {
    /// The attached export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

/// The set of exports new connections can see, replaced atomically on reload.
#[derive(Debug, Default)]
pub struct Registry {
    exports: ArcSwap<BTreeMap<String, Arc<Export>>>,
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
    /// Swaps in a new snapshot in one step.
    pub fn replace(&self, exports: BTreeMap<String, Arc<Export>>) {
        self.exports.store(Arc::new(exports));
    }
}

//! An export nobody uses costs nothing: once its last client (or admin command) has gone,
//! what it left dirty is stored and then the export lease is given up, so no renewal (and no other request) is made
//! until a client attaches again.

use super::Export;
use crate::retry::Policy;
use std::sync::Arc;
use tracing::{debug, warn};

/// After the last client detached: flushes the export until it is clean (retrying with
/// backoff while S3 refuses; dirty data is never dropped), then, after the slot's idle grace,
/// gives the lease up unless a client came back meanwhile.
pub(super) fn spawn_release(export: Arc<Export>) {
    if export.lease_slot().is_none() {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let Some(store) = export.store() else { return };
        let mut backoff = Policy::IDLE_FLUSH.backoff();
        while export.unused() && store.dirty_bytes() > 0 {
            if export.lease_slot().is_some_and(|s| s.lost_reason().is_some()) {
                return; // never stored now: the export is reopened instead
            }
            if let Err(e) = store.flush().await {
                let delay = backoff.next_delay().unwrap_or(Policy::IDLE_FLUSH.cap);
                warn!(
                    export = export.name(),
                    "storing what the last client left failed ({e}); the lease stays held, retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
            }
        }
        if let Some(slot) = export.lease_slot() {
            tokio::time::sleep(slot.idle_grace()).await;
        }
        if !export.unused() {
            return; // a client came back: it keeps the lease
        }
        if export.release_lease().await && export.unused() {
            debug!(export = export.name(), "idle: export lease given up");
        }
    });
}

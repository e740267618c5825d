//! The end of an export's life: a removed export is flushed in the background, and kept (with
//! its dirty data) until the object store has taken everything.

use super::Export;
use crate::retry::Policy;
use std::sync::Arc;
use tracing::{error, info, warn};

/// Flushes an export in the background and logs the outcome. The task keeps the export (and so
/// its dirty data) alive until the flush succeeds: a removed export whose data S3 refuses is
/// retried with backoff (`Policy::RETIRED_FLUSH`), never dropped; it stops early only if the
/// export is served again.
pub fn spawn_flush(export: Arc<Export>, why: &'static str) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        warn!(export = export.name(), "{why}: no runtime to flush on");
        return;
    };
    handle.spawn(async move {
        let Some(store) = export.store() else { return };
        let mut backoff = Policy::RETIRED_FLUSH.backoff();
        loop {
            let Err(e) = store.flush_dirty().await else {
                info!(export = export.name(), "{why}: flushed");
                break;
            };
            // The policy is unbounded: `None` cannot happen, but stopping would lose data.
            let delay = backoff.next_delay().unwrap_or(Policy::RETIRED_FLUSH.cap);
            error!(
                export = export.name(),
                "{why}: flush failed ({e}); {} dirty bytes stay queued, retrying in {delay:?}",
                store.dirty_bytes()
            );
            if !export.is_removed() {
                return; // served again: its normal life cycle flushes it
            }
            tokio::time::sleep(delay).await;
        }
        if export.is_removed() && export.attached() == 0 {
            info!(export = export.name(), "removed export released");
        }
    });
}

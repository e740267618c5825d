//! Automatic snapshots (`snapshot_every`, `snapshot_keep`): every interval, first one
//! interval after the export opens, an export that changed since its previous automatic
//! snapshot gets `auto-YYYYMMDDTHHMMSSZ`; then the oldest automatic snapshots beyond
//! `snapshot_keep` are deleted, never one a clone is based on (its delete is refused and it
//! stays).

use super::Daemon;
use crate::store::{BlockStore, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// How often exports are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Name prefix of automatic snapshots.
const PREFIX: &str = "auto-";

/// One export's schedule: when the next snapshot is due and the change count at the last.
struct Due {
    store: Weak<BlockStore>,
    at: Instant,
    changes: u64,
}

/// Runs until the daemon is gone (shutdown aborts the task).
pub(super) async fn run(daemon: Weak<Daemon>) {
    let mut due: HashMap<String, Due> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(d) = daemon.upgrade() else { return };
        let now = Instant::now();
        let mut seen = Vec::new();
        for export in d.registry.list() {
            let (Some(auto), Some(store)) = (export.config.auto_snapshots, export.store()) else {
                continue;
            };
            if export.read_only() {
                continue;
            }
            seen.push(export.name().to_owned());
            let entry = due.entry(export.name().to_owned()).or_insert_with(|| Due {
                store: Arc::downgrade(store),
                at: now + auto.every,
                changes: 0,
            });
            if !entry.store.ptr_eq(&Arc::downgrade(store)) {
                // Reopened (reload, lease): its schedule starts again.
                *entry = Due {
                    store: Arc::downgrade(store),
                    at: now + auto.every,
                    changes: 0,
                };
            }
            if now < entry.at {
                continue;
            }
            entry.at = now + auto.every;
            let changes = store.changes();
            if changes == entry.changes {
                continue;
            }
            // An idle export holds no lease: take it for the snapshot (and give it up after).
            let _lease = match export.hold_lease().await {
                Ok(hold) => hold,
                Err(reason) => {
                    warn!(
                        export = export.name(),
                        "automatic snapshot skipped: {reason}"
                    );
                    continue;
                }
            };
            entry.changes = changes;
            take(export.name(), store, auto.keep).await;
        }
        due.retain(|name, _| seen.contains(name));
        drop(d);
    }
}

/// Takes one automatic snapshot, then applies the retention.
async fn take(export: &str, store: &BlockStore, keep: Option<u32>) {
    let name = format!("{PREFIX}{}", compact_utc_now());
    if let Err(e) = store.create_snapshot(&name).await {
        warn!(export, snapshot = %name, error = %e, "automatic snapshot failed");
        return;
    }
    info!(export, snapshot = %name, "automatic snapshot taken");
    let Some(keep) = keep else { return };
    let mut autos: Vec<String> = store
        .snapshot_names()
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .collect();
    autos.sort(); // the names sort by time
    let extra = autos.len().saturating_sub(keep as usize);
    for old in autos.into_iter().take(extra) {
        match store.delete_snapshot(&old).await {
            Ok(_) => info!(export, snapshot = %old, "automatic snapshot expired"),
            Err(StoreError::Refused(why)) => info!(export, snapshot = %old, "kept: {why}"),
            Err(e) => warn!(export, snapshot = %old, error = %e, "expiring a snapshot failed"),
        }
    }
}

/// `YYYYMMDDTHHMMSSZ`, UTC.
fn compact_utc_now() -> String {
    let text = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    text.chars().filter(|c| *c != '-' && *c != ':').collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_compact_utc() {
        let name = super::compact_utc_now();
        assert_eq!(name.len(), 16, "{name}");
        assert_eq!((&name[8..9], &name[15..]), ("T", "Z"), "{name}");
    }
}

//! What the admin commands do to a running daemon's exports: snapshots and garbage
//! collection. Each returns the result, or why it was refused in words that name what is in
//! the way (an unknown export or snapshot, a refused export, clients attached, the lease).

use super::Daemon;
use crate::export::{Export, LeaseHold};
use crate::store::{check_snapshot_name, BlockStore, Snapshot, StoreError};
use std::sync::Arc;

/// One snapshot with the export it belongs to.
#[derive(Debug, Clone)]
pub struct ExportSnapshot {
    pub export: String,
    pub snapshot: Snapshot,
    /// Exports cloned from it.
    pub clones: Vec<String>,
}

impl Daemon {
    /// The served export `name` and its store, or why there is none.
    fn served(&self, name: &str) -> Result<(Arc<Export>, Arc<BlockStore>), String> {
        let export = self
            .registry
            .get(name)
            .ok_or_else(|| format!("no export named {name:?} is configured"))?;
        if let Some(reason) = export.refusal() {
            return Err(format!("export {name:?} is refused: {reason}"));
        }
        let store = export
            .store()
            .cloned()
            .ok_or_else(|| format!("export {name:?} is not served"))?;
        Ok((export, store))
    }

    /// Like `served`, with the export lease held until the returned guard drops: an idle
    /// export holds none, and every change to snapshots needs it.
    async fn leased(
        &self,
        name: &str,
    ) -> Result<(Arc<Export>, Arc<BlockStore>, LeaseHold), String> {
        let (export, store) = self.served(name)?;
        let hold = export
            .hold_lease()
            .await
            .map_err(|reason| format!("export {name:?}: {reason}"))?;
        Ok((export, store, hold))
    }

    /// `snapshot create EXPORT SNAP`.
    pub async fn snapshot_create(
        &self,
        export: &str,
        snapshot: &str,
    ) -> Result<ExportSnapshot, String> {
        check_snapshot_name(snapshot)?;
        let (_, store, _lease) = self.leased(export).await?;
        let snapshot = store
            .create_snapshot(snapshot)
            .await
            .map_err(|e| refused(export, e))?;
        Ok(ExportSnapshot {
            export: export.to_owned(),
            snapshot,
            clones: Vec::new(),
        })
    }

    /// `snapshot list [EXPORT]`: every served export's snapshots, or one export's.
    pub async fn snapshot_list(&self, export: Option<&str>) -> Result<Vec<ExportSnapshot>, String> {
        let stores: Vec<(String, Arc<BlockStore>)> = match export {
            Some(name) => vec![(name.to_owned(), self.served(name)?.1)],
            None => self
                .registry
                .list()
                .iter()
                .filter_map(|e| Some((e.name().to_owned(), Arc::clone(e.store()?))))
                .collect(),
        };
        let mut out = Vec::new();
        for (export, store) in stores {
            let snapshots = store.snapshots().await;
            if snapshots.is_empty() {
                continue;
            }
            let mut clones = store.clones().await.map_err(|e| refused(&export, e))?;
            for snapshot in snapshots {
                out.push(ExportSnapshot {
                    export: export.clone(),
                    clones: clones.remove(&snapshot.name).unwrap_or_default(),
                    snapshot,
                });
            }
        }
        Ok(out)
    }

    /// `snapshot delete EXPORT SNAP`: refused while clients read the snapshot's export (the
    /// store counts them and keeps new ones out while it deletes). Returns how many objects
    /// were deleted.
    pub async fn snapshot_delete(&self, export: &str, snapshot: &str) -> Result<u64, String> {
        let (_, store, _lease) = self.leased(export).await?;
        store
            .delete_snapshot(snapshot)
            .await
            .map_err(|e| refused(export, e))
    }

    /// `snapshot rollback EXPORT SNAP`: refused while clients are attached to EXPORT (the
    /// store counts them and keeps new ones out while it rolls back). Returns how many
    /// objects were deleted.
    pub async fn snapshot_rollback(&self, export: &str, snapshot: &str) -> Result<u64, String> {
        let (_, store, _lease) = self.leased(export).await?;
        store
            .rollback(snapshot)
            .await
            .map_err(|e| refused(export, e))
    }

    /// `flatten EXPORT`: a clone copies what it reads from its base, then needs it no more.
    /// Returns how many blocks were copied.
    pub async fn flatten(&self, export: &str) -> Result<u64, String> {
        let (_, store, _lease) = self.leased(export).await?;
        store.flatten().await.map_err(|e| refused(export, e))
    }

    /// `gc EXPORT`: deletes objects nothing needs; returns how many.
    pub async fn gc(&self, export: &str) -> Result<u64, String> {
        let (_, store, _lease) = self.leased(export).await?;
        store.gc().await.map_err(|e| refused(export, e))
    }
}

/// A store error as the admin reads it.
fn refused(export: &str, e: StoreError) -> String {
    match e {
        StoreError::Refused(why) => format!("export {export:?}: {why}"),
        StoreError::Fenced(why) => format!(
            "export {export:?}: this daemon does not hold the export lease ({why}); only the lease holder changes snapshots"
        ),
        other => format!("export {export:?}: {other}"),
    }
}

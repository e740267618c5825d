//! `<prefix>nbd-s3.json`: the export's self-description. It pins the block size, because data
//! written with one block size is garbage when read with another, and the codec (compression,
//! encryption algorithm and key fingerprint), because blocks written with one cannot be read
//! with another. Format 2 — once the export has a snapshot, or from the start when it has a
//! codec — records its layers, snapshots and codec; older daemons refuse it instead of
//! misreading the blocks. Every rewrite is conditional (`If-Match` on the version read), so
//! two writers can never lose each other's change.

use super::codec;
use super::layers::BASE;
use super::{BlockStoreConfig, StoreError};
use crate::backend::{BackendError, DynObjectStore, ETag};
use crate::config::{CodecConfig, Compression};
use crate::retry::Policy;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Name of the manifest object under the export's prefix.
pub(crate) const MANIFEST_NAME: &str = "nbd-s3.json";

/// The plain layout: blocks at `<prefix><block>`, nothing else.
pub(crate) const FORMAT_PLAIN: u32 = 1;
/// Layers and snapshots, or encoded blocks (old daemons refuse it rather than misread the
/// blocks).
pub(crate) const FORMAT_LAYERED: u32 = 2;

/// The JSON document stored in the manifest object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub format: u32,
    pub block_size: u64,
    pub size: u64,
    #[serde(default)]
    pub created: String,
    /// The export's identity: 32 lowercase hex digits, random, written at creation (or the
    /// first time a feature needs it for an older manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Format 2: the layer writes go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
    /// Format 2: every layer and its parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerRecord>,
    /// Format 2: the next unused layer number (numbers are never reused: a layer's leftover
    /// objects must not come back to life in a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_layer: Option<u64>,
    /// Format 2: the snapshots, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRecord>,
    /// Format 2: `compression` as `zstd:LEVEL`; absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Format 2: the cipher and its key's fingerprint; absent: blocks in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Format 2, a clone: the snapshot of another export it reads through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRecord>,
    /// Format 2: the clones based on this export's snapshots (they must be kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<CloneRecord>,
    /// Fields this version does not know, kept as they are when the manifest is rewritten.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `encryption` in the manifest. Never the key: a keyed hash that tells a wrong key at open.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Encryption {
    pub algorithm: String,
    pub key_fingerprint: String,
    /// The identity bound into this export's blocks when it is not its own `id`: a clone
    /// seals with its base's, so the base's blocks it reads, and the copies flatten makes of
    /// them, open like its own writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// One layer of a format-2 manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct LayerRecord {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
}

/// What a clone depends on: a snapshot of another export, with the layers it reads through
/// (numbered as in the base's manifest), so the clone keeps working if the base export leaves
/// the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BaseRecord {
    pub export: String,
    pub snapshot: String,
    pub bucket: String,
    pub prefix: String,
    /// The base's identity (its encrypted blocks are bound to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The base's layers, top (the snapshot's layer) first.
    pub layers: Vec<LayerRecord>,
}

/// A clone based on one of this export's snapshots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct CloneRecord {
    pub export: String,
    pub snapshot: String,
    pub bucket: String,
    pub prefix: String,
}

/// One snapshot: the frozen layer it reads through, when it was taken and the export's size
/// then.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SnapshotRecord {
    pub name: String,
    pub layer: u64,
    pub created: String,
    pub size: u64,
}

impl Manifest {
    /// A new export's manifest.
    pub fn new(cfg: &BlockStoreConfig) -> Manifest {
        let codec = &cfg.codec;
        let compression =
            (codec.compression != Compression::Off).then(|| codec.compression.to_string());
        let encryption = codec.encryption.as_ref().map(|k| Encryption {
            algorithm: codec::ALGORITHM.to_string(),
            key_fingerprint: codec::fingerprint(k.expose()),
            identity: None,
        });
        Manifest {
            format: if codec.is_plain() {
                FORMAT_PLAIN
            } else {
                FORMAT_LAYERED
            },
            block_size: u64::from(cfg.block_size),
            size: cfg.size,
            created: now_rfc3339(),
            id: Some(new_id()),
            head: None,
            layers: Vec::new(),
            next_layer: None,
            snapshots: Vec::new(),
            compression,
            encryption,
            base: None,
            clones: Vec::new(),
            other: serde_json::Map::new(),
        }
    }

    /// The identity encrypted blocks are bound to (see [`Encryption::identity`]).
    pub fn data_id(&self) -> Option<String> {
        let inherited = self.encryption.as_ref().and_then(|e| e.identity.clone());
        inherited.or_else(|| self.id.clone())
    }

    /// Makes this (new clone's) manifest seal blocks like its base, whose data identity is
    /// `base_id`.
    pub fn inherit_identity(&mut self, base_id: Option<String>) {
        if let Some(e) = self.encryption.as_mut() {
            e.identity = base_id;
        }
    }

    /// Refuses a configuration whose codec differs from the one the blocks were written with.
    pub fn check_codec(&self, codec: &CodecConfig) -> Result<(), StoreError> {
        let stored = self.compression.as_deref().unwrap_or("off");
        let configured = codec.compression.to_string();
        if stored != configured {
            return Err(StoreError::CodecMismatch {
                setting: "compression",
                stored: stored.to_string(),
                configured,
            });
        }
        let name = |on: bool, e: Option<&Encryption>| match (on, e) {
            (_, Some(e)) => e.algorithm.clone(),
            (true, None) => codec::ALGORITHM.to_string(),
            (false, None) => "off".to_string(),
        };
        match (&self.encryption, &codec.encryption) {
            (Some(e), Some(key)) if e.algorithm == codec::ALGORITHM => {
                let configured = codec::fingerprint(key.expose());
                if e.key_fingerprint != configured {
                    return Err(StoreError::WrongKey {
                        key_file: key.path().display().to_string(),
                        stored: e.key_fingerprint.clone(),
                        configured,
                    });
                }
                Ok(())
            }
            (None, None) => Ok(()),
            (stored, configured) => Err(StoreError::CodecMismatch {
                setting: "encryption",
                stored: name(false, stored.as_ref()),
                configured: name(configured.is_some(), None),
            }),
        }
    }

    /// Every layer with its parent (format 1: layer 0 alone).
    /// Every layer of this export with its parent (format 1: layer 0 alone).
    pub fn parents(&self) -> BTreeMap<u64, Option<u64>> {
        if self.layers.is_empty() {
            return BTreeMap::from([(0, None)]);
        }
        self.layers.iter().map(|l| (l.id, l.parent)).collect()
    }

    /// Takes the layers `gone` out of the tree: each child of one is re-parented to the
    /// nearest ancestor that stays. Only for layers no snapshot reads and that hold no
    /// object, so every read resolves as before.
    pub fn splice_out(&mut self, gone: &BTreeSet<u64>) {
        let parents = self.parents();
        let keep = |mut p: Option<u64>| {
            while let Some(l) = p.filter(|l| gone.contains(l)) {
                p = parents.get(&l).copied().flatten();
            }
            p
        };
        self.layers.retain(|l| !gone.contains(&l.id));
        for l in &mut self.layers {
            l.parent = keep(l.parent);
        }
    }

    /// `parents`, plus a clone's base layers (marked `BASE`) under its root layer.
    pub fn all_parents(&self) -> BTreeMap<u64, Option<u64>> {
        let mut parents = self.parents();
        let Some(base) = &self.base else {
            return parents;
        };
        let Some(top) = base.layers.first() else {
            return parents;
        };
        for parent in parents.values_mut() {
            if parent.is_none() {
                *parent = Some(top.id | BASE);
            }
        }
        for l in &base.layers {
            parents.insert(l.id | BASE, l.parent.map(|p| p | BASE));
        }
        parents
    }

    /// The layer writes go to.
    pub fn head(&self) -> u64 {
        self.head.unwrap_or(0)
    }

    /// Turns a plain manifest into a layered one (idempotent): layer 0 is the plain keys.
    pub fn make_layered(&mut self) {
        // A codec export is format 2 from the start, without layers until its first snapshot.
        if !self.layers.is_empty() {
            return;
        }
        self.format = FORMAT_LAYERED;
        self.head = Some(0);
        self.layers = vec![LayerRecord {
            id: 0,
            parent: None,
        }];
        self.next_layer = Some(1);
        if self.id.is_none() {
            self.id = Some(new_id());
        }
    }

    /// Takes a fresh layer number.
    pub fn take_layer(&mut self) -> u64 {
        // `check` keeps every number below `layers::BASE`; saturating, the worst a manifest
        // near the limit can do is fail its next `check` (refused), never wrap and reuse a
        // layer.
        let max = self.layers.iter().map(|l| l.id).max().unwrap_or(0);
        let next = self.next_layer.unwrap_or(1).max(max.saturating_add(1));
        self.next_layer = Some(next.saturating_add(1));
        next
    }

    /// The snapshot named `name`.
    pub fn snapshot(&self, name: &str) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    fn check(&self, key: &str) -> Result<(), StoreError> {
        let bad = |m: String| StoreError::BadManifest(format!("{key}: {m}"));
        let bs = self.block_size;
        if !bs.is_power_of_two() || bs > 8 << 20 {
            return Err(bad(format!(
                "block size {bs} is not a power of two up to 8MiB"
            )));
        }
        match self.format {
            FORMAT_PLAIN => Ok(()),
            FORMAT_LAYERED => {
                let parents = self.parents();
                // Own layer numbers stay below the bit that marks a clone's base layers, so
                // taking the next one can neither wrap nor collide with them.
                let mut numbers = self.layers.iter().map(|l| l.id).chain(self.next_layer);
                if numbers.any(|n| n & super::layers::BASE != 0) {
                    return Err(bad("layer number out of range".into()));
                }
                let all = self.all_parents();
                every_chain_resolves(&all).map_err(bad)?;
                super::layers::chain_of(&all, self.head()).map_err(bad)?;
                let mut names = std::collections::BTreeSet::new();
                for s in &self.snapshots {
                    if !parents.contains_key(&s.layer) {
                        let msg = format!("snapshot {:?} names unknown layer {}", s.name, s.layer);
                        return Err(bad(msg));
                    }
                    if s.layer == self.head() {
                        let msg = format!("snapshot {:?} names the head layer", s.name);
                        return Err(bad(msg));
                    }
                    if !names.insert(&s.name) {
                        return Err(bad(format!("snapshot {:?} named twice", s.name)));
                    }
                }
                Ok(())
            }
            other => Err(bad(format!("unsupported format {other}"))),
        }
    }
}

/// Every layer's chain ends at a root: no unknown parent, no cycle. Linear in the number of
/// layers (a layer whose chain was walked once is not walked again).
fn every_chain_resolves(parents: &BTreeMap<u64, Option<u64>>) -> Result<(), String> {
    let mut good = std::collections::BTreeSet::new();
    for &layer in parents.keys() {
        let mut path = Vec::new();
        let mut at = Some(layer);
        while let Some(l) = at {
            if good.contains(&l) {
                break;
            }
            if path.len() > parents.len() {
                return Err(format!("layer {l} is part of a cycle"));
            }
            let parent = parents
                .get(&l)
                .ok_or_else(|| format!("layer {l} is not listed"))?;
            path.push(l);
            at = *parent;
        }
        good.extend(path);
    }
    Ok(())
}

/// 32 random lowercase hex digits.
fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Now as RFC 3339 (seconds).
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The manifest's key.
pub(crate) fn key(prefix: &str) -> String {
    format!("{prefix}{MANIFEST_NAME}")
}

fn parse(key: &str, raw: &[u8]) -> Result<Manifest, StoreError> {
    let m: Manifest =
        serde_json::from_slice(raw).map_err(|e| StoreError::BadManifest(format!("{key}: {e}")))?;
    m.check(key)?;
    Ok(m)
}

/// Reads the manifest (writing it when absent and writable) and checks the block size.
/// Returns the manifest in effect (`None` for a read-only export that has none).
pub(crate) async fn check_or_create(
    objects: &DynObjectStore,
    cfg: &BlockStoreConfig,
    buckets: &dyn super::Buckets,
) -> Result<Option<Manifest>, StoreError> {
    let key = key(&cfg.prefix);
    // A second round only when another daemon created the manifest between our GET and PUT.
    for _ in 0..2 {
        if let Some(found) = read_or_create(objects, cfg, &key, buckets).await? {
            return Ok(found);
        }
    }
    Err(StoreError::BadManifest(format!(
        "{key}: created by someone else but cannot be read back"
    )))
}

/// One round of [`check_or_create`]: `None` when another writer created the manifest first.
async fn read_or_create(
    objects: &DynObjectStore,
    cfg: &BlockStoreConfig,
    key: &str,
    buckets: &dyn super::Buckets,
) -> Result<Option<Option<Manifest>>, StoreError> {
    Ok(Some(match retry(|| objects.get(key)).await? {
        Some(raw) => {
            let m = parse(key, &raw)?;
            // A clone's block size is its base's; the file may no longer say which.
            let clone = cfg.base.is_some();
            if m.block_size != u64::from(cfg.block_size) && !clone {
                return Err(StoreError::BlockSizeMismatch {
                    stored: u32::try_from(m.block_size).unwrap_or(u32::MAX),
                    configured: cfg.block_size,
                });
            }
            m.check_codec(&cfg.codec)?;
            Some(m)
        }
        None if cfg.read_only => None,
        None if cfg.base.is_some() => Some(super::clone::create(objects, cfg, buckets).await?),
        None => {
            let m = Manifest::new(cfg);
            let body = encode(&m)?;
            // Create-only: written at open, before any client holds the export lease, so
            // two daemons opening a new export at once must not both write it.
            let created = retry(|| async {
                match objects.put_if_absent(key, body.clone()).await {
                    // Stores without conditional writes (lease = "off"): a plain PUT.
                    Err(BackendError::Unsupported(_)) => objects
                        .put(key, body.clone())
                        .await
                        .map(|()| Some(String::new())),
                    other => other,
                }
            })
            .await?;
            if created.is_none() {
                return Ok(None);
            }
            tracing::info!(key = %key, block_size = cfg.block_size, "wrote export manifest");
            Some(m)
        }
    }))
}

pub(crate) fn encode(m: &Manifest) -> Result<Bytes, StoreError> {
    serde_json::to_vec_pretty(m)
        .map(Bytes::from)
        .map_err(|e| StoreError::BadManifest(e.to_string()))
}

/// The manifest with its version tag, for a conditional rewrite. Stores without conditional
/// reads (used with `lease = "off"`, where one daemon is promised) give no tag.
pub(crate) async fn read(
    objects: &DynObjectStore,
    prefix: &str,
) -> Result<(Manifest, Option<ETag>), StoreError> {
    let key = key(prefix);
    let found = match retry(|| objects.get_with_etag(&key)).await {
        Ok(found) => found.map(|(raw, tag)| (raw, Some(tag))),
        Err(BackendError::Unsupported(_)) => retry(|| objects.get(&key)).await?.map(|r| (r, None)),
        Err(e) => return Err(e.into()),
    };
    let Some((raw, tag)) = found else {
        return Err(StoreError::BadManifest(format!("{key} is missing")));
    };
    Ok((parse(&key, &raw)?, tag))
}

/// Replaces the manifest if it is still the version `tag` read. A reply lost on the way is
/// retried by the backend, and the retry then meets our own write: a refusal is checked by
/// reading the manifest back. Any other failure leaves it unknown whether the write landed
/// (the first PUT may have been applied and only its reply lost); callers change their
/// in-memory state only on `Ok`, so the outcome is settled by reading the manifest back:
/// `Ok` exactly when S3 holds what we wrote.
pub(crate) async fn write(
    objects: &DynObjectStore,
    prefix: &str,
    m: &Manifest,
    tag: Option<&str>,
) -> Result<(), StoreError> {
    let key = key(prefix);
    let body = encode(m)?;
    match put(objects, &key, &body, tag).await {
        Ok(()) => Ok(()),
        Err(StoreError::Conflict(why)) => Err(StoreError::Conflict(why)),
        Err(unknown) => settle(objects, &key, &body, unknown).await,
    }
}

/// Reads the manifest back after a write whose outcome is unknown, until it can be read:
/// giving up would leave memory and S3 disagreeing about the head layer, which loses
/// flushed writes. `Ok` if S3 holds `body`, else the write's own error.
async fn settle(
    objects: &DynObjectStore,
    key: &str,
    body: &Bytes,
    unknown: StoreError,
) -> Result<(), StoreError> {
    tracing::warn!(key, error = %unknown, "manifest write failed; reading it back to see whether it landed");
    let warn = |e: &BackendError, _, _| {
        tracing::warn!(key, error = %e, "cannot read the manifest back yet; retrying");
    };
    let now = Policy::MANIFEST_SETTLE
        .run_observed(|| objects.get(key), warn)
        .await?;
    if now.as_deref() == Some(&body[..]) {
        tracing::info!(key, "the manifest write landed");
        return Ok(());
    }
    Err(unknown)
}

/// One conditional (or, on a store without conditions, plain) manifest PUT.
async fn put(
    objects: &DynObjectStore,
    key: &str,
    body: &Bytes,
    tag: Option<&str>,
) -> Result<(), StoreError> {
    let Some(tag) = tag else {
        retry(|| objects.put(key, body.clone())).await?;
        return Ok(());
    };
    match retry(|| objects.put_if_match(key, body.clone(), tag)).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => {
            let now = retry(|| objects.get(key)).await?;
            if now.as_deref() == Some(&body[..]) {
                return Ok(());
            }
            Err(StoreError::Conflict(format!(
                "{key} was changed by someone else meanwhile; nothing was done, try again"
            )))
        }
        Err(BackendError::Unsupported(_)) => {
            retry(|| objects.put(key, body.clone())).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Bounded retries for the calls made while opening an export: a transient fault at start-up
/// should not refuse the export, a persistent one should.
pub(crate) async fn retry<T, F, Fut>(op: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let warn =
        |e: &BackendError, _, _| tracing::warn!(error = %e, "object store call failed; retrying");
    Policy::MANIFEST.run_observed(op, warn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_manifests_stay_format_1_and_unknown_fields_survive() {
        let raw = br#"{"format":1,"block_size":4096,"size":8192,"created":"x","codec":"zstd"}"#;
        let mut m = parse("k", raw).expect("parse");
        assert_eq!(m.parents(), BTreeMap::from([(0, None)]));
        let text = String::from_utf8(encode(&m).expect("encode").to_vec()).expect("utf8");
        assert!(!text.contains("layers") && text.contains("codec"), "{text}");
        m.make_layered();
        assert_eq!(
            (m.format, m.head(), m.take_layer(), m.take_layer()),
            (2, 0, 1, 2)
        );
        assert_eq!(m.id.as_ref().map(String::len), Some(32));
        let again = parse("k", &encode(&m).expect("encode")).expect("reparse");
        assert_eq!(again, m);
    }

    #[test]
    fn unknown_formats_and_broken_chains_are_refused() {
        for raw in [
            r#"{"format":3,"block_size":4096,"size":8192}"#,
            r#"{"format":2,"block_size":4096,"size":8192,"head":5,"layers":[{"id":0}]}"#,
            r#"{"format":2,"block_size":4096,"size":8192,"head":0,"layers":[{"id":0}],
                "snapshots":[{"name":"a","layer":9,"created":"x","size":1}]}"#,
            // A number that would wrap when the next layer is taken.
            r#"{"format":2,"block_size":4096,"size":8192,"head":0,"layers":[{"id":0}],
                "next_layer":18446744073709551615}"#,
            r#"{"format":2,"block_size":4096,"size":8192,"head":0,
                "layers":[{"id":0},{"id":18446744073709551615,"parent":0}]}"#,
            // A snapshot on the head layer would change with every write.
            r#"{"format":2,"block_size":4096,"size":8192,"head":0,"layers":[{"id":0}],
                "snapshots":[{"name":"a","layer":0,"created":"x","size":1}]}"#,
            // Two snapshots of one name.
            r#"{"format":2,"block_size":4096,"size":8192,"head":2,
                "layers":[{"id":0},{"id":1,"parent":0},{"id":2,"parent":1}],
                "snapshots":[{"name":"a","layer":0,"created":"x","size":1},
                             {"name":"a","layer":1,"created":"x","size":1}]}"#,
            // A layer off the head chain whose parent is unknown.
            r#"{"format":2,"block_size":4096,"size":8192,"head":0,
                "layers":[{"id":0},{"id":3,"parent":7}]}"#,
        ] {
            let err = parse("k", raw.as_bytes()).expect_err(raw);
            assert!(matches!(err, StoreError::BadManifest(_)), "{err}");
        }
    }
}

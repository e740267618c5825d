//! Copy-on-write layers: which layer holds each block of an export that has snapshots.
//!
//! An export's blocks live in layers. Layer 0 is the plain keys (`<prefix><block>`), so an
//! export that never had a snapshot keeps the plain layout. A snapshot freezes the layer
//! written so far and starts a new head layer on top of it: keys
//! `<prefix>layers/<layer>/<block>` (16 hex digits each). A block reads from the first layer
//! of the chain (head, its parent, …, layer 0) that has it; a block zeroed while a lower layer
//! still holds data gets a tombstone in the head, `<prefix>layers/<layer>/<block>.zero`, which
//! hides the lower data. Tombstones are separate keys, not empty objects, so one LIST (which
//! gives keys, not sizes) tells data from tombstones; when a crash leaves both in one layer,
//! the tombstone wins (every change writes the new object before removing the old one, and
//! a tombstone is the only change that adds one while data exists).
//!
//! Everything here is pure bookkeeping over presence bitmaps, built from one LIST at open and
//! kept current by write-back; what may be deleted when snapshots go (`garbage`) and what each
//! snapshot alone holds (`held_only_by`) are answered from the same maps.

use super::objects::parse_block_key;
use super::presence::Presence;
use std::collections::{BTreeMap, BTreeSet};

/// A clone reads its base export's layers too; in the clone they are numbered as in the base,
/// with this bit set, so the two numberings never meet.
pub(crate) const BASE: u64 = 1 << 63;

/// Folder of the layered keys under the export's prefix.
const LAYERS_DIR: &str = "layers/";
/// Suffix of a tombstone key.
const TOMB_SUFFIX: &str = ".zero";

/// The key of block `block` in layer `layer` (layer 0: the plain key).
pub(crate) fn data_key(prefix: &str, layer: u64, block: u64) -> String {
    if layer == 0 {
        super::objects::block_key(prefix, block)
    } else {
        format!("{prefix}{LAYERS_DIR}{layer:016x}/{block:016x}")
    }
}

/// The tombstone key of block `block` in layer `layer` (never layer 0: nothing lies below it).
pub(crate) fn tomb_key(prefix: &str, layer: u64, block: u64) -> String {
    format!("{prefix}{LAYERS_DIR}{layer:016x}/{block:016x}{TOMB_SUFFIX}")
}

/// A key after every key of layer `layer` (0: the plain block keys, 16 hex digits) and
/// before the next layer's: where a listing's range for that layer ends.
pub(crate) fn layer_end(prefix: &str, layer: u64) -> String {
    match layer {
        0 => format!("{prefix}g"),
        _ => format!("{prefix}{LAYERS_DIR}{layer:016x}/g"),
    }
}

/// Block keys that cut the keys after `after` up to `upto` into at most `parts` ranges, in
/// order and strictly between the two: with `step`, of `step` blocks, then twice as many at
/// each cut (a listing goes on at the density it saw, and where the keys end only a few
/// ranges come back empty), the last taking the rest; without, of equal size. None unless
/// `after` is a block key or tombstone and `upto` one of the same layer, that layer's end or
/// open (those two standing for block `blocks`): a key of another form says nothing of
/// where blocks lie.
pub(crate) fn cuts(
    prefix: &str,
    after: &str,
    upto: Option<&str>,
    blocks: u64,
    parts: u64,
    step: Option<u64>,
) -> Vec<String> {
    let Some(from) = parse_key(prefix, after) else {
        return Vec::new();
    };
    let to = match upto {
        None => blocks,
        Some(u) if u == layer_end(prefix, from.layer) => blocks,
        Some(u) => match parse_key(prefix, u) {
            Some(k) if k.layer == from.layer => k.block,
            _ => return Vec::new(),
        },
    };
    // Every cut lies past `from.block` (and its tombstone) and before `to`.
    let span = to.saturating_sub(from.block);
    let offsets: Vec<u64> = match step {
        Some(step) => std::iter::successors(Some(step.max(1)), |o| {
            o.checked_mul(2)?.checked_add(step.max(1))
        })
        .take_while(|&o| o < span)
        .take(usize::try_from(parts.saturating_sub(1)).unwrap_or(0))
        .collect(),
        None => {
            let parts = parts.min(span).max(1);
            (1..parts).map(|k| span / parts * k).collect()
        }
    };
    let key = |offset: u64| {
        Some(data_key(
            prefix,
            from.layer,
            from.block.checked_add(offset)?,
        ))
    };
    offsets.into_iter().filter_map(key).collect()
}

/// What a listed key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerKey {
    pub layer: u64,
    pub block: u64,
    pub tomb: bool,
}

fn hex16(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Parses a listed key: a plain block key (layer 0), a layered block key or a tombstone.
/// Anything else under the prefix (manifest, lease, foreign files) is `None`.
pub(crate) fn parse_key(prefix: &str, key: &str) -> Option<LayerKey> {
    if let Some(block) = parse_block_key(prefix, key) {
        return Some(LayerKey {
            layer: 0,
            block,
            tomb: false,
        });
    }
    let rest = key.strip_prefix(prefix)?.strip_prefix(LAYERS_DIR)?;
    let (layer, name) = rest.split_once('/')?;
    let layer = hex16(layer).filter(|l| *l != 0)?;
    let (name, tomb) = match name.strip_suffix(TOMB_SUFFIX) {
        Some(n) => (n, true),
        None => (name, false),
    };
    Some(LayerKey {
        layer,
        block: hex16(name)?,
        tomb,
    })
}

/// The blocks one layer holds: data objects and tombstones.
#[derive(Debug, Default)]
pub(crate) struct Bits {
    pub data: Presence,
    pub tomb: Presence,
}

impl Bits {
    fn copy(&self) -> Bits {
        Bits {
            data: self.data.copy(),
            tomb: self.tomb.copy(),
        }
    }
}

/// What reading a block through a chain finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// The block's data is the object in this layer.
    Data(u64),
    /// A tombstone in this layer hides everything below: zeros.
    Tomb(u64),
    /// No layer of the chain has it: zeros.
    Nothing,
}

/// Every layer of an export with its parent, the blocks each holds, and the chain reads use.
#[derive(Debug)]
pub(crate) struct Layers {
    /// Parent of each layer (`None` for the root).
    parents: BTreeMap<u64, Option<u64>>,
    bits: BTreeMap<u64, Bits>,
    /// The chain reads resolve through, top first; writes go to `chain[0]`.
    chain: Vec<u64>,
    /// Bumped by every change of the bits or the chain (what snapshot accounting remembers
    /// its last answer by).
    generation: std::sync::atomic::AtomicU64,
}

impl Layers {
    /// The plain, single-layer export.
    pub fn plain() -> Layers {
        Self::new(BTreeMap::from([(0, None)]), 0).unwrap_or_else(|_| Layers {
            parents: BTreeMap::from([(0, None)]),
            bits: BTreeMap::new(),
            chain: vec![0],
            generation: Default::default(),
        })
    }

    /// Layers with these parents, reading (and writing) through `top`. `Err` names what is
    /// inconsistent (an unknown layer, a cycle).
    pub fn new(parents: BTreeMap<u64, Option<u64>>, top: u64) -> Result<Layers, String> {
        let chain = chain_of(&parents, top)?;
        Ok(Layers {
            bits: parents.keys().map(|l| (*l, Bits::default())).collect(),
            parents,
            chain,
            generation: Default::default(),
        })
    }

    /// Records the listed keys; keys of layers not in the manifest are left out (garbage a
    /// crash left behind, found again by `garbage`).
    pub fn load<'a>(&mut self, prefix: &str, keys: impl IntoIterator<Item = &'a str>) {
        for key in keys {
            if let Some(k) = parse_key(prefix, key) {
                if let Some(bits) = self.bits.get(&k.layer) {
                    let set = if k.tomb { &bits.tomb } else { &bits.data };
                    set.set(k.block, true);
                }
            }
        }
    }

    /// Records the listed keys of a clone's base export (its layers carry [`BASE`]).
    pub fn load_base<'a>(&mut self, prefix: &str, keys: impl IntoIterator<Item = &'a str>) {
        for key in keys {
            if let Some(k) = parse_key(prefix, key) {
                if let Some(bits) = self.bits.get(&(k.layer | BASE)) {
                    let set = if k.tomb { &bits.tomb } else { &bits.data };
                    set.set(k.block, true);
                }
            }
        }
    }

    /// Blocks a read of the base export's layers finds as data, with the base layer (in the
    /// base's numbering) holding each: what flatten copies.
    pub fn base_blocks(&self) -> Vec<(u64, u64)> {
        let base: Vec<u64> = self
            .chain
            .iter()
            .copied()
            .filter(|l| l & BASE != 0)
            .collect();
        let mut out = BTreeMap::new();
        for layer in &base {
            if let Some(b) = self.bits.get(layer) {
                b.data.for_each(|block| {
                    if resolve_in(&self.bits, &base, block) == Found::Data(*layer) {
                        out.insert(block, layer & !BASE);
                    }
                });
            }
        }
        out.into_iter().collect()
    }

    /// After flatten: `flat` (holding copies of every base block) replaces the base layers
    /// under the root of the export's own layers.
    pub fn replace_base(&mut self, flat: u64, copied: &[u64]) -> Result<(), String> {
        self.changed();
        let mut parents: BTreeMap<u64, Option<u64>> = self
            .parents
            .iter()
            .filter(|(l, _)| **l & BASE == 0)
            .map(|(l, p)| (*l, p.filter(|p| p & BASE == 0)))
            .collect();
        for parent in parents.values_mut() {
            if parent.is_none() {
                *parent = Some(flat);
            }
        }
        parents.insert(flat, None);
        self.chain = chain_of(&parents, self.head())?;
        self.bits.retain(|l, _| l & BASE == 0);
        let bits = Bits::default();
        for block in copied {
            bits.data.set(*block, true);
        }
        self.bits.insert(flat, bits);
        self.parents = parents;
        Ok(())
    }

    fn changed(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Changes so far: equal numbers mean equal bits and chain.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A copy to count on without holding the lock the store keeps the layers under.
    pub fn copy(&self) -> Layers {
        Layers {
            parents: self.parents.clone(),
            bits: self.bits.iter().map(|(l, b)| (*l, b.copy())).collect(),
            chain: self.chain.clone(),
            generation: Default::default(),
        }
    }

    /// Objects stored only because snapshots read them: data the live export does not read
    /// where it lies, but a snapshot (reading through a layer of `snapshots`) does. What
    /// deleting every snapshot would free; a clone's base blocks are its base's to free.
    pub fn held_by_snapshots(&self, snapshots: &BTreeSet<u64>) -> u64 {
        let chains: Vec<Vec<u64>> = snapshots
            .iter()
            .filter_map(|s| chain_of(&self.parents, *s).ok())
            .collect();
        let mut count = 0;
        for (layer, bits) in self.bits.iter().filter(|(l, _)| **l & BASE == 0) {
            let here = Found::Data(*layer);
            bits.data.for_each(|block| {
                if self.resolve(block) != here
                    && chains
                        .iter()
                        .any(|c| c.contains(layer) && resolve_in(&self.bits, c, block) == here)
                {
                    count += 1;
                }
            });
        }
        count
    }

    /// Whether the export has layers (snapshots, rollbacks, a clone's base), not just its
    /// plain one.
    pub fn is_layered(&self) -> bool {
        self.parents.len() > 1
    }

    /// The layer writes go to.
    pub fn head(&self) -> u64 {
        self.chain[0]
    }

    /// The chain reads resolve through, top first.
    #[cfg(test)]
    pub fn chain(&self) -> &[u64] {
        &self.chain
    }

    /// Where a read of `block` through the chain finds it.
    pub fn resolve(&self, block: u64) -> Found {
        resolve_in(&self.bits, &self.chain, block)
    }

    /// Where a read of `block` finds it below the head (what a tombstone would hide).
    pub fn resolve_below(&self, block: u64) -> Found {
        resolve_in(&self.bits, &self.chain[1..], block)
    }

    /// Whether `layer` holds data and a tombstone for `block`.
    pub fn has(&self, layer: u64, block: u64) -> (bool, bool) {
        self.bits
            .get(&layer)
            .map_or((false, false), |b| (b.data.get(block), b.tomb.get(block)))
    }

    /// Records what `layer` now holds for `block`.
    pub fn set(&self, layer: u64, block: u64, data: bool, tomb: bool) {
        self.changed();
        if let Some(b) = self.bits.get(&layer) {
            b.data.set(block, data);
            b.tomb.set(block, tomb);
        }
    }

    /// Records that an object of a frozen layer was deleted (garbage collection).
    pub fn forget(&self, key: LayerKey) {
        self.changed();
        if let Some(b) = self.bits.get(&key.layer) {
            let set = if key.tomb { &b.tomb } else { &b.data };
            set.set(key.block, false);
        }
    }

    /// Which blocks read as data through the chain (the presence map of reads and block
    /// status).
    pub fn effective(&self) -> Presence {
        let out = Presence::default();
        for layer in self.chain.iter().rev() {
            if let Some(b) = self.bits.get(layer) {
                b.data.for_each(|block| out.set(block, true));
                b.tomb.for_each(|block| out.set(block, false));
            }
        }
        out
    }

    /// Layers that can leave the tree: neither the head nor a root nor read directly by a
    /// snapshot (`snapshots`), and holding no object. Splicing them out changes no read.
    /// A clone's base layers are its base's.
    pub fn prunable(&self, snapshots: &BTreeSet<u64>) -> BTreeSet<u64> {
        self.parents
            .iter()
            .filter(|(l, p)| {
                **l != self.head()
                    && p.is_some()
                    && **l & BASE == 0
                    && !snapshots.contains(l)
                    && self
                        .bits
                        .get(l)
                        .map_or(true, |b| b.data.count() == 0 && b.tomb.count() == 0)
            })
            .map(|(l, _)| *l)
            .collect()
    }

    /// Takes the layers `gone` (from [`Layers::prunable`]) out, as the manifest did.
    pub fn splice_out(&mut self, gone: &BTreeSet<u64>) -> Result<(), String> {
        if gone.is_empty() {
            return Ok(());
        }
        self.changed();
        let old = self.parents.clone();
        let keep = |mut p: Option<u64>| {
            while let Some(l) = p.filter(|l| gone.contains(l)) {
                p = old.get(&l).copied().flatten();
            }
            p
        };
        let parents: BTreeMap<u64, Option<u64>> = old
            .iter()
            .filter(|(l, _)| !gone.contains(l))
            .map(|(l, p)| (*l, keep(*p)))
            .collect();
        self.chain = chain_of(&parents, self.head())?;
        self.parents = parents;
        self.bits.retain(|l, _| !gone.contains(l));
        Ok(())
    }

    /// Freezes the head: `new` becomes the head, on top of the old one.
    pub fn push_head(&mut self, new: u64) {
        self.changed();
        self.parents.insert(new, Some(self.head()));
        self.bits.insert(new, Bits::default());
        self.chain.insert(0, new);
    }

    /// Starts a new, empty head `new` on top of `parent` (a rollback to the snapshot reading
    /// through `parent`): reads resolve through `parent`'s chain from now on.
    pub fn reroot(&mut self, new: u64, parent: u64) -> Result<(), String> {
        self.changed();
        let mut parents = self.parents.clone();
        parents.insert(new, Some(parent));
        self.chain = chain_of(&parents, new)?;
        self.parents = parents;
        self.bits.insert(new, Bits::default());
        Ok(())
    }

    /// The same layers read through `top` (a snapshot's view); its bits are copies, as frozen
    /// layers no longer change.
    pub fn view(&self, top: u64) -> Result<Layers, String> {
        let chain = chain_of(&self.parents, top)?;
        let bits = chain
            .iter()
            .filter_map(|l| Some((*l, self.bits.get(l)?.copy())))
            .collect();
        Ok(Layers {
            parents: self.parents.clone(),
            bits,
            chain,
            generation: Default::default(),
        })
    }

    /// Objects nothing needs, given the layers that are read from (`referenced`: the head and
    /// every snapshot's layer): in a layer no one reads directly, a block every chain through
    /// it finds elsewhere first; in any layer, data a tombstone of the same layer hides; and
    /// objects of layers the manifest no longer lists. The head layer is never touched (it
    /// changes while this runs). `extra` are listed keys of unknown layers.
    pub fn garbage(&self, referenced: &BTreeSet<u64>, head: u64) -> Vec<LayerKey> {
        let chains: Vec<Vec<u64>> = referenced
            .iter()
            .filter_map(|r| chain_of(&self.parents, *r).ok())
            .collect();
        let mut out = Vec::new();
        for (layer, bits) in &self.bits {
            if *layer == head {
                continue;
            }
            let direct = referenced.contains(layer);
            bits.data.for_each(|block| {
                let hidden = bits.tomb.get(block);
                let needed = !hidden
                    && (direct
                        || chains.iter().any(|c| {
                            c.contains(layer)
                                && resolve_in(&self.bits, c, block) == Found::Data(*layer)
                        }));
                if !needed {
                    out.push(LayerKey {
                        layer: *layer,
                        block,
                        tomb: false,
                    });
                }
            });
            bits.tomb.for_each(|block| {
                let needed = direct
                    || chains.iter().any(|c| {
                        c.contains(layer) && resolve_in(&self.bits, c, block) == Found::Tomb(*layer)
                    });
                if !needed {
                    out.push(LayerKey {
                        layer: *layer,
                        block,
                        tomb: true,
                    });
                }
            });
        }
        out
    }

    /// Blocks that only `top`'s chain reads from where it does: what deleting the snapshot
    /// reading through `top` frees, if nothing else (`others`) reads them there.
    pub fn held_only_by(&self, top: u64, others: &BTreeSet<u64>) -> u64 {
        let Ok(mine) = chain_of(&self.parents, top) else {
            return 0;
        };
        let chains: Vec<Vec<u64>> = others
            .iter()
            .filter(|o| **o != top)
            .filter_map(|o| chain_of(&self.parents, *o).ok())
            .collect();
        let mut count = 0;
        // The base export's blocks are the base's to free, never the clone's.
        for layer in mine.iter().filter(|l| *l & BASE == 0) {
            let Some(bits) = self.bits.get(layer) else {
                continue;
            };
            bits.data.for_each(|block| {
                let here = Found::Data(*layer);
                if resolve_in(&self.bits, &mine, block) == here
                    && !chains
                        .iter()
                        .any(|c| resolve_in(&self.bits, c, block) == here)
                {
                    count += 1;
                }
            });
        }
        count
    }
}

fn resolve_in(bits: &BTreeMap<u64, Bits>, chain: &[u64], block: u64) -> Found {
    for layer in chain {
        if let Some(b) = bits.get(layer) {
            if b.tomb.get(block) {
                return Found::Tomb(*layer);
            }
            if b.data.get(block) {
                return Found::Data(*layer);
            }
        }
    }
    Found::Nothing
}

/// `top`, its parent, …, the root; `Err` for an unknown layer or a cycle.
pub(crate) fn chain_of(parents: &BTreeMap<u64, Option<u64>>, top: u64) -> Result<Vec<u64>, String> {
    let mut chain = Vec::new();
    let mut at = Some(top);
    while let Some(layer) = at {
        if chain.len() > parents.len() {
            return Err(format!("layer {layer} is part of a cycle"));
        }
        let parent = parents
            .get(&layer)
            .ok_or_else(|| format!("layer {layer} is not listed"))?;
        chain.push(layer);
        at = *parent;
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(parents: &[(u64, Option<u64>)], top: u64, keys: &[&str]) -> Layers {
        let mut l = Layers::new(parents.iter().copied().collect(), top).expect("layers");
        l.load("p/", keys.iter().copied());
        l
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(data_key("p/", 0, 42), "p/000000000000002a");
        assert_eq!(
            data_key("p/", 3, 42),
            "p/layers/0000000000000003/000000000000002a"
        );
        assert_eq!(
            tomb_key("p/", 3, 42),
            "p/layers/0000000000000003/000000000000002a.zero"
        );
        for (layer, block, tomb) in [(0, 1, false), (3, 42, false), (3, 42, true)] {
            let key = if tomb {
                tomb_key("p/", layer, block)
            } else {
                data_key("p/", layer, block)
            };
            assert_eq!(parse_key("p/", &key), Some(LayerKey { layer, block, tomb }));
        }
        for bad in [
            "p/nbd-s3.json",
            "p/layers/0000000000000000/0000000000000001",
            "p/layers/000000000000000g/0000000000000001",
            "p/layers/0000000000000001/0000000000000001.tmp",
            "p/layers/0000000000000001",
        ] {
            assert_eq!(parse_key("p/", bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_find_the_first_layer_and_tombstones_hide_lower_data() {
        // 0 <- 1 <- 2 (head). Block 1: only in 0. Block 2: in 0, rewritten in 2. Block 3: in
        // 0, zeroed in 1. Block 4: data and tombstone in 2 (a crash between the two steps).
        let keys = [
            "p/0000000000000001",
            "p/0000000000000002",
            "p/0000000000000003",
            "p/layers/0000000000000002/0000000000000002",
            "p/layers/0000000000000001/0000000000000003.zero",
            "p/layers/0000000000000002/0000000000000004",
            "p/layers/0000000000000002/0000000000000004.zero",
            "p/layers/0000000000000009/0000000000000005",
        ];
        let l = layers(&[(0, None), (1, Some(0)), (2, Some(1))], 2, &keys);
        assert_eq!(l.chain(), [2, 1, 0]);
        assert_eq!(l.resolve(1), Found::Data(0));
        assert_eq!(l.resolve(2), Found::Data(2));
        assert_eq!(l.resolve(3), Found::Tomb(1));
        assert_eq!(l.resolve(4), Found::Tomb(2));
        assert_eq!(l.resolve(5), Found::Nothing, "unknown layer ignored");
        assert_eq!(l.resolve_below(2), Found::Data(0));
        let eff = l.effective();
        assert_eq!(eff.runs(0, 6), vec![(false, 1), (true, 2), (false, 3)]);

        let snap = l.view(0).expect("view");
        assert_eq!(snap.resolve(3), Found::Data(0));
        assert_eq!(snap.resolve(2), Found::Data(0));
        assert!(l.view(7).is_err());
    }

    #[test]
    fn garbage_is_what_no_reader_finds_and_held_only_counts_private_blocks() {
        // Snapshots a (layer 0) and b (layer 1); head 2.
        let keys = [
            "p/0000000000000001",                         // shared by a, b and head
            "p/0000000000000002",                         // a only: rewritten in 1
            "p/layers/0000000000000001/0000000000000002", // b and head
            "p/layers/0000000000000001/0000000000000003", // b only: zeroed in 2
            "p/layers/0000000000000002/0000000000000003.zero",
        ];
        let l = layers(&[(0, None), (1, Some(0)), (2, Some(1))], 2, &keys);
        let all: BTreeSet<u64> = [0, 1, 2].into();
        assert!(l.garbage(&all, 2).is_empty());
        assert_eq!(l.held_only_by(0, &all), 1, "block 2 of layer 0");
        assert_eq!(l.held_only_by(1, &all), 1, "block 3 of layer 1");
        // Together the snapshots alone hold both; the copy counts the same.
        let snaps: BTreeSet<u64> = [0, 1].into();
        assert_eq!(l.held_by_snapshots(&snaps), 2);
        assert_eq!(l.copy().held_by_snapshots(&snaps), 2);
        assert_eq!(l.held_by_snapshots(&[1].into()), 1, "b alone: block 3");
        let before = l.generation();
        l.set(2, 3, true, false);
        assert!(l.generation() > before, "a change moves the generation");
        assert_eq!(
            l.held_by_snapshots(&snaps),
            2,
            "rewritten in the head: still held"
        );
        l.set(2, 3, false, true);

        // Delete snapshot a: layer 0's block 2 is hidden from every reader.
        let without_a: BTreeSet<u64> = [1, 2].into();
        assert_eq!(
            l.garbage(&without_a, 2),
            vec![LayerKey {
                layer: 0,
                block: 2,
                tomb: false
            }]
        );
        // Delete snapshot b too: block 3 and the layer-1 copy of block 2 stay (head reads
        // block 2 there) — only the now pointless block 3 of layer 1 goes.
        let head_only: BTreeSet<u64> = [2].into();
        let mut g = l.garbage(&head_only, 2);
        g.sort_by_key(|k| (k.layer, k.block));
        assert_eq!(
            g,
            vec![
                LayerKey {
                    layer: 0,
                    block: 2,
                    tomb: false
                },
                LayerKey {
                    layer: 1,
                    block: 3,
                    tomb: false
                }
            ]
        );
    }

    #[test]
    fn chains_reject_cycles_and_unknown_layers() {
        let parents: BTreeMap<u64, Option<u64>> = [(1, Some(2)), (2, Some(1))].into();
        assert!(chain_of(&parents, 1).is_err());
        assert!(chain_of(&parents, 3).is_err());
    }

    /// Cuts lie strictly between the two ends, in order, each a block key of the layer;
    /// the ends must be keys of one layer (or its end, or open) for any cut at all.
    #[test]
    fn cuts_lie_between_the_ends_of_one_layer() {
        let p = "vm/";
        let between = |after: &str, upto: Option<&str>, cuts: &[String]| {
            let mut last = after.to_string();
            for c in cuts {
                assert!(*c > last && upto.map_or(true, |u| c.as_str() < u), "{c}");
                assert!(parse_key(p, c).is_some(), "{c}");
                last = c.clone();
            }
        };
        for layer in [0, 3] {
            let after = tomb_key(p, layer.max(1), 10);
            let after = if layer == 0 {
                data_key(p, 0, 10)
            } else {
                after
            };
            let end = layer_end(p, layer);
            for upto in [None, Some(end.as_str()), Some(&*data_key(p, layer, 5000))] {
                let even = cuts(p, &after, upto, 100_000, 8, None);
                assert_eq!(even.len(), 7, "{upto:?}");
                between(&after, upto, &even);
                // 100 blocks, then 200, 400, ...: offsets 100, 300, 700, 1500, 3100, 6300.
                let doubling = cuts(p, &after, upto, 100_000, 16, Some(100));
                let want = if upto.is_some_and(|u| u.contains("1388")) {
                    5
                } else {
                    9
                };
                assert_eq!(doubling.len(), want, "{upto:?}: {doubling:?}");
                assert_eq!(doubling[1], data_key(p, layer, 310));
                between(&after, upto, &doubling);
            }
            // Nothing left to cut: one block, or keys past the export's end.
            assert!(cuts(p, &after, Some(&data_key(p, layer, 11)), 100, 8, None).is_empty());
            assert!(cuts(p, &after, None, 5, 8, Some(1)).is_empty());
        }
        // Ends of different layers, or keys that are no blocks.
        let other = data_key(p, 4, 50);
        assert!(cuts(p, &data_key(p, 3, 1), Some(&other), 100, 8, None).is_empty());
        assert!(cuts(p, &data_key(p, 0, 1), Some(&other), 100, 8, None).is_empty());
        assert!(cuts(p, "vm/nbd-s3.json", None, 100, 8, None).is_empty());
        assert!(cuts(p, &layer_end(p, 0), None, 100, 8, None).is_empty());
    }
}

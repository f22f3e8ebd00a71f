//! The checkpoint model of the contract: which checkpoints a chain holds (bitmap, layer,
//! snapshot), their order, and for each the sources whose union is its since-set.

use super::libvirt::CheckpointXml;
use crate::chain::bitmap_dir::{ckpt_part, split_name};
use crate::chain::{Chain, Disk, LayerKind};
use crate::qcow2::{Qcow2Image, Table};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bitmap,
    Layer,
    Snapshot,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Bitmap => "bitmap",
            Kind::Layer => "layer",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// One term of a since-set union. Bitmaps and snapshots live in qcow2 layers only, so their
/// terms carry the layer's image.
#[derive(Debug, Clone)]
pub enum Source {
    /// Bitmap `bitmap` of chain layer `layer`, whose image is `image`.
    Bitmap {
        layer: usize,
        image: Arc<Qcow2Image>,
        bitmap: usize,
    },
    /// Everything layer `layer` allocates (data or zero clusters).
    Allocation { layer: usize },
    /// Clusters whose active mapping differs from snapshot `snapshot` of layer `layer`, whose
    /// image is `image`.
    SnapshotDiff {
        layer: usize,
        image: Arc<Qcow2Image>,
        snapshot: usize,
    },
}

/// The qcow2 image of each chain layer (None for raw layers).
fn qcow2_images(chain: &Chain) -> Vec<Option<Arc<Qcow2Image>>> {
    chain
        .layers
        .iter()
        .map(|l| match &l.kind {
            LayerKind::Qcow2(q) => Some(q.clone()),
            LayerKind::Raw { .. } => None,
        })
        .collect()
}

/// How the order was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Metadata,
    Guessed,
}

#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The checkpoint's name (also its directory name, see `dir_name`).
    pub name: String,
    pub kind: Kind,
    /// Chain index of the layer that carries it (the lowest one for bitmaps).
    pub layer: Option<usize>,
    pub granularity: u64,
    /// Why its since-set cannot be trusted, if it cannot.
    pub invalid: Option<String>,
    pub sources: Vec<Source>,
    /// The point-in-time disk, for layer and snapshot checkpoints.
    pub disk: Option<Disk>,
    pub parent: Option<String>,
    pub creation_time: Option<u64>,
    /// The directory name in the mounted tree (unique, a valid file name).
    pub dir_name: String,
}

#[derive(Debug)]
pub struct Model {
    pub chain: Arc<Chain>,
    /// The options it was built with (to rebuild it after checkpoints change).
    pub options: ModelOptions,
    pub order: Order,
    /// Oldest first.
    pub checkpoints: Vec<Checkpoint>,
}

/// Options that change the model.
#[derive(Debug, Default, Clone)]
pub struct ModelOptions {
    /// libvirt checkpoint metadata, if given.
    pub metadata: Option<Vec<CheckpointXml>>,
    /// A running QEMU holds the image (mounted with force_share): bitmaps are live.
    pub live: bool,
}

/// A bitmap occurrence: where it is, which checkpoint it belongs to and the parent its name
/// gives (`child^parent`).
#[derive(Debug, Clone)]
struct BitmapRef {
    layer: usize,
    ckpt: String,
    parent: Option<String>,
}

impl Model {
    pub fn build(chain: Arc<Chain>, opts: &ModelOptions) -> Model {
        let n = chain.layers.len();
        // Every bitmap of every layer, grouped by checkpoint name.
        let mut refs: Vec<BitmapRef> = Vec::new();
        for (li, layer) in chain.layers.iter().enumerate() {
            if let Some(q) = layer.qcow2() {
                for b in q.bitmaps().iter().filter(|b| !b.removed) {
                    let (ckpt, parent) = split_name(&b.entry.name);
                    refs.push(BitmapRef {
                        layer: li,
                        ckpt: ckpt.to_string(),
                        parent: parent.map(str::to_string),
                    });
                }
            }
        }
        let mut bitmap_ckpts: Vec<Checkpoint> = Vec::new();
        // Metadata checkpoints map XML names to the bitmap name they use in this chain.
        let mut meta_alias: BTreeMap<String, String> = BTreeMap::new();
        let mut meta_missing: Vec<Checkpoint> = Vec::new();
        if let Some(meta) = &opts.metadata {
            for x in meta {
                let found = x
                    .bitmaps
                    .iter()
                    .find(|b| refs.iter().any(|r| r.ckpt == *ckpt_part(b)));
                match found {
                    Some(b) => {
                        meta_alias.insert(ckpt_part(b).to_string(), x.name.clone());
                    }
                    None => meta_missing.push(Checkpoint {
                        name: x.name.clone(),
                        kind: Kind::Bitmap,
                        layer: None,
                        granularity: 0,
                        invalid: Some(format!(
                            "libvirt lists checkpoint '{}' but the chain holds no bitmap for it \
                             (not stored yet, or deleted)",
                            x.name
                        )),
                        sources: Vec::new(),
                        disk: None,
                        parent: x.parent.clone(),
                        creation_time: x.creation_time,
                        dir_name: String::new(),
                    }),
                }
            }
        }
        // One bitmap checkpoint per distinct checkpoint name, at its lowest layer; listed in
        // layer order bottom-up, then directory order.
        let mut seen = HashSet::new();
        for li in (0..n).rev() {
            for r in refs.iter().filter(|r| r.layer == li) {
                if !seen.insert(r.ckpt.clone()) {
                    continue;
                }
                let name = meta_alias
                    .get(&r.ckpt)
                    .cloned()
                    .unwrap_or_else(|| r.ckpt.clone());
                let xml = opts
                    .metadata
                    .as_ref()
                    .and_then(|m| m.iter().find(|x| x.name == name));
                bitmap_ckpts.push(Checkpoint {
                    name,
                    kind: Kind::Bitmap,
                    layer: Some(li),
                    granularity: 0,
                    invalid: None,
                    sources: Vec::new(),
                    disk: None,
                    parent: match xml {
                        Some(x) => x.parent.clone(),
                        None => r.parent.clone(),
                    },
                    creation_time: xml.and_then(|x| x.creation_time),
                    dir_name: String::new(),
                });
            }
        }
        let order = if opts.metadata.is_some() {
            Order::Metadata
        } else {
            Order::Guessed
        };
        let mut all = Vec::new();
        let metadata_rank = opts.metadata.as_ref().map(|m| metadata_order(m));
        let images = qcow2_images(&chain);
        for li in (0..n).rev() {
            // Internal snapshots of this layer, by creation time.
            if let Some(q) = &images[li] {
                let mut snaps: Vec<usize> = (0..q.snapshots.len()).collect();
                snaps.sort_by_key(|&i| {
                    (
                        q.snapshots[i].entry.date_sec,
                        q.snapshots[i].entry.date_nsec,
                    )
                });
                for si in snaps {
                    let s = &q.snapshots[si];
                    all.push(Checkpoint {
                        name: s.entry.name.clone(),
                        kind: Kind::Snapshot,
                        layer: Some(li),
                        granularity: q.geo.cluster_size(),
                        invalid: None,
                        sources: vec![Source::SnapshotDiff {
                            layer: li,
                            image: q.clone(),
                            snapshot: si,
                        }],
                        disk: Some(Disk::new(chain.clone(), li, Table::Snapshot(si))),
                        parent: None,
                        creation_time: Some(u64::from(s.entry.date_sec)),
                        dir_name: String::new(),
                    });
                }
            }
            let mut here: Vec<Checkpoint> = bitmap_ckpts
                .iter()
                .filter(|c| c.layer == Some(li))
                .cloned()
                .collect();
            match &metadata_rank {
                Some(rank) => {
                    here.sort_by_key(|c| rank.get(&c.name).copied().unwrap_or(usize::MAX))
                }
                None => here = parents_first(here),
            }
            all.extend(here);
            if li > 0 {
                let layer = &chain.layers[li];
                let name = layer
                    .path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| layer.path.display().to_string());
                all.push(Checkpoint {
                    name,
                    kind: Kind::Layer,
                    layer: Some(li),
                    granularity: (0..li)
                        .map(|l| chain.layers[l].alloc_unit())
                        .min()
                        .unwrap_or(65536),
                    invalid: None,
                    sources: (0..li).map(|l| Source::Allocation { layer: l }).collect(),
                    disk: Some(Disk::new(chain.clone(), li, Table::Active)),
                    parent: None,
                    creation_time: None,
                    dir_name: String::new(),
                });
            }
        }
        // Checkpoints libvirt knows but the chain lacks: after their parent, else first.
        if let Some(rank) = &metadata_rank {
            meta_missing.sort_by_key(|c| rank.get(&c.name).copied().unwrap_or(usize::MAX));
            for m in meta_missing {
                let pos = m
                    .parent
                    .as_ref()
                    .and_then(|p| all.iter().position(|c| &c.name == p))
                    .map_or(0, |i| i + 1);
                all.insert(pos, m);
            }
        }
        let mut model = Model {
            chain,
            options: opts.clone(),
            order,
            checkpoints: all,
        };
        model.compute_sources(opts.live, &meta_alias);
        model.assign_dir_names();
        model
    }

    /// Fill in sources, granularity and validity of bitmap checkpoints.
    fn compute_sources(&mut self, live: bool, alias: &BTreeMap<String, String>) {
        let chain = self.chain.clone();
        let names: Vec<(String, Kind)> = self
            .checkpoints
            .iter()
            .map(|c| (c.name.clone(), c.kind))
            .collect();
        // A bitmap's checkpoint part -> the checkpoint name the model uses for it.
        let ckpt_of = |bitmap_name: &str| -> String {
            let key = ckpt_part(bitmap_name);
            alias.get(key).cloned().unwrap_or_else(|| key.to_string())
        };
        let images = qcow2_images(&chain);
        // Resolve, per layer, the checkpoint name of every bitmap.
        let per_layer: Vec<Vec<(usize, String)>> = images
            .iter()
            .map(|q| match q {
                Some(q) => q
                    .bitmaps()
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| !b.removed)
                    .map(|(bi, b)| (bi, ckpt_of(&b.entry.name)))
                    .collect(),
                None => Vec::new(),
            })
            .collect();
        for ci in 0..self.checkpoints.len() {
            let c = &self.checkpoints[ci];
            if c.kind != Kind::Bitmap || c.layer.is_none() {
                continue;
            }
            let low = c.layer.expect("checked");
            let later: HashSet<&str> = names[ci..]
                .iter()
                .filter(|(_, k)| *k == Kind::Bitmap)
                .map(|(n, _)| n.as_str())
                .collect();
            // `needs`: the contract's union (C and every later checkpoint); it decides validity.
            // `sources`: what the bits are computed from. They differ in one case: where C's own
            // bitmap in a layer is enabled, it has recorded every write since C, so the later
            // bitmaps add nothing when the order is right, and only wrong bits when a guessed
            // order is wrong (QEMU stores bitmaps in no particular order).
            let mut needs = Vec::new();
            let mut sources: Vec<Source> = Vec::new();
            for li in (0..=low).rev() {
                let here: Vec<usize> = per_layer[li]
                    .iter()
                    .filter(|(_, n)| later.contains(n.as_str()))
                    .map(|(bi, _)| *bi)
                    .collect();
                let continued = li == low
                    || per_layer[li].iter().any(|(_, n)| {
                        later.contains(n.as_str()) && per_layer[li + 1].iter().any(|(_, m)| m == n)
                    });
                // Only a qcow2 layer holds bitmaps, so a continued layer is one.
                let q = match &images[li] {
                    Some(q) if continued => q,
                    _ => {
                        needs.push(Source::Allocation { layer: li });
                        sources.push(Source::Allocation { layer: li });
                        continue;
                    }
                };
                let bitmaps = q.bitmaps();
                let own_enabled = per_layer[li].iter().find(|(bi, n)| {
                    *n == names[ci].0
                        && bitmaps[*bi].entry.auto()
                        && bitmaps[*bi].distrust.is_none()
                });
                let bitmap = |bi: usize| Source::Bitmap {
                    layer: li,
                    image: q.clone(),
                    bitmap: bi,
                };
                let all: Vec<Source> = here.iter().map(|&bi| bitmap(bi)).collect();
                match own_enabled {
                    Some(&(bi, _))
                        if li == low
                            || per_layer[li + 1].iter().any(|(_, m)| *m == names[ci].0) =>
                    {
                        sources.push(bitmap(bi))
                    }
                    _ => sources.extend(all.iter().cloned()),
                }
                needs.extend(all);
            }
            let mut gran = u64::MAX;
            let mut invalid = None;
            for s in &needs {
                match s {
                    Source::Bitmap {
                        layer,
                        image,
                        bitmap,
                    } => {
                        let b = &image.bitmaps()[*bitmap];
                        gran = gran.min(b.entry.granularity());
                        if invalid.is_none() {
                            invalid = b.distrust.clone().map(|r| {
                                if live && b.entry.in_use() {
                                    format!(
                                        "{}: the image is live (a running QEMU holds it), so its \
                                         bitmaps are in use; only layer and snapshot checkpoints are valid",
                                        chain.layers[*layer].path.display()
                                    )
                                } else {
                                    format!("{}: {r}", chain.layers[*layer].path.display())
                                }
                            });
                        }
                    }
                    Source::Allocation { layer } => {
                        gran = gran.min(chain.layers[*layer].alloc_unit().max(512))
                    }
                    Source::SnapshotDiff { .. } => {}
                }
            }
            // Allocation terms never refine a bitmap checkpoint's granularity below its bitmaps'.
            let bitmap_gran = sources
                .iter()
                .filter_map(|s| match s {
                    Source::Bitmap { image, bitmap, .. } => {
                        Some(image.bitmaps()[*bitmap].entry.granularity())
                    }
                    _ => None,
                })
                .min();
            let c = &mut self.checkpoints[ci];
            c.granularity = bitmap_gran.unwrap_or(gran);
            c.invalid = invalid;
            c.sources = sources;
        }
    }

    /// Directory names: the checkpoint's name, made a valid file name ('/' and NUL become '_';
    /// FUSE takes names longer than 255 bytes, as QEMU's 1023-byte bitmap names), unique
    /// (`~2`, `~3`... where names collide).
    fn assign_dir_names(&mut self) {
        let mut used: HashSet<String> = ["current", "checkpoints.json", "stats.json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for c in &mut self.checkpoints {
            let mut base: String = c.name.replace(['/', '\0'], "_");
            if base.is_empty() || base == "." || base == ".." {
                base = format!("_{base}");
            }
            let mut name = base.clone();
            let mut i = 2;
            while !used.insert(name.clone()) {
                name = format!("{base}~{i}");
                i += 1;
            }
            c.dir_name = name;
        }
    }

    /// Granularity blocks of checkpoint `c` over the current disk.
    pub fn blocks(&self, c: &Checkpoint) -> u64 {
        self.disk_size().div_ceil(c.granularity.max(1))
    }

    /// The current disk's virtual size.
    pub fn disk_size(&self) -> u64 {
        self.chain.top().size(Table::Active)
    }
}

/// Order libvirt metadata by the parent chain: parents before children, roots and siblings by
/// creation time (seconds tie, then by name).
fn metadata_order(meta: &[CheckpointXml]) -> BTreeMap<String, usize> {
    let mut sorted: Vec<&CheckpointXml> = meta.iter().collect();
    sorted.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
    let mut rank = BTreeMap::new();
    fn visit(
        x: &CheckpointXml,
        all: &[&CheckpointXml],
        rank: &mut BTreeMap<String, usize>,
        stack: &mut Vec<String>,
    ) {
        if rank.contains_key(&x.name) || stack.contains(&x.name) {
            return;
        }
        stack.push(x.name.clone());
        if let Some(p) = x
            .parent
            .as_ref()
            .and_then(|p| all.iter().find(|y| &y.name == p))
        {
            visit(p, all, rank, stack);
        }
        stack.pop();
        let n = rank.len();
        rank.insert(x.name.clone(), n);
    }
    let mut stack = Vec::new();
    for x in &sorted {
        visit(x, &sorted, &mut rank, &mut stack);
    }
    rank
}

/// Put each checkpoint after its `^parent` (matched exactly, else as the unique name ending in
/// it), keeping the given order otherwise.
fn parents_first(list: Vec<Checkpoint>) -> Vec<Checkpoint> {
    let names: Vec<String> = list.iter().map(|c| c.name.clone()).collect();
    let parent_of = |c: &Checkpoint| -> Option<usize> {
        let p = c.parent.as_ref()?;
        if let Some(i) = names.iter().position(|n| n == p) {
            return Some(i);
        }
        let ends: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| n.ends_with(p.as_str()))
            .map(|(i, _)| i)
            .collect();
        (ends.len() == 1).then(|| ends[0])
    };
    let mut out_idx: Vec<usize> = Vec::new();
    fn emit(
        i: usize,
        list: &[Checkpoint],
        parent_of: &dyn Fn(&Checkpoint) -> Option<usize>,
        out: &mut Vec<usize>,
        stack: &mut Vec<usize>,
    ) {
        if out.contains(&i) || stack.contains(&i) {
            return;
        }
        stack.push(i);
        if let Some(p) = parent_of(&list[i]) {
            emit(p, list, parent_of, out, stack);
        }
        stack.pop();
        out.push(i);
    }
    let mut stack = Vec::new();
    for i in 0..list.len() {
        emit(i, &list, &parent_of, &mut out_idx, &mut stack);
    }
    let mut slots: Vec<Option<Checkpoint>> = list.into_iter().map(Some).collect();
    out_idx
        .into_iter()
        .filter_map(|i| slots[i].take())
        .collect()
}

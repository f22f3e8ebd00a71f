//! How much of the layer files stands behind a disk: the honest block count a `stat` reports
//! (so `cp` uses SEEK_DATA on sparse disks).

use super::read::Disk;
use super::LayerKind;
use crate::qcow2::Table;

/// 512-byte blocks the layers of `d` store, at most the disk's size. A snapshot's disk counts
/// its own image only (its clusters are shared with the live table).
pub fn stored_blocks(d: &Disk) -> u64 {
    let layers = &d.chain.layers;
    if d.table != Table::Active {
        return layers
            .get(d.start)
            .and_then(|l| l.qcow2())
            .map_or(0, |q| q.file_len())
            .min(d.size())
            / 512;
    }
    let stored: u64 = layers
        .iter()
        .skip(d.start)
        .map(|l| match &l.kind {
            LayerKind::Qcow2(q) => q.file_len(),
            LayerKind::Raw { size, .. } => *size,
        })
        .sum();
    stored.min(d.size()).div_ceil(512)
}

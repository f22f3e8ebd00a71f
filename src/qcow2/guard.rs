//! The host clusters that hold an image's metadata, kept by a writer so that no write of guest
//! data or bitmap data lands on them: QEMU's pre-write overlap check
//! (`qcow2_check_metadata_overlap`). A hostile image can point an L2 entry, a bitmap table entry
//! or a refcount block at its own L1 table; such writes are refused instead of carried out.

use super::bitmaps::TableEntry;
use super::header::AUTOCLEAR_BITMAPS;
use super::image::Qcow2Image;
use super::types::{HostCluster, HostOffset};
use super::Table;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Non-overlapping cluster ranges holding metadata.
#[derive(Default)]
pub struct Guard {
    /// First cluster -> (end cluster, exclusive; what lives there).
    map: BTreeMap<HostCluster, (HostCluster, &'static str)>,
}

impl Guard {
    /// Clusters `[c0, c1)` hold `what`; refused if they overlap metadata already known.
    pub fn protect(&mut self, c0: HostCluster, c1: HostCluster, what: &'static str) -> Result<()> {
        if c1 <= c0 {
            return Ok(());
        }
        if let Some(other) = self.hit(c0, c1) {
            return Err(Error::corrupt(format!(
                "the {what} at cluster {c0} overlaps the {other}"
            )));
        }
        self.map.insert(c0, (c1, what));
        Ok(())
    }

    /// What metadata `[c0, c1)` overlaps, if any.
    pub fn hit(&self, c0: HostCluster, c1: HostCluster) -> Option<&'static str> {
        // Ranges are disjoint and sorted, so only the last one starting before c1 can reach c0.
        self.map
            .range(..c1)
            .next_back()
            .filter(|(_, (end, _))| *end > c0)
            .map(|(_, (_, what))| *what)
    }

    /// Cluster `c` is free again: forget the metadata range it belonged to.
    pub fn release(&mut self, c: HostCluster) {
        let start = self
            .map
            .range(..=c)
            .next_back()
            .filter(|(_, (end, _))| *end > c)
            .map(|(&s, _)| s);
        if let Some(s) = start {
            self.map.remove(&s);
        }
    }
}

/// The byte regions of `q`'s active metadata a writer must never overwrite with data: header,
/// L1 table, refcount table, bitmap directory, every active L2 table, and the tables and data
/// clusters of every bitmap, trusted or not (QEMU counts them all, and deleting a bitmap frees
/// them), unless the autoclear bit says the bitmaps extension is stale (QEMU ignores it then).
/// A bitmap QEMU refuses is an error. (Refcount blocks are added by `Refcounts` itself;
/// internal snapshots make a writer refuse the image before this is asked.)
pub fn metadata(q: &Qcow2Image) -> Result<Vec<(HostOffset, u64, &'static str)>> {
    let h = &q.header;
    let cs = q.geo.cluster_size();
    let mut out = q.header_regions();
    for i in 0..u64::from(h.l1_size) {
        if let Some(l2) = q.l2_offset(Table::Active, i)? {
            out.push((l2, cs, "L2 table"));
        }
    }
    let stale = q.header.autoclear_features & AUTOCLEAR_BITMAPS == 0;
    for (i, bm) in q.bitmaps().iter().enumerate() {
        if bm.removed || stale {
            continue;
        }
        if let Some(why) = bm.entry.violation(h.size, cs) {
            // QEMU opens such an image not at all; its clusters cannot be told apart.
            return Err(Error::corrupt(format!("{why}; QEMU refuses this image")));
        }
        let e = &bm.entry;
        out.push((
            HostOffset(e.bitmap_table_offset),
            u64::from(e.bitmap_table_size) * 8,
            "bitmap table",
        ));
        for t in q.bitmap_table(i)?.iter() {
            if let TableEntry::Data(off) = *t {
                out.push((off, cs, "bitmap data"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_found_and_released() {
        let mut g = Guard::default();
        g.protect(HostCluster(0), HostCluster(1), "header").unwrap();
        g.protect(HostCluster(3), HostCluster(5), "L1 table")
            .unwrap();
        g.protect(HostCluster(9), HostCluster(10), "L2 table")
            .unwrap();
        assert_eq!(g.hit(HostCluster(1), HostCluster(3)), None);
        assert_eq!(g.hit(HostCluster(4), HostCluster(5)), Some("L1 table"));
        assert_eq!(g.hit(HostCluster(2), HostCluster(4)), Some("L1 table"));
        assert_eq!(g.hit(HostCluster(5), HostCluster(9)), None);
        assert_eq!(
            g.hit(HostCluster(0), HostCluster(100)),
            Some("L2 table"),
            "the last range reaching in"
        );
        let e = g
            .protect(HostCluster(4), HostCluster(6), "refcount block")
            .unwrap_err();
        assert!(e.msg.contains("overlaps the L1 table"), "{}", e.msg);
        g.release(HostCluster(4));
        assert_eq!(
            g.hit(HostCluster(3), HostCluster(5)),
            None,
            "the whole L1 range is forgotten"
        );
        g.release(HostCluster(7));
        assert_eq!(
            g.hit(HostCluster(9), HostCluster(10)),
            Some("L2 table"),
            "a free cluster releases nothing else"
        );
    }
}

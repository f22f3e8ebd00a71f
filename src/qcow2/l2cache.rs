//! The L2 tables of one image held in memory. Whole tables serve the writer, the snapshot
//! comparisons and the checks; the read path takes 4 KiB slices, as QEMU's
//! l2-cache-entry-size does: a reader of a few blocks here and there over a large disk reads
//! and keeps the 4 KiB of entries around each lookup, not the whole cluster of its table.

use super::image::cap;
use super::l2::{Geometry, L2Entry, L2Table};
use super::types::HostOffset;
use crate::error::Result;
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;

/// Bytes of one slice (or the whole table, when clusters are smaller).
const SLICE_BYTES: u64 = 4096;

/// Entries `[first, end())` of one L2 table.
#[derive(Debug, Clone)]
pub struct L2Part {
    pub first: u64,
    table: L2Table,
}

impl L2Part {
    /// Entry `idx` of the whole table (an unallocated entry outside this part).
    pub fn get(&self, idx: u64) -> L2Entry {
        idx.checked_sub(self.first)
            .map(|i| self.table.get(i))
            .unwrap_or_default()
    }

    /// One past the last entry this part holds.
    pub fn end(&self) -> u64 {
        self.first + self.table.len()
    }
}

struct Lrus {
    tables: LruCache<HostOffset, L2Table>,
    slices: LruCache<(HostOffset, u64), L2Table>,
    /// Bumped whenever a writer changes a table, so that a reader that loaded a table or a
    /// slice from disk before the change does not cache the stale copy.
    gen: u64,
}

pub struct L2Cache {
    lrus: Mutex<Lrus>,
    table_bytes: u64,
    slice_bytes: u64,
    /// Entries per slice.
    per_slice: u64,
}

impl std::fmt::Debug for L2Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Cache").finish_non_exhaustive()
    }
}

impl L2Cache {
    /// A cache of about `bytes` for an image of geometry `geo` (see `resize`).
    pub fn new(geo: &Geometry, bytes: usize) -> L2Cache {
        let table_bytes = geo.cluster_size();
        let slice_bytes = SLICE_BYTES.min(table_bytes);
        let (t, s) = Self::split(bytes, table_bytes, slice_bytes);
        L2Cache {
            lrus: Mutex::new(Lrus {
                tables: LruCache::new(t),
                slices: LruCache::new(s),
                gen: 0,
            }),
            table_bytes,
            slice_bytes,
            per_slice: slice_bytes / (8 * geo.words()),
        }
    }

    /// A quarter of the budget for whole tables, the rest for slices.
    fn split(bytes: usize, table_bytes: u64, slice_bytes: u64) -> (NonZeroUsize, NonZeroUsize) {
        let tables = bytes / 4;
        (cap(tables, table_bytes), cap(bytes - tables, slice_bytes))
    }

    /// Bound the cache to about `bytes`; shrinking drops the least recently used at once.
    pub fn resize(&self, bytes: usize) {
        let (t, s) = Self::split(bytes, self.table_bytes, self.slice_bytes);
        let mut l = self.lrus.lock();
        l.tables.resize(t);
        l.slices.resize(s);
    }

    /// The whole table at `off`, cached or loaded by `load`.
    pub fn table(
        &self,
        off: HostOffset,
        load: impl FnOnce() -> Result<L2Table>,
    ) -> Result<L2Table> {
        let gen = {
            let mut l = self.lrus.lock();
            if let Some(t) = l.tables.get(&off) {
                return Ok(t.clone());
            }
            l.gen
        };
        let t = load()?;
        let mut l = self.lrus.lock();
        if l.gen == gen {
            l.tables.put(off, t.clone());
        }
        Ok(t)
    }

    /// A part of the table at `off` holding entry `idx`: the whole table when it is cached,
    /// else the slice around `idx`, cached or loaded by `load(position in the table, bytes)`.
    pub fn part(
        &self,
        off: HostOffset,
        idx: u64,
        load: impl FnOnce(u64, u64) -> Result<L2Table>,
    ) -> Result<L2Part> {
        let slice = idx / self.per_slice;
        let first = slice * self.per_slice;
        let gen = {
            let mut l = self.lrus.lock();
            if let Some(t) = l.tables.get(&off) {
                return Ok(L2Part {
                    first: 0,
                    table: t.clone(),
                });
            }
            if let Some(t) = l.slices.get(&(off, slice)) {
                return Ok(L2Part {
                    first,
                    table: t.clone(),
                });
            }
            l.gen
        };
        let table = load(slice * self.slice_bytes, self.slice_bytes)?;
        let mut l = self.lrus.lock();
        if l.gen == gen {
            l.slices.put((off, slice), table.clone());
        }
        Ok(L2Part { first, table })
    }

    /// Writer side: `table` is now the content of the table at `off` (already on disk).
    pub fn updated(&self, off: HostOffset, table: L2Table) {
        let mut l = self.lrus.lock();
        l.gen += 1;
        l.tables.put(off, table);
        for s in 0..self.table_bytes / self.slice_bytes {
            l.slices.pop(&(off, s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cluster_bits: u32, extended: bool) -> Geometry {
        Geometry {
            cluster_bits,
            extended,
        }
    }

    /// A table of `geo`'s size whose entry i holds i (and, extended, bitmap !i).
    fn numbered(g: &Geometry, from: u64, bytes: u64) -> L2Table {
        let n = bytes / 8 / g.words();
        let raw: Vec<u8> = (from..from + n)
            .flat_map(|i| {
                let mut w = vec![i << 9];
                if g.extended {
                    w.push(!i);
                }
                w.into_iter().flat_map(u64::to_be_bytes)
            })
            .collect();
        L2Table::parse(&raw, g.extended)
    }

    #[test]
    fn parts_hold_the_entries_of_their_slice() {
        for (bits, ext) in [(16, false), (16, true), (9, false), (21, true)] {
            let g = geo(bits, ext);
            let c = L2Cache::new(&g, 1 << 20);
            let per = c.per_slice;
            let last = g.l2_entries() - 1;
            for idx in [0, per - 1, per.min(last), last] {
                let p = c
                    .part(HostOffset(1 << 20), idx, |pos, len| {
                        Ok(numbered(&g, pos / 8 / g.words(), len))
                    })
                    .unwrap();
                assert!(p.first <= idx && idx < p.end() && p.end() <= g.l2_entries());
                assert_eq!(
                    p.get(idx).entry,
                    idx << 9,
                    "bits {bits} ext {ext} idx {idx}"
                );
                assert_eq!(p.get(idx).bitmap, if ext { !idx } else { 0 });
            }
        }
    }

    #[test]
    fn slices_are_cached_and_a_writer_update_replaces_them() {
        let g = geo(16, false);
        let c = L2Cache::new(&g, 1 << 20);
        let off = HostOffset(1 << 20);
        let load = |pos: u64, len: u64| Ok(numbered(&g, pos / 8, len));
        let p = c.part(off, 600, load).unwrap();
        assert_eq!((p.first, p.end()), (512, 1024));
        // Cached: a failing loader is not called.
        let fail = |_: u64, _: u64| -> Result<L2Table> { panic!("loaded again") };
        assert_eq!(c.part(off, 700, fail).unwrap().get(700).entry, 700 << 9);
        // After the writer's update the whole new table answers, not the old slice.
        let new = numbered(&g, 5, g.cluster_size());
        c.updated(off, new);
        let p = c.part(off, 700, fail).unwrap();
        assert_eq!((p.first, p.get(700).entry), (0, 705 << 9));
    }

    #[test]
    fn a_slice_loaded_across_an_update_is_not_cached() {
        let g = geo(16, false);
        let c = L2Cache::new(&g, 1 << 20);
        let off = HostOffset(1 << 20);
        let p = c
            .part(off, 3, |pos, len| {
                // The writer changes the table while this reader loads the old bytes.
                c.updated(off, numbered(&g, 9, g.cluster_size()));
                Ok(numbered(&g, pos / 8, len))
            })
            .unwrap();
        assert_eq!(p.get(3).entry, 3 << 9);
        // Push the new whole table out (4 tables fit): the old slice must not answer now.
        for k in 2..6 {
            c.updated(HostOffset(k << 20), numbered(&g, 0, g.cluster_size()));
        }
        let loads = std::cell::Cell::new(0);
        let p = c
            .part(off, 3, |pos, len| {
                loads.set(loads.get() + 1);
                Ok(numbered(&g, 9 + pos / 8, len))
            })
            .unwrap();
        assert_eq!((loads.get(), p.get(3).entry), (1, 12 << 9));
    }
}

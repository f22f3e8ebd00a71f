//! Refcount table and blocks, for writers (docs/interop/qcow2.rst, "Host cluster management").
//! Allocation follows QEMU's rules: refcount blocks describe `per_block` clusters each; a block
//! for a range nobody uses yet is placed in the first cluster of that range and counts itself;
//! a full table is replaced by a larger one placed in a fresh range, switched in by one header
//! write. Every change is written through (the caller decides when to flush). An image on a
//! block device cannot grow: a cluster past the device's end is ENOSPC, refused before anything
//! is written.

use super::bytes::u64_table;
use super::guard::Guard;
use super::header::{check_region, store_refcount_table};
use super::image::Qcow2Image;
use super::types::{HostCluster, HostOffset};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

const OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

pub struct Refcounts {
    cluster_bits: u32,
    bits: u64,
    table_offset: u64,
    table_clusters: u64,
    table: Vec<u64>,
    blocks: HashMap<u64, Vec<u8>>,
    /// No cluster below this is free (a search hint, lowered when clusters are freed).
    next_free: u64,
    /// Clusters holding metadata: counted (so never handed out) and never written with data.
    guard: Guard,
    /// The size of the block device the image lives on (None: a file, which grows).
    device: Option<u64>,
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::io(what.to_string(), e)
}

impl Refcounts {
    pub fn load(img: &Qcow2Image) -> Result<Refcounts> {
        let h = &img.header;
        let cs = img.geo.cluster_size();
        let n = u64::from(h.refcount_table_clusters) * cs;
        let mut buf = vec![0u8; n as usize];
        super::image::read_exact_or_zero(img.file(), h.refcount_table_offset, &mut buf)
            .map_err(|e| io("read refcount table", e))?;
        let device = crate::hostfile::device_size(img.file()).map_err(|e| io("stat", e))?;
        Ok(Refcounts {
            cluster_bits: h.cluster_bits,
            bits: 1 << h.refcount_order,
            table_offset: h.refcount_table_offset,
            table_clusters: u64::from(h.refcount_table_clusters),
            table: u64_table(&buf),
            blocks: HashMap::new(),
            next_free: 1,
            guard: Guard::default(),
            device,
        })
    }

    /// Clusters `[c0, c1)` can be used: on a block device they lie inside it.
    fn room(&self, c0: u64, c1: u64) -> Result<()> {
        match self.device {
            Some(size) if c1 > size >> self.cluster_bits => Err(Error::no_space(format!(
                "no room for clusters {c0}..{c1} on the block device ({size} bytes; it cannot grow)"
            ))),
            _ => Ok(()),
        }
    }

    /// `[off, off+len)` holds `what`: refused if it overlaps other metadata or any of its
    /// clusters has refcount 0 (the allocator would hand it out and overwrite it).
    pub fn protect(
        &mut self,
        file: &File,
        off: HostOffset,
        len: u64,
        what: &'static str,
    ) -> Result<()> {
        let (c0, c1) = off.clusters(len, self.cluster_bits);
        self.guard.protect(c0, c1, what)?;
        for c in c0.0..c1.0 {
            if self.get(file, HostCluster(c))? == 0 {
                return Err(Error::corrupt(format!(
                    "the {what} at {off} has refcount 0 (qemu-img check -r all)"
                )));
            }
        }
        Ok(())
    }

    /// The metadata `[off, off+len)` overlaps, if any.
    pub fn metadata_at(&self, off: HostOffset, len: u64) -> Option<&'static str> {
        let (c0, c1) = off.clusters(len, self.cluster_bits);
        self.guard.hit(c0, c1)
    }

    /// Protect every refcount block the table names.
    pub fn protect_blocks(&mut self, file: &File) -> Result<()> {
        let cs = self.cs();
        let offs: Vec<u64> = self
            .table
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let file_len = crate::hostfile::size(file).map_err(|e| io("stat", e))?;
        for off in offs {
            check_region("refcount block", off, cs, cs, file_len)?;
            self.protect(file, HostOffset(off), cs, "refcount block")?;
        }
        Ok(())
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn per_block(&self) -> u64 {
        self.cs() * 8 / self.bits
    }

    fn block(&mut self, file: &File, off: u64) -> Result<&mut Vec<u8>> {
        if !self.blocks.contains_key(&off) {
            let mut b = vec![0u8; self.cs() as usize];
            super::image::read_exact_or_zero(file, off, &mut b)
                .map_err(|e| io("read refcount block", e))?;
            self.blocks.insert(off, b);
        }
        Ok(self.blocks.get_mut(&off).expect("just inserted"))
    }

    fn get_in(block: &[u8], i: u64, bits: u64) -> u64 {
        if bits < 8 {
            let byte = block[(i * bits / 8) as usize];
            (u64::from(byte) >> ((i * bits) % 8)) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            block[at..at + n]
                .iter()
                .fold(0u64, |v, &b| (v << 8) | u64::from(b))
        }
    }

    /// Set entry `i` of `block`; returns the byte range that changed.
    fn set_in(block: &mut [u8], i: u64, bits: u64, v: u64) -> (usize, usize) {
        if bits < 8 {
            let at = (i * bits / 8) as usize;
            let shift = (i * bits) % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[at] = (block[at] & !mask) | (((v as u8) << shift) & mask);
            (at, at + 1)
        } else {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            for k in 0..n {
                block[at + k] = (v >> (8 * (n - 1 - k))) as u8;
            }
            (at, at + n)
        }
    }

    /// Refcount of host cluster `c` (0 where no block exists).
    pub fn get(&mut self, file: &File, c: HostCluster) -> Result<u64> {
        let c = c.0;
        let per = self.per_block();
        let Some(&e) = self.table.get((c / per) as usize) else {
            return Ok(0);
        };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let bits = self.bits;
        let b = self.block(file, off)?;
        Ok(Self::get_in(b, c % per, bits))
    }

    /// Set the refcount of cluster `c`, whose block must exist.
    fn set(&mut self, file: &File, c: HostCluster, v: u64) -> Result<()> {
        self.update_run(file, c, 1, |_, _| Ok(v))
    }

    /// Give each cluster `k` of `[c0, c0+n)` the refcount `f(k, old)`, where every block exists: one
    /// write per refcount block touched. Nothing changes, in memory or on disk, in a block
    /// where `f` fails.
    fn update_run(
        &mut self,
        file: &File,
        c0: HostCluster,
        n: u64,
        f: impl Fn(u64, u64) -> Result<u64>,
    ) -> Result<()> {
        let per = self.per_block();
        let bits = self.bits;
        let end = c0.0 + n;
        let mut c = c0.0;
        while c < end {
            let ti = c / per;
            let stop = ((ti + 1) * per).min(end);
            let off = self.table.get(ti as usize).map_or(0, |e| e & OFFSET_MASK);
            if off == 0 {
                return Err(Error::corrupt(format!("no refcount block for cluster {c}")));
            }
            let b = self.block(file, off)?;
            let new = (c..stop)
                .map(|k| {
                    let v = f(k, Self::get_in(b, k % per, bits))?;
                    if bits < 64 && v >= 1 << bits {
                        return Err(Error::unsupported(format!(
                            "refcount of cluster {k} would overflow {bits} bits"
                        )));
                    }
                    Ok(v)
                })
                .collect::<Result<Vec<u64>>>()?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for (k, &v) in (c..stop).zip(&new) {
                let (s, e) = Self::set_in(b, k % per, bits, v);
                (lo, hi) = (lo.min(s), hi.max(e));
            }
            file.write_all_at(&b[lo..hi], off + lo as u64)
                .map_err(|e| io("write refcount block", e))?;
            for (k, _) in (c..stop).zip(&new).filter(|(_, &v)| v == 0) {
                self.guard.release(HostCluster(k));
                self.next_free = self.next_free.min(k);
            }
            c = stop;
        }
        Ok(())
    }

    /// Drop one reference to cluster `c`.
    pub fn decrement(&mut self, file: &File, c: HostCluster) -> Result<()> {
        self.release_run(file, c, 1)
    }

    /// Drop one reference to each cluster of `[c0, c0+n)`, one write per refcount block.
    pub fn release_run(&mut self, file: &File, c0: HostCluster, n: u64) -> Result<()> {
        self.update_run(file, c0, n, |k, v| {
            v.checked_sub(1)
                .ok_or_else(|| Error::corrupt(format!("refcount of cluster {k} is already 0")))
        })
    }

    /// Allocate one free cluster (refcount set to 1, written through); returns its offset.
    pub fn alloc(&mut self, file: &File) -> Result<HostOffset> {
        let per = self.per_block();
        let mut c = self.next_free.max(1);
        loop {
            self.room(c, c + 1)?;
            let ti = c / per;
            if ti >= self.table.len() as u64 {
                self.grow(file)?;
                continue;
            }
            let off = self.table[ti as usize] & OFFSET_MASK;
            if off == 0 {
                self.new_block_for_range(file, ti)?;
                continue;
            }
            let bits = self.bits;
            let block = self.block(file, off)?;
            let mut i = c % per;
            while i < per && Self::get_in(block, i, bits) != 0 {
                i += 1;
            }
            if i == per {
                c = (ti + 1) * per;
                continue;
            }
            c = ti * per + i;
            self.room(c, c + 1)?;
            self.set(file, HostCluster(c), 1)?;
            self.next_free = c + 1;
            return Ok(HostCluster(c).offset(self.cluster_bits));
        }
    }

    /// Clusters from the lowest free one to the end of the range its refcount block counts:
    /// what can be allocated ahead without placing a new block.
    pub fn left_in_block(&self) -> u64 {
        let per = self.per_block();
        per - self.next_free.max(1) % per
    }

    /// Allocate the first `n` free clusters (refcounts set to 1, one write per run and refcount
    /// block), contiguous where the free space is; returns them as runs (first, clusters) in
    /// order. On a block device with fewer free clusters: no room, nothing allocated.
    pub fn alloc_many(&mut self, file: &File, n: u64) -> Result<Vec<(HostCluster, u64)>> {
        let per = self.per_block();
        let start = self.next_free.max(1);
        let mut c = start;
        let mut runs: Vec<(HostCluster, u64)> = Vec::new();
        let mut got = 0;
        while got < n {
            self.room(c, c + 1)?;
            let ti = c / per;
            if ti >= self.table.len() as u64 {
                self.grow(file)?;
                continue;
            }
            if self.table[ti as usize] & OFFSET_MASK == 0 {
                self.new_block_for_range(file, ti)?;
                continue;
            }
            if self.get(file, HostCluster(c))? == 0 {
                match runs.last_mut() {
                    Some((first, k)) if first.0 + *k == c => *k += 1,
                    _ => runs.push((HostCluster(c), 1)),
                }
                got += 1;
            }
            c += 1;
        }
        for &(first, k) in &runs {
            self.update_run(file, first, k, |_, _| Ok(1))?;
        }
        // Every free cluster in [start, c) was taken (unless one was freed meanwhile).
        if self.next_free.max(1) == start {
            self.next_free = c;
        }
        Ok(runs)
    }

    /// Allocate `n` contiguous free clusters (refcounts set to 1, one write per refcount
    /// block); returns the first offset. A run that would need a new refcount block inside it
    /// while it is longer than one block's range can never be found (that block takes the
    /// range's first cluster): refused, as no room.
    pub fn alloc_run(&mut self, file: &File, n: u64) -> Result<HostOffset> {
        if n <= 1 {
            return self.alloc(file);
        }
        let per = self.per_block();
        let first = self.next_free.max(1);
        let mut start = first;
        // Whether every cluster in [first, start) is in use (then next_free can move past).
        let mut dense = true;
        'search: loop {
            self.room(start, start + n)?;
            for k in 0..n {
                let c = start + k;
                let ti = c / per;
                if ti >= self.table.len() as u64 {
                    self.grow(file)?;
                    continue 'search;
                }
                if self.table[ti as usize] & OFFSET_MASK == 0 {
                    if n >= per {
                        return Err(Error::no_space(format!(
                            "no run of {n} contiguous clusters: a new refcount block would \
                             split it (each counts {per})"
                        )));
                    }
                    self.new_block_for_range(file, ti)?;
                    continue 'search;
                }
                if self.get(file, HostCluster(c))? != 0 {
                    dense &= k == 0;
                    start = c + 1;
                    continue 'search;
                }
            }
            self.update_run(file, HostCluster(start), n, |_, _| Ok(1))?;
            if dense {
                self.next_free = start + n;
            }
            return Ok(HostCluster(start).offset(self.cluster_bits));
        }
    }

    /// A refcount block for the unused range `ti`, stored in the range's first cluster.
    fn new_block_for_range(&mut self, file: &File, ti: u64) -> Result<()> {
        let per = self.per_block();
        let base = ti * per;
        self.room(base, base + 1)?;
        let off = base << self.cluster_bits;
        let mut b = vec![0u8; self.cs() as usize];
        Self::set_in(&mut b, 0, self.bits, 1);
        file.write_all_at(&b, off)
            .map_err(|e| io("write refcount block", e))?;
        file.sync_data().map_err(|e| io("flush", e))?;
        let entry = off.to_be_bytes();
        file.write_all_at(&entry, self.table_offset + ti * 8)
            .map_err(|e| io("write refcount table", e))?;
        file.sync_data().map_err(|e| io("flush", e))?;
        self.table[ti as usize] = off;
        self.blocks.insert(off, b);
        self.protect(file, HostOffset(off), self.cs(), "refcount block")
    }

    /// Replace a full refcount table with one twice as large, placed (with the block that
    /// counts it) in the first range past everything the old table describes.
    fn grow(&mut self, file: &File) -> Result<()> {
        let per = self.per_block();
        let cs = self.cs();
        let old_entries = self.table.len() as u64;
        let new_clusters = (self.table_clusters * 2).max(1);
        if new_clusters * cs > 8 << 20 || new_clusters + 1 > per {
            return Err(Error::no_space("refcount table is at QEMU's maximum size"));
        }
        let base = old_entries * per; // first cluster of the first undescribed range
        self.room(base, base + 1 + new_clusters)?;
        let block_off = base << self.cluster_bits;
        let table_off = (base + 1) << self.cluster_bits;
        let mut block = vec![0u8; cs as usize];
        for i in 0..=new_clusters {
            Self::set_in(&mut block, i, self.bits, 1);
        }
        let mut table = self.table.clone();
        table.resize((new_clusters * cs / 8) as usize, 0);
        table[old_entries as usize] = block_off;
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&block, block_off)
            .map_err(|e| io("write refcount block", e))?;
        file.write_all_at(&bytes, table_off)
            .map_err(|e| io("write refcount table", e))?;
        file.sync_data().map_err(|e| io("flush", e))?;
        store_refcount_table(file, HostOffset(table_off), new_clusters as u32)?;
        file.sync_data().map_err(|e| io("flush", e))?;
        let (old_off, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = table_off;
        self.table_clusters = new_clusters;
        self.blocks.insert(block_off, block);
        self.protect(file, HostOffset(block_off), cs, "refcount block")?;
        self.protect(
            file,
            HostOffset(table_off),
            new_clusters * cs,
            "refcount table",
        )?;
        for k in 0..old_clusters {
            self.decrement(file, HostOffset(old_off).cluster(self.cluster_bits) + k)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_widths() {
        for bits in [1u64, 2, 4, 8, 16, 32, 64] {
            let mut b = vec![0u8; 64];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            Refcounts::set_in(&mut b, 3, bits, max);
            Refcounts::set_in(&mut b, 4, bits, 1);
            assert_eq!(Refcounts::get_in(&b, 3, bits), max, "bits {bits}");
            assert_eq!(Refcounts::get_in(&b, 4, bits), 1, "bits {bits}");
            assert_eq!(Refcounts::get_in(&b, 2, bits), 0, "bits {bits}");
        }
        let mut b = vec![0u8; 8];
        for i in 0..8 {
            Refcounts::set_in(&mut b, i, 1, 1);
        }
        assert_eq!(b[0], 0xff, "refcount_bits=1 packs LSB first");
    }
}

//! Since-sets, one chunk at a time: the union of a checkpoint's sources over a range of
//! granularity blocks, as a bit vector (bit i = block `first + i`, QEMU's LSB-first order).

use super::model::{Checkpoint, Source};
use crate::chain::Chain;
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::l2::L2Table;
use crate::qcow2::{BitmapCluster, Qcow2Image, Table};

/// Blocks per chunk: 256 Ki bits = 32 KiB of memory; 16 GiB of disk at 64 KiB granularity.
pub const CHUNK_BLOCKS: u64 = 1 << 18;
pub const CHUNK_WORDS: usize = (CHUNK_BLOCKS / 64) as usize;

/// A chunk's bits.
pub type Bits = Vec<u64>;

fn set_range(bits: &mut Bits, from: u64, to: u64) {
    // Sets bits [from, to) (relative to the chunk).
    let mut i = from;
    while i < to {
        let w = (i / 64) as usize;
        let b = i % 64;
        let n = (64 - b).min(to - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        bits[w] |= mask;
        i += n;
    }
}

/// Compute chunk `chunk` of checkpoint `c`'s since-set over a disk of `total_blocks` blocks.
pub fn compute_chunk(chain: &Chain, c: &Checkpoint, total_blocks: u64, chunk: u64) -> Result<Bits> {
    if let Some(r) = &c.invalid {
        return Err(Error::new(ErrorKind::InvalidCheckpoint, r.clone()));
    }
    let g = c.granularity;
    let b0 = chunk * CHUNK_BLOCKS;
    let b1 = (b0 + CHUNK_BLOCKS).min(total_blocks);
    let mut bits = vec![0u64; CHUNK_WORDS];
    if b0 >= b1 {
        return Ok(bits);
    }
    for s in &c.sources {
        match s {
            Source::Bitmap { image, bitmap, .. } => {
                add_bitmap(image, *bitmap, g, b0, b1, &mut bits)?;
            }
            Source::Allocation { layer } => {
                let l = &chain.layers[*layer];
                let end = (b1 * g).min(l.size(Table::Active));
                let mut off = b0 * g;
                if off >= end {
                    continue;
                }
                if let Some(q) = l.qcow2() {
                    let mut mark = |s: u64, n: u64| {
                        set_range(&mut bits, s / g - b0, (s + n).div_ceil(g) - b0);
                    };
                    if q.present_runs(Table::Active, off, end - off, &mut mark)?
                        .is_some()
                    {
                        continue;
                    }
                }
                while off < end {
                    let (m, n) = l.map(Table::Active, off, end - off)?;
                    let n = n.max(1);
                    if m.is_allocated() {
                        let to = (off + n).div_ceil(g);
                        set_range(&mut bits, off / g - b0, to - b0);
                        // The rest of the last block is marked already: skip its clusters
                        // (many small runs, e.g. alternating entries, cost one lookup a block).
                        off = to * g;
                    } else {
                        off += n;
                    }
                }
            }
            Source::SnapshotDiff {
                image, snapshot, ..
            } => {
                add_snapshot_diff(image, *snapshot, g, b0, b1, &mut bits)?;
            }
        }
    }
    // Bits past the disk's end stay zero.
    let valid = b1 - b0;
    if valid < CHUNK_BLOCKS {
        let w = (valid / 64) as usize;
        if valid % 64 != 0 {
            bits[w] &= (1u64 << (valid % 64)) - 1;
        }
        let from = w + usize::from(valid % 64 != 0);
        bits[from..].fill(0);
    }
    Ok(bits)
}

/// OR bitmap `bi` of `q` (granularity gs >= g) into blocks [b0, b1) at granularity g: a
/// word at a time where gs == g (the usual case), else bit by bit.
fn add_bitmap(q: &Qcow2Image, bi: usize, g: u64, b0: u64, b1: u64, bits: &mut Bits) -> Result<()> {
    let gs = q
        .bitmap(bi)
        .ok_or_else(|| Error::corrupt(format!("no bitmap {bi}")))?
        .entry
        .granularity();
    if gs == g {
        return or_bitmap(q, bi, b0, b1, bits);
    }
    let bits_per_cluster = q.geo.cluster_size() * 8;
    // Source bits overlapping [b0*g, b1*g).
    let k0 = b0 * g / gs;
    let k1 = (b1 * g).div_ceil(gs);
    let mark = |k: u64, bits: &mut Bits| {
        let from = (k * gs / g).max(b0) - b0;
        let to = (((k + 1) * gs).div_ceil(g)).min(b1) - b0;
        set_range(bits, from, to);
    };
    let mut k = k0;
    while k < k1 {
        let idx = k / bits_per_cluster;
        let cluster_end = ((idx + 1) * bits_per_cluster).min(k1);
        match q.bitmap_cluster(bi, idx)? {
            BitmapCluster::Fill(false) => {}
            BitmapCluster::Fill(true) => {
                let from = (k * gs / g).max(b0) - b0;
                let to = (cluster_end * gs).div_ceil(g).min(b1) - b0;
                set_range(bits, from, to);
            }
            BitmapCluster::Data(data) => {
                let base = idx * bits_per_cluster;
                let mut j = k;
                while j < cluster_end {
                    let rel = j - base;
                    let byte = data.get((rel / 8) as usize).copied().unwrap_or(0);
                    if byte == 0 && rel % 8 == 0 {
                        j += 8;
                        continue;
                    }
                    if byte >> (rel % 8) & 1 != 0 {
                        mark(j, bits);
                    }
                    j += 1;
                }
            }
        }
        k = cluster_end;
    }
    Ok(())
}

/// Mark clusters whose active mapping differs from snapshot `si`'s.
fn add_snapshot_diff(
    q: &Qcow2Image,
    si: usize,
    g: u64,
    b0: u64,
    b1: u64,
    bits: &mut Bits,
) -> Result<()> {
    let cs = q.geo.cluster_size();
    let cov = q.geo.l2_coverage();
    let snap_size = q.table_size(Table::Snapshot(si));
    let end = (b1 * g).min(q.size());
    let mut off = b0 * g;
    while off < end {
        let l1 = off / cov;
        let table_end = ((l1 + 1) * cov).min(end);
        let a = q.l2_offset(Table::Active, l1)?;
        // None past the snapshot's size: every cluster there differs.
        let s = if off < snap_size {
            Some(q.l2_offset(Table::Snapshot(si), l1)?)
        } else {
            None
        };
        if s == Some(a) {
            off = table_end;
            continue;
        }
        let at = a.map(|a| q.l2_table(a)).transpose()?;
        let st = s.flatten().map(|s| q.l2_table(s)).transpose()?;
        while off < table_end {
            let i = (off % cov) / cs;
            let get = |t: &Option<L2Table>| t.as_ref().map(|t| t.get(i)).unwrap_or_default();
            let differs = off >= snap_size || !get(&at).same_mapping(&get(&st));
            let next = ((off / cs) + 1) * cs;
            if differs {
                set_range(bits, off / g - b0, next.min(end).div_ceil(g) - b0);
            }
            off = next;
        }
    }
    Ok(())
}

/// Bytes `[from, from + dst.len())` of `bits` as stored (bit i of the chunk = bit i % 8 of
/// byte i / 8, LSB first: the words little-endian), into `dst`.
pub fn bytes_at(bits: &Bits, from: usize, dst: &mut [u8]) {
    let mut filled = 0;
    let mut skip = from % 8;
    for w in bits.iter().skip(from / 8) {
        if filled == dst.len() {
            break;
        }
        let bytes = w.to_le_bytes();
        let k = (8 - skip).min(dst.len() - filled);
        dst[filled..filled + k].copy_from_slice(&bytes[skip..skip + k]);
        filled += k;
        skip = 0;
    }
}

/// Number of set bits.
pub fn count(bits: &Bits) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// OR the bits of bitmap `bi` of `q` (at the chunk's own granularity) for blocks [b0, b1) into
/// `bits` (bit i = block b0 + i; b0 is a multiple of CHUNK_BLOCKS). Bits of the last word past
/// b1 may be set; `compute_chunk` masks them.
fn or_bitmap(q: &Qcow2Image, bi: usize, b0: u64, b1: u64, bits: &mut Bits) -> Result<()> {
    // A bitmap cluster holds 8 * cluster_size bits, a power of two of at least 4096: chunk
    // and cluster boundaries are both multiples of 64 bits, so whole words line up.
    let per_cluster = q.geo.cluster_size() * 8;
    let mut j = b0;
    while j < b1 {
        let idx = j / per_cluster;
        let base = idx * per_cluster;
        let end = ((idx + 1) * per_cluster).min(b1);
        match q.bitmap_cluster(bi, idx)? {
            BitmapCluster::Fill(false) => {}
            BitmapCluster::Fill(true) => set_range(bits, j - b0, end - b0),
            BitmapCluster::Data(data) => {
                let w0 = ((j - b0) / 64) as usize;
                let nw = (end - j).div_ceil(64) as usize;
                let from = ((j - base) / 8) as usize;
                let src = data.get(from..).unwrap_or(&[]);
                let src = &src[..src.len().min(nw * 8)];
                let dst = &mut bits[w0..w0 + nw];
                let mut words = src.chunks_exact(8);
                for (d, s) in dst.iter_mut().zip(&mut words) {
                    *d |= u64::from_le_bytes(s.try_into().expect("8 bytes"));
                }
                let tail = words.remainder();
                if !tail.is_empty() {
                    let mut last = [0u8; 8];
                    last[..tail.len()].copy_from_slice(tail);
                    dst[src.len() / 8] |= u64::from_le_bytes(last);
                }
            }
        }
        j = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_at_is_the_lsb_first_byte_order_at_any_offset() {
        // A pattern that differs in every byte.
        let bits: Bits = (0..5u64)
            .map(|i| 0x0123_4567_89ab_cdef_u64.rotate_left(i as u32 * 8) ^ i)
            .collect();
        let byte = |i: usize| (bits[i / 8] >> ((i % 8) * 8)) as u8;
        for from in 0..40 {
            for len in 0..=(40 - from) {
                let mut got = vec![0xeeu8; len];
                bytes_at(&bits, from, &mut got);
                let want: Vec<u8> = (from..from + len).map(byte).collect();
                assert_eq!(got, want, "from {from} len {len}");
            }
        }
    }

    #[test]
    fn set_range_edges() {
        let mut b = vec![0u64; 3];
        set_range(&mut b, 3, 5);
        assert_eq!(b[0], 0b11000);
        set_range(&mut b, 60, 130);
        assert_eq!(b[0] >> 60, 0xf);
        assert_eq!(b[1], u64::MAX);
        assert_eq!(b[2], 0b11);
    }
}

//! L1 and L2 entries decoded into one `Mapping` per guest range (docs/interop/qcow2.rst,
//! "Cluster mapping" and "Extended L2 Entries"). Pure: entries in, mapping out. The decisions
//! mirror QEMU's `qcow2_get_subcluster_type`.

use super::types::{GuestOffset, HostOffset};
use crate::error::{Error, Result};
use std::sync::Arc;

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;

/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u32 = 32;
/// Extended L2 subcluster bitmaps: every subcluster allocated, or every one zero.
const ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;
const ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// Where a guest range of one layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Plain data at this host offset (the offset of the first byte of the range).
    Data(HostOffset),
    /// The whole cluster is compressed; `host_off`/`len` is the span holding its stream.
    Compressed { host_off: HostOffset, len: u64 },
    /// Reads as zeros; the backing file is not consulted.
    Zero,
    /// Not in this layer: read the next layer down.
    Unallocated,
}

impl Mapping {
    /// Allocated in the sense of `qemu-img map`'s "present at this depth".
    pub fn is_allocated(&self) -> bool {
        !matches!(self, Mapping::Unallocated)
    }
}

/// One L2 entry: the descriptor word and, with extended L2 entries, the subcluster bitmap
/// (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    pub entry: u64,
    pub bitmap: u64,
}

impl L2Entry {
    /// The whole cluster is data at `host` (unshared).
    pub fn data(host: HostOffset, geo: &Geometry) -> L2Entry {
        L2Entry {
            entry: host.0 | OFLAG_COPIED,
            bitmap: if geo.extended { ALL_ALLOC } else { 0 },
        }
    }

    /// The whole cluster reads as zeros; with `keep`, the (unshared) host cluster stays
    /// allocated to it, as `qemu-io write -z` leaves it.
    pub fn zero(keep: Option<HostOffset>, geo: &Geometry) -> L2Entry {
        let host = keep.map_or(0, |h| h.0 | OFLAG_COPIED);
        if geo.extended {
            L2Entry {
                entry: host,
                bitmap: ALL_ZERO,
            }
        } else {
            L2Entry {
                entry: host | OFLAG_ZERO,
                bitmap: 0,
            }
        }
    }

    /// Every byte of the cluster reads from its host cluster (no zero flag, no unallocated
    /// subcluster); meaningful for uncompressed entries with a host cluster.
    pub fn all_data(&self, geo: &Geometry) -> bool {
        if geo.extended {
            self.bitmap == ALL_ALLOC
        } else {
            self.entry & OFLAG_ZERO == 0
        }
    }

    pub fn is_compressed(&self) -> bool {
        self.entry & OFLAG_COMPRESSED != 0
    }

    /// COPIED: the cluster is not shared (refcount 1).
    pub fn is_copied(&self) -> bool {
        self.entry & OFLAG_COPIED != 0
    }

    /// The host cluster offset of an uncompressed entry (0: none).
    pub fn offset(&self) -> HostOffset {
        HostOffset(self.entry & L2E_OFFSET_MASK)
    }

    /// Present at this depth in the sense of `qemu-img map` (standard entries: data, zero or
    /// compressed).
    pub fn is_present(&self) -> bool {
        self.entry & (L2E_OFFSET_MASK | OFLAG_ZERO | OFLAG_COMPRESSED) != 0
    }

    /// The same mapping, ignoring COPIED (which only says whether the cluster is shared).
    pub fn same_mapping(&self, other: &L2Entry) -> bool {
        self.entry & !OFLAG_COPIED == other.entry & !OFLAG_COPIED && self.bitmap == other.bitmap
    }
}

/// One L2 table as stored: `len()` entries of one big-endian word, or two with extended L2
/// entries. The only place that knows how entries are laid out in a table.
#[derive(Debug, Clone)]
pub struct L2Table {
    words: Arc<[u64]>,
    extended: bool,
}

impl L2Table {
    /// Decode a table from its on-disk bytes (one cluster).
    pub fn parse(buf: &[u8], extended: bool) -> L2Table {
        L2Table {
            words: super::bytes::u64_table(buf).into(),
            extended,
        }
    }

    /// A table with every entry unallocated.
    pub fn empty(geo: &Geometry) -> L2Table {
        L2Table {
            words: std::iter::repeat_n(0, (geo.l2_entries() * geo.words()) as usize).collect(),
            extended: geo.extended,
        }
    }

    fn words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }

    /// Entries in the table.
    pub fn len(&self) -> u64 {
        (self.words.len() / self.words()) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Entry `i` (an unallocated entry past the end).
    pub fn get(&self, i: u64) -> L2Entry {
        let w = self.words();
        let at = usize::try_from(i).unwrap_or(usize::MAX).saturating_mul(w);
        let word = |k: usize| {
            at.checked_add(k)
                .and_then(|j| self.words.get(j))
                .copied()
                .unwrap_or(0)
        };
        L2Entry {
            entry: word(0),
            bitmap: if w == 2 { word(1) } else { 0 },
        }
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = L2Entry> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// A copy with entries `(index, entry)` replaced.
    pub fn with(&self, updates: impl IntoIterator<Item = (u64, L2Entry)>) -> L2Table {
        let w = self.words();
        let mut words = self.words.to_vec();
        for (i, e) in updates {
            let at = i as usize * w;
            if let Some(slot) = words.get_mut(at) {
                *slot = e.entry;
            }
            if w == 2 {
                if let Some(slot) = words.get_mut(at + 1) {
                    *slot = e.bitmap;
                }
            }
        }
        L2Table {
            words: words.into(),
            extended: self.extended,
        }
    }

    /// The whole table as stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|e| e.to_be_bytes()).collect()
    }

    /// Entries `range` as stored, and the byte position of the first in the table.
    pub fn entries_bytes(&self, range: std::ops::Range<u64>) -> (u64, Vec<u8>) {
        let mut out = Vec::new();
        for i in range.clone() {
            let e = self.get(i);
            out.extend_from_slice(&e.entry.to_be_bytes());
            if self.extended {
                out.extend_from_slice(&e.bitmap.to_be_bytes());
            }
        }
        (range.start * self.words() as u64 * 8, out)
    }
}

/// Cluster geometry of one image.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended { 16 } else { 8 }
    }

    /// Words (u64) per L2 entry.
    pub fn words(&self) -> u64 {
        if self.extended {
            2
        } else {
            1
        }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Where guest offset `off` is mapped: (L1 index, entry in that L2 table, byte in the
    /// cluster).
    pub fn locate(&self, off: GuestOffset) -> (u64, u64, u64) {
        let cluster = off.0 >> self.cluster_bits;
        (
            off.0 / self.l2_coverage(),
            cluster % self.l2_entries(),
            off.0 & (self.cluster_size() - 1),
        )
    }

    /// The smallest unit whose allocation state can differ (subcluster or cluster).
    pub fn alloc_unit(&self) -> u64 {
        if self.extended {
            self.cluster_size() / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }

    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Split a compressed descriptor into (host byte offset, span length in bytes).
    pub fn compressed_span(&self, e: L2Entry) -> (HostOffset, u64) {
        let entry = e.entry;
        let shift = self.csize_shift();
        let host_off = entry & ((1u64 << shift) - 1);
        let nsect = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (HostOffset(host_off), nsect * 512 - (host_off & 511))
    }

    /// Decode one L2 entry at `in_off` bytes into its cluster. Returns the mapping and how
    /// many bytes from `in_off` it covers without change (to the end of the cluster at most).
    pub fn decode(&self, e: L2Entry, in_off: u64) -> Result<(Mapping, u64)> {
        let L2Entry { entry, bitmap } = e;
        let cs = self.cluster_size();
        let rest = cs - in_off;
        if entry & OFLAG_COMPRESSED != 0 {
            if self.extended && bitmap != 0 {
                return Err(Error::corrupt(format!(
                    "compressed cluster with non-zero subcluster bitmap {bitmap:#x}"
                )));
            }
            let (host_off, len) = self.compressed_span(e);
            return Ok((Mapping::Compressed { host_off, len }, rest));
        }
        let offset = entry & L2E_OFFSET_MASK;
        if offset % cs != 0 {
            return Err(Error::corrupt(format!(
                "data cluster offset {offset:#x} is not cluster aligned"
            )));
        }
        if !self.extended {
            let m = if entry & OFLAG_ZERO != 0 {
                Mapping::Zero
            } else if offset == 0 {
                Mapping::Unallocated
            } else {
                Mapping::Data(HostOffset(offset + in_off))
            };
            return Ok((m, rest));
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 || (offset == 0 && alloc != 0) {
            return Err(Error::corrupt(format!(
                "invalid subcluster bitmap {bitmap:#x}"
            )));
        }
        let sc_bits = self.cluster_bits - 5;
        let first = (in_off >> sc_bits) as u32;
        let state = |i: u32| (alloc >> i & 1, zero >> i & 1);
        let s0 = state(first);
        let mut last = first + 1;
        while last < SUBCLUSTERS && state(last) == s0 {
            last += 1;
        }
        let run = (u64::from(last) << sc_bits) - in_off;
        let m = match s0 {
            (_, 1) => Mapping::Zero,
            (1, _) => Mapping::Data(HostOffset(offset + in_off)),
            _ => Mapping::Unallocated,
        };
        Ok((m, run))
    }
}

/// The L1 entry pointing at the (unshared) L2 table at `l2`.
pub fn l1_entry(l2: HostOffset) -> u64 {
    l2.0 | OFLAG_COPIED
}

/// The L2 table an L1 entry points to (None: unallocated), checked for alignment.
pub fn l1_entry_offset(entry: u64, cluster_size: u64) -> Result<Option<HostOffset>> {
    let off = entry & L1E_OFFSET_MASK;
    if off % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "L2 table offset {off:#x} is not cluster aligned"
        )));
    }
    Ok((off != 0).then_some(HostOffset(off)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(g: Geometry, entry: u64, bitmap: u64, in_off: u64) -> Result<(Mapping, u64)> {
        g.decode(L2Entry { entry, bitmap }, in_off)
    }

    const G64: Geometry = Geometry {
        cluster_bits: 16,
        extended: false,
    };
    const G128X: Geometry = Geometry {
        cluster_bits: 17,
        extended: true,
    };

    #[test]
    fn standard_entries() {
        assert_eq!(d(G64, 0, 0, 0).unwrap(), (Mapping::Unallocated, 65536));
        assert_eq!(d(G64, 1, 0, 4096).unwrap(), (Mapping::Zero, 61440));
        assert_eq!(
            d(G64, 0x8000_0000_0005_0001, 0, 0).unwrap().0,
            Mapping::Zero,
            "preallocated zero cluster keeps its offset but reads zeros"
        );
        assert_eq!(
            d(G64, 0x8000_0000_0004_0000, 0, 10).unwrap(),
            (Mapping::Data(HostOffset(0x40000 + 10)), 65526)
        );
        assert!(d(G64, 0x8000_0000_0004_0200, 0, 0).is_err());
    }

    #[test]
    fn table_view_and_stores() {
        let g = Geometry {
            cluster_bits: 14,
            extended: true,
        };
        let t = L2Table::empty(&g);
        assert_eq!(t.len(), 1024, "16 KiB of 16-byte entries");
        let e = L2Entry {
            entry: 0x8000_0000_0005_0000,
            bitmap: 0xffff_ffff,
        };
        let t = t.with([(3, e)]);
        assert_eq!(t.get(3), e);
        assert_eq!(t.get(2), L2Entry::default());
        assert_eq!(
            t.get(5000),
            L2Entry::default(),
            "past the end reads unallocated"
        );
        let (pos, bytes) = t.entries_bytes(3..4);
        assert_eq!(pos, 48);
        assert_eq!(bytes.len(), 16);
        let all = t.to_bytes();
        assert_eq!(all.len(), 16384);
        assert_eq!(&all[48..64], &bytes[..]);
        let (pos, bytes) = t.entries_bytes(2..5);
        assert_eq!(
            (pos, &bytes[..]),
            (32, &all[32..80]),
            "a range is one contiguous store"
        );
        let back = L2Table::parse(&all, true);
        assert_eq!(back.iter().filter(|e| *e != L2Entry::default()).count(), 1);
        assert!(back.get(3).is_copied() && !back.get(3).is_compressed());
        assert_eq!(back.get(3).offset(), HostOffset(0x5_0000));
        // Standard entries: one word each, no bitmap.
        let s = L2Table::parse(&all, false);
        assert_eq!(
            (s.len(), s.get(6).entry, s.get(6).bitmap),
            (2048, e.entry, 0)
        );
    }

    #[test]
    fn entries_a_writer_stores() {
        let h = HostOffset(0x6_0000);
        let std = G64;
        assert_eq!(
            d(std, L2Entry::data(h, &std).entry, 0, 0).unwrap().0,
            Mapping::Data(h)
        );
        assert!(L2Entry::data(h, &std).all_data(&std));
        assert_eq!(
            d(
                G128X,
                L2Entry::data(h, &G128X).entry,
                L2Entry::data(h, &G128X).bitmap,
                0
            )
            .unwrap(),
            (Mapping::Data(h), 128 << 10)
        );
        for g in [std, G128X] {
            for keep in [None, Some(h)] {
                let z = L2Entry::zero(keep, &g);
                assert_eq!(g.decode(z, 0).unwrap(), (Mapping::Zero, g.cluster_size()));
                assert!(!z.all_data(&g));
                assert_eq!(z.is_copied(), keep.is_some());
            }
        }
        assert_eq!(l1_entry_offset(l1_entry(h), 65536).unwrap(), Some(h));
    }

    #[test]
    fn locate_guest_offsets() {
        // 64 KiB clusters: 8192 entries per table, 512 MiB per table.
        assert_eq!(G64.locate(GuestOffset(0)), (0, 0, 0));
        assert_eq!(G64.locate(GuestOffset((3 << 16) + 5)), (0, 3, 5));
        assert_eq!(G64.locate(GuestOffset((512 << 20) + (1 << 16))), (1, 1, 0));
        // Extended entries take 16 bytes: 8192 per 128 KiB table, 1 GiB per table.
        assert_eq!(G128X.locate(GuestOffset(1 << 30)), (1, 0, 0));
        assert_eq!(
            G128X.locate(GuestOffset((1 << 30) - 1)),
            (0, 8191, (128 << 10) - 1)
        );
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: x = 54, 8 count bits; host 0x50123, 3 additional sectors.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x50123;
        let (m, _) = d(G64, e, 0, 0).unwrap();
        assert_eq!(
            m,
            Mapping::Compressed {
                host_off: HostOffset(0x50123),
                len: 4 * 512 - 0x123
            }
        );
    }

    #[test]
    fn extended_subclusters() {
        // 128 KiB cluster, 4 KiB subclusters: bitmap from the digest's example.
        let bitmap = 0x0000_0100_0000_001e;
        let e = 0x8000_0000_0006_0000;
        assert_eq!(
            d(G128X, e, bitmap, 0).unwrap(),
            (Mapping::Unallocated, 4096)
        );
        assert_eq!(
            d(G128X, e, bitmap, 4096).unwrap(),
            (Mapping::Data(HostOffset(0x60000 + 4096)), 4 * 4096)
        );
        assert_eq!(d(G128X, e, bitmap, 32768).unwrap(), (Mapping::Zero, 4096));
        assert_eq!(
            d(G128X, 0, 0xffff_ffff_0000_0000, 0).unwrap(),
            (Mapping::Zero, 131072)
        );
        assert!(d(G128X, e, 0x0000_0001_0000_0001, 0).is_err());
        assert!(d(G128X, 0, 1, 0).is_err());
        // Bit 0 of the entry is not a zero flag with extended L2.
        assert_eq!(d(G128X, 1, 0, 0).unwrap().0, Mapping::Unallocated);
    }
}

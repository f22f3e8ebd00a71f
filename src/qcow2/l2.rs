//! L1 and L2 entries decoded into one `Mapping` per guest range (docs/interop/qcow2.rst,
//! "Cluster mapping" and "Extended L2 Entries"). Pure: entries in, mapping out. The decisions
//! mirror QEMU's `qcow2_get_subcluster_type`.

use crate::error::{Error, Result};

pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Where a guest range of one layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Plain data at this host offset (the offset of the first byte of the range).
    Data(u64),
    /// The whole cluster is compressed; `host_off`/`len` is the span holding its stream.
    Compressed { host_off: u64, len: u64 },
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

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
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
    pub fn compressed_span(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let host_off = entry & ((1u64 << shift) - 1);
        let nsect = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (host_off, nsect * 512 - (host_off & 511))
    }

    /// Decode one L2 entry (`bitmap` is the second word of an extended entry, else 0) at
    /// `in_off` bytes into its cluster. Returns the mapping and how many bytes from `in_off`
    /// it covers without change (to the end of the cluster at most).
    pub fn decode(&self, entry: u64, bitmap: u64, in_off: u64) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size();
        let rest = cs - in_off;
        if entry & OFLAG_COMPRESSED != 0 {
            if self.extended && bitmap != 0 {
                return Err(Error::corrupt(format!(
                    "compressed cluster with non-zero subcluster bitmap {bitmap:#x}"
                )));
            }
            let (host_off, len) = self.compressed_span(entry);
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
                Mapping::Data(offset + in_off)
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
            (1, _) => Mapping::Data(offset + in_off),
            _ => Mapping::Unallocated,
        };
        Ok((m, run))
    }
}

/// The L2 table offset an L1 entry points to (0 = unallocated), checked for alignment.
pub fn l1_entry_offset(entry: u64, cluster_size: u64) -> Result<u64> {
    let off = entry & L1E_OFFSET_MASK;
    if off % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "L2 table offset {off:#x} is not cluster aligned"
        )));
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(G64.decode(0, 0, 0).unwrap(), (Mapping::Unallocated, 65536));
        assert_eq!(G64.decode(1, 0, 4096).unwrap(), (Mapping::Zero, 61440));
        assert_eq!(
            G64.decode(0x8000_0000_0005_0001, 0, 0).unwrap().0,
            Mapping::Zero,
            "preallocated zero cluster keeps its offset but reads zeros"
        );
        assert_eq!(
            G64.decode(0x8000_0000_0004_0000, 0, 10).unwrap(),
            (Mapping::Data(0x40000 + 10), 65526)
        );
        assert!(G64.decode(0x8000_0000_0004_0200, 0, 0).is_err());
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: x = 54, 8 count bits; host 0x50123, 3 additional sectors.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x50123;
        let (m, _) = G64.decode(e, 0, 0).unwrap();
        assert_eq!(
            m,
            Mapping::Compressed {
                host_off: 0x50123,
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
            G128X.decode(e, bitmap, 0).unwrap(),
            (Mapping::Unallocated, 4096)
        );
        assert_eq!(
            G128X.decode(e, bitmap, 4096).unwrap(),
            (Mapping::Data(0x60000 + 4096), 4 * 4096)
        );
        assert_eq!(
            G128X.decode(e, bitmap, 32768).unwrap(),
            (Mapping::Zero, 4096)
        );
        assert_eq!(
            G128X.decode(0, 0xffff_ffff_0000_0000, 0).unwrap(),
            (Mapping::Zero, 131072)
        );
        assert!(G128X.decode(e, 0x0000_0001_0000_0001, 0).is_err());
        assert!(G128X.decode(0, 1, 0).is_err());
        // Bit 0 of the entry is not a zero flag with extended L2.
        assert_eq!(G128X.decode(1, 0, 0).unwrap().0, Mapping::Unallocated);
    }
}

//! The bitmap directory and bitmap tables (docs/interop/qcow2.rst, "Bitmaps extension").
//! Pure parsing; reading the data clusters lives in `image.rs`.

use super::bytes::{u16_at, u32_at, u64_at, u64_table};
use super::types::HostOffset;
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
/// The flags QEMU accepts (it refuses bit 2, extra_data_compatible, with the rest).
const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO;

/// QEMU's limits on one bitmap (block/qcow2-bitmap.c, `check_dir_entry`).
pub const MIN_GRANULARITY_BITS: u8 = 9;
pub const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Bitmap data (table entries times the cluster size).
const MAX_DATA_BYTES: u64 = 512 << 20;
const MAX_NAME_BYTES: usize = 1023;

/// QEMU's limit on bitmaps per image.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the directory size (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
pub const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    pub name: String,
    pub bitmap_table_offset: u64,
    pub bitmap_table_size: u32,
    pub flags: u32,
    pub bitmap_type: u8,
    pub granularity_bits: u8,
    pub extra_data_size: u32,
    /// Byte offset of this entry inside the directory (for in-place flag updates).
    pub dir_pos: usize,
}

impl BitmapEntry {
    /// The granularity in bytes (2^63 for granularity_bits past 63, which QEMU refuses anyway).
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits.min(63)
    }

    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Enabled: QEMU records every write into it.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Why this bitmap's bits cannot be trusted on a disk of `size` bytes with `cluster_size`
    /// clusters, if they cannot: in use, or refused by QEMU (`violation`).
    pub fn distrust(&self, size: u64, cluster_size: u64) -> Option<String> {
        if self.in_use() {
            return Some(format!(
                "bitmap '{}' is in use (a QEMU crashed or still has the image open read-write)",
                self.name
            ));
        }
        self.violation(size, cluster_size)
    }

    /// What QEMU refuses in this entry (`check_dir_entry`, `bitmap_list_load`,
    /// `load_bitmap_data`); QEMU then opens the image not at all. The table size must match
    /// the disk only when the bitmap is not in use, as in QEMU.
    pub fn violation(&self, size: u64, cluster_size: u64) -> Option<String> {
        let n = u64::from(self.bitmap_table_size);
        let why = if self.flags & !FLAGS_KNOWN != 0 {
            format!(
                "has flags {:#x} QEMU does not know",
                self.flags & !FLAGS_KNOWN
            )
        } else if self.bitmap_type != 1 {
            format!("has unknown type {}", self.bitmap_type)
        } else if self.extra_data_size != 0 {
            format!(
                "has {} bytes of extra data (QEMU accepts none)",
                self.extra_data_size
            )
        } else if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            format!(
                "has granularity_bits {}, outside QEMU's {MIN_GRANULARITY_BITS}..{MAX_GRANULARITY_BITS}",
                self.granularity_bits
            )
        } else if self.name.len() > MAX_NAME_BYTES {
            format!(
                "has a name of {} bytes (QEMU allows {MAX_NAME_BYTES})",
                self.name.len()
            )
        } else if n == 0 || self.bitmap_table_offset == 0 {
            "has no bitmap table".to_string()
        } else if self.bitmap_table_offset % cluster_size != 0 {
            format!(
                "table offset {:#x} is not cluster aligned",
                self.bitmap_table_offset
            )
        } else if n > MAX_TABLE_ENTRIES || n.saturating_mul(cluster_size) > MAX_DATA_BYTES {
            format!("table of {n} entries is larger than QEMU allows (512 MiB of bitmap data)")
        } else if !self.in_use() && n != self.table_size_for(size, cluster_size) {
            format!(
                "table has {n} entries, the disk size needs {}",
                self.table_size_for(size, cluster_size)
            )
        } else {
            return None;
        };
        Some(format!("bitmap '{}' {why}", self.name))
    }

    /// Bitmap table entries needed for a disk of `size` bytes with `cluster_size` clusters.
    pub fn table_size_for(&self, size: u64, cluster_size: u64) -> u64 {
        size.div_ceil(self.granularity())
            .div_ceil(8)
            .div_ceil(cluster_size)
    }
}

/// Parse `dir` (the whole directory, `bitmap_directory_size` bytes) holding `nb` entries.
pub fn parse_directory(dir: &[u8], nb: u32) -> Result<Vec<BitmapEntry>> {
    if nb == 0 || nb > MAX_BITMAPS {
        return Err(Error::corrupt(format!(
            "bitmaps extension claims {nb} bitmaps (1..65535)"
        )));
    }
    let mut out = Vec::new();
    let mut off = 0usize;
    for i in 0..nb {
        let what = |f: &str| format!("bitmap directory entry {i}: {f}");
        let bitmap_table_offset = u64_at(dir, off, &what("bitmap_table_offset"))?;
        let bitmap_table_size = u32_at(dir, off + 8, &what("bitmap_table_size"))?;
        let flags = u32_at(dir, off + 12, &what("flags"))?;
        let bitmap_type = *dir
            .get(off + 16)
            .ok_or_else(|| Error::corrupt(what("type")))?;
        let granularity_bits = *dir
            .get(off + 17)
            .ok_or_else(|| Error::corrupt(what("granularity")))?;
        let name_size = u16_at(dir, off + 18, &what("name_size"))? as usize;
        let extra_data_size = u32_at(dir, off + 20, &what("extra_data_size"))?;
        let name_start = off + 24 + extra_data_size as usize;
        let name_bytes = name_start
            .checked_add(name_size)
            .and_then(|end| dir.get(name_start..end))
            .ok_or_else(|| Error::corrupt(what("name runs past the directory")))?;
        if name_size == 0 {
            return Err(Error::corrupt(what("empty name")));
        }
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| Error::corrupt(what("name is not UTF-8")))?;
        if out.iter().any(|b: &BitmapEntry| b.name == name) {
            return Err(Error::corrupt(format!(
                "bitmap '{name}' appears twice in the directory"
            )));
        }
        out.push(BitmapEntry {
            name,
            bitmap_table_offset,
            bitmap_table_size,
            flags,
            bitmap_type,
            granularity_bits,
            extra_data_size,
            dir_pos: off,
        });
        off = (name_start + name_size).div_ceil(8) * 8;
    }
    if off != dir.len() {
        return Err(Error::corrupt(format!(
            "bitmap directory of {} bytes holds {nb} entries in {off} (QEMU: broken directory)",
            dir.len()
        )));
    }
    Ok(out)
}

/// Byte position of the flags inside a directory entry.
const AT_FLAGS: u64 = 12;

/// The directory holding `entries` as stored, and each entry's position in it.
pub fn serialize_directory(entries: &[BitmapEntry]) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut pos = Vec::new();
    for e in entries {
        pos.push(out.len());
        out.extend_from_slice(&e.bitmap_table_offset.to_be_bytes());
        out.extend_from_slice(&e.bitmap_table_size.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(e.bitmap_type);
        out.push(e.granularity_bits);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        while out.len() % 8 != 0 {
            out.push(0);
        }
    }
    (out, pos)
}

fn wio(what: &str, e: std::io::Error) -> Error {
    Error::io(what.to_string(), e)
}

/// Store `flags` as the flags of entry `e` of the directory at `dir`, in place.
pub fn store_flags(file: &File, dir: HostOffset, e: &BitmapEntry, flags: u32) -> Result<()> {
    file.write_all_at(&flags.to_be_bytes(), dir.0 + e.dir_pos as u64 + AT_FLAGS)
        .map_err(|er| wio("write bitmap directory", er))
}

/// The raw table of entry `e` as stored (one word per data cluster).
pub fn load_table(file: &File, e: &BitmapEntry) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; e.bitmap_table_size as usize * 8];
    file.read_exact_at(&mut raw, e.bitmap_table_offset)
        .map_err(|er| wio("read bitmap table", er))?;
    Ok(u64_table(&raw))
}

/// Table entry `idx` of bitmap `e` as stored now, decoded.
pub fn load_table_entry(
    file: &File,
    e: &BitmapEntry,
    idx: u64,
    cluster_size: u64,
) -> Result<TableEntry> {
    let mut raw = [0u8; 8];
    file.read_exact_at(&mut raw, e.bitmap_table_offset + idx * 8)
        .map_err(|er| wio("read bitmap table", er))?;
    decode_table_entry(u64::from_be_bytes(raw), cluster_size)
}

/// Store table entry `idx` of bitmap `e`: its bits are in the data cluster at `data`.
pub fn store_table_entry(file: &File, e: &BitmapEntry, idx: u64, data: HostOffset) -> Result<()> {
    file.write_all_at(&data.0.to_be_bytes(), e.bitmap_table_offset + idx * 8)
        .map_err(|er| wio("write bitmap table", er))
}

/// One bitmap table entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// The cluster's bits are all 0 or all 1.
    Fill(bool),
    /// The bits are stored in the data cluster at this host offset.
    Data(HostOffset),
}

/// Decode a bitmap table entry, checking reserved bits and alignment.
pub fn decode_table_entry(e: u64, cluster_size: u64) -> Result<TableEntry> {
    let off = e & 0x00ff_ffff_ffff_fe00;
    if e & 0xff00_0000_0000_01fe != 0 {
        return Err(Error::corrupt(format!(
            "bitmap table entry {e:#x} has reserved bits set"
        )));
    }
    if off == 0 {
        return Ok(TableEntry::Fill(e & 1 != 0));
    }
    if e & 1 != 0 {
        return Err(Error::corrupt(format!(
            "bitmap table entry {e:#x} has both a data cluster and the all-ones bit"
        )));
    }
    if off % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "bitmap data cluster {off:#x} is not cluster aligned"
        )));
    }
    Ok(TableEntry::Data(HostOffset(off)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, table: u64, flags: u32, gran: u8) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&table.to_be_bytes());
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&flags.to_be_bytes());
        e.push(1);
        e.push(gran);
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.extend_from_slice(name.as_bytes());
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e
    }

    #[test]
    fn parses_two_entries() {
        let mut d = entry("c1", 0x50000, FLAG_AUTO, 16);
        assert_eq!(d.len(), 32);
        d.extend(entry(
            "a-name-of-twenty-eight-bytes",
            0x60000,
            FLAG_IN_USE,
            16,
        ));
        let v = parse_directory(&d, 2).unwrap();
        assert_eq!(v[0].name, "c1");
        assert!(v[0].auto() && v[0].distrust(1 << 20, 65536).is_none());
        assert!(v[1].distrust(1 << 20, 65536).unwrap().contains("in use"));
        assert!(parse_directory(&d, 3).is_err());
        assert!(parse_directory(&d[..40], 2).is_err());
    }

    #[test]
    fn table_entries() {
        assert_eq!(
            decode_table_entry(0, 65536).unwrap(),
            TableEntry::Fill(false)
        );
        assert_eq!(
            decode_table_entry(1, 65536).unwrap(),
            TableEntry::Fill(true)
        );
        assert_eq!(
            decode_table_entry(0x70000, 65536).unwrap(),
            TableEntry::Data(HostOffset(0x70000))
        );
        assert!(decode_table_entry(0x70200, 65536).is_err());
        assert!(decode_table_entry(2, 65536).is_err());
    }

    #[test]
    fn directory_round_trips() {
        let entry = |name: &str, flags| BitmapEntry {
            name: name.to_string(),
            bitmap_table_offset: 0x30000,
            bitmap_table_size: 1,
            flags,
            bitmap_type: 1,
            granularity_bits: 16,
            extra_data_size: 0,
            dir_pos: 0,
        };
        let entries = vec![entry("a", FLAG_AUTO), entry("longer-name", FLAG_IN_USE)];
        let (bytes, pos) = serialize_directory(&entries);
        assert_eq!(bytes.len() % 8, 0);
        let back = parse_directory(&bytes, 2).unwrap();
        assert_eq!(back.iter().map(|e| e.dir_pos).collect::<Vec<_>>(), pos);
        for (a, b) in back.iter().zip(&entries) {
            assert_eq!(
                BitmapEntry {
                    dir_pos: 0,
                    ..a.clone()
                },
                *b
            );
        }
    }

    #[test]
    fn qemu_constraints() {
        let d = entry("b", 0x50000, FLAG_AUTO, 16);
        let ok = parse_directory(&d, 1).unwrap().remove(0);
        let (size, cs) = (1u64 << 20, 65536);
        assert_eq!(ok.violation(size, cs), None);
        let why = |f: &dyn Fn(&mut BitmapEntry)| {
            let mut e = ok.clone();
            f(&mut e);
            e.violation(size, cs).unwrap_or_default()
        };
        for bits in [0u8, 8, 32, 63, 64, 255] {
            let w = why(&|e| e.granularity_bits = bits);
            assert!(
                w.contains(&format!("granularity_bits {bits}, outside")),
                "{w}"
            );
        }
        assert!(why(&|e| e.flags |= 4).contains("flags 0x4"));
        assert!(why(&|e| e.bitmap_type = 2).contains("type 2"));
        assert!(why(&|e| e.extra_data_size = 8).contains("extra data"));
        assert!(why(&|e| e.name = "n".repeat(1024)).contains("1024 bytes"));
        assert!(why(&|e| e.bitmap_table_offset = 0).contains("no bitmap table"));
        assert!(why(&|e| e.bitmap_table_size = 0).contains("no bitmap table"));
        assert!(why(&|e| e.bitmap_table_offset = 0x50200).contains("not cluster aligned"));
        assert!(why(&|e| e.bitmap_table_size = 8193).contains("larger than QEMU allows"));
        assert!(why(&|e| e.bitmap_table_size = 2).contains("the disk size needs 1"));
        // In use: the size may be stale, as in QEMU; the bits are distrusted anyway.
        let mut e = ok.clone();
        e.flags |= FLAG_IN_USE;
        e.bitmap_table_size = 2;
        assert_eq!(e.violation(size, cs), None);
        assert!(e.distrust(size, cs).unwrap().contains("in use"));
        // A name QEMU refuses, bits past 63: parsed (the checkpoint is invalid), no overflow.
        let mut d = entry("b", 0x50000, 0, 200);
        d.extend(entry(&"x".repeat(1100), 0x60000, 0, 16));
        let v = parse_directory(&d, 2).unwrap();
        assert_eq!(v[0].granularity(), 1 << 63);
        assert!(v[1]
            .violation(size, cs)
            .unwrap()
            .contains("name of 1100 bytes"));
        // Bytes past the last entry: QEMU's "broken bitmap directory".
        let mut d = entry("b", 0x50000, 0, 16);
        d.extend([0u8; 8]);
        assert!(parse_directory(&d, 1).unwrap_err().msg.contains("broken"));
        // A data cluster with the all-ones bit.
        assert!(decode_table_entry(0x70001, 65536).is_err());
    }
}

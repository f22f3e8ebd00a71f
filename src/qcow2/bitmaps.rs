//! The bitmap directory and bitmap tables (docs/interop/qcow2.rst, "Bitmaps extension").
//! Pure parsing; reading the data clusters lives in `image.rs`.

use super::bytes::{u16_at, u32_at, u64_at};
use crate::error::{Error, Result};

pub const FLAG_IN_USE: u32 = 1 << 0;
pub const FLAG_AUTO: u32 = 1 << 1;
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const FLAGS_KNOWN: u32 = 0x7;

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
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }

    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Enabled: QEMU records every write into it.
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// Why this bitmap's bits cannot be trusted, if they cannot.
    pub fn distrust(&self) -> Option<String> {
        if self.in_use() {
            Some(format!(
                "bitmap '{}' is in use (a QEMU crashed or still has the image open read-write)",
                self.name
            ))
        } else if self.flags & !FLAGS_KNOWN != 0 {
            Some(format!(
                "bitmap '{}' has unknown flags {:#x}",
                self.name,
                self.flags & !FLAGS_KNOWN
            ))
        } else if self.bitmap_type != 1 {
            Some(format!(
                "bitmap '{}' has unknown type {}",
                self.name, self.bitmap_type
            ))
        } else if self.extra_data_size != 0 && self.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            Some(format!(
                "bitmap '{}' has extra data ckptfs cannot interpret",
                self.name
            ))
        } else {
            None
        }
    }

    /// Bitmap table entries needed for a disk of `size` bytes with `cluster_size` clusters.
    pub fn table_size_for(&self, size: u64, cluster_size: u64) -> u64 {
        size.div_ceil(self.granularity())
            .div_ceil(8)
            .div_ceil(cluster_size)
    }
}

/// Parse `dir` (the whole directory, `bitmap_directory_size` bytes) holding `nb` entries.
pub fn parse_directory(dir: &[u8], nb: u32, cluster_size: u64) -> Result<Vec<BitmapEntry>> {
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
        if name_size == 0 || name_size > 1023 {
            return Err(Error::corrupt(what(&format!(
                "name of {name_size} bytes (1..1023)"
            ))));
        }
        let name = String::from_utf8(name_bytes.to_vec())
            .map_err(|_| Error::corrupt(what("name is not UTF-8")))?;
        if bitmap_table_offset % cluster_size != 0
            || bitmap_table_offset == 0 && bitmap_table_size != 0
        {
            return Err(Error::corrupt(format!(
                "bitmap '{name}': table offset {bitmap_table_offset:#x} is not cluster aligned"
            )));
        }
        if granularity_bits > 63 {
            return Err(Error::corrupt(format!(
                "bitmap '{name}': granularity_bits {granularity_bits} > 63"
            )));
        }
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
    Ok(out)
}

/// One bitmap table entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// The cluster's bits are all 0 or all 1.
    Fill(bool),
    /// The bits are stored in the data cluster at this host offset.
    Data(u64),
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
    if off % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "bitmap data cluster {off:#x} is not cluster aligned"
        )));
    }
    Ok(TableEntry::Data(off))
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
        let v = parse_directory(&d, 2, 65536).unwrap();
        assert_eq!(v[0].name, "c1");
        assert!(v[0].auto() && v[0].distrust().is_none());
        assert!(v[1].distrust().unwrap().contains("in use"));
        assert!(parse_directory(&d, 3, 65536).is_err());
        assert!(parse_directory(&d[..40], 2, 65536).is_err());
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
            TableEntry::Data(0x70000)
        );
        assert!(decode_table_entry(0x70200, 65536).is_err());
        assert!(decode_table_entry(2, 65536).is_err());
    }
}

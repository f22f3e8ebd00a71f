//! The internal snapshot table (docs/interop/qcow2.rst, "Snapshots"). Pure parsing.

use super::bytes::{u16_at, u32_at, u64_at};
use crate::error::{Error, Result};

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub date_sec: u32,
    pub date_nsec: u32,
    /// The disk size at the snapshot (extra data), if recorded.
    pub disk_size: Option<u64>,
}

/// Parse `nb` snapshot entries from `buf`, which starts at `snapshots_offset`.
/// Returns the entries and the number of bytes they occupy.
pub fn parse_table(buf: &[u8], nb: u32) -> Result<(Vec<SnapshotEntry>, usize)> {
    let mut out = Vec::new();
    let mut off = 0usize;
    for i in 0..nb {
        let what = |f: &str| format!("snapshot table entry {i}: {f}");
        let l1_table_offset = u64_at(buf, off, &what("l1_table_offset"))?;
        let l1_size = u32_at(buf, off + 8, &what("l1_size"))?;
        let id_size = u16_at(buf, off + 12, &what("id_str_size"))? as usize;
        let name_size = u16_at(buf, off + 14, &what("name_size"))? as usize;
        let date_sec = u32_at(buf, off + 16, &what("date_sec"))?;
        let date_nsec = u32_at(buf, off + 20, &what("date_nsec"))?;
        let extra = u32_at(buf, off + 36, &what("extra_data_size"))? as usize;
        if extra > 1024 {
            return Err(Error::corrupt(what(&format!(
                "extra data of {extra} bytes"
            ))));
        }
        let extra_start = off + 40;
        let disk_size = if extra >= 16 {
            Some(u64_at(buf, extra_start + 8, &what("disk_size"))?)
        } else {
            None
        };
        let id_start = extra_start + extra;
        let id = text(buf, id_start, id_size).ok_or_else(|| Error::corrupt(what("id string")))?;
        let name =
            text(buf, id_start + id_size, name_size).ok_or_else(|| Error::corrupt(what("name")))?;
        out.push(SnapshotEntry {
            id,
            name,
            l1_table_offset,
            l1_size,
            date_sec,
            date_nsec,
            disk_size,
        });
        off = (id_start + id_size + name_size).div_ceil(8) * 8;
    }
    Ok((out, off))
}

fn text(buf: &[u8], start: usize, len: usize) -> Option<String> {
    let bytes = buf.get(start..start.checked_add(len)?)?;
    String::from_utf8(bytes.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_with_disk_size() {
        let mut b = Vec::new();
        b.extend_from_slice(&0x30000u64.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&1700000000u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&16u32.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(4u64 << 20).to_be_bytes());
        b.extend_from_slice(b"1s1");
        let (v, used) = parse_table(&b, 1).unwrap();
        assert_eq!(v[0].name, "s1");
        assert_eq!(v[0].id, "1");
        assert_eq!(v[0].disk_size, Some(4 << 20));
        assert_eq!(used, 64);
        assert!(parse_table(&b[..50], 1).is_err());
        assert!(parse_table(&b, 2).is_err());
    }
}

//! Checked big-endian field access on untrusted byte buffers: every accessor returns an error
//! instead of panicking when the field does not fit in the buffer.

use crate::error::{Error, Result};

fn field<const N: usize>(buf: &[u8], off: usize, what: &str) -> Result<[u8; N]> {
    off.checked_add(N)
        .and_then(|end| buf.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| {
            Error::corrupt(format!(
                "{what} at byte {off} lies past the end of its structure"
            ))
        })
}

pub fn u16_at(buf: &[u8], off: usize, what: &str) -> Result<u16> {
    field::<2>(buf, off, what).map(u16::from_be_bytes)
}

pub fn u32_at(buf: &[u8], off: usize, what: &str) -> Result<u32> {
    field::<4>(buf, off, what).map(u32::from_be_bytes)
}

pub fn u64_at(buf: &[u8], off: usize, what: &str) -> Result<u64> {
    field::<8>(buf, off, what).map(u64::from_be_bytes)
}

/// `len` bytes at `off`, or an error naming `what`.
pub fn slice_at<'a>(buf: &'a [u8], off: usize, len: usize, what: &str) -> Result<&'a [u8]> {
    off.checked_add(len)
        .and_then(|end| buf.get(off..end))
        .ok_or_else(|| {
            Error::corrupt(format!(
                "{what} ({len} bytes at {off}) lies past the end of its structure"
            ))
        })
}

/// Decode an array of big-endian u64 table entries.
pub fn u64_table(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Round `v` up to a multiple of `align` (a power of two), or None on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

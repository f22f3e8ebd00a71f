//! The qcow2 header, its extensions and the refuse list (docs/interop/qcow2.rst, "Header").
//! `Header::parse` takes the bytes of cluster 0 (or as much of the file as exists) and the file
//! length, and returns a header whose table offsets have been checked against both.

use super::bytes::{slice_at, u32_at, u64_at};
use super::types::HostOffset;
use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;

pub const MAGIC: u32 = 0x5146_49fb;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte positions of the header fields a writer stores.
const AT_BACKING_FILE_OFFSET: usize = 8;
const AT_REFCOUNT_TABLE_OFFSET: u64 = 48;
const AT_AUTOCLEAR_FEATURES: usize = 88;

/// Largest L1 table QEMU opens (QCOW_MAX_L1_SIZE, 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU opens (QCOW_MAX_REFTABLE_SIZE, 8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// A backing file name as stored: any bytes (QEMU takes them as a C string, so need not be
/// UTF-8). Paths are made from the bytes; people see them lossily.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingName(Vec<u8>);

impl BackingName {
    /// Every stored byte (what a header rewrite writes back).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name as QEMU uses it: up to the first NUL byte, as a path.
    pub fn as_path(&self) -> &std::path::Path {
        use std::os::unix::ffi::OsStrExt;
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        std::path::Path::new(std::ffi::OsStr::from_bytes(&self.0[..end]))
    }
}

impl std::fmt::Display for BackingName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_path().to_string_lossy().fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Deflate,
    Zstd,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub bitmap_directory_size: u64,
    pub bitmap_directory_offset: u64,
}

impl BitmapsExt {
    /// Decode the extension's data.
    pub fn parse(data: &[u8]) -> Result<BitmapsExt> {
        if data.len() < 24 {
            return Err(Error::corrupt(format!(
                "bitmaps extension of {} bytes (needs 24)",
                data.len()
            )));
        }
        Ok(BitmapsExt {
            nb_bitmaps: u32_at(data, 0, "nb_bitmaps")?,
            bitmap_directory_size: u64_at(data, 8, "bitmap_directory_size")?,
            bitmap_directory_offset: u64_at(data, 16, "bitmap_directory_offset")?,
        })
    }

    /// The extension's data as stored (24 bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&self.nb_bitmaps.to_be_bytes());
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&self.bitmap_directory_size.to_be_bytes());
        d.extend_from_slice(&self.bitmap_directory_offset.to_be_bytes());
        d
    }
}

/// A parsed and checked qcow2 header. Field names follow the spec.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// The backing file name as written in the image.
    pub backing_file: Option<BackingName>,
    /// The backing-format extension, if present.
    pub backing_format: Option<String>,
    pub bitmaps: Option<BitmapsExt>,
    /// Every header extension as stored, in order (a rewrite keeps those it does not change).
    pub extensions: Vec<(u32, Vec<u8>)>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Parse and check the header. `buf` holds the start of the file (at least the first
    /// cluster if the file is that long); `file_len` is the file's length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.is_empty() {
            return Err(Error::invalid("empty file, not a qcow2 image"));
        }
        if buf.len() < 4 || u32_at(buf, 0, "magic")? != MAGIC {
            return Err(Error::invalid("not a qcow2 image (no QFI\\xfb magic)"));
        }
        if buf.len() < 72 {
            return Err(Error::corrupt(format!(
                "truncated: qcow2 header needs 72 bytes, file has {}",
                buf.len()
            )));
        }
        let version = u32_at(buf, 4, "version")?;
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "qcow2 version {version} (only 2 and 3 exist)"
            )));
        }
        let cluster_bits = u32_at(buf, 20, "cluster_bits")?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "cluster_bits {cluster_bits} outside 9..21 (512 B to 2 MiB clusters)"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: u64_at(buf, 8, "backing_file_offset")?,
            backing_file_size: u32_at(buf, 16, "backing_file_size")?,
            cluster_bits,
            size: u64_at(buf, 24, "size")?,
            crypt_method: u32_at(buf, 32, "crypt_method")?,
            l1_size: u32_at(buf, 36, "l1_size")?,
            l1_table_offset: u64_at(buf, 40, "l1_table_offset")?,
            refcount_table_offset: u64_at(buf, 48, "refcount_table_offset")?,
            refcount_table_clusters: u32_at(buf, 56, "refcount_table_clusters")?,
            nb_snapshots: u32_at(buf, 60, "nb_snapshots")?,
            snapshots_offset: u64_at(buf, 64, "snapshots_offset")?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
            extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(Error::corrupt(format!(
                    "truncated: qcow2 v3 header needs 104 bytes, file has {}",
                    buf.len()
                )));
            }
            h.incompatible_features = u64_at(buf, 72, "incompatible_features")?;
            h.compatible_features = u64_at(buf, 80, "compatible_features")?;
            h.autoclear_features = u64_at(buf, 88, "autoclear_features")?;
            h.refcount_order = u32_at(buf, 96, "refcount_order")?;
            h.header_length = u32_at(buf, 100, "header_length")?;
            if h.header_length < 104
                || h.header_length % 8 != 0
                || u64::from(h.header_length) > cluster_size
            {
                return Err(Error::corrupt(format!(
                    "invalid header_length {}",
                    h.header_length
                )));
            }
        }
        h.check_features(buf)?;
        h.check_tables(file_len)?;
        h.parse_extensions(buf)?;
        h.parse_backing_name(buf)?;
        Ok(h)
    }

    fn check_features(&mut self, buf: &[u8]) -> Result<()> {
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "external data file (data_file=) images are not supported",
            ));
        }
        if self.crypt_method != 0 {
            let what = match self.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::unsupported(format!(
                "encrypted image ({what}, crypt_method {}) is not supported",
                self.crypt_method
            )));
        }
        if self.refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "refcount_order {} > 6",
                self.refcount_order
            )));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(Error::corrupt(
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        if self.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            if self.header_length < 105 {
                return Err(Error::corrupt(
                    "compression type bit set but header has no compression_type field",
                ));
            }
            self.compression_type = match buf.get(104) {
                Some(0) => CompressionType::Deflate,
                Some(1) => CompressionType::Zstd,
                Some(t) => return Err(Error::unsupported(format!("unknown compression type {t}"))),
                None => return Err(Error::corrupt("truncated before compression_type")),
            };
        } else if self.header_length >= 105 && buf.get(104).copied().unwrap_or(0) != 0 {
            return Err(Error::corrupt(
                "compression_type set without the compression type incompatible bit",
            ));
        }
        Ok(())
    }

    fn check_tables(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let entries_per_l2 = cs / if self.extended_l2() { 16 } else { 8 };
        let bytes_per_l1 = entries_per_l2 * cs;
        let needed = self.size.div_ceil(bytes_per_l1);
        if u64::from(self.l1_size) < needed {
            return Err(Error::corrupt(format!(
                "L1 table has {} entries, virtual size {} needs {needed}",
                self.l1_size, self.size
            )));
        }
        if self.size > i64::MAX as u64 || u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "virtual size {} or L1 table of {} entries is larger than QEMU opens",
                self.size, self.l1_size
            )));
        }
        if self.l1_size > 0 {
            check_region(
                "L1 table",
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
                cs,
                file_len,
            )?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount table of {} clusters is larger than QEMU opens",
                self.refcount_table_clusters
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::corrupt("image has no refcount table"));
        }
        check_region(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!(
                "{} internal snapshots (QEMU allows 65536)",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            check_region("snapshot table", self.snapshots_offset, 40, cs, file_len)?;
        }
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let end = extensions_end(self.backing_file_offset, self.cluster_size());
        let (exts, _) = extensions(buf, self.header_length, end)?;
        let mut seen = Vec::new();
        for (ty, data) in exts {
            if seen.contains(&ty) {
                return Err(Error::corrupt(format!(
                    "header extension {ty:#x} appears twice"
                )));
            }
            seen.push(ty);
            self.extensions.push((ty, data.to_vec()));
            match ty {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(string_field(data, "backing format")?)
                }
                EXT_BITMAPS => self.bitmaps = Some(BitmapsExt::parse(data)?),
                EXT_CRYPTO => {
                    return Err(Error::unsupported(
                        "encrypted image (full-disk-encryption extension)",
                    ))
                }
                EXT_DATA_FILE => {
                    return Err(Error::unsupported(
                        "external data file images are not supported",
                    ))
                }
                EXT_FEATURE_NAMES => {}
                _ => {}
            }
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        if self.backing_file_size == 0 || self.backing_file_size > 1023 {
            return Err(Error::corrupt(format!(
                "backing file name of {} bytes (1..1023 allowed)",
                self.backing_file_size
            )));
        }
        let end = self
            .backing_file_offset
            .checked_add(u64::from(self.backing_file_size));
        if end.is_none_or(|e| e > self.cluster_size()) {
            return Err(Error::corrupt(format!(
                "backing file name at byte {} lies outside the first cluster",
                self.backing_file_offset
            )));
        }
        let off = self.backing_file_offset as usize;
        let name = slice_at(
            buf,
            off,
            self.backing_file_size as usize,
            "backing file name",
        )
        .map_err(|_| {
            Error::corrupt("truncated: backing file name lies past the end of the file")
        })?;
        self.backing_file = Some(BackingName(name.to_vec()));
        Ok(())
    }
}

/// Where header extensions must end, as QEMU reads them: at the backing file name if there is
/// one, else at the end of the first cluster.
fn extensions_end(backing_file_offset: u64, cluster_size: u64) -> u64 {
    match backing_file_offset {
        0 => cluster_size,
        o => o.min(cluster_size),
    }
}

/// One header extension: its type and data.
type Extension<'a> = (u32, &'a [u8]);

/// Walk the header extensions of `c0` (the start of the file) from `header_length` up to
/// `end` (`extensions_end`): the (type, data) pairs before the end marker, and the
/// offset of the end marker (or `end` where the extensions fill the area, as QEMU allows).
/// An extension that runs past `end` is refused, as QEMU refuses it.
fn extensions(c0: &[u8], header_length: u32, end: u64) -> Result<(Vec<Extension<'_>>, usize)> {
    let end_at = usize::try_from(end).unwrap_or(usize::MAX);
    let area = &c0[..c0.len().min(end_at)];
    let past = || {
        Error::corrupt(format!(
            "header extensions run past byte {end} (the first cluster or the backing file name)"
        ))
    };
    let mut out = Vec::new();
    let mut off = header_length as usize;
    while off < end_at {
        let ty = u32_at(area, off, "header extension type").map_err(|_| past())?;
        let len = u32_at(area, off + 4, "header extension length").map_err(|_| past())? as usize;
        if ty == EXT_END {
            return Ok((out, off));
        }
        out.push((
            ty,
            slice_at(area, off + 8, len, "header extension").map_err(|_| past())?,
        ));
        off = off.checked_add(8 + len.div_ceil(8) * 8).ok_or_else(past)?;
    }
    Ok((out, off))
}

fn wio(e: std::io::Error) -> Error {
    Error::io("write header", e)
}

/// Store the refcount table location (offset and clusters, one write).
pub fn store_refcount_table(file: &File, offset: HostOffset, clusters: u32) -> Result<()> {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&offset.0.to_be_bytes());
    b[8..].copy_from_slice(&clusters.to_be_bytes());
    file.write_all_at(&b, AT_REFCOUNT_TABLE_OFFSET).map_err(wio)
}

/// Store the autoclear feature bits.
pub fn store_autoclear(file: &File, bits: u64) -> Result<()> {
    file.write_all_at(&bits.to_be_bytes(), AT_AUTOCLEAR_FEATURES as u64)
        .map_err(wio)
}

/// Store `bitmaps` as the bitmaps extension of the image `h` was parsed from (see
/// `rewrite_extensions`), in one write of the first cluster.
pub fn store_bitmaps_ext(file: &File, h: &Header, bitmaps: Option<BitmapsExt>) -> Result<()> {
    let mut fields = vec![0u8; h.header_length as usize];
    super::image::read_exact_or_zero(file, 0, &mut fields)
        .map_err(|e| Error::io("read header", e))?;
    let out = rewrite_extensions(&fields, h, bitmaps)?;
    file.write_all_at(&out, 0).map_err(wio)
}

/// The first cluster rewritten as QEMU's header update writes it (the whole cluster, zero
/// filled): `fields` (the header fields as on disk now, `header_length` bytes at least: a
/// writer may have changed some since `h` was parsed), the extensions found at open with
/// `bitmaps` as the bitmaps extension (dropped if None) and the matching autoclear bit, then
/// the backing file name.
fn rewrite_extensions(fields: &[u8], h: &Header, bitmaps: Option<BitmapsExt>) -> Result<Vec<u8>> {
    let cs = h.cluster_size() as usize;
    if h.version < 3 {
        return Err(Error::unsupported("qcow2 v2 images cannot store bitmaps"));
    }
    let mut out = slice_at(fields, 0, h.header_length as usize, "header")?.to_vec();
    let bitmaps_ext = bitmaps.map(|b| (EXT_BITMAPS, b.to_bytes()));
    let kept = h.extensions.iter().filter(|(ty, _)| *ty != EXT_BITMAPS);
    for (ty, d) in kept.chain(bitmaps_ext.as_ref()) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(d.len() as u32).to_be_bytes());
        out.extend_from_slice(d);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    let backing_off = out.len() as u64;
    let backing = h.backing_file.as_ref().map_or(&[][..], |b| b.as_bytes());
    out.extend_from_slice(backing);
    if out.len() > cs {
        return Err(Error::unsupported(
            "header extensions do not fit in the first cluster",
        ));
    }
    if !backing.is_empty() {
        out[AT_BACKING_FILE_OFFSET..AT_BACKING_FILE_OFFSET + 8]
            .copy_from_slice(&backing_off.to_be_bytes());
    }
    let autoclear = if bitmaps.is_some() {
        AUTOCLEAR_BITMAPS
    } else {
        0
    };
    out[AT_AUTOCLEAR_FEATURES..AT_AUTOCLEAR_FEATURES + 8].copy_from_slice(&autoclear.to_be_bytes());
    out.resize(cs, 0);
    Ok(out)
}

fn string_field(data: &[u8], what: &str) -> Result<String> {
    String::from_utf8(data.to_vec())
        .map_err(|_| Error::corrupt(format!("{what} is not valid UTF-8")))
}

/// Check that a metadata region is cluster aligned, does not overlap the header cluster, and
/// starts inside the file. (QEMU writes tables partly past EOF only for the last cluster of a
/// fresh image, and such reads return zeros, so only the start is checked against EOF.)
pub fn check_region(
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if offset % cluster_size != 0 {
        return Err(Error::corrupt(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    if offset == 0 {
        return Err(Error::corrupt(format!(
            "{what} overlaps the header (offset 0)"
        )));
    }
    if offset.checked_add(len).is_none() || offset >= file_len {
        return Err(Error::corrupt(format!(
            "{what} at {offset:#x} lies past the end of the file ({file_len} bytes): truncated image?"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_v3() -> Vec<u8> {
        let mut b = vec![0u8; 65536 * 4];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn parses_minimal() {
        let b = minimal_v3();
        let h = Header::parse(&b[..65536], b.len() as u64).unwrap();
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn refuses_bad_inputs() {
        assert!(Header::parse(&[], 0).unwrap_err().msg.contains("empty"));
        assert!(Header::parse(b"hello world", 11)
            .unwrap_err()
            .msg
            .contains("not a qcow2"));
        let b = minimal_v3();
        assert!(Header::parse(&b[..50], 50)
            .unwrap_err()
            .msg
            .contains("truncated"));
        let mut u = minimal_v3();
        u[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(Header::parse(&u[..65536], u.len() as u64)
            .unwrap_err()
            .msg
            .contains("unknown incompatible"));
        let mut e = minimal_v3();
        e[32..36].copy_from_slice(&2u32.to_be_bytes());
        assert!(Header::parse(&e[..65536], e.len() as u64)
            .unwrap_err()
            .msg
            .contains("LUKS"));
        let mut l = minimal_v3();
        l[40..48].copy_from_slice(&(100u64 << 16).to_be_bytes());
        assert!(Header::parse(&l[..65536], l.len() as u64)
            .unwrap_err()
            .msg
            .contains("past the end"));
        let mut m = minimal_v3();
        m[40..48].copy_from_slice(&((3u64 << 16) + 8).to_be_bytes());
        assert!(Header::parse(&m[..65536], m.len() as u64)
            .unwrap_err()
            .msg
            .contains("aligned"));
        let mut o = minimal_v3();
        o[48..56].copy_from_slice(&0u64.to_be_bytes());
        assert!(Header::parse(&o[..65536], o.len() as u64)
            .unwrap_err()
            .msg
            .contains("header"));
    }

    /// `minimal_v3` with a backing format extension "qcow2", the end, then the name
    /// "base.img" at 136.
    fn with_backing() -> Vec<u8> {
        let mut b = minimal_v3();
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&5u32.to_be_bytes());
        b[120..125].copy_from_slice(b"qcow2");
        b[8..16].copy_from_slice(&136u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[136..144].copy_from_slice(b"base.img");
        b
    }

    #[test]
    fn walks_extensions_and_backing_name() {
        let mut b = with_backing();
        let h = Header::parse(&b[..65536], b.len() as u64).unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        let name = h.backing_file.expect("a backing name");
        assert_eq!(name.as_path(), std::path::Path::new("base.img"));
        // Any bytes are a name (QEMU takes them as a C string): kept, shown lossily.
        b[136..144].copy_from_slice(b"b\xffse\0img");
        let h = Header::parse(&b[..65536], b.len() as u64).unwrap();
        let name = h.backing_file.expect("a non-UTF-8 backing name");
        assert_eq!(name.as_bytes(), b"b\xffse\0img");
        assert_eq!(name.as_path().as_os_str().len(), 4);
        assert_eq!(name.to_string(), "b\u{fffd}se");
        // An extension whose length runs off the cluster.
        b[116..120].copy_from_slice(&70000u32.to_be_bytes());
        assert!(Header::parse(&b[..65536], b.len() as u64).is_err());
    }

    #[test]
    fn rewrite_keeps_extensions_and_name() {
        let b = with_backing();
        let h = Header::parse(&b[..65536], b.len() as u64).unwrap();
        let ext = BitmapsExt {
            nb_bitmaps: 2,
            bitmap_directory_size: 80,
            bitmap_directory_offset: 0x50000,
        };
        let out = rewrite_extensions(&b[..112], &h, Some(ext)).unwrap();
        assert_eq!(out.len(), 65536, "the whole cluster, as QEMU writes it");
        let h2 = Header::parse(&out, b.len() as u64).unwrap();
        assert_eq!(h2.bitmaps, Some(ext));
        assert_eq!(h2.autoclear_features, AUTOCLEAR_BITMAPS);
        assert_eq!(h2.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h2.backing_file, h.backing_file);
        assert_ne!(
            h2.backing_file_offset, 136,
            "the name moved past the new extension"
        );
        let out = rewrite_extensions(&out[..112], &h2, None).unwrap();
        let h3 = Header::parse(&out, b.len() as u64).unwrap();
        assert_eq!((h3.bitmaps, h3.autoclear_features), (None, 0));
        assert_eq!(h3.backing_file_offset, 136);
        assert!(
            out[144..].iter().all(|&x| x == 0),
            "the old layout is cleared"
        );
    }

    #[test]
    fn extensions_end_in_the_first_cluster() {
        // 512-byte clusters: the header reader gets 4 KiB, but extensions (as QEMU reads
        // them) must end inside cluster 0.
        let mut b = minimal_v3();
        b[20..24].copy_from_slice(&9u32.to_be_bytes());
        b[36..40].copy_from_slice(&32u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 9).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 9).to_be_bytes());
        b[112..116].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[116..120].copy_from_slice(&500u32.to_be_bytes());
        let e = Header::parse(&b[..4096], b.len() as u64).unwrap_err();
        assert!(e.msg.contains("run past byte 512"), "{}", e.msg);
        // Filling cluster 0 exactly, without an end marker, is what QEMU accepts.
        b[116..120].copy_from_slice(&392u32.to_be_bytes());
        let (exts, end) = extensions(&b[..4096], 112, 512).unwrap();
        assert_eq!((exts.len(), exts[0].1.len(), end), (1, 392, 512));
        Header::parse(&b[..4096], b.len() as u64).unwrap();
    }
}

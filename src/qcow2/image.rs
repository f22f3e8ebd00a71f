//! One open qcow2 file: header, L1 tables (active and per snapshot), cached L2 tables, bitmap
//! tables and data clusters, and reads of mapped ranges. Knows nothing of backing chains:
//! `map` answers for this layer alone ("shallow"), `chain/` walks the layers.

use super::bitmaps::{self, BitmapEntry, TableEntry};
use super::bytes::{align_up, u64_table};
use super::compress;
use super::header::{check_region, Header, AUTOCLEAR_BITMAPS};
use super::l2::{l1_entry_offset, Geometry, L2Table, Mapping};
use super::l2cache::{L2Cache, L2Part};
use super::snapshot::{self, SnapshotEntry};
use super::types::{GuestOffset, HostOffset};
use crate::error::{Error, Result};
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use std::fs::File;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Which L1 table a lookup goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Active,
    Snapshot(usize),
}

/// A persistent bitmap of this image, with its trust verdict.
#[derive(Debug)]
pub struct Bitmap {
    pub entry: BitmapEntry,
    /// Why the bits cannot be used, if they cannot.
    pub distrust: Option<String>,
    /// Deleted through the tree (indexes stay stable while mounted).
    pub removed: bool,
    table: OnceLock<std::result::Result<Arc<[TableEntry]>, String>>,
}

impl Bitmap {
    pub fn new(entry: BitmapEntry, distrust: Option<String>) -> Bitmap {
        Bitmap {
            entry,
            distrust,
            removed: false,
            table: OnceLock::new(),
        }
    }
}

/// An internal snapshot of this image.
#[derive(Debug)]
pub struct Snapshot {
    pub entry: SnapshotEntry,
    /// The disk size at the snapshot.
    pub size: u64,
    l1: OnceLock<std::result::Result<Arc<[u64]>, String>>,
}

/// The bits of one bitmap data cluster.
#[derive(Debug, Clone)]
pub enum BitmapCluster {
    Fill(bool),
    Data(Arc<[u8]>),
}

/// Bitmap data clusters changed in memory, by (bitmap index, table index).
pub type BitmapOverlay = std::collections::HashMap<(usize, u64), Arc<[u8]>>;

/// Default byte budget for this image's caches (L2 tables, and decompressed or bitmap data
/// clusters) until `set_cache_budget` gives it its share of the mount's `cache_mb`.
pub const DEFAULT_CACHE_BYTES: usize = 8 << 20;

/// Split of a cache budget: this share (in quarters) goes to L2 tables, the rest to clusters.
const L2_QUARTERS: usize = 3;

pub struct Qcow2Image {
    pub path: PathBuf,
    file: File,
    /// Grows while a writer appends clusters.
    file_len: std::sync::atomic::AtomicU64,
    pub header: Header,
    pub geo: Geometry,
    l1: RwLock<Vec<u64>>,
    bitmaps: RwLock<Vec<Arc<Bitmap>>>,
    pub snapshots: Vec<Snapshot>,
    l2_cache: L2Cache,
    /// Bitmap data clusters changed by a writer and not yet stored: (bitmap, table index).
    bitmap_overlay: Mutex<BitmapOverlay>,
    cluster_cache: Mutex<LruCache<HostOffset, Arc<[u8]>>>,
    /// Compressed clusters decompressed so far (for stats.json).
    pub decompressed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Read up to `buf.len()` bytes at `off`, stopping at the end of the file; returns the count.
pub fn read_up_to(file: &File, off: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The header cluster, sized by cluster_bits at byte 20, so that an unreadable sector past it
/// does not fail the open. (An out-of-range cluster_bits gets the first 4 KiB, for
/// `Header::parse` to refuse.)
fn read_cluster0(file: &File, file_len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; file_len.min(4096) as usize];
    read_exact_or_zero(file, 0, &mut buf)?;
    if let Some(b) = buf.get(20..24) {
        let cb = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if (13..=21).contains(&cb) {
            buf = vec![0u8; file_len.min(1 << cb) as usize];
            read_exact_or_zero(file, 0, &mut buf)?;
        }
    }
    Ok(buf)
}

/// Read `buf.len()` bytes at `off`, zero-filling what lies past the end of the file
/// (QEMU's file driver does the same).
pub fn read_exact_or_zero(file: &File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let done = read_up_to(file, off, buf)?;
    buf[done..].fill(0);
    Ok(())
}

thread_local! {
    /// The compressed bytes of the cluster being decompressed, reused between clusters.
    static COMPRESSED_INPUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A thread keeps its compressed-input buffer up to this size (large clusters free it).
const MAX_KEPT_INPUT: usize = 1 << 20;

/// Cache entries of `unit` bytes in `bytes` (at least 4).
pub(super) fn cap(bytes: usize, unit: u64) -> NonZeroUsize {
    NonZeroUsize::new((bytes / unit.max(1) as usize).max(4)).expect("at least 4")
}

impl Qcow2Image {
    /// Open and check a qcow2 file. Errors name the file.
    pub fn open(path: &Path, file: File) -> Result<Qcow2Image> {
        Self::open_inner(path, file).map_err(|e| e.context(path.display()))
    }

    fn open_inner(path: &Path, file: File) -> Result<Qcow2Image> {
        let file_len = crate::hostfile::size(&file).map_err(|e| Error::io("stat", e))?;
        let first = read_cluster0(&file, file_len).map_err(|e| Error::io("read header", e))?;
        let header = Header::parse(&first, file_len)?;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            extended: header.extended_l2(),
        };
        let cs = geo.cluster_size();
        let mut img = Qcow2Image {
            path: path.to_path_buf(),
            file,
            file_len: file_len.into(),
            l1: RwLock::new(Vec::new()),
            bitmaps: Default::default(),
            snapshots: Vec::new(),
            l2_cache: L2Cache::new(&geo, DEFAULT_CACHE_BYTES / 4 * L2_QUARTERS),
            bitmap_overlay: Default::default(),
            cluster_cache: Mutex::new(LruCache::new(cap(
                DEFAULT_CACHE_BYTES - DEFAULT_CACHE_BYTES / 4 * L2_QUARTERS,
                cs,
            ))),
            decompressed: Default::default(),
            geo,
            header,
        };
        let l1 = img.load_l1(img.header.l1_table_offset, img.header.l1_size, "L1 table")?;
        *img.l1.get_mut() = l1;
        img.check_overlaps()?;
        img.load_snapshots()?;
        img.load_bitmaps()?;
        Ok(img)
    }

    /// Bound this image's caches to about `bytes` (three quarters for L2 tables, the rest for
    /// decompressed and bitmap data clusters; at least 4 clusters each). Shrinking drops the
    /// least recently used entries at once.
    pub fn set_cache_budget(&self, bytes: usize) {
        let cs = self.geo.cluster_size();
        let l2 = bytes / 4 * L2_QUARTERS;
        self.l2_cache.resize(l2);
        self.cluster_cache.lock().resize(cap(bytes - l2, cs));
    }

    /// Every bitmap, by stable index (deleted ones stay, flagged `removed`).
    pub fn bitmaps(&self) -> Vec<Arc<Bitmap>> {
        self.bitmaps.read().clone()
    }

    pub fn bitmap(&self, i: usize) -> Option<Arc<Bitmap>> {
        self.bitmaps.read().get(i).cloned()
    }

    /// Writer side: bitmap `i` is now `b` (on disk already); returns its index.
    pub fn set_bitmap(&self, i: Option<usize>, b: Bitmap) -> usize {
        let mut v = self.bitmaps.write();
        match i {
            Some(i) if i < v.len() => {
                v[i] = Arc::new(b);
                i
            }
            _ => {
                v.push(Arc::new(b));
                v.len() - 1
            }
        }
    }

    pub fn file_len(&self) -> u64 {
        self.file_len.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Writer side: the file now extends at least to `end`.
    pub fn note_file_end(&self, end: HostOffset) {
        self.file_len
            .fetch_max(end.0, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Virtual size of the active image.
    pub fn size(&self) -> u64 {
        self.header.size
    }

    /// Virtual size seen through `table`.
    pub fn table_size(&self, table: Table) -> u64 {
        match table {
            Table::Active => self.header.size,
            Table::Snapshot(i) => self.snapshots.get(i).map_or(0, |s| s.size),
        }
    }

    fn read_meta(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.meta_len(off, len, what)?];
        read_exact_or_zero(&self.file, off, &mut buf)
            .map_err(|e| Error::io(format!("read {what}"), e))?;
        Ok(buf)
    }

    /// Metadata never extends past the file by more than the partly written last cluster;
    /// checking here bounds every allocation by the file's size, whatever the image claims.
    fn meta_len(&self, off: u64, len: u64, what: &str) -> Result<usize> {
        if len
            > self
                .file_len()
                .saturating_sub(off)
                .saturating_add(self.geo.cluster_size())
        {
            return Err(Error::corrupt(format!(
                "{what} ({len} bytes at {off:#x}) runs past the end of the file ({} bytes)",
                self.file_len()
            )));
        }
        usize::try_from(len).map_err(|_| Error::corrupt(format!("{what} too large")))
    }

    /// A table of `entries` big-endian u64 at `off`, read 1 MiB at a time (a 32 MiB L1 table
    /// is held once, not twice).
    fn read_meta_u64(&self, off: u64, entries: u64, what: &str) -> Result<Vec<u64>> {
        const PIECE: usize = 1 << 20;
        let len = self.meta_len(off, entries * 8, what)?;
        let mut out = Vec::with_capacity(len / 8);
        let mut piece = vec![0u8; len.min(PIECE)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            read_exact_or_zero(&self.file, off + done as u64, &mut piece[..n])
                .map_err(|e| Error::io(format!("read {what}"), e))?;
            out.extend(
                piece[..n]
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))),
            );
            done += n;
        }
        Ok(out)
    }

    fn load_l1(&self, offset: u64, entries: u32, what: &str) -> Result<Vec<u64>> {
        if entries == 0 {
            return Ok(Vec::new());
        }
        let cs = self.geo.cluster_size();
        check_region(what, offset, u64::from(entries) * 8, cs, self.file_len())?;
        let l1 = self.read_meta_u64(offset, u64::from(entries), what)?;
        for (i, &e) in l1.iter().enumerate() {
            let l2 = l1_entry_offset(e, cs).map_err(|e| e.context(format!("{what} entry {i}")))?;
            if let Some(l2) = l2 {
                check_region(
                    &format!("L2 table (L1 entry {i})"),
                    l2.0,
                    cs,
                    cs,
                    self.file_len(),
                )?;
            }
        }
        Ok(l1)
    }

    /// The regions the header places: header cluster, L1 table, refcount table, bitmap
    /// directory (offset, length in bytes, name).
    pub fn header_regions(&self) -> Vec<(HostOffset, u64, &'static str)> {
        let h = &self.header;
        let cs = self.geo.cluster_size();
        let mut regions = vec![(HostOffset(0), cs, "header")];
        if h.l1_size > 0 {
            regions.push((
                HostOffset(h.l1_table_offset),
                u64::from(h.l1_size) * 8,
                "L1 table",
            ));
        }
        regions.push((
            HostOffset(h.refcount_table_offset),
            u64::from(h.refcount_table_clusters) * cs,
            "refcount table",
        ));
        if let Some(b) = h.bitmaps {
            regions.push((
                HostOffset(b.bitmap_directory_offset),
                b.bitmap_directory_size,
                "bitmap directory",
            ));
        }
        regions
    }

    /// Refuse header-level tables that overlap each other.
    fn check_overlaps(&self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let regions = self.header_regions();
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                let a_end = align_up(a.0 .0.saturating_add(a.1), cs).unwrap_or(u64::MAX);
                let b_end = align_up(b.0 .0.saturating_add(b.1), cs).unwrap_or(u64::MAX);
                if a.0 .0 < b_end && b.0 .0 < a_end {
                    return Err(Error::corrupt(format!("{} overlaps the {}", b.2, a.2)));
                }
            }
        }
        Ok(())
    }

    fn load_snapshots(&mut self) -> Result<()> {
        let nb = self.header.nb_snapshots;
        if nb == 0 {
            return Ok(());
        }
        // Each entry is at most 40 + 1024 + 2 * 65535 bytes; read what exists, capped.
        let max = (u64::from(nb) * 1200).min(self.file_len() - self.header.snapshots_offset);
        let buf = self.read_meta(self.header.snapshots_offset, max, "snapshot table")?;
        let (entries, _) = snapshot::parse_table(&buf, nb)?;
        for e in entries {
            let size = e.disk_size.unwrap_or(self.header.size);
            if size > i64::MAX as u64 {
                return Err(Error::corrupt(format!(
                    "snapshot '{}' has disk size {size}",
                    e.name
                )));
            }
            let needed = size.div_ceil(self.geo.l2_coverage());
            if u64::from(e.l1_size) < needed || u64::from(e.l1_size) * 8 > 32 << 20 {
                return Err(Error::corrupt(format!(
                    "snapshot '{}' has an L1 table of {} entries for {size} bytes",
                    e.name, e.l1_size
                )));
            }
            check_region(
                &format!("snapshot '{}' L1 table", e.name),
                e.l1_table_offset,
                u64::from(e.l1_size) * 8,
                self.geo.cluster_size(),
                self.file_len(),
            )?;
            self.snapshots.push(Snapshot {
                entry: e,
                size,
                l1: OnceLock::new(),
            });
        }
        Ok(())
    }

    fn load_bitmaps(&mut self) -> Result<()> {
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        let cs = self.geo.cluster_size();
        if ext.bitmap_directory_size > bitmaps::MAX_DIRECTORY_BYTES {
            return Err(Error::corrupt(format!(
                "bitmap directory of {} bytes (QEMU allows 64 MiB)",
                ext.bitmap_directory_size
            )));
        }
        check_region(
            "bitmap directory",
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
            cs,
            self.file_len(),
        )?;
        let dir = self.read_meta(
            ext.bitmap_directory_offset,
            ext.bitmap_directory_size,
            "bitmap directory",
        )?;
        let entries = bitmaps::parse_directory(&dir, ext.nb_bitmaps)?;
        let autoclear_ok = self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        for entry in entries {
            let region = || {
                check_region(
                    &format!("bitmap '{}' table", entry.name),
                    entry.bitmap_table_offset,
                    u64::from(entry.bitmap_table_size) * 8,
                    cs,
                    self.file_len(),
                )
                .err()
                .map(|e| e.msg)
            };
            let distrust = if !autoclear_ok {
                Some(format!(
                    "bitmaps of {} are inconsistent: the autoclear bit is clear (a program without \
                     bitmap support wrote the image)",
                    self.path.display()
                ))
            } else {
                entry
                    .distrust(self.header.size, cs)
                    .or_else(|| (entry.bitmap_table_size > 0).then(region).flatten())
            };
            self.bitmaps
                .get_mut()
                .push(Arc::new(Bitmap::new(entry, distrust)));
        }
        Ok(())
    }

    fn l1_entry(&self, table: Table, idx: u64) -> Result<u64> {
        let idx = usize::try_from(idx).map_err(|_| Error::corrupt("L1 index overflow"))?;
        match table {
            Table::Active => Ok(self.l1.read().get(idx).copied().unwrap_or(0)),
            Table::Snapshot(i) => {
                let l1 = self.snapshot_l1(i)?;
                Ok(l1.get(idx).copied().unwrap_or(0))
            }
        }
    }

    fn snapshot_l1(&self, i: usize) -> Result<Arc<[u64]>> {
        let s = self.snapshots.get(i).ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::NotFound,
                format!("no snapshot {i}"),
            )
        })?;
        s.l1.get_or_init(|| {
            self.load_l1(
                s.entry.l1_table_offset,
                s.entry.l1_size,
                &format!("snapshot '{}' L1 table", s.entry.name),
            )
            .map(Arc::from)
            .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|m| Error::corrupt(m).context(self.path.display()))
    }

    /// The raw (L1 entry) offset of the L2 table covering `l1_idx` in `table`; 0 if none.
    pub fn l2_offset(&self, table: Table, l1_idx: u64) -> Result<Option<HostOffset>> {
        l1_entry_offset(self.l1_entry(table, l1_idx)?, self.geo.cluster_size())
    }

    /// The L2 table at `off`.
    pub fn l2_table(&self, off: HostOffset) -> Result<L2Table> {
        self.l2_cache
            .table(off, || self.load_l2(off, 0, self.geo.cluster_size()))
    }

    /// A part of the L2 table at `off` holding entry `idx` (a slice of it, or all of it).
    fn l2_part(&self, off: HostOffset, idx: u64) -> Result<L2Part> {
        self.l2_cache
            .part(off, idx, |pos, len| self.load_l2(off, pos, len))
    }

    /// `len` bytes of the L2 table at `off`, from byte `pos` of it.
    fn load_l2(&self, off: HostOffset, pos: u64, len: u64) -> Result<L2Table> {
        let buf = self.read_meta(off.0 + pos, len, "L2 table")?;
        Ok(L2Table::parse(&buf, self.geo.extended))
    }

    /// Writer side: `table` is now the content of the L2 table at `off` (already on disk).
    pub fn l2_updated(&self, off: HostOffset, table: L2Table) {
        self.l2_cache.updated(off, table);
    }

    /// Writer side: write `data` (guest data, a new table, bitmap bits) at `at`.
    pub fn write_at(&self, at: HostOffset, data: &[u8], what: &str) -> Result<()> {
        self.file
            .write_all_at(data, at.0)
            .map_err(|e| Error::io(format!("write {what}"), e))
    }

    /// Writer side: make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io("flush", e))
    }

    /// Writer side: store a whole L2 table at `at` (the cache learns it by `l2_updated`).
    pub fn store_l2_table(&self, at: HostOffset, table: &L2Table) -> Result<()> {
        self.write_at(at, &table.to_bytes(), "L2 table")
    }

    /// Writer side: store entries `range` of `table`, the L2 table at `at`, in place (one
    /// write).
    pub fn store_l2_entries(
        &self,
        at: HostOffset,
        table: &L2Table,
        range: Range<u64>,
    ) -> Result<()> {
        let (pos, bytes) = table.entries_bytes(range);
        self.write_at(at + pos, &bytes, "L2 entries")
    }

    /// Writer side: store `entry` as active L1 entry `idx`, on disk and in memory.
    pub fn store_l1_entry(&self, idx: u64, entry: u64) -> Result<()> {
        let at = self.header.l1_table_offset + idx * 8;
        self.file
            .write_all_at(&entry.to_be_bytes(), at)
            .map_err(|e| Error::io("write L1 entry", e))?;
        let mut l1 = self.l1.write();
        if let Some(e) = usize::try_from(idx).ok().and_then(|i| l1.get_mut(i)) {
            *e = entry;
        }
        Ok(())
    }

    /// Writer side: the bits of bitmap `i`'s table entry `idx` are now `data` (in memory only).
    pub fn bitmap_overlay_set(&self, i: usize, idx: u64, data: Arc<[u8]>) {
        self.bitmap_overlay.lock().insert((i, idx), data);
    }

    /// The changed bitmap clusters not yet stored.
    pub fn bitmap_overlay_take(&self) -> BitmapOverlay {
        std::mem::take(&mut *self.bitmap_overlay.lock())
    }

    /// Forget a decompressed cluster whose host bytes were freed.
    pub fn forget_cluster(&self, host_off: HostOffset) {
        self.cluster_cache.lock().pop(&host_off);
    }

    /// Where guest offset `off` lives in this layer, and for how many bytes (at most `len`)
    /// that answer holds. Past the virtual size of `table` the range is `Unallocated`.
    /// Call `f(start, len)` for each run of `[off, off+len)` allocated in this image (present
    /// at this depth, as `qemu-img map` says: data, zero or compressed clusters), reading each
    /// L2 table once and looking only at the entries' flags and offsets. Standard L2 entries
    /// only: `None` for extended L2 images (their subclusters go through `map`).
    pub fn present_runs(
        &self,
        table: Table,
        off: u64,
        len: u64,
        f: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<()>> {
        if self.geo.extended {
            return Ok(None);
        }
        let cs = self.geo.cluster_size();
        let cov = self.geo.l2_coverage();
        let end = off.saturating_add(len);
        let mut at = off;
        while at < end {
            let l1_idx = at / cov;
            let t_end = ((l1_idx + 1) * cov).min(end);
            let l2_off = self
                .l2_offset(table, l1_idx)
                .map_err(|e| e.context(self.path.display()))?;
            if let Some(l2_off) = l2_off {
                // A scan: whole tables (one read each), not the read path's slices.
                let l2 = self
                    .l2_table(l2_off)
                    .map_err(|e| e.context(self.path.display()))?;
                let mut run: Option<u64> = None;
                let mut c = at - at % cs;
                while c < t_end {
                    let present = l2.get((c / cs) % self.geo.l2_entries()).is_present();
                    match (present, run) {
                        (true, None) => run = Some(c.max(at)),
                        (false, Some(s)) => {
                            f(s, c - s);
                            run = None;
                        }
                        _ => {}
                    }
                    c += cs;
                }
                if let Some(s) = run {
                    f(s, t_end - s);
                }
            }
            at = t_end;
        }
        Ok(Some(()))
    }

    pub fn map(&self, table: Table, off: GuestOffset, len: u64) -> Result<(Mapping, u64)> {
        self.map_inner(table, off, len)
            .map_err(|e| e.context(self.path.display()))
    }

    fn map_inner(&self, table: Table, off: GuestOffset, len: u64) -> Result<(Mapping, u64)> {
        let cov = self.geo.l2_coverage();
        let (l1_idx, mut idx, in_off) = self.geo.locate(off);
        let table_end = (l1_idx + 1) * cov;
        let max = len.min(table_end - off.0);
        let Some(l2_off) = self.l2_offset(table, l1_idx)? else {
            return Ok((Mapping::Unallocated, max));
        };
        let l2 = self.l2_part(l2_off, idx)?;
        let (first, mut run) = self.check_host(self.geo.decode(l2.get(idx), in_off)?)?;
        if matches!(first, Mapping::Compressed { .. }) {
            return Ok((first, run.min(max)));
        }
        // Extend the run over following clusters that continue the same mapping.
        let cs = self.geo.cluster_size();
        let mut at_cluster_end = in_off + run == cs;
        // Within the part at hand: a run may end early at its end (the caller asks again).
        while at_cluster_end && run < max && idx + 1 < l2.end() {
            idx += 1;
            let (next, nrun) = self.check_host(self.geo.decode(l2.get(idx), 0)?)?;
            let continues = match (first, next) {
                (Mapping::Data(h0), Mapping::Data(h1)) => h1 == h0 + run,
                (Mapping::Zero, Mapping::Zero) | (Mapping::Unallocated, Mapping::Unallocated) => {
                    true
                }
                _ => false,
            };
            if !continues {
                break;
            }
            run += nrun;
            at_cluster_end = nrun == cs;
        }
        Ok((first, run.min(max)))
    }

    fn check_host(&self, (m, run): (Mapping, u64)) -> Result<(Mapping, u64)> {
        match m {
            Mapping::Data(h) if h.0 >= self.file_len() => Err(Error::corrupt(format!(
                "data cluster at {h} lies past the end of the file ({} bytes)",
                self.file_len()
            ))),
            Mapping::Data(h) if h.0 < self.geo.cluster_size() => Err(Error::corrupt(format!(
                "data cluster at {h} overlaps the header"
            ))),
            Mapping::Compressed { host_off, .. }
                if host_off.0 >= self.file_len() || host_off.0 < self.geo.cluster_size() =>
            {
                Err(Error::corrupt(format!(
                    "compressed cluster at {host_off} lies outside the file's data area"
                )))
            }
            _ => Ok((m, run)),
        }
    }

    /// Read guest bytes at `off` that `map` reported as `m` (Data or Compressed) into `buf`.
    pub fn read_mapped(&self, m: Mapping, off: GuestOffset, buf: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Data(host) => {
                let got = read_up_to(&self.file, host.0, buf).map_err(|e| {
                    Error::io(format!("{}: read at {host}", self.path.display()), e)
                })?;
                let short_of_known_end = got < buf.len() && (host + got as u64).0 < self.file_len();
                if (got == 0 && !buf.is_empty()) || short_of_known_end {
                    // Nothing at all where an allocated cluster's bytes must be: the file was
                    // truncated (underneath us, or by a broken tool). Never serve that as zeros.
                    return Err(Error::corrupt(format!(
                        "{}: data at {host} lies past the end of the file (truncated?)",
                        self.path.display()
                    )));
                }
                buf[got..].fill(0);
                Ok(())
            }
            Mapping::Compressed { host_off, len } => {
                let in_off = self.geo.locate(off).2 as usize;
                if in_off == 0 && buf.len() as u64 == self.geo.cluster_size() {
                    // The whole cluster (large sequential reads): decompress it straight into
                    // the caller's buffer; keeping a copy would only pay for a later partial
                    // read of the same cluster.
                    if let Some(c) = self.cluster_cache.lock().get(&host_off) {
                        buf.copy_from_slice(c);
                        return Ok(());
                    }
                    return self.decompress_into(host_off, len, buf);
                }
                let cluster = self.compressed_cluster(host_off, len)?;
                let src = cluster
                    .get(in_off..in_off + buf.len())
                    .ok_or_else(|| Error::corrupt("read past a compressed cluster"))?;
                buf.copy_from_slice(src);
                Ok(())
            }
            Mapping::Zero | Mapping::Unallocated => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The decompressed cluster at `host_off`, from the cache or decompressed into it.
    fn compressed_cluster(&self, host_off: HostOffset, len: u64) -> Result<Arc<[u8]>> {
        if let Some(c) = self.cluster_cache.lock().get(&host_off) {
            return Ok(c.clone());
        }
        // Decompress straight into the buffer the cache keeps (one allocation, no copy).
        let mut out: Arc<[u8]> =
            std::iter::repeat_n(0u8, self.geo.cluster_size() as usize).collect();
        self.decompress_into(
            host_off,
            len,
            Arc::get_mut(&mut out).expect("a new Arc is unique"),
        )?;
        self.cluster_cache.lock().put(host_off, out.clone());
        Ok(out)
    }

    /// Decompress the compressed cluster at `host_off` (`len` bytes stored) into `out` (one
    /// cluster). The compressed bytes go through a per-thread buffer.
    fn decompress_into(&self, host_off: HostOffset, len: u64, out: &mut [u8]) -> Result<()> {
        // The same bound as `read_meta`: never past the file by more than a cluster.
        let cs = self.geo.cluster_size();
        if len
            > self
                .file_len()
                .saturating_sub(host_off.0)
                .saturating_add(cs)
        {
            return Err(Error::corrupt(format!(
                "compressed cluster ({len} bytes at {host_off}) runs past the end of the file \
                 ({} bytes)",
                self.file_len()
            )));
        }
        let len =
            usize::try_from(len).map_err(|_| Error::corrupt("compressed cluster too large"))?;
        COMPRESSED_INPUT
            .with(|cell| {
                let mut input = cell.borrow_mut();
                input.resize(len, 0);
                let r = read_exact_or_zero(&self.file, host_off.0, &mut input[..len])
                    .map_err(|e| Error::io("read compressed cluster", e))
                    .and_then(|()| compress::decompress(self.header.compression_type, &input, out));
                if input.capacity() > MAX_KEPT_INPUT {
                    *input = Vec::new();
                }
                r
            })
            .map_err(|e| e.context(format!("{}: cluster at {host_off}", self.path.display())))?;
        self.decompressed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The decoded table of bitmap `i`, loaded once.
    pub fn bitmap_table(&self, i: usize) -> Result<Arc<[TableEntry]>> {
        let bm = self
            .bitmap(i)
            .ok_or_else(|| Error::corrupt(format!("no bitmap {i}")))?;
        bm.table
            .get_or_init(|| {
                let cs = self.geo.cluster_size();
                let n = u64::from(bm.entry.bitmap_table_size);
                let needed = bm.entry.table_size_for(self.header.size, cs);
                if n > needed {
                    return Err(format!(
                        "bitmap '{}' table has {n} entries, the disk size needs {needed}",
                        bm.entry.name
                    ));
                }
                if n == 0 {
                    return Ok(Arc::from(Vec::new()));
                }
                let raw = self
                    .read_meta(bm.entry.bitmap_table_offset, n * 8, "bitmap table")
                    .map_err(|e| e.to_string())?;
                u64_table(&raw)
                    .into_iter()
                    .map(|e| match bitmaps::decode_table_entry(e, cs)? {
                        TableEntry::Data(off) if off.0 >= self.file_len() => {
                            Err(Error::corrupt(format!(
                                "bitmap '{}' data cluster {off} lies past the end of the file",
                                bm.entry.name
                            )))
                        }
                        t => Ok(t),
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Arc::from)
                    .map_err(|e| format!("bitmap '{}': {}", bm.entry.name, e.msg))
            })
            .clone()
            .map_err(|m| Error::corrupt(m).context(self.path.display()))
    }

    /// The bits held by table entry `idx` of bitmap `i` (one cluster's worth).
    pub fn bitmap_cluster(&self, i: usize, idx: u64) -> Result<BitmapCluster> {
        if let Some(d) = self.bitmap_overlay.lock().get(&(i, idx)) {
            return Ok(BitmapCluster::Data(d.clone()));
        }
        let table = self.bitmap_table(i)?;
        let Some(&entry) = table.get(idx as usize) else {
            return Ok(BitmapCluster::Fill(false));
        };
        match entry {
            TableEntry::Fill(v) => Ok(BitmapCluster::Fill(v)),
            TableEntry::Data(off) => {
                if let Some(c) = self.cluster_cache.lock().get(&off) {
                    return Ok(BitmapCluster::Data(c.clone()));
                }
                let data: Arc<[u8]> = self
                    .read_meta(off.0, self.geo.cluster_size(), "bitmap data")?
                    .into();
                self.cluster_cache.lock().put(off, data.clone());
                Ok(BitmapCluster::Data(data))
            }
        }
    }
}

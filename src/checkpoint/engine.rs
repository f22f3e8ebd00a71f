//! Answers about since-sets over byte ranges: is a block changed, where is the next change
//! (SEEK_DATA/SEEK_HOLE), the bytes of bitmap.bin, the extents list and changed_bytes. Chunks
//! come from the cache; nothing scans the whole disk unless the question needs it.

use super::cache::ChunkCache;
use super::model::Model;
use super::since::{self, Bits, CHUNK_BLOCKS};
use crate::chain::Disk;
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::{Qcow2Image, Table};
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// A value computed once, remembering an error as well as a success.
pub type Cached<T> = OnceLock<std::result::Result<T, (ErrorKind, String)>>;

pub struct Engine {
    pub model: Arc<Model>,
    pub current: Disk,
    pub cache: ChunkCache,
    pub cache_bytes: u64,
    extents: RwLock<Vec<Cached<Arc<str>>>>,
    /// Bytes of extents text held in `extents`: all together stay within `cache_bytes / 4`.
    extents_bytes: AtomicU64,
    changed: RwLock<Vec<Cached<u64>>>,
}

/// The value in `cell`, computing it with `f` the first time.
pub fn keep<T: Clone>(cell: &Cached<T>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    cell.get_or_init(|| f().map_err(|e| (e.kind, e.to_string())))
        .clone()
        .map_err(|(k, m)| Error::new(k, m))
}

impl Engine {
    /// An engine whose caches, together, stay within about `cache_bytes`: half shared by the
    /// qcow2 layers' own caches (L2 tables, decompressed and bitmap clusters; see
    /// `Qcow2Image::set_cache_budget`), a quarter for since-set chunks, a quarter for the
    /// extents texts.
    pub fn new(model: Arc<Model>, cache_bytes: u64) -> Engine {
        let n = model.checkpoints.len();
        let current = Disk::new(model.chain.clone(), 0, Table::Active);
        let layer_bytes = cache_bytes / 2;
        let images: Vec<&Qcow2Image> = model
            .chain
            .layers
            .iter()
            .filter_map(|l| l.qcow2())
            .collect();
        if !images.is_empty() {
            let each = usize::try_from(layer_bytes / images.len() as u64).unwrap_or(usize::MAX);
            for q in images {
                q.set_cache_budget(each);
            }
        }
        Engine {
            current,
            cache: ChunkCache::new(cache_bytes / 4),
            model,
            cache_bytes,
            extents: RwLock::new((0..n).map(|_| OnceLock::new()).collect()),
            extents_bytes: AtomicU64::new(0),
            changed: RwLock::new((0..n).map(|_| OnceLock::new()).collect()),
        }
    }

    pub fn granularity(&self, ci: usize) -> u64 {
        self.model.checkpoints[ci].granularity.max(1)
    }

    pub fn total_blocks(&self, ci: usize) -> u64 {
        self.model.blocks(&self.model.checkpoints[ci])
    }

    fn check_valid(&self, ci: usize) -> Result<()> {
        match &self.model.checkpoints[ci].invalid {
            Some(r) => Err(Error::new(ErrorKind::InvalidCheckpoint, r.clone())),
            None => Ok(()),
        }
    }

    pub fn chunk(&self, ci: usize, k: u64) -> Result<Arc<Bits>> {
        self.check_valid(ci)?;
        let total = self.total_blocks(ci);
        self.cache.get(ci, k, || self.compute_chunk(ci, total, k))
    }

    /// Chunk `k` of checkpoint `ci`'s since-set.
    fn compute_chunk(&self, ci: usize, total: u64, k: u64) -> Result<Bits> {
        since::compute_chunk(&self.model.chain, &self.model.checkpoints[ci], total, k)
    }

    /// The disk changed in `[off, off+len)`: drop every cached answer that covers it.
    pub fn invalidate(&self, off: u64, len: u64) {
        for ci in 0..self.model.checkpoints.len() {
            let g = self.granularity(ci);
            let (k0, k1) = (
                off / g / CHUNK_BLOCKS,
                (off + len.max(1) - 1) / g / CHUNK_BLOCKS,
            );
            for k in k0..=k1 {
                self.cache.remove(ci, k);
            }
        }
        let n = self.model.checkpoints.len();
        let mut ext = self.extents.write();
        *ext = (0..n).map(|_| OnceLock::new()).collect();
        self.extents_bytes.store(0, Ordering::Relaxed);
        drop(ext);
        *self.changed.write() = (0..n).map(|_| OnceLock::new()).collect();
    }

    /// Is block `b` of checkpoint `ci` changed?
    pub fn block_changed(&self, ci: usize, b: u64) -> Result<bool> {
        let chunk = self.chunk(ci, b / CHUNK_BLOCKS)?;
        let i = b % CHUNK_BLOCKS;
        Ok(chunk[(i / 64) as usize] >> (i % 64) & 1 != 0)
    }

    /// The first block at or after `b` whose state is `want` (changed or not), or None.
    pub fn next_block(&self, ci: usize, b: u64, want: bool) -> Result<Option<u64>> {
        let total = self.total_blocks(ci);
        let mut b = b;
        while b < total {
            let k = b / CHUNK_BLOCKS;
            let chunk = self.chunk(ci, k)?;
            let base = k * CHUNK_BLOCKS;
            let mut i = b - base;
            while i < CHUNK_BLOCKS && base + i < total {
                let w = (i / 64) as usize;
                let word = if want { chunk[w] } else { !chunk[w] } >> (i % 64);
                if word != 0 {
                    let found = base + i + u64::from(word.trailing_zeros());
                    return Ok((found < total).then_some(found));
                }
                i = (i / 64 + 1) * 64;
            }
            b = base + CHUNK_BLOCKS;
        }
        Ok(None)
    }

    /// Call `f(start, end)` for each run of changed blocks intersecting byte range
    /// [off, off+len), in order, clipped to the range and to the disk size.
    fn each_changed_run(
        &self,
        ci: usize,
        off: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let g = self.granularity(ci);
        let end = off.saturating_add(len).min(self.model.disk_size());
        let mut b = off / g;
        while b * g < end {
            let Some(s) = self.next_block(ci, b, true)? else {
                break;
            };
            if s * g >= end {
                break;
            }
            let e = self
                .next_block(ci, s, false)?
                .unwrap_or_else(|| self.total_blocks(ci));
            f((s * g).max(off), (e * g).min(end))?;
            b = e;
        }
        Ok(())
    }

    /// Read changed.img: current data in changed blocks, zeros elsewhere.
    pub fn read_changed(&self, ci: usize, off: u64, buf: &mut [u8]) -> Result<()> {
        // Only the holes between changed runs are zeroed; the runs are read over.
        let mut done = 0usize;
        self.each_changed_run(ci, off, buf.len() as u64, |s, e| {
            let a = (s - off) as usize;
            let b = (e - off) as usize;
            buf[done..a].fill(0);
            self.current.read(s, &mut buf[a..b])?;
            done = b;
            Ok(())
        })?;
        buf[done..].fill(0);
        Ok(())
    }

    /// bitmap.bin length in bytes.
    pub fn bitmap_len(&self, ci: usize) -> u64 {
        self.total_blocks(ci).div_ceil(8)
    }

    /// Read bitmap.bin bytes at `off`.
    pub fn read_bitmap(&self, ci: usize, off: u64, buf: &mut [u8]) -> Result<()> {
        let chunk_bytes = CHUNK_BLOCKS / 8;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = off + pos as u64;
            let k = at / chunk_bytes;
            let chunk = self.chunk(ci, k)?;
            let in_chunk = at % chunk_bytes;
            let n = ((chunk_bytes - in_chunk) as usize).min(buf.len() - pos);
            since::bytes_at(&chunk, in_chunk as usize, &mut buf[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    /// Bytes of granularity blocks changed since checkpoint `ci` (as virsh --size reports).
    pub fn changed_bytes(&self, ci: usize) -> Result<u64> {
        keep(&self.changed.read()[ci], || {
            let mut blocks = 0;
            let chunks = self.total_blocks(ci).div_ceil(CHUNK_BLOCKS);
            for k in 0..chunks {
                blocks += since::count(&*self.chunk(ci, k)?);
            }
            Ok(blocks * self.granularity(ci))
        })
    }

    /// The extents file: "OFFSET LENGTH" per changed run, "OFFSET LENGTH zero" for runs the
    /// metadata knows to read as zeros now. Built run by run; the texts of all checkpoints
    /// together stay within a quarter of `cache_bytes` (past that: EFBIG, whatever the image
    /// claims; changed.img with SEEK_DATA/SEEK_HOLE serves the same runs at any size).
    pub fn extents(&self, ci: usize) -> Result<Arc<str>> {
        keep(&self.extents.read()[ci], || {
            let limit =
                (self.cache_bytes / 4).saturating_sub(self.extents_bytes.load(Ordering::Relaxed));
            let too_big = || {
                Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "{}/extents: more than {limit} bytes of text (the extents files share \
                         a quarter of cache_mb); use changed.img with SEEK_DATA/SEEK_HOLE, or raise cache_mb",
                        self.model.checkpoints[ci].dir_name
                    ),
                )
            };
            let size = self.model.disk_size();
            let mut out = String::new();
            let mut pending: Option<(u64, u64, bool)> = None;
            let flush = |out: &mut String, (o, l, z): (u64, u64, bool)| {
                let line = format!("{o} {l}{}\n", if z { " zero" } else { "" });
                let need = out.len() + line.len();
                if need as u64 > limit {
                    return Err(too_big());
                }
                if need > out.capacity() {
                    // Grow by doubling, but never past the limit.
                    // (Not `clamp`: the limit left may be below 4096.)
                    let cap = (out.capacity() * 2).max(4096).min(limit as usize).max(need);
                    out.reserve_exact(cap - out.len());
                }
                out.push_str(&line);
                Ok(())
            };
            self.each_changed_run(ci, 0, size, |s, end| {
                let mut at = s;
                while at < end {
                    let (r, n) = self.current.resolve(at, end - at)?;
                    let n = n.max(1);
                    let zero = r.known_zero();
                    match pending.as_mut() {
                        Some(last) if last.0 + last.1 == at && last.2 == zero => last.1 += n,
                        _ => {
                            if let Some(p) = pending.replace((at, n, zero)) {
                                flush(&mut out, p)?;
                            }
                        }
                    }
                    at += n;
                }
                Ok(())
            })?;
            if let Some(p) = pending {
                flush(&mut out, p)?;
            }
            self.extents_bytes
                .fetch_add(out.len() as u64, Ordering::Relaxed);
            Ok(Arc::from(out))
        })
    }
}

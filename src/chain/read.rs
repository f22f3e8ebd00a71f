//! Reading a disk through the layers of a chain: the first layer that maps a range answers,
//! zero clusters stop the descent, and a layer never shows its backing past its own size.

use super::open::Chain;
use crate::error::Result;
use crate::qcow2::{Mapping, Table};
use rayon::prelude::*;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// At most this many threads decode the compressed clusters of one read.
const MAX_DECODERS: usize = 4;

/// The threads that decode a read's compressed clusters side by side (one per core, at most
/// `MAX_DECODERS`; none on one core, or if they cannot be started).
fn decoders() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        if n < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.min(MAX_DECODERS))
            .thread_name(|i| format!("ckptfs-decode-{i}"))
            .build()
            .map_err(|e| log::warn!("no decoder threads: {e}"))
            .ok()
    })
    .as_ref()
}

/// How far ahead of a sequential reader the layers' bytes are asked for (`Disk::read_ahead`).
pub const AHEAD: u64 = 16 << 20;

/// Where a disk's sequential reader is: the end of its last read, how far the layers' bytes
/// were asked for, and whether a read of this sequence waited for the disk.
#[derive(Debug, Default)]
struct Sequence {
    next: AtomicU64,
    asked: AtomicU64,
    cold: AtomicBool,
}

/// A disk as seen from one layer downward: the current disk (start 0, active table), a layer
/// checkpoint (start = that layer), or an internal snapshot (table = that snapshot).
#[derive(Debug, Clone)]
pub struct Disk {
    pub chain: Arc<Chain>,
    pub start: usize,
    pub table: Table,
    /// Lookups (`resolve` calls) made through this disk and its clones, for stats.json.
    lookups: Arc<AtomicU64>,
    seq: Arc<Sequence>,
}

/// What a guest range resolves to through the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The layer (index into the chain) that holds the data, if any.
    pub depth: Option<usize>,
    pub mapping: Mapping,
}

impl Resolved {
    /// The metadata says these bytes read as zeros (zero cluster, or nothing below).
    pub fn known_zero(&self) -> bool {
        matches!(self.mapping, Mapping::Zero | Mapping::Unallocated)
    }
}

impl Disk {
    pub fn new(chain: Arc<Chain>, start: usize, table: Table) -> Disk {
        Disk {
            chain,
            start,
            table,
            lookups: Arc::default(),
            seq: Arc::default(),
        }
    }

    /// How many times a range was resolved through the chain on this disk.
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> u64 {
        self.chain.layers[self.start].size(self.table)
    }

    /// Resolve `off` through the chain for up to `len` bytes; returns the answer and its length.
    pub fn resolve(&self, off: u64, len: u64) -> Result<(Resolved, u64)> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let mut len = len;
        for (level, layer) in self.chain.layers.iter().enumerate().skip(self.start) {
            let table = if level == self.start {
                self.table
            } else {
                Table::Active
            };
            let size = layer.size(table);
            if off >= size {
                // Past this layer's end: zeros, whatever lies below.
                return Ok((
                    Resolved {
                        depth: None,
                        mapping: Mapping::Zero,
                    },
                    len,
                ));
            }
            len = len.min(size - off);
            let (m, n) = layer.map(table, off, len)?;
            len = n;
            if m.is_allocated() {
                return Ok((
                    Resolved {
                        depth: Some(level),
                        mapping: m,
                    },
                    len,
                ));
            }
        }
        Ok((
            Resolved {
                depth: None,
                mapping: Mapping::Unallocated,
            },
            len,
        ))
    }

    /// Read `buf.len()` bytes at `off`; bytes past the disk's end read as zeros.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if !self.read_unless_zeros(off, buf)? {
            buf.fill(0);
        }
        Ok(())
    }

    /// `read`, except where the metadata says the whole range reads as zeros (zero clusters,
    /// nothing below, past a layer's end): then `buf` is left as it was and the answer is
    /// false (a reply can send zeros it already has).
    pub fn read_unless_zeros(&self, off: u64, buf: &mut [u8]) -> Result<bool> {
        // Resolve the whole request first, then read its pieces: where two or more are
        // compressed clusters, they are decoded on several cores at once.
        let mut pieces = Vec::new();
        let (mut rest, mut at) = (buf, off);
        while !rest.is_empty() {
            let want = rest.len() as u64;
            let (r, n) = self.resolve(at, want)?;
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n.clamp(1, want) as usize);
            let n = dst.len() as u64;
            pieces.push((r, at, dst));
            at += n;
            rest = tail;
        }
        if pieces.iter().all(|(r, _, _)| r.known_zero()) {
            return Ok(false);
        }
        let read_one = |(r, at, dst): (Resolved, u64, &mut [u8])| match r.depth {
            Some(d) => self.chain.layers[d].read_mapped(r.mapping, at, dst),
            None => {
                dst.fill(0);
                Ok(())
            }
        };
        let compressed = pieces
            .iter()
            .filter(|(r, _, _)| matches!(r.mapping, Mapping::Compressed { .. }))
            .count();
        match decoders().filter(|_| compressed >= 2) {
            Some(pool) => pool.install(|| pieces.into_par_iter().try_for_each(read_one))?,
            None => pieces.into_iter().try_for_each(read_one)?,
        }
        Ok(true)
    }

    /// A read of `[off, off+len)` was answered; `waited`: it waited for the disk (it was
    /// slow). From the first such read of a sequential reader on, make sure the layer files'
    /// bytes behind the next `AHEAD` bytes of the disk are on their way into the page cache
    /// (posix_fadvise WILLNEED, asked half a window at a time): the reader then finds them
    /// there instead of waiting for one layer read at a time. Random reads, and sequential
    /// reads of a chain in the page cache, ask for nothing.
    pub fn read_ahead(&self, off: u64, len: u64, waited: bool) -> Result<()> {
        match self.plan_ahead(off, len, waited) {
            Some((from, to)) => self.advise(from, to),
            None => Ok(()),
        }
    }

    /// The guest range `read_ahead` asks for after this read, if any.
    fn plan_ahead(&self, off: u64, len: u64, waited: bool) -> Option<(u64, u64)> {
        let end = off.saturating_add(len);
        // Near the last end counts as sequential: the reads of one reader are answered by
        // several threads, and their calls here may come in any order.
        let last = self.seq.next.swap(end, Ordering::Relaxed);
        if last.abs_diff(off) > AHEAD / 4 || len == 0 {
            self.seq.cold.store(waited, Ordering::Relaxed);
            return None;
        }
        if waited {
            self.seq.cold.store(true, Ordering::Relaxed);
        } else if !self.seq.cold.load(Ordering::Relaxed) {
            return None;
        }
        let asked = self.seq.asked.load(Ordering::Relaxed);
        let from = if (end..=end + AHEAD).contains(&asked) {
            asked
        } else {
            end
        };
        let to = end.saturating_add(AHEAD).min(self.size());
        if to <= from || to - from < AHEAD / 2 && to < self.size() {
            return None;
        }
        self.seq.asked.store(to, Ordering::Relaxed);
        Some((from, to))
    }

    /// Ask for the layer files' bytes behind `[from, to)`, one call per contiguous host range.
    fn advise(&self, from: u64, to: u64) -> Result<()> {
        let mut pending: Option<(usize, u64, u64)> = None;
        let flush = |p: Option<(usize, u64, u64)>| {
            if let Some((d, start, end)) = p {
                let fd = self.chain.layers[d].file().as_raw_fd();
                let (o, l) = (start as libc::off_t, (end - start) as libc::off_t);
                // SAFETY: posix_fadvise on a descriptor this chain holds open; advice only.
                unsafe { libc::posix_fadvise(fd, o, l, libc::POSIX_FADV_WILLNEED) };
            }
        };
        let mut at = from;
        while at < to {
            let (r, n) = self.resolve(at, to - at)?;
            let n = n.max(1);
            if let (Some(d), Some((h, l))) = (r.depth, super::Layer::host_span(r.mapping, n)) {
                match &mut pending {
                    Some((pd, _, pe)) if *pd == d && *pe == h => *pe = h + l,
                    _ => flush(pending.replace((d, h, h + l))),
                }
            }
            at += n;
        }
        flush(pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Run qemu-img; it must succeed.
    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    }

    /// Run `qemu-io -f qcow2 -c CMD IMAGE`; it must succeed.
    fn qemu_io(image: &str, cmd: &str) {
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, image])
            .output()
            .unwrap();
        assert!(st.status.success(), "qemu-io {cmd} {image}");
    }

    /// The disk of a new, empty qcow2 image of `size` bytes (made by qemu-img).
    fn empty_disk(dir: &std::path::Path, size: u64) -> Disk {
        let path = dir.join("d.qcow2");
        let name = path.display().to_string();
        qemu_img(&["create", "-q", "-f", "qcow2", &name, &size.to_string()]);
        Disk::new(Arc::new(Chain::open(&path).unwrap()), 0, Table::Active)
    }

    #[test]
    fn read_ahead_follows_cold_sequential_readers_only() {
        let d = tempfile::tempdir().unwrap();
        let disk = empty_disk(d.path(), 64 * MIB);
        // Sequential reads from the page cache ask for nothing.
        for i in 0..4 {
            assert_eq!(disk.plan_ahead(i * MIB, MIB, false), None);
        }
        // The first read that waited starts a window ahead of the reader...
        assert_eq!(
            disk.plan_ahead(4 * MIB, MIB, true),
            Some((5 * MIB, 5 * MIB + AHEAD))
        );
        // ...which is extended half a window at a time, also by reads that did not wait.
        for i in 5..12 {
            assert_eq!(disk.plan_ahead(i * MIB, MIB, false), None, "read {i}");
        }
        assert_eq!(
            disk.plan_ahead(12 * MIB, MIB, false),
            Some((5 * MIB + AHEAD, 13 * MIB + AHEAD))
        );
        // Reads answered out of order by different threads still count as sequential.
        assert_eq!(disk.plan_ahead(14 * MIB, MIB, false), None);
        assert_eq!(disk.plan_ahead(13 * MIB, MIB, false), None);
        // Up to the disk's end, not past it.
        let last = disk.plan_ahead(60 * MIB, MIB, true);
        assert_eq!(last, None, "a jump of 46 MiB is not sequential");
        assert_eq!(
            disk.plan_ahead(61 * MIB, MIB, true),
            Some((62 * MIB, 64 * MIB))
        );
        // A random reader, even a slow one, asks for nothing.
        for off in [3 * MIB, 40 * MIB, 9 * MIB, 30 * MIB] {
            assert_eq!(disk.plan_ahead(off, 4096, true), None);
        }
    }

    /// Reads that span compressed clusters (decoded side by side), plain clusters, zero
    /// clusters, the backing file and bytes no layer holds, at odd alignments, equal QEMU's
    /// raw image, whatever the buffer held before.
    #[test]
    fn reads_across_compressed_clusters_equal_qemu() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n).display().to_string();
        // Distinct, compressible 64 KiB clusters.
        let data: Vec<u8> = (0..8 * MIB)
            .map(|i| ((i / 65536) as u8).wrapping_mul(31) ^ ((i % 251) as u8))
            .collect();
        std::fs::write(p("src.raw"), &data).unwrap();
        // A zlib-compressed base under a larger zstd top (past 8M nothing holds the bytes):
        // some clusters written plain, some zeroed, some compressed with zstd.
        qemu_img(&[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p("src.raw"),
            &p("z.qcow2"),
        ]);
        let top = p("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "-b",
            &p("z.qcow2"),
            "-F",
            "qcow2",
            &top,
            "10M",
        ]);
        qemu_io(&top, "write -P 0x5a 1M 192k");
        qemu_io(&top, "write -z 3M 128k");
        qemu_io(&top, "write -c -P 0x33 5M 256k");
        qemu_img(&["convert", "-q", "-O", "raw", &top, &p("top.raw")]);
        let want = std::fs::read(p("top.raw")).unwrap();
        let disk = Disk::new(
            Arc::new(Chain::open(std::path::Path::new(&top)).unwrap()),
            0,
            Table::Active,
        );
        for (off, len) in [
            (0, 2 * MIB),
            (4096, MIB),
            (MIB - 512, MIB + 1024),
            (5 * MIB - 100, 300_000),
            (7 * MIB + 4096, 3 * MIB - 4096),
            (0, 10 * MIB),
        ] {
            // Every byte is written: the FUSE layer reuses its buffers without zeroing them.
            let mut buf = vec![0xeeu8; len as usize];
            disk.read(off, &mut buf).unwrap();
            let end = (off + len) as usize;
            assert!(
                buf == want[off as usize..end],
                "read {off}+{len} differs from qemu-img convert"
            );
        }
        // The metadata's zeros (a zero write, bytes no layer holds) are left to the caller,
        // the buffer untouched; everything else is read (no data range of this pattern is all
        // zero).
        for (off, len) in [
            (3 * MIB, 128 << 10),
            (3 * MIB + 4096, 4096),
            (3 * MIB - 512, 1024),
            (8 * MIB, 2 * MIB),
            (8 * MIB - 1, 2),
            (9 * MIB, MIB),
            (0, 4096),
            (5 * MIB, 4096),
        ] {
            let want = &want[off as usize..(off + len) as usize];
            let zeros = want.iter().all(|&b| b == 0);
            let mut buf = vec![0xeeu8; len as usize];
            let read = disk.read_unless_zeros(off, &mut buf).unwrap();
            assert_eq!(read, !zeros, "read_unless_zeros({off}, {len})");
            if read {
                assert!(
                    buf == want,
                    "read_unless_zeros({off}, {len}) read other bytes"
                );
            } else {
                assert!(buf.iter().all(|&b| b == 0xee), "zeros({off}, {len}) wrote");
            }
        }
    }

    /// The data runs of a chain, per layer, equal `qemu-img map`'s where they cross the L2
    /// slices the read path caches (top: 16 KiB clusters, 8 MiB per slice, 32 MiB per table;
    /// base: 64 KiB clusters, 32 MiB per slice), with the slices evicted between lookups, and
    /// reads of them equal qemu-img convert.
    #[test]
    fn mappings_across_l2_slices_equal_qemu() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n).display().to_string();
        let create = |name: &str, cluster: &str, backing: Option<&str>| {
            let mut a = vec!["create", "-q", "-f", "qcow2", "-o", cluster];
            if let Some(b) = backing {
                a.extend(["-b", b, "-F", "qcow2"]);
            }
            let path = p(name);
            a.extend([path.as_str(), "80M"]);
            qemu_img(&a);
        };
        create("base.qcow2", "cluster_size=64k", None);
        qemu_io(&p("base.qcow2"), "write -P 1 0 80M");
        create("top.qcow2", "cluster_size=16k", Some(&p("base.qcow2")));
        for cmd in [
            "write -P 2 8160k 64k",  // across the first slice boundary (8 MiB)
            "write -P 3 32752k 48k", // across the first table boundary (32 MiB)
            "write -z 16368k 32k",   // zeros across a slice boundary
            "write -P 6 24M 64k",    // data from a slice's first entry, unallocated before
            "write -c -P 4 40M 16k", // a compressed cluster
            "write -P 5 48M 16M",    // two whole slices and more
            "discard 70M 4M",        // zeros over the base's data
        ] {
            qemu_io(&p("top.qcow2"), cmd);
        }
        let top = p("top.qcow2");
        let chain = Arc::new(Chain::open(std::path::Path::new(&top)).unwrap());
        chain.layers[0].qcow2().unwrap().set_cache_budget(0);
        let disk = Disk::new(chain, 0, Table::Active);
        // (start, end, depth) of data runs, adjacent ones of one layer merged.
        let mut ours: Vec<(u64, u64, usize)> = Vec::new();
        let mut at = 0;
        while at < disk.size() {
            let (r, n) = disk.resolve(at, disk.size() - at).unwrap();
            let data = matches!(r.mapping, Mapping::Data(_) | Mapping::Compressed { .. });
            if let (true, Some(depth)) = (data, r.depth) {
                match ours.last_mut() {
                    Some(l) if l.1 == at && l.2 == depth => l.1 = at + n,
                    _ => ours.push((at, at + n, depth)),
                }
            }
            at += n;
        }
        let out = std::process::Command::new("qemu-img")
            .args(["map", "--output=json", &top])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut theirs: Vec<(u64, u64, usize)> = Vec::new();
        for e in v.as_array().unwrap() {
            if e["data"].as_bool().unwrap() {
                let (s, n) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                let depth = e["depth"].as_u64().unwrap() as usize;
                match theirs.last_mut() {
                    Some(l) if l.1 == s && l.2 == depth => l.1 = s + n,
                    _ => theirs.push((s, s + n, depth)),
                }
            }
        }
        assert_eq!(ours, theirs);
        qemu_img(&["convert", "-q", "-O", "raw", &top, &p("top.raw")]);
        let want = std::fs::read(p("top.raw")).unwrap();
        let mut buf = vec![0xeeu8; want.len()];
        disk.read(0, &mut buf).unwrap();
        assert!(buf == want, "read differs from qemu-img convert");
    }
}

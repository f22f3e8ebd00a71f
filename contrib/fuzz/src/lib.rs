//! Shared helpers for the ckptfs fuzz targets: a tiny cursor over the fuzzer's bytes and the
//! whole-image driver used by the `image` target.

use ckptfs::chain::{Chain, Disk};
use ckptfs::checkpoint::{Engine, Model};
use ckptfs::qcow2::Table;
use std::path::PathBuf;
use std::sync::Arc;

/// Reads fixed-size values from the front of the input, then hands out the rest.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u32(&mut self) -> u32 {
        let mut v = 0u32;
        for _ in 0..4 {
            v = v << 8 | u32::from(self.u8());
        }
        v
    }

    pub fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(self.u8());
        }
        v
    }

    /// A cluster_bits value QEMU (and `Header::parse`) accepts: 9..=21.
    pub fn cluster_bits(&mut self) -> u32 {
        9 + u32::from(self.u8()) % 13
    }

    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// At most this many reads of `READ_LEN` bytes per input, over every disk the image shows.
pub const MAX_READS: usize = 64;
pub const READ_LEN: usize = 4096;

/// A private scratch file for this fuzzing process.
fn scratch_path() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ckptfs-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir.join("image.qcow2")
}

/// FNV-1a, to pick read offsets that depend on the input.
fn hash(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Read up to `n` small ranges of `disk`: start, end, and spread offsets.
fn read_some(disk: &Disk, seed: u64, n: usize, budget: &mut usize) {
    let size = disk.size();
    let mut buf = vec![0u8; READ_LEN];
    let mut s = seed;
    for i in 0..n {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let off = match i {
            0 => 0,
            1 => size.saturating_sub(READ_LEN as u64 / 2),
            _ => {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if size == 0 {
                    0
                } else {
                    (s >> 1) % size
                }
            }
        };
        let _ = disk.read(off, &mut buf);
    }
}

/// Open `data` as a qcow2 chain, build the checkpoint model, and touch everything it exposes
/// in bounded amounts. Any panic propagates (that is what the fuzzer looks for).
pub fn run_image(data: &[u8]) {
    let path = scratch_path();
    std::fs::write(&path, data).expect("write scratch image");
    let Ok(chain) = Chain::open(&path) else {
        return;
    };
    let chain = Arc::new(chain);
    let seed = hash(data);
    let mut budget = MAX_READS;
    read_some(
        &Disk::new(chain.clone(), 0, Table::Active),
        seed,
        8,
        &mut budget,
    );
    for (li, layer) in chain.layers.iter().enumerate() {
        if let Some(q) = layer.qcow2() {
            for si in 0..q.snapshots.len().min(4) {
                read_some(
                    &Disk::new(chain.clone(), li, Table::Snapshot(si)),
                    seed ^ si as u64,
                    4,
                    &mut budget,
                );
            }
        }
    }
    let model = Model::build(chain.clone(), &Default::default());
    let engine = Engine::new(Arc::new(model), 64 << 20);
    let mut bits = [0u8; 512];
    for i in 0..engine.model.checkpoints.len() {
        let _ = engine.changed_bytes(i);
        let _ = engine.extents(i);
        let _ = engine.read_bitmap(i, 0, &mut bits);
        if let Some(disk) = engine.model.checkpoints[i].disk.clone() {
            read_some(&disk, seed.rotate_left(i as u32), 4, &mut budget);
        }
    }
}

/// Like `run_image`, but through the filesystem core a mount serves: walk the whole tree
/// (readdir, lookup, getattr), open every file, read a few ranges and SEEK_DATA/SEEK_HOLE.
pub fn run_tree(data: &[u8]) {
    use ckptfs::fs::{FsCore, MountInfo};
    let path = scratch_path();
    std::fs::write(&path, data).expect("write scratch image");
    let Ok(chain) = Chain::open(&path) else {
        return;
    };
    let model = Model::build(Arc::new(chain), &Default::default());
    let engine = Engine::new(Arc::new(model), 8 << 20);
    let info = MountInfo {
        options: serde_json::Value::Null,
        uid: 0,
        gid: 0,
        image_mode: 0o644,
        mtime: std::time::SystemTime::UNIX_EPOCH,
        watch_from: usize::MAX,
    };
    let core = FsCore::new(engine, info, None);
    let mut budget = MAX_READS;
    let mut dirs = vec![core.root()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = core.readdir(dir) else {
            continue;
        };
        for (ino, is_dir, name) in entries {
            if name == "." || name == ".." {
                continue;
            }
            let _ = core.lookup(dir, &name);
            let Ok(attr) = core.getattr(ino) else {
                continue;
            };
            if is_dir {
                dirs.push(ino);
                continue;
            }
            let Ok(open) = core.open(ino, false) else {
                continue;
            };
            for off in [0, attr.size / 2, attr.size.saturating_sub(100)] {
                if budget == 0 {
                    break;
                }
                budget -= 1;
                let _ = core.read(ino, open.fh, off, READ_LEN as u32);
            }
            let _ = core.lseek(ino, 0, ckptfs::fs::ops::SEEK_DATA);
            let _ = core.lseek(ino, 0, ckptfs::fs::ops::SEEK_HOLE);
            core.release(open.fh);
        }
    }
}

/// The writer on a mutated image (refcount table and blocks, L2 updates, bitmap storage at
/// close): open for writing, allocating writes, zeroing, close; then reopen read-only. A write
/// that returned Ok and was not overwritten later must read back (no byte lost).
pub fn run_refcount(data: &[u8]) {
    use ckptfs::chain::write::Writer;
    let path = scratch_path();
    std::fs::write(&path, data).expect("write scratch image");
    let Ok(chain) = Chain::open_with(&path, true) else {
        return;
    };
    let chain = Arc::new(chain);
    let size = chain.top().qcow2().map_or(0, |q| q.size());
    let Ok(mut w) = Writer::open(chain) else {
        return;
    };
    let seed = hash(data);
    let pick = |k: u64, len: u64| {
        let r = seed
            .rotate_left(k as u32 * 13)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        r % size.saturating_sub(len).max(1)
    };
    let zeros_at = pick(1, 1 << 16);
    let _ = w.write(pick(2, 3000), &[0x5a; 3000]);
    let _ = w.zero(zeros_at, (1 << 16).min(size));
    // The last write: distinctive bytes, checked after reopening.
    let last_len = 9000u64.min(size) as usize;
    let last_at = pick(3, last_len as u64);
    let pattern: Vec<u8> = (0..last_len).map(|i| (i % 251) as u8 ^ 0xa5).collect();
    let last_ok = w.write(last_at, &pattern).is_ok();
    let closed = w.close().is_ok();
    drop(w);
    let Ok(chain) = Chain::open(&path) else {
        return;
    };
    let mut back = vec![0u8; last_len];
    let disk = Disk::new(Arc::new(chain), 0, Table::Active);
    if last_ok && closed && disk.read(last_at, &mut back).is_ok() {
        assert!(
            back == pattern,
            "bytes written at {last_at} read back different"
        );
    }
}

/// Mount `data` for real (in-process, kernel FUSE) and use the tree as a user does: walk it,
/// stat everything, read a few ranges of every file, SEEK_DATA/SEEK_HOLE; every second input
/// read-write with a write through current/disk.img, then checkpoints taken and deleted as a
/// user does (mkdir of a new one, rmdir of it and of one the image had), each followed by
/// another walk. A hang is a libFuzzer timeout.
pub fn run_mount(data: &[u8]) {
    use ckptfs::cli::mount;
    use ckptfs::cli::options::MountOptions;
    use std::io::Write;
    let path = scratch_path();
    std::fs::write(&path, data).expect("write scratch image");
    let mnt = path.with_file_name("mnt");
    std::fs::create_dir_all(&mnt).expect("create mountpoint");
    let seed = hash(data);
    let rw = seed & 1 == 1;
    let o = MountOptions {
        rw,
        writable: rw,
        cache_mb: 8,
        ..Default::default()
    };
    let Ok(m) = mount::spawn(&path, &mnt, &o) else {
        return;
    };
    // Half the reads for the first walk, half for the walks after the changes.
    let mut budget = MAX_READS / 2;
    let before = walk_mount(&mnt, &mut budget);
    budget += MAX_READS / 2;
    if rw {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .open(mnt.join("current/disk.img"))
        {
            let _ = f.write_all(&[0x77; 5000]);
            let _ = f.sync_all();
        }
        // Errors (EPERM, EIO, ENOSPC...) are fine; a panic, hang or bad tree is not.
        let new = mnt.join("fuzz-ckpt");
        if std::fs::create_dir(&new).is_ok() {
            let _ = walk_mount(&mnt, &mut budget);
            let _ = std::fs::remove_dir(&new);
        }
        let _ = walk_mount(&mnt, &mut budget);
        let existing: Vec<_> = before
            .iter()
            .filter(|d| d.parent() == Some(mnt.as_path()) && !d.ends_with("current"))
            .collect();
        if !existing.is_empty() {
            let pick = existing[(seed >> 1) as usize % existing.len()];
            if std::fs::remove_dir(pick).is_ok() {
                let _ = walk_mount(&mnt, &mut budget);
            }
        }
    }
    m.unmount().expect("unmount");
}

/// Walk the mounted tree: every listed name must be a valid file name that stats; read a few
/// ranges of every file (within `budget` reads), SEEK_DATA/SEEK_HOLE. Returns the directories.
fn walk_mount(mnt: &std::path::Path, budget: &mut usize) -> Vec<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; READ_LEN];
    let mut seen = Vec::new();
    let mut dirs = vec![mnt.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            // Every listed name is a file name that can be looked up.
            let name = e.file_name();
            assert!(
                !name.is_empty() && name != "." && name != "..",
                "bad directory entry {name:?}"
            );
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).expect("stat a listed entry");
            if md.is_dir() {
                seen.push(p.clone());
                dirs.push(p);
                continue;
            }
            let Ok(mut f) = std::fs::File::open(&p) else {
                continue;
            };
            for off in [0, md.len() / 2, md.len().saturating_sub(100)] {
                if *budget == 0 {
                    break;
                }
                *budget -= 1;
                if f.seek(SeekFrom::Start(off)).is_ok() {
                    let _ = f.read(&mut buf);
                }
            }
            for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
                // SAFETY: lseek on an open descriptor.
                unsafe { libc::lseek(f.as_raw_fd(), 0, whence) };
            }
        }
    }
    seen
}

//! The fastest any FUSE file system can answer the bench's requests on this machine: one that
//! holds nothing and computes nothing. Reads answer from one buffer in memory, lseek from a
//! sorted list of the changed runs. Mounted as ckptfs mounts (fuser, 4 threads, a cloned
//! /dev/fuse descriptor each, direct_io, 1 MiB st_blksize, read-ahead and writes), in this
//! process. Its rows show what is left for a FUSE file system once its own work is free: the
//! kernel's round trips and copies, and so the best ratio any target over FUSE can reach here.

use super::*;
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyLseek, ReplyOpen, Request,
};
use std::ffi::OsStr;
use std::time::UNIX_EPOCH;

const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;
const CHANGED: u64 = 2;
const DISK: u64 = 3;
const FILES: [(u64, &str); 2] = [(CHANGED, "changed.img"), (DISK, "disk.img")];

struct IdealFs {
    size: u64,
    /// The changed runs, sorted, adjacent ones merged: (start, end).
    runs: Vec<(u64, u64)>,
    bytes: Vec<u8>,
}

impl IdealFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == ROOT;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o555 } else { 0o444 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: if dir { 4096 } else { 1 << 20 },
            flags: 0,
        }
    }

    /// SEEK_DATA / SEEK_HOLE in changed.img; None: no data at or after `off`.
    fn seek_changed(&self, off: u64, data: bool) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.1 <= off);
        match self.runs.get(i) {
            Some(&(s, e)) if s <= off => Some(if data { off } else { e }),
            Some(&(s, _)) => Some(if data { s } else { off }),
            None if data => None,
            None => Some(self.size),
        }
    }
}

impl Filesystem for IdealFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match FILES.iter().find(|f| OsStr::new(f.1) == name) {
            Some(&(ino, _)) => reply.entry(&TTL, &self.attr(ino), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.attr(ino.0))
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO)
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let n = u64::from(size).min(self.size.saturating_sub(offset)) as usize;
        reply.data(&self.bytes[..n.min(self.bytes.len())])
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let off = offset.max(0) as u64;
        let data = whence == libc::SEEK_DATA;
        let found = if off >= self.size {
            None
        } else if ino.0 == CHANGED {
            self.seek_changed(off, data)
        } else {
            Some(if data { off } else { self.size })
        };
        match found {
            Some(o) => reply.offset(o as i64),
            None => reply.error(Errno::from_i32(libc::ENXIO)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ]
        .into_iter()
        .chain(FILES.iter().map(|&(i, n)| (i, FileType::RegularFile, n)));
        for (k, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}

/// The runs of an `extents` file (data and zero lines alike: all are data in changed.img),
/// adjacent ones merged.
fn changed_runs(extents: &str) -> Res<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for line in extents.lines() {
        let mut w = line.split_whitespace();
        let (Some(s), Some(n)) = (w.next(), w.next()) else {
            return Err(format!("extents: bad line {line:?}").into());
        };
        let (s, n): (u64, u64) = (s.parse()?, n.parse()?);
        match runs.last_mut() {
            Some(last) if last.1 == s => last.1 = s + n,
            _ => runs.push((s, s + n)),
        }
    }
    Ok(runs)
}

/// The ideal file system, mounted at `dir`, with changed.img holding the runs of `extents`
/// (the text of a checkpoint's extents file) and disk.img all data; both `size` bytes.
pub struct Ideal {
    pub dir: PathBuf,
    _session: BackgroundSession,
}

impl Ideal {
    pub fn start(dir: &Path, size: u64, extents: &str) -> Res<Ideal> {
        fs::create_dir_all(dir)?;
        let fs = IdealFs {
            size,
            runs: changed_runs(extents)?,
            // Not zeros: a copy of them must not turn into holes.
            bytes: vec![0x5a; 1 << 20],
        };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::RO, MountOption::FSName("ideal".into())];
        config.n_threads = Some(4);
        config.clone_fd = true;
        let session = fuser::spawn_mount(fs, dir, &config)?;
        Ok(Ideal {
            dir: fs::canonicalize(dir)?,
            _session: session,
        })
    }

    pub fn changed(&self) -> PathBuf {
        self.dir.join("changed.img")
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
}

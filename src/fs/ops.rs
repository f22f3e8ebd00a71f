//! The filesystem core: plain Rust arguments in, `Result`s out, so tests can drive it without
//! a mount. `handlers.rs` adapts it to fuser.

use super::node::{content_slots, seek_disk, stat_kinds, Class, Node};
use super::prefetch::Prefetch;
use super::tree::{Tree, ROOT};
use crate::chain::usage::stored_blocks;
use crate::chain::watch::Watcher;
use crate::checkpoint::engine::{keep, Cached};
use crate::checkpoint::stats::{stats_json, FileCounters};
use crate::checkpoint::{render, Editor, Engine, Model};
use crate::error::{Error, ErrorKind, Result};
use parking_lot::{Mutex, RwLock};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// Facts about the mount that attributes and info.json need.
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// The mount options as given, for current/info.json.
    pub options: Value,
    pub uid: u32,
    pub gid: u32,
    /// Mode bits of the top image (permissions of the tree derive from them).
    pub image_mode: u32,
    pub mtime: SystemTime,
    /// First chain layer that must not change while mounted (1 when the top is written by
    /// this mount or by a live QEMU).
    pub watch_from: usize,
}

/// Attributes of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    /// 512-byte blocks of data (honest, so `cp` uses SEEK_DATA).
    pub blocks: u64,
    pub dir: bool,
    pub perm: u16,
    pub nlink: u32,
}

/// A change of the tree that ckptfs refuses (see `FsCore::change_refused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A name added, removed or renamed (unlink, rename, create, mknod, link, symlink).
    Entry,
    /// An extended attribute set or removed.
    Xattr,
    /// A mode, owner or group changed (chmod, chown).
    Owner,
}

/// Whence values of lseek that reach a FUSE filesystem.
pub const SEEK_DATA: i32 = libc::SEEK_DATA;
pub const SEEK_HOLE: i32 = libc::SEEK_HOLE;

/// How an open file should be cached by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    pub fh: u64,
    pub direct_io: bool,
    pub keep_cache: bool,
}

/// The model-dependent part of the tree, swapped as a whole when checkpoints change.
pub struct State {
    pub engine: Engine,
    pub tree: Tree,
}

pub struct FsCore {
    state: RwLock<Arc<State>>,
    pub info: MountInfo,
    counters: FileCounters,
    handles: Mutex<HashMap<u64, Arc<[u8]>>>,
    next_fh: AtomicU64,
    generated: Vec<Cached<Arc<[u8]>>>,
    /// The writer of the top image, on `-o rw` mounts; one at a time.
    writer: Option<Mutex<Editor>>,
    /// Notices layers changed underneath the mount: data reads then fail.
    watcher: Watcher,
    /// Drops the kernel's cached pages of the given inodes (set by the mount once its session
    /// exists), so that pages cached before a change was noticed are not served after it.
    invalidator: OnceLock<Invalidator>,
    /// Sequential readers' next requests, read ahead.
    prefetch: Prefetch,
}

pub type Invalidator = Arc<dyn Fn(&[u64]) + Send + Sync>;

/// What `FsCore::read_into` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The bytes are the first n of the buffer.
    Buf(usize),
    /// n bytes of zeros (a hole of a disk image): reply from `ZEROS`, the buffer untouched.
    Zeros(usize),
}

impl Served {
    /// How many bytes the reply holds.
    pub fn bytes(self) -> usize {
        match self {
            Served::Buf(n) | Served::Zeros(n) => n,
        }
    }
}

/// Zeros to reply with, as long as the longest request (max_read).
pub static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// `src` into the front of `buf` (grown if short); returns its length.
fn copy_into(buf: &mut Vec<u8>, src: &[u8]) -> usize {
    if buf.len() < src.len() {
        buf.resize(src.len(), 0);
    }
    buf[..src.len()].copy_from_slice(src);
    src.len()
}

fn not_found() -> Error {
    Error::new(ErrorKind::NotFound, "no such file or directory")
}

impl FsCore {
    /// A core for a mount; `writer` makes current/disk.img writable (`-o rw`).
    pub fn new(engine: Engine, info: MountInfo, writer: Option<Editor>) -> FsCore {
        let tree = Tree::build(&engine.model, None);
        let n = content_slots(engine.model.checkpoints.len());
        FsCore {
            state: RwLock::new(Arc::new(State { engine, tree })),
            watcher: Watcher::new(info.watch_from),
            info,
            writer: writer.map(Mutex::new),
            counters: FileCounters::new(&stat_kinds()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            generated: (0..n).map(|_| OnceLock::new()).collect(),
            invalidator: OnceLock::new(),
            prefetch: Prefetch::default(),
        }
    }

    /// How to drop the kernel's page cache of inodes (see `invalidator`).
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }

    /// Refuse to serve data mixed from before and after another program changed a layer.
    fn check_fresh(&self, st: &State) -> Result<()> {
        self.watcher
            .check(&st.engine.model.chain, || self.drop_cached_pages(st))
    }

    /// Once stale: make the kernel forget every cached page of the data files, so every later
    /// read reaches this filesystem (and fails). From a separate thread: invalidating pages
    /// waits for their locks, which the read being served may hold.
    fn drop_cached_pages(&self, st: &State) {
        let Some(f) = self.invalidator.get().cloned() else {
            return;
        };
        let inos: Vec<u64> = st
            .tree
            .inodes()
            .into_iter()
            .filter(|&i| st.tree.node(i).is_some_and(|n| n.is_data()))
            .collect();
        std::thread::spawn(move || f(&inos));
    }

    /// The current model and tree (a snapshot: a concurrent mkdir/rmdir swaps in a new one).
    pub fn state(&self) -> Arc<State> {
        self.state.read().clone()
    }

    fn node(&self, st: &State, ino: u64) -> Result<Node> {
        st.tree.node(ino).ok_or_else(not_found)
    }

    fn count(&self, node: Node, bytes: usize) {
        self.counters.count(node.stat(), bytes);
    }

    fn ckpt_ok(&self, st: &State, ci: usize) -> Result<()> {
        match &st.engine.model.checkpoints[ci].invalid {
            Some(r) => Err(Error::new(ErrorKind::InvalidCheckpoint, r.clone())),
            None => Ok(()),
        }
    }

    /// Generated text (JSON files, extents), cached where it cannot change.
    fn content(&self, st: &State, node: Node) -> Result<Arc<[u8]>> {
        let make = || -> Result<Arc<[u8]>> {
            let text = match node {
                Node::CheckpointsJson => render::to_text(&render::checkpoints_json(&st.engine)),
                Node::StatsJson => render::to_text(&self.stats_json()),
                Node::CurrentInfo => {
                    render::to_text(&render::current_json(&st.engine, &self.info.options))
                }
                _ => {
                    let (ci, f, make) = node
                        .content_file()
                        .ok_or_else(|| Error::invalid("not a generated file"))?;
                    if f.trusted_only {
                        self.ckpt_ok(st, ci)?;
                    }
                    return make(&st.engine, ci);
                }
            };
            Ok(Arc::from(text.into_bytes()))
        };
        // Content that a writer can change is never cached on rw mounts.
        match node.content_slot().and_then(|i| self.generated.get(i)) {
            Some(slot) if self.writer.is_none() => keep(slot, make),
            _ => make(),
        }
    }

    pub fn stats_json(&self) -> Value {
        stats_json(&self.state().engine, &self.counters)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        let ro_file = (self.info.image_mode & 0o444) as u16;
        let dir_perm = ro_file | ((ro_file & 0o444) >> 2);
        let mut a = Attr {
            ino,
            size: 0,
            blocks: 0,
            dir: node.is_dir(),
            perm: ro_file,
            nlink: 1,
        };
        if !a.dir {
            a.size = self.getattr_size(st, node).unwrap_or(0);
            a.blocks = a.size.div_ceil(512);
        }
        if let Some((ci, _, d)) = node.data_file() {
            a.blocks = (d.blocks)(&st.engine, ci, a.size);
        }
        match node {
            Node::Root | Node::CurrentDir | Node::CkptDir(_) => {
                a.perm = dir_perm;
                if node == Node::Root && self.writer.is_some() {
                    // mkdir/rmdir take and delete checkpoints.
                    a.perm |= (self.info.image_mode & 0o200) as u16;
                }
                a.nlink = 2;
            }
            Node::CurrentDisk => {
                a.blocks = stored_blocks(&st.engine.current);
                if self.writer.is_some() {
                    a.perm |= (self.info.image_mode & 0o200) as u16;
                }
            }
            _ => {}
        }
        Ok(a)
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr> {
        let st = self.state();
        let st = &*st;
        let ino = st.tree.lookup(parent, name).ok_or_else(not_found)?;
        self.getattr(ino)
    }

    /// Entries of a directory, with "." and "..".
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        if !node.is_dir() {
            return Err(Error::new(ErrorKind::Invalid, "not a directory"));
        }
        let mut out = vec![
            (ino, true, ".".to_string()),
            (st.tree.parent(ino), true, "..".to_string()),
        ];
        for (c, name) in st.tree.children(ino) {
            let dir = st.tree.node(c).is_some_and(|n| n.is_dir());
            out.push((c, dir, name.to_string()));
        }
        self.count(node, 0);
        Ok(out)
    }

    pub fn open(&self, ino: u64, write: bool) -> Result<OpenMode> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        if write {
            match (&self.writer, node) {
                (Some(_), Node::CurrentDisk) => {}
                (Some(_), _) => {
                    return Err(Error::new(
                        ErrorKind::NoAccess,
                        "only current/disk.img is writable",
                    ))
                }
                (None, _) => return Err(Error::new(ErrorKind::ReadOnly, "read-only file system")),
            }
        }
        if node.is_data() {
            self.check_fresh(st)?;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        match node.data_file() {
            Some((ci, f, _)) if f.trusted_only => self.ckpt_ok(st, ci)?,
            _ if node.is_generated() => {
                let c = self.content(st, node)?;
                self.handles.lock().insert(fh, c);
            }
            _ => {}
        }
        // On rw mounts the data behind every file changes with writes the kernel cannot see
        // coming: no page cache there.
        let rw = self.writer.is_some();
        Ok(OpenMode {
            fh,
            // On rw mounts disk.img too: the kernel then forwards a write that crosses the end
            // whole, so it is refused whole instead of being cut at a page boundary.
            // The disks too, on every mount (see `CkptFile::direct_io`).
            direct_io: node == Node::StatsJson || rw || node.is_direct(),
            keep_cache: node != Node::StatsJson && !rw,
        })
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    /// Read `[off, off+size)` of `ino` into `buf`: the bytes are `buf[..n]` for the `n`
    /// returned (short at the end of the file). `buf` is meant to be reused from read to read:
    /// it is only grown (or swapped for the buffer of a range read ahead, see prefetch.rs), and
    /// a data file's read writes every byte of its range, so it is never zeroed first (a MiB
    /// of memset per request).
    pub fn read_into(
        &self,
        ino: u64,
        fh: u64,
        off: u64,
        size: u32,
        buf: &mut Vec<u8>,
    ) -> Result<Served> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        // Only generated files keep per-open content; disk reads never touch the handle map.
        if let Some(c) = node
            .is_generated()
            .then(|| self.handles.lock().get(&fh).cloned())
            .flatten()
        {
            let start = (off.min(c.len() as u64)) as usize;
            let end = (start + size as usize).min(c.len());
            self.count(node, end - start);
            return Ok(Served::Buf(copy_into(buf, &c[start..end])));
        }
        if self.reads_ahead(st, node) {
            self.check_fresh(st)?;
            if let Some(d) = self.prefetch.take(ino, off, size) {
                self.count(node, d.len());
                // Its buffer becomes the reply buffer (no copy); the old one goes back.
                let n = d.len();
                self.prefetch.recycle(std::mem::replace(buf, d));
                return Ok(Served::Buf(n));
            }
        }
        let served = self.read_node(st, node, off, size, buf)?;
        self.count(node, served.bytes());
        Ok(served)
    }

    /// The bytes of `[off, off+size)` of a file node into `buf[..n]`, or, for a disk image's
    /// range that lies wholly in a hole (half of a sparse disk read with dd), `Zeros` with the
    /// buffer untouched (see `read_into`).
    fn read_node(
        &self,
        st: &State,
        node: Node,
        off: u64,
        size: u32,
        buf: &mut Vec<u8>,
    ) -> Result<Served> {
        let len = self.getattr_size(st, node)?;
        if off >= len {
            return Ok(Served::Buf(0));
        }
        // Everything read from the layers (not the JSON of the model) waits for freshness.
        if node.class() != Some(Class::Text) {
            self.check_fresh(st)?;
        }
        let n = (len - off).min(u64::from(size)) as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let out = &mut buf[..n];
        // Every byte of the range is written (data, decompressed, or zeros): `buf` is not
        // zeroed first.
        match (node.disk(&st.engine), node.data_file()) {
            (Some(disk), _) => {
                if !disk.read_unless_zeros(off, out)? {
                    if n <= ZEROS.len() {
                        return Ok(Served::Zeros(n));
                    }
                    out.fill(0);
                }
            }
            (None, Some((ci, f, d))) => {
                if f.trusted_only {
                    self.ckpt_ok(st, ci)?;
                }
                (d.read)(&st.engine, ci, off, out)?
            }
            (None, None) => {
                let c = self.content(st, node)?;
                let end = (off as usize + n).min(c.len());
                let got = c.get(off as usize..end).unwrap_or_default();
                return Ok(Served::Buf(copy_into(buf, got)));
            }
        }
        Ok(Served::Buf(n))
    }

    /// Whether sequential reads of `node` get their next request read ahead (prefetch.rs):
    /// disk images of read-only mounts (on rw mounts a write could change the bytes read).
    fn reads_ahead(&self, st: &State, node: Node) -> bool {
        self.writer.is_none() && node.disk(&st.engine).is_some()
    }

    /// A read of `[off, off+len)` of `ino` was answered in `took`. For a disk image: let a
    /// sequential reader find the next layer bytes in the page cache (`Disk::read_ahead`),
    /// and read its next request ahead (prefetch.rs).
    pub fn after_read(&self, ino: u64, off: u64, len: u32, took: Duration) {
        let st = self.state();
        let st = &*st;
        let Some(node) = st.tree.node(ino) else {
            return;
        };
        let Some(disk) = node.disk(&st.engine) else {
            return;
        };
        // Slower than 1 ms + 1 ns a byte (1 GB/s): some of it came from the disk, not the
        // page cache (a MiB from the page cache takes about a third of a millisecond).
        let waited = took > Duration::from_millis(1) + Duration::from_nanos(u64::from(len));
        if let Err(e) = disk.read_ahead(off, u64::from(len), waited) {
            log::debug!("read ahead of inode {ino} at {off}: {e}");
        }
        if !self.reads_ahead(st, node) {
            return;
        }
        let Some((at, n)) = self.prefetch.next(ino, off, len) else {
            return;
        };
        // Handed in even if the read panics, so that no request waits for it forever.
        struct Handed<'a> {
            p: &'a Prefetch,
            ino: u64,
            at: u64,
            got: Option<Vec<u8>>,
        }
        impl Drop for Handed<'_> {
            fn drop(&mut self) {
                self.p.finish(self.ino, self.at, self.got.take());
            }
        }
        let mut h = Handed {
            p: &self.prefetch,
            ino,
            at,
            got: None,
        };
        let mut buf = self.prefetch.buffer();
        h.got = self
            .read_node(st, node, at, n, &mut buf)
            .ok()
            .map(|served| {
                match served {
                    Served::Buf(k) => buf.truncate(k),
                    Served::Zeros(k) => {
                        buf.clear();
                        buf.resize(k, 0);
                    }
                }
                buf
            });
    }

    /// The size of a file node (what getattr reports and reads stop at).
    fn getattr_size(&self, st: &State, node: Node) -> Result<u64> {
        if node == Node::CurrentDisk {
            return Ok(st.engine.current.size());
        }
        match node.data_file() {
            Some((ci, _, d)) => Ok((d.size)(&st.engine, ci)),
            None => Ok(self.content(st, node)?.len() as u64),
        }
    }

    /// lseek(SEEK_DATA / SEEK_HOLE); other whence values are the kernel's business.
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> Result<u64> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        self.counters.seek(node.stat());
        let size = self.getattr_size(st, node)?;
        let enxio = || Error::new(ErrorKind::PastEnd, "seek past the end or the last data");
        if whence != SEEK_DATA && whence != SEEK_HOLE {
            return Err(Error::invalid("unsupported whence"));
        }
        if off >= size {
            return Err(enxio());
        }
        let want_data = whence == SEEK_DATA;
        let found = match (node, node.data_file()) {
            (Node::CurrentDisk, _) => seek_disk(&st.engine.current, off, size, want_data)?,
            (_, Some((ci, f, d))) => {
                if f.trusted_only {
                    self.ckpt_ok(st, ci)?;
                }
                (d.seek)(&st.engine, ci, off, size, want_data)?
            }
            // Generated text is data throughout.
            _ => Some(if want_data { off } else { size }),
        };
        match found {
            Some(at) => Ok(at),
            None if want_data => Err(enxio()),
            None => Ok(size),
        }
    }

    fn writer(&self, ino: u64) -> Result<&Mutex<Editor>> {
        let st = self.state();
        let st = &*st;
        match (&self.writer, self.node(st, ino)?) {
            (Some(w), Node::CurrentDisk) => Ok(w),
            (Some(_), _) => Err(Error::new(
                ErrorKind::NoAccess,
                "only current/disk.img is writable",
            )),
            (None, _) => Err(Error::new(ErrorKind::ReadOnly, "read-only file system")),
        }
    }

    /// Write into current/disk.img (rw mounts).
    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        let st = self.state();
        let st = &*st;
        let w = self.writer(ino)?;
        let r = w.lock().write(off, data);
        st.engine.invalidate(off, data.len() as u64);
        r?;
        self.count(Node::CurrentDisk, data.len());
        Ok(data.len())
    }

    /// fallocate: PUNCH_HOLE and ZERO_RANGE make the range read as zeros; plain allocation
    /// inside the disk is a no-op; anything that would change the size is refused.
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let st = self.state();
        let st = &*st;
        let w = self.writer(ino)?;
        let size = st.engine.current.size();
        if off.checked_add(len).is_none_or(|e| e > size) && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Error::new(ErrorKind::Refused, "size changes are refused"));
        }
        if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) == 0 {
            return Ok(());
        }
        let len = len.min(size.saturating_sub(off));
        let r = w.lock().zero(off, len);
        st.engine.invalidate(off, len);
        r
    }

    /// fsync/fdatasync of current/disk.img.
    pub fn fsync(&self, ino: u64) -> Result<()> {
        let st = self.state();
        let st = &*st;
        match &self.writer {
            Some(w) if self.node(st, ino)? == Node::CurrentDisk => w.lock().flush(),
            _ => Ok(()),
        }
    }

    /// truncate and friends: only "no change" is accepted.
    pub fn set_size(&self, ino: u64, size: u64) -> Result<()> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        if node == Node::CurrentDisk && self.writer.is_some() && size == st.engine.current.size() {
            return Ok(());
        }
        match self.writer {
            None => Err(Error::new(ErrorKind::ReadOnly, "read-only file system")),
            Some(_) => Err(Error::new(ErrorKind::Refused, "size changes are refused")),
        }
    }

    /// The answer to a change of the tree other than mkdir/rmdir (unlink, rename, create,
    /// mknod, link, symlink, setxattr, removexattr, chmod, chown): EROFS on a read-only mount
    /// (the kernel answers so itself unless the mount was remounted rw); on an rw mount EPERM
    /// (the tree is fixed: only mkdir/rmdir take and delete checkpoints), or EOPNOTSUPP for
    /// extended attributes (there are none, so copy tools skip them quietly).
    pub fn change_refused(&self, change: Change) -> Error {
        match (&self.writer, change) {
            (None, _) => Error::new(ErrorKind::ReadOnly, "read-only file system"),
            (Some(_), Change::Entry) => Error::new(
                ErrorKind::Refused,
                "the tree is fixed: only mkdir and rmdir change it",
            ),
            (Some(_), Change::Owner) => Error::new(
                ErrorKind::Refused,
                "modes and owners follow the image files",
            ),
            (Some(_), Change::Xattr) => Error::unsupported("no extended attributes"),
        }
    }

    /// utime/touch: accepted and ignored on rw mounts (times are the top image's, and `cp -p`
    /// onto disk.img should not fail), EROFS on read-only ones.
    pub fn set_times(&self) -> Result<()> {
        match self.writer {
            None => Err(Error::new(ErrorKind::ReadOnly, "read-only file system")),
            Some(_) => Ok(()),
        }
    }

    /// Store bitmaps and clear in_use (clean unmount).
    pub fn shutdown(&self) {
        self.shutdown_then(|r| {
            if let Err(e) = r {
                log::error!("closing the image: {e}");
            }
        })
    }

    /// `shutdown`, then `then` with its outcome while the writer is still held: no request can
    /// write (unrecorded by the stored bitmaps) after them. For a process that exits in `then`
    /// while requests may still arrive.
    pub fn shutdown_then<T>(&self, then: impl FnOnce(Result<()>) -> T) -> T {
        match &self.writer {
            Some(w) => {
                let mut w = w.lock();
                let r = w.close();
                then(r)
            }
            None => then(Ok(())),
        }
    }

    /// Rebuild the model, engine and tree after the top image's bitmaps changed.
    fn rebuild(&self) {
        let mut guard = self.state.write();
        let old = guard.clone();
        let model = Model::build(old.engine.model.chain.clone(), &old.engine.model.options);
        let engine = Engine::new(Arc::new(model), old.engine.cache_bytes);
        let tree = Tree::build(&engine.model, Some(&old.tree));
        *guard = Arc::new(State { engine, tree });
    }

    fn rw_writer(&self) -> Result<&Mutex<Editor>> {
        self.writer
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::ReadOnly, "read-only file system"))
    }

    /// `mkdir MOUNT/NAME`: a new checkpoint (policy: `checkpoint::edit::plan_mkdir`).
    pub fn mkdir(&self, parent: u64, name: &str) -> Result<Attr> {
        let w = self.rw_writer()?;
        if parent != ROOT {
            return Err(Error::new(
                ErrorKind::Refused,
                "checkpoints are made at the top of the tree",
            ));
        }
        let st = self.state();
        let taken = st.tree.lookup(ROOT, name).is_some();
        w.lock().mkdir(&st.engine.model, name, taken)?;
        self.rebuild();
        self.lookup(ROOT, name)
    }

    /// `rmdir MOUNT/NAME`: delete a checkpoint (policy: `checkpoint::edit::plan_rmdir`).
    pub fn rmdir(&self, parent: u64, name: &str) -> Result<()> {
        let w = self.rw_writer()?;
        if parent != ROOT {
            return Err(not_found());
        }
        let st = self.state();
        w.lock().rmdir(&st.engine.model, name)?;
        self.rebuild();
        Ok(())
    }

    /// Root inode, for adapters.
    pub fn root(&self) -> u64 {
        ROOT
    }
}

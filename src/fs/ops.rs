//! The filesystem core: plain Rust arguments in, `Result`s out, so tests can drive it without
//! a mount. `handlers.rs` adapts it to fuser.

use super::tree::{Node, Tree, ROOT};
use crate::chain::Disk;
use crate::checkpoint::engine::{keep, Cached};
use crate::checkpoint::{render, Editor, Engine, Model};
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::Table;
use parking_lot::{Mutex, RwLock};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

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

const KINDS: [&str; 6] = [
    "dir",
    "json",
    "disk.img",
    "changed.img",
    "bitmap.bin",
    "extents",
];

#[derive(Default)]
struct KindCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// The model-dependent part of the tree, swapped as a whole when checkpoints change.
pub struct State {
    pub engine: Engine,
    pub tree: Tree,
}

pub struct FsCore {
    state: RwLock<Arc<State>>,
    pub info: MountInfo,
    counters: [KindCounters; 6],
    handles: Mutex<HashMap<u64, Arc<[u8]>>>,
    next_fh: AtomicU64,
    generated: Vec<Cached<Arc<[u8]>>>,
    /// The writer of the top image, on `-o rw` mounts; one at a time.
    writer: Option<Mutex<Editor>>,
    /// Set once a layer was found changed underneath the mount: data reads then fail.
    stale: OnceLock<String>,
    last_check_ms: AtomicU64,
    /// Drops the kernel's cached pages of the given inodes (set by the mount once its session
    /// exists), so that pages cached before a change was noticed are not served after it.
    invalidator: OnceLock<Invalidator>,
}

pub type Invalidator = Arc<dyn Fn(&[u64]) + Send + Sync>;

/// Is this a file whose bytes come from the image layers (not generated text)?
fn is_data(node: Node) -> bool {
    matches!(
        node,
        Node::CurrentDisk | Node::CkptDisk(_) | Node::CkptChanged(_) | Node::CkptBitmap(_)
    )
}

/// Is this a generated text file (JSON, extents), whose content an open handle keeps?
fn is_generated(node: Node) -> bool {
    !node.is_dir() && !is_data(node)
}

fn not_found() -> Error {
    Error::new(ErrorKind::NotFound, "no such file or directory")
}

impl FsCore {
    /// A core for a mount; `writer` makes current/disk.img writable (`-o rw`).
    pub fn new(engine: Engine, info: MountInfo, writer: Option<Editor>) -> FsCore {
        let tree = Tree::build(&engine.model, None);
        let n = engine.model.checkpoints.len() * 6 + 8;
        FsCore {
            state: RwLock::new(Arc::new(State { engine, tree })),
            info,
            writer: writer.map(Mutex::new),
            counters: Default::default(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            generated: (0..n).map(|_| OnceLock::new()).collect(),
            stale: OnceLock::new(),
            last_check_ms: AtomicU64::new(0),
            invalidator: OnceLock::new(),
        }
    }

    /// How to drop the kernel's page cache of inodes (see `invalidator`).
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }

    /// Refuse to serve data mixed from before and after another program changed a layer
    /// (checked at most every 100 ms; fstat per layer).
    fn check_fresh(&self, st: &State) -> Result<()> {
        let eio = |m: &str| Error::new(ErrorKind::Stale, m);
        if let Some(m) = self.stale.get() {
            return Err(eio(m));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_check_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 100
            || self
                .last_check_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        if let Some(m) = st
            .engine
            .model
            .chain
            .changed_underneath(self.info.watch_from)
        {
            log::error!("{m}");
            if self.stale.set(m.clone()).is_ok() {
                self.drop_cached_pages(st);
            }
            return Err(eio(&m));
        }
        Ok(())
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
            .filter(|&i| st.tree.node(i).is_some_and(is_data))
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
        if let Some(i) = KINDS.iter().position(|k| *k == node.kind_name()) {
            self.counters[i].requests.fetch_add(1, Ordering::Relaxed);
            self.counters[i]
                .bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// The disk a disk.img node shows.
    fn disk<'a>(&self, st: &'a State, node: Node) -> Option<&'a Disk> {
        match node {
            Node::CurrentDisk => Some(&st.engine.current),
            Node::CkptDisk(ci) => st.engine.model.checkpoints[ci].disk.as_ref(),
            _ => None,
        }
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
            let text: String = match node {
                Node::CheckpointsJson => render::to_text(&render::checkpoints_json(&st.engine)),
                Node::StatsJson => render::to_text(&self.stats_json()),
                Node::CurrentInfo => render::to_text(&self.current_info(st)),
                Node::CkptInfo(ci) => {
                    render::to_text(&render::checkpoint_json(&st.engine, ci, true))
                }
                Node::CkptExtents(ci) => {
                    // The engine's text itself, not a copy.
                    self.ckpt_ok(st, ci)?;
                    return Ok(Arc::<[u8]>::from(st.engine.extents(ci)?));
                }
                _ => return Err(Error::invalid("not a generated file")),
            };
            Ok(Arc::from(text.into_bytes()))
        };
        let slot = match node {
            // Content that a writer can change is never cached on rw mounts.
            _ if self.writer.is_some() => return make(),
            Node::StatsJson => return make(),
            Node::CheckpointsJson => 0,
            Node::CurrentInfo => 1,
            Node::CkptInfo(ci) => 2 + ci * 2,
            Node::CkptExtents(ci) => 3 + ci * 2,
            _ => return make(),
        };
        keep(&self.generated[slot], make)
    }

    fn current_info(&self, st: &State) -> Value {
        json!({
            "image": st.engine.model.chain.top().path.display().to_string(),
            "virtual_size": st.engine.model.disk_size(),
            "chain": render::chain_json(&st.engine.model.chain),
            "mount_options": self.info.options,
        })
    }

    pub fn stats_json(&self) -> Value {
        let st = self.state();
        let st = &*st;
        let mut per_kind = serde_json::Map::new();
        for (i, k) in KINDS.iter().enumerate() {
            per_kind.insert(
                k.to_string(),
                json!({"requests": self.counters[i].requests.load(Ordering::Relaxed),
                       "bytes": self.counters[i].bytes.load(Ordering::Relaxed)}),
            );
        }
        let chain = &st.engine.model.chain;
        let layers: Vec<Value> = chain
            .layers
            .iter()
            .map(|l| {
                json!({"file": l.path.display().to_string(),
                       "bytes_read": l.bytes_read.load(Ordering::Relaxed),
                       "clusters_decompressed": l.qcow2().map_or(0, |q| q.decompressed.load(Ordering::Relaxed))})
            })
            .collect();
        let s = &st.engine.cache.stats;
        json!({
            "files": per_kind,
            "layers": layers,
            "clusters_decompressed": chain.layers.iter().filter_map(|l| l.qcow2()).map(|q| q.decompressed.load(Ordering::Relaxed)).sum::<u64>(),
            "cache": {"hits": s.hits.load(Ordering::Relaxed), "misses": s.misses.load(Ordering::Relaxed),
                      "evictions": s.evictions.load(Ordering::Relaxed)},
            "merge_time_ms": s.merge_ns.load(Ordering::Relaxed) as f64 / 1e6,
        })
    }

    fn disk_blocks(&self, st: &State, node: Node) -> u64 {
        let chain = &st.engine.model.chain;
        let (from, size) = match node {
            Node::CurrentDisk => (0, st.engine.current.size()),
            Node::CkptDisk(ci) => match &st.engine.model.checkpoints[ci].disk {
                Some(d) if d.table != Table::Active => {
                    return chain.layers[d.start]
                        .qcow2()
                        .map_or(0, |q| q.file_len())
                        .min(d.size())
                        / 512
                }
                Some(d) => (d.start, d.size()),
                None => return 0,
            },
            _ => return 0,
        };
        let stored: u64 = chain.layers[from..]
            .iter()
            .map(|l| match &l.kind {
                crate::chain::LayerKind::Qcow2(q) => q.file_len(),
                crate::chain::LayerKind::Raw { size, .. } => *size,
            })
            .sum();
        stored.min(size).div_ceil(512)
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
        match node {
            Node::Root | Node::CurrentDir | Node::CkptDir(_) => {
                a.perm = dir_perm;
                if node == Node::Root && self.writer.is_some() {
                    // mkdir/rmdir take and delete checkpoints.
                    a.perm |= (self.info.image_mode & 0o200) as u16;
                }
                a.nlink = 2;
            }
            Node::CurrentDisk | Node::CkptDisk(_) => {
                a.blocks = self.disk_blocks(st, node);
                if node == Node::CurrentDisk && self.writer.is_some() {
                    a.perm |= (self.info.image_mode & 0o200) as u16;
                }
            }
            Node::CkptChanged(ci) => {
                a.blocks = match self.ckpt_ok(st, ci) {
                    Ok(()) => self.changed_file_bytes(st, ci, a.size).div_ceil(512),
                    Err(_) => 0,
                };
            }
            _ => {}
        }
        Ok(a)
    }

    /// Changed bytes inside changed.img: whole blocks, except a partial last block counts
    /// only up to the end of the disk.
    fn changed_file_bytes(&self, st: &State, ci: usize, size: u64) -> u64 {
        let g = st.engine.granularity(ci);
        let mut bytes = st.engine.changed_bytes(ci).unwrap_or(0);
        if size % g != 0 && st.engine.block_changed(ci, size / g).unwrap_or(false) {
            bytes = bytes.saturating_sub(g - size % g);
        }
        bytes.min(size)
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
        if is_data(node) {
            self.check_fresh(st)?;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        match node {
            Node::CkptChanged(ci) | Node::CkptBitmap(ci) => self.ckpt_ok(st, ci)?,
            n if is_generated(n) => {
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
            direct_io: node == Node::StatsJson || rw,
            keep_cache: node != Node::StatsJson && !rw,
        })
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().remove(&fh);
    }

    pub fn read(&self, ino: u64, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        // Only generated files keep per-open content; disk reads never touch the handle map.
        if let Some(c) = is_generated(node)
            .then(|| self.handles.lock().get(&fh).cloned())
            .flatten()
        {
            let start = (off.min(c.len() as u64)) as usize;
            let end = (start + size as usize).min(c.len());
            self.count(node, end - start);
            return Ok(c[start..end].to_vec());
        }
        let len = self.getattr_size(st, node)?;
        if off >= len {
            return Ok(Vec::new());
        }
        if !matches!(
            node,
            Node::StatsJson | Node::CheckpointsJson | Node::CurrentInfo | Node::CkptInfo(_)
        ) {
            self.check_fresh(st)?;
        }
        let n = (len - off).min(u64::from(size)) as usize;
        let mut buf = vec![0u8; n];
        match node {
            Node::CurrentDisk | Node::CkptDisk(_) => self
                .disk(st, node)
                .ok_or_else(not_found)?
                .read(off, &mut buf)?,
            Node::CkptChanged(ci) => {
                self.ckpt_ok(st, ci)?;
                st.engine.read_changed(ci, off, &mut buf)?
            }
            Node::CkptBitmap(ci) => {
                self.ckpt_ok(st, ci)?;
                st.engine.read_bitmap(ci, off, &mut buf)?
            }
            _ => {
                let c = self.content(st, node)?;
                buf.copy_from_slice(&c[off as usize..off as usize + n]);
            }
        }
        self.count(node, n);
        Ok(buf)
    }

    /// The size of a file node (what getattr reports and reads stop at).
    fn getattr_size(&self, st: &State, node: Node) -> Result<u64> {
        Ok(match node {
            Node::CurrentDisk | Node::CkptDisk(_) => self.disk(st, node).map_or(0, Disk::size),
            Node::CkptChanged(_) => st.engine.model.disk_size(),
            Node::CkptBitmap(ci) => st.engine.bitmap_len(ci),
            _ => self.content(st, node)?.len() as u64,
        })
    }

    /// lseek(SEEK_DATA / SEEK_HOLE); other whence values are the kernel's business.
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> Result<u64> {
        let st = self.state();
        let st = &*st;
        let node = self.node(st, ino)?;
        let size = self.getattr_size(st, node)?;
        let enxio = || Error::new(ErrorKind::PastEnd, "seek past the end or the last data");
        if whence != SEEK_DATA && whence != SEEK_HOLE {
            return Err(Error::invalid("unsupported whence"));
        }
        if off >= size {
            return Err(enxio());
        }
        let want_data = whence == SEEK_DATA;
        match node {
            Node::CkptChanged(ci) => {
                self.ckpt_ok(st, ci)?;
                let g = st.engine.granularity(ci);
                match st.engine.next_block(ci, off / g, want_data)? {
                    Some(b) => Ok((b * g).max(off).min(size)),
                    None if want_data => Err(enxio()),
                    None => Ok(size),
                }
            }
            Node::CurrentDisk | Node::CkptDisk(_) => {
                let disk = self.disk(st, node).ok_or_else(not_found)?;
                let mut at = off;
                while at < size {
                    let (r, n) = disk.resolve(at, size - at)?;
                    if r.known_zero() != want_data {
                        return Ok(at);
                    }
                    at += n.max(1);
                }
                if want_data {
                    Err(enxio())
                } else {
                    Ok(size)
                }
            }
            _ => Ok(if want_data { off } else { size }),
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

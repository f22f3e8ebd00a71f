//! Opening a backing chain: backing names resolved against the directory of the image that
//! names them (as QEMU does), raw or qcow2 backing files, loops detected by (st_dev, st_ino).

use crate::error::{Error, ErrorKind, Result};
use crate::hostfile;
use crate::qcow2::header::BackingName;
use crate::qcow2::image::read_exact_or_zero;
use crate::qcow2::{GuestOffset, HostOffset, Mapping, Qcow2Image, Table};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// QEMU gives up on chains deeper than this too (BDRV_BACKING_DEPTH is not a hard limit there,
/// but a chain of thousands of files is a loop in disguise).
const MAX_DEPTH: usize = 1000;

/// What a layer is stored as.
#[derive(Debug)]
pub enum LayerKind {
    Qcow2(Arc<Qcow2Image>),
    /// A raw file or block device: virtual size is its size (a device's as QEMU takes it)
    /// rounded up to 512 bytes.
    Raw {
        file: File,
        size: u64,
        /// The real length: the tail up to `size` reads as zeros (QEMU maps it so).
        len: u64,
    },
}

/// One file of the chain.
#[derive(Debug)]
pub struct Layer {
    /// The path the layer was opened by (absolute for backing files).
    pub path: PathBuf,
    pub kind: LayerKind,
    /// The backing name as written in this image, and the format it names.
    pub backing_name: Option<BackingName>,
    pub backing_format: Option<String>,
    /// Guest bytes read from this layer (for stats.json).
    pub bytes_read: std::sync::atomic::AtomicU64,
    /// The file's size and mtime when opened, to notice changes underneath.
    pub opened: hostfile::Stamp,
}

impl Layer {
    pub fn format(&self) -> &'static str {
        match self.kind {
            LayerKind::Qcow2(_) => "qcow2",
            LayerKind::Raw { .. } => "raw",
        }
    }

    /// The open file this layer reads.
    pub fn file(&self) -> &File {
        match &self.kind {
            LayerKind::Qcow2(q) => q.file(),
            LayerKind::Raw { file, .. } => file,
        }
    }

    pub fn qcow2(&self) -> Option<&Qcow2Image> {
        match &self.kind {
            LayerKind::Qcow2(q) => Some(q),
            LayerKind::Raw { .. } => None,
        }
    }

    /// Virtual size through `table` (raw layers have only the active view).
    pub fn size(&self, table: Table) -> u64 {
        match &self.kind {
            LayerKind::Qcow2(q) => q.table_size(table),
            LayerKind::Raw { size, .. } => *size,
        }
    }

    /// Allocation granularity (cluster or subcluster size; 512 for raw).
    pub fn alloc_unit(&self) -> u64 {
        match &self.kind {
            LayerKind::Qcow2(q) => q.geo.alloc_unit(),
            LayerKind::Raw { .. } => 512,
        }
    }

    pub fn cluster_size(&self) -> Option<u64> {
        self.qcow2().map(|q| q.geo.cluster_size())
    }

    /// The bytes of this layer's file that a mapped range of `len` guest bytes reads, as
    /// (host offset, length); None where no file bytes are read (zeros).
    pub fn host_span(m: Mapping, len: u64) -> Option<(u64, u64)> {
        match m {
            Mapping::Data(h) => Some((h.0, len)),
            Mapping::Compressed { host_off, len } => Some((host_off.0, len)),
            Mapping::Zero | Mapping::Unallocated => None,
        }
    }

    /// This layer's own mapping of `off` (below its virtual size), for up to `len` bytes.
    pub fn map(&self, table: Table, off: u64, len: u64) -> Result<(Mapping, u64)> {
        match &self.kind {
            LayerKind::Qcow2(q) => q.map(table, GuestOffset(off), len),
            LayerKind::Raw {
                size,
                len: file_len,
                ..
            } => {
                if off >= *file_len {
                    Ok((Mapping::Zero, len.min(size.saturating_sub(off))))
                } else {
                    Ok((Mapping::Data(HostOffset(off)), len.min(file_len - off)))
                }
            }
        }
    }

    pub fn read_mapped(&self, m: Mapping, off: u64, buf: &mut [u8]) -> Result<()> {
        self.bytes_read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        match &self.kind {
            LayerKind::Qcow2(q) => q.read_mapped(m, GuestOffset(off), buf),
            LayerKind::Raw { file, .. } => read_exact_or_zero(file, off, buf)
                .map_err(|e| Error::io(format!("{}: read at {off}", self.path.display()), e)),
        }
    }
}

/// A backing chain, top first: `layers[0]` is the image that was named.
#[derive(Debug)]
pub struct Chain {
    pub layers: Vec<Arc<Layer>>,
}

/// How a file's format was decided.
fn probe_is_qcow2(file: &File) -> Result<bool> {
    let mut magic = [0u8; 4];
    read_exact_or_zero(file, 0, &mut magic).map_err(|e| Error::io("read", e))?;
    Ok(u32::from_be_bytes(magic) == crate::qcow2::header::MAGIC)
}

impl Chain {
    /// Open `top` (which must be qcow2 or raw) and every backing file below it, read-only.
    pub fn open(top: &Path) -> Result<Chain> {
        Self::open_with(top, false)
    }

    /// Open the chain; with `write_top` the top image's file is opened read-write (backing
    /// files never are).
    pub fn open_with(top: &Path, write_top: bool) -> Result<Chain> {
        let mut layers: Vec<Arc<Layer>> = Vec::new();
        let mut seen: Vec<(u64, u64)> = Vec::new();
        let mut next: Option<(PathBuf, Option<String>, BackingName)> = None;
        let mut path = top.to_path_buf();
        let mut format: Option<String> = None;
        loop {
            let file = match hostfile::open(&path, write_top && layers.is_empty()) {
                Ok(f) => f,
                Err(e) => {
                    return Err(match &next {
                        Some((parent, _, name)) if e.kind == ErrorKind::NotFound => Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "{}: backing file '{name}' not found (resolved against the image's \
                                 directory to {})",
                                parent.display(),
                                path.display()
                            ),
                        ),
                        _ => e,
                    })
                }
            };
            let meta = file
                .metadata()
                .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
            let opened = hostfile::stamp(&file)
                .map_err(|e| Error::io(format!("{}: size", path.display()), e))?;
            let id = (meta.dev(), meta.ino());
            if seen.contains(&id) {
                let (parent, _, name) = next.as_ref().expect("a repeat needs a parent");
                return Err(Error::invalid(format!(
                    "{}: backing file '{name}' creates a loop (it is already in the chain as {})",
                    parent.display(),
                    path.display()
                )));
            }
            seen.push(id);
            if layers.len() >= MAX_DEPTH {
                return Err(Error::unsupported(format!(
                    "backing chain deeper than {MAX_DEPTH} files"
                )));
            }
            let is_qcow2 = match format.as_deref() {
                Some("qcow2") => true,
                Some("raw") => false,
                Some(other) => {
                    return Err(Error::unsupported(format!(
                        "{}: backing format '{other}' is not supported (qcow2 and raw are)",
                        path.display()
                    )))
                }
                None => probe_is_qcow2(&file).map_err(|e| e.context(path.display()))?,
            };
            if layers.is_empty() && !is_qcow2 {
                let what = if opened.0 == 0 {
                    "empty file, not a qcow2 image"
                } else {
                    "not a qcow2 image (no QFI\\xfb magic)"
                };
                return Err(Error::invalid(format!("{}: {what}", path.display())));
            }
            let layer = if is_qcow2 {
                let q = Qcow2Image::open(&path, file)?;
                let backing_name = q.header.backing_file.clone();
                let backing_format = q.header.backing_format.clone();
                Layer {
                    path: path.clone(),
                    kind: LayerKind::Qcow2(Arc::new(q)),
                    backing_name,
                    backing_format,
                    bytes_read: Default::default(),
                    opened,
                }
            } else {
                let len = opened.0;
                let size = len.div_ceil(512) * 512;
                Layer {
                    path: path.clone(),
                    kind: LayerKind::Raw { file, size, len },
                    backing_name: None,
                    backing_format: None,
                    bytes_read: Default::default(),
                    opened,
                }
            };
            let backing = layer.backing_name.clone();
            format = layer.backing_format.clone();
            layers.push(Arc::new(layer));
            match backing {
                None => break,
                Some(name) => {
                    let resolved = resolve_backing(&path, name.as_path());
                    next = Some((path.clone(), format.clone(), name));
                    path = resolved;
                }
            }
        }
        Ok(Chain { layers })
    }

    /// Has a layer file changed since it was opened (another program wrote it)? Layers
    /// from `first` down are checked (1 skips the top, for rw and force_share mounts).
    pub fn changed_underneath(&self, first: usize) -> Option<String> {
        for l in self.layers.iter().skip(first) {
            let Ok(now) = hostfile::stamp(l.file()) else {
                continue;
            };
            if now != l.opened {
                return Some(format!(
                    "{} changed after it was mounted (size {} -> {}, mtime changed); remount to see its new content",
                    l.path.display(),
                    l.opened.0,
                    now.0
                ));
            }
        }
        None
    }

    pub fn top(&self) -> &Arc<Layer> {
        &self.layers[0]
    }

    /// The top image, for a writer: an error if it is not qcow2 (raw tops are read-only).
    pub fn top_qcow2(&self) -> Result<Arc<Qcow2Image>> {
        match &self.top().kind {
            LayerKind::Qcow2(q) => Ok(q.clone()),
            LayerKind::Raw { .. } => Err(Error::unsupported("the top image is not qcow2")),
        }
    }
}

/// Resolve a backing name as QEMU does: absolute names as they are, relative ones against the
/// directory of the image that stores them (not the current directory).
pub fn resolve_backing(image: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

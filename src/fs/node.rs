//! What each inode is. The files of a checkpoint directory are one table, `CKPT_FILES`: a
//! new per-checkpoint file is one entry (name, stats kind, class, size/read/seek or content);
//! the tree, the stats counters, the content cache and every request follow from it.

use crate::chain::usage::stored_blocks;
use crate::chain::Disk;
use crate::checkpoint::{render, Checkpoint, Engine};
use crate::error::{Error, ErrorKind, Result};
use std::sync::Arc;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    CheckpointsJson,
    StatsJson,
    CurrentDir,
    CurrentDisk,
    CurrentInfo,
    CkptDir(usize),
    /// File `CKPT_FILES[file]` of checkpoint `ci`.
    Ckpt {
        ci: usize,
        file: usize,
    },
}

/// Where a file's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The image layers' bytes, read at an offset: honest block counts, no per-open copy.
    Data,
    /// Text generated from the layers' bytes, kept per open handle.
    Derived,
    /// Text generated from metadata (JSON), kept per open handle.
    Text,
}

/// How a data file is read.
pub struct DataFns {
    pub size: fn(&Engine, usize) -> u64,
    /// 512-byte blocks holding data, given the size (asked even while the checkpoint cannot
    /// be trusted).
    pub blocks: fn(&Engine, usize, u64) -> u64,
    /// Read at an offset inside the file; writes every byte of the buffer (it is not zeroed
    /// before: the reply buffers are reused).
    pub read: fn(&Engine, usize, u64, &mut [u8]) -> Result<()>,
    /// lseek: the first offset in `[off, size)` that is data (`true`) or a hole; None: none.
    pub seek: fn(&Engine, usize, u64, u64, bool) -> Result<Option<u64>>,
    /// The disk whose bytes the file is, where it is one (read ahead for sequential readers).
    pub disk: fn(&Engine, usize) -> Option<&Disk>,
}

/// Generates a file's whole text for checkpoint `ci`.
pub type ContentFn = fn(&Engine, usize) -> Result<Arc<[u8]>>;

/// The body of a per-checkpoint file.
pub enum Body {
    Data(DataFns),
    /// Generated text (Derived or Text class).
    Content(ContentFn),
}

/// One kind of file in every checkpoint directory.
pub struct CkptFile {
    pub name: &'static str,
    /// Its key in stats.json's "files".
    pub stat: &'static str,
    pub class: Class,
    /// Refused (EIO) while the checkpoint's since-set cannot be trusted.
    pub trusted_only: bool,
    /// Served without the page cache: a disk image read once by a backup (readahead would
    /// read past each data run into the holes around it, and a first read through the page
    /// cache costs twice a direct one).
    pub direct_io: bool,
    /// Listed in this checkpoint's directory?
    pub present: fn(&Checkpoint) -> bool,
    pub body: Body,
}

/// The files of a checkpoint directory, in listing order.
pub const CKPT_FILES: &[CkptFile] = &[
    CkptFile {
        name: "disk.img",
        stat: "disk.img",
        class: Class::Data,
        trusted_only: false,
        direct_io: true,
        present: |c| c.disk.is_some(),
        body: Body::Data(DataFns {
            size: |e, ci| ckpt_disk(e, ci).map_or(0, Disk::size),
            blocks: |e, ci, _| ckpt_disk(e, ci).map_or(0, stored_blocks),
            read: |e, ci, off, buf| ckpt_disk(e, ci)?.read(off, buf),
            seek: |e, ci, off, size, data| seek_disk(ckpt_disk(e, ci)?, off, size, data),
            disk: |e, ci| ckpt_disk(e, ci).ok(),
        }),
    },
    CkptFile {
        name: "changed.img",
        stat: "changed.img",
        class: Class::Data,
        trusted_only: true,
        direct_io: true,
        present: |_| true,
        body: Body::Data(DataFns {
            size: |e, _| e.model.disk_size(),
            blocks: |e, ci, size| changed_file_bytes(e, ci, size).div_ceil(512),
            read: |e, ci, off, buf| e.read_changed(ci, off, buf),
            seek: |e, ci, off, size, data| {
                let g = e.granularity(ci);
                Ok(e.next_block(ci, off / g, data)?
                    .map(|b| b.saturating_mul(g).max(off).min(size)))
            },
            disk: |_, _| None,
        }),
    },
    CkptFile {
        name: "bitmap.bin",
        stat: "bitmap.bin",
        class: Class::Data,
        trusted_only: true,
        direct_io: false,
        present: |_| true,
        body: Body::Data(DataFns {
            size: |e, ci| e.bitmap_len(ci),
            blocks: |_, _, size| size.div_ceil(512),
            read: |e, ci, off, buf| e.read_bitmap(ci, off, buf),
            seek: |_, _, off, size, data| Ok(Some(if data { off } else { size })),
            disk: |_, _| None,
        }),
    },
    CkptFile {
        name: "extents",
        stat: "extents",
        class: Class::Derived,
        trusted_only: true,
        direct_io: false,
        present: |_| true,
        // The engine's text itself, not a copy.
        body: Body::Content(|e, ci| Ok(Arc::from(e.extents(ci)?))),
    },
    CkptFile {
        name: "info.json",
        stat: "json",
        class: Class::Text,
        trusted_only: false,
        direct_io: false,
        present: |_| true,
        body: Body::Content(|e, ci| {
            let text = render::to_text(&render::checkpoint_json(e, ci, true));
            Ok(Arc::from(text.into_bytes()))
        }),
    },
];

/// The stats.json kinds: those of the fixed nodes, then the table's.
pub fn stat_kinds() -> Vec<&'static str> {
    let mut kinds = vec!["dir", "json", "disk.img"];
    for f in CKPT_FILES {
        if !kinds.contains(&f.stat) {
            kinds.push(f.stat);
        }
    }
    kinds
}

/// Slots of generated content that can be cached: checkpoints.json, current/info.json, then
/// one per table entry per checkpoint.
pub fn content_slots(checkpoints: usize) -> usize {
    2 + checkpoints * CKPT_FILES.len()
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Root | Node::CurrentDir | Node::CkptDir(_))
    }

    /// The table entry of a per-checkpoint file.
    pub fn ckpt_file(&self) -> Option<(usize, &'static CkptFile)> {
        match *self {
            Node::Ckpt { ci, file } => CKPT_FILES.get(file).map(|f| (ci, f)),
            _ => None,
        }
    }

    /// The table entry and read functions of a per-checkpoint data file.
    pub fn data_file(&self) -> Option<(usize, &'static CkptFile, &'static DataFns)> {
        let (ci, f) = self.ckpt_file()?;
        match &f.body {
            Body::Data(d) => Some((ci, f, d)),
            Body::Content(_) => None,
        }
    }

    /// The table entry and generator of a per-checkpoint generated file.
    pub fn content_file(&self) -> Option<(usize, &'static CkptFile, ContentFn)> {
        let (ci, f) = self.ckpt_file()?;
        match f.body {
            Body::Content(make) => Some((ci, f, make)),
            Body::Data(_) => None,
        }
    }

    /// The file kind name used in stats.json.
    pub fn stat(&self) -> &'static str {
        match self {
            Node::Root | Node::CurrentDir | Node::CkptDir(_) => "dir",
            Node::CheckpointsJson | Node::StatsJson | Node::CurrentInfo => "json",
            Node::CurrentDisk => "disk.img",
            Node::Ckpt { .. } => self.ckpt_file().map_or("", |(_, f)| f.stat),
        }
    }

    /// None for directories.
    pub fn class(&self) -> Option<Class> {
        match self {
            Node::Root | Node::CurrentDir | Node::CkptDir(_) => None,
            Node::CheckpointsJson | Node::StatsJson | Node::CurrentInfo => Some(Class::Text),
            Node::CurrentDisk => Some(Class::Data),
            Node::Ckpt { .. } => self.ckpt_file().map(|(_, f)| f.class),
        }
    }

    /// A disk image, served without the page cache (see `CkptFile::direct_io`)?
    pub fn is_direct(&self) -> bool {
        match self {
            Node::CurrentDisk => true,
            Node::Ckpt { .. } => self.ckpt_file().is_some_and(|(_, f)| f.direct_io),
            _ => false,
        }
    }

    /// The disk this file's bytes are, for disk images.
    pub fn disk<'e>(&self, e: &'e Engine) -> Option<&'e Disk> {
        match self {
            Node::CurrentDisk => Some(&e.current),
            _ => self.data_file().and_then(|(ci, _, d)| (d.disk)(e, ci)),
        }
    }

    /// Bytes from the image layers (not generated text)?
    pub fn is_data(&self) -> bool {
        self.class() == Some(Class::Data)
    }

    /// Generated text, whose content an open handle keeps?
    pub fn is_generated(&self) -> bool {
        matches!(self.class(), Some(Class::Derived | Class::Text))
    }

    /// The content cache slot of generated text (see `content_slots`); None: never cached.
    pub fn content_slot(&self) -> Option<usize> {
        match *self {
            Node::CheckpointsJson => Some(0),
            Node::CurrentInfo => Some(1),
            Node::Ckpt { ci, file } => Some(2 + ci * CKPT_FILES.len() + file),
            _ => None,
        }
    }
}

fn not_found() -> Error {
    Error::new(ErrorKind::NotFound, "no such file or directory")
}

fn ckpt_disk(e: &Engine, ci: usize) -> Result<&Disk> {
    e.model
        .checkpoints
        .get(ci)
        .and_then(|c| c.disk.as_ref())
        .ok_or_else(not_found)
}

/// lseek through a disk's mapping: the first data (or hole) at or after `off`.
pub fn seek_disk(disk: &Disk, off: u64, size: u64, data: bool) -> Result<Option<u64>> {
    let mut at = off;
    while at < size {
        let (r, n) = disk.resolve(at, size - at)?;
        if r.known_zero() != data {
            return Ok(Some(at));
        }
        at += n.max(1);
    }
    Ok(None)
}

/// Changed bytes inside changed.img: whole blocks, except a partial last block counts only
/// up to the end of the disk; none while the checkpoint cannot be trusted.
fn changed_file_bytes(e: &Engine, ci: usize, size: u64) -> u64 {
    if e.model
        .checkpoints
        .get(ci)
        .is_none_or(|c| c.invalid.is_some())
    {
        return 0;
    }
    let g = e.granularity(ci);
    let mut bytes = e.changed_bytes(ci).unwrap_or(0);
    if size % g != 0 && e.block_changed(ci, size / g).unwrap_or(false) {
        bytes = bytes.saturating_sub(g - size % g);
    }
    bytes.min(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_derives_kinds_and_slots() {
        // Each kind once: the fixed nodes' first, then every table entry's.
        let kinds = stat_kinds();
        assert_eq!(kinds[..3], ["dir", "json", "disk.img"]);
        for f in CKPT_FILES {
            assert_eq!(
                kinds.iter().filter(|k| **k == f.stat).count(),
                1,
                "{}",
                f.name
            );
        }
        // Every file of every checkpoint has its own content slot inside the range.
        let n = 3;
        let mut slots: Vec<usize> = (0..n)
            .flat_map(|ci| (0..CKPT_FILES.len()).map(move |file| Node::Ckpt { ci, file }))
            .chain([Node::CheckpointsJson, Node::CurrentInfo])
            .filter_map(|node| node.content_slot())
            .collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), content_slots(n));
        assert!(slots.iter().all(|&s| s < content_slots(n)));
        // A node's class and kind are its entry's.
        for (file, f) in CKPT_FILES.iter().enumerate() {
            let node = Node::Ckpt { ci: 1, file };
            assert_eq!(node.stat(), f.stat);
            assert_eq!(node.is_data(), f.class == Class::Data);
            assert_eq!(node.is_generated(), f.class != Class::Data);
            // Data files are read at offsets, the others generated whole.
            assert_eq!(f.class == Class::Data, matches!(f.body, Body::Data(_)));
            assert_eq!(node.data_file().is_some(), f.class == Class::Data);
            assert_eq!(node.content_file().is_some(), f.class != Class::Data);
        }
    }
}

//! The fixed inode table of the mounted tree, built once at mount from the checkpoint model.

use crate::checkpoint::Model;

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
    CkptDisk(usize),
    CkptChanged(usize),
    CkptBitmap(usize),
    CkptExtents(usize),
    CkptInfo(usize),
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self, Node::Root | Node::CurrentDir | Node::CkptDir(_))
    }

    /// The file kind name used in stats.json.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Node::Root | Node::CurrentDir | Node::CkptDir(_) => "dir",
            Node::CheckpointsJson | Node::StatsJson | Node::CurrentInfo | Node::CkptInfo(_) => {
                "json"
            }
            Node::CurrentDisk | Node::CkptDisk(_) => "disk.img",
            Node::CkptChanged(_) => "changed.img",
            Node::CkptBitmap(_) => "bitmap.bin",
            Node::CkptExtents(_) => "extents",
        }
    }
}

pub const ROOT: u64 = 1;

#[derive(Debug)]
struct Entry {
    node: Node,
    parent: u64,
    name: String,
    children: Vec<u64>,
}

/// Inode numbers are indexes + 1 into `entries`.
#[derive(Debug)]
pub struct Tree {
    entries: Vec<Entry>,
}

impl Tree {
    pub fn build(model: &Model) -> Tree {
        let mut t = Tree {
            entries: Vec::new(),
        };
        let root = t.add(Node::Root, 0, "");
        t.add(Node::CheckpointsJson, root, "checkpoints.json");
        t.add(Node::StatsJson, root, "stats.json");
        let cur = t.add(Node::CurrentDir, root, "current");
        t.add(Node::CurrentDisk, cur, "disk.img");
        t.add(Node::CurrentInfo, cur, "info.json");
        for (ci, c) in model.checkpoints.iter().enumerate() {
            let d = t.add(Node::CkptDir(ci), root, &c.dir_name);
            if c.disk.is_some() {
                t.add(Node::CkptDisk(ci), d, "disk.img");
            }
            t.add(Node::CkptChanged(ci), d, "changed.img");
            t.add(Node::CkptBitmap(ci), d, "bitmap.bin");
            t.add(Node::CkptExtents(ci), d, "extents");
            t.add(Node::CkptInfo(ci), d, "info.json");
        }
        t
    }

    fn add(&mut self, node: Node, parent: u64, name: &str) -> u64 {
        self.entries.push(Entry {
            node,
            parent,
            name: name.to_string(),
            children: Vec::new(),
        });
        let ino = self.entries.len() as u64;
        if parent != 0 {
            self.entries[(parent - 1) as usize].children.push(ino);
        }
        ino
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.entries
            .get(usize::try_from(ino.checked_sub(1)?).ok()?)
            .map(|e| e.node)
    }

    pub fn parent(&self, ino: u64) -> u64 {
        self.entries
            .get((ino.saturating_sub(1)) as usize)
            .map_or(ROOT, |e| if e.parent == 0 { ROOT } else { e.parent })
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let e = self
            .entries
            .get(usize::try_from(parent.checked_sub(1)?).ok()?)?;
        e.children
            .iter()
            .copied()
            .find(|&c| self.entries[(c - 1) as usize].name == name)
    }

    /// (inode, name) of each child of a directory.
    pub fn children(&self, ino: u64) -> Vec<(u64, &str)> {
        match self.entries.get((ino.saturating_sub(1)) as usize) {
            Some(e) => e
                .children
                .iter()
                .map(|&c| (c, self.entries[(c - 1) as usize].name.as_str()))
                .collect(),
            None => Vec::new(),
        }
    }
}

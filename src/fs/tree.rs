//! The inode table of the mounted tree, built from the checkpoint model. Rebuilt when a
//! checkpoint is added or deleted (`-o rw`), keeping the inode of every path that survives.

use super::node::{Node, CKPT_FILES};
use crate::checkpoint::Model;
use std::collections::HashMap;

pub const ROOT: u64 = 1;

#[derive(Debug, Clone)]
struct Entry {
    node: Node,
    parent: u64,
    name: String,
    children: Vec<u64>,
}

#[derive(Debug)]
pub struct Tree {
    entries: HashMap<u64, Entry>,
    /// Path ("dir/file") -> inode, to keep inodes across rebuilds.
    paths: HashMap<String, u64>,
    next: u64,
}

impl Tree {
    /// Build the tree for `model`, reusing the inodes of `prev` for paths that still exist.
    pub fn build(model: &Model, prev: Option<&Tree>) -> Tree {
        let mut t = Tree {
            entries: HashMap::new(),
            paths: HashMap::new(),
            next: prev.map_or(ROOT, |p| p.next),
        };
        let root = t.add(prev, Node::Root, 0, "", "");
        t.add(
            prev,
            Node::CheckpointsJson,
            root,
            "checkpoints.json",
            "checkpoints.json",
        );
        t.add(prev, Node::StatsJson, root, "stats.json", "stats.json");
        let cur = t.add(prev, Node::CurrentDir, root, "current", "current");
        t.add(prev, Node::CurrentDisk, cur, "disk.img", "current/disk.img");
        t.add(
            prev,
            Node::CurrentInfo,
            cur,
            "info.json",
            "current/info.json",
        );
        for (ci, c) in model.checkpoints.iter().enumerate() {
            let dn = &c.dir_name;
            let d = t.add(prev, Node::CkptDir(ci), root, dn, dn);
            for (file, f) in CKPT_FILES.iter().enumerate() {
                if (f.present)(c) {
                    let path = format!("{dn}/{}", f.name);
                    t.add(prev, Node::Ckpt { ci, file }, d, f.name, &path);
                }
            }
        }
        t
    }

    fn add(&mut self, prev: Option<&Tree>, node: Node, parent: u64, name: &str, path: &str) -> u64 {
        let ino = match prev.and_then(|p| p.paths.get(path)) {
            Some(&i) => i,
            None => {
                let i = self.next;
                self.next += 1;
                i
            }
        };
        self.entries.insert(
            ino,
            Entry {
                node,
                parent,
                name: name.to_string(),
                children: Vec::new(),
            },
        );
        self.paths.insert(path.to_string(), ino);
        if parent != 0 {
            if let Some(p) = self.entries.get_mut(&parent) {
                p.children.push(ino);
            }
        }
        ino
    }

    /// Every inode of the tree.
    pub fn inodes(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }

    pub fn node(&self, ino: u64) -> Option<Node> {
        self.entries.get(&ino).map(|e| e.node)
    }

    pub fn parent(&self, ino: u64) -> u64 {
        self.entries
            .get(&ino)
            .map_or(ROOT, |e| if e.parent == 0 { ROOT } else { e.parent })
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<u64> {
        let e = self.entries.get(&parent)?;
        e.children
            .iter()
            .copied()
            .find(|c| self.entries.get(c).is_some_and(|x| x.name == name))
    }

    /// (inode, name) of each child of a directory.
    pub fn children(&self, ino: u64) -> Vec<(u64, &str)> {
        match self.entries.get(&ino) {
            Some(e) => e
                .children
                .iter()
                .filter_map(|c| self.entries.get(c).map(|x| (*c, x.name.as_str())))
                .collect(),
            None => Vec::new(),
        }
    }
}

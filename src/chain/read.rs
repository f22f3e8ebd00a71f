//! Reading a disk through the layers of a chain: the first layer that maps a range answers,
//! zero clusters stop the descent, and a layer never shows its backing past its own size.

use super::open::Chain;
use crate::error::Result;
use crate::qcow2::{Mapping, Table};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A disk as seen from one layer downward: the current disk (start 0, active table), a layer
/// checkpoint (start = that layer), or an internal snapshot (table = that snapshot).
#[derive(Debug, Clone)]
pub struct Disk {
    pub chain: Arc<Chain>,
    pub start: usize,
    pub table: Table,
    /// Lookups (`resolve` calls) made through this disk and its clones, for stats.json.
    lookups: Arc<AtomicU64>,
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
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = off + pos as u64;
            let want = (buf.len() - pos) as u64;
            let (r, n) = self.resolve(at, want)?;
            let n = n.clamp(1, want) as usize;
            let dst = &mut buf[pos..pos + n];
            match r.depth {
                Some(d) => self.chain.layers[d].read_mapped(r.mapping, at, dst)?,
                None => dst.fill(0),
            }
            pos += n;
        }
        Ok(())
    }
}

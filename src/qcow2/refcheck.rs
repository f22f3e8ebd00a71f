//! Before writing, the part of `qemu-img check` that keeps a writer from damaging data: every
//! host cluster an active L2 entry references must lie inside the file, outside the image's
//! metadata, and be counted at least as often as it is referenced. A cluster referenced but
//! counted free would be handed out again, data placed on metadata would be overwritten by it
//! (QEMU counts such a cluster twice and reports its refcount too low), and freeing a dangling
//! reference would take the cluster from its real owner.
//!
//! Memory is bounded whatever size the file claims: references are counted (0 to 3, more is
//! counted as 3) in chunks of host clusters, only for chunks that are referenced, at most
//! `BUDGET` bytes of them at a time. When more are referenced, the pass keeps the lowest chunks
//! and the L2 tables are walked again for the clusters above them, at most `MAX_PASSES` times;
//! past that the image is refused for writing, never written unchecked.

use super::image::Qcow2Image;
use super::refcount::Refcounts;
use super::types::HostCluster;
use super::Table;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Host clusters per chunk of counters (2 bits each).
const CHUNK: u64 = 1024;
const WORDS: usize = (CHUNK / 32) as usize;
/// Memory for counters in one pass (with the map's own cost per chunk).
const BUDGET: usize = 32 << 20;
const CHUNK_COST: usize = std::mem::size_of::<[u64; WORDS]>() + 64;
/// Walks of the L2 tables before giving up.
const MAX_PASSES: u32 = 16;

/// Reference counts of the host clusters at or above `from`, for the lowest `cap` chunks that
/// are referenced. A chunk is kept from its first reference on, or never: once the map is
/// full, a new chunk below the highest one evicts it, a chunk above it is not counted, so the
/// highest kept chunk only falls and every kept chunk has seen all its references.
struct Counts {
    from: u64,
    cap: usize,
    chunks: BTreeMap<u64, Box<[u64; WORDS]>>,
    /// Some referenced chunk was evicted or not counted: another pass is needed.
    more: bool,
}

impl Counts {
    fn new(from: u64, cap: usize) -> Counts {
        Counts {
            from,
            cap: cap.max(1),
            chunks: BTreeMap::new(),
            more: false,
        }
    }

    /// One more reference to host cluster `c`.
    fn add(&mut self, c: u64) {
        if c < self.from {
            return;
        }
        let k = c / CHUNK;
        if !self.chunks.contains_key(&k) {
            if self.chunks.len() == self.cap {
                self.more = true;
                match self.chunks.last_key_value() {
                    Some((&last, _)) if last > k => {
                        self.chunks.pop_last();
                    }
                    _ => return,
                }
            }
            self.chunks.insert(k, Box::new([0; WORDS]));
        }
        let words = self.chunks.get_mut(&k).expect("present");
        let i = (c % CHUNK) as usize;
        let (w, shift) = (i / 32, (i % 32) * 2);
        let n = (words[w] >> shift) & 3;
        if n < 3 {
            words[w] += 1 << shift;
        }
    }

    /// Every counted cluster with its count (1 to 3), in order.
    fn each(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.iter().flat_map(|(&k, words)| {
            (0..CHUNK).filter_map(move |i| {
                let n = (words[(i / 32) as usize] >> ((i % 32) * 2)) & 3;
                (n > 0).then_some((k * CHUNK + i, n))
            })
        })
    }

    /// Where the next pass starts, if one is needed.
    fn next_from(&self) -> Option<u64> {
        if !self.more {
            return None;
        }
        self.chunks.last_key_value().map(|(&k, _)| (k + 1) * CHUNK)
    }
}

/// Refuse `q` for writing if an L2 entry references a cluster past the end of the file or
/// inside the image's metadata (as `rc` protects it), or a cluster whose refcount is lower than
/// the number of references to it.
pub fn check_references(q: &Qcow2Image, rc: &mut Refcounts) -> Result<()> {
    let mut from = 0;
    for _ in 0..MAX_PASSES {
        let mut counts = Counts::new(from, BUDGET / CHUNK_COST);
        walk(q, rc, &mut counts)?;
        verify(q, rc, &counts)?;
        match counts.next_from() {
            Some(f) => from = f,
            None => return Ok(()),
        }
    }
    Err(Error::unsupported(format!(
        "the referenced host clusters are too scattered to check within {} MiB \
         ({MAX_PASSES} passes over the L2 tables)",
        BUDGET >> 20
    )))
}

/// Count every active L2 entry's host clusters (the first pass also checks where they lie).
fn walk(q: &Qcow2Image, rc: &Refcounts, counts: &mut Counts) -> Result<()> {
    let cb = q.geo.cluster_bits;
    let cs = q.geo.cluster_size();
    let clusters = q.file_len().div_ceil(cs);
    let first = counts.from == 0;
    for i in 0..u64::from(q.header.l1_size) {
        let Some(l2) = q.l2_offset(Table::Active, i)? else {
            continue;
        };
        let table = q.l2_table(l2)?;
        for (k, e) in table.iter().enumerate() {
            let (host, len) = if e.is_compressed() {
                q.geo.compressed_span(e)
            } else {
                (e.offset(), cs)
            };
            // Offset 0 is unallocated, except in a compressed entry (which points into the header).
            if len == 0 || host.0 == 0 && !e.is_compressed() {
                continue;
            }
            let (c0, c1) = host.clusters(len, cb);
            if first {
                let gc = i * q.geo.l2_entries() + k as u64;
                if c1.0 > clusters {
                    return Err(Error::corrupt(format!(
                        "guest cluster {gc} references {host}, past the end of the file"
                    )));
                }
                if let Some(what) = rc.metadata_at(host, len) {
                    return Err(Error::corrupt(format!(
                        "guest cluster {gc} keeps its data at {host}, inside the {what} \
                         (qemu-img check: refcount too low)"
                    )));
                }
            }
            for c in c0.0..c1.0 {
                counts.add(c);
            }
        }
    }
    Ok(())
}

/// Every counted cluster's refcount covers its references.
fn verify(q: &Qcow2Image, rc: &mut Refcounts, counts: &Counts) -> Result<()> {
    let file = q.file();
    for (c, need) in counts.each() {
        let c = HostCluster(c);
        let refs = rc.get(file, c)?;
        if refs < need {
            return Err(Error::corrupt(format!(
                "host cluster {} is referenced {}but its refcount is {refs} \
                 (qemu-img check -r all)",
                c.offset(q.geo.cluster_bits),
                if need > 1 { "more than once " } else { "" }
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Passes with a tiny cap count exactly what one unbounded map would, chunk by chunk.
    #[test]
    fn passes_cover_every_reference_once() {
        let mut refs = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Scattered over 2^40 clusters, with runs and repeats.
            let c = if x % 3 == 0 { x % 50_000 } else { x >> 24 };
            refs.push(c);
            if x % 5 == 0 {
                refs.push(c);
            }
        }
        let mut want: HashMap<u64, u64> = HashMap::new();
        for &c in &refs {
            let n = want.entry(c).or_insert(0);
            *n = (*n + 1).min(3);
        }
        let mut got: HashMap<u64, u64> = HashMap::new();
        let (mut from, mut passes) = (0, 0);
        loop {
            let mut counts = Counts::new(from, 7);
            for &c in &refs {
                counts.add(c);
            }
            assert!(counts.chunks.len() <= 7);
            for (c, n) in counts.each() {
                assert!(got.insert(c, n).is_none(), "cluster {c} counted twice");
            }
            passes += 1;
            match counts.next_from() {
                Some(f) => from = f,
                None => break,
            }
        }
        assert_eq!(got, want);
        assert!(passes > 1, "the cap forced more than one pass");
    }

    #[test]
    fn counts_saturate_at_three() {
        let mut counts = Counts::new(0, 1);
        for _ in 0..5 {
            counts.add(31);
        }
        counts.add(32);
        assert_eq!(counts.each().collect::<Vec<_>>(), vec![(31, 3), (32, 1)]);
        assert_eq!(counts.next_from(), None);
    }
}

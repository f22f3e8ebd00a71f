//! Clusters counted ahead of the writes that use them, so that a write takes new clusters
//! without a flush of its own. A refill sets the refcounts of its clusters (one write per run
//! and refcount block) and flushes once; writes then take clusters from the front, in order, so
//! the data of one request lands in one host run where the free space allows, followed by any
//! new L2 table it needs. Nothing ever points at a reserved cluster:
//! after a crash the reserve is leaked clusters at most, and a clean close or a failed update
//! gives it back (refcount 0).
//!
//! Refills take the first free clusters (contiguous where the free space is), doubling from
//! 1 MiB to 32 MiB, which bounds the leak a crash can leave, and reach ahead of the need only
//! as far as the current refcount block counts. Where that much does not fit (a block device
//! near its end) a refill takes exactly what the write needs; and an allocation for metadata
//! that finds no room gives the reserve back first.

use super::write::Writer;
use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::{HostCluster, HostOffset};
use std::collections::VecDeque;

/// The first refill, in bytes; each later one doubles up to `MAX_BYTES`.
const FIRST_BYTES: u64 = 1 << 20;
const MAX_BYTES: u64 = 32 << 20;

/// Host clusters with a durable refcount of 1 that nothing points at.
#[derive(Default)]
pub(super) struct Reserve {
    /// Runs (first cluster, clusters), taken from the front.
    runs: VecDeque<(HostCluster, u64)>,
    /// Bytes the next refill asks for.
    next_bytes: u64,
}

impl Reserve {
    fn clusters(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| n).sum()
    }

    /// Take up to `n` clusters from the front as runs (first cluster, clusters).
    fn take(&mut self, mut n: u64) -> Vec<(HostCluster, u64)> {
        let mut out: Vec<(HostCluster, u64)> = Vec::new();
        while n > 0 {
            let Some((c, k)) = self.runs.pop_front() else {
                break;
            };
            let used = k.min(n);
            if used < k {
                self.runs.push_front((c + used, k - used));
            }
            match out.last_mut() {
                Some((c0, k0)) if *c0 + *k0 == c => *k0 += used,
                _ => out.push((c, used)),
            }
            n -= used;
        }
        out
    }
}

impl Writer {
    /// `n` new host clusters with a durable refcount, as contiguous runs (offset, clusters) in
    /// order. They stay in `fresh` (given back if the update fails) until an entry points at
    /// them.
    pub(super) fn take_clusters(&mut self, n: u64) -> Result<Vec<(HostOffset, u64)>> {
        let have = self.reserve.clusters();
        if have < n {
            self.refill(n - have)?;
        }
        let q = &self.q;
        let cb = q.geo.cluster_bits;
        let runs: Vec<(HostOffset, u64)> = self
            .reserve
            .take(n)
            .into_iter()
            .map(|(c, k)| (c.offset(cb), k))
            .collect();
        for &(off, k) in &runs {
            q.note_file_end(off + (k << cb));
            self.fresh.extend((0..k).map(|i| off + (i << cb)));
        }
        Ok(runs)
    }

    /// Reserve at least `need` more clusters and make their refcounts durable.
    fn refill(&mut self, need: u64) -> Result<()> {
        let q = self.q.clone();
        let file = q.file();
        let bytes = self.reserve.next_bytes.clamp(FIRST_BYTES, MAX_BYTES);
        // Ahead of the need, no new refcount block (it would stay in the image at close).
        let want = need.max((bytes >> q.geo.cluster_bits).min(self.rc.left_in_block()));
        let runs = match self.rc.alloc_many(file, want) {
            Ok(runs) => {
                self.reserve.next_bytes = (bytes * 2).min(MAX_BYTES);
                runs
            }
            Err(e) if e.kind == ErrorKind::NoSpace && want > need => {
                self.rc.alloc_many(file, need)?
            }
            Err(e) => return Err(e),
        };
        self.reserve.runs.extend(runs);
        q.flush()
    }

    /// One new host cluster with a durable refcount, as `take_clusters`.
    pub(super) fn take_cluster(&mut self) -> Result<HostOffset> {
        self.take_clusters(1)?
            .first()
            .map(|&(off, _)| off)
            .ok_or_else(|| Error::no_space("no cluster left in the reserve"))
    }

    /// Whether any cluster is reserved.
    pub(super) fn has_reserve(&self) -> bool {
        !self.reserve.runs.is_empty()
    }

    /// Give every reserved cluster back (refcount 0). Nothing points at them, so no flush has
    /// to come first.
    pub(super) fn release_reserve(&mut self) -> Result<()> {
        let file = self.q.file();
        while let Some((c, k)) = self.reserve.runs.pop_front() {
            self.rc.release_run(file, c, k)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_from_the_front_and_merges_adjacent_runs() {
        let mut r = Reserve::default();
        r.runs.extend([
            (HostCluster(10), 3),
            (HostCluster(13), 2),
            (HostCluster(40), 4),
        ]);
        assert_eq!(r.take(2), [(HostCluster(10), 2)]);
        assert_eq!(r.take(4), [(HostCluster(12), 3), (HostCluster(40), 1)]);
        assert_eq!(r.clusters(), 3);
        assert_eq!(r.take(9), [(HostCluster(41), 3)], "no more than there is");
        assert!(r.runs.is_empty());
    }
}

//! stats.json: requests and bytes per file kind (counted by the filesystem), the bytes read
//! and clusters decompressed per layer, and the since-set cache's counters.

use super::engine::Engine;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counter {
    kind: &'static str,
    requests: AtomicU64,
    bytes: AtomicU64,
    lseeks: AtomicU64,
}

/// Request, byte and lseek counters per file kind name.
pub struct FileCounters {
    kinds: Vec<Counter>,
}

impl FileCounters {
    pub fn new(kinds: &[&'static str]) -> FileCounters {
        FileCounters {
            kinds: kinds
                .iter()
                .map(|&kind| Counter {
                    kind,
                    requests: AtomicU64::new(0),
                    bytes: AtomicU64::new(0),
                    lseeks: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    /// One request of `kind` that moved `bytes`; kinds not listed are not counted.
    pub fn count(&self, kind: &str, bytes: usize) {
        if let Some(c) = self.kinds.iter().find(|c| c.kind == kind) {
            c.requests.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// One lseek (SEEK_DATA/SEEK_HOLE) on a file of `kind`.
    pub fn seek(&self, kind: &str) {
        if let Some(c) = self.kinds.iter().find(|c| c.kind == kind) {
            c.lseeks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The whole stats.json value.
pub fn stats_json(e: &Engine, files: &FileCounters) -> Value {
    let mut per_kind = Map::new();
    for c in &files.kinds {
        per_kind.insert(
            c.kind.to_string(),
            json!({"requests": c.requests.load(Ordering::Relaxed),
                   "bytes": c.bytes.load(Ordering::Relaxed),
                   "lseeks": c.lseeks.load(Ordering::Relaxed)}),
        );
    }
    let chain = &e.model.chain;
    let decompressed = |l: &crate::chain::Layer| {
        l.qcow2()
            .map_or(0, |q| q.decompressed.load(Ordering::Relaxed))
    };
    let layers: Vec<Value> = chain
        .layers
        .iter()
        .map(|l| {
            json!({"file": l.path.display().to_string(),
                   "bytes_read": l.bytes_read.load(Ordering::Relaxed),
                   "clusters_decompressed": decompressed(l)})
        })
        .collect();
    let s = &e.cache.stats;
    json!({
        "files": per_kind,
        "layers": layers,
        "clusters_decompressed": chain.layers.iter().map(|l| decompressed(l)).sum::<u64>(),
        "cache": {"hits": s.hits.load(Ordering::Relaxed), "misses": s.misses.load(Ordering::Relaxed),
                  "evictions": s.evictions.load(Ordering::Relaxed)},
        "merge_time_ms": s.merge_ns.load(Ordering::Relaxed) as f64 / 1e6,
        "chain_lookups": e.current.lookups(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_listed_kinds() {
        let f = FileCounters::new(&["dir", "json"]);
        f.count("json", 10);
        f.count("json", 5);
        f.count("other", 7);
        f.seek("json");
        let c = &f.kinds[1];
        assert_eq!(c.requests.load(Ordering::Relaxed), 2);
        assert_eq!(c.bytes.load(Ordering::Relaxed), 15);
        assert_eq!(c.lseeks.load(Ordering::Relaxed), 1);
        assert_eq!(f.kinds[0].requests.load(Ordering::Relaxed), 0);
    }
}

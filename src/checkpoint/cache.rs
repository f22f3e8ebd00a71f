//! Lazily computed since-set chunks, cached in an LRU bounded by bytes. Each chunk is computed
//! once: concurrent readers of the same chunk wait on one `OnceLock` instead of merging twice.

use super::since::{Bits, CHUNK_WORDS};
use crate::error::{Error, ErrorKind, Result};
use lru::LruCache;
use parking_lot::Mutex;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

type Slot = Arc<OnceLock<std::result::Result<Arc<Bits>, (ErrorKind, String)>>>;

/// Cache counters, for stats.json.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    pub merge_ns: AtomicU64,
}

pub struct ChunkCache {
    map: Mutex<LruCache<(usize, u64), Slot>>,
    pub stats: CacheStats,
}

impl ChunkCache {
    /// A cache holding at most `bytes` of chunk bits (at least 16 chunks).
    pub fn new(bytes: u64) -> ChunkCache {
        let per = (CHUNK_WORDS * 8) as u64;
        let n = usize::try_from(bytes / per).unwrap_or(usize::MAX).max(16);
        ChunkCache {
            map: Mutex::new(LruCache::new(NonZeroUsize::new(n).expect("at least 16"))),
            stats: CacheStats::default(),
        }
    }

    /// The chunk for (checkpoint `ci`, chunk `k`), computing it with `f` on a miss.
    pub fn get(&self, ci: usize, k: u64, f: impl FnOnce() -> Result<Bits>) -> Result<Arc<Bits>> {
        let slot = {
            let mut map = self.map.lock();
            match map.get(&(ci, k)) {
                Some(s) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    s.clone()
                }
                None => {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    let s: Slot = Arc::default();
                    if map
                        .push((ci, k), s.clone())
                        .is_some_and(|(key, _)| key != (ci, k))
                    {
                        self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    }
                    s
                }
            }
        };
        slot.get_or_init(|| {
            let t = std::time::Instant::now();
            let r = f().map(Arc::new).map_err(|e| (e.kind, e.to_string()));
            self.stats
                .merge_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            r
        })
        .clone()
        .map_err(|(kind, msg)| Error::new(kind, msg))
    }

    /// Drop one chunk (the disk changed under it).
    pub fn remove(&self, ci: usize, k: u64) {
        self.map.lock().pop(&(ci, k));
    }
}

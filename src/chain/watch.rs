//! Watching the layers for changes made by other programs while mounted: once one changed,
//! data mixed from before and after must not be served, so every later check fails.

use super::open::Chain;
use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

/// How often the layers are checked at most (one fstat each).
const PERIOD_MS: u64 = 100;

pub struct Watcher {
    /// First chain layer that must not change (1 when the top is written by this mount or by
    /// a live QEMU).
    from: usize,
    /// Set once a layer was found changed: why.
    stale: OnceLock<String>,
    last_check_ms: AtomicU64,
}

impl Watcher {
    pub fn new(from: usize) -> Watcher {
        Watcher {
            from,
            stale: OnceLock::new(),
            last_check_ms: AtomicU64::new(0),
        }
    }

    /// Fail (ErrorKind::Stale) once a layer of `chain` changed; `first_seen` runs once, when
    /// the change is noticed (to drop what was cached before it).
    pub fn check(&self, chain: &Chain, first_seen: impl FnOnce()) -> Result<()> {
        if let Some(m) = self.stale.get() {
            return Err(Error::new(ErrorKind::Stale, m.clone()));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_check_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < PERIOD_MS
            || self
                .last_check_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        if let Some(m) = chain.changed_underneath(self.from) {
            log::error!("{m}");
            if self.stale.set(m.clone()).is_ok() {
                first_seen();
            }
            return Err(Error::new(ErrorKind::Stale, m));
        }
        Ok(())
    }
}

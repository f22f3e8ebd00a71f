//! The next request of a sequential reader of a disk image, computed ahead: once a read
//! continues where the previous read of the same file ended, the thread that answered it goes
//! on (after its reply) to read the same length again right behind it. The reader's next
//! request then finds the bytes ready, or being read, instead of waiting for the chain
//! lookups, layer reads, zero fills and decompression of its range. A sequential reader (dd,
//! cp of a whole disk) spends the time of its own round trip with the next bytes being made.
//!
//! Only requests up to `MAX_LEN` are read ahead: cp reads 128 KiB at a time and writes each
//! piece out before asking for the next, and while it writes, the other core makes the next
//! piece (cp --sparse=always of an 8 GiB disk.img, 2 cores: 10-15 % faster). A reader of 1 MiB
//! requests that does nothing in between (dd to /dev/null) is bound by the kernel copying each
//! reply into its buffer; reading ahead then only competes with that copy for the second core
//! (12 % slower), so those are left alone.
//!
//! At most `SLOTS` ranges are held (one per concurrent sequential reader, each at most one
//! request long); the least recently made is dropped for a new one. A range read ahead that
//! failed is forgotten: the request itself then reads again and reports the error.
//!
//! The bytes are not copied again: the request that takes a range replies from its buffer,
//! which becomes that thread's reply buffer, and hands the thread's old one back here for the
//! next read-ahead (`recycle`, `buffer`; at most `SLOTS` kept).

use parking_lot::{Condvar, Mutex};

/// Ranges read ahead at most, and readers whose position is remembered.
const SLOTS: usize = 4;

/// Longer requests are not read ahead.
pub const MAX_LEN: u32 = 256 << 10;

enum State {
    /// A thread is reading it.
    Reading,
    Ready(Vec<u8>),
}

struct Slot {
    ino: u64,
    off: u64,
    len: u32,
    state: State,
}

#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    /// Where the last reads of recently read files ended (ino, end), newest last.
    ends: Vec<(u64, u64)>,
    /// Buffers handed back, for the next ranges read ahead.
    spare: Vec<Vec<u8>>,
}

#[derive(Default)]
pub struct Prefetch {
    inner: Mutex<Slots>,
    done: Condvar,
}

impl Prefetch {
    /// The bytes of `[off, off+len)` of `ino` if they were read ahead: waits for a read in
    /// progress. The bytes stop early only where the file ends.
    pub fn take(&self, ino: u64, off: u64, len: u32) -> Option<Vec<u8>> {
        let mut g = self.inner.lock();
        loop {
            let i = g
                .slots
                .iter()
                .position(|s| s.ino == ino && s.off == off && len <= s.len)?;
            if let State::Ready(_) = g.slots[i].state {
                let State::Ready(mut data) = g.slots.remove(i).state else {
                    unreachable!("checked Ready above");
                };
                data.truncate(len as usize);
                return Some(data);
            }
            self.done.wait(&mut g);
        }
    }

    /// A buffer to read ahead into: one handed back, or a new one.
    pub fn buffer(&self) -> Vec<u8> {
        self.inner.lock().spare.pop().unwrap_or_default()
    }

    /// A reply buffer no longer needed (one `take` replaced), for `buffer`.
    pub fn recycle(&self, buf: Vec<u8>) {
        let mut g = self.inner.lock();
        if g.spare.len() < SLOTS && buf.capacity() > 0 {
            g.spare.push(buf);
        }
    }

    /// `[off, off+len)` of `ino` was just answered: the range to read ahead, if this read
    /// continued the previous one of the file and nothing reads that range already. The
    /// caller reads it and hands it to `finish`.
    pub fn next(&self, ino: u64, off: u64, len: u32) -> Option<(u64, u32)> {
        let end = off.checked_add(u64::from(len))?;
        let mut g = self.inner.lock();
        let seq = match g.ends.iter().position(|&(i, _)| i == ino) {
            Some(k) => {
                let (_, last) = g.ends.remove(k);
                last == off
            }
            None => false,
        };
        if g.ends.len() == SLOTS {
            g.ends.remove(0);
        }
        g.ends.push((ino, end));
        if !seq || len == 0 || len > MAX_LEN || g.slots.iter().any(|s| s.ino == ino && s.off == end)
        {
            return None;
        }
        if g.slots.len() == SLOTS {
            // The oldest range not being read (one being read is waited for by nobody yet,
            // but its reader will hand it in).
            let k = g
                .slots
                .iter()
                .position(|s| matches!(s.state, State::Ready(_)))?;
            g.slots.remove(k);
        }
        g.slots.push(Slot {
            ino,
            off: end,
            len,
            state: State::Reading,
        });
        Some((end, len))
    }

    /// The outcome of reading ahead the range `next` returned: kept for `take`, or, on
    /// failure or at the end of the file (no bytes), forgotten.
    pub fn finish(&self, ino: u64, off: u64, got: Option<Vec<u8>>) {
        let mut g = self.inner.lock();
        if let Some(i) = g
            .slots
            .iter()
            .position(|s| s.ino == ino && s.off == off && matches!(s.state, State::Reading))
        {
            match got.filter(|d| !d.is_empty()) {
                Some(d) => g.slots[i].state = State::Ready(d),
                None => {
                    g.slots.remove(i);
                }
            }
        }
        self.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sequential_reads_are_read_ahead_and_taken_once() {
        let p = Prefetch::default();
        // The first read of a file says nothing about the next.
        assert_eq!(p.next(7, 0, 100), None);
        // The second, right behind it, starts reading ahead.
        assert_eq!(p.next(7, 100, 100), Some((200, 100)));
        // Not twice for the same range.
        assert_eq!(p.take(7, 300, 100), None);
        p.finish(7, 200, Some(vec![1; 100]));
        // A shorter request at the same place gets a prefix; the range is then gone.
        assert_eq!(p.take(7, 200, 60), Some(vec![1; 60]));
        assert_eq!(p.take(7, 200, 60), None);
        // A longer one than was read ahead is not answered from it.
        assert_eq!(p.next(7, 260, 100), None, "260 does not continue 200+100");
        assert_eq!(p.next(7, 360, 100), Some((460, 100)));
        p.finish(7, 460, Some(vec![2; 100]));
        assert_eq!(p.take(7, 460, 200), None);
        // Long requests are not read ahead.
        assert_eq!(p.next(8, 0, MAX_LEN + 1), None);
        assert_eq!(p.next(8, u64::from(MAX_LEN) + 1, MAX_LEN + 1), None);
        // Random reads read nothing ahead.
        assert_eq!(p.next(9, 5000, 10), None);
        assert_eq!(p.next(9, 100, 10), None);
        // A failed or empty read ahead is forgotten.
        assert_eq!(p.next(9, 110, 10), Some((120, 10)));
        p.finish(9, 120, None);
        assert_eq!(p.take(9, 120, 10), None);
    }

    #[test]
    fn reply_buffers_handed_back_are_read_ahead_into_again() {
        let p = Prefetch::default();
        assert_eq!(
            p.buffer().capacity(),
            0,
            "nothing handed back yet: a new buffer"
        );
        let bufs: Vec<Vec<u8>> = (1..=SLOTS + 2)
            .map(|k| Vec::with_capacity(k * 4096))
            .collect();
        let ptrs: Vec<*const u8> = bufs.iter().map(|b| b.as_ptr()).collect();
        for b in bufs {
            p.recycle(b);
        }
        p.recycle(Vec::new());
        // At most SLOTS kept (the first ones), each given out once, then new ones again.
        let held: Vec<Vec<u8>> = (0..SLOTS).map(|_| p.buffer()).collect();
        let mut got: Vec<*const u8> = held.iter().map(|b| b.as_ptr()).collect();
        got.sort();
        let mut kept = ptrs[..SLOTS].to_vec();
        kept.sort();
        assert_eq!(got, kept);
        assert_eq!(p.buffer().capacity(), 0);
    }

    #[test]
    fn a_request_waits_for_the_read_ahead_of_its_range() {
        let p = Arc::new(Prefetch::default());
        p.next(1, 0, 4);
        assert_eq!(p.next(1, 4, 4), Some((8, 4)));
        let q = p.clone();
        let t = std::thread::spawn(move || q.take(1, 8, 4));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !t.is_finished(),
            "take returned before the read ahead finished"
        );
        p.finish(1, 8, Some(vec![3; 4]));
        assert_eq!(t.join().unwrap(), Some(vec![3; 4]));
    }

    #[test]
    fn slots_are_bounded_and_ranges_being_read_are_kept() {
        let p = Prefetch::default();
        for ino in 0..SLOTS as u64 {
            p.next(ino, 0, 10);
            assert_eq!(p.next(ino, 10, 10), Some((20, 10)));
        }
        // All slots are being read: a fifth reader reads nothing ahead.
        p.next(99, 0, 10);
        assert_eq!(p.next(99, 10, 10), None);
        // Once one is ready, it makes room (dropped unused).
        p.finish(0, 20, Some(vec![0; 10]));
        p.next(98, 0, 10);
        assert_eq!(p.next(98, 10, 10), Some((20, 10)));
        assert_eq!(p.take(0, 20, 10), None);
        assert!(p.inner.lock().slots.len() <= SLOTS);
    }
}

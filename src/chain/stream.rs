//! Long runs of guest data go through the page cache with their device write started at once
//! (sync_file_range WRITE only queues the I/O), as a streaming writer should: the device works
//! while the next request is copied in, so a restore's final fsync finds little left to write.
//! Runs started long ago, by then written back, are dropped from the page cache (fadvise
//! DONTNEED leaves pages still dirty or under writeback alone), so restoring a whole disk does
//! not push the host's page cache out. Durability is unchanged: only fsync makes anything
//! durable. Both calls are hints: a write error of the file shows at the next fsync anyway, so
//! their own failures are only logged.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;

/// Runs shorter than this are left to the kernel's own writeback.
pub const MIN_RUN: u64 = 256 << 10;

/// Bytes of started runs left in the page cache before the oldest are dropped.
const BEHIND: u64 = 64 << 20;

/// Runs whose device write was started and that are still cached, oldest first.
#[derive(Default)]
pub struct Stream {
    started: VecDeque<(u64, u64)>,
    bytes: u64,
}

fn hint(what: &str, off: u64, len: u64, errno: i32) {
    if errno != 0 {
        let e = std::io::Error::from_raw_os_error(errno);
        log::debug!("{what} {off}+{len}: {e}");
    }
}

impl Stream {
    /// `len` bytes at `off` of `file` were just written through the page cache: start their
    /// device write, and drop the runs started more than `BEHIND` bytes ago.
    pub fn written(&mut self, file: &File, off: u64, len: u64) {
        if len < MIN_RUN {
            return;
        }
        let fd = file.as_raw_fd();
        let flags = libc::SYNC_FILE_RANGE_WRITE;
        // SAFETY: a plain syscall on an open descriptor, no memory passed.
        if unsafe { libc::sync_file_range(fd, off as i64, len as i64, flags) } != 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            hint("sync_file_range", off, len, errno);
        }
        self.started.push_back((off, len));
        self.bytes += len;
        while self.bytes > BEHIND {
            let Some((o, l)) = self.started.pop_front() else {
                break;
            };
            self.bytes -= l;
            // SAFETY: as above (returns the error number itself).
            let errno =
                unsafe { libc::posix_fadvise(fd, o as i64, l as i64, libc::POSIX_FADV_DONTNEED) };
            hint("fadvise DONTNEED", o, l, errno);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Pages of `file` in `[off, off+len)` resident in the page cache (mincore of a mapping).
    fn resident(file: &File, off: u64, len: u64) -> usize {
        let page = 4096usize;
        // SAFETY: a read-only shared mapping of an open file, unmapped before returning; the
        // vector has one byte per page of it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off as i64,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut v = vec![0u8; len as usize / page];
            assert_eq!(libc::mincore(p, len as usize, v.as_mut_ptr()), 0);
            libc::munmap(p, len as usize);
            v.iter().filter(|&&b| b & 1 != 0).count()
        }
    }

    #[test]
    fn long_runs_are_started_and_dropped_once_far_behind() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        let run = vec![0x5au8; 1 << 20];
        let mut s = Stream::default();
        let n = (BEHIND >> 20) + 4;
        for i in 0..n {
            f.write_all_at(&run, i << 20).unwrap();
            s.written(&f, i << 20, 1 << 20);
            // The device write is under way or done: nothing of the run is left dirty for
            // long (wait for it, as the next runs' drop would).
            f.sync_data().unwrap();
        }
        assert!(s.bytes <= BEHIND, "{} bytes still tracked", s.bytes);
        assert_eq!(
            resident(&f, 0, 1 << 20),
            0,
            "the oldest run is still cached"
        );
        assert!(
            resident(&f, (n - 1) << 20, 1 << 20) > 0,
            "the newest run was dropped"
        );
        // Short runs are the kernel's business.
        s.written(&f, n << 20, MIN_RUN - 4096);
        assert_eq!(s.started.back(), Some(&((n - 1) << 20, 1 << 20)));
    }
}

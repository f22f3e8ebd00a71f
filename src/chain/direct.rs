//! Long runs of guest data written past the page cache (O_DIRECT), as QEMU does with
//! cache=none: a restore streams gigabytes that nobody reads back soon, and copying them into
//! the page cache (then writing them back at fsync) costs more than the device write. The
//! image is opened a second time through /proc/self/fd, so it is the same file. The kernel keeps
//! the page cache coherent (it writes back and drops cached pages of the range), and an fsync of
//! the image makes these writes durable as any other. Where the file system refuses O_DIRECT
//! (EINVAL), runs go through the page cache as before.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Offsets, lengths and buffer addresses are multiples of this (any device's logical block).
const ALIGN: usize = 4096;

/// Runs shorter than this go through the page cache (a device round trip each is slower).
pub const MIN_RUN: usize = 256 << 10;

/// The image opened with O_DIRECT, and an aligned bounce buffer.
pub struct Direct {
    file: File,
    buf: Vec<u8>,
}

impl Direct {
    /// `file` opened again for writing with O_DIRECT, if its file system takes it.
    pub fn open(file: &File) -> Option<Direct> {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        Some(Direct {
            file,
            buf: Vec::new(),
        })
    }

    /// Whether `data` at `at` can be written this way.
    pub fn fits(at: u64, data: &[u8]) -> bool {
        data.len() >= MIN_RUN && at % ALIGN as u64 == 0 && data.len() % ALIGN == 0
    }

    /// Write `data` (which `fits`) at `at`. Ok(false): the kernel refused O_DIRECT here
    /// (EINVAL) and nothing was written.
    pub fn write_at(&mut self, at: u64, data: &[u8]) -> std::io::Result<bool> {
        if self.buf.len() < data.len() + ALIGN {
            self.buf = vec![0u8; data.len() + ALIGN];
        }
        let skip = self.buf.as_ptr().align_offset(ALIGN);
        let aligned = &mut self.buf[skip..skip + data.len()];
        aligned.copy_from_slice(data);
        match self.file.write_all_at(aligned, at) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_long_aligned_runs_fit() {
        let run = vec![0u8; MIN_RUN];
        assert!(Direct::fits(0x10000, &run));
        assert!(!Direct::fits(0x10200, &run), "offset not page aligned");
        assert!(
            !Direct::fits(0x10000, &run[..MIN_RUN - 512]),
            "short or ragged"
        );
    }
}

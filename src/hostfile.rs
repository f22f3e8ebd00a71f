//! The host files a chain is stored in: which kinds may be layers (regular files and block
//! devices, as QEMU's file and host_device drivers), opening them without blocking, and their
//! size as QEMU takes it (a block device's st_size is 0: its size is where a seek to the end
//! lands, as file-posix's raw_getlength does on Linux).

use crate::error::{Error, Result};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What a path is, when it cannot hold a layer.
fn refusal(meta: &Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        None
    } else if t.is_dir() {
        Some("is a directory")
    } else if t.is_fifo() {
        Some("is a FIFO")
    } else if t.is_socket() {
        Some("is a socket")
    } else if t.is_char_device() {
        Some("is a character device")
    } else {
        Some("is not a regular file")
    }
}

fn refused(path: &Path, what: &str) -> Error {
    Error::invalid(format!(
        "{}: {what}, not an image (layers are regular files or block devices)",
        path.display()
    ))
}

/// Open a layer file (read-only, or read-write with `write`). Anything but a regular file or a
/// block device is refused before it is opened, and the open itself cannot block (a FIFO
/// swapped in after the check is opened non-blocking, seen by fstat and refused).
pub fn open(path: &Path, write: bool) -> Result<File> {
    let what = if write {
        "cannot open for writing"
    } else {
        "cannot open"
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::path(path, what, e))?;
    if let Some(r) = refusal(&meta) {
        return Err(refused(path, r));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::path(path, what, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
    if let Some(r) = refusal(&meta) {
        return Err(refused(path, r));
    }
    blocking(&file).map_err(|e| Error::io(format!("{}: fcntl", path.display()), e))?;
    Ok(file)
}

/// Clear O_NONBLOCK again: reads of a layer wait for their data.
fn blocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns; F_GETFL/F_SETFL take and return plain ints.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The size of a block device (fixed: nothing written to it can grow it); None for a file.
pub fn device_size(file: &File) -> std::io::Result<Option<u64>> {
    if !file.metadata()?.file_type().is_block_device() {
        return Ok(None);
    }
    // Reads and writes all use pread/pwrite, so moving the file offset disturbs nothing.
    let mut f = file;
    f.seek(SeekFrom::End(0)).map(Some)
}

/// The length of a layer's storage: a block device's size, a file's length.
pub fn size(file: &File) -> std::io::Result<u64> {
    match device_size(file)? {
        Some(n) => Ok(n),
        None => Ok(file.metadata()?.len()),
    }
}

/// What is compared to notice a file changed behind the mount's back: (size, mtime seconds,
/// mtime nanoseconds). On a block device the size is the device's and the mtime the node's:
/// it moves on writes through that node (not through the file behind a loop device or another
/// node of the same device, which go unnoticed), never on reads or on locking.
pub type Stamp = (u64, i64, i64);

pub fn stamp(file: &File) -> std::io::Result<Stamp> {
    let m = file.metadata()?;
    let len = match device_size(file)? {
        Some(n) => n,
        None => m.len(),
    };
    Ok((len, m.mtime(), m.mtime_nsec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn refused_as(path: &Path, what: &str) {
        let e = open(path, false).expect_err("not a layer");
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.msg.contains(what), "{e}");
        assert!(e.msg.contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn only_files_and_block_devices_open() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("f");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        refused_as(&fifo, "is a FIFO");
        refused_as(d.path(), "is a directory");
        refused_as(Path::new("/dev/null"), "is a character device");
        let file = d.path().join("raw");
        std::fs::write(&file, [7u8; 1000]).unwrap();
        let f = open(&file, false).unwrap();
        assert_eq!(size(&f).unwrap(), 1000);
        assert_eq!(device_size(&f).unwrap(), None);
        assert_eq!(stamp(&f).unwrap().0, 1000);
        let missing = open(&d.path().join("none"), false).expect_err("missing");
        assert_eq!(missing.kind, ErrorKind::NotFound);
    }
}

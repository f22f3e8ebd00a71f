//! QEMU-compatible image locks (block/file-posix.c): one-byte OFD read locks, byte 100+p for
//! "I hold permission p" and 200+p for "I do not share p" (p: 0 consistent read, 1 write,
//! 2 write-unchanged, 3 resize). Locks live as long as the returned `ImageLocks`. On a block
//! device they sit on the device node, as QEMU's host_device driver puts them.

use super::open::Chain;
use crate::error::{Error, ErrorKind, Result};
use crate::hostfile;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

const PERM_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;
const HOLD: i64 = 100;
const DENY: i64 = 200;

/// How the chain is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Read-only, refusing to share write and resize (QEMU's read-only opener).
    ReadOnly,
    /// Read-only and sharing everything (QEMU's `-U` / force-share).
    ForceShare,
    /// The top image read-write (and the rest read-only).
    ReadWrite,
}

/// Open file descriptions holding the locks; dropping them releases every lock.
#[derive(Debug)]
pub struct ImageLocks {
    _files: Vec<File>,
}

fn ofd(file: &File, cmd: i32, ty: i32, byte: i64) -> std::io::Result<i32> {
    // SAFETY: `fl` is a plain C struct fully initialised here; fcntl only reads/writes it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: valid fd owned by `file`, and a pointer to a live flock struct.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type))
}

fn describe(byte: i64) -> &'static str {
    match byte - HOLD {
        PERM_WRITE => "another process holds its QEMU write lock (a running QEMU?)",
        PERM_RESIZE => "another process may resize it (a running QEMU?)",
        _ => "another process refuses to share it (a running QEMU?)",
    }
}

fn lock_one(path: &Path, write: bool, hold: &[i64], test: &[i64]) -> Result<File> {
    let file = hostfile::open(path, write)?;
    for &b in hold {
        ofd(&file, libc::F_OFD_SETLK, libc::F_RDLCK, b).map_err(|e| {
            let kind = if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                ErrorKind::Busy
            } else {
                ErrorKind::Io
            };
            Error {
                kind,
                msg: format!("{}: image is locked: {}", path.display(), describe(b)),
                source: None,
            }
        })?;
    }
    for &b in test {
        let ty = ofd(&file, libc::F_OFD_GETLK, libc::F_WRLCK, b)
            .map_err(|e| Error::io(format!("{}: test lock", path.display()), e))?;
        if ty != libc::F_UNLCK {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("{}: image is in use: {}", path.display(), describe(b)),
            ));
        }
    }
    Ok(file)
}

/// Take the locks QEMU would take for `mode` on every layer of `chain`.
pub fn lock_chain(chain: &Chain, mode: LockMode) -> Result<ImageLocks> {
    let ro_hold = [HOLD + PERM_READ, DENY + PERM_WRITE, DENY + PERM_RESIZE];
    let ro_test = [HOLD + PERM_WRITE, HOLD + PERM_RESIZE, DENY + PERM_READ];
    let mut files = Vec::new();
    for (i, layer) in chain.layers.iter().enumerate() {
        let f = match (mode, i) {
            (LockMode::ForceShare, _) => lock_one(&layer.path, false, &[HOLD + PERM_READ], &[])?,
            (LockMode::ReadWrite, 0) => lock_one(
                &layer.path,
                true,
                &[
                    HOLD + PERM_READ,
                    HOLD + PERM_WRITE,
                    HOLD + PERM_RESIZE,
                    DENY + PERM_WRITE,
                    DENY + PERM_RESIZE,
                ],
                &[
                    HOLD + PERM_WRITE,
                    HOLD + PERM_RESIZE,
                    DENY + PERM_READ,
                    DENY + PERM_WRITE,
                    DENY + PERM_RESIZE,
                ],
            )?,
            _ => lock_one(&layer.path, false, &ro_hold, &ro_test)?,
        };
        files.push(f);
    }
    Ok(ImageLocks { _files: files })
}

/// Does another process hold write permission on `path` (a running QEMU writer)?
pub fn writer_present(path: &Path) -> bool {
    let Ok(file) = hostfile::open(path, false) else {
        return false;
    };
    ofd(&file, libc::F_OFD_GETLK, libc::F_WRLCK, HOLD + PERM_WRITE)
        .is_ok_and(|t| t != libc::F_UNLCK)
}

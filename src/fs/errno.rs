//! The one place an error becomes an errno: an exhaustive match over `ErrorKind`, so a new
//! kind cannot reach a FUSE reply without a decision here (README "Errors (errno)").

use crate::error::{Error, ErrorKind};

/// The errno a FUSE reply carries for a value.
pub trait ToErrno {
    fn to_errno(&self) -> i32;
}

impl ToErrno for Error {
    fn to_errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Corrupt => libc::EIO,
            ErrorKind::Exists => libc::EEXIST,
            ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::InvalidCheckpoint => libc::EIO,
            ErrorKind::NoAccess => libc::EACCES,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::PastEnd => libc::ENXIO,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Refused => libc::EPERM,
            ErrorKind::Stale => libc::EIO,
            ErrorKind::TooLarge => libc::EFBIG,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            // A host error keeps its own errno (ENOSPC of a full disk, EIO of a bad sector).
            ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(std::io::Error::raw_os_error)
                .unwrap_or(libc::EIO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_their_errno() {
        let e = |k| Error::new(k, "x").to_errno();
        assert_eq!(e(ErrorKind::Exists), libc::EEXIST);
        assert_eq!(e(ErrorKind::NoAccess), libc::EACCES);
        assert_eq!(e(ErrorKind::NoSpace), libc::ENOSPC);
        assert_eq!(e(ErrorKind::PastEnd), libc::ENXIO);
        assert_eq!(e(ErrorKind::Stale), libc::EIO);
        assert_eq!(e(ErrorKind::Io), libc::EIO);
        let host = Error::io("write", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(host.to_errno(), libc::ENOSPC);
    }
}

//! The crate's error type: a small kind for decisions (the errno is picked from it once, at the
//! fs boundary: `fs::errno`), a message that names the file and the problem, and the
//! underlying `io::Error` when the host reported one.

use std::fmt;
use std::io;

/// What went wrong, coarsely: enough for `fs/` to pick an errno and for the CLI to word a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A name, file or checkpoint that does not exist.
    NotFound,
    /// A write to something that is read-only.
    ReadOnly,
    /// A request or argument that makes no sense (bad option, bad name).
    Invalid,
    /// A checkpoint whose since-set cannot be trusted.
    InvalidCheckpoint,
    /// On-disk metadata that breaks the format's rules.
    Corrupt,
    /// A valid image using a feature ckptfs does not implement.
    Unsupported,
    /// The image is held by another program.
    Busy,
    /// An operation ckptfs will not do here (size changes, deleting a layer checkpoint).
    Refused,
    /// A generated file that would outgrow its memory budget.
    TooLarge,
    /// A name that is already taken (mkdir of an existing checkpoint or file).
    Exists,
    /// A file that cannot be opened or written this way (any file but current/disk.img on rw).
    NoAccess,
    /// No room for a new cluster (a block device cannot grow; the refcount table is full).
    NoSpace,
    /// A seek at or past the end, or past the last data.
    PastEnd,
    /// A layer changed underneath the mount: its data can no longer be served.
    Stale,
    /// The host reported an I/O error.
    Io,
}

/// The crate error: `kind` for decisions, `msg` for people.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub msg: String,
    pub source: Option<io::Error>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }

    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }

    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, msg)
    }

    pub fn no_space(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::NoSpace, msg)
    }

    /// An I/O error with a sentence saying what was being done.
    pub fn io(context: impl Into<String>, err: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            msg: context.into(),
            source: Some(err),
        }
    }

    /// An I/O error about a path: NotFound when the file is missing, Io otherwise.
    pub fn path(path: &std::path::Path, what: &str, err: io::Error) -> Self {
        let kind = if err.kind() == io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        Error {
            kind,
            msg: format!("{}: {what}", path.display()),
            source: Some(err),
        }
    }

    /// Prefix the message with a file or object name: `name: msg`.
    pub fn context(mut self, name: impl fmt::Display) -> Self {
        self.msg = format!("{name}: {}", self.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(e) => write!(f, "{}: {e}", self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

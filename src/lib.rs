//! ckptfs: mount a qcow2 backing chain offline and see its checkpoints as files.
//!
//! - [`qcow2`]: the format, one parser per on-disk structure, and an open image.
//! - [`chain`]: backing chains, reads through them, QEMU-compatible locks, who may read them.
//! - [`hostfile`]: the files layers live in (regular files, block devices) and their sizes.
//! - [`checkpoint`]: the checkpoint model, since-sets and their cache, renderings, and the
//!   mkdir/rmdir policy (plans the chain's writer applies).
//! - [`fs`]: the mounted tree (a table of per-checkpoint files, a testable core, the errno
//!   match, a thin fuser adapter).
//! - [`cli`]: command line, options, daemonizing, `ckptfs ls`.

pub mod chain;
pub mod checkpoint;
pub mod cli;
pub mod error;
pub mod fs;
pub mod hostfile;
#[cfg(test)]
mod layering;
pub mod qcow2;

pub use error::{Error, ErrorKind, Result};

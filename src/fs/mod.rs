//! The mounted tree: a fixed inode table, a core that answers requests with plain types, and a
//! thin fuser adapter.

pub mod errno;
pub mod handlers;
pub mod node;
pub mod ops;
pub mod prefetch;
pub mod tree;

pub use ops::{Attr, FsCore, MountInfo};

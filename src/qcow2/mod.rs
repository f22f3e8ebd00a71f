//! The qcow2 format: pure parsers for each on-disk structure, and `image` tying them to a file.
//! Nothing here knows about backing chains, checkpoints or FUSE.

pub mod bitmaps;
pub mod bytes;
pub mod compress;
pub mod guard;
pub mod header;
pub mod image;
pub mod l2;
pub mod l2cache;
pub mod refcheck;
pub mod refcount;
pub mod snapshot;
pub mod types;

pub use image::{Bitmap, BitmapCluster, Qcow2Image, Snapshot, Table};
pub use l2::Mapping;
pub use types::{GuestOffset, HostCluster, HostOffset};

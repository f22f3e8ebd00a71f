//! Backing chains: opening the files a top image names, reading through them, the
//! QEMU-compatible image locks held while mounted, and who may read their bytes.

pub mod access;
pub mod bitmap_dir;
pub mod lock;
pub mod open;
pub mod plan;
pub mod read;
mod reserve;
mod stream;
pub mod usage;
pub mod watch;
pub mod write;

pub use open::{Chain, Layer, LayerKind};
pub use read::{Disk, Resolved};

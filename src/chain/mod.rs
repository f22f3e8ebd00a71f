//! Backing chains: opening the files a top image names, reading through them, and the
//! QEMU-compatible image locks held while mounted.

pub mod bitmap_dir;
pub mod lock;
pub mod open;
pub mod read;
pub mod write;

pub use open::{Chain, Layer, LayerKind};
pub use read::{Disk, Resolved};

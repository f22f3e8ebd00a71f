//! Offset newtypes, so that a byte offset in the image file, a byte offset in the virtual disk
//! and a host cluster index cannot be mixed up (imago's `qcow2/types.rs` is the model).
//! Conversions between host bytes and host clusters go through the cluster size, explicitly.

use std::fmt;

/// A byte offset in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// A byte offset in the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// The index of a cluster of the image file (its byte offset over the cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostCluster(pub u64);

impl HostOffset {
    /// The cluster holding this byte.
    pub fn cluster(self, cluster_bits: u32) -> HostCluster {
        HostCluster(self.0 >> cluster_bits)
    }

    /// The clusters `[first, end)` a byte range of `len` bytes from here touches.
    pub fn clusters(self, len: u64, cluster_bits: u32) -> (HostCluster, HostCluster) {
        let end = self.0.saturating_add(len);
        let partial = end & ((1u64 << cluster_bits) - 1) != 0;
        (
            self.cluster(cluster_bits),
            HostCluster((end >> cluster_bits) + u64::from(partial)),
        )
    }
}

impl HostCluster {
    /// The offset of this cluster's first byte.
    pub fn offset(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.0 << cluster_bits)
    }
}

/// `n` bytes (or clusters) further on; callers have bounded `n` by the file or the disk.
macro_rules! add_u64 {
    ($($t:ident),*) => {$(
        impl std::ops::Add<u64> for $t {
            type Output = $t;
            fn add(self, n: u64) -> $t {
                $t(self.0 + n)
            }
        }
    )*};
}
add_u64!(HostOffset, GuestOffset, HostCluster);

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for HostCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        let o = HostOffset(0x3_0123);
        assert_eq!(o.cluster(16), HostCluster(3));
        assert_eq!(HostCluster(3) + 1, HostCluster(4));
        assert_eq!(HostCluster(3).offset(16), HostOffset(0x3_0000));
        assert_eq!(
            HostOffset(0x1_0000).clusters(0x1_0001, 16),
            (HostCluster(1), HostCluster(3))
        );
        assert_eq!(
            HostOffset(0x1_0000).clusters(0x1_0000, 16),
            (HostCluster(1), HostCluster(2))
        );
    }
}

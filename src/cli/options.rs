//! The `-o` option table of the mount command. Unknown names are refused, naming them;
//! the generic options mount(8) and mount.fuse pass along are accepted and ignored.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// Parsed mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub rw: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
    pub force_share: bool,
    pub checkpoints: Option<PathBuf>,
    pub cache_mb: u64,
    pub debug: bool,
    /// `writable`: confirms `rw` when mount(8) runs ckptfs (it passes `rw` by default).
    pub writable: bool,
    /// Every option as given, in order (for current/info.json).
    pub given: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            rw: false,
            allow_other: false,
            default_permissions: false,
            force_share: false,
            checkpoints: None,
            cache_mb: 64,
            debug: false,
            writable: false,
            given: Vec::new(),
        }
    }
}

/// Options mount(8) or mount.fuse may pass that mean nothing to ckptfs.
const IGNORED: &[&str] = &[
    "defaults",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "async",
    "sync",
    "dirsync",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
];

impl MountOptions {
    /// Apply one `-o` argument (comma separated).
    pub fn apply(&mut self, arg: &str) -> Result<()> {
        let mut unknown = Vec::new();
        for opt in arg.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            self.given.push(opt.to_string());
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            match (key, value) {
                ("ro", None) => self.rw = false,
                ("rw", None) => self.rw = true,
                ("allow_other", None) => self.allow_other = true,
                ("default_permissions", None) => self.default_permissions = true,
                ("force_share", None) => self.force_share = true,
                ("debug", None) => self.debug = true,
                ("writable", None) => {
                    self.writable = true;
                    self.rw = true;
                }
                ("checkpoints", Some(d)) if !d.is_empty() => {
                    self.checkpoints = Some(PathBuf::from(d))
                }
                ("cache_mb", Some(v)) => {
                    self.cache_mb = v
                        .parse::<u64>()
                        .ok()
                        .filter(|&n| (1..=1 << 20).contains(&n))
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "cache_mb={v}: expected a number of MiB from 1 to 1048576"
                            ))
                        })?;
                }
                (k, None) if IGNORED.contains(&k) => {}
                // fstab comments and systemd's own options (x-systemd.automount, comment=...).
                (k, _) if k.starts_with("x-") || k == "comment" => {}
                _ => unknown.push(opt.to_string()),
            }
        }
        if !unknown.is_empty() {
            return Err(Error::invalid(format!(
                "unknown mount option(s): {}",
                unknown.join(", ")
            )));
        }
        Ok(())
    }

    /// mount(8) passes `rw` to helpers unless told `ro`, so under the mount helper a bare `rw`
    /// cannot mean "write the image": it takes `rw,writable` there. Returns whether `rw` was
    /// dropped, for a note to the user.
    pub fn under_mount_helper(&mut self) -> bool {
        if self.rw && !self.writable {
            self.rw = false;
            return true;
        }
        false
    }

    /// Refuse combinations that make no sense.
    pub fn check(&self) -> Result<()> {
        if (self.rw || self.writable) && self.force_share {
            return Err(Error::invalid(
                "rw and force_share cannot be combined (force_share reads an image a running QEMU writes)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let mut o = MountOptions::default();
        o.apply(
            "ro,allow_other,dev,suid,cache_mb=8,checkpoints=/x,noauto,_netdev,x-systemd.automount",
        )
        .unwrap();
        assert!(o.allow_other && !o.rw);
        assert_eq!(o.cache_mb, 8);
        assert_eq!(o.checkpoints, Some(PathBuf::from("/x")));
        let e = o.apply("bogus,ro,frob=1").unwrap_err();
        assert!(
            e.msg.contains("bogus") && e.msg.contains("frob=1"),
            "{}",
            e.msg
        );
        assert!(o.apply("cache_mb=zero").is_err());
        let mut r = MountOptions::default();
        r.apply("rw,force_share").unwrap();
        assert!(r.check().is_err());
    }
}

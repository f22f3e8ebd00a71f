//! argv -> a command. Hand-written: the mount form must accept what mount.fuse passes
//! (`IMAGE DIR -o OPTS`, options anywhere), which generic parsers make awkward.

use super::options::MountOptions;
use crate::error::{Error, Result};
use std::path::PathBuf;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    Version,
    Ls {
        json: bool,
        checkpoints: Option<PathBuf>,
        image: PathBuf,
    },
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        options: MountOptions,
        foreground: bool,
    },
}

pub const USAGE: &str = "\
usage: ckptfs [-o OPTS] [-f] IMAGE MOUNTPOINT   mount IMAGE (top of a qcow2 backing chain)
       ckptfs ls [--json] [--checkpoints DIR | --domain NAME] IMAGE
       ckptfs --help | --version

Mounts a qcow2 backing chain (read-only unless -o rw) and shows one directory per checkpoint
(persistent dirty bitmap, frozen backing layer or internal snapshot) with the
point-in-time disk.img where the chain holds it, a sparse changed.img holding
the blocks changed since the checkpoint, bitmap.bin, extents and info.json.

mount options (-o, comma separated):
  ro                   read-only (the default)
  rw                   writable current/disk.img: writes go into the top image as
                       QEMU writes them; mkdir/rmdir take and delete checkpoints
  writable             rw through mount(8), which passes rw by default: there
                       a bare rw mounts read-only, rw,writable writes
  allow_other          let other users see the tree (needs user_allow_other in
                       /etc/fuse.conf for non-root users)
  default_permissions  let the kernel check permissions
  force_share          read an image a running QEMU holds (read-only only)
  checkpoints=DIR      libvirt checkpoint metadata directory
                       (/var/lib/libvirt/qemu/checkpoint/DOMAIN)
  cache_mb=N           memory for merged bitmaps (default 64)
  debug                log every request (also RUST_LOG=debug); implies -f
  -f                   stay in the foreground

unmount with: fusermount3 -u MOUNTPOINT (or umount as root)";

/// `ckptfs --version`: the crate (= Debian package) version and the git revision built from
/// ("unknown" outside a git checkout; see build.rs).
pub const VERSION: &str = concat!(
    "ckptfs ",
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("CKPTFS_GIT_REV"),
    ")"
);

/// libvirt's checkpoint metadata directory for a domain.
pub fn domain_dir(name: &str) -> PathBuf {
    PathBuf::from("/var/lib/libvirt/qemu/checkpoint").join(name)
}

pub fn parse(args: &[String]) -> Result<Command> {
    if args.first().map(String::as_str) == Some("ls") {
        return parse_ls(&args[1..]);
    }
    let mut options = MountOptions::default();
    let mut foreground = false;
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "-f" => foreground = true,
            "-d" => {
                foreground = true;
                options.debug = true;
            }
            "-o" => {
                i += 1;
                let v = args
                    .get(i)
                    .ok_or_else(|| Error::invalid("-o needs an argument"))?;
                options.apply(v)?;
            }
            s if s.starts_with("-o") => options.apply(&s[2..])?,
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(Error::invalid(format!("unknown flag {s}")))
            }
            _ => pos.push(PathBuf::from(a)),
        }
        i += 1;
    }
    if options.debug {
        foreground = true;
    }
    options.check()?;
    match <[PathBuf; 2]>::try_from(pos) {
        Ok([image, mountpoint]) => Ok(Command::Mount {
            image,
            mountpoint,
            options,
            foreground,
        }),
        Err(p) => Err(Error::invalid(format!(
            "expected IMAGE and MOUNTPOINT, got {} argument(s)",
            p.len()
        ))),
    }
}

fn parse_ls(args: &[String]) -> Result<Command> {
    let mut json = false;
    let mut checkpoints = None;
    let mut image = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--json" => json = true,
            "-h" | "--help" => return Ok(Command::Help),
            "--checkpoints" | "--domain" => {
                let flag = args[i].clone();
                i += 1;
                let v = args
                    .get(i)
                    .ok_or_else(|| Error::invalid(format!("{flag} needs an argument")))?;
                checkpoints = Some(if flag == "--domain" {
                    domain_dir(v)
                } else {
                    PathBuf::from(v)
                });
            }
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(Error::invalid(format!("ls: unknown flag {s}")))
            }
            s => {
                if image.replace(PathBuf::from(s)).is_some() {
                    return Err(Error::invalid("ls takes one IMAGE"));
                }
            }
        }
        i += 1;
    }
    let image = image.ok_or_else(|| Error::invalid("ls needs an IMAGE"))?;
    Ok(Command::Ls {
        json,
        checkpoints,
        image,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn mount_forms() {
        let c = parse(&v(&["img", "dir", "-o", "ro,allow_other,dev,suid"])).unwrap();
        let Command::Mount {
            image,
            options,
            foreground,
            ..
        } = c
        else {
            panic!()
        };
        assert_eq!(image, PathBuf::from("img"));
        assert!(options.allow_other && !foreground);
        assert!(matches!(
            parse(&v(&["-f", "-oro", "a", "b"])).unwrap(),
            Command::Mount {
                foreground: true,
                ..
            }
        ));
        assert!(parse(&v(&["a"])).is_err());
        assert!(parse(&v(&["a", "b", "-o", "nope"]))
            .unwrap_err()
            .msg
            .contains("nope"));
        assert_eq!(parse(&v(&["--version"])).unwrap(), Command::Version);
    }

    #[test]
    fn ls_forms() {
        let c = parse(&v(&["ls", "--json", "--domain", "vm1", "x.qcow2"])).unwrap();
        assert_eq!(
            c,
            Command::Ls {
                json: true,
                checkpoints: Some(PathBuf::from("/var/lib/libvirt/qemu/checkpoint/vm1")),
                image: PathBuf::from("x.qcow2")
            }
        );
        assert!(parse(&v(&["ls"])).is_err());
    }
}

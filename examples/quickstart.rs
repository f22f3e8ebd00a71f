//! The whole job on a built-in demo chain: make a two-layer qcow2 chain with libvirt-style
//! checkpoints (qemu-img/qemu-io), take a full backup at the first checkpoint, write more,
//! mount the chain with ckptfs, show the tree, copy the changes since c1 with
//! `cp --sparse=always` (plus the zeroed runs `extents` lists), rebuild the disk from full +
//! incremental, check it with
//! `qemu-img compare`, unmount.
//!
//!     cargo run --release --example quickstart
//!
//! Needs qemu-utils and root (or fuse3's fusermount3 for an unprivileged user).

use ckptfs::cli::mount;
use ckptfs::cli::options::MountOptions;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn sh(cmd: &str, args: &[&str], dir: &Path) -> Res<()> {
    let out = Command::new(cmd).args(args).current_dir(dir).output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

fn show_tree(dir: &Path, indent: usize) -> Res<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let m = e.metadata()?;
        let name = e.file_name().to_string_lossy().into_owned();
        if m.is_dir() {
            println!("{:indent$}{name}/", "");
            show_tree(&e.path(), indent + 4)?;
        } else {
            println!(
                "{:indent$}{name:<18} {:>10} bytes, {:>8} allocated",
                "",
                m.len(),
                m.blocks() * 512
            );
        }
    }
    Ok(())
}

/// Copy the data ranges (SEEK_DATA/SEEK_HOLE) of `src` into `dst` at the same offsets.
fn apply_sparse(src: &Path, dst: &Path) -> Res<u64> {
    let s = File::open(src)?;
    let d = OpenOptions::new().write(true).open(dst)?;
    let size = s.metadata()?.len();
    let mut off = 0i64;
    let mut copied = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (off as u64) < size {
        // SAFETY: plain lseek on an fd we own.
        let data = unsafe { libc::lseek(s.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s.as_raw_fd(), data, libc::SEEK_HOLE) };
        let mut at = data as u64;
        while at < hole as u64 {
            let n = ((hole as u64 - at) as usize).min(buf.len());
            s.read_exact_at(&mut buf[..n], at)?;
            d.write_all_at(&buf[..n], at)?;
            at += n as u64;
            copied += n as u64;
        }
        off = hole;
    }
    Ok(copied)
}

fn main() -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    println!("== demo chain in {}", dir.display());
    // Base layer with checkpoint c1 (libvirt's scheme: one enabled bitmap per checkpoint).
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "vda-1.qcow2", "64M"],
        dir,
    )?;
    sh("qemu-io", &["-c", "write -P 0x11 0 8M", "vda-1.qcow2"], dir)?;
    sh("qemu-img", &["bitmap", "--add", "vda-1.qcow2", "c1"], dir)?;
    println!("== full backup at checkpoint c1");
    sh(
        "qemu-img",
        &["convert", "-O", "raw", "vda-1.qcow2", "full-at-c1.raw"],
        dir,
    )?;
    sh(
        "qemu-io",
        &[
            "-c",
            "write -P 0x22 1M 64k",
            "-c",
            "write -z 4M 128k",
            "vda-1.qcow2",
        ],
        dir,
    )?;
    sh("qemu-img", &["bitmap", "--add", "vda-1.qcow2", "c2"], dir)?;
    sh(
        "qemu-io",
        &["-c", "write -P 0x33 2M 4k", "vda-1.qcow2"],
        dir,
    )?;
    // External snapshot: the overlay continues the recording bitmaps, as libvirt does.
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "vda-1.qcow2",
            "-F",
            "qcow2",
            "vda-2.qcow2",
        ],
        dir,
    )?;
    for b in ["c1", "c2", "c3"] {
        sh("qemu-img", &["bitmap", "--add", "vda-2.qcow2", b], dir)?;
    }
    sh(
        "qemu-io",
        &[
            "-c",
            "write -P 0x44 16M 1M",
            "-c",
            "discard 0 64k",
            "vda-2.qcow2",
        ],
        dir,
    )?;

    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt)?;
    println!(
        "== ckptfs {} {}",
        dir.join("vda-2.qcow2").display(),
        mnt.display()
    );
    let m = mount::spawn(&dir.join("vda-2.qcow2"), &mnt, &MountOptions::default())?;
    show_tree(&mnt, 4)?;
    println!("== c1/extents");
    print!("{}", std::fs::read_to_string(mnt.join("c1/extents"))?);

    let extents = std::fs::read_to_string(mnt.join("c1/extents"))?;
    println!(
        "== cp --sparse=always {}/c1/changed.img inc-c1.img",
        mnt.display()
    );
    let t = std::time::Instant::now();
    sh(
        "cp",
        &[
            "--sparse=always",
            mnt.join("c1/changed.img").to_str().ok_or("path")?,
            "inc-c1.img",
        ],
        dir,
    )?;
    let inc = std::fs::metadata(dir.join("inc-c1.img"))?;
    println!(
        "   {} bytes apparent, {} bytes stored, in {:.1} ms",
        inc.len(),
        inc.blocks() * 512,
        t.elapsed().as_secs_f64() * 1e3
    );
    m.unmount()?;
    println!("== unmounted");

    println!("== rebuild: full-at-c1.raw + inc-c1.img, then qemu-img compare with vda-2.qcow2");
    let copied = apply_sparse(&dir.join("inc-c1.img"), &dir.join("full-at-c1.raw"))?;
    println!("   applied {copied} changed bytes");
    // cp --sparse skips changed blocks that now read as zeros; extents marks them "zero".
    let full = OpenOptions::new()
        .write(true)
        .open(dir.join("full-at-c1.raw"))?;
    for line in extents.lines().filter(|l| l.ends_with(" zero")) {
        let mut f = line.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(off)), Some(Ok(len))) = (f.next(), f.next()) else {
            return Err(format!("bad extents line {line:?}").into());
        };
        full.write_all_at(&vec![0u8; len as usize], off)?;
        println!("   zeroed {len} bytes at {off} (extents: zero)");
    }
    let ok = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "full-at-c1.raw",
            "vda-2.qcow2",
        ])
        .current_dir(dir)
        .status()?
        .success();
    if !ok {
        return Err("rebuilt disk differs from the chain".into());
    }
    println!("== OK: incremental backup since c1 reproduces the current disk");
    Ok(())
}

//! The shape of an incremental copy, not its speed (the benchmark measures that): through
//! stats.json, `cp --sparse=always` of changed.img moves only the changed bytes through FUSE (no
//! readahead into the holes around each run), makes two lseeks per changed run, and resolves
//! each run through the chain a bounded number of times. The disks stay mmap-able, and the
//! next requests of sequential readers of disk.img, read ahead, are the bytes QEMU reads.

use crate::common::{self, create, qemu_img, qemu_io};
use crate::mountutil::*;
use std::fs::File;
use std::os::fd::AsRawFd;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CLUSTER: u64 = 64 * KIB;
/// Changed runs, 2 MiB apart: holes far wider than a readahead window.
const RUNS: u64 = 24;

fn counter(v: &serde_json::Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("stats.json: {what} is not a number: {v}"))
}

#[test]
fn incremental_copy_moves_changed_bytes_only() {
    let d = common::tempdir();
    let dir = d.path();
    create(dir, "base.qcow2", "64M", "cluster_size=64k", None);
    qemu_io(dir, "base.qcow2", &["write -P 0x11 0 64M"]);
    create(
        dir,
        "top.qcow2",
        "",
        "cluster_size=64k",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_img(dir, &["bitmap", "--add", "top.qcow2", "c1"]);
    // Runs of 1 to 4 clusters (up to twice cp's 128 KiB buffer), each written at once.
    let runs: Vec<(u64, u64)> = (0..RUNS)
        .map(|i| (i * 2 * MIB + (i % 3) * CLUSTER, (1 + i % 4) * CLUSTER))
        .collect();
    let cmds: Vec<String> = runs
        .iter()
        .enumerate()
        .map(|(i, (o, l))| format!("write -P {} {o} {l}", 0x20 + i))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, "top.qcow2", &cmds);
    let changed: u64 = runs.iter().map(|r| r.1).sum();

    let mnt = Mount::new(&dir.join("top.qcow2"), &mount_dir(dir, "mnt"), None);
    let src = mnt.path("c1/changed.img");
    let out = dir.join("inc.img");
    cp_sparse(&src, &out);
    let stats = read_json(&mnt.path("stats.json"));
    let f = &stats["files"]["changed.img"];
    let bytes = counter(&f["bytes"], "changed.img bytes");
    let lseeks = counter(&f["lseeks"], "changed.img lseeks");
    let lookups = counter(&stats["chain_lookups"], "chain_lookups");
    assert_eq!(
        bytes, changed,
        "changed.img served {bytes} bytes for {changed} changed (readahead into the holes?)"
    );
    // SEEK_DATA and SEEK_HOLE per run, and the SEEK_DATA that finds no more.
    assert!(
        lseeks <= 2 * RUNS + 2,
        "{lseeks} lseeks for {RUNS} changed runs"
    );
    // One lookup per read request inside a run: at most two 128 KiB reads per run here.
    assert!(
        lookups <= 2 * RUNS,
        "{lookups} chain lookups for {RUNS} changed runs"
    );
    let got = seek_map_local(&out).unwrap();
    let want: Vec<(u64, u64)> = runs.iter().map(|&(o, l)| (o, o + l)).collect();
    assert_eq!(got, want, "the sparse copy holds exactly the changed runs");

    // The disks bypass the page cache, but MAP_SHARED still works and agrees with read.
    let (o, l) = runs[5];
    let m = mapped(&src, o, l);
    assert!(
        m.iter().all(|&b| b == 0x25),
        "mmap of changed.img: wrong bytes"
    );
    // 1 MiB lies between two changed runs: the base's bytes.
    let m = mapped(&mnt.path("current/disk.img"), MIB, l);
    assert!(
        m.iter().all(|&b| b == 0x11),
        "mmap of disk.img: wrong bytes"
    );
    mnt.unmount();
}

/// `len` bytes at `off` of `path`, through a read-only MAP_SHARED mapping.
fn mapped(path: &std::path::Path, off: u64, len: u64) -> Vec<u8> {
    let path = path.to_path_buf();
    timed(&format!("mmap {}", path.display()), move || {
        let f = File::open(&path).unwrap();
        let size = f.metadata().unwrap().len() as usize;
        // SAFETY: a read-only shared mapping of a file we hold open; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: [off, off+len) lies inside the mapping of `size` bytes.
        let v =
            unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(off as usize), len as usize) }
                .to_vec();
        // SAFETY: the mapping made above, not used after this.
        unsafe { libc::munmap(p, size) };
        v
    })
}

/// Sequential readers of disk.img get their next request read ahead (src/fs/prefetch.rs): two
/// interleaved readers (128 KiB pieces; 64 KiB then 32 KiB pieces, so that a shorter request
/// takes the front of a longer range read ahead), a random read between them, the end of the
/// disk: every byte equals QEMU's, and stats.json counts each byte served once.
#[test]
fn interleaved_sequential_readers_of_disk_img_read_qemus_bytes() {
    let d = common::tempdir();
    let dir = d.path();
    create(dir, "base.qcow2", "12M", "cluster_size=64k", None);
    qemu_io(
        dir,
        "base.qcow2",
        &[
            "write -c -P 0x12 2M 1M",
            "write -P 0x11 0 2M",
            "write -P 0x11 3M 9M",
        ],
    );
    create(
        dir,
        "top.qcow2",
        "",
        "cluster_size=64k",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        dir,
        "top.qcow2",
        &[
            "write -P 0x21 100k 300k",
            "write -z 5M 1M",
            "write -c -P 0x22 7M 512k",
            "write -P 0x23 12000k 288k",
        ],
    );
    let want = common::truth_raw(&dir.join("top.qcow2"));
    let size = want.len() as u64;
    let mnt = Mount::new(&dir.join("top.qcow2"), &mount_dir(dir, "mnt"), None);
    let disk = mnt.path("current/disk.img");
    let (a, b, r) = (
        File::open(&disk).unwrap(),
        File::open(&disk).unwrap(),
        File::open(&disk).unwrap(),
    );
    let (mut at_a, mut at_b, mut served) = (0u64, 6 * MIB, 0u64);
    let mut check = |f: &File, off: u64, len: u64, who: &str| {
        let got = pread_full(f, off, len as usize).unwrap();
        let end = (off + len).min(size) as usize;
        assert!(
            got == want[off as usize..end],
            "{who}: {len} bytes at {off} differ from qemu-img convert"
        );
        served += got.len() as u64;
        got.len() as u64
    };
    for i in 0..200u64 {
        if at_a < size {
            at_a += check(&a, at_a, 128 * KIB, "reader A");
        }
        if at_b < size {
            let len = if i % 2 == 0 { 64 * KIB } else { 32 * KIB };
            at_b += check(&b, at_b, len, "reader B");
        }
        if i % 7 == 3 {
            check(&r, (i * 977 * KIB) % size, 4 * KIB, "random reader");
        }
    }
    assert_eq!((at_a, at_b), (size, size), "both readers reached the end");
    let stats = read_json(&mnt.path("stats.json"));
    let bytes = counter(&stats["files"]["disk.img"]["bytes"], "disk.img bytes");
    assert_eq!(bytes, served, "disk.img bytes counted vs served");
}

//! A full restore through `-o rw`: a raw disk written whole into current/disk.img of a fresh
//! qcow2 with sequential 1 MiB writes (as `dd bs=1M conv=notrunc,fsync` does). The writer takes
//! new clusters from a reserve counted ahead of the writes: a clean unmount gives it back (the
//! image checks clean, no leaks), and a kill -9 in the middle leaves leaked clusters at most,
//! every fsynced byte, and an image a later rw mount opens and writes.
//!
//! Harness rules (see `mountutil`): every mount is owned by a guard that unmounts, every access
//! runs under a timeout, only processes these tests started are killed, by PID.

use crate::common::{self, create, qemu_img, tempdir};
use crate::mountutil::*;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const K: u64 = 1024;
const M: u64 = 1 << 20;

/// Write `src` into `disk` from `first` on in 1 MiB writes (the bytes before `first` in one
/// write of their own), then fsync: dd's pattern, shifted by `first` when it is unaligned.
fn restore(disk: &Path, src: &Path, first: u64) {
    let (disk, src) = (disk.to_path_buf(), src.to_path_buf());
    timed_for(
        &format!("restore {} into {}", src.display(), disk.display()),
        Duration::from_secs(120),
        move || {
            let data = std::fs::read(&src).unwrap();
            let f = OpenOptions::new().write(true).open(&disk).unwrap();
            f.write_all_at(&data[..first as usize], 0).unwrap();
            for (i, c) in data[first as usize..].chunks(M as usize).enumerate() {
                f.write_all_at(c, first + i as u64 * M).unwrap();
            }
            f.sync_all().unwrap();
        },
    );
}

/// Restore `size` bytes into a fresh image made with `opts` (and bitmap `c1` if `bitmap`),
/// unmount, and expect `qemu-img check` clean (the reserve given back: no leaks) and the image
/// equal to the source.
fn restore_case(what: &str, opts: &str, size: u64, first: u64, bitmap: bool) {
    let t = tempdir();
    let d = t.path();
    let src = d.join("src.raw");
    std::fs::write(&src, common::varied_data(size as usize, size ^ first)).unwrap();
    create(d, "target.qcow2", &size.to_string(), opts, None);
    if bitmap {
        qemu_img(d, &["bitmap", "--add", "target.qcow2", "c1"]);
    }
    let target = d.join("target.qcow2");
    let mnt = Mount::new(&target, &mount_dir(d, "mnt"), Some("rw"));
    restore(&mnt.path("current/disk.img"), &src, first);
    mnt.unmount();
    assert_check_clean(&target, what);
    assert_image_equals_raw(&src, &target, what);
    if bitmap {
        let info = String::from_utf8_lossy(&qemu_img(d, &["info", "target.qcow2"])).into_owned();
        assert!(
            info.contains("c1") && !info.contains("in-use"),
            "{what}: c1 stored and no longer in use after the unmount:\n{info}"
        );
    }
}

#[test]
fn restore_64k_clusters_checks_clean_and_equals_the_source() {
    restore_case(
        "restore, 64 KiB clusters, aligned 1 MiB writes, a bitmap",
        "cluster_size=64k",
        80 * M,
        0,
        true,
    );
}

/// 4 KiB clusters: a reserve run spans several refcount blocks (each counts 8 MiB) and every
/// 2 MiB needs a new L2 table; writes start 3 KiB into a cluster, so both ends of each are
/// copy-on-write edges.
#[test]
fn restore_4k_clusters_unaligned_writes_checks_clean_and_equals_the_source() {
    restore_case(
        "restore, 4 KiB clusters, 1 MiB writes from 3 KiB",
        "cluster_size=4k",
        72 * M,
        3 * K,
        false,
    );
}

/// `qemu-img check IMAGE` after a crash: no corruption, at most leaked clusters.
fn assert_leaks_at_most(image: &Path, what: &str) {
    let (code, out) = check(image);
    println!("{what}: qemu-img check exit {code:?}");
    let leaks_only = code == Some(3) && out.contains("leaked clusters");
    assert!(
        (code == Some(0) || leaks_only) && !out.contains("ERROR"),
        "{what}: qemu-img check must report at most leaks, got {code:?}:\n{out}"
    );
}

/// `image` as raw bytes from `off` for `len` (qemu-img convert, so QEMU's reading of it).
fn qemu_bytes(image: &Path, off: u64, len: usize) -> Vec<u8> {
    let raw = image.with_extension("raw");
    common::run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    );
    pread_full(&File::open(&raw).unwrap(), off, len).unwrap()
}

#[test]
fn kill9_during_a_restore_leaves_leaks_at_most() {
    let t = tempdir();
    let d = t.path();
    let size = 256 * M;
    create(
        d,
        "target.qcow2",
        &size.to_string(),
        "cluster_size=4k",
        None,
    );
    let target = d.join("target.qcow2");
    let seed = 0x7e57_0e57;
    let mut mnt = Mount::foreground(
        &target,
        &mount_dir(d, "mnt"),
        Some("rw"),
        &d.join("ckptfs.log"),
    );
    let pid = mnt.child_pid().unwrap();
    let disk = mnt.path("current/disk.img");
    let w = spawn_chunk_writer(disk, seed, size / M, |i| i + 1 == 16);
    let (written, synced, writer) = (&w.written, &w.synced, w.thread);
    // Past 40 MiB the writer is in the middle of a 32 MiB reserve run.
    let start = Instant::now();
    while written.load(Ordering::SeqCst) < 40 * M {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the restore did not write 40 MiB within 60 s"
        );
        assert!(!writer.is_finished(), "the writer stopped early");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill(2) of the ckptfs -f child this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let st = mnt.wait_child(ACCESS_TIMEOUT);
    let outcome = timed("writer thread", move || writer.join().unwrap());
    let wrote = written.load(Ordering::SeqCst);
    println!("kill -9 during a restore: daemon {st}, writer: {outcome}; {wrote} bytes written");
    assert!(wrote < size, "the restore finished before the kill");
    let r = run_files(None, "umount", &[OsStr::new("-l"), mnt.dir.as_os_str()]);
    assert!(r.ok || !is_mounted(&mnt.dir), "umount -l: {r:?}");
    drop(mnt);

    assert_leaks_at_most(&target, "after kill -9 during a restore");
    let fsynced = synced.load(Ordering::SeqCst);
    assert_eq!(fsynced, 16 * M, "the fsync at 16 MiB returned");
    let got = qemu_bytes(&target, 0, fsynced as usize);
    for i in 0..fsynced / M {
        common::assert_same(
            &got[(i * M) as usize..((i + 1) * M) as usize],
            &chunk_data(seed, i),
            i * M,
            &format!("fsynced chunk {i} after kill -9"),
        );
    }

    // A later rw mount opens the image and writes past everything the restore reached.
    let mnt = Mount::new(&target, &mount_dir(d, "mnt2"), Some("rw"));
    let tail = chunk_data(seed, 1000);
    {
        let (disk, tail) = (mnt.path("current/disk.img"), tail.clone());
        timed("write after the remount", move || {
            let f = OpenOptions::new().write(true).open(&disk).unwrap();
            f.write_all_at(&tail, 200 * M + 5).unwrap();
            f.sync_all().unwrap();
        });
    }
    mnt.unmount();
    assert_leaks_at_most(&target, "after kill -9 and a later rw mount");
    common::assert_same(
        &qemu_bytes(&target, 200 * M + 5, M as usize),
        &tail,
        200 * M + 5,
        "write after the remount",
    );
    // The leaks are QEMU's to repair, and nothing else is wrong.
    qemu_img(d, &["check", "-q", "-r", "leaks", "target.qcow2"]);
    assert_check_clean(&target, "after kill -9 and qemu-img check -r leaks");
}

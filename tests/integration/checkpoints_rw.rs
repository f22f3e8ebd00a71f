//! Checkpoints through the tree (`-o rw`): `mkdir MOUNT/NAME` adds a checkpoint bitmap to the
//! top image, `rmdir MOUNT/NAME` deletes one that lives only there. Checked live (the tree and
//! checkpoints.json change at once, since-sets follow) and, after the daemon has stored the
//! bitmaps and exited, against QEMU: `qemu-img check`, `qemu-img info` (names, flags,
//! granularities) and the bits through `qemu-nbd -B` + `nbdinfo`, for the cumulative (libvirt)
//! scheme against a twin chain built with qemu-io and `qemu-img bitmap`.
//!
//! Harness rules (see `mountutil`): every mount is owned by a guard that unmounts and waits for
//! the daemon, every access runs under a timeout, fixtures are made at test time, and only the
//! processes these tests started are killed, by PID.

use crate::common::{self, create, qemu_img, qemu_io, tempdir};
use crate::mountutil::*;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const K: u64 = 1024;
const M: u64 = 1 << 20;
const K64: u64 = 64 * K;
const K128: u64 = 128 * K;

// ---------------------------------------------------------------------------------------
// Writes

/// One write: a byte pattern, or zeroing (fallocate ZERO_RANGE; qemu-io `write -z`).
#[derive(Debug, Clone, Copy)]
struct W {
    off: u64,
    len: u64,
    /// `Some(p)`: pwrite of `p` repeated; `None`: zero the range.
    pat: Option<u8>,
}

fn wp(off: u64, len: u64, p: u8) -> W {
    W {
        off,
        len,
        pat: Some(p),
    }
}

fn wz(off: u64, len: u64) -> W {
    W {
        off,
        len,
        pat: None,
    }
}

/// Apply `ops` through the mounted `current/disk.img`, then fsync; all under a timeout.
fn write_mount(mnt: &Mount, ops: &[W]) {
    let p = mnt.path("current/disk.img");
    let ops = ops.to_vec();
    let r = timed_for(
        "write through the mount",
        Duration::from_secs(60),
        move || -> Result<(), String> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|e| format!("open {}: {e}", p.display()))?;
            for w in &ops {
                match w.pat {
                    Some(b) => f
                        .write_all_at(&vec![b; w.len as usize], w.off)
                        .map_err(|e| format!("{w:?}: {e}"))?,
                    None => {
                        // SAFETY: fallocate(2) on an fd owned by `f`.
                        let r = unsafe {
                            libc::fallocate(
                                f.as_raw_fd(),
                                libc::FALLOC_FL_ZERO_RANGE,
                                w.off as libc::off_t,
                                w.len as libc::off_t,
                            )
                        };
                        if r != 0 {
                            return Err(format!("{w:?}: {}", std::io::Error::last_os_error()));
                        }
                    }
                }
            }
            f.sync_all().map_err(|e| format!("fsync: {e}"))
        },
    );
    if let Err(e) = r {
        panic!("write through {}: {e}", mnt.dir.display());
    }
}

/// The same writes with qemu-io on `image` (in `dir`).
fn write_qemu(dir: &Path, image: &str, ops: &[W]) {
    let cmds: Vec<String> = ops
        .iter()
        .map(|w| match w.pat {
            Some(b) => format!("write -P {b} {} {}", w.off, w.len),
            None => format!("write -z {} {}", w.off, w.len),
        })
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, image, &refs);
}

/// Block ranges (`gran`) touched by the writes of all `groups`.
fn blocks(groups: &[&[W]], gran: u64, size: u64) -> Vec<(u64, u64)> {
    let r: Vec<(u64, u64)> = groups
        .iter()
        .flat_map(|g| g.iter().map(|w| (w.off, w.off + w.len)))
        .collect();
    round_to_blocks(&r, gran, size)
}

// ---------------------------------------------------------------------------------------
// The tree

fn mkdir(mnt: &Mount, rel: &str) -> std::io::Result<()> {
    let p = mnt.path(rel);
    timed(&format!("mkdir {}", p.display()), move || {
        std::fs::create_dir(&p)
    })
}

fn rmdir(mnt: &Mount, rel: &str) -> std::io::Result<()> {
    let p = mnt.path(rel);
    timed(&format!("rmdir {}", p.display()), move || {
        std::fs::remove_dir(&p)
    })
}

fn mkdir_ok(mnt: &Mount, name: &str) {
    if let Err(e) = mkdir(mnt, name) {
        panic!("mkdir {}/{name} failed: {e}", mnt.dir.display());
    }
}

fn rmdir_ok(mnt: &Mount, name: &str) {
    if let Err(e) = rmdir(mnt, name) {
        panic!("rmdir {}/{name} failed: {e}", mnt.dir.display());
    }
}

/// Assert `r` failed with `errno`.
fn assert_errno(r: std::io::Result<()>, errno: i32, what: &str) {
    match r {
        Ok(()) => panic!("{what}: succeeded, expected errno {errno}"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected errno {errno} ({}), got {e}",
            std::io::Error::from_raw_os_error(errno)
        ),
    }
}

/// The ranges `DIR/extents` lists (data and zero runs together), merged.
fn ext(mnt: &Mount, dir_name: &str) -> Vec<(u64, u64)> {
    let what = format!("{dir_name}/extents");
    let t = read_text(&mnt.path(&what));
    merge(
        parse_extents(&t, &what)
            .iter()
            .map(|e| (e.off, e.off + e.len))
            .collect(),
    )
}

fn names(mnt: &Mount) -> Vec<String> {
    ckpt_names(&read_json(&mnt.path("checkpoints.json")))
}

// ---------------------------------------------------------------------------------------
// QEMU's views

type Bm = BitmapInfo;

/// Bitmaps of `image` as `qemu-img info --output=json` lists them (sorted by name).
fn bitmaps(image: &Path) -> Vec<Bm> {
    let mut l = qemu_bitmaps(image, false);
    l.sort_by(|a, b| a.name.cmp(&b.name));
    l
}

fn bm(name: &str, enabled: bool, gran: u64) -> Bm {
    Bm {
        name: name.to_string(),
        flags: if enabled {
            vec!["auto".to_string()]
        } else {
            Vec::new()
        },
        granularity: gran,
    }
}

fn assert_bitmaps(image: &Path, want: &[Bm], what: &str) {
    let mut want = want.to_vec();
    want.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        bitmaps(image),
        want,
        "{what}: qemu-img info bitmaps of {}",
        image.display()
    );
}

/// QEMU's view of bitmap `name` of `image` (socket in a fresh subdirectory of `dir`).
/// A name with `^` cannot go into the NBD URI the helper builds from it, so such a bitmap is
/// first merged by QEMU into a plain-named bitmap of a scratch overlay.
fn dirty(dir: &Path, tag: &str, image: &Path, name: &str) -> Vec<(u64, u64)> {
    let safe = name.replace('^', "_");
    let (r, pid_file) = if safe != name {
        let tag = format!("{tag}-{safe}");
        let r = qemu_since(dir, &tag, image, &[(image, name)]);
        (r, dir.join(format!("gt-{tag}/nbd-since.pid")))
    } else {
        let sub = dir.join(format!("nbd-{tag}-{safe}"));
        std::fs::create_dir(&sub).unwrap();
        let r = common::qemu_dirty_ranges(&sub, s(image), name);
        (r, sub.join(format!("nbd-{name}.pid")))
    };
    // The helper only sends SIGTERM to its qemu-nbd; wait until that server (by its own pid
    // file) has gone, or its lock on `image` would refuse the next rw mount.
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    {
        assert!(
            wait_pid_gone(pid, ACCESS_TIMEOUT),
            "qemu-nbd {pid} did not exit"
        );
    }
    r
}

fn rw(image: &Path, d: &Path, mp: &str) -> Mount {
    Mount::new(image, &mount_dir(d, mp), Some("rw"))
}

/// `fusermount3 -u`, retried briefly on EBUSY (a fork in a parallel test can hold a copy of
/// one of our descriptors until its exec), then wait for the daemon to store the bitmaps and
/// exit by itself.
fn unmount(mnt: Mount) {
    let mut last = None;
    for _ in 0..25 {
        let r = run_files(
            None,
            "fusermount3",
            &[OsStr::new("-u"), mnt.dir.as_os_str()],
        );
        if !is_mounted(&mnt.dir) {
            last = None;
            break;
        }
        last = Some(r);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        last.is_none(),
        "fusermount3 -u {}: {last:?}",
        mnt.dir.display()
    );
    assert!(
        reap_daemons(&mnt.dir, ACCESS_TIMEOUT),
        "the ckptfs daemon for {} did not exit after unmount",
        mnt.dir.display()
    );
    drop(mnt);
}

/// The one ckptfs daemon serving `mnt`.
fn daemon_pid(mnt: &Mount) -> i32 {
    let pids = ckptfs_pids_for(&mnt.dir);
    assert_eq!(
        pids.len(),
        1,
        "expected one ckptfs process serving {}, found {pids:?}",
        mnt.dir.display()
    );
    pids[0]
}

// ---------------------------------------------------------------------------------------
// 1. Cumulative (libvirt) scheme, against a twin chain

#[test]
fn cumulative_mkdir_rmdir_match_qemu() {
    let t = tempdir();
    let d = t.path();
    let size = 64 * M;
    // libvirt style: c1, c2 in the base (enabled, 128 KiB so the inherited granularity is
    // visible), an external snapshot that re-created them in the overlay.
    create(d, "base.qcow2", "64M", "", None);
    qemu_img(d, &["bitmap", "--add", "-g", "128k", "base.qcow2", "c1"]);
    let w0 = [wp(0, K64, 1)];
    write_qemu(d, "base.qcow2", &w0);
    qemu_img(d, &["bitmap", "--add", "-g", "128k", "base.qcow2", "c2"]);
    let w00 = [wp(M, K64, 2)];
    write_qemu(d, "base.qcow2", &w00);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    for b in ["c1", "c2"] {
        qemu_img(d, &["bitmap", "--add", "-g", "128k", "top.qcow2", b]);
    }
    let tw = d.join("twin");
    std::fs::create_dir(&tw).unwrap();
    std::fs::copy(d.join("base.qcow2"), tw.join("base.qcow2")).unwrap();
    std::fs::copy(d.join("top.qcow2"), tw.join("top.qcow2")).unwrap();
    let top = d.join("top.qcow2");
    let twin = tw.join("top.qcow2");
    let base_before = std::fs::read(d.join("base.qcow2")).unwrap();

    let a = [
        wp(2 * M + 4096, 8192, 0x31),
        wp(5 * M + 100, 70000, 0x32),
        wz(7 * M, K64),
    ];
    let b = [
        wp(0, 4096, 0x41),
        wp(9 * M + K64, K64, 0x42),
        wz(12 * M, K64),
    ];
    let c = [wp(20 * M, K64, 0x51)];
    {
        let mnt = rw(&top, d, "mnt");
        write_mount(&mnt, &a);
        mkdir_ok(&mnt, "c3");
        write_mount(&mnt, &b);
        // At once, same mount.
        assert!(
            list_dir(&mnt.dir).contains(&"c3".to_string()),
            "c3/ missing after mkdir: {:?}",
            list_dir(&mnt.dir)
        );
        let info = read_json(&mnt.path("c3/info.json"));
        assert_eq!(info["kind"], "bitmap", "c3/info.json {info}");
        assert_eq!(info["valid"], true, "c3/info.json {info}");
        assert_eq!(
            info["granularity"], K128,
            "c3 must take the newest checkpoint's granularity (c2: 128 KiB): {info}"
        );
        assert_eq!(
            ext(&mnt, "c3"),
            blocks(&[&b], K128, size),
            "c3/extents: only the writes after mkdir"
        );
        assert_eq!(
            seek_map(&mnt.path("c3/changed.img")),
            blocks(&[&b], K128, size),
            "c3/changed.img SEEK_DATA map"
        );
        assert_eq!(
            ext(&mnt, "c2"),
            blocks(&[&w00, &a, &b], K128, size),
            "c2/extents"
        );
        assert_eq!(
            ext(&mnt, "c1"),
            blocks(&[&w0, &w00, &a, &b], K128, size),
            "c1/extents"
        );
        let n = names(&mnt);
        assert_eq!(
            n.last().map(String::as_str),
            Some("c3"),
            "checkpoints.json order: {n:?}"
        );
        assert!(
            n.contains(&"c1".to_string()) && n.contains(&"c2".to_string()),
            "{n:?}"
        );

        // c2 also lives in the base: refused.
        assert_errno(
            rmdir(&mnt, "c2"),
            libc::EPERM,
            "rmdir c2 (carried by the base)",
        );
        assert!(exists(&mnt.path("c2")), "c2/ must survive a refused rmdir");

        mkdir_ok(&mnt, "c4");
        assert!(exists(&mnt.path("c4/extents")), "c4/ after mkdir");
        assert_eq!(names(&mnt).last().map(String::as_str), Some("c4"));
        write_mount(&mnt, &c);
        assert_eq!(ext(&mnt, "c4"), blocks(&[&c], K128, size), "c4/extents");
        rmdir_ok(&mnt, "c4");
        assert!(!exists(&mnt.path("c4")), "c4/ still there after rmdir");
        assert!(
            !list_dir(&mnt.dir).contains(&"c4".to_string()),
            "c4 listed after rmdir: {:?}",
            list_dir(&mnt.dir)
        );
        let n = names(&mnt);
        assert!(
            !n.contains(&"c4".to_string()),
            "checkpoints.json after rmdir c4: {n:?}"
        );
        assert_eq!(n.last().map(String::as_str), Some("c3"), "{n:?}");
        assert_eq!(
            ext(&mnt, "c3"),
            blocks(&[&b, &c], K128, size),
            "c3/extents after rmdir c4"
        );
        unmount(mnt);
    }

    // The twin: the same writes with qemu-io, the same checkpoints with qemu-img bitmap.
    write_qemu(&tw, "top.qcow2", &a);
    qemu_img(&tw, &["bitmap", "--add", "-g", "128k", "top.qcow2", "c3"]);
    write_qemu(&tw, "top.qcow2", &b);
    qemu_img(&tw, &["bitmap", "--add", "-g", "128k", "top.qcow2", "c4"]);
    write_qemu(&tw, "top.qcow2", &c);
    qemu_img(&tw, &["bitmap", "--remove", "top.qcow2", "c4"]);

    assert_check_clean(&top, "cumulative");
    assert_check_clean(&twin, "cumulative twin");
    let want = [
        bm("c1", true, K128),
        bm("c2", true, K128),
        bm("c3", true, K128),
    ];
    assert_bitmaps(&top, &want, "cumulative");
    assert_bitmaps(&twin, &want, "cumulative twin");
    assert_identical(&top, &twin, "cumulative: data");
    for name in ["c1", "c2", "c3"] {
        let got = dirty(d, "top", &top, name);
        let exp = dirty(d, "twin", &twin, name);
        assert_eq!(got, exp, "bitmap {name}: ckptfs's top vs the qemu twin");
    }
    assert_eq!(
        dirty(d, "top2", &top, "c3"),
        blocks(&[&b, &c], K128, size),
        "bitmap c3 of the top"
    );
    assert!(
        std::fs::read(d.join("base.qcow2")).unwrap() == base_before,
        "the base must not be written"
    );
}

// ---------------------------------------------------------------------------------------
// 2. Delta scheme with caret names (digest cookbook)

/// d-base: c1 (disabled), c2^c1 (enabled); d-top: c2^c1. Writes at 0, 1M (base), 2M (top).
fn caret_fixture(d: &Path, top_bitmap: bool) {
    create(d, "d-base.qcow2", "64M", "", None);
    qemu_img(d, &["bitmap", "--add", "d-base.qcow2", "c1"]);
    qemu_io(d, "d-base.qcow2", &["write 0 64k"]);
    qemu_img(d, &["bitmap", "--disable", "d-base.qcow2", "c1"]);
    qemu_img(d, &["bitmap", "--add", "d-base.qcow2", "c2^c1"]);
    qemu_io(d, "d-base.qcow2", &["write 1M 64k"]);
    create(d, "d-top.qcow2", "", "", Some(("d-base.qcow2", "qcow2")));
    if top_bitmap {
        qemu_img(d, &["bitmap", "--add", "d-top.qcow2", "c2^c1"]);
        qemu_io(d, "d-top.qcow2", &["write 2M 64k"]);
    }
}

#[test]
fn delta_carets_mkdir_disables_rmdir_merges() {
    let t = tempdir();
    let d = t.path();
    let size = 64 * M;
    caret_fixture(d, true);
    let top = d.join("d-top.qcow2");
    let f1 = [wp(M, K64, 0)]; // the fixture's base write after c2 (blocks only)
    let pre = [wp(2 * M, K64, 0)]; // the fixture's top write
    let w1 = [wp(4 * M, K64, 0x51)];
    let w2 = [wp(6 * M, K64, 0x52), wz(8 * M, K64)];
    let w3 = [wp(10 * M, K64, 0x53)];
    {
        let mnt = rw(&top, d, "mnt1");
        write_mount(&mnt, &w1);
        mkdir_ok(&mnt, "c3");
        write_mount(&mnt, &w2);
        let n = names(&mnt);
        assert_eq!(n.last().map(String::as_str), Some("c3"), "{n:?}");
        assert_eq!(ext(&mnt, "c3"), blocks(&[&w2], K64, size), "c3/extents");
        assert_eq!(
            ext(&mnt, "c2"),
            blocks(&[&f1, &pre, &w1, &w2], K64, size),
            "c2/extents after mkdir c3"
        );
        unmount(mnt);
    }
    assert_check_clean(&top, "after mkdir c3");
    assert_bitmaps(
        &top,
        &[bm("c2^c1", false, K64), bm("c3^c2", true, K64)],
        "mkdir c3 in the caret scheme: c3^c2 recording, c2^c1 disabled",
    );
    assert_eq!(
        dirty(d, "a", &top, "c2^c1"),
        blocks(&[&pre, &w1], K64, size),
        "c2^c1 of the top after mkdir c3"
    );
    assert_eq!(
        dirty(d, "a", &top, "c3^c2"),
        blocks(&[&w2], K64, size),
        "c3^c2 of the top"
    );

    {
        let mnt = rw(&top, d, "mnt2");
        let before: Vec<_> = ["c1", "c2", "c3"].iter().map(|c| ext(&mnt, c)).collect();
        rmdir_ok(&mnt, "c3");
        assert!(!exists(&mnt.path("c3")), "c3/ after rmdir");
        let n = names(&mnt);
        assert!(!n.contains(&"c3".to_string()), "{n:?}");
        assert_eq!(ext(&mnt, "c1"), before[0], "since(c1) changed by rmdir c3");
        assert_eq!(ext(&mnt, "c2"), before[1], "since(c2) changed by rmdir c3");
        // c2^c1 records again.
        write_mount(&mnt, &w3);
        assert_eq!(
            ext(&mnt, "c2"),
            merge([before[1].clone(), blocks(&[&w3], K64, size)].concat()),
            "c2/extents after a write following rmdir c3"
        );
        unmount(mnt);
    }
    assert_check_clean(&top, "after rmdir c3");
    assert_bitmaps(
        &top,
        &[bm("c2^c1", true, K64)],
        "rmdir c3: merged into c2^c1, which records again",
    );
    assert_eq!(
        dirty(d, "b", &top, "c2^c1"),
        blocks(&[&pre, &w1, &w2, &w3], K64, size),
        "c2^c1 after rmdir c3 and a write"
    );
}

#[test]
fn delta_carets_rmdir_middle() {
    let t = tempdir();
    let d = t.path();
    let size = 64 * M;
    caret_fixture(d, true);
    let top = d.join("d-top.qcow2");
    let x3 = [wp(12 * M, K64, 0x63)];
    let x4 = [wp(14 * M, K64, 0x64), wp(12 * M + K64, 4096, 0x65)];
    let x5 = [wp(16 * M, K64, 0x66)];
    {
        let mnt = rw(&top, d, "mnt");
        mkdir_ok(&mnt, "c3");
        write_mount(&mnt, &x3);
        mkdir_ok(&mnt, "c4");
        write_mount(&mnt, &x4);
        mkdir_ok(&mnt, "c5");
        write_mount(&mnt, &x5);
        let n = names(&mnt);
        let tail: Vec<&str> = n.iter().rev().take(3).rev().map(String::as_str).collect();
        assert_eq!(tail, ["c3", "c4", "c5"], "checkpoints.json order {n:?}");
        assert_eq!(
            ext(&mnt, "c4"),
            blocks(&[&x4, &x5], K64, size),
            "c4/extents"
        );
        let before: Vec<_> = ["c1", "c2", "c3", "c5"]
            .iter()
            .map(|c| ext(&mnt, c))
            .collect();
        rmdir_ok(&mnt, "c4");
        assert!(!exists(&mnt.path("c4")), "c4/ after rmdir");
        let after: Vec<_> = ["c1", "c2", "c3", "c5"]
            .iter()
            .map(|c| ext(&mnt, c))
            .collect();
        assert_eq!(
            after, before,
            "since-sets of c1, c2, c3, c5 changed by rmdir c4"
        );
        let n = names(&mnt);
        let tail: Vec<&str> = n.iter().rev().take(2).rev().map(String::as_str).collect();
        assert_eq!(tail, ["c3", "c5"], "checkpoints.json order {n:?}");
        unmount(mnt);
    }
    assert_check_clean(&top, "after rmdir c4");
    assert_bitmaps(
        &top,
        &[
            bm("c2^c1", false, K64),
            bm("c3^c2", false, K64),
            bm("c5^c3", true, K64),
        ],
        "rmdir c4: c4's bits into c3^c2, c5^c4 renamed c5^c3",
    );
    assert_eq!(
        dirty(d, "m", &top, "c3^c2"),
        blocks(&[&x3, &x4], K64, size),
        "c3^c2 after rmdir c4"
    );
    assert_eq!(
        dirty(d, "m", &top, "c5^c3"),
        blocks(&[&x5], K64, size),
        "c5^c3"
    );
    // A fresh read-only mount agrees.
    let mnt = Mount::new(&top, &mount_dir(d, "ro"), None);
    let n = names(&mnt);
    let tail: Vec<&str> = n.iter().rev().take(2).rev().map(String::as_str).collect();
    assert_eq!(tail, ["c3", "c5"], "checkpoints.json after remount {n:?}");
    assert_eq!(ext(&mnt, "c3"), blocks(&[&x3, &x4, &x5], K64, size));
}

/// The previous checkpoint's bitmap lives only in the base: rmdir renames the deleted bitmap
/// to the previous one's name.
#[test]
fn delta_carets_rmdir_parent_only_below() {
    let t = tempdir();
    let d = t.path();
    let size = 64 * M;
    caret_fixture(d, false);
    let top = d.join("d-top.qcow2");
    let w = [wp(4 * M, K64, 0x71), wp(9 * M + 10, 100, 0x72)];
    {
        let mnt = rw(&top, d, "mnt");
        mkdir_ok(&mnt, "c3");
        write_mount(&mnt, &w);
        assert_eq!(ext(&mnt, "c3"), blocks(&[&w], K64, size), "c3/extents");
        let before: Vec<_> = ["c1", "c2"].iter().map(|c| ext(&mnt, c)).collect();
        rmdir_ok(&mnt, "c3");
        let after: Vec<_> = ["c1", "c2"].iter().map(|c| ext(&mnt, c)).collect();
        assert_eq!(after, before, "since-sets of c1, c2 changed by rmdir c3");
        unmount(mnt);
    }
    assert_check_clean(&top, "parent only below");
    assert_bitmaps(
        &top,
        &[bm("c2^c1", true, K64)],
        "rmdir c3 whose parent c2 has no bitmap in the top: c3^c2 renamed c2^c1",
    );
    assert_eq!(
        dirty(d, "p", &top, "c2^c1"),
        blocks(&[&w], K64, size),
        "c2^c1 in the top"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Delta scheme without carets

#[test]
fn delta_plain_names_mkdir_disables_previous() {
    let t = tempdir();
    let d = t.path();
    let size = 64 * M;
    create(d, "a.qcow2", "64M", "", None);
    qemu_img(d, &["bitmap", "--add", "a.qcow2", "c1"]);
    qemu_io(d, "a.qcow2", &["write 0 64k"]);
    qemu_img(d, &["bitmap", "--disable", "a.qcow2", "c1"]);
    qemu_img(d, &["bitmap", "--add", "a.qcow2", "c2"]);
    qemu_io(d, "a.qcow2", &["write 1M 64k"]);
    let img = d.join("a.qcow2");
    let f0 = [wp(0, K64, 0)];
    let f1 = [wp(M, K64, 0)];
    let w1 = [wp(2 * M, K64, 0x81)];
    let w2 = [wp(3 * M, K64, 0x82)];
    {
        let mnt = rw(&img, d, "mnt1");
        write_mount(&mnt, &w1);
        mkdir_ok(&mnt, "c3");
        write_mount(&mnt, &w2);
        assert_eq!(names(&mnt), ["c1", "c2", "c3"]);
        assert_eq!(ext(&mnt, "c3"), blocks(&[&w2], K64, size), "c3");
        assert_eq!(ext(&mnt, "c2"), blocks(&[&f1, &w1, &w2], K64, size), "c2");
        assert_eq!(
            ext(&mnt, "c1"),
            blocks(&[&f0, &f1, &w1, &w2], K64, size),
            "c1"
        );
        unmount(mnt);
    }
    assert_check_clean(&img, "plain delta mkdir");
    assert_bitmaps(
        &img,
        &[
            bm("c1", false, K64),
            bm("c2", false, K64),
            bm("c3", true, K64),
        ],
        "mkdir c3 in the plain delta scheme: c2 disabled, c3 recording",
    );
    assert_eq!(dirty(d, "a", &img, "c2"), blocks(&[&f1, &w1], K64, size));
    assert_eq!(dirty(d, "a", &img, "c3"), blocks(&[&w2], K64, size));
    {
        let mnt = rw(&img, d, "mnt2");
        let before = ext(&mnt, "c2");
        rmdir_ok(&mnt, "c3");
        assert_eq!(ext(&mnt, "c2"), before, "since(c2) changed by rmdir c3");
        unmount(mnt);
    }
    assert_check_clean(&img, "plain delta rmdir");
    assert_bitmaps(
        &img,
        &[bm("c1", false, K64), bm("c2", true, K64)],
        "rmdir c3 (newest) in the plain delta scheme: merged into c2, which records",
    );
    assert_eq!(
        dirty(d, "b", &img, "c2"),
        blocks(&[&f1, &w1, &w2], K64, size)
    );
}

// ---------------------------------------------------------------------------------------
// 4. Refusals

#[test]
fn mkdir_rmdir_refusals() {
    let t = tempdir();
    let d = t.path();
    create(d, "base.qcow2", "16M", "", None);
    qemu_img(d, &["bitmap", "--add", "base.qcow2", "c1"]);
    qemu_io(d, "base.qcow2", &["write -P 1 0 64k"]);
    qemu_img(d, &["snapshot", "-c", "s1", "base.qcow2"]);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c1"]);
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c2"]);
    let top = d.join("top.qcow2");

    {
        let mnt = Mount::new(&top, &mount_dir(d, "ro"), None);
        assert_errno(mkdir(&mnt, "c9"), libc::EROFS, "mkdir on a read-only mount");
        assert_errno(rmdir(&mnt, "c2"), libc::EROFS, "rmdir on a read-only mount");
    }
    {
        let mnt = rw(&top, d, "rw");
        let root = list_dir(&mnt.dir);
        for n in ["c1", "c2", "s1", "base.qcow2", "current"] {
            assert!(root.contains(&n.to_string()), "{n} missing from {root:?}");
        }
        for n in [
            "c1",
            "c2",
            "current",
            "checkpoints.json",
            "base.qcow2",
            "s1",
        ] {
            assert_errno(mkdir(&mnt, n), libc::EEXIST, &format!("mkdir {n} (exists)"));
        }
        assert_errno(
            mkdir(&mnt, "c2/x"),
            libc::EPERM,
            "mkdir inside a checkpoint dir",
        );
        assert_errno(
            mkdir(&mnt, "current/x"),
            libc::EPERM,
            "mkdir inside current/",
        );
        let long = "a".repeat(1024);
        let r = mkdir(&mnt, &long);
        assert!(r.is_err(), "mkdir of a 1024-byte name must fail");
        assert!(!exists(&mnt.path(&long[..255])));
        assert_errno(
            rmdir(&mnt, "base.qcow2"),
            libc::EPERM,
            "rmdir of a layer checkpoint",
        );
        assert_errno(
            rmdir(&mnt, "s1"),
            libc::EPERM,
            "rmdir of a snapshot checkpoint",
        );
        assert_errno(
            rmdir(&mnt, "c1"),
            libc::EPERM,
            "rmdir of c1 (carried by the base)",
        );
        let r = rmdir(&mnt, "current");
        assert!(r.is_err(), "rmdir current must fail");
        assert!(
            exists(&mnt.path("current/disk.img")),
            "current/ after rmdir current"
        );
        assert_errno(rmdir(&mnt, "nope"), libc::ENOENT, "rmdir of a missing name");
        assert!(
            rmdir(&mnt, "checkpoints.json").is_err(),
            "rmdir checkpoints.json"
        );
        let root2 = list_dir(&mnt.dir);
        assert_eq!(root2, root, "the tree changed after refused operations");
        unmount(mnt);
    }
    assert_check_clean(&top, "after refusals");
    assert_bitmaps(
        &top,
        &[bm("c1", true, K64), bm("c2", true, K64)],
        "after refusals",
    );
    // A top with internal snapshots cannot be mounted rw at all, so rmdir of a snapshot
    // checkpoint is tested with the snapshot in the base (above).
    qemu_img(d, &["snapshot", "-c", "s2", "top.qcow2"]);
    assert!(
        Mount::try_new(&top, &mount_dir(d, "rw2"), Some("rw")).is_err(),
        "rw mount of a top with internal snapshots must be refused"
    );
}

// ---------------------------------------------------------------------------------------
// 5. An image without a bitmaps extension

fn header_u64(image: &Path, off: u64) -> u64 {
    let f = File::open(image).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn info_json(image: &Path) -> serde_json::Value {
    let out = common::run(
        "qemu-img",
        &[
            OsStr::new("info"),
            OsStr::new("--output=json"),
            image.as_os_str(),
        ],
    );
    serde_json::from_slice(&out).expect("qemu-img info json")
}

#[test]
fn first_bitmap_in_fresh_overlay() {
    let t = tempdir();
    let d = t.path();
    let size = 32 * M;
    // A long relative backing name in a subdirectory, 4 KiB clusters in the top (default
    // QEMU granularity would be 4 KiB; ckptfs takes max(cluster, 64 KiB)).
    let sub = format!("sub-{}", "x".repeat(150));
    std::fs::create_dir(d.join(&sub)).unwrap();
    create(&d.join(&sub), "base.qcow2", "32M", "", None);
    qemu_io(&d.join(&sub), "base.qcow2", &["write -P 7 0 32M"]);
    let backing = format!("{sub}/base.qcow2");
    create(
        d,
        "top.qcow2",
        "",
        "cluster_size=4096",
        Some((&backing, "qcow2")),
    );
    let top = d.join("top.qcow2");
    assert_eq!(header_u64(&top, 88) & 1, 0, "fixture: autoclear bit clear");
    let w = [wp(M, K64, 0x91), wp(3 * M + 5, 10, 0x92), wz(5 * M, 8192)];
    {
        let mnt = rw(&top, d, "mnt1");
        mkdir_ok(&mnt, "c1");
        write_mount(&mnt, &w);
        let info = read_json(&mnt.path("c1/info.json"));
        assert_eq!(info["granularity"], K64, "c1/info.json {info}");
        assert_eq!(info["valid"], true, "c1/info.json {info}");
        assert_eq!(ext(&mnt, "c1"), blocks(&[&w], K64, size), "c1/extents");
        unmount(mnt);
    }
    assert_check_clean(&top, "first bitmap");
    assert_bitmaps(&top, &[bm("c1", true, K64)], "mkdir c1 in a fresh overlay");
    assert_eq!(header_u64(&top, 88) & 1, 1, "autoclear bit 0 after mkdir");
    let v = info_json(&top);
    assert_eq!(v["backing-filename"], backing.as_str(), "{v}");
    assert_eq!(v["backing-filename-format"], "qcow2", "{v}");
    assert_eq!(
        dirty(d, "a", &top, "c1"),
        blocks(&[&w], K64, size),
        "bitmap c1"
    );
    // The data: base pattern plus the writes.
    let mut want = vec![7u8; size as usize];
    for x in &w {
        want[x.off as usize..(x.off + x.len) as usize].fill(x.pat.unwrap_or(0));
    }
    common::assert_same(
        &common::truth_raw(&top),
        &want,
        0,
        "top after mkdir + writes",
    );

    // Deleting the only bitmap drops the extension again.
    {
        let mnt = rw(&top, d, "mnt2");
        rmdir_ok(&mnt, "c1");
        assert!(!exists(&mnt.path("c1")));
        unmount(mnt);
    }
    assert_check_clean(&top, "rmdir of the only bitmap");
    assert_bitmaps(&top, &[], "after rmdir c1");
    let v = info_json(&top);
    assert_eq!(v["backing-filename"], backing.as_str(), "{v}");
    common::assert_same(&common::truth_raw(&top), &want, 0, "top after rmdir c1");
}

// ---------------------------------------------------------------------------------------
// 6. kill -9 right after mkdir / rmdir

/// SIGKILL the daemon of `mnt` (by its PID), detach the dead mount.
fn kill9(mnt: Mount) {
    let pid = daemon_pid(&mnt);
    // SAFETY: kill(2) of the ckptfs daemon serving this test's unique mount point.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_pid_gone(pid, ACCESS_TIMEOUT),
        "daemon {pid} survived SIGKILL"
    );
    let _ = run_files(None, "umount", &[OsStr::new("-l"), mnt.dir.as_os_str()]);
    drop(mnt);
}

fn in_use(b: &Bm) -> bool {
    b.flags.iter().any(|f| f == "in-use")
}

#[test]
fn kill9_after_mkdir_and_rmdir() {
    let t = tempdir();
    let d = t.path();
    create(d, "a.qcow2", "16M", "", None);
    qemu_img(d, &["bitmap", "--add", "a.qcow2", "c1"]);
    qemu_io(d, "a.qcow2", &["write -P 1 0 64k"]);
    std::fs::copy(d.join("a.qcow2"), d.join("b.qcow2")).unwrap();

    // mkdir, then kill -9.
    let a = d.join("a.qcow2");
    let mnt = rw(&a, d, "mnt-a");
    write_mount(&mnt, &[wp(M, K64, 2)]);
    mkdir_ok(&mnt, "c2");
    write_mount(&mnt, &[wp(2 * M, K64, 3)]);
    kill9(mnt);
    let (code, out) = check(&a);
    assert!(
        code == Some(0) || code == Some(3),
        "after kill -9 following mkdir: qemu-img check rc {code:?}:\n{out}"
    );
    let l = bitmaps(&a);
    let n: Vec<&str> = l.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        n,
        ["c1", "c2"],
        "mkdir returned, so the new directory must be on disk: {l:?}"
    );
    assert!(
        l.iter().all(in_use),
        "after kill -9 every bitmap stays in use: {l:?}"
    );

    // mkdir c2, mkdir c3, rmdir c3, then kill -9.
    let b = d.join("b.qcow2");
    let mnt = rw(&b, d, "mnt-b");
    mkdir_ok(&mnt, "c2");
    write_mount(&mnt, &[wp(M, K64, 4)]);
    mkdir_ok(&mnt, "c3");
    rmdir_ok(&mnt, "c3");
    kill9(mnt);
    let (code, out) = check(&b);
    assert!(
        code == Some(0) || code == Some(3),
        "after kill -9 following rmdir: qemu-img check rc {code:?}:\n{out}"
    );
    let l = bitmaps(&b);
    let n: Vec<&str> = l.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        n,
        ["c1", "c2"],
        "rmdir returned, so c3 must be gone on disk: {l:?}"
    );
    assert!(
        l.iter().all(in_use),
        "after kill -9 every bitmap stays in use: {l:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4b. Names: the longest QEMU name works; a `^` in a plain mkdir name must not leave a
// checkpoint behind a failed mkdir.

#[test]
fn mkdir_names() {
    let t = tempdir();
    let d = t.path();
    create(d, "a.qcow2", "16M", "", None);
    qemu_img(d, &["bitmap", "--add", "a.qcow2", "c1"]);
    let img = d.join("a.qcow2");
    let long = "n".repeat(1023);
    {
        let mnt = rw(&img, d, "mnt1");
        mkdir_ok(&mnt, &long);
        assert!(
            exists(&mnt.path(&format!("{long}/extents"))),
            "1023-byte name"
        );
        assert!(mkdir(&mnt, &"m".repeat(1024)).is_err(), "1024-byte name");
        unmount(mnt);
    }
    assert_check_clean(&img, "1023-byte name");
    assert_bitmaps(
        &img,
        &[bm("c1", true, K64), bm(&long, true, K64)],
        "mkdir of a 1023-byte name (QEMU's maximum)",
    );

    // `x^y` (on a fresh image): either a checkpoint directory named `x^y`, or a refusal that
    // changes nothing.
    create(d, "b.qcow2", "16M", "", None);
    qemu_img(d, &["bitmap", "--add", "b.qcow2", "c1"]);
    let img = d.join("b.qcow2");
    let mnt = rw(&img, d, "mnt2");
    let before = list_dir(&mnt.dir);
    let r = mkdir(&mnt, "x^y");
    let after = list_dir(&mnt.dir);
    match r {
        Ok(()) => assert!(
            after.contains(&"x^y".to_string()),
            "mkdir x^y succeeded but no directory x^y: {after:?}"
        ),
        Err(e) => {
            unmount(mnt);
            let names: Vec<String> = bitmaps(&img).into_iter().map(|b| b.name).collect();
            assert!(
                after == before && !names.iter().any(|n| n.contains('^')),
                "mkdir x^y failed ({e}) yet changed the tree {before:?} -> {after:?} and \
                 the image's bitmaps are now {names:?}"
            );
        }
    }
}

/// A bitmap table longer than what one refcount block counts (512-byte clusters, 64-bit
/// refcounts: 64 clusters per block; an 8 GiB disk at 512-byte granularity needs a 64-cluster
/// table) cannot be placed as one run past blocks that each new range keeps in its first
/// cluster. mkdir answers ENOSPC without growing the image (the allocator used to place
/// refcount blocks range after range until the refcount table was full: 64 MiB here, far more
/// with larger clusters), and the image still checks clean.
#[test]
fn mkdir_needing_a_run_longer_than_a_refcount_block_fails_at_once() {
    let t = tempdir();
    let d = t.path();
    create(
        d,
        "a.qcow2",
        "8G",
        "cluster_size=512,refcount_bits=64",
        None,
    );
    qemu_img(d, &["bitmap", "--add", "-g", "512", "a.qcow2", "c1"]);
    let a = d.join("a.qcow2");
    let mnt = rw(&a, d, "mnt");
    let before = std::fs::metadata(&a).unwrap().len();
    assert_errno(
        mkdir(&mnt, "c2"),
        libc::ENOSPC,
        "mkdir c2 needing a 64-cluster bitmap table",
    );
    let after = std::fs::metadata(&a).unwrap().len();
    assert!(
        after < before + M,
        "the refused mkdir grew the image from {before} to {after} bytes"
    );
    write_mount(&mnt, &[wp(M, K64, 2)]);
    unmount(mnt);
    assert_check_clean(&a, "after the refused mkdir");
    assert_eq!(
        bitmaps(&a)
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>(),
        ["c1"]
    );
}

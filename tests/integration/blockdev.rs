//! Layers on block devices (loop devices standing in for LVM volumes): a raw base on a device
//! under a qcow2 overlay, a qcow2 top that is itself a device, read-only and read-write, each
//! compared with QEMU (`qemu-img convert`, a twin image written with qemu-io, `qemu-img
//! compare` and `check`); a qcow2 on a device too small for its writes (ENOSPC, nothing lost,
//! nothing leaked); FIFOs, sockets and character devices as layers (refused at once, one
//! line); a backing name that is not UTF-8 (read as QEMU reads it).
//!
//! Harness rules: every loop device is attached by the test and detached by its guard (only
//! those), every mount is owned by a guard that unmounts, every access runs under a timeout.

use crate::common::{self, create, qemu_io, tempdir, varied_data};
use crate::mountutil::*;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const K: u64 = 1024;
const M: u64 = 1 << 20;

/// A loop device this test attached; detached on drop, even when the test fails.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    /// `losetup -f --show FILE` (retried: parallel tests may race for the same free device).
    fn attach(file: &Path) -> Loop {
        let mut last = String::new();
        for _ in 0..10 {
            let out = common::run_status_in(
                None,
                "losetup",
                &[OsStr::new("-f"), OsStr::new("--show"), file.as_os_str()],
            );
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && dev.starts_with("/dev/") {
                return Loop {
                    dev: PathBuf::from(dev),
                };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("losetup -f --show {}: {last}", file.display());
    }

    fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = common::run_status_in(None, "losetup", &[OsStr::new("-d"), self.dev.as_os_str()]);
    }
}

/// `qemu-img convert -f FMT -O raw IMAGE` (the chain as QEMU reads it).
fn qemu_raw(image: &Path, fmt: &str) -> Vec<u8> {
    let d = tempdir();
    let out = d.path().join("truth.raw");
    common::run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-f"),
            OsStr::new(fmt),
            OsStr::new("-O"),
            OsStr::new("raw"),
            image.as_os_str(),
            out.as_os_str(),
        ],
    );
    std::fs::read(&out).unwrap()
}

/// pwrite `data` at `off` into MOUNT/current/disk.img (timed).
fn write_disk(m: &Mount, off: u64, data: Vec<u8>) -> std::io::Result<()> {
    let p = m.path("current/disk.img");
    timed(&format!("write {}+{}", off, data.len()), move || {
        let f = OpenOptions::new().write(true).open(p)?;
        f.write_all_at(&data, off)?;
        f.sync_all()
    })
}

/// `image` (qcow2) equals the twin DIR/twin.qcow2 once the same `writes` (offset, length,
/// byte) are replayed on the twin through qemu-io.
fn assert_matches_twin(dir: &Path, image: &Path, writes: &[(u64, u64, u8)], what: &str) {
    for &(off, len, byte) in writes {
        qemu_io(
            dir,
            "twin.qcow2",
            &[&format!("write -P {byte:#x} {off} {len}")],
        );
    }
    let twin = dir.join("twin.qcow2");
    assert_images_equal((image, "qcow2"), (&twin, "qcow2"), what);
}

/// While mounted, QEMU cannot open the device for writing: the lock bytes hold on a device.
fn assert_qemu_locked_out(dev: &Path, fmt: &str) {
    let out = common::run_status_in(
        None,
        "qemu-io",
        &[
            OsStr::new("-f"),
            OsStr::new(fmt),
            OsStr::new("-c"),
            OsStr::new("write 0 512"),
            dev.as_os_str(),
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && text.contains("lock"),
        "qemu-io should be refused the write lock on mounted {}: {text}",
        dev.display()
    );
}

#[test]
fn raw_base_on_a_loop_device_ro_and_rw() {
    let d = tempdir();
    let dir = d.path();
    // Not a multiple of 512: the loop device ends at the last whole sector, and QEMU sizes the
    // raw layer by the device.
    let base = dir.join("base.raw");
    let data = varied_data((4 * M + 1000) as usize, 0xb10c);
    std::fs::write(&base, &data).unwrap();
    let lo = Loop::attach(&base);
    let dev = s(lo.path()).to_string();
    create(dir, "ov.qcow2", "", "", Some((&dev, "raw")));
    qemu_io(
        dir,
        "ov.qcow2",
        &["write -P 0x11 64k 4k", "write -z 192k 64k"],
    );
    let ov = dir.join("ov.qcow2");
    let twin = dir.join("twin.qcow2");
    std::fs::copy(&ov, &twin).unwrap();
    let device_bytes = std::fs::read(lo.path()).unwrap();
    assert_eq!(device_bytes.len() as u64, 4 * M + 512);

    let mnt = mount_dir(dir, "mnt");
    {
        let m = Mount::new(&ov, &mnt, None);
        let truth = qemu_raw(&ov, "qcow2");
        assert_eq!(truth.len(), device_bytes.len());
        common::assert_same(
            &read(&m.path("current/disk.img")),
            &truth,
            0,
            "current/disk.img over a raw device",
        );
        let info = read_json(&m.path("current/info.json"));
        assert_eq!(
            info["chain"][1]["virtual_size"],
            device_bytes.len() as u64,
            "{info}"
        );
        assert_qemu_locked_out(lo.path(), "raw");
        // The watcher: a write through the device node (the same bytes again) moves the node's
        // mtime, and reads stop rather than mix old and new data.
        let node = OpenOptions::new().write(true).open(lo.path()).unwrap();
        node.write_all_at(&device_bytes[..512], 0).unwrap();
        node.sync_all().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eio(&m.path("current/disk.img"));
        m.unmount();
    }

    // rw: 8 bytes into a cluster only the device holds; the rest of that cluster must be the
    // device's data (copy-on-write), as QEMU's twin has it.
    let at = M + 100;
    {
        let m = Mount::new(&ov, &mnt, Some("rw"));
        write_disk(&m, at, vec![0xa5; 8]).expect("8-byte write into a backing-only cluster");
        m.unmount();
    }
    assert_matches_twin(
        dir,
        &ov,
        &[(at, 8, 0xa5)],
        "overlay written through ckptfs vs qemu-io twin",
    );
    assert_check_clean(&ov, "overlay on a raw device after a write");
    assert!(
        std::fs::read(lo.path()).unwrap() == device_bytes,
        "the backing device was written"
    );
}

#[test]
fn qcow2_top_on_a_loop_device_ro_and_rw() {
    let d = tempdir();
    let dir = d.path();
    let base = dir.join("base.raw");
    std::fs::write(&base, varied_data((8 * M) as usize, 0x70b)).unwrap();
    create(dir, "top.qcow2", "", "", Some((s(&base), "raw")));
    qemu_io(
        dir,
        "top.qcow2",
        &[
            "write -P 0x22 0 64k",
            "write -P 0x33 1m 100k",
            "write -z 3m 64k",
        ],
    );
    let top = dir.join("top.qcow2");
    let twin = dir.join("twin.qcow2");
    std::fs::copy(&top, &twin).unwrap();
    // The device: the image's bytes, then room for the clusters the writes below need.
    let dev_file = dir.join("dev.img");
    std::fs::copy(&top, &dev_file).unwrap();
    let len = std::fs::metadata(&dev_file).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&dev_file)
        .unwrap()
        .set_len((len / M + 2) * M)
        .unwrap();
    let lo = Loop::attach(&dev_file);

    let mnt = mount_dir(dir, "mnt");
    {
        let m = Mount::new(lo.path(), &mnt, None);
        common::assert_same(
            &read(&m.path("current/disk.img")),
            &qemu_raw(lo.path(), "qcow2"),
            0,
            "current/disk.img of a qcow2 on a device",
        );
        assert_qemu_locked_out(lo.path(), "qcow2");
        m.unmount();
    }

    let writes: [(u64, u64, u8); 4] = [
        (5 * M + 7, 8, 0x5a),  // backing-only cluster
        (M + 4 * K, 8, 0x6b),  // allocated cluster, in place
        (6 * M, 64 * K, 0x7c), // a whole new cluster
        (3 * M + 10, 8, 0x8d), // zero cluster
    ];
    {
        let m = Mount::new(lo.path(), &mnt, Some("rw"));
        for &(off, n, b) in &writes {
            write_disk(&m, off, vec![b; n as usize])
                .unwrap_or_else(|e| panic!("write {off}+{n}: {e}"));
        }
        m.unmount();
    }
    assert_matches_twin(
        dir,
        lo.path(),
        &writes,
        "device top written through ckptfs vs qemu-io twin",
    );
    assert_check_clean(lo.path(), "qcow2 on a device after writes");
}

/// A 64 MiB qcow2 (and its twin DIR/twin.qcow2) on a 1 MiB loop device: 16 clusters of
/// 64 KiB, four of them the image's metadata.
fn small_qcow2_device(dir: &Path) -> Loop {
    create(dir, "small.qcow2", "64M", "", None);
    let img = dir.join("small.qcow2");
    std::fs::copy(&img, dir.join("twin.qcow2")).unwrap();
    let dev_file = dir.join("dev.img");
    std::fs::copy(&img, &dev_file).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&dev_file)
        .unwrap()
        .set_len(M)
        .unwrap();
    Loop::attach(&dev_file)
}

/// Writes of `len` bytes of one byte value, `len` (at least 64 KiB) apart from `first`,
/// until one fails, which must be ENOSPC (it takes nothing: its clusters are released); the
/// writes that fitted are added to `done` (offset, length, byte).
fn fill_until_enospc(m: &Mount, done: &mut Vec<(u64, u64, u8)>, len: u64, first: u64) {
    for i in 0..16 {
        let (off, b) = (first + i * len.max(64 * K), 0x10 + done.len() as u8);
        match write_disk(m, off, vec![b; len as usize]) {
            Ok(()) => done.push((off, len, b)),
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOSPC),
                    "write {off}+{len}: {e}"
                );
                return;
            }
        }
    }
    panic!("{len}-byte writes never filled the 1 MiB device");
}

/// The bytes of `done` read back through the mount.
fn assert_writes_kept(m: &Mount, done: &[(u64, u64, u8)]) {
    let disk = read(&m.path("current/disk.img"));
    for &(off, n, b) in done {
        assert!(
            disk[off as usize..(off + n) as usize]
                .iter()
                .all(|&x| x == b),
            "bytes written at {off}+{n} before the device filled up are gone"
        );
    }
}

#[test]
fn qcow2_on_a_full_device_answers_enospc() {
    let d = tempdir();
    let dir = d.path();
    let lo = small_qcow2_device(dir);
    let mnt = mount_dir(dir, "mnt");
    let m = Mount::new(lo.path(), &mnt, Some("rw"));
    // Two-cluster writes until the device is full, then one-cluster ones.
    let mut done: Vec<(u64, u64, u8)> = Vec::new();
    fill_until_enospc(&m, &mut done, 128 * K, 0);
    fill_until_enospc(&m, &mut done, 4 * K, 10 * M);
    assert!(done.len() >= 3, "too few writes fitted: {done:?}");
    assert_writes_kept(&m, &done);
    m.unmount();
    assert_matches_twin(
        dir,
        lo.path(),
        &done,
        "full device vs qemu-io twin of the writes that fitted",
    );
    assert_check_clean(lo.path(), "qcow2 on a full device");
}

/// mkdir MOUNT/NAME (timed).
fn mkdir(m: &Mount, name: &str) -> std::io::Result<()> {
    let p = m.path(name);
    timed(&format!("mkdir {}", p.display()), move || {
        std::fs::create_dir(&p)
    })
}

/// A checkpoint needs two new clusters (bitmap table and directory); with one left on the
/// device, mkdir answers ENOSPC, gives back the one it took, and the checkpoint never appears.
/// A write then takes the last cluster, so c1's bits cannot be stored at unmount: c1 stays
/// in_use (as QEMU leaves it), and nothing leaks.
#[test]
fn mkdir_on_a_full_device_answers_enospc_and_leaks_nothing() {
    let d = tempdir();
    let dir = d.path();
    let lo = small_qcow2_device(dir);
    let mnt = mount_dir(dir, "mnt");
    let m = Mount::new(lo.path(), &mnt, Some("rw"));
    mkdir(&m, "c1").expect("mkdir c1 on an empty device");
    // 10 free clusters: an L2 table and four two-cluster writes leave one.
    let mut done: Vec<(u64, u64, u8)> = Vec::new();
    fill_until_enospc(&m, &mut done, 128 * K, 0);
    let before = read(&m.path("checkpoints.json"));
    let r = mkdir(&m, "c2");
    assert_eq!(
        r.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSPC)),
        "mkdir c2 on a full device: {r:?}"
    );
    assert_eq!(
        read(&m.path("checkpoints.json")),
        before,
        "checkpoints.json changed by a failed mkdir"
    );
    assert!(!exists(&m.path("c2")), "c2 appeared after a failed mkdir");
    // The cluster mkdir gave back holds one more cluster of data, then the device is full.
    fill_until_enospc(&m, &mut done, 4 * K, 10 * M);
    assert_writes_kept(&m, &done);
    m.unmount();
    assert_check_clean(lo.path(), "qcow2 on a full device after a failed mkdir");
    let info = common::run(
        "qemu-img",
        &[
            OsStr::new("info"),
            OsStr::new("-U"),
            OsStr::new("--output=json"),
            lo.path().as_os_str(),
        ],
    );
    let info = String::from_utf8_lossy(&info).into_owned();
    assert!(
        info.contains("\"c1\"") && info.contains("in-use") && !info.contains("\"c2\""),
        "c1 should be left in_use (its bits had no room), c2 absent: {info}"
    );
    assert_matches_twin(
        dir,
        lo.path(),
        &done,
        "full device after a failed mkdir vs qemu-io twin",
    );
}

/// Refused within a few seconds, one line naming the file and what it is.
fn refused_quickly(image: &Path, dir: &Path, opts: Option<&str>, needles: &[&str]) {
    let t = Instant::now();
    expect_refusal(image, dir, opts, needles);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "{}: the refusal took {:?} (a blocking open?)",
        image.display(),
        t.elapsed()
    );
}

#[test]
fn fifo_socket_and_char_device_layers_are_refused() {
    let d = tempdir();
    let dir = d.path();
    let mnt = mount_dir(dir, "mnt");
    let fifo = dir.join("base.fifo");
    common::run("mkfifo", &[fifo.as_os_str()]);
    let sock = dir.join("base.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for (name, backing, needle) in [
        ("over-fifo.qcow2", s(&fifo), "fifo"),
        ("over-sock.qcow2", s(&sock), "socket"),
        ("over-null.qcow2", "/dev/null", "character device"),
    ] {
        // -u: qemu-img must not open the backing file either.
        common::qemu_img(
            dir,
            &[
                "create", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "raw", name, "4M",
            ],
        );
        refused_quickly(&dir.join(name), &mnt, None, &[backing, needle]);
    }
    // The top itself; force_share first asks whether a QEMU holds it for writing.
    refused_quickly(&fifo, &mnt, None, &[s(&fifo), "fifo"]);
    refused_quickly(&fifo, &mnt, Some("ro,force_share"), &[s(&fifo), "fifo"]);
}

#[test]
fn non_utf8_backing_name_mounts_and_reads_like_qemu() {
    let d = tempdir();
    let dir = d.path();
    let name = OsStr::from_bytes(b"base-\xff\xfe.raw");
    std::fs::write(dir.join(name), varied_data((2 * M) as usize, 0xff)).unwrap();
    common::run_in(
        Some(dir),
        "qemu-img",
        &[
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-b"),
            name,
            OsStr::new("-F"),
            OsStr::new("raw"),
            OsStr::new("ov.qcow2"),
        ],
    );
    qemu_io(dir, "ov.qcow2", &["write -P 0x44 128k 64k"]);
    let ov = dir.join("ov.qcow2");
    let mnt = mount_dir(dir, "mnt");
    let m = Mount::new(&ov, &mnt, None);
    common::assert_same(
        &read(&m.path("current/disk.img")),
        &qemu_raw(&ov, "qcow2"),
        0,
        "current/disk.img over a non-UTF-8 backing name",
    );
    let info = read_json(&m.path("current/info.json"));
    assert_eq!(
        info["chain"][0]["backing_file"], "base-\u{fffd}\u{fffd}.raw",
        "{info}"
    );
    m.unmount();
}

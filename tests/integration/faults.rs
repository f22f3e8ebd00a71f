//! EIO from the file under the image. A tiny FUSE filesystem (`FaultFs`, served in this test
//! process) shows one real qcow2 file and fails reads that touch a chosen byte range with EIO,
//! as a bad sector under a dm-error target would. ckptfs mounts the image from there: reads of
//! the guest ranges stored in the bad range must fail with EIO, everything else must read
//! exactly as `qemu-img convert` reads the intact file.

use crate::common::{self, create, qemu_io, tempdir, MapEntry};
use crate::mountutil::*;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, Request,
};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

const FILE_INO: u64 = 2;
const NAME: &str = "image.qcow2";

/// One file, `NAME`, backed by a real file; reads overlapping `[bad_start, bad_end)` fail.
struct FaultFs {
    file: File,
    size: u64,
    bad_start: u64,
    bad_end: u64,
    /// Reads answered with EIO.
    failed: AtomicU64,
}

impl FaultFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.size },
            blocks: self.size.div_ceil(512),
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir { 0o755 } else { 0o644 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

const TTL: Duration = Duration::from_secs(60);

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == NAME {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 | FILE_INO => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // Direct I/O: every pread reaches this filesystem with its own offset and length.
        reply.opened(FileHandle(1), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = offset + u64::from(size);
        if offset < self.bad_end && self.bad_start < end {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return reply.error(Errno::EIO);
        }
        let n = (self.size.saturating_sub(offset)).min(u64::from(size)) as usize;
        let mut buf = vec![0u8; n];
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(_) => reply.error(Errno::EIO),
        }
    }
}

/// A read-only FaultFs mount in this process (unmounted on drop).
fn mount_faultfs(dir: &Path, real: &Path, bad: (u64, u64)) -> fuser::BackgroundSession {
    let file = File::open(real).unwrap();
    let size = file.metadata().unwrap().len();
    let fs = FaultFs {
        file,
        size,
        bad_start: bad.0,
        bad_end: bad.1,
        failed: AtomicU64::new(0),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("faultfs".into()),
        MountOption::Subtype("faultfs".into()),
    ];
    config.n_threads = Some(2);
    fuser::spawn_mount(fs, dir, &config).expect("mount the fault-injecting filesystem")
}

/// Unmount the fault-injecting filesystem, retrying while it is busy for up to 5 s (a fork in
/// another test thread can hold a descriptor on it until its exec), then join its thread.
fn unmount_faultfs(s: fuser::BackgroundSession, dir: &Path) {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let start = std::time::Instant::now();
    loop {
        // SAFETY: umount2 of the test's own faultfs mount point, a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert!(
            e.raw_os_error() == Some(libc::EBUSY)
                && start.elapsed() < std::time::Duration::from_secs(5),
            "umount {}: {e}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    s.join().unwrap();
}

/// Guest ranges whose data lies in host `[h0, h1)` of the top layer, from `qemu-img map`.
fn guest_ranges_in(map: &[MapEntry], h0: u64, h1: u64) -> Vec<(u64, u64)> {
    map.iter()
        .filter(|e| e.depth == 0 && e.data && !e.compressed)
        .filter_map(|e| {
            let off = e.offset?;
            let (s, t) = (off.max(h0), (off + e.length).min(h1));
            (s < t).then(|| (e.start + (s - off), e.start + (t - off)))
        })
        .collect()
}

#[test]
fn eio_from_the_file_under_the_image() {
    let tmp = tempdir();
    let d = tmp.path();
    create(d, "img.qcow2", "8M", "cluster_size=64k", None);
    crate::common::qemu_img(d, &["bitmap", "--add", "img.qcow2", "c1"]);
    qemu_io(
        d,
        "img.qcow2",
        &["write -P 0x31 0 3M", "write -P 0x32 5M 1M"],
    );
    let real = d.join("img.qcow2");
    let truth = common::truth_raw(&real);
    let map = common::qemu_map(&real);
    // The bad range: one data cluster in the middle of the first written run.
    let first = map
        .iter()
        .find(|e| e.data && e.start == 0)
        .and_then(|e| e.offset)
        .expect("guest 0 is allocated");
    let bad = (first + 1024 * 1024, first + 1024 * 1024 + 65536);
    let bad_guest = guest_ranges_in(&map, bad.0, bad.1);
    assert_eq!(bad_guest.iter().map(|r| r.1 - r.0).sum::<u64>(), 65536);

    let faulty_dir = mount_dir(d, "faulty");
    let faulty = mount_faultfs(&faulty_dir, &real, bad);
    let image = faulty_dir.join(NAME);
    let mnt = Mount::new(&image, &mount_dir(d, "mnt"), None);
    let disk = mnt.path("current/disk.img");

    // Every 64 KiB block of the disk: EIO exactly where the data lies in the bad range.
    let (mut ok_blocks, mut eio_blocks) = (0, 0);
    for off in (0..truth.len() as u64).step_by(65536) {
        let inside = bad_guest.iter().any(|&(s, e)| off < e && s < off + 65536);
        match read_at(&disk, off, 65536) {
            Ok(got) => {
                assert!(
                    !inside,
                    "guest {off:#x}: data in the bad range read without error"
                );
                common::assert_same(
                    &got,
                    &truth[off as usize..off as usize + 65536],
                    off,
                    "disk.img over faultfs",
                );
                ok_blocks += 1;
            }
            Err(e) => {
                assert!(inside, "guest {off:#x}: {e} outside the bad range");
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "guest {off:#x}: {e}");
                eio_blocks += 1;
            }
        }
    }
    // changed.img of checkpoint c1 (everything written since): the same.
    let changed = mnt.path("c1/changed.img");
    let (s0, _) = bad_guest[0];
    assert_eio_at(&changed, s0, "c1/changed.img in the bad range");
    let got = read_at(&changed, 5 * 1024 * 1024, 65536).unwrap();
    assert_eq!(
        got,
        vec![0x32; 65536],
        "c1/changed.img outside the bad range"
    );
    // A whole-file copy fails instead of writing a file with a hole of zeros.
    let copy = d.join("copy.raw");
    let r = try_cp_sparse(&disk, &copy);
    assert!(!r.ok, "cp of disk.img over a bad range succeeded: {r:?}");
    assert!(
        r.stderr.contains("Input/output error"),
        "cp should report EIO: {r:?}"
    );
    println!(
        "faults: {ok_blocks} blocks read correctly, {eio_blocks} block(s) EIO over the bad \
         host range {:#x}..{:#x}; cp --sparse=always failed with EIO",
        bad.0, bad.1
    );
    mnt.unmount();
    unmount_faultfs(faulty, &faulty_dir);

    // The bad range over the L2 table: the mount works (L2 tables are read when needed),
    // every read of allocated data fails, and so do the extents (their zero/data split needs
    // the table); the bitmap still reads.
    let b = std::fs::read(&real).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    let e = u64::from_be_bytes(b[l1 as usize..l1 as usize + 8].try_into().unwrap());
    let l2 = e & 0x00ff_ffff_ffff_fe00;
    let faulty = mount_faultfs(&faulty_dir, &real, (l2, l2 + 65536));
    let mnt = Mount::new(&image, &mount_dir(d, "mnt2"), None);
    let disk = mnt.path("current/disk.img");
    for off in [0, 2 * 1024 * 1024, 5 * 1024 * 1024, 7 * 1024 * 1024] {
        assert_eio_at(&disk, off, "disk.img with its L2 table unreadable");
    }
    assert_errno(
        try_read(&mnt.path("c1/extents")),
        libc::EIO,
        "c1/extents with the L2 table unreadable",
    );
    let bits = read(&mnt.path("c1/bitmap.bin"));
    assert!(bits.iter().any(|&x| x != 0), "c1/bitmap.bin reads");
    mnt.unmount();
    unmount_faultfs(faulty, &faulty_dir);
}

/// Open `path` and read `len` bytes at `off`, under the access timeout.
fn read_at(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    timed(&format!("read {} at {off}", path.display()), move || {
        pread_full(&File::open(&p)?, off, len)
    })
}

fn assert_eio_at(path: &Path, off: u64, what: &str) {
    assert_errno(
        read_at(path, off, 4096),
        libc::EIO,
        &format!("{what} at {off:#x}"),
    );
}

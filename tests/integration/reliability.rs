//! Reliability: concurrency, crashes, files changed underneath the mount, permissions and
//! unmount cases, all through the real binary on QEMU-made chains.
//!
//! 1. `concurrent_readers_and_writer`: an rw mount, 8 reader threads (12,000 reads) on every
//!    kind of file and one writer (1,000 ops: pwrite, fallocate); the writer only touches the
//!    first half of the disk, so the second half of disk.img, changed.img, bitmap.bin and
//!    extents must never change, and
//!    first-half reads made while no write is in flight must match the writer's model. After
//!    the unmount, `qemu-img compare` with the model and `qemu-img check`.
//! 2. `kill9_rounds_keep_fsynced_data`: rounds of rw mount, writes with some fsyncs, SIGKILL
//!    at a random point, `umount -l` (50 rounds); check must report at most leaks and every
//!    fsynced byte must be there (others: the old or one of the new values, never anything
//!    else).
//! 3. `changed_underneath_*`: a layer file written or touched behind a mount's back (a busy
//!    reader, an idle ro mount, an rw mount): data reads fail with EIO within ~200 ms, pages
//!    cached before fail too, the JSON files still read.
//! 4. `permissions_*`: a second, unprivileged user (`nobody`, via `setpriv`) against mounts
//!    with and without allow_other/default_permissions; modes, nosuid/nodev.
//! 5. `unmount_*`: busy unmount then `umount -l`, SIGTERM (ro and rw).
//! 6. `truncated_top_gives_eio`: the top image truncated behind a read-only mount: a data
//!    cluster now past the end of the file must read as EIO, never as zeros.
//! 7. `hostile_checkpoint_names_are_file_names`, `memory_bounded_whatever_the_image_claims`.
//!
//! Harness rules (see `mountutil`): every mount is owned by a guard, every access to the
//! mounted tree runs under a timeout, only processes these tests started are killed, by PID.

use crate::common::{self, create, qemu_img, qemu_io, tempdir, Prng};
use crate::mountutil::*;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const K: u64 = 1024;
const M: u64 = 1 << 20;

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate(2) on an fd owned by `f`.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// No readahead on this open file: every read reaches the daemon for exactly its pages.
fn no_readahead(f: &File) {
    // SAFETY: posix_fadvise(2) on an fd owned by `f`.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
}

fn open_timed(p: &Path, write: bool) -> std::io::Result<File> {
    let p = p.to_path_buf();
    timed(&format!("open {}", p.display()), move || {
        OpenOptions::new().read(true).write(write).open(&p)
    })
}

/// Read `[off, off+len)` through an open file (timed).
fn pread_timed(f: &Arc<File>, off: u64, len: usize, what: &str) -> std::io::Result<Vec<u8>> {
    let f = f.clone();
    timed(&format!("{what}: pread {off}+{len}"), move || {
        pread_full(&f, off, len)
    })
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    Prng(seed).fill(&mut b);
    b
}

fn write_file(p: &Path, data: &[u8]) {
    std::fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// The (guest start, length, host offset) of every data extent `qemu-img map` reports in the
/// top layer itself (depth 0).
fn top_data_extents(image: &Path) -> Vec<(u64, u64, u64)> {
    common::qemu_map(image)
        .into_iter()
        .filter(|e| e.depth == 0 && e.data && !e.compressed)
        .map(|e| (e.start, e.length, e.offset.expect("host offset")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Concurrency stress

type Ranges = Vec<(u64, u64)>;

/// The writer's progress, as readers see it: an op is in flight while `started != finished`;
/// the model is updated before `finished` moves.
struct Shared {
    /// The disk's size; the writer writes only below `half`.
    size: u64,
    half: u64,
    model: Mutex<Vec<u8>>,
    started: AtomicU64,
    finished: AtomicU64,
    writer_done: AtomicBool,
}

#[derive(Debug, Default, Clone, Copy)]
struct ReaderCounts {
    reads: u64,
    bytes: u64,
    disk: u64,
    disk_first_half_verified: u64,
    changed: u64,
    bitmap: u64,
    extents: u64,
    json: u64,
}

/// What must not change in the second half of a checkpoint's files while the writer writes
/// the first half.
#[derive(Clone)]
struct CkptBaseline {
    dir: String,
    gran: u64,
    changed_tail: Vec<u8>,
    bitmap: Vec<u8>,
    /// (data ranges, zero ranges) of `extents`, clipped to the second half.
    extents_tail: (Ranges, Ranges),
}

fn extents_by_kind(text: &str, from: u64, to: u64, what: &str) -> (Ranges, Ranges) {
    let ext = parse_extents(text, what);
    for w in ext.windows(2) {
        assert!(
            w[0].off + w[0].len <= w[1].off,
            "{what}: extents unsorted or overlapping: {:?} {:?}",
            w[0],
            w[1]
        );
    }
    let clip = |zero: bool| {
        let r: Vec<(u64, u64)> = ext
            .iter()
            .filter(|e| e.zero == zero)
            .map(|e| (e.off, e.off + e.len))
            .collect();
        intersect(&merge(r), &[(from, to)])
    };
    (clip(false), clip(true))
}

fn baseline(mnt: &Mount, dir: &str, half: u64, size: u64) -> CkptBaseline {
    let info = read_json(&mnt.path(&format!("{dir}/info.json")));
    assert_eq!(
        info["valid"], true,
        "checkpoint {dir} should be valid: {info}"
    );
    let gran = info["granularity"].as_u64().expect("granularity");
    let changed = read(&mnt.path(&format!("{dir}/changed.img")));
    assert_eq!(changed.len() as u64, size, "{dir}/changed.img size");
    let bitmap = read(&mnt.path(&format!("{dir}/bitmap.bin")));
    let ext = read_text(&mnt.path(&format!("{dir}/extents")));
    CkptBaseline {
        dir: dir.to_string(),
        gran,
        changed_tail: changed[half as usize..].to_vec(),
        bitmap,
        extents_tail: extents_by_kind(&ext, half, size, dir),
    }
}

/// One reader: `ops` operations on random files; returns counts or the first problem.
fn reader_loop(
    root: PathBuf,
    shared: Arc<Shared>,
    ckpts: Arc<Vec<CkptBaseline>>,
    initial_tail: Arc<Vec<u8>>,
    seed: u64,
    ops: u64,
) -> Result<ReaderCounts, String> {
    let (half, size) = (shared.half, shared.size);
    let mut rng = Prng(seed);
    let mut c = ReaderCounts::default();
    let disk = root.join("current/disk.img");
    for i in 0..ops {
        let pick = rng.range(0, 99);
        c.reads += 1;
        if pick < 50 {
            // disk.img: a random range; second half exact, first half exact when quiet.
            let len = if rng.range(0, 9) == 0 {
                rng.range(256 * K, 2 * M)
            } else {
                rng.range(1, 256 * K)
            };
            let off = rng.range(0, size - 1);
            let s1 = shared.started.load(Ordering::SeqCst);
            let f1 = shared.finished.load(Ordering::SeqCst);
            let quiet = s1 == f1;
            let want_head = if quiet && off < half {
                let end = (off + len).min(half);
                Some(shared.model.lock().unwrap()[off as usize..end as usize].to_vec())
            } else {
                None
            };
            let f = File::open(&disk).map_err(|e| format!("read {i}: open disk.img: {e}"))?;
            let got = pread_full(&f, off, len as usize)
                .map_err(|e| format!("read {i}: disk.img {off}+{len}: {e}"))?;
            drop(f);
            let s2 = shared.started.load(Ordering::SeqCst);
            let want_len = (size - off).min(len);
            if got.len() as u64 != want_len {
                return Err(format!(
                    "read {i}: disk.img {off}+{len} returned {} bytes, expected {want_len}",
                    got.len()
                ));
            }
            let end = off + want_len;
            if end > half {
                let from = off.max(half);
                let g = &got[(from - off) as usize..];
                let w = &initial_tail[(from - half) as usize..(end - half) as usize];
                if g != w {
                    let k = g.iter().zip(w).position(|(a, b)| a != b).unwrap();
                    return Err(format!(
                        "read {i}: disk.img {off}+{len}: the untouched second half differs at \
                         guest offset {} (got {:#04x}, want {:#04x})",
                        from + k as u64,
                        g[k],
                        w[k]
                    ));
                }
            }
            if let Some(w) = want_head {
                if s2 == s1 {
                    let g = &got[..w.len()];
                    if g != &w[..] {
                        let k = g.iter().zip(&w).position(|(a, b)| a != b).unwrap();
                        return Err(format!(
                            "read {i}: disk.img {off}+{len} made while no write was in flight \
                             (after {f1} writer ops) differs from the model at guest offset {} \
                             (got {:#04x}, want {:#04x})",
                            off + k as u64,
                            g[k],
                            w[k]
                        ));
                    }
                    c.disk_first_half_verified += 1;
                }
            }
            c.disk += 1;
            c.bytes += got.len() as u64;
            continue;
        }
        let ck = &ckpts[rng.range(0, ckpts.len() as u64 - 1) as usize];
        if pick < 70 {
            let len = rng.range(1, 512 * K);
            let off = rng.range(0, size - 1);
            let p = root.join(format!("{}/changed.img", ck.dir));
            let f = File::open(&p).map_err(|e| format!("read {i}: open {}: {e}", p.display()))?;
            let got = pread_full(&f, off, len as usize)
                .map_err(|e| format!("read {i}: {} {off}+{len}: {e}", p.display()))?;
            let end = off + got.len() as u64;
            if got.len() as u64 != (size - off).min(len) {
                return Err(format!("read {i}: {} {off}+{len}: short read", p.display()));
            }
            if end > half {
                let from = off.max(half);
                let g = &got[(from - off) as usize..];
                let w = &ck.changed_tail[(from - half) as usize..(end - half) as usize];
                if g != w {
                    let k = g.iter().zip(w).position(|(a, b)| a != b).unwrap();
                    return Err(format!(
                        "read {i}: {}/changed.img {off}+{len}: second half changed at {} \
                         (got {:#04x}, was {:#04x})",
                        ck.dir,
                        from + k as u64,
                        g[k],
                        w[k]
                    ));
                }
            }
            c.changed += 1;
            c.bytes += got.len() as u64;
        } else if pick < 80 {
            let p = root.join(format!("{}/bitmap.bin", ck.dir));
            let got = std::fs::read(&p).map_err(|e| format!("read {i}: {}: {e}", p.display()))?;
            if got.len() != ck.bitmap.len() {
                return Err(format!(
                    "read {i}: {}/bitmap.bin is {} bytes, was {}",
                    ck.dir,
                    got.len(),
                    ck.bitmap.len()
                ));
            }
            // Byte i covers blocks 8i..8i+8: the bytes wholly in the second half are fixed.
            let first = (half / ck.gran).div_ceil(8) as usize;
            if got[first..] != ck.bitmap[first..] {
                return Err(format!(
                    "read {i}: {}/bitmap.bin: second-half bits changed",
                    ck.dir
                ));
            }
            c.bitmap += 1;
            c.bytes += got.len() as u64;
        } else if pick < 90 {
            let p = root.join(format!("{}/extents", ck.dir));
            let got = std::fs::read(&p).map_err(|e| format!("read {i}: {}: {e}", p.display()))?;
            let text = String::from_utf8(got).map_err(|e| format!("{}: {e}", p.display()))?;
            let tail = std::panic::catch_unwind(|| extents_by_kind(&text, half, size, &ck.dir))
                .map_err(|_| format!("read {i}: {}/extents malformed:\n{text}", ck.dir))?;
            if tail != ck.extents_tail {
                return Err(format!(
                    "read {i}: {}/extents: second-half runs changed: {tail:?}, were {:?}",
                    ck.dir, ck.extents_tail
                ));
            }
            c.extents += 1;
            c.bytes += text.len() as u64;
        } else {
            let rel = match rng.range(0, 3) {
                0 => "checkpoints.json".to_string(),
                1 => "stats.json".to_string(),
                2 => "current/info.json".to_string(),
                _ => format!("{}/info.json", ck.dir),
            };
            let p = root.join(&rel);
            let got = std::fs::read(&p).map_err(|e| format!("read {i}: {rel}: {e}"))?;
            serde_json::from_slice::<serde_json::Value>(&got)
                .map_err(|e| format!("read {i}: {rel}: bad JSON: {e}"))?;
            c.json += 1;
            c.bytes += got.len() as u64;
        }
    }
    Ok(c)
}

#[derive(Debug, Default, Clone, Copy)]
struct WriterCounts {
    writes: u64,
    zeroes: u64,
    fsyncs: u64,
    bytes: u64,
}

fn writer_loop(
    disk: PathBuf,
    shared: Arc<Shared>,
    half: u64,
    seed: u64,
    ops: u64,
) -> Result<WriterCounts, String> {
    let mut rng = Prng(seed);
    let mut c = WriterCounts::default();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .map_err(|e| format!("open disk.img for writing: {e}"))?;
    for i in 0..ops {
        let len = if rng.range(0, 9) == 0 {
            rng.range(128 * K, 1024 * K)
        } else {
            rng.range(1, 128 * K)
        };
        let off = rng.range(0, half - len);
        let kind = rng.range(0, 99);
        shared.started.fetch_add(1, Ordering::SeqCst);
        let (r, data) = if kind < 85 {
            let data = random_bytes(
                seed ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                len as usize,
            );
            (f.write_all_at(&data, off), data)
        } else {
            let mode = if kind < 92 {
                libc::FALLOC_FL_ZERO_RANGE
            } else {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            };
            (fallocate(&f, mode, off, len), vec![0u8; len as usize])
        };
        if let Err(e) = r {
            return Err(format!(
                "writer op {i} ({} at {off}+{len}): {e}",
                if kind < 85 { "pwrite" } else { "fallocate" }
            ));
        }
        shared.model.lock().unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
        shared.finished.fetch_add(1, Ordering::SeqCst);
        if kind < 85 {
            c.writes += 1;
        } else {
            c.zeroes += 1;
        }
        c.bytes += len;
        if i % 50 == 49 {
            f.sync_all()
                .map_err(|e| format!("fsync after op {i}: {e}"))?;
            c.fsyncs += 1;
        }
        // Quiet windows, so readers can check the first half exactly now and then.
        std::thread::sleep(Duration::from_micros(rng.range(0, 3000)));
    }
    Ok(c)
}

#[test]
fn concurrent_readers_and_writer() {
    let t = tempdir();
    let d = t.path();
    let size = 16 * M;
    let half = size / 2;
    write_file(&d.join("r1.bin"), &random_bytes(1, 3 * M as usize));
    write_file(&d.join("r2.bin"), &random_bytes(2, 2 * M as usize));
    create(d, "base.qcow2", "16M", "", None);
    qemu_io(
        d,
        "base.qcow2",
        &[
            "write -s r1.bin 0 3M",
            "write -P 0x22 5M 2M",
            "write -s r1.bin 9M 3M",
            "write -z 12M 1M",
            "write -P 0x33 14M 1M",
        ],
    );
    qemu_img(d, &["bitmap", "--add", "base.qcow2", "c1"]);
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 0x44 2M 512k", "write -P 0x55 9M 256k"],
    );
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c1"]);
    qemu_io(
        d,
        "top.qcow2",
        &[
            "write -s r2.bin 1M 1M",
            "write -P 0x77 10M 64k",
            "write -z 13M 128k",
        ],
    );
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c2"]);
    qemu_io(
        d,
        "top.qcow2",
        &["write -P 0x88 3M 100k", "write -s r2.bin 11M 300k"],
    );
    let top = d.join("top.qcow2");
    let initial = common::truth_raw(&top);
    assert_eq!(initial.len() as u64, size);

    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), Some("rw"));
    let cj = read_json(&mnt.path("checkpoints.json"));
    let names = ckpt_names(&cj);
    let dirs: Vec<String> = list_dir(&mnt.dir)
        .into_iter()
        .filter(|n| !["current", "checkpoints.json", "stats.json"].contains(&n.as_str()))
        .collect();
    assert!(
        dirs.len() >= 3,
        "expected c1, c2 and the base layer checkpoint, got {dirs:?} ({names:?})"
    );
    let ckpts: Arc<Vec<CkptBaseline>> =
        Arc::new(dirs.iter().map(|n| baseline(&mnt, n, half, size)).collect());
    let shared = Arc::new(Shared {
        size,
        half,
        model: Mutex::new(initial.clone()),
        started: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        writer_done: AtomicBool::new(false),
    });
    let tail = Arc::new(initial[half as usize..].to_vec());

    const READERS: u64 = 8;
    const READS_EACH: u64 = 1500;
    const WRITES: u64 = 1000;
    let start = Instant::now();
    let writer = {
        let (disk, sh) = (mnt.path("current/disk.img"), shared.clone());
        std::thread::spawn(move || {
            let r = writer_loop(disk, sh.clone(), half, 0xabcd_0001, WRITES);
            sh.writer_done.store(true, Ordering::SeqCst);
            r
        })
    };
    let readers: Vec<_> = (0..READERS)
        .map(|k| {
            let (root, sh, ck, tl) = (mnt.dir.clone(), shared.clone(), ckpts.clone(), tail.clone());
            std::thread::spawn(move || reader_loop(root, sh, ck, tl, 0x1234_0000 + k, READS_EACH))
        })
        .collect();
    let limit = Duration::from_secs(100);
    while !(writer.is_finished() && readers.iter().all(|r| r.is_finished())) {
        assert!(
            start.elapsed() < limit,
            "stress: threads still running after {limit:?} (hung filesystem?); writer done: {}, \
             writer ops finished: {}",
            shared.writer_done.load(Ordering::SeqCst),
            shared.finished.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = start.elapsed();
    let wc = writer.join().expect("writer thread panicked");
    let mut total = ReaderCounts::default();
    let mut errors = Vec::new();
    for (k, r) in readers.into_iter().enumerate() {
        match r.join().expect("reader thread panicked") {
            Ok(c) => {
                total.reads += c.reads;
                total.bytes += c.bytes;
                total.disk += c.disk;
                total.disk_first_half_verified += c.disk_first_half_verified;
                total.changed += c.changed;
                total.bitmap += c.bitmap;
                total.extents += c.extents;
                total.json += c.json;
            }
            Err(e) => errors.push(format!("reader {k}: {e}")),
        }
    }
    println!(
        "stress: {elapsed:?}; readers {total:?}; writer {wc:?}",
        wc = wc.as_ref().map(|c| *c)
    );
    assert!(
        errors.is_empty(),
        "stress: reader failures:\n{}",
        errors.join("\n")
    );
    let wc = wc.unwrap_or_else(|e| panic!("stress: writer failed: {e}"));
    assert_eq!(total.reads, READERS * READS_EACH);
    assert_eq!(wc.writes + wc.zeroes, WRITES);

    // The files still agree with the model at the end, through the mount.
    let got = read(&mnt.path("current/disk.img"));
    let model = shared.model.lock().unwrap().clone();
    common::assert_same(&got, &model, 0, "disk.img after the stress run");
    mnt.unmount();

    assert_image_equals_model(&model, &top, "after the stress run");
    assert_check_clean(&top, "after the stress run");
    assert_bitmaps_stored(&top, "after the stress run");
}

// ---------------------------------------------------------------------------------------
// 2. kill -9 rounds

#[derive(Debug, Clone)]
struct CrashOp {
    off: u64,
    len: u64,
    /// None: zeros (fallocate); Some(seed): random bytes.
    data: Option<u64>,
    punch: bool,
    fsync_after: bool,
}

impl CrashOp {
    fn bytes(&self) -> Vec<u8> {
        match self.data {
            Some(seed) => random_bytes(seed, self.len as usize),
            None => vec![0u8; self.len as usize],
        }
    }
}

/// The writer's record: ops attempted, ops completed, ops made durable by an fsync.
#[derive(Default)]
struct CrashLog {
    attempted: AtomicU64,
    completed: AtomicU64,
    durable: AtomicU64,
}

fn crash_writer(disk: PathBuf, ops: Vec<CrashOp>, log: Arc<CrashLog>) -> String {
    let f = match OpenOptions::new().read(true).write(true).open(&disk) {
        Ok(f) => f,
        Err(e) => return format!("open: {e}"),
    };
    for (i, op) in ops.iter().enumerate() {
        log.attempted.store(i as u64 + 1, Ordering::SeqCst);
        let r = match op.data {
            Some(_) => f.write_all_at(&op.bytes(), op.off),
            None => {
                let mode = if op.punch {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                fallocate(&f, mode, op.off, op.len)
            }
        };
        if let Err(e) = r {
            return format!("op {i}: {e}");
        }
        log.completed.store(i as u64 + 1, Ordering::SeqCst);
        if op.fsync_after {
            if let Err(e) = f.sync_all() {
                return format!("fsync after op {i}: {e}");
            }
            log.durable.store(i as u64 + 1, Ordering::SeqCst);
        }
    }
    "finished".into()
}

/// After a crash: bytes outside every not-durable op must equal `certain`; bytes inside must
/// be `certain`'s value or the value one of those ops wrote there.
fn verify_crash(got: &[u8], certain: &[u8], uncertain: &[CrashOp], what: &str) {
    assert_eq!(got.len(), certain.len(), "{what}: size");
    let mut covered = vec![false; got.len()];
    let datas: Vec<Vec<u8>> = uncertain.iter().map(|o| o.bytes()).collect();
    for o in uncertain {
        covered[o.off as usize..(o.off + o.len) as usize].fill(true);
    }
    for i in 0..got.len() {
        if got[i] == certain[i] {
            continue;
        }
        if covered[i] {
            let ok = uncertain.iter().zip(&datas).any(|(o, dt)| {
                (o.off..o.off + o.len).contains(&(i as u64)) && dt[i - o.off as usize] == got[i]
            });
            if ok {
                continue;
            }
            panic!(
                "{what}: guest byte {i} reads {:#04x}: neither the durable value {:#04x} nor a \
                 value any unsynced write put there ({:?})",
                got[i],
                certain[i],
                uncertain
                    .iter()
                    .filter(|o| (o.off..o.off + o.len).contains(&(i as u64)))
                    .collect::<Vec<_>>()
            );
        }
        panic!(
            "{what}: fsynced/untouched guest byte {i} reads {:#04x}, expected {:#04x}",
            got[i], certain[i]
        );
    }
}

#[test]
fn kill9_rounds_keep_fsynced_data() {
    let t = tempdir();
    let d = t.path();
    let size = 32 * M;
    create(d, "base.qcow2", &size.to_string(), "", None);
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 0x11 0 12M", "write -P 0x12 20M 4M"],
    );
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c1"]);
    let top = d.join("top.qcow2");
    let mut disk_now = common::truth_raw(&top);
    let mnt_dir = mount_dir(d, "mnt");
    let mut rng = Prng(0x6b69_6c6c_0009);
    let start = Instant::now();
    const ROUNDS: usize = 50;
    let (mut rounds, mut bytes_written, mut bytes_fsynced, mut bytes_landed) =
        (0, 0u64, 0u64, 0u64);
    let (mut leaks_rounds, mut ops_total, mut killed_mid) = (0, 0u64, 0);
    for round in 0..ROUNDS {
        let what = format!("kill -9 round {round}");
        let nops = rng.range(3, 20) as usize;
        let ops: Vec<CrashOp> = (0..nops)
            .map(|_| {
                let len = if rng.range(0, 4) == 0 {
                    rng.range(256 * K, 2 * M)
                } else {
                    rng.range(1, 200 * K)
                };
                let off = rng.range(0, size - len);
                let kind = rng.range(0, 9);
                CrashOp {
                    off,
                    len,
                    data: (kind < 8).then(|| rng.next()),
                    punch: kind == 9,
                    fsync_after: rng.range(0, 2) == 0,
                }
            })
            .collect();
        let kill_after = rng.range(0, nops as u64);
        let extra_us = rng.range(0, 3000);

        let log_path = d.join("ckptfs.log");
        let mut mnt = Mount::foreground(&top, &mnt_dir, Some("rw"), &log_path);
        let pid = mnt.child_pid().unwrap();
        let log = Arc::new(CrashLog::default());
        let writer = {
            let (disk, ops, log) = (mnt.path("current/disk.img"), ops.clone(), log.clone());
            std::thread::spawn(move || crash_writer(disk, ops, log))
        };
        let t0 = Instant::now();
        while log.completed.load(Ordering::SeqCst) < kill_after && !writer.is_finished() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{what}: the writer made no progress in 30 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_micros(extra_us));
        // SAFETY: kill(2) of the ckptfs -f child this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let st = mnt.wait_child(ACCESS_TIMEOUT);
        assert!(
            !st.success(),
            "{what}: ckptfs exited successfully before the SIGKILL? {st}"
        );
        let outcome = timed(&format!("{what}: writer"), move || writer.join().unwrap());
        let r = run_files(None, "umount", &[OsStr::new("-l"), mnt.dir.as_os_str()]);
        assert!(r.ok || !is_mounted(&mnt.dir), "{what}: umount -l: {r:?}");
        assert!(
            !is_mounted(&mnt.dir),
            "{what}: still mounted after umount -l"
        );
        drop(mnt);

        let attempted = log.attempted.load(Ordering::SeqCst) as usize;
        let completed = log.completed.load(Ordering::SeqCst) as usize;
        let durable = log.durable.load(Ordering::SeqCst) as usize;
        if outcome != "finished" {
            killed_mid += 1;
        }
        let (code, out) = check(&top);
        assert!(
            code == Some(0) || code == Some(3),
            "{what}: after kill -9 qemu-img check must report at most leaks (exit 0 or 3), got \
             {code:?} (writer: {outcome}; ops attempted {attempted}, durable {durable}):\n{out}"
        );
        if code == Some(3) {
            leaks_rounds += 1;
        }
        let mut certain = disk_now.clone();
        for o in &ops[..durable] {
            certain[o.off as usize..(o.off + o.len) as usize].copy_from_slice(&o.bytes());
        }
        let got = common::truth_raw(&top);
        verify_crash(&got, &certain, &ops[durable..attempted], &what);
        bytes_written += ops[..completed].iter().map(|o| o.len).sum::<u64>();
        bytes_fsynced += ops[..durable].iter().map(|o| o.len).sum::<u64>();
        bytes_landed += ops[durable..attempted].iter().map(|o| o.len).sum::<u64>();
        ops_total += completed as u64;
        if round == 0 {
            for (name, flags) in bitmap_flags(&top) {
                assert!(
                    flags.iter().any(|f| f == "in-use"),
                    "{what}: bitmap {name} should stay in use after kill -9: {flags:?}"
                );
            }
        }
        disk_now = got;
        rounds += 1;
    }
    println!(
        "kill -9: {rounds} rounds in {:?}; {ops_total} ops completed, {bytes_written} bytes \
         written, {bytes_fsynced} bytes fsynced (all verified), {bytes_landed} bytes in \
         unsynced ops (old or new value verified); {killed_mid} rounds killed mid-run; \
         {leaks_rounds} rounds with leaks (check exit 3)",
        start.elapsed()
    );
    assert_eq!(rounds, ROUNDS);
}

// ---------------------------------------------------------------------------------------
// 3. Changed underneath

/// Reads of never-read 4 KiB pages of `disk` in a loop (no readahead), from `first_page` on;
/// stops at the first error (returned with its time) or when `stop` is set.
fn page_reader(
    disk: PathBuf,
    first_page: u64,
    pages: u64,
    stop: Arc<AtomicBool>,
) -> (u64, Option<(Instant, std::io::Error, u64)>) {
    let f = File::open(&disk).expect("open disk.img");
    no_readahead(&f);
    let mut n = 0;
    for p in first_page..first_page + pages {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut b = vec![0u8; 4096];
        if let Err(e) = f.read_exact_at(&mut b, p * 4096) {
            return (n, Some((Instant::now(), e, p)));
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    (n, None)
}

fn assert_json_files_read(mnt: &Mount, ckpt_dir: &str, what: &str) {
    for rel in [
        "stats.json".to_string(),
        "checkpoints.json".to_string(),
        "current/info.json".to_string(),
        format!("{ckpt_dir}/info.json"),
    ] {
        let p = mnt.path(&rel);
        let t = try_read(&p).unwrap_or_else(|e| panic!("{what}: {rel} must still read: {e}"));
        serde_json::from_slice::<serde_json::Value>(&t)
            .unwrap_or_else(|e| panic!("{what}: {rel}: bad JSON: {e}"));
    }
    let _ = metadata(&mnt.path("current/disk.img"));
    assert!(list_dir(&mnt.dir).contains(&"current".to_string()));
}

struct Changed {
    _t: tempfile::TempDir,
    d: PathBuf,
    top: PathBuf,
    base: PathBuf,
    truth: Vec<u8>,
}

/// base (16 MiB of random data) <- top (0x5a at 8M..9M).
fn changed_fixture() -> Changed {
    let t = tempdir();
    let d = t.path().to_path_buf();
    let size = 16 * M;
    write_file(&d.join("r.bin"), &random_bytes(3, size as usize));
    create(&d, "base.qcow2", "16M", "", None);
    qemu_io(&d, "base.qcow2", &["write -s r.bin 0 16M"]);
    create(&d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_io(&d, "top.qcow2", &["write -P 0x5a 8M 1M"]);
    let top = d.join("top.qcow2");
    let base = d.join("base.qcow2");
    let truth = common::truth_raw(&top);
    Changed {
        _t: t,
        d,
        top,
        base,
        truth,
    }
}

/// The backing file written behind a read-only mount's back while a reader keeps reading
/// (every ~2 ms): reads must fail with EIO within ~200 ms.
#[test]
fn changed_underneath_busy_reader() {
    let Changed {
        _t,
        d,
        top,
        base,
        truth,
    } = changed_fixture();
    let d = &d;
    // Host offset of guest 0 in the base (visible through the top: the top holds 8M..9M only).
    let base_map = top_data_extents(&base);
    let (_, _, host0) = *base_map
        .iter()
        .find(|e| e.0 == 0)
        .expect("base data at guest 0");

    // --- (a) the backing file written behind a read-only mount's back, readers busy.
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-a"), None);
    let disk = mnt.path("current/disk.img");
    let f = Arc::new(open_timed(&disk, false).unwrap());
    no_readahead(&f);
    for off in [5 * M, 9 * M + 4096, 15 * M] {
        let got = pread_timed(&f, off, 4096, "before").unwrap();
        common::assert_same(
            &got,
            &truth[off as usize..off as usize + 4096],
            off,
            "before the change",
        );
    }
    // A reader keeps reading fresh pages (1M..8M), so the freshness check runs all the time.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || page_reader(disk, 256, 1792, stop))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reader.is_finished(), "the page reader stopped early");
    let t0 = Instant::now();
    {
        let w = OpenOptions::new().write(true).open(&base).unwrap();
        w.write_all_at(&[0xee; 16], host0 + 100).unwrap();
    }
    while !reader.is_finished() && t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    let (pages_ok, first_err) = timed("page reader", move || reader.join().unwrap());
    let (when, err, page) = first_err.unwrap_or_else(|| {
        panic!(
            "(a): no read failed within 1 s after the backing file was written, while a reader \
             read a fresh 4 KiB page every ~2 ms ({pages_ok} pages read in all, the last ones \
             after the change); expected EIO within ~200 ms"
        )
    });
    let latency = when.duration_since(t0);
    println!(
        "changed underneath: first EIO {latency:?} after the write (page {page}, \
         {pages_ok} pages read before)"
    );
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EIO),
        "(a): page {page}: {err}"
    );
    assert!(
        latency <= Duration::from_millis(250),
        "(a): the change was noticed only after {latency:?} (expected ~200 ms at most)"
    );
    // Every data read now fails, including the modified bytes and fresh pages everywhere.
    for off in [0, 100 * 4096, 9 * M, 12 * M + 8192] {
        assert_errno(
            pread_timed(&f, off, 4096, "after"),
            libc::EIO,
            &format!("(a) disk.img at {off} after the backing changed"),
        );
    }
    let other = mnt.path("current/disk.img");
    assert_errno(
        try_read(&other),
        libc::EIO,
        "(a) a fresh read of all of disk.img",
    );
    assert_errno(
        try_read(&mnt.path("base.qcow2/disk.img")),
        libc::EIO,
        "(a) base.qcow2/disk.img (the changed layer)",
    );
    // Pages the kernel cached before the change (read at the start, kept across opens) are
    // dropped once the change is noticed: reading them again through the same descriptor
    // fails too, instead of serving what the page cache still holds.
    for off in [5 * M, 9 * M + 4096, 15 * M] {
        let t = Instant::now();
        let r = loop {
            let r = pread_timed(&f, off, 4096, "(a) cached page");
            if r.is_err() || t.elapsed() > Duration::from_secs(1) {
                break r;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_errno(
            r,
            libc::EIO,
            &format!("(a) page at {off}, cached before the change"),
        );
    }
    assert_json_files_read(&mnt, "base.qcow2", "(a)");
    drop(f);
    mnt.unmount();
}

/// The top touched (mtime only) behind an idle read-only mount's back.
#[test]
fn changed_underneath_touch_top() {
    let Changed { _t, d, top, .. } = changed_fixture();
    let d = &d;
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-b"), None);
    let f = Arc::new(open_timed(&mnt.path("current/disk.img"), false).unwrap());
    no_readahead(&f);
    let got = pread_timed(&f, 8 * M, 4096, "(b) before").unwrap();
    assert_eq!(got, vec![0x5a; 4096]);
    // Idle: no read for 150 ms before the change (the busy case is the test above).
    std::thread::sleep(Duration::from_millis(150));
    common::run("touch", &[top.as_os_str()]);
    let t0 = Instant::now();
    let mut first = None;
    for k in 1..100u64 {
        match pread_timed(&f, 8 * M + k * 8192, 4096, "(b) after") {
            Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                first = Some((t0.elapsed(), e));
                break;
            }
        }
    }
    let (latency, e) = first.expect("(b): reads after touching the top never failed");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "(b): {e}");
    assert!(
        latency <= Duration::from_millis(250),
        "(b): noticed after {latency:?}"
    );
    assert_json_files_read(&mnt, "base.qcow2", "(b)");
    drop(f);
    mnt.unmount();
}

/// An rw mount: the backing file touched; reads of current/disk.img fail too.
#[test]
fn changed_underneath_rw_backing_touched() {
    let Changed {
        _t, d, top, base, ..
    } = changed_fixture();
    let d = &d;
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-c"), Some("rw"));
    let f = Arc::new(open_timed(&mnt.path("current/disk.img"), false).unwrap());
    no_readahead(&f);
    pread_timed(&f, 3 * M, 4096, "(c) before").unwrap();
    common::run("touch", &[base.as_os_str()]);
    std::thread::sleep(Duration::from_millis(200));
    assert_errno(
        pread_timed(&f, 4 * M, 4096, "(c) after"),
        libc::EIO,
        "(c) rw mount, backing touched",
    );
    assert_json_files_read(&mnt, "base.qcow2", "(c)");
    drop(f);
    mnt.unmount();
}

// ---------------------------------------------------------------------------------------
// 4. Permissions

/// Every entry of the tree: (relative path, st_mode), walked as root.
fn walk_modes(root: &Path) -> Vec<(String, u32, u32)> {
    let root = root.to_path_buf();
    timed("walk the tree", move || {
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let m = std::fs::symlink_metadata(&dir).unwrap();
            let rel = dir.strip_prefix(&root).unwrap().display().to_string();
            out.push((format!("/{rel}"), m.mode(), m.uid()));
            for e in std::fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(&root).unwrap().display().to_string();
                    out.push((format!("/{rel}"), m.mode(), m.uid()));
                }
            }
        }
        out
    })
}

/// No setuid/setgid/sticky bits, only regular files and directories; modes as `file` and
/// `dir` (the root: `root`, current/disk.img: `disk`); owned by root; nosuid,nodev.
fn check_modes(mnt: &Mount, file: u32, dir: u32, root: u32, disk: u32, what: &str) {
    let entries = walk_modes(&mnt.dir);
    assert!(entries.len() > 8, "{what}: tree too small: {entries:?}");
    for (rel, mode, uid) in &entries {
        let kind = mode & libc::S_IFMT;
        assert!(
            kind == libc::S_IFREG || kind == libc::S_IFDIR,
            "{what}: {rel} is neither a file nor a directory (mode {mode:o})"
        );
        assert_eq!(
            mode & 0o7000,
            0,
            "{what}: {rel} has mode {mode:o} (setuid/setgid/sticky)"
        );
        assert_eq!(*uid, 0, "{what}: {rel} should carry the image's owner");
        let want = if rel == "/" {
            root
        } else if kind == libc::S_IFDIR {
            dir
        } else if rel == "/current/disk.img" {
            disk
        } else {
            file
        };
        assert_eq!(
            mode & 0o777,
            want,
            "{what}: mode of {rel} is {:o}",
            mode & 0o777
        );
    }
    let line = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(s(&mnt.dir)))
        .map(str::to_string)
        .expect("mount in /proc/mounts");
    let opts: Vec<&str> = line.split(' ').nth(3).unwrap().split(',').collect();
    assert!(
        opts.contains(&"nosuid") && opts.contains(&"nodev"),
        "{what}: mount options lack nosuid,nodev: {line}"
    );
}

/// A chain with a checkpoint, in a directory every user may enter; the image owned by root.
fn perm_fixture() -> (tempfile::TempDir, PathBuf) {
    let t = tempdir();
    let d = t.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let top = common::c1_chain(
        d,
        ["base.qcow2", "top.qcow2"],
        "4M",
        &["write -P 0x31 0 4M"],
        &["write -P 0x32 1M 64k"],
    );
    (t, top)
}

#[test]
fn permissions_other_user() {
    let ids = other_user();
    let (t, top) = perm_fixture();
    let d = t.path();
    let truth = common::truth_raw(&top);
    let os = |p: &Path| p.as_os_str().to_owned();

    // Without allow_other: the other user cannot even stat inside.
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-private"), None);
    check_modes(&mnt, 0o444, 0o555, 0o555, 0o444, "no allow_other");
    for rel in ["", "current", "current/disk.img", "c1/changed.img"] {
        let p = os(&mnt.path(rel));
        assert_denied(ids, "stat", &[&p], &format!("no allow_other: stat /{rel}"));
    }
    assert_denied(
        ids,
        "cat",
        &[&os(&mnt.path("current/disk.img"))],
        "no allow_other: cat",
    );
    mnt.unmount();

    // allow_other,default_permissions and a private image (0600): modes say so, access denied.
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mnt = Mount::new(
        &top,
        &mount_dir(d, "mnt-0600"),
        Some("allow_other,default_permissions"),
    );
    check_modes(&mnt, 0o400, 0o500, 0o500, 0o400, "0600 image");
    assert_denied(ids, "ls", &[&os(&mnt.dir)], "0600 image: ls /");
    assert_denied(
        ids,
        "stat",
        &[&os(&mnt.path("current"))],
        "0600 image: stat /current",
    );
    for rel in ["current/disk.img", "c1/changed.img", "checkpoints.json"] {
        assert_denied(
            ids,
            "cat",
            &[&os(&mnt.path(rel))],
            &format!("0600 image: cat /{rel}"),
        );
    }
    mnt.unmount();

    // allow_other,default_permissions and a world-readable image (0644): reads work.
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mnt = Mount::new(
        &top,
        &mount_dir(d, "mnt-0644"),
        Some("allow_other,default_permissions"),
    );
    check_modes(&mnt, 0o444, 0o555, 0o555, 0o444, "0644 image");
    let o = as_other(ids, "ls", &[&os(&mnt.dir)]);
    assert!(
        o.status.success(),
        "0644: ls: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let listed = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        listed.contains("current") && listed.contains("c1"),
        "0644: ls: {listed}"
    );
    let got = other_reads(ids, &mnt.path("current/disk.img"), "0644");
    common::assert_same(&got, &truth, 0, "0644: disk.img read by the other user");
    let changed = other_reads(ids, &mnt.path("c1/changed.img"), "0644");
    let mine = read(&mnt.path("c1/changed.img"));
    common::assert_same(
        &changed,
        &mine,
        0,
        "0644: c1/changed.img read by the other user",
    );
    assert_eq!(&changed[M as usize..M as usize + 4], &[0x32; 4]);
    mnt.unmount();

    // rw,allow_other,default_permissions, 0644: the other user reads but cannot write.
    let mnt = Mount::new(
        &top,
        &mount_dir(d, "mnt-rw"),
        Some("rw,allow_other,default_permissions"),
    );
    check_modes(&mnt, 0o444, 0o555, 0o755, 0o644, "rw, 0644 image");
    let got = other_reads(ids, &mnt.path("current/disk.img"), "rw 0644");
    common::assert_same(&got, &truth, 0, "rw: disk.img read by the other user");
    let of = format!("of={}", s(&mnt.path("current/disk.img")));
    assert_denied(
        ids,
        "dd",
        &[
            OsStr::new("if=/dev/zero"),
            OsStr::new(&of),
            OsStr::new("bs=512"),
            OsStr::new("count=1"),
            OsStr::new("conv=notrunc"),
        ],
        "rw: the other user writes disk.img",
    );
    mnt.unmount();
    assert_eq!(
        common::truth_raw(&top),
        truth,
        "rw: the other user changed the disk"
    );
}

/// allow_other without default_permissions (the README's fstab example: `ro,allow_other`):
/// the tree still says the files are the owner's alone (0400 for a 0600 image), so another
/// user must not get the disk's bytes.
#[test]
fn permissions_allow_other_alone_keeps_private_image_private() {
    let ids = other_user();
    let (t, top) = perm_fixture();
    let d = t.path();
    std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), Some("allow_other"));
    check_modes(&mnt, 0o400, 0o500, 0o500, 0o400, "allow_other, 0600 image");
    let p = mnt.path("current/disk.img");
    let o = as_other(ids, "cat", &[p.as_os_str()]);
    let leaked = o.stdout.len();
    mnt.unmount();
    assert!(
        denied(&o),
        "allow_other (no default_permissions), image 0600 root:root, tree mode 0400: uid {} \
         read {leaked} bytes of current/disk.img (status {}, stderr {}); expected EACCES",
        ids.0,
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// 5. Unmount cases

fn unmount_fixture() -> (tempfile::TempDir, PathBuf) {
    let t = tempdir();
    let top = common::c1_chain(
        t.path(),
        ["base.qcow2", "top.qcow2"],
        "8M",
        &["write -P 0x41 0 8M"],
        &[],
    );
    (t, top)
}

#[test]
fn unmount_busy_then_lazy() {
    let (t, top) = unmount_fixture();
    let d = t.path();
    let mut model = common::truth_raw(&top);
    let mut mnt = Mount::foreground(&top, &mount_dir(d, "mnt"), Some("rw"), &d.join("log"));
    let f = Arc::new(open_timed(&mnt.path("current/disk.img"), true).unwrap());
    let data = random_bytes(77, 100_000);
    {
        let (f, data) = (f.clone(), data.clone());
        timed("write + fsync", move || {
            f.write_all_at(&data, 3 * M + 123).unwrap();
            f.sync_all().unwrap();
        });
    }
    model[(3 * M + 123) as usize..(3 * M + 123) as usize + data.len()].copy_from_slice(&data);

    let r = run_files(
        None,
        "fusermount3",
        &[OsStr::new("-u"), mnt.dir.as_os_str()],
    );
    assert!(!r.ok, "fusermount3 -u with a file open should fail: {r:?}");
    assert!(
        r.stderr.to_lowercase().contains("busy"),
        "fusermount3 -u should say busy: {}",
        r.stderr
    );
    assert!(is_mounted(&mnt.dir), "unmounted although busy");
    let r = run_files(None, "umount", &[OsStr::new("-l"), mnt.dir.as_os_str()]);
    assert!(r.ok, "umount -l: {r:?}");
    assert!(
        !is_mounted(&mnt.dir),
        "still in /proc/mounts after umount -l"
    );

    // The open file still works; the daemon waits for it.
    let got = pread_timed(&f, 3 * M, 200_000, "after umount -l").unwrap();
    common::assert_same(
        &got,
        &model[3 * M as usize..3 * M as usize + 200_000],
        3 * M,
        "read after umount -l",
    );
    {
        let f = f.clone();
        timed("write after umount -l", move || {
            f.write_all_at(&[0x99; 4096], 6 * M).unwrap();
        });
    }
    model[6 * M as usize..6 * M as usize + 4096].fill(0x99);
    std::thread::sleep(Duration::from_millis(300));
    let pid = mnt.child_pid().unwrap();
    assert!(
        !wait_pid_gone(pid, Duration::from_millis(1)),
        "the daemon exited while a file was still open"
    );
    timed("close", move || drop(f));
    mnt.wait_child_ok("daemon after the last close");
    drop(mnt);

    assert_check_clean(&top, "after umount -l");
    assert_bitmaps_stored(&top, "after umount -l");
    assert_image_equals_model(&model, &top, "after umount -l");
    // Locks released: QEMU may write the top now.
    assert_released(&top, "after qemu-io");
}

#[test]
fn unmount_sigterm_ro_exits_zero() {
    let (t, top) = unmount_fixture();
    let d = t.path();
    let mut mnt = Mount::foreground(&top, &mount_dir(d, "mnt"), None, &d.join("log"));
    let got = read(&mnt.path("current/disk.img"));
    assert_eq!(got.len() as u64, 8 * M);
    mnt.signal_child(libc::SIGTERM);
    mnt.wait_child_ok("ckptfs -f after SIGTERM");
    assert!(!is_mounted(&mnt.dir), "still mounted after SIGTERM");
    assert!(ckptfs_pids_for(&mnt.dir).is_empty(), "a daemon is left");
    drop(mnt);
    assert_released(&top, "ro SIGTERM");
}

#[test]
fn unmount_sigterm_rw_stores_bitmaps() {
    let (t, top) = unmount_fixture();
    let d = t.path();
    let mut model = common::truth_raw(&top);
    let mut mnt = Mount::foreground(&top, &mount_dir(d, "mnt"), Some("rw"), &d.join("log"));
    {
        let f = open_timed(&mnt.path("current/disk.img"), true).unwrap();
        timed("writes", move || {
            f.write_all_at(&[0x61; 70_000], 2 * M - 5).unwrap();
            fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 5 * M, 256 * K).unwrap();
        });
    }
    model[(2 * M - 5) as usize..(2 * M - 5) as usize + 70_000].fill(0x61);
    model[5 * M as usize..(5 * M + 256 * K) as usize].fill(0);
    let in_use = bitmap_flags(&top);
    assert!(
        in_use.iter().all(|(_, f)| f.iter().any(|x| x == "in-use")),
        "bitmaps should be in use while mounted rw: {in_use:?}"
    );
    mnt.signal_child(libc::SIGTERM);
    mnt.wait_child_ok("ckptfs -f -o rw after SIGTERM");
    assert!(!is_mounted(&mnt.dir), "still mounted after SIGTERM");
    drop(mnt);
    assert_bitmaps_stored(&top, "rw SIGTERM");
    assert_check_clean(&top, "rw SIGTERM");
    assert_image_equals_model(&model, &top, "rw SIGTERM");
}

// ---------------------------------------------------------------------------------------
// 6. EIO from the underlying file

#[test]
fn truncated_top_gives_eio() {
    let t = tempdir();
    let d = t.path();
    write_file(&d.join("r.bin"), &random_bytes(9, 512 * K as usize));
    create(d, "base.qcow2", "8M", "", None);
    qemu_io(d, "base.qcow2", &["write -P 0x11 0 8M"]);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "top.qcow2",
        &["write -s r.bin 1M 256k", "write -s r.bin 5M 512k"],
    );
    let top = d.join("top.qcow2");
    let truth = common::truth_raw(&top);
    let ext = top_data_extents(&top);
    // The guest range whose host cluster is last in the file; truncate the file there.
    let &(g, len, h) = ext.iter().max_by_key(|e| e.2).expect("data in the top");
    let last_cluster_guest = g + len - 64 * K;
    let cut = h + len - 64 * K;
    let file_len = std::fs::metadata(&top).unwrap().len();
    assert!(cut < file_len);
    let low = ext.iter().find(|e| e.0 == M).expect("data at 1M").2;
    assert!(low < cut, "the 1M extent must stay inside the file");

    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), None);
    let f = Arc::new(open_timed(&mnt.path("current/disk.img"), false).unwrap());
    no_readahead(&f);
    std::thread::sleep(Duration::from_millis(150));
    // This read runs the freshness check; the next one, right after the truncation, comes
    // within its 100 ms window, so only the read path itself can refuse it.
    let a = pread_timed(&f, M, 4096, "before").unwrap();
    assert_eq!(a, truth[M as usize..M as usize + 4096]);
    let t0 = Instant::now();
    OpenOptions::new()
        .write(true)
        .open(&top)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let fast = pread_timed(&f, last_cluster_guest, 4096, "fast");
    let fast_elapsed = t0.elapsed();
    let fast_desc = match &fast {
        Ok(v) if v.iter().all(|&b| b == 0) => "zeros".to_string(),
        Ok(_) => "data".to_string(),
        Err(e) => format!("{e}"),
    };
    // Later: the change detection has certainly run.
    std::thread::sleep(Duration::from_millis(200));
    let slow = pread_timed(&f, last_cluster_guest + 8192, 4096, "slow");
    println!(
        "truncated top: read {fast_elapsed:?} after the truncation: {fast_desc}; 200 ms later: \
         {:?}",
        slow.as_ref().map(|v| v.len())
    );
    assert_errno(
        slow,
        libc::EIO,
        "read of a cluster past EOF, 200 ms after the truncation",
    );
    assert_errno(
        pread_timed(&f, M + 8192, 4096, "slow, inside"),
        libc::EIO,
        "read of a still-present cluster of the truncated top",
    );
    assert!(list_dir(&mnt.dir).contains(&"current".to_string()));
    drop(f);
    mnt.unmount();
    assert_errno(
        fast,
        libc::EIO,
        &format!(
            "read of the data cluster at host {cut:#x} (guest {last_cluster_guest:#x}), now past \
             the end of the truncated top, {fast_elapsed:?} after the truncation (got \
             {fast_desc})"
        ),
    );
}

/// Checkpoint names that are not file names (NUL bytes, '/') become directory names every
/// tool can walk and look up; long names stay whole. (A snapshot named "\0\0" once listed as a
/// directory with an empty name: `find` looped over the root. Found by the `mount` fuzz target.)
#[test]
fn hostile_checkpoint_names_are_file_names() {
    let tmp = tempdir();
    let dir = tmp.path();
    create(dir, "n.qcow2", "1M", "cluster_size=4k", None);
    let long = "L".repeat(300);
    for name in ["NUL1", "a/b", long.as_str(), "NUL2"] {
        qemu_img(dir, &["snapshot", "-c", name, "n.qcow2"]);
    }
    // Names with NUL bytes: QEMU's tools cannot make them, so patch "NUL1" into "\0\0L1" and
    // "NUL2" into "\0\0L2" in the snapshot table.
    let image = dir.join("n.qcow2");
    let mut b = std::fs::read(&image).unwrap();
    for pat in [&b"NUL1"[..], &b"NUL2"[..]] {
        let at = b.windows(4).position(|w| w == pat).unwrap();
        b[at..at + 2].copy_from_slice(&[0, 0]);
    }
    std::fs::write(&image, &b).unwrap();
    let mnt_dir = dir.join("mnt");
    std::fs::create_dir(&mnt_dir).unwrap();
    let mnt = Mount::new(&image, &mnt_dir, None);
    let mut names = list_dir(&mnt_dir);
    names.sort();
    let mut want = vec![
        "__L1".to_string(),
        "__L2".to_string(),
        "a_b".to_string(),
        // qemu-img keeps 255 bytes of a snapshot name (QEMUSnapshotInfo.name).
        "L".repeat(255),
        "checkpoints.json".into(),
        "current".into(),
        "stats.json".into(),
    ];
    want.sort();
    assert_eq!(names, want);
    for n in &names {
        // Every listed name can be looked up.
        metadata(&mnt.path(n));
    }
    // Every directory reads its disk: the snapshots are all of the empty disk.
    for n in ["__L1", "a_b"] {
        let data = read(&mnt.path(&format!("{n}/disk.img")));
        assert!(data.len() == 1 << 20 && data.iter().all(|&x| x == 0), "{n}");
    }
    let json = read_json(&mnt.path("checkpoints.json"));
    let dirs: Vec<&str> = json["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["directory"].as_str().unwrap())
        .collect();
    assert!(dirs.contains(&"__L1") && dirs.contains(&"__L2"), "{dirs:?}");
    mnt.unmount();
}

/// Peak resident memory (VmHWM) of process `pid`, in bytes.
fn peak_rss(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Memory stays within cache_mb plus a fixed overhead (and the L1 table, which QEMU caps at
/// 32 MiB and which is held whole) whatever the image claims: a 1 PiB disk with 2 MiB
/// clusters and a bitmap, and a 128 GiB disk with 512-byte clusters (a 32 MiB L1 table).
/// Every file is used: SEEK_DATA/SEEK_HOLE over the whole changed.img, all of bitmap.bin and
/// extents, 2,000 random reads of disk.img. Then a hostile image claiming 128 Mi changed runs.
#[test]
fn memory_bounded_whatever_the_image_claims() {
    let t = tempdir();
    let d = t.path();
    const CACHE_MB: u64 = 16;
    const FIXED: u64 = 48 * M;
    create(d, "huge.qcow2", "1P", "cluster_size=2M", None);
    qemu_img(d, &["bitmap", "--add", "-g", "2M", "huge.qcow2", "c1"]);
    qemu_io(d, "huge.qcow2", &["write -P 7 0 1M", "write -P 8 900T 1M"]);
    create(d, "maxl1.qcow2", "128G", "cluster_size=512", None);
    qemu_img(d, &["bitmap", "--add", "maxl1.qcow2", "c1"]);
    qemu_io(d, "maxl1.qcow2", &["write -P 7 0 1M", "write -P 8 100G 1M"]);
    let mut figures = Vec::new();
    for (name, l1_bytes) in [("huge.qcow2", 2048 * 8), ("maxl1.qcow2", 32 * M)] {
        let mnt_dir = mount_dir(d, &format!("mnt-{name}"));
        let opts = format!("cache_mb={CACHE_MB}");
        let mnt = Mount::foreground(&d.join(name), &mnt_dir, Some(&opts), &d.join("log"));
        let pid = mnt.child_pid().unwrap();
        let changed = mnt.path("c1/changed.img");
        let runs = seek_map(&changed);
        assert_eq!(runs.len(), 2, "{name}: changed runs {runs:?}");
        let bits = read(&mnt.path("c1/bitmap.bin"));
        assert!(bits.iter().any(|&b| b != 0), "{name}: bitmap.bin");
        let extents = read_text(&mnt.path("c1/extents"));
        assert_eq!(extents.lines().count(), 2, "{name}: {extents}");
        let disk = mnt.path("current/disk.img");
        let size = metadata(&disk).len();
        timed("random reads", move || {
            let f = File::open(&disk).unwrap();
            let mut rng = Prng(5);
            for _ in 0..2000 {
                let off = rng.range(0, size - 4096);
                f.read_exact_at(&mut [0u8; 4096], off).unwrap();
            }
        });
        let peak = peak_rss(pid);
        let bound = CACHE_MB * M + l1_bytes + FIXED;
        figures.push(format!(
            "{name}: peak RSS {} MiB (bound {} MiB)",
            peak / M,
            bound / M
        ));
        assert!(
            peak <= bound,
            "{name}: peak RSS {} MiB above cache_mb {CACHE_MB} + L1 {} MiB + {} MiB",
            peak / M,
            l1_bytes / M,
            FIXED / M
        );
        mnt.unmount();
    }

    // A hostile 32 MiB image: its 4 Mi L1 entries all name one L2 table whose entries
    // alternate data and unallocated, so the base layer's checkpoint claims 128 Mi changed
    // runs. changed.img answers; the extents text would be gigabytes: EFBIG, not an
    // allocation without bound.
    create(d, "hbase.qcow2", "128G", "cluster_size=512", None);
    create(
        d,
        "hostile.qcow2",
        "128G",
        "cluster_size=512",
        Some(("hbase.qcow2", "qcow2")),
    );
    share_one_l2_table(&d.join("hostile.qcow2"));
    let mnt_dir = mount_dir(d, "mnt-hostile");
    let opts = format!("cache_mb={CACHE_MB}");
    let mnt = Mount::foreground(
        &d.join("hostile.qcow2"),
        &mnt_dir,
        Some(&opts),
        &d.join("log"),
    );
    let pid = mnt.child_pid().unwrap();
    let changed = mnt.path("hbase.qcow2/changed.img");
    let md = metadata(&changed);
    assert_eq!(md.blocks(), (64 << 30) / 512, "half of 128 GiB changed");
    let seeks = timed("lseek changed.img", move || {
        let f = File::open(&changed).unwrap();
        let seek = |off: i64, whence: i32| {
            // SAFETY: lseek on an open descriptor.
            unsafe { libc::lseek(f.as_raw_fd(), off, whence) }
        };
        [
            seek(0, libc::SEEK_DATA),
            seek(0, libc::SEEK_HOLE),
            seek(1 << 36, libc::SEEK_DATA),
        ]
    });
    assert_eq!(seeks, [0, 512, 1 << 36]);
    assert_errno(
        try_read(&mnt.path("hbase.qcow2/extents")),
        libc::EFBIG,
        "extents of 128 Mi runs",
    );
    let peak = peak_rss(pid);
    let bound = CACHE_MB * M + 32 * M + FIXED;
    figures.push(format!(
        "hostile shared L2 table: peak RSS {} MiB (bound {} MiB)",
        peak / M,
        bound / M
    ));
    assert!(peak <= bound, "hostile image: peak RSS {} MiB", peak / M);
    mnt.unmount();
    println!("memory: {}", figures.join("; "));
}

/// Point every L1 entry of `image` (512-byte clusters) at one new L2 table whose entries
/// alternate a data cluster and unallocated.
fn share_one_l2_table(image: &Path) {
    let mut b = std::fs::read(image).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let (l1_size, l1_off) = (be32(&b, 36) as usize, be64(&b, 40) as usize);
    let end = b.len().div_ceil(512) * 512;
    b.resize(end, 0);
    let (l2, data) = (end as u64, end as u64 + 512);
    for i in 0..64u64 {
        let e = if i % 2 == 0 { data | 1 << 63 } else { 0 };
        b.extend_from_slice(&e.to_be_bytes());
    }
    b.extend_from_slice(&[0x55; 512]);
    let entry = (l2 | 1 << 63).to_be_bytes();
    for i in 0..l1_size {
        b[l1_off + 8 * i..l1_off + 8 * i + 8].copy_from_slice(&entry);
    }
    std::fs::write(image, &b).unwrap();
}

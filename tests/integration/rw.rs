//! Writable restore view (`-o rw`): writes through MOUNT/current/disk.img must land in the top
//! image exactly as QEMU would put them there. The main test applies one seeded write log
//! twice, through the mount and with qemu-io on a byte copy of the top image (its "twin"), then
//! compares the two images (`qemu-img compare`), checks the top (`qemu-img check`) and compares
//! the bitmaps bit by bit with QEMU's own view (`qemu-nbd -B` + `nbdinfo`). Other tests: live
//! since-sets, kill -9 in the middle of a long write, QEMU locks, refusals, a restore.
//!
//! Harness rules (see `mountutil`): every mount is owned by a guard that unmounts, every access
//! runs under a timeout, only processes these tests started are killed, by PID.
//!
//! `CKPTFS_RW_SEED` (decimal or 0x-hex) overrides the write-log seed; the seed is printed.

use crate::common::{self, create, qemu_img, qemu_io, tempdir, Prng};
use crate::mountutil::*;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const K: u64 = 1024;
const M: u64 = 1 << 20;
const K64: u64 = 64 * K;

/// The write-log seed: `CKPTFS_RW_SEED` or a fixed default, printed either way.
fn seed(test: &str) -> u64 {
    let v = std::env::var("CKPTFS_RW_SEED").ok().map(|t| {
        let t = t.trim().to_string();
        match t.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => t.parse(),
        }
        .unwrap_or_else(|_| panic!("CKPTFS_RW_SEED={t}: not a number"))
    });
    let seed = v.unwrap_or(0x5eed_c0de_2024);
    println!("{test}: seed {seed:#x} (set CKPTFS_RW_SEED={seed:#x} to replay)");
    seed
}

// ---------------------------------------------------------------------------------------
// Write logs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// pwrite of pseudo-random bytes (qemu-io: `write -s FILE`).
    Data(u64),
    /// pwrite of one repeated byte (qemu-io: `write -P`).
    Pattern(u8),
    /// fallocate(FALLOC_FL_ZERO_RANGE) (qemu-io: `write -z`).
    ZeroRange,
    /// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) (qemu-io: `write -z`).
    PunchHole,
}

#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    off: u64,
    len: u64,
}

impl Op {
    fn data(off: u64, len: u64, seed: u64) -> Op {
        Op {
            kind: Kind::Data(seed),
            off,
            len,
        }
    }

    /// The bytes a data op writes.
    fn bytes(&self) -> Vec<u8> {
        match self.kind {
            Kind::Data(seed) => {
                let mut b = vec![0u8; self.len as usize];
                Prng(seed).fill(&mut b);
                b
            }
            Kind::Pattern(p) => vec![p; self.len as usize],
            _ => Vec::new(),
        }
    }

    fn describe(&self) -> String {
        let (o, l) = (self.off, self.len);
        match self.kind {
            Kind::Data(seed) => format!("pwrite {o} {l} (random, seed {seed:#x})"),
            Kind::Pattern(p) => format!("pwrite {o} {l} (pattern {p:#04x})"),
            Kind::ZeroRange => format!("fallocate -z {o} {l}"),
            Kind::PunchHole => format!("fallocate -p {o} {l}"),
        }
    }
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate(2) on an fd owned by `f`.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn apply_op(f: &File, op: &Op) -> std::io::Result<()> {
    match op.kind {
        Kind::Data(_) | Kind::Pattern(_) => f.write_all_at(&op.bytes(), op.off),
        Kind::ZeroRange => fallocate(f, libc::FALLOC_FL_ZERO_RANGE, op.off, op.len),
        Kind::PunchHole => fallocate(
            f,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            op.off,
            op.len,
        ),
    }
}

/// Apply `ops` through the mounted `disk` (one open, pwrite / fallocate), all under a timeout.
fn apply_through_mount(disk: &Path, ops: &[Op], what: &str) {
    let p = disk.to_path_buf();
    let ops = ops.to_vec();
    let r = timed_for(
        &format!("{what}: apply the write log"),
        Duration::from_secs(120),
        move || -> Result<(), String> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|e| format!("open {} for writing: {e}", p.display()))?;
            for (i, op) in ops.iter().enumerate() {
                apply_op(&f, op).map_err(|e| format!("op {i} `{}`: {e}", op.describe()))?;
            }
            f.sync_all().map_err(|e| format!("fsync: {e}"))
        },
    );
    if let Err(e) = r {
        panic!("{what}: through the mount: {e}");
    }
}

/// Apply `ops` to `image` (in `dir`) with one qemu-io run.
fn apply_with_qemu_io(dir: &Path, image: &str, ops: &[Op], tag: &str) {
    let mut cmds = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let (o, l) = (op.off, op.len);
        cmds.push(match op.kind {
            Kind::Data(_) => {
                let name = format!("{tag}-op{i}.bin");
                std::fs::write(dir.join(&name), op.bytes()).unwrap();
                format!("write -s {name} {o} {l}")
            }
            Kind::Pattern(p) => format!("write -P {p} {o} {l}"),
            Kind::ZeroRange | Kind::PunchHole => format!("write -z {o} {l}"),
        });
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(dir, image, &refs);
}

fn print_log(what: &str, ops: &[Op]) {
    for (i, op) in ops.iter().enumerate() {
        println!("{what}: op {i}: {}", op.describe());
    }
}

// ---------------------------------------------------------------------------------------
// QEMU's views

fn bitmap<'a>(list: &'a [BitmapInfo], name: &str, image: &Path) -> &'a BitmapInfo {
    list.iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("{}: no bitmap {name} in {list:?}", image.display()))
}

/// QEMU's view of bitmap `name` of `image` (qemu-nbd -B + nbdinfo), the server's socket in a
/// fresh subdirectory of `dir` named `tag`.
fn dirty(dir: &Path, tag: &str, image: &Path, name: &str) -> Vec<(u64, u64)> {
    let sub = dir.join(format!("nbd-{tag}-{name}"));
    std::fs::create_dir(&sub).unwrap();
    common::qemu_dirty_ranges(&sub, s(image), name)
}

/// Guest bytes `[off, off+len)` of `image` as QEMU reads them (`qemu-img dd`, bs = 64 KiB).
fn qemu_range(dir: &Path, image: &Path, off: u64, len: u64) -> Vec<u8> {
    assert!(off % K64 == 0 && len % K64 == 0);
    let out = dir.join("range.raw");
    let _ = std::fs::remove_file(&out);
    common::run(
        "qemu-img",
        &[
            "dd",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "bs=65536",
            &format!("skip={}", off / K64),
            &format!("count={}", (off + len) / K64),
            &format!("if={}", s(image)),
            &format!("of={}", s(&out)),
        ],
    );
    let v = std::fs::read(&out).unwrap();
    assert_eq!(
        v.len() as u64,
        len,
        "qemu-img dd of {} {off}+{len}",
        image.display()
    );
    v
}

/// Header fields at byte `off`.
fn header_u32(image: &Path, off: u64) -> u32 {
    let f = File::open(image).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).unwrap();
    u32::from_be_bytes(b)
}

fn read_range_mount(disk: &Path, off: u64, len: u64) -> Vec<u8> {
    let p = disk.to_path_buf();
    timed(&format!("read {} {off}+{len}", disk.display()), move || {
        let f = File::open(&p).unwrap();
        pread_full(&f, off, len as usize).unwrap()
    })
}

fn open_rw(p: &Path) -> std::io::Result<File> {
    let p = p.to_path_buf();
    timed(&format!("open {} rw", p.display()), move || {
        OpenOptions::new().read(true).write(true).open(&p)
    })
}

fn rw(image: &Path, dir: &Path) -> Mount {
    Mount::new(image, dir, Some("rw"))
}

// ---------------------------------------------------------------------------------------
// Test 1: the twin test

struct Geometry {
    name: &'static str,
    /// qemu-img create -o for the top image.
    opts: &'static str,
    cluster: u64,
    extended: bool,
    size: u64,
    /// 256 KiB-aligned starts of 1 MiB regions with fixture features.
    hot: Vec<u64>,
    bitmaps: bool,
    /// One large write (offset, length) added to the log.
    big: Option<(u64, u64)>,
}

impl Geometry {
    /// Bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        let per = if self.extended {
            self.cluster / 16
        } else {
            self.cluster / 8
        };
        per * self.cluster
    }
}

/// base.qcow2 (64 KiB clusters, 1 MiB shorter than the top: the last MiB COWs zeros) with data,
/// packed compressed clusters and zero clusters at every hot region; top.qcow2 with the
/// geometry, partial writes, zero and preallocated-zero clusters, compressed clusters, and
/// (v3) bitmaps c1 (disabled at the end), c2 and c3 (enabled, c3 with 512-byte granularity).
fn twin_fixture(d: &Path, g: &Geometry) {
    let base_size = g.size - M;
    std::fs::write(
        d.join("bdata.bin"),
        common::varied_data(256 * K as usize, 7),
    )
    .unwrap();
    // Random words: compresses to about a fifth, so the compressed streams are long enough
    // to pack across sectors and host clusters.
    const WORDS: &[&str] = &[
        "qcow2", "cluster", "backing", "bitmap", "refcount", "snapshot", "the", "a", "of", "zero",
        "L2", "table", "chain", "ckptfs", "guest", "host", "alpha", "beta", "gamma", "delta",
        "epsilon", "zeta", "eta", "theta",
    ];
    let mut words = Prng(g.size ^ 0x77);
    let mut text = Vec::new();
    while text.len() < 256 * K as usize {
        text.extend_from_slice(WORDS[(words.next() % WORDS.len() as u64) as usize].as_bytes());
        text.push(if words.next() % 10 == 0 { b'\n' } else { b' ' });
    }
    text.truncate(256 * K as usize);
    std::fs::write(d.join("ctext.bin"), &text).unwrap();
    let mut tdata = vec![0u8; 256 * K as usize];
    Prng(99).fill(&mut tdata);
    std::fs::write(d.join("tdata.bin"), &tdata).unwrap();

    create(d, "base.qcow2", &base_size.to_string(), "", None);
    let mut cmds = Vec::new();
    for &h in &g.hot {
        if h + 448 * K > base_size {
            continue;
        }
        cmds.push(format!("write -s bdata.bin {h} {}", 192 * K));
        cmds.push(format!("write -c -s ctext.bin {} {}", h + 192 * K, 128 * K));
        cmds.push(format!("write -z {} {}", h + 320 * K, 64 * K));
        cmds.push(format!("write -P 0x14 {} {}", h + 384 * K, 64 * K));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(d, "base.qcow2", &refs);

    create(
        d,
        "top.qcow2",
        &g.size.to_string(),
        g.opts,
        Some(("base.qcow2", "qcow2")),
    );
    let cs = g.cluster;
    if g.bitmaps {
        qemu_img(d, &["bitmap", "--add", "top.qcow2", "c1"]);
    }
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &h in &g.hot {
        a.push(format!("write -s tdata.bin {} 40000", h + 32 * K));
        a.push(format!("write -P 0x2a {} {cs}", h + 768 * K));
        a.push(format!("write -z {} {cs}", h + 640 * K));
        b.push(format!("write -z {} {cs}", h + 768 * K));
        b.push(format!("write -c -s ctext.bin {} {}", h + 512 * K, 2 * cs));
        b.push(format!("write -z {} {}", h + 900 * K, 8 * K));
        b.push(format!("write -s tdata.bin {} 3000", h + 960 * K + 5));
    }
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    qemu_io(d, "top.qcow2", &refs);
    if g.bitmaps {
        qemu_img(d, &["bitmap", "--add", "top.qcow2", "c2"]);
        // Fine granularity: one bitmap data cluster covers little, so writes cross them.
        qemu_img(d, &["bitmap", "--add", "-g", "512", "top.qcow2", "c3"]);
    }
    let refs: Vec<&str> = b.iter().map(String::as_str).collect();
    qemu_io(d, "top.qcow2", &refs);
    if g.bitmaps {
        qemu_img(d, &["bitmap", "--disable", "top.qcow2", "c1"]);
    }
    // The fixture must hold what the log is meant to hit.
    let map = common::qemu_map(&d.join("top.qcow2"));
    assert!(
        map.iter().any(|e| e.compressed && e.depth == 0),
        "{}: fixture lacks compressed clusters in the top: {map:?}",
        g.name
    );
    assert!(
        map.iter().any(|e| e.compressed && e.depth == 1),
        "{}: fixture lacks compressed clusters in the backing file",
        g.name
    );
}

/// The seeded log: fixed ops aimed at every feature of every hot region, then random ones.
fn twin_log(g: &Geometry, rng: &mut Prng) -> Vec<Op> {
    let cs = g.cluster;
    let size = g.size;
    let mut ops = Vec::new();
    let mut seed = || rng.next();
    let mut fixed = Vec::new();
    for &h in &g.hot {
        // Over the backing's compressed clusters, straddling two of them (unaligned).
        fixed.push(Op::data(h + 192 * K + 1000, 70000, 0));
        // Over the backing's zero cluster, one byte.
        fixed.push(Op {
            kind: Kind::Pattern(0x5a),
            off: h + 320 * K + 4097,
            len: 1,
        });
        // Over the top's compressed clusters: partial, then zero one whole.
        fixed.push(Op::data(h + 512 * K + 100, 1000, 0));
        fixed.push(Op {
            kind: Kind::ZeroRange,
            off: h + 512 * K + cs,
            len: cs,
        });
        // Over the top's zero cluster and preallocated zero cluster.
        fixed.push(Op::data(h + 640 * K + 10, 100, 0));
        fixed.push(Op {
            kind: Kind::PunchHole,
            off: h + 768 * K,
            len: cs,
        });
        fixed.push(Op::data(h + 768 * K + cs / 2, 7, 0));
        // Aligned whole clusters over the top's partial write; overwrite it again.
        fixed.push(Op::data(h + 32 * K, 2 * cs, 0));
        fixed.push(Op::data(h + 32 * K + 3, 5, 0));
        // Zeroing with unaligned edges across several clusters.
        fixed.push(Op {
            kind: Kind::ZeroRange,
            off: h + 100 * K + 333,
            len: 3 * cs + 1000,
        });
        fixed.push(Op {
            kind: Kind::PunchHole,
            off: h + 200 * K - 17,
            len: 2 * cs + 34,
        });
    }
    // Straddling L2 table boundaries (inside the disk), and the last bytes of the disk.
    let span = g.l2_span();
    let mut b = span;
    let mut n = 0;
    while b < size && n < 3 {
        fixed.push(Op::data(b - 3000, 10000, 0));
        fixed.push(Op {
            kind: Kind::ZeroRange,
            off: b - cs,
            len: 2 * cs,
        });
        b += span * (1 + size / span / 4).max(1);
        n += 1;
    }
    fixed.push(Op::data(size - 5000, 5000, 0));
    fixed.push(Op {
        kind: Kind::PunchHole,
        off: size - 2 * cs,
        len: 2 * cs,
    });
    for mut op in fixed {
        if let Kind::Data(_) = op.kind {
            op.kind = Kind::Data(seed());
        }
        ops.push(op);
    }
    if let Some((off, len)) = g.big {
        ops.push(Op::data(off, len, seed()));
    }
    // Random ops around the hot regions.
    for _ in 0..60 {
        let h = g.hot[(rng.next() % g.hot.len() as u64) as usize];
        let mut off = match rng.next() % 10 {
            0..=3 => h + rng.range(0, M + K64),
            4..=6 => h + rng.range(0, M / cs) * cs,
            _ => h + rng.range(1, M / cs) * cs - rng.range(1, 2000),
        };
        let mut len = match rng.next() % 10 {
            0..=3 => rng.range(1, 4096),
            4..=5 => rng.range(1, 4) * cs,
            6..=8 => rng.range(1, 200_000),
            _ => 2 * cs + rng.range(1, 3 * cs),
        };
        off = off.min(size - 1);
        len = len.min(size - off);
        let kind = match rng.next() % 20 {
            0..=10 => Kind::Data(rng.next()),
            11..=13 => Kind::Pattern((rng.next() % 255 + 1) as u8),
            14..=16 => {
                // Zeroing: mostly cluster aligned so whole clusters become zero clusters.
                if rng.next() % 2 == 0 {
                    off = (off / cs) * cs;
                    len = (len.div_ceil(cs) * cs).min(size - off);
                }
                Kind::ZeroRange
            }
            _ => Kind::PunchHole,
        };
        ops.push(Op { kind, off, len });
    }
    ops
}

fn twin_test(g: Geometry) {
    let what = format!("twin {}", g.name);
    let seed = seed(&what) ^ g.cluster ^ g.size;
    let mut rng = Prng(seed);
    let t = tempdir();
    let d = t.path();
    twin_fixture(d, &g);
    let ops = twin_log(&g, &mut rng);
    let mut regions: Vec<(u64, u64)> = g
        .hot
        .iter()
        .map(|&h| (h, (M + 256 * K).min(g.size - h)))
        .collect();
    if let Some((off, len)) = g.big {
        let s = off / K64 * K64;
        regions.push((s, (off + len).div_ceil(K64) * K64 - s));
    }
    let refcount_table_clusters = header_u32(&d.join("top.qcow2"), 56);
    let names: &[&str] = if g.bitmaps { &["c1", "c2", "c3"] } else { &[] };
    twin_run(d, &what, g.size, &ops, &regions, names);
    if g.big.is_some() {
        let after = header_u32(&d.join("top.qcow2"), 56);
        assert!(
            after > refcount_table_clusters,
            "{what}: the large write should have grown the refcount table \
             ({refcount_table_clusters} clusters before, {after} after)"
        );
    }
}

/// Apply `ops` to d/top.qcow2 through an rw mount and to a copy (twin.qcow2) with qemu-io,
/// then: both check clean, `qemu-img compare` identical, what the mount read back in
/// `regions` (64 KiB aligned) equals the twin, no bitmap in use, and every bitmap in
/// `names` has the same bits in the top and the twin: the bits before the log, plus (enabled
/// ones) every range of the log.
fn twin_run(d: &Path, what: &str, size: u64, ops: &[Op], regions: &[(u64, u64)], names: &[&str]) {
    let top = d.join("top.qcow2");
    let twin = d.join("twin.qcow2");
    let pre = d.join("pre.qcow2");
    std::fs::copy(&top, &twin).unwrap();
    std::fs::copy(&top, &pre).unwrap();
    print_log(what, ops);

    // Through the mount.
    let mnt = rw(&top, &mount_dir(d, "mnt"));
    let disk = mnt.path("current/disk.img");
    apply_through_mount(&disk, ops, what);
    // What the mount reads back now, region by region (compared with the twin below).
    let seen: Vec<Vec<u8>> = regions
        .iter()
        .map(|&(o, l)| read_range_mount(&disk, o, l))
        .collect();
    mnt.unmount();

    // With qemu-io on the twin.
    apply_with_qemu_io(d, "twin.qcow2", ops, "twin");

    assert_check_clean(&twin, &format!("{what} (fixture: the qemu-io twin)"));
    assert_check_clean(&top, what);
    assert_identical(&top, &twin, what);
    for (&(o, l), got) in regions.iter().zip(&seen) {
        let want = qemu_range(d, &twin, o, l);
        common::assert_same(
            got,
            &want,
            o,
            &format!("{what}: current/disk.img read back while mounted vs the twin"),
        );
    }
    // Bitmaps: flags, then QEMU's bits of the top vs the twin vs the expectation.
    let list = qemu_bitmaps(&top, false);
    let pre_list = qemu_bitmaps(&pre, false);
    assert_eq!(list.len(), names.len(), "{what}: bitmaps {list:?}");
    for b in &list {
        assert!(
            !b.flags.iter().any(|f| f == "in-use"),
            "{what}: bitmap {} still in use after a clean unmount: {list:?}",
            b.name
        );
    }
    let written: Vec<(u64, u64)> = ops.iter().map(|o| (o.off, o.off + o.len)).collect();
    for &name in names {
        let b = bitmap(&list, name, &top);
        let enabled = b.flags.iter().any(|f| f == "auto");
        assert_eq!(
            b.flags,
            bitmap(&pre_list, name, &pre).flags,
            "{what}: flags of {name}"
        );
        let before = dirty(d, "pre", &pre, name);
        let got = dirty(d, "top", &top, name);
        let qemu = dirty(d, "twin", &twin, name);
        let want = if enabled {
            merge(
                before
                    .iter()
                    .copied()
                    .chain(round_to_blocks(&written, b.granularity, size))
                    .collect(),
            )
        } else {
            before.clone()
        };
        assert_eq!(
            qemu, want,
            "{what}: fixture: QEMU's own bitmap {name} after the log"
        );
        assert_eq!(
            got, qemu,
            "{what}: bitmap {name} (enabled: {enabled}, granularity {}) of the top (ckptfs \
             wrote it) vs the twin (qemu-io wrote it); before the log: {before:?}",
            b.granularity
        );
    }
}

#[test]
fn twin_64k_clusters() {
    twin_test(Geometry {
        name: "64k",
        opts: "",
        cluster: K64,
        extended: false,
        size: 1028 * M,
        hot: vec![0, 100 * M, 512 * M - 512 * K, 1027 * M],
        bitmaps: true,
        big: None,
    });
}

#[test]
fn twin_512b_clusters_refcount_table_growth() {
    twin_test(Geometry {
        name: "512",
        opts: "cluster_size=512",
        cluster: 512,
        extended: false,
        size: 32 * M,
        hot: vec![0, 2 * M, 4 * M, 31 * M],
        bitmaps: true,
        big: Some((8 * M + 777, 12 * M)),
    });
}

#[test]
fn twin_4k_refcount_bits_1() {
    twin_test(Geometry {
        name: "4k-refcount1",
        opts: "cluster_size=4k,refcount_bits=1",
        cluster: 4 * K,
        extended: false,
        size: 16 * M,
        hot: vec![0, 2 * M - 512 * K, 6 * M, 15 * M],
        bitmaps: true,
        big: None,
    });
}

#[test]
fn twin_4k_refcount_bits_64() {
    twin_test(Geometry {
        name: "4k-refcount64",
        opts: "cluster_size=4k,refcount_bits=64",
        cluster: 4 * K,
        extended: false,
        size: 16 * M,
        hot: vec![0, 2 * M - 512 * K, 6 * M, 15 * M],
        bitmaps: true,
        big: None,
    });
}

#[test]
fn twin_extended_l2() {
    twin_test(Geometry {
        name: "extended-l2",
        opts: "cluster_size=128k,extended_l2=on",
        cluster: 128 * K,
        extended: true,
        size: 1028 * M,
        hot: vec![0, 200 * M, 1024 * M - 512 * K, 1027 * M],
        bitmaps: true,
        big: None,
    });
}

#[test]
fn twin_zstd_compressed_top() {
    twin_test(Geometry {
        name: "zstd",
        opts: "compression_type=zstd",
        cluster: K64,
        extended: false,
        size: 64 * M,
        hot: vec![0, 8 * M, 32 * M - 512 * K, 63 * M],
        bitmaps: true,
        big: None,
    });
}

#[test]
fn twin_v2_no_bitmaps() {
    twin_test(Geometry {
        name: "v2",
        opts: "compat=0.10",
        cluster: K64,
        extended: false,
        size: 64 * M,
        hot: vec![0, 8 * M, 32 * M - 512 * K, 63 * M],
        bitmaps: false,
        big: None,
    });
}

/// A raw backing file whose size is not a multiple of the cluster size (COW of the cluster
/// holding its end copies its bytes, then zeros), under a v3 top with no bitmaps extension.
#[test]
fn twin_raw_backing_no_bitmaps() {
    let what = "twin raw backing";
    let mut rng = Prng(seed(what));
    let t = tempdir();
    let d = t.path();
    let mut base = vec![0u8; 1_000_000];
    rng.fill(&mut base);
    std::fs::write(d.join("base.raw"), &base).unwrap();
    let size = 4 * M;
    create(
        d,
        "top.qcow2",
        &size.to_string(),
        "",
        Some(("base.raw", "raw")),
    );
    qemu_io(d, "top.qcow2", &["write -P 0x66 900000 200000"]);
    let end = 1_000_000;
    let mut ops = vec![
        Op::data(end - 1000, 2000, rng.next()),
        Op::data(983_040 + 10, 10, rng.next()),
        Op {
            kind: Kind::ZeroRange,
            off: end - 70_000,
            len: 140_000,
        },
        Op::data(2 * M + 5, 100, rng.next()),
        Op {
            kind: Kind::PunchHole,
            off: 3 * M,
            len: 3 * K64,
        },
        Op::data(3 * M + 1, 1, rng.next()),
    ];
    for _ in 0..40 {
        let off = rng.range(0, size - 1);
        let len = rng.range(1, 150_000).min(size - off);
        let kind = match rng.next() % 4 {
            0 | 1 => Kind::Data(rng.next()),
            2 => Kind::ZeroRange,
            _ => Kind::PunchHole,
        };
        ops.push(Op { kind, off, len });
    }
    twin_run(d, what, size, &ops, &[(0, size)], &[]);
}

/// Four threads write disjoint (but cluster-sharing) stripes at once while two more read
/// current/disk.img and c2/changed.img; the result must equal the same ops applied one by one
/// with qemu-io (disjoint ranges: the order does not matter).
#[test]
fn twin_concurrent_writers() {
    let what = "twin concurrent";
    let mut rng = Prng(seed(what));
    let t = tempdir();
    let d = t.path();
    let size = 16 * M;
    create(d, "base.qcow2", &size.to_string(), "", None);
    qemu_io(
        d,
        "base.qcow2",
        &["write -P 0x11 0 8M", "write -c -P 0x12 8M 1M"],
    );
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c2"]);
    qemu_io(
        d,
        "top.qcow2",
        &["write -P 0x21 7M 2M", "write -c -P 0x22 12M 1M"],
    );
    // 3000-byte stripes over [6M, 14M), a random third of them, each written once.
    let stripe = 3000u64;
    let first = 6 * M / stripe + 1;
    let last = 14 * M / stripe;
    let mut ops = Vec::new();
    for i in first..last {
        if rng.next() % 3 != 0 {
            continue;
        }
        let (off, len) = (i * stripe, stripe);
        let kind = match rng.next() % 6 {
            0 => Kind::ZeroRange,
            1 => Kind::PunchHole,
            2 => Kind::Pattern((rng.next() % 255 + 1) as u8),
            _ => Kind::Data(rng.next()),
        };
        ops.push(Op { kind, off, len });
    }
    // Shuffle, so that neighbours go to different threads.
    for i in (1..ops.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        ops.swap(i, j);
    }
    let top = d.join("top.qcow2");
    let twin = d.join("twin.qcow2");
    std::fs::copy(&top, &twin).unwrap();
    std::fs::copy(&top, d.join("pre.qcow2")).unwrap();
    print_log(what, &ops);
    let mnt = rw(&top, &mount_dir(d, "mnt"));
    let disk = mnt.path("current/disk.img");
    let changed = mnt.path("c2/changed.img");
    let stop = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = [disk.clone(), changed]
        .into_iter()
        .map(|p| {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<u64, String> {
                let f = File::open(&p).map_err(|e| e.to_string())?;
                let mut n = 0u64;
                let mut at = 6 * M;
                while stop.load(Ordering::SeqCst) == 0 {
                    pread_full(&f, at, 200_000).map_err(|e| format!("{}: {e}", p.display()))?;
                    at = if at > 14 * M { 6 * M } else { at + 123_457 };
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let chunks: Vec<Vec<Op>> = (0..4)
        .map(|k| ops.iter().skip(k).step_by(4).cloned().collect())
        .collect();
    let writers: Vec<_> = chunks
        .into_iter()
        .map(|c| {
            let disk = disk.clone();
            std::thread::spawn(move || apply_through_mount(&disk, &c, "concurrent writer"))
        })
        .collect();
    let results = timed_for("writers", Duration::from_secs(90), move || {
        writers
            .into_iter()
            .map(|w| w.join().is_ok())
            .collect::<Vec<_>>()
    });
    stop.store(1, Ordering::SeqCst);
    let reads = timed("readers", move || {
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(results.iter().all(|&ok| ok), "a writer thread failed");
    for r in reads {
        r.unwrap_or_else(|e| panic!("{what}: a concurrent read failed: {e}"));
    }
    mnt.unmount();
    apply_with_qemu_io(d, "twin.qcow2", &ops, "twin");
    assert_check_clean(&twin, &format!("{what} (fixture: the qemu-io twin)"));
    assert_check_clean(&top, what);
    assert_identical(&top, &twin, what);
    let got = dirty(d, "top", &top, "c2");
    let qemu = dirty(d, "twin", &twin, "c2");
    assert_eq!(got, qemu, "{what}: bitmap c2 of the top vs the twin");
}

/// SIGTERM to the daemon is a clean unmount: bitmaps stored, in_use cleared.
#[test]
fn sigterm_is_a_clean_unmount() {
    let t = tempdir();
    let d = t.path();
    let top = common::c1_chain(
        d,
        ["base.qcow2", "top.qcow2"],
        "8M",
        &["write -P 1 0 8M"],
        &[],
    );
    let mut mnt = Mount::foreground(&top, &mount_dir(d, "mnt"), Some("rw"), &d.join("log"));
    let disk = mnt.path("current/disk.img");
    {
        let f = open_rw(&disk).unwrap();
        timed("pwrite", move || {
            f.write_all_at(&[7u8; 5000], 3 * M - 100).unwrap();
            f.sync_all().unwrap();
        });
    }
    mnt.signal_child(libc::SIGTERM);
    mnt.wait_child_ok("ckptfs -f after SIGTERM");
    assert!(!is_mounted(&mnt.dir), "still mounted after SIGTERM");
    drop(mnt);
    assert_check_clean(&top, "SIGTERM");
    let list = qemu_bitmaps(&top, false);
    assert!(
        !bitmap(&list, "c1", &top)
            .flags
            .iter()
            .any(|f| f == "in-use"),
        "SIGTERM must store the bitmaps and clear in_use: {list:?}"
    );
    assert_eq!(
        dirty(d, "top", &top, "c1"),
        vec![(3 * M - K64, 3 * M + K64)],
        "c1 after SIGTERM"
    );
}

// ---------------------------------------------------------------------------------------
// Test 2: since-sets follow writes at once

#[test]
fn since_sets_follow_writes_live() {
    let t = tempdir();
    let d = t.path();
    create(d, "base.qcow2", "16M", "", None);
    qemu_io(d, "base.qcow2", &["write -P 0x11 0 16M"]);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c1"]);
    let mut h = History::default();
    h.mark("base.qcow2");
    h.mark("c1");
    h.io(d, "top.qcow2", &["write -P 0x22 1M 64k"]);
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c2"]);
    h.mark("c2");
    let size = 16 * M;

    let mnt = rw(&d.join("top.qcow2"), &mount_dir(d, "mnt"));
    let disk = mnt.path("current/disk.img");
    let f = open_rw(&disk).expect("open current/disk.img for writing");
    let f = Arc::new(f);
    let mut zero: Vec<(u64, u64)> = Vec::new();
    let mut rng = Prng(seed("since-sets live"));
    // Round 1: one unaligned write, read at once through c2 and c1.
    let mut data = vec![0u8; 100_000];
    rng.fill(&mut data);
    let (off, len) = (5 * M + 1234, data.len() as u64);
    {
        let (f, data) = (f.clone(), data.clone());
        timed("pwrite", move || f.write_all_at(&data, off)).unwrap();
    }
    h.writes
        .push((100, off, len, format!("pwrite {off} {len}")));
    let changed = mnt.path("c2/changed.img");
    let map = seek_map(&changed);
    assert_eq!(
        intersect(&map, &[(off, off + len)]),
        vec![(off, off + len)],
        "c2/changed.img SEEK_DATA map right after a write to [{off}, {}): {map:?}",
        off + len
    );
    let got = {
        let p = changed.clone();
        timed("read changed.img", move || {
            pread_full(&File::open(&p).unwrap(), off, len as usize).unwrap()
        })
    };
    common::assert_same(&got, &data, off, "c2/changed.img right after the write");
    let ext = parse_extents(&read_text(&mnt.path("c2/extents")), "c2");
    assert!(
        ext.iter()
            .any(|e| e.off <= off && e.off + e.len >= off + len && !e.zero),
        "c2/extents should list [{off}, {}) at once: {ext:?}",
        off + len
    );
    // Round 2: whole-cluster zeroing, an unaligned punch hole, an overwrite; every view.
    {
        let f = f.clone();
        timed("fallocate", move || {
            fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 8 * M, 128 * K).unwrap();
            fallocate(
                &f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                9 * M + 100,
                5000,
            )
            .unwrap();
            f.write_all_at(&[0x77u8; 3000], 5 * M + 60_000).unwrap();
        });
    }
    zero.push((8 * M, 8 * M + 128 * K));
    h.writes.push((101, 8 * M, 128 * K, "fallocate -z".into()));
    h.writes
        .push((102, 9 * M + 100, 5000, "fallocate -p".into()));
    h.writes
        .push((103, 5 * M + 60_000, 3000, "pwrite 0x77".into()));
    let truth = read(&disk);
    assert_eq!(truth.len() as u64, size);
    assert!(truth[8 * M as usize..(8 * M + 128 * K) as usize]
        .iter()
        .all(|&b| b == 0));
    // Bitmap checkpoints, and the backing layer's checkpoint (allocation in the top).
    for c in ["c1", "c2", "base.qcow2"] {
        let expect = h.since_blocks(c, K64, size);
        check_checkpoint(&mnt, c, K64, &expect, &h.since(c), &truth, &zero);
    }
    // The disk at the layer checkpoint is still the backing file's.
    assert!(
        read(&mnt.path("base.qcow2/disk.img"))
            .iter()
            .all(|&b| b == 0x11),
        "base.qcow2/disk.img must not see writes to the top"
    );
    drop(f);
    mnt.unmount();
    assert_check_clean(&d.join("top.qcow2"), "since-sets live");
}

// ---------------------------------------------------------------------------------------
// Test 3: kill -9 in the middle of a long write

#[test]
fn kill9_keeps_fsynced_data() {
    let t = tempdir();
    let d = t.path();
    let size = 320 * M;
    create(d, "base.qcow2", &size.to_string(), "", None);
    qemu_io(d, "base.qcow2", &["write -P 0x11 0 4M"]);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c1"]);
    qemu_img(d, &["bitmap", "--add", "--disable", "top.qcow2", "c2"]);
    let top = d.join("top.qcow2");
    let seed = seed("kill -9");

    let mut mnt = Mount::foreground(
        &top,
        &mount_dir(d, "mnt"),
        Some("rw"),
        &d.join("ckptfs.log"),
    );
    let pid = mnt.child_pid().unwrap();
    let disk = mnt.path("current/disk.img");
    let w = spawn_chunk_writer(disk.clone(), seed, 256, |i| (i + 1) % 16 == 0);
    let (written, synced, writer) = (&w.written, &w.synced, w.thread);
    let start = Instant::now();
    while synced.load(Ordering::SeqCst) < 48 * M {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writer did not fsync 48 MiB within 60 s (written {})",
            written.load(Ordering::SeqCst)
        );
        assert!(!writer.is_finished(), "the writer stopped early");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(30));
    // SAFETY: kill(2) of the ckptfs -f child this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let st = mnt.wait_child(ACCESS_TIMEOUT);
    let fsynced = synced.load(Ordering::SeqCst);
    let wrote = written.load(Ordering::SeqCst);
    let outcome = timed("writer thread", move || writer.join().unwrap());
    println!("kill -9: daemon {st}, writer: {outcome}; {wrote} bytes written, {fsynced} fsynced");
    let r = run_files(None, "umount", &[OsStr::new("-l"), mnt.dir.as_os_str()]);
    assert!(r.ok || !is_mounted(&mnt.dir), "umount -l: {r:?}");
    drop(mnt);

    let (code, out) = check(&top);
    assert!(
        code == Some(0) || code == Some(3),
        "after kill -9, qemu-img check must report at most leaks (0 or 3), got {code:?}:\n{out}"
    );
    let raw = d.join("after.raw");
    common::run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            top.as_os_str(),
            raw.as_os_str(),
        ],
    );
    let f = File::open(&raw).unwrap();
    for i in 0..fsynced / M {
        let got = pread_full(&f, i * M, M as usize).unwrap();
        common::assert_same(
            &got,
            &chunk_data(seed, i),
            i * M,
            &format!("fsynced chunk {i} after kill -9"),
        );
    }
    for b in qemu_bitmaps(&top, false) {
        assert!(
            b.flags.iter().any(|f| f == "in-use"),
            "after kill -9 bitmap {} must stay in use: {:?}",
            b.name,
            b.flags
        );
    }
    assert_eq!(qemu_bitmaps(&top, false).len(), 2);
    // In-use bitmaps are sticky: a later rw mount writes, keeps them in use, leaves at most
    // the old leaks.
    let mnt = rw(&top, &mount_dir(d, "mnt2"));
    apply_through_mount(
        &mnt.path("current/disk.img"),
        &[Op::data(300 * M + 5, 70_000, seed)],
        "remount after kill -9",
    );
    mnt.unmount();
    let (code2, out2) = check(&top);
    assert!(
        code2 == Some(0) || code2 == Some(3),
        "after kill -9 and a later rw mount: {code2:?}\n{out2}"
    );
    for b in qemu_bitmaps(&top, false) {
        assert!(
            b.flags.iter().any(|f| f == "in-use"),
            "a later rw mount must keep {} in use: {:?}",
            b.name,
            b.flags
        );
    }
    let mut want = vec![0u8; 70_000];
    Prng(seed).fill(&mut want);
    let raw2 = d.join("after2.raw");
    common::run(
        "qemu-img",
        &[
            OsStr::new("convert"),
            OsStr::new("-O"),
            OsStr::new("raw"),
            top.as_os_str(),
            raw2.as_os_str(),
        ],
    );
    let got = pread_full(&File::open(&raw2).unwrap(), 300 * M + 5, 70_000).unwrap();
    common::assert_same(&got, &want, 300 * M + 5, "write after the remount");
}

// ---------------------------------------------------------------------------------------
// Test 4: locks

fn says_locked(r: &Ran) -> bool {
    let t = format!("{}{}", r.stdout, r.stderr).to_lowercase();
    t.contains("lock") || t.contains("in use")
}

#[test]
fn locks_exclude_writers() {
    let t = tempdir();
    let d = t.path();
    let top = common::c1_chain(
        d,
        ["base.qcow2", "top.qcow2"],
        "8M",
        &["write -P 1 0 1M"],
        &[],
    );
    {
        let mnt = rw(&top, &mount_dir(d, "mnt"));
        let r = run_files(Some(d), "qemu-io", &["-c", "write 0 4k", "top.qcow2"]);
        assert!(
            !r.ok || r.stdout.contains("failed"),
            "qemu-io write on an rw-mounted image must fail: {r:?}"
        );
        assert!(
            says_locked(&r),
            "qemu-io should fail with a lock error: {r:?}"
        );
        let (qsd, r) = start_writer(d, &top, "qsd");
        assert!(
            !r.ok,
            "qemu-storage-daemon with a writable export of an rw-mounted image must fail: {r:?}"
        );
        assert!(
            says_locked(&r),
            "qemu-storage-daemon: lock error expected: {r:?}"
        );
        drop(qsd);
        let r = Mount::try_new(&top, &mount_dir(d, "mnt2"), Some("rw"))
            .err()
            .expect("a second ckptfs -o rw of the same image must be refused");
        assert!(says_locked(&r), "second rw mount: {r:?}");
        let r = Mount::try_new(&top, &mount_dir(d, "mnt3"), None)
            .err()
            .expect("a read-only ckptfs of an rw-mounted image must be refused (QEMU would)");
        assert!(says_locked(&r), "ro mount: {r:?}");
        let r = run_files(Some(d), "qemu-img", &["info", "-U", "top.qcow2"]);
        assert!(r.ok, "qemu-img info -U must work while mounted rw: {r:?}");
        // Backing layers are locked against writers too.
        let r = run_files(Some(d), "qemu-io", &["-c", "write 0 4k", "base.qcow2"]);
        assert!(
            (!r.ok || r.stdout.contains("failed")) && says_locked(&r),
            "qemu-io write on the backing file of an rw mount must fail with a lock error: {r:?}"
        );
        // A force-share reader sees what the rw mount wrote and fsynced.
        {
            let f = open_rw(&mnt.path("current/disk.img")).unwrap();
            timed("pwrite", move || {
                f.write_all_at(&[0x5cu8; 10000], 2 * M + 3).unwrap();
                f.sync_all().unwrap();
            });
        }
        let fs = Mount::new(&top, &mount_dir(d, "mnt-fs"), Some("ro,force_share"));
        let got = read_range_mount(&fs.path("current/disk.img"), 2 * M, 20000);
        assert!(
            got[3..10003].iter().all(|&b| b == 0x5c) && got[..3].iter().all(|&b| b == 0),
            "a force_share mount must read the rw mount's fsynced write"
        );
        fs.unmount();
        mnt.unmount();
    }
    // The locks are gone after unmount.
    let r = run_files(Some(d), "qemu-img", &["info", "top.qcow2"]);
    assert!(r.ok, "qemu-img info after unmount: {r:?}");
    // A running writer makes ckptfs -o rw refuse.
    let (qsd, r) = start_writer(d, &top, "live");
    assert!(r.ok, "qemu-storage-daemon: {r:?}");
    let dir = mount_dir(d, "mnt4");
    let msg = expect_refusal(&top, &dir, Some("rw"), &[]);
    assert!(
        msg.to_lowercase().contains("lock") || msg.to_lowercase().contains("in use"),
        "the refusal should name the lock: {msg}"
    );
    qsd.signal_and_wait(libc::SIGTERM);
    drop(qsd);
    let mnt = rw(&top, &dir);
    mnt.unmount();
    assert_check_clean(&top, "locks");
}

// ---------------------------------------------------------------------------------------
// Test 5: refusals, and the in_use flag around a mount

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what}: should have failed, got {v:?}"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn set_incompatible_bit(image: &Path, bit: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72).unwrap();
    let v = u64::from_be_bytes(b) | 1 << bit;
    f.write_all_at(&v.to_be_bytes(), 72).unwrap();
}

#[test]
fn refusals_and_bitmap_flags() {
    let t = tempdir();
    let d = t.path();
    let size = 8 * M;
    let top = common::c1_chain(
        d,
        ["base.qcow2", "top.qcow2"],
        "8M",
        &["write -P 1 0 8M"],
        &["write -P 2 1M 64k"],
    );
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c2"]);
    qemu_io(d, "top.qcow2", &["write -P 3 7M 1M"]);
    qemu_img(d, &["bitmap", "--disable", "top.qcow2", "c1"]);
    let pre = d.join("pre.qcow2");
    std::fs::copy(&top, &pre).unwrap();
    let pre_bytes = std::fs::read(&top).unwrap();

    {
        let mnt = rw(&top, &mount_dir(d, "mnt"));
        let list = qemu_bitmaps(&top, true);
        assert_eq!(list.len(), 2, "{list:?}");
        for b in &list {
            assert!(
                b.flags.iter().any(|f| f == "in-use"),
                "while mounted rw, qemu-img info -U must show {} in use: {list:?}",
                b.name
            );
        }
        let disk = mnt.path("current/disk.img");
        let tail_before = read_range_mount(&disk, size - 8192, 8192);
        let p = disk.clone();
        let tail = tail_before.clone();
        let errs = timed("refused operations", move || {
            let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
            let mut e = Vec::new();
            // A write crossing the end: refused whole, or (the kernel sends the last page
            // inside the disk as its own request) a short write of exactly the part inside
            // the disk, like a block device. The bytes inside are the current ones, so
            // nothing changes either way; the part past the end must not be written.
            let mut cross = tail[8192 - 100..].to_vec();
            cross.extend([9u8; 100]);
            match f.write_at(&cross, size - 100) {
                Err(err) => e.push(("write across the end", err.raw_os_error().unwrap_or(-1))),
                Ok(n) => assert_eq!(
                    n, 100,
                    "write across the end: only the part inside the disk"
                ),
            }
            e.push((
                "truncate smaller",
                errno_of(f.set_len(size - 4096), "truncate"),
            ));
            e.push((
                "truncate larger",
                errno_of(f.set_len(size + 4096), "truncate"),
            ));
            f.set_len(size)
                .expect("truncate to the same size is no change");
            e.push((
                "write at the end",
                errno_of(f.write_at(&[9u8; 10], size), "write at the end"),
            ));
            e.push((
                "write past the end",
                errno_of(f.write_at(&[9u8; 10], size + M), "write past the end"),
            ));
            e.push((
                "fallocate -z across the end",
                errno_of(
                    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, size - 4096, 8192),
                    "fallocate across the end",
                ),
            ));
            e.push((
                "open O_TRUNC",
                errno_of(
                    OpenOptions::new().write(true).truncate(true).open(&p),
                    "open O_TRUNC",
                ),
            ));
            e
        });
        for (what, errno) in &errs {
            assert!(*errno > 0, "{what}: no errno");
        }
        for (what, errno) in &errs {
            if what.starts_with("truncate") || *what == "open O_TRUNC" {
                assert_eq!(
                    *errno,
                    libc::EPERM,
                    "{what}: expected EPERM, got errno {errno}"
                );
            }
        }
        assert_eq!(metadata(&disk).len(), size, "size after refused changes");
        assert_eq!(
            read_range_mount(&disk, size - 8192, 8192),
            tail_before,
            "the last bytes changed after refused writes"
        );
        for f in [
            "c2/changed.img",
            "c1/bitmap.bin",
            "c2/extents",
            "current/info.json",
            "checkpoints.json",
        ] {
            let p = mnt.path(f);
            let r = timed(&format!("open {f} for writing"), move || {
                OpenOptions::new().write(true).open(&p).map(|_| ())
            });
            assert_eq!(
                errno_of(r, f),
                libc::EACCES,
                "{f}: opening for writing on an rw mount must fail with EACCES"
            );
        }
        mnt.unmount();
    }
    let list = qemu_bitmaps(&top, false);
    for b in &list {
        assert!(
            !b.flags.iter().any(|f| f == "in-use"),
            "after a clean unmount {} must not be in use: {list:?}",
            b.name
        );
    }
    assert_check_clean(&top, "refusals");
    assert_identical(&top, &pre, "refusals: nothing may change");
    let post_bytes = std::fs::read(&top).unwrap();
    assert!(
        post_bytes == pre_bytes,
        "an rw mount with only refused operations changed the top file (first difference at \
         byte {:?}; lengths {} and {})",
        post_bytes.iter().zip(&pre_bytes).position(|(a, b)| a != b),
        pre_bytes.len(),
        post_bytes.len()
    );
    // QEMU accepts the bitmaps.
    qemu_img(d, &["bitmap", "--enable", "top.qcow2", "c1"]);
    let c2 = dirty(d, "top", &top, "c2");
    assert_eq!(c2, vec![(7 * M, 8 * M)], "c2 through qemu-nbd -B");

    // Refused at mount.
    let dir = mount_dir(d, "mnt-refused");
    expect_refusal(&top, &dir, Some("rw,force_share"), &["force_share"]);
    std::fs::copy(&pre, d.join("snap.qcow2")).unwrap();
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    expect_refusal(&d.join("snap.qcow2"), &dir, Some("rw"), &["snapshot"]);
    std::fs::copy(&pre, d.join("dirty.qcow2")).unwrap();
    set_incompatible_bit(&d.join("dirty.qcow2"), 0);
    expect_refusal(&d.join("dirty.qcow2"), &dir, Some("rw"), &["dirty"]);
    std::fs::copy(&pre, d.join("corrupt.qcow2")).unwrap();
    set_incompatible_bit(&d.join("corrupt.qcow2"), 1);
    expect_refusal(&d.join("corrupt.qcow2"), &dir, Some("rw"), &["corrupt"]);
    // Refused images were not touched.
    let snap = qemu_bitmaps(&d.join("snap.qcow2"), false);
    assert!(
        snap.iter().all(|b| !b.flags.iter().any(|f| f == "in-use")),
        "{snap:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Test 6: restore a full backup and two incrementals into a fresh image

/// Copy `[s, e)` ranges of `src` (a local file) into the mounted disk.
fn copy_ranges(src: &Path, disk: &Path, ranges: &[(u64, u64)]) {
    let (src, disk, ranges) = (src.to_path_buf(), disk.to_path_buf(), ranges.to_vec());
    timed_for("copy ranges", Duration::from_secs(60), move || {
        let i = File::open(&src).unwrap();
        let o = OpenOptions::new().write(true).open(&disk).unwrap();
        for (s, e) in ranges {
            let mut at = s;
            while at < e {
                let n = (e - at).min(M);
                let b = pread_full(&i, at, n as usize).unwrap();
                o.write_all_at(&b, at).unwrap();
                at += n;
            }
        }
        o.sync_all().unwrap();
    });
}

/// Make `ranges` read as zeros through the mounted disk (`mode` of fallocate).
fn zero_ranges(disk: &Path, ranges: &[(u64, u64)], mode: i32) {
    let (disk, ranges) = (disk.to_path_buf(), ranges.to_vec());
    timed_for("zero ranges", Duration::from_secs(60), move || {
        let o = OpenOptions::new().write(true).open(&disk).unwrap();
        for (s, e) in ranges {
            fallocate(&o, mode, s, e - s).unwrap();
        }
    });
}

/// One incremental taken from a ro mount of `src`: (sparse copy of changed.img, extents).
fn take_incremental(d: &Path, src: &Path, ckpt: &str, n: usize) -> (PathBuf, Vec<Extent>) {
    let mnt = Mount::new(src, &mount_dir(d, &format!("mnt-inc{n}")), None);
    let inc = d.join(format!("inc{n}.img"));
    cp_sparse(&mnt.path(&format!("{ckpt}/changed.img")), &inc);
    let ext = parse_extents(&read_text(&mnt.path(&format!("{ckpt}/extents"))), ckpt);
    mnt.unmount();
    (inc, ext)
}

#[test]
fn restore_full_plus_incrementals() {
    let t = tempdir();
    let d = t.path();
    let size = 48 * M;
    std::fs::write(
        d.join("seed.raw"),
        common::varied_data(size as usize, 0xfeed),
    )
    .unwrap();
    qemu_img(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "seed.raw",
            "src-base.qcow2",
        ],
    );
    create(d, "src.qcow2", "", "", Some(("src-base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "src.qcow2", "c1"]);
    let src = d.join("src.qcow2");
    // Full backup at c1.
    let full = d.join("full.raw");
    {
        let mnt = Mount::new(&src, &mount_dir(d, "mnt-full"), None);
        cp_sparse(&mnt.path("current/disk.img"), &full);
        mnt.unmount();
    }
    qemu_io(
        d,
        "src.qcow2",
        &[
            "write -P 0x41 1M 64k",
            "write -P 0x42 3000000 100000",
            "write -z 8M 256k",
            "write -z 10000000 5000",
            "discard 12M 128k",
            "write -P 0x43 47M 1M",
        ],
    );
    qemu_img(d, &["bitmap", "--add", "src.qcow2", "c2"]);
    let (inc1, ext1) = take_incremental(d, &src, "c1", 1);
    qemu_io(
        d,
        "src.qcow2",
        &[
            "write -P 0x51 1M 4k",
            "write -P 0x52 20M 640k",
            "write -z 3000000 70000",
            "write -P 0x53 8M 64k",
            "write -z 30M 1M",
        ],
    );
    let (inc2, ext2) = take_incremental(d, &src, "c2", 2);

    // Target: a fresh image with a recording bitmap.
    create(d, "target.qcow2", &size.to_string(), "", None);
    qemu_img(d, &["bitmap", "--add", "target.qcow2", "restore"]);
    let target = d.join("target.qcow2");
    let mut touched: Vec<(u64, u64)> = Vec::new();
    {
        let mnt = rw(&target, &mount_dir(d, "mnt-target"));
        let disk = mnt.path("current/disk.img");
        let full_map = seek_map_local(&full).unwrap();
        copy_ranges(&full, &disk, &full_map);
        touched.extend(&full_map);
        for (inc, ext) in [(&inc1, &ext1), (&inc2, &ext2)] {
            let map = seek_map_local(inc).unwrap();
            let zero_lines: Vec<(u64, u64)> = ext
                .iter()
                .filter(|e| e.zero)
                .map(|e| (e.off, e.off + e.len))
                .collect();
            let data_lines: Vec<(u64, u64)> = merge(
                ext.iter()
                    .filter(|e| !e.zero)
                    .map(|e| (e.off, e.off + e.len))
                    .collect(),
            );
            // cp --sparse turns changed blocks reading zeros into holes: those parts of data
            // lines are punched, the zero lines zeroed, then the data copied.
            zero_ranges(&disk, &zero_lines, libc::FALLOC_FL_ZERO_RANGE);
            let holes = subtract(&data_lines, &map);
            zero_ranges(
                &disk,
                &holes,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            );
            copy_ranges(inc, &disk, &map);
            touched.extend(zero_lines);
            touched.extend(data_lines);
            touched.extend(map);
        }
        mnt.unmount();
    }
    assert_identical(&target, &src, "restore: target vs source");
    assert_check_clean(&target, "restore target");
    let list = qemu_bitmaps(&target, false);
    let b = bitmap(&list, "restore", &target);
    assert!(!b.flags.iter().any(|f| f == "in-use"), "{list:?}");
    let got = dirty(d, "target", &target, "restore");
    let want = round_to_blocks(&merge(touched), b.granularity, size);
    assert_eq!(
        got, want,
        "restore: the target's enabled bitmap (QEMU's view)"
    );
}

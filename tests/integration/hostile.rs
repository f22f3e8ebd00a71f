//! Hostile images: real QEMU-made images, truncated and with metadata fields overwritten by
//! hostile values, must make ckptfs return `Err` (or work), never panic, hang or allocate
//! without bound. Also the named refusals (LUKS, external data file, empty, text, truncated
//! header) and regression inputs found by the fuzz targets in contrib/fuzz.
//!
//! The cases run in a worker process (this test binary re-run with `CKPTFS_HOSTILE_WORKER` set)
//! whose address space is capped at `AS_LIMIT`, so an unbounded allocation aborts the worker
//! instead of the machine; the parent names the case that killed it and restarts the worker
//! after it. In the worker every case runs in its own thread under `catch_unwind` with a 10 s
//! limit.

use crate::common::{create, qemu_img, qemu_io, tempdir, varied_data, Prng};
use ckptfs::chain::write::Writer;
use ckptfs::chain::{Chain, Disk};
use ckptfs::checkpoint::{render, Engine, Model};
use ckptfs::qcow2::bitmaps::parse_directory;
use ckptfs::qcow2::header::Header;
use ckptfs::qcow2::snapshot::parse_table;
use ckptfs::qcow2::Table;
use std::cell::Cell;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Running one case

thread_local! {
    /// Set in case threads, so the panic hook knows whose panics to record.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Panic locations of hostile-image threads (the payload has only the message).
static LOCATIONS: Mutex<Vec<(std::thread::ThreadId, String)>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();
/// While set, panics in hostile threads are not printed (they are reported at the end).
static QUIET: AtomicBool = AtomicBool::new(true);

fn install_hook() {
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if GUARDED.with(|g| g.get()) {
                let loc = info
                    .location()
                    .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                    .unwrap_or_default();
                LOCATIONS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((std::thread::current().id(), loc));
                if QUIET.load(Ordering::Relaxed) {
                    return;
                }
            }
            prev(info)
        }));
    });
}

/// What exercising one image did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Refused,
    Opened,
}

const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Run `f` on a fresh guarded thread: Ok(outcome), or Err(text of the panic or hang).
fn guarded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    install_hook();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        GUARDED.with(|g| g.set(true));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let id = std::thread::current().id();
        GUARDED.with(|g| g.set(false));
        let r = r.map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            let mut locs = LOCATIONS.lock().unwrap_or_else(|e| e.into_inner());
            let loc = locs
                .iter()
                .rev()
                .find(|(t, _)| *t == id)
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            locs.retain(|(t, _)| *t != id);
            format!("panicked at {loc}: {msg}")
        });
        let _ = tx.send(r);
    });
    match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(r) => {
            let _ = handle.join();
            r
        }
        // The thread is left running; the test fails anyway.
        Err(_) => Err(format!("did not finish within {CASE_TIMEOUT:?}")),
    }
}

/// Read a handful of 64 KiB ranges of `disk`: both ends and spread offsets.
fn read_some(disk: &Disk, seed: u64, n: usize) {
    let size = disk.size();
    let mut buf = vec![0u8; 65536];
    let mut rng = Prng(seed);
    for i in 0..n {
        let off = match i {
            0 => 0,
            1 => size.saturating_sub(30000),
            _ => rng.next() % size.max(1),
        };
        if let Err(e) = disk.read(off, &mut buf) {
            let _ = e.to_string();
        }
    }
}

/// Open `top` and, if it opens, use everything ckptfs exposes of it in bounded amounts.
fn exercise(top: &Path) -> Outcome {
    let chain = match Chain::open(top) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return Outcome::Refused;
        }
    };
    read_some(&Disk::new(chain.clone(), 0, Table::Active), 1, 12);
    for (li, layer) in chain.layers.iter().enumerate() {
        if li > 0 {
            read_some(&Disk::new(chain.clone(), li, Table::Active), 2, 4);
        }
        if let Some(q) = layer.qcow2() {
            for si in 0..q.snapshots.len().min(4) {
                read_some(&Disk::new(chain.clone(), li, Table::Snapshot(si)), 3, 4);
            }
            for bi in 0..q.bitmaps().len().min(8) {
                let _ = q.bitmap_table(bi);
                for k in 0..4 {
                    let _ = q.bitmap_cluster(bi, k);
                }
            }
        }
    }
    let _ = render::chain_json(&chain);
    let model = Model::build(chain.clone(), &Default::default());
    let engine = Engine::new(Arc::new(model), 64 << 20);
    let mut small = vec![0u8; 4096];
    for i in 0..engine.model.checkpoints.len() {
        let _ = engine.changed_bytes(i);
        let _ = engine.extents(i);
        let _ = engine.read_bitmap(i, 0, &mut small);
        let _ = engine.read_changed(i, 0, &mut small);
        let _ = render::checkpoint_json(&engine, i, true);
        if let Some(disk) = engine.model.checkpoints[i].disk.clone() {
            read_some(&disk, 4 + i as u64, 4);
        }
    }
    let _ = render::checkpoints_json(&engine);
    let _ = render::ls_text(&engine);
    Outcome::Opened
}

/// Open `top` for writing (its read-only handles must be closed: the locks conflict) and write,
/// zero and close as an rw mount would. Refusals and errors are fine; panics and hangs are not.
/// True if the writer opened.
fn exercise_rw(top: &Path) -> bool {
    let Ok(chain) = Chain::open_with(top, true) else {
        return false;
    };
    let chain = Arc::new(chain);
    let size = chain.top().qcow2().map_or(0, |q| q.size());
    let Ok(mut w) = Writer::open(chain) else {
        return false;
    };
    let data = varied_data(70_000, 11);
    for (off, len) in [
        (0, 4096),
        (size / 2 + 777, 70_000),
        (size.saturating_sub(5000), 5000),
    ] {
        let len = len.min(size.saturating_sub(off) as usize);
        let _ = w.write(off, &data[..len]);
    }
    let _ = w.zero(size / 4, (size / 4).min(1 << 20));
    let _ = w.flush();
    let _ = w.close();
    true
}

// ---------------------------------------------------------------------------------------------
// Fixtures and the fields worth overwriting

/// One image to mutate: the file whose bytes change and the file opened afterwards (different
/// when the mutated file is a backing file).
struct Target {
    name: &'static str,
    mutate: PathBuf,
    open: PathBuf,
}

fn make_fixtures(dir: &Path) -> Vec<Target> {
    let raw = dir.join("data.raw");
    std::fs::write(&raw, varied_data(1 << 20, 7)).unwrap();

    create(dir, "bitmaps.qcow2", "4M", "cluster_size=4k", None);
    qemu_img(dir, &["bitmap", "--add", "bitmaps.qcow2", "c1"]);
    qemu_io(dir, "bitmaps.qcow2", &["write -P 1 0 64k"]);
    qemu_img(dir, &["bitmap", "--add", "-g", "8k", "bitmaps.qcow2", "c2"]);
    qemu_io(
        dir,
        "bitmaps.qcow2",
        &["write -P 2 1M 64k", "write -z 2M 8k", "discard 0 4k"],
    );
    qemu_img(dir, &["bitmap", "--disable", "bitmaps.qcow2", "c1"]);

    for (name, opts) in [
        ("zlib.qcow2", "cluster_size=4k"),
        ("zstd.qcow2", "cluster_size=4k,compression_type=zstd"),
    ] {
        qemu_img(
            dir,
            &[
                "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "data.raw", name,
            ],
        );
    }

    create(dir, "snap.qcow2", "2M", "cluster_size=4k", None);
    qemu_io(dir, "snap.qcow2", &["write -P 3 0 128k"]);
    qemu_img(dir, &["snapshot", "-c", "s1", "snap.qcow2"]);
    qemu_io(
        dir,
        "snap.qcow2",
        &["write -P 4 64k 128k", "write -z 512k 4k"],
    );

    create(dir, "base.qcow2", "2M", "cluster_size=4k", None);
    qemu_io(dir, "base.qcow2", &["write -P 5 0 1M"]);
    create(
        dir,
        "top.qcow2",
        "3M",
        "cluster_size=4k",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_img(dir, &["bitmap", "--add", "top.qcow2", "t1"]);
    qemu_io(
        dir,
        "top.qcow2",
        &[
            "write -P 6 8k 64k",
            "write -z 256k 64k",
            "write -c -P 7 1M 4k",
        ],
    );

    create(
        dir,
        "extl2.qcow2",
        "2M",
        "extended_l2=on,cluster_size=16k",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        dir,
        "extl2.qcow2",
        &["write -P 8 4k 8k", "write -z 32k 4k", "write -P 9 100k 40k"],
    );

    create(dir, "v2.qcow2", "2M", "compat=0.10,cluster_size=4k", None);
    qemu_io(dir, "v2.qcow2", &["write -P 10 0 64k"]);

    target_list(dir)
}

/// The fixtures `make_fixtures` made in `dir`.
fn target_list(dir: &Path) -> Vec<Target> {
    let t = |name: &'static str, mutate: &str, open: &str| Target {
        name,
        mutate: dir.join(mutate),
        open: dir.join(open),
    };
    vec![
        t("bitmaps", "bitmaps.qcow2", "bitmaps.qcow2"),
        t("zlib", "zlib.qcow2", "zlib.qcow2"),
        t("zstd", "zstd.qcow2", "zstd.qcow2"),
        t("snapshot", "snap.qcow2", "snap.qcow2"),
        t("overlay", "top.qcow2", "top.qcow2"),
        t("backing", "base.qcow2", "top.qcow2"),
        t("extl2", "extl2.qcow2", "extl2.qcow2"),
        t("v2", "v2.qcow2", "v2.qcow2"),
    ]
}

/// A metadata field: its name, byte offset and width (1, 2, 4 or 8 bytes).
#[derive(Debug, Clone)]
struct Field {
    name: String,
    off: usize,
    width: usize,
}

pub(crate) fn be(b: &[u8], off: usize, width: usize) -> u64 {
    b[off..off + width]
        .iter()
        .fold(0u64, |v, &x| v << 8 | u64::from(x))
}

/// Find the fields of `img` worth overwriting, using ckptfs's own parsers where they give
/// offsets and small walks where they do not.
fn fields(img: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    let mut f = |name: String, off: usize, width: usize| {
        if off + width <= img.len() {
            out.push(Field { name, off, width });
        }
    };
    let h = Header::parse(img, img.len() as u64).expect("fixture header parses");
    let cs = h.cluster_size() as usize;
    for (name, off, width) in [
        ("magic", 0, 4),
        ("version", 4, 4),
        ("backing_file_offset", 8, 8),
        ("backing_file_size", 16, 4),
        ("cluster_bits", 20, 4),
        ("size", 24, 8),
        ("crypt_method", 32, 4),
        ("l1_size", 36, 4),
        ("l1_table_offset", 40, 8),
        ("refcount_table_offset", 48, 8),
        ("refcount_table_clusters", 56, 4),
        ("nb_snapshots", 60, 4),
        ("snapshots_offset", 64, 8),
    ] {
        f(format!("header.{name}"), off, width);
    }
    if h.version == 3 {
        for (name, off, width) in [
            ("incompatible_features", 72, 8),
            ("compatible_features", 80, 8),
            ("autoclear_features", 88, 8),
            ("refcount_order", 96, 4),
            ("header_length", 100, 4),
            ("compression_type", 104, 1),
        ] {
            f(format!("header.{name}"), off, width);
        }
    }
    if h.backing_file_offset != 0 {
        f("backing name[0]".into(), h.backing_file_offset as usize, 1);
    }
    // Header extensions.
    let mut off = h.header_length as usize;
    for i in 0..16 {
        let ty = be(img, off, 4) as u32;
        let len = be(img, off + 4, 4) as usize;
        f(format!("ext{i}({ty:#x}).type"), off, 4);
        if ty == 0 {
            break;
        }
        f(format!("ext{i}({ty:#x}).len"), off + 4, 4);
        if ty == 0x2385_2875 {
            f("bitmaps_ext.nb_bitmaps".into(), off + 8, 4);
            f("bitmaps_ext.reserved".into(), off + 12, 4);
            f("bitmaps_ext.bitmap_directory_size".into(), off + 16, 8);
            f("bitmaps_ext.bitmap_directory_offset".into(), off + 24, 8);
        } else if len > 0 {
            f(format!("ext{i}({ty:#x}).data[0]"), off + 8, 1);
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    // Refcount table entry 0.
    f(
        "refcount_table[0]".into(),
        h.refcount_table_offset as usize,
        8,
    );
    let l2_entry_bytes = if h.extended_l2() { 16 } else { 8 };
    let add_l1 =
        |what: &str, l1_off: usize, l1_size: usize, f: &mut dyn FnMut(String, usize, usize)| {
            let mut tables = 0;
            for i in 0..l1_size.min(4096) {
                let e = be(img, l1_off + 8 * i, 8);
                let l2 = (e & 0x00ff_ffff_ffff_fe00) as usize;
                if i < 2 || (l2 != 0 && tables < 3) {
                    f(format!("{what}[{i}]"), l1_off + 8 * i, 8);
                }
                if l2 == 0 || tables >= 3 || l2 + cs > img.len() {
                    continue;
                }
                tables += 1;
                let mut picked = 0;
                for j in 0..cs / l2_entry_bytes {
                    let at = l2 + j * l2_entry_bytes;
                    let e = be(img, at, 8);
                    let bm = if l2_entry_bytes == 16 {
                        be(img, at + 8, 8)
                    } else {
                        0
                    };
                    if j == 0 || ((e != 0 || bm != 0) && picked < 8) {
                        picked += 1;
                        f(format!("{what}[{i}].l2[{j}]({e:#x})"), at, 8);
                        if l2_entry_bytes == 16 {
                            f(format!("{what}[{i}].l2[{j}].bitmap({bm:#x})"), at + 8, 8);
                        }
                    }
                }
            }
        };
    add_l1("l1", h.l1_table_offset as usize, h.l1_size as usize, &mut f);
    // Bitmap directory and tables.
    if let Some(b) = h.bitmaps {
        let d0 = b.bitmap_directory_offset as usize;
        let dir = &img[d0..d0 + b.bitmap_directory_size as usize];
        let entries = parse_directory(dir, b.nb_bitmaps).expect("fixture directory");
        let mut e_off = d0;
        for (k, e) in entries.iter().enumerate() {
            let n = &e.name;
            for (field, rel, width) in [
                ("bitmap_table_offset", 0, 8),
                ("bitmap_table_size", 8, 4),
                ("flags", 12, 4),
                ("type", 16, 1),
                ("granularity_bits", 17, 1),
                ("name_size", 18, 2),
                ("extra_data_size", 20, 4),
                ("name[0]", 24 + e.extra_data_size as usize, 1),
            ] {
                f(format!("bitmap[{k}]({n}).{field}"), e_off + rel, width);
            }
            let t0 = e.bitmap_table_offset as usize;
            for j in 0..(e.bitmap_table_size as usize).min(3) {
                let v = be(img, t0 + 8 * j, 8);
                f(
                    format!("bitmap[{k}]({n}).table[{j}]({v:#x})"),
                    t0 + 8 * j,
                    8,
                );
            }
            e_off += (24 + e.extra_data_size as usize + n.len()).div_ceil(8) * 8;
        }
    }
    // Snapshot table and the snapshots' L1 tables.
    if h.nb_snapshots > 0 {
        let s0 = h.snapshots_offset as usize;
        let (snaps, _) = parse_table(&img[s0..], h.nb_snapshots).expect("fixture snapshots");
        let mut s_off = s0;
        for (k, s) in snaps.iter().enumerate() {
            let extra = be(img, s_off + 36, 4) as usize;
            for (field, rel, width) in [
                ("l1_table_offset", 0, 8),
                ("l1_size", 8, 4),
                ("id_str_size", 12, 2),
                ("name_size", 14, 2),
                ("date_sec", 16, 4),
                ("vm_state_size", 32, 4),
                ("extra_data_size", 36, 4),
                ("vm_state_size_large", 40, 8),
                ("disk_size", 48, 8),
            ] {
                if rel < 40 || rel + width <= 40 + extra {
                    f(
                        format!("snapshot[{k}]({}).{field}", s.name),
                        s_off + rel,
                        width,
                    );
                }
            }
            add_l1(
                &format!("snapshot[{k}].l1"),
                s.l1_table_offset as usize,
                s.l1_size as usize,
                &mut f,
            );
            s_off += (40 + extra + s.id.len() + s.name.len()).div_ceil(8) * 8;
        }
    }
    out
}

/// Hostile values for a field of `width` bytes currently holding `orig`.
fn hostile_values(width: usize, orig: u64, file_len: u64, cs: u64) -> Vec<u64> {
    let mut v: Vec<u64> = match width {
        8 => vec![
            0,
            u64::MAX,
            1 << 63,
            1 << 62,
            i64::MAX as u64,
            orig ^ 1,
            orig | 1 << 62,
            orig.wrapping_add(512),
            orig.wrapping_add(1),
            512,
            cs,
            file_len,
            file_len.div_ceil(cs) * cs + 16 * cs,
            0x00ff_ffff_ffff_0000,
            1 << 55,
        ],
        4 => vec![
            0,
            1,
            8,
            22,
            64,
            0xffff,
            0x1_0000,
            1 << 31,
            u32::MAX as u64,
            orig.wrapping_add(1) & 0xffff_ffff,
            orig.wrapping_mul(1000) & 0xffff_ffff,
            0x0100_0000,
        ],
        2 => vec![0, 1, 1023, 1024, 0xffff, orig.wrapping_add(1) & 0xffff],
        _ => vec![0, 1, 2, 0x3f, 0x40, 0xff, orig ^ 0x80],
    };
    v.sort_unstable();
    v.dedup();
    v.retain(|&x| x != orig);
    v
}

fn put(img: &mut [u8], off: usize, width: usize, v: u64) {
    for i in 0..width {
        img[off + i] = (v >> (8 * (width - 1 - i))) as u8;
    }
}

/// Truncation lengths: the header's edges, sector and cluster edges, and spread lengths.
fn truncations(len: usize, cs: usize) -> Vec<usize> {
    let mut v: Vec<usize> = vec![0, 1, 3, 4, 8, 50, 71, 72, 100, 103, 104, 105, 112, 511, 512];
    for k in 1..=6 {
        v.extend([k * cs - 1, k * cs, k * cs + 1]);
    }
    for k in 1..48 {
        v.push(len * k / 48);
    }
    v.push(len - 1);
    v.retain(|&l| l < len);
    v.sort_unstable();
    v.dedup();
    v
}

/// How one case changes the bytes of its target.
#[derive(Debug, Clone, Copy)]
enum Edit {
    Unchanged,
    Truncate(usize),
    Put { off: usize, width: usize, v: u64 },
    Flip { off: usize, mask: u8 },
}

struct Case {
    label: String,
    target: usize,
    edit: Edit,
}

fn apply(orig: &[u8], edit: Edit) -> Vec<u8> {
    match edit {
        Edit::Unchanged => orig.to_vec(),
        Edit::Truncate(len) => orig[..len].to_vec(),
        Edit::Put { off, width, v } => {
            let mut m = orig.to_vec();
            put(&mut m, off, width, v);
            m
        }
        Edit::Flip { off, mask } => {
            let mut m = orig.to_vec();
            m[off] ^= mask;
            m
        }
    }
}

/// Every case, in a fixed order (the parent and the worker compute the same list).
fn case_list(targets: &[Target], origs: &[Vec<u8>]) -> Vec<Case> {
    let mut cases = Vec::new();
    for (ti, (t, orig)) in targets.iter().zip(origs).enumerate() {
        let mut add = |label: String, edit: Edit| {
            cases.push(Case {
                label: format!("{}: {label}", t.name),
                target: ti,
                edit,
            })
        };
        let h = Header::parse(orig, orig.len() as u64).expect("fixture header");
        let cs = h.cluster_size();
        add("unmutated".into(), Edit::Unchanged);
        for len in truncations(orig.len(), cs as usize) {
            add(format!("truncated to {len} bytes"), Edit::Truncate(len));
        }
        let fs = fields(orig);
        for fd in &fs {
            let cur = be(orig, fd.off, fd.width);
            for v in hostile_values(fd.width, cur, orig.len() as u64, cs) {
                add(
                    format!(
                        "{} at byte {} ({} bytes) {cur:#x} -> {v:#x}",
                        fd.name, fd.off, fd.width
                    ),
                    Edit::Put {
                        off: fd.off,
                        width: fd.width,
                        v,
                    },
                );
            }
        }
        // Single-bit flips anywhere in those fields.
        let mut rng = Prng(0x5eed ^ orig.len() as u64);
        for _ in 0..96 {
            let fd = &fs[(rng.next() % fs.len() as u64) as usize];
            let bit = (rng.next() % (8 * fd.width as u64)) as usize;
            let off = fd.off + bit / 8;
            add(
                format!("{}: flip bit {} of byte {off}", fd.name, 7 - bit % 8),
                Edit::Flip {
                    off,
                    mask: 0x80 >> (bit % 8),
                },
            );
        }
    }
    cases
}

const WORKER_ENV: &str = "CKPTFS_HOSTILE_WORKER";
const START_ENV: &str = "CKPTFS_HOSTILE_START";
/// Address-space cap of the worker: far above what ckptfs needs for these small images (its
/// largest bounded reads are a 32 MiB L1 table and a 64 MiB bitmap directory).
const AS_LIMIT: u64 = 4 << 30;

fn originals(dir: &Path, targets: &[Target]) -> Vec<Vec<u8>> {
    targets
        .iter()
        .map(|t| std::fs::read(dir.join("orig").join(t.mutate.file_name().unwrap())).unwrap())
        .collect()
}

/// The worker: run cases from `CKPTFS_HOSTILE_START` on, reporting on stdout
/// (`@@S i` started, `@@D i` done, `@@F i text` failed). Does nothing in a normal test run.
#[test]
fn hostile_worker() {
    let Ok(dir) = std::env::var(WORKER_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let start: usize = std::env::var(START_ENV).unwrap().parse().unwrap();
    let lim = libc::rlimit {
        rlim_cur: AS_LIMIT,
        rlim_max: AS_LIMIT,
    };
    // SAFETY: plain syscall on a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
    let targets = target_list(&dir);
    let origs = originals(&dir, &targets);
    for (t, o) in targets.iter().zip(&origs) {
        std::fs::write(&t.mutate, o).unwrap();
    }
    let cases = case_list(&targets, &origs);
    let out = std::io::stdout();
    let say = |s: String| {
        let mut o = out.lock();
        writeln!(o, "{s}").unwrap();
        o.flush().unwrap();
    };
    let mut last_target: Option<usize> = None;
    for (i, c) in cases.iter().enumerate().skip(start) {
        if let Some(lt) = last_target.filter(|&lt| lt != c.target) {
            std::fs::write(&targets[lt].mutate, &origs[lt]).unwrap();
        }
        last_target = Some(c.target);
        let t = &targets[c.target];
        let bytes = apply(&origs[c.target], c.edit);
        std::fs::write(&t.mutate, &bytes).unwrap();
        say(format!("@@S {i}"));
        let open = t.open.clone();
        // Writing is tried where the mutated file is the one opened (so the next case starts
        // from the original again).
        let rw = t.open == t.mutate;
        match guarded(move || {
            let o = exercise(&open);
            let written = rw && exercise_rw(&open);
            (o, written)
        }) {
            Ok((o, written)) => say(format!("@@D {i} {o:?} written={written}")),
            Err(e) => {
                let hex: String = if bytes.len() <= 4096 {
                    bytes.iter().map(|b| format!("{b:02x}")).collect()
                } else {
                    String::new()
                };
                say(format!("@@F {i} {} {hex}", e.replace('\n', " | ")));
                if e.starts_with("did not finish") {
                    // The case thread still runs; start a fresh worker after it.
                    std::process::exit(3);
                }
            }
        }
    }
    say("@@E".into());
}

#[test]
fn hostile_images_fail_cleanly() {
    let tmp = tempdir();
    let dir = tmp.path();
    let targets = make_fixtures(dir);
    std::fs::create_dir(dir.join("orig")).unwrap();
    for t in &targets {
        assert_eq!(
            exercise(&t.open),
            Outcome::Opened,
            "{}: fixture does not open",
            t.name
        );
        std::fs::copy(
            &t.mutate,
            dir.join("orig").join(t.mutate.file_name().unwrap()),
        )
        .unwrap();
    }
    let origs = originals(dir, &targets);
    let cases = case_list(&targets, &origs);
    let t0 = Instant::now();
    let exe = std::env::current_exe().unwrap();
    let mut failures: Vec<String> = Vec::new();
    let (mut opened, mut refused, mut written, mut workers) = (0usize, 0usize, 0usize, 0usize);
    let mut start = 0;
    while start < cases.len() {
        workers += 1;
        let stderr_path = dir.join(format!("worker{workers}.stderr"));
        let mut child = std::process::Command::new(&exe)
            .args([
                "hostile::hostile_worker",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, dir)
            .env(START_ENV, start.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (mut current, mut ended, mut failed_current) = (None, false, false);
        let mut seen: Vec<String> = Vec::new();
        for line in stdout.lines() {
            let line = line.unwrap();
            seen.push(line.clone());
            // libtest's "test ... " prefix may share the first line.
            let Some(at) = line.find("@@") else {
                continue;
            };
            let line = &line[at..];
            let mut parts = line.splitn(3, ' ');
            let (tag, idx) = (parts.next().unwrap_or(""), parts.next());
            let idx: Option<usize> = idx.and_then(|i| i.parse().ok());
            match (tag, idx) {
                ("@@S", Some(i)) => {
                    current = Some(i);
                    failed_current = false;
                }
                ("@@D", Some(_)) => {
                    if line.contains("Opened") {
                        opened += 1
                    } else {
                        refused += 1
                    }
                    written += usize::from(line.ends_with("written=true"));
                }
                ("@@F", Some(i)) => {
                    failed_current = true;
                    failures.push(format!(
                        "{}: {}",
                        cases[i].label,
                        parts.next().unwrap_or("")
                    ));
                }
                ("@@E", _) => ended = true,
                _ => {}
            }
        }
        let status = child.wait().unwrap();
        if ended {
            break;
        }
        let Some(i) = current else {
            panic!(
                "hostile worker died before its first case ({status}):\n{}\n{}",
                seen.join("\n"),
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        if !failed_current {
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let why: Vec<&str> = err
                .lines()
                .filter(|l| l.contains("memory allocation") || l.contains("panicked"))
                .collect();
            failures.push(format!(
                "{}: worker process died ({status}): {}",
                cases[i].label,
                why.join(" | ")
            ));
        }
        start = i + 1;
    }
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    eprintln!(
        "hostile: {} cases ({opened} opened, {refused} refused, {written} also written through a writer, {} failed) in {:.1?}, {workers} worker process(es), largest child peak RSS {} MiB",
        cases.len(),
        failures.len(),
        t0.elapsed(),
        ru.ru_maxrss / 1024
    );
    assert!(
        failures.is_empty(),
        "{} hostile images panicked, hung or allocated without bound:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Named refusals

fn refusal(path: &Path) -> String {
    match Chain::open(path) {
        Ok(_) => panic!("{} opened but must be refused", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, words: &[&str], what: &str) {
    let lower = msg.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(w)),
        "{what}: error {msg:?} should mention one of {words:?}"
    );
}

#[test]
fn named_refusals_say_what_is_wrong() {
    let tmp = tempdir();
    let dir = tmp.path();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "luks.qcow2",
            "1M",
        ],
    );
    assert_mentions(
        &refusal(&dir.join("luks.qcow2")),
        &["encrypt"],
        "LUKS image",
    );

    create(dir, "ext.qcow2", "1M", "data_file=ext.raw", None);
    assert_mentions(
        &refusal(&dir.join("ext.qcow2")),
        &["external data file"],
        "data_file image",
    );

    std::fs::write(dir.join("empty.qcow2"), b"").unwrap();
    assert_mentions(&refusal(&dir.join("empty.qcow2")), &["empty"], "empty file");

    std::fs::write(
        dir.join("text.qcow2"),
        b"this is a text file, not a disk image\n",
    )
    .unwrap();
    assert_mentions(
        &refusal(&dir.join("text.qcow2")),
        &["not a qcow2"],
        "text file",
    );

    create(dir, "good.qcow2", "1M", "", None);
    let good = std::fs::read(dir.join("good.qcow2")).unwrap();
    std::fs::write(dir.join("trunc.qcow2"), &good[..50]).unwrap();
    assert_mentions(
        &refusal(&dir.join("trunc.qcow2")),
        &["truncated"],
        "head -c 50 of an image",
    );
}

// ---------------------------------------------------------------------------------------------
// Regression inputs from contrib/fuzz (each must come back Ok or Err, not panic)

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Fuzz-found inputs for the `image` target (whole files).
const IMAGE_REGRESSIONS: &[(&str, &str)] = &[];

#[test]
fn fuzz_regressions() {
    let tmp = tempdir();
    let mut failures = Vec::new();
    for (name, hex) in IMAGE_REGRESSIONS {
        let path = tmp.path().join(format!("{name}.qcow2"));
        std::fs::write(&path, unhex(hex)).unwrap();
        if let Err(e) = guarded(move || exercise(&path)) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Writers never overwrite metadata

/// Offsets in a fresh 1 MiB image (4 KiB clusters, 16-bit refcounts, guest cluster 0 written).
pub(crate) struct Layout {
    pub l1: u64,
    pub l2: u64,
    pub reftable: u64,
    pub refblock: u64,
}

pub(crate) fn small_rw_image(dir: &Path, name: &str) -> (PathBuf, Layout) {
    create(dir, name, "1M", "cluster_size=4k", None);
    qemu_io(dir, name, &["write -P 1 0 4k"]);
    let path = dir.join(name);
    let b = std::fs::read(&path).unwrap();
    let (l1, reftable) = (be(&b, 40, 8), be(&b, 48, 8));
    let mask = 0x00ff_ffff_ffff_fe00;
    let l = Layout {
        l1,
        l2: be(&b, l1 as usize, 8) & mask,
        reftable,
        refblock: be(&b, reftable as usize, 8),
    };
    (path, l)
}

pub(crate) fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

pub(crate) fn writer(path: &Path) -> ckptfs::error::Result<Writer> {
    Writer::open(Arc::new(Chain::open_with(path, true).unwrap()))
}

#[test]
fn writer_never_overwrites_metadata() {
    let tmp = tempdir();
    let dir = tmp.path();
    const COPIED: u64 = 1 << 63;

    // Guest data placed on metadata is refused at open, naming the structure (QEMU counts the
    // cluster twice: refcount too low): guest cluster 0 claiming the L1 table as its own
    // (COPIED) data cluster, or naming the refcount block as data it does not own (a write
    // would copy-on-write and free it, and the next allocation would reuse it for data; found
    // by the `refcount` fuzz target). The aliasing cases against every structure are in
    // refusals.rs.
    let (p, l) = small_rw_image(dir, "data-on-l1.qcow2");
    patch(&p, l.l2, &(l.l1 | COPIED).to_be_bytes());
    let e = writer(&p).err().expect("must be refused").to_string();
    assert!(e.contains("inside the L1 table"), "{e}");
    let (p, l) = small_rw_image(dir, "data-on-refblock.qcow2");
    patch(&p, l.l2, &l.refblock.to_be_bytes());
    let e = writer(&p).err().expect("must be refused").to_string();
    assert!(e.contains("inside the refcount block"), "{e}");

    // References the refcounts do not account for are refused at open: a data cluster
    // counted free (the allocator would hand it out again), one referenced twice but counted
    // once (freeing one reference takes it from the other), one past the end of the file.
    // (Found by the `refcount` fuzz target.)
    let mask = 0x00ff_ffff_ffff_fe00;
    let (p, l) = small_rw_image(dir, "owned-but-free.qcow2");
    let data0 = be(&std::fs::read(&p).unwrap(), l.l2 as usize, 8) & mask;
    patch(&p, l.refblock + 2 * (data0 / 4096), &[0, 0]);
    let e = writer(&p).err().expect("must be refused").to_string();
    assert!(e.contains("refcount is 0"), "{e}");
    let (p, l) = small_rw_image(dir, "referenced-twice.qcow2");
    let data0 = be(&std::fs::read(&p).unwrap(), l.l2 as usize, 8) & mask;
    patch(&p, l.l2 + 8, &data0.to_be_bytes());
    let e = writer(&p).err().expect("must be refused").to_string();
    assert!(e.contains("more than once"), "{e}");
    let (p, l) = small_rw_image(dir, "past-eof.qcow2");
    patch(&p, l.l2 + 8, &(1u64 << 40).to_be_bytes());
    let e = writer(&p).err().expect("must be refused").to_string();
    assert!(e.contains("past the end of the file"), "{e}");

    // A cluster owned (COPIED) by guest cluster 0 but counted twice: not written in place.
    let (p, l) = small_rw_image(dir, "owned-but-shared.qcow2");
    let data0 = be(&std::fs::read(&p).unwrap(), l.l2 as usize, 8) & mask;
    patch(&p, l.refblock + 2 * (data0 / 4096), &[0, 2]);
    let mut w = writer(&p).unwrap();
    let e = w.write(0, &[9u8; 100]).unwrap_err().to_string();
    assert!(e.contains("refcount is 2"), "{e}");
    w.close().unwrap();
    drop(w);

    // A refcount block placed on the L1 table: refused at open (setting a refcount would
    // overwrite L1 entries).
    let (p, l) = small_rw_image(dir, "refblock-on-l1.qcow2");
    patch(&p, l.reftable, &l.l1.to_be_bytes());
    let e = writer(&p).err().expect("must be refused").to_string();
    assert!(e.contains("overlaps"), "{e}");

    // The L1 table counted as free: refused at open (the first allocation would hand it out).
    let (p, l) = small_rw_image(dir, "l1-free.qcow2");
    patch(&p, l.refblock + 2 * (l.l1 / 4096), &[0, 0]);
    let e = writer(&p).err().expect("must be refused").to_string();
    assert!(e.contains("L1 table") && e.contains("refcount 0"), "{e}");

    // An untouched image opens, and a write that allocates (guest cluster 200) works.
    let (p, _) = small_rw_image(dir, "plain.qcow2");
    let mut w = writer(&p).unwrap();
    w.write(200 * 4096, &[5u8; 4096]).unwrap();
    w.close().unwrap();
    drop(w);
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&p)
        .status()
        .unwrap();
    assert!(out.success(), "qemu-img check after a guarded write");
}

/// The writer and the read path share the L2 cache, the reads in 4 KiB slices (8 KiB
/// clusters: 4 MiB of guest per slice, 8 MiB per table), the writer in whole tables. Random
/// writes and zeroes, many across slice and table boundaries, each read back at once through
/// the same chain with a cache too small to hold much (4 of the 10 whole tables: reads fall
/// back to slices, evicted and reloaded between writes), must read what was written; at the
/// end QEMU reads the same image.
#[test]
fn writes_and_sliced_reads_stay_coherent() {
    let tmp = tempdir();
    let dir = tmp.path();
    let size = 80 << 20;
    create(dir, "base.qcow2", "80M", "", None);
    qemu_io(dir, "base.qcow2", &["write -P 0x61 0 80M"]);
    create(
        dir,
        "top.qcow2",
        "",
        "cluster_size=8k",
        Some(("base.qcow2", "qcow2")),
    );
    let top = dir.join("top.qcow2");
    let chain = Arc::new(Chain::open_with(&top, true).unwrap());
    chain.layers[0].qcow2().unwrap().set_cache_budget(0);
    let disk = Disk::new(chain.clone(), 0, Table::Active);
    let mut w = Writer::open(chain.clone()).unwrap();
    let mut shadow = vec![0x61u8; size];
    let mut rng = Prng(0x51ce_c0de);
    let boundaries = [4u64 << 20, 8 << 20, 12 << 20, 16 << 20, 36 << 20, 64 << 20];
    for i in 0..400 {
        let len = rng.range(1, 200 << 10);
        let off = if i % 2 == 0 {
            let b = boundaries[rng.range(0, boundaries.len() as u64 - 1) as usize];
            b.saturating_sub(rng.range(0, 64 << 10))
                .min(size as u64 - len)
        } else {
            rng.range(0, size as u64 - len)
        };
        let (o, n) = (off as usize, len as usize);
        if i % 7 == 3 {
            w.zero(off, len).unwrap();
            shadow[o..o + n].fill(0);
        } else {
            rng.fill(&mut shadow[o..o + n]);
            w.write(off, &shadow[o..o + n]).unwrap();
        }
        // Read back around the write, and somewhere else.
        let from = off.saturating_sub(48 << 10);
        let to = (off + len + (48 << 10)).min(size as u64);
        let mut buf = vec![0xeeu8; (to - from) as usize];
        disk.read(from, &mut buf).unwrap();
        assert!(
            buf == shadow[from as usize..to as usize],
            "write {i} at {off}+{len}: read back differs"
        );
        let at = rng.range(0, size as u64 - (64 << 10));
        let mut buf = vec![0u8; 64 << 10];
        disk.read(at, &mut buf).unwrap();
        assert!(
            buf == shadow[at as usize..at as usize + buf.len()],
            "read at {at} after write {i}"
        );
    }
    w.close().unwrap();
    drop(w);
    drop(disk);
    drop(chain);
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&top)
        .arg(dir.join("top.raw"))
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img convert: {out:?}");
    assert!(
        std::fs::read(dir.join("top.raw")).unwrap() == shadow,
        "QEMU reads other bytes"
    );
    let check = std::process::Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&top)
        .output()
        .unwrap();
    assert!(check.status.success(), "qemu-img check: {check:?}");
}

//! Shared helpers for the integration tests: temp dirs, running QEMU tools with timeouts,
//! ground truth from `qemu-img convert` / `qemu-img map` / `qemu-nbd` + `nbdinfo`, comparison
//! of ckptfs reads and allocation against that truth, and small on-disk patchers.
//!
//! Every external command runs under `timeout` so a hung QEMU tool (for example on a backing
//! loop) fails the test instead of wedging it.

#![allow(dead_code)]

use ckptfs::chain::{Chain, Disk};
use ckptfs::qcow2::{BitmapCluster, Mapping, Qcow2Image, Table};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

/// Seconds any one external command may take.
pub const TIMEOUT_SECS: &str = "60";

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ckptfs-it-")
        .tempdir()
        .expect("create temp dir")
}

fn describe(cmd: &str, args: &[&OsStr]) -> String {
    let mut s = cmd.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd args` (under `timeout`) in `dir`, and return its output whatever the status.
pub fn run_status_in<S: AsRef<OsStr>>(dir: Option<&Path>, cmd: &str, args: &[S]) -> Output {
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let mut c = Command::new("timeout");
    c.arg("-k").arg("5").arg(TIMEOUT_SECS).arg(cmd).args(&args);
    c.stdin(Stdio::null());
    if let Some(d) = dir {
        c.current_dir(d);
    }
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd, &args)))
}

/// Run `cmd args` in `dir`; panic with its stderr unless it exits 0. Returns stdout.
pub fn run_in<S: AsRef<OsStr>>(dir: Option<&Path>, cmd: &str, args: &[S]) -> Vec<u8> {
    let out = run_status_in(dir, cmd, args);
    if !out.status.success() {
        let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
        panic!(
            "command failed ({}): {}\nin {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            describe(cmd, &args),
            dir,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.stdout
}

/// Run `cmd args` in the current directory; panic with its stderr unless it exits 0.
pub fn run<S: AsRef<OsStr>>(cmd: &str, args: &[S]) -> Vec<u8> {
    run_in(None, cmd, args)
}

/// `qemu-img ARGS` in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Vec<u8> {
    run_in(Some(dir), "qemu-img", args)
}

/// `qemu-io -c CMD ... IMAGE` in `dir` (format probed, as in the digest's cookbook).
pub fn qemu_io(dir: &Path, image: &str, cmds: &[&str]) {
    let mut args: Vec<String> = Vec::new();
    for c in cmds {
        args.push("-c".into());
        args.push((*c).into());
    }
    args.push(image.into());
    let out = run_in(Some(dir), "qemu-io", &args);
    // qemu-io reports failed commands on stdout and still exits 0.
    let text = String::from_utf8_lossy(&out);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} {image} reported an error:\n{text}"
    );
}

/// `qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] NAME [SIZE]` in `dir` (an empty
/// `size` takes the backing file's).
pub fn create(dir: &Path, name: &str, size: &str, opts: &str, backing: Option<(&str, &str)>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.push(name);
    if !size.is_empty() {
        args.push(size);
    }
    qemu_img(dir, &args);
}

/// `base` (`size`, then the qemu-io commands `base_io`) <- `top` with bitmap c1, then `top_io`
/// on the top, in `dir`: the chain most mount tests start from. Returns the top's path.
pub fn c1_chain(
    dir: &Path,
    [base, top]: [&str; 2],
    size: &str,
    base_io: &[&str],
    top_io: &[&str],
) -> PathBuf {
    create(dir, base, size, "", None);
    if !base_io.is_empty() {
        qemu_io(dir, base, base_io);
    }
    create(dir, top, "", "", Some((base, "qcow2")));
    qemu_img(dir, &["bitmap", "--add", top, "c1"]);
    if !top_io.is_empty() {
        qemu_io(dir, top, top_io);
    }
    dir.join(top)
}

/// Ground truth: `qemu-img convert -O raw IMAGE` (the whole chain, IMAGE's virtual size).
pub fn truth_raw(image: &Path) -> Vec<u8> {
    truth_raw_args(image, &[])
}

/// Ground truth of an internal snapshot: `qemu-img convert -O raw -l NAME IMAGE`.
pub fn truth_snapshot_raw(image: &Path, snapshot: &str) -> Vec<u8> {
    truth_raw_args(image, &["-l", snapshot])
}

fn truth_raw_args(image: &Path, extra: &[&str]) -> Vec<u8> {
    let out_dir = tempdir();
    let out = out_dir.path().join("truth.raw");
    let mut args: Vec<&OsStr> = vec![OsStr::new("convert"), OsStr::new("-O"), OsStr::new("raw")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(image.as_os_str());
    args.push(out.as_os_str());
    run("qemu-img", &args);
    std::fs::read(&out).expect("read converted image")
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

/// `qemu-img map --output=json IMAGE`, parsed.
pub fn qemu_map(image: &Path) -> Vec<MapEntry> {
    let out = run(
        "qemu-img",
        &[
            OsStr::new("map"),
            OsStr::new("--output=json"),
            image.as_os_str(),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out).expect("qemu-img map json");
    let arr = v.as_array().expect("map output is an array");
    arr.iter()
        .map(|e| {
            let u = |k: &str| {
                e[k].as_u64()
                    .unwrap_or_else(|| panic!("map entry {e} lacks {k}"))
            };
            let b = |k: &str| e[k].as_bool().unwrap_or(false);
            MapEntry {
                start: u("start"),
                length: u("length"),
                depth: u("depth") as usize,
                present: b("present"),
                zero: b("zero"),
                data: b("data"),
                compressed: b("compressed"),
                offset: e["offset"].as_u64(),
            }
        })
        .collect()
}

/// Open a chain, panicking with the error text.
pub fn open_chain(top: &Path) -> Arc<Chain> {
    Arc::new(
        Chain::open(top).unwrap_or_else(|e| panic!("Chain::open({}) failed: {e}", top.display())),
    )
}

/// Read a whole disk through ckptfs.
pub fn read_all(disk: &Disk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read(0, &mut buf)
        .unwrap_or_else(|e| panic!("read of the whole disk failed: {e}"));
    buf
}

/// splitmix64: a tiny fixed-seed PRNG for reproducible offsets and data.
#[derive(Debug, Clone)]
pub struct Prng(pub u64);

impl Prng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Text-like, partly compressible data of `len` bytes: runs of words from a small vocabulary,
/// random-byte stretches (incompressible), and some all-zero 64 KiB blocks, so compressed
/// clusters get streams of varied lengths that pack across sectors and host clusters.
pub fn varied_data(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "qcow2",
        "cluster",
        "backing",
        "bitmap",
        "refcount",
        "snapshot",
        "the",
        "a",
        "of",
        "zero",
        "L2",
        "table",
        "chain",
        "ckptfs",
        "guest",
        "host",
        "offset",
        "compressed",
    ];
    let mut rng = Prng(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let block = 65536.min(len - out.len());
        match rng.next() % 8 {
            0 => out.extend(std::iter::repeat_n(0u8, block)),
            1 => {
                let mut b = vec![0u8; block];
                rng.fill(&mut b);
                out.extend(b);
            }
            _ => {
                // Mostly text, with an occasional random stretch of a few hundred bytes.
                let end = out.len() + block;
                while out.len() < end {
                    if rng.next() % 50 == 0 {
                        let mut b = vec![0u8; rng.range(16, 700) as usize];
                        rng.fill(&mut b);
                        out.extend(b);
                    } else {
                        out.extend(WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes());
                        out.push(if rng.next() % 9 == 0 { b'\n' } else { b' ' });
                    }
                }
                out.truncate(end);
            }
        }
    }
    out
}

/// Compare a ckptfs disk with QEMU's raw conversion of the same view: the whole disk, then
/// `ranges` random ranges of 1..300000 bytes at odd offsets (some reaching past the end,
/// where ckptfs must read zeros). `what` names the view in failure messages.
pub fn check_reads(disk: &Disk, truth: &[u8], what: &str, seed: u64, ranges: usize) {
    let size = disk.size();
    assert_eq!(
        size,
        truth.len() as u64,
        "{what}: ckptfs disk size {size} != qemu-img convert size {}",
        truth.len()
    );
    let got = read_all(disk);
    assert_same(&got, truth, 0, what);
    let mut rng = Prng(seed);
    for _ in 0..ranges {
        let len = rng.range(1, 300_000);
        let off = rng.range(0, size + size / 16);
        let mut buf = vec![0xa5u8; len as usize];
        disk.read(off, &mut buf)
            .unwrap_or_else(|e| panic!("{what}: read({off}, {len}) failed: {e}"));
        let mut want = vec![0u8; len as usize];
        if off < size {
            let n = (size - off).min(len) as usize;
            want[..n].copy_from_slice(&truth[off as usize..off as usize + n]);
        }
        assert_same(&buf, &want, off, &format!("{what}: read({off}, {len})"));
    }
}

/// Assert two buffers are equal, reporting the first differing guest offset.
pub fn assert_same(got: &[u8], want: &[u8], base: u64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        let end = (i + 16).min(got.len());
        panic!(
            "{what}: first difference at guest offset {} (buffer index {i}): got {:02x?}, \
             qemu says {:02x?}",
            base + i as u64,
            &got[i..end],
            &want[i..end]
        );
    }
}

/// The depth `qemu-img map` reports for an offset no layer holds: the deepest layer (relative
/// to `start`) reached before the walk ended, i.e. the last layer from `start` down whose
/// virtual size covers `off` (the layer whose backing is too short, or the bottom layer).
pub fn qemu_absent_depth(chain: &Chain, start: usize, table: Table, off: u64) -> usize {
    let mut depth = 0;
    for (level, layer) in chain.layers.iter().enumerate().skip(start) {
        let t = if level == start { table } else { Table::Active };
        if off >= layer.size(t) {
            break;
        }
        depth = level - start;
    }
    depth
}

/// Check `Disk::resolve` against `qemu-img map --output=json` of the layer at `start`.
///
/// Encoding of QEMU's answers (checked by experiment with QEMU 10.0.2):
/// - `present:false` (always `zero:true, data:false`): no layer holds it, either unallocated
///   all the way down or past the end of a shorter backing file; `depth` is the last layer
///   reached (see `qemu_absent_depth`). ckptfs: `depth: None`.
/// - `present:true, zero:true, data:false`: a zero cluster/subcluster at `depth`.
/// - `present:true, data:true`: data at `depth`, `compressed` as ckptfs says, and for plain
///   data `offset` is the host offset (raw layers: the guest offset).
pub fn check_map(chain: &Arc<Chain>, start: usize, what: &str) {
    let layer = &chain.layers[start];
    let disk = Disk::new(chain.clone(), start, Table::Active);
    let entries = qemu_map(&layer.path);
    let mut expect_start = 0;
    for e in &entries {
        assert_eq!(e.start, expect_start, "{what}: qemu map has a gap: {e:?}");
        expect_start = e.start + e.length;
    }
    let qemu_end = expect_start;
    if layer.qcow2().is_some() {
        assert_eq!(
            qemu_end,
            disk.size(),
            "{what}: qemu map covers {qemu_end} bytes, disk size {}",
            disk.size()
        );
    }
    for e in &entries {
        let end = e.start + e.length;
        let mut x = e.start;
        while x < end {
            let (r, n) = disk
                .resolve(x, end - x)
                .unwrap_or_else(|err| panic!("{what}: resolve({x}) failed: {err}"));
            assert!(n > 0, "{what}: resolve({x}) returned an empty run");
            let n = n.min(end - x);
            let ctx = || format!("{what}: at guest offset {x} (+{n}): qemu {e:?}, ckptfs {r:?}");
            if !e.present {
                assert!(e.zero && !e.data, "{}: unexpected qemu entry", ctx());
                assert_eq!(r.depth, None, "{}", ctx());
                assert_eq!(
                    qemu_absent_depth(chain, start, Table::Active, x),
                    e.depth,
                    "{}: depth of the absent range",
                    ctx()
                );
            } else {
                assert_eq!(r.depth, Some(start + e.depth), "{}: depth", ctx());
                if e.data {
                    match r.mapping {
                        Mapping::Data(h) => {
                            assert!(!e.compressed, "{}: qemu says compressed", ctx());
                            if let Some(o) = e.offset {
                                assert_eq!(h.0, o + (x - e.start), "{}: host offset", ctx());
                            }
                        }
                        Mapping::Compressed { .. } => {
                            assert!(e.compressed, "{}: qemu says not compressed", ctx())
                        }
                        _ => panic!("{}: qemu says data", ctx()),
                    }
                } else {
                    assert!(e.zero, "{}: neither data nor zero", ctx());
                    // Zero clusters, and a raw layer's tail past its file length.
                    assert_eq!(r.mapping, Mapping::Zero, "{}: qemu says zero", ctx());
                }
            }
            x += n;
        }
    }
    // The allocation scan the since-sets use agrees with qemu-img map's "present at depth 0".
    if let Some(q) = layer.qcow2() {
        let mut got: Vec<(u64, u64)> = Vec::new();
        let mut add = |s: u64, n: u64| match got.last_mut() {
            Some(last) if last.0 + last.1 == s => last.1 += n,
            _ => got.push((s, n)),
        };
        if q.present_runs(Table::Active, 0, q.size(), &mut add)
            .unwrap_or_else(|e| panic!("{what}: present_runs: {e}"))
            .is_some()
        {
            let mut want: Vec<(u64, u64)> = Vec::new();
            for e in entries.iter().filter(|e| e.present && e.depth == 0) {
                match want.last_mut() {
                    Some(last) if last.0 + last.1 == e.start => last.1 += e.length,
                    _ => want.push((e.start, e.length)),
                }
            }
            assert_eq!(got, want, "{what}: present runs against qemu-img map");
        }
    }
}

/// For every layer of the chain under `top`: read it as a disk starting at that layer and
/// compare with `qemu-img convert` of that file (whole and `ranges` random ranges), and
/// compare allocation with `qemu-img map`. Raw layers are compared up to the file length,
/// the rest of their 512-rounded size must read zeros.
pub fn check_chain(top: &Path, ranges: usize) -> Arc<Chain> {
    let chain = open_chain(top);
    for (i, layer) in chain.layers.iter().enumerate() {
        let what = format!("layer {i} ({})", layer.path.display());
        let disk = Disk::new(chain.clone(), i, Table::Active);
        let mut truth = truth_raw(&layer.path);
        if layer.qcow2().is_none() {
            assert_eq!(
                disk.size(),
                (truth.len() as u64).div_ceil(512) * 512,
                "{what}: raw size"
            );
            truth.resize(disk.size() as usize, 0);
        }
        check_reads(&disk, &truth, &what, 0x5eed + i as u64, ranges);
        check_map(&chain, i, &what);
    }
    chain
}

// ---------------------------------------------------------------------------------------
// Bitmaps

/// The set bits of bitmap `idx` of `img`, as sorted guest byte ranges `[start, end)` clipped
/// to the virtual size, read through `bitmap_cluster`.
pub fn ckptfs_dirty_ranges(img: &Qcow2Image, idx: usize) -> Vec<(u64, u64)> {
    let entry = &img.bitmaps()[idx].entry;
    let gran = entry.granularity();
    let size = img.size();
    let bits_per_cluster = img.geo.cluster_size() * 8;
    let nbits = size.div_ceil(gran);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut push = |s: u64, e: u64| {
        let e = e.min(size);
        if let Some(last) = ranges.last_mut() {
            if last.1 == s {
                last.1 = e;
                return;
            }
        }
        ranges.push((s, e));
    };
    let mut t = 0u64;
    while t * bits_per_cluster < nbits {
        let c = img
            .bitmap_cluster(idx, t)
            .unwrap_or_else(|e| panic!("bitmap_cluster({idx}, {t}) failed: {e}"));
        let first = t * bits_per_cluster;
        let last = (first + bits_per_cluster).min(nbits);
        for k in first..last {
            let set = match &c {
                BitmapCluster::Fill(v) => *v,
                BitmapCluster::Data(d) => {
                    let i = (k - first) as usize;
                    d[i / 8] >> (i % 8) & 1 == 1
                }
            };
            if set {
                push(k * gran, (k + 1) * gran);
            }
        }
        t += 1;
    }
    ranges
}

/// Kills a qemu-nbd started with `--pid-file` (by that PID only) when dropped.
struct NbdServer {
    pid_file: PathBuf,
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Ok(s) = std::fs::read_to_string(&self.pid_file) {
            if let Ok(pid) = s.trim().parse::<i32>() {
                if pid > 1 {
                    // SAFETY: plain kill(2) of the server this test started.
                    unsafe {
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
            }
        }
    }
}

/// QEMU's view of a persistent bitmap: `qemu-nbd -r -t -B NAME` exporting `image`, then
/// `nbdinfo --map=qemu:dirty-bitmap:NAME --json`. Returns the dirty ranges, merged.
/// (nbdinfo comes from Debian's libnbd-bin.)
pub fn qemu_dirty_ranges(dir: &Path, image: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let sock = dir.join(format!("nbd-{bitmap}.sock"));
    let pid_file = dir.join(format!("nbd-{bitmap}.pid"));
    let log = File::create(dir.join(format!("nbd-{bitmap}.log"))).expect("nbd log");
    // --fork: the parent exits once the server listens; its daemon child keeps running, so
    // do not capture pipes (they would stay open) but send output to a file.
    let status = Command::new("timeout")
        .args([
            "-k",
            "5",
            TIMEOUT_SECS,
            "qemu-nbd",
            "-r",
            "-t",
            "-f",
            "qcow2",
            "-B",
        ])
        .arg(bitmap)
        .arg("-k")
        .arg(&sock)
        .arg("--fork")
        .arg(format!("--pid-file={}", pid_file.display()))
        .arg(image)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .expect("run qemu-nbd");
    let _server = NbdServer {
        pid_file: pid_file.clone(),
    };
    assert!(
        status.success(),
        "qemu-nbd failed ({status}): {}",
        std::fs::read_to_string(dir.join(format!("nbd-{bitmap}.log"))).unwrap_or_default()
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let map_arg = format!("--map=qemu:dirty-bitmap:{bitmap}");
    let out = run("nbdinfo", &[map_arg.as_str(), "--json", uri.as_str()]);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("nbdinfo json");
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("nbdinfo map array") {
        let off = e["offset"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        if e["type"].as_u64().unwrap() & 1 == 1 {
            match ranges.last_mut() {
                Some(last) if last.1 == off => last.1 = off + len,
                _ => ranges.push((off, off + len)),
            }
        }
    }
    ranges
}

// ---------------------------------------------------------------------------------------
// Patchers (digest section 9, "Hand-made invalid bitmaps")

const BITMAPS_EXT: u32 = 0x2385_2875;

fn read_be<const N: usize>(f: &mut File, off: u64) -> [u8; N] {
    let mut b = [0u8; N];
    f.seek(SeekFrom::Start(off)).unwrap();
    f.read_exact(&mut b).unwrap();
    b
}

/// Clear autoclear bit 0 (bitmaps extension consistent) in the header at byte 88.
pub fn clear_autoclear_bitmaps(image: &Path) {
    let mut f = open_rw(image);
    let v = u64::from_be_bytes(read_be::<8>(&mut f, 88));
    f.seek(SeekFrom::Start(88)).unwrap();
    f.write_all(&(v & !1).to_be_bytes()).unwrap();
}

/// Byte offset of bitmap `name`'s directory entry in `image`: walk the header extensions to
/// the bitmaps extension, then the directory entries.
pub fn bitmap_entry_offset(image: &Path, name: &str) -> u64 {
    let mut f = File::open(image).unwrap();
    let version = u32::from_be_bytes(read_be::<4>(&mut f, 4));
    assert_eq!(version, 3, "bitmaps need a v3 image");
    let header_len = u32::from_be_bytes(read_be::<4>(&mut f, 100)) as u64;
    let mut off = header_len;
    let (nb, dir_off) = loop {
        let t = u32::from_be_bytes(read_be::<4>(&mut f, off));
        let len = u32::from_be_bytes(read_be::<4>(&mut f, off + 4)) as u64;
        assert_ne!(t, 0, "no bitmaps extension in {}", image.display());
        if t == BITMAPS_EXT {
            let nb = u32::from_be_bytes(read_be::<4>(&mut f, off + 8));
            let dir = u64::from_be_bytes(read_be::<8>(&mut f, off + 24));
            break (nb, dir);
        }
        off += 8 + len.div_ceil(8) * 8;
    };
    let mut e = dir_off;
    for _ in 0..nb {
        let name_size = u16::from_be_bytes(read_be::<2>(&mut f, e + 18)) as u64;
        let extra = u32::from_be_bytes(read_be::<4>(&mut f, e + 20)) as u64;
        let mut n = vec![0u8; name_size as usize];
        f.seek(SeekFrom::Start(e + 24 + extra)).unwrap();
        f.read_exact(&mut n).unwrap();
        if n == name.as_bytes() {
            return e;
        }
        e += (24 + extra + name_size).div_ceil(8) * 8;
    }
    panic!("no bitmap '{name}' in {}", image.display());
}

/// `image` opened read-write, to patch it in place.
fn open_rw(image: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", image.display()))
}

/// Set the in_use flag of bitmap `name` (OR 1 into the flags word at entry + 12).
pub fn set_bitmap_in_use(image: &Path, name: &str) {
    let e = bitmap_entry_offset(image, name);
    let mut f = open_rw(image);
    let flags = u32::from_be_bytes(read_be::<4>(&mut f, e + 12));
    f.seek(SeekFrom::Start(e + 12)).unwrap();
    f.write_all(&(flags | 1).to_be_bytes()).unwrap();
}

/// Overwrite entry `idx` of bitmap `name`'s table with `value` (e.g. 1 = "all ones" without a
/// data cluster, 0 = all zeros). The old data cluster leaks, which read-only users ignore.
pub fn patch_bitmap_table_entry(image: &Path, name: &str, idx: u64, value: u64) {
    let e = bitmap_entry_offset(image, name);
    let mut f = open_rw(image);
    let table = u64::from_be_bytes(read_be::<8>(&mut f, e));
    let size = u32::from_be_bytes(read_be::<4>(&mut f, e + 8)) as u64;
    assert!(idx < size, "bitmap '{name}' table has {size} entries");
    f.seek(SeekFrom::Start(table + idx * 8)).unwrap();
    f.write_all(&value.to_be_bytes()).unwrap();
}

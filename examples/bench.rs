//! The performance benchmark: ckptfs against QEMU's own tools, side by side in one run.
//!
//!     CARGO_TARGET_DIR=/work/target-bench cargo build --release --bins --examples
//!     CKPTFS_BIN=/work/target-bench/release/ckptfs /work/target-bench/release/examples/bench
//!
//! Builds, under a temporary directory in /tmp (removed at the end), with qemu-img/qemu-io:
//! - the main chain: `CKPTFS_BENCH_GIB` GiB (default 8), 3 layers, 64 KiB clusters, about 40 %
//!   written, 2 % compressed, libvirt-style checkpoints c1..c4, about 3,438 changed extents
//!   (~579 MB, scaled with the size) since the oldest checkpoint c1;
//! - the big chain: `CKPTFS_BENCH_BIG_GIB` GiB (default 1024), 3 layers, 20 checkpoints, the
//!   same number and sizes of changed extents (sparse: only they and the bitmaps take space);
//! - two fully compressed images (zlib and zstd) of `CKPTFS_BENCH_COMP_MIB` MiB (default 256).
//!
//! Then runs every row `CKPTFS_BENCH_RUNS` times (default 3) against its QEMU anchor
//! (qemu-storage-daemon's FUSE export, qemu-nbd + nbdcopy, the "QEMU way" incremental copy
//! of contrib/bench/qemu_incremental.py, qemu-img bitmap --merge, the decoders' own speed) and
//! prints min/median per row, the ratio of medians and PASS/MISS against the issue's target.
//!
//! Environment: `CKPTFS_BIN` (the ckptfs binary; default target/release/ckptfs),
//! `CKPTFS_BENCH_SMALL=1` (a quick run: 1 GiB / 64 GiB / 64 MiB, 3 s of fio),
//! `CKPTFS_BENCH_GIB`, `CKPTFS_BENCH_BIG_GIB`, `CKPTFS_BENCH_COMP_MIB`, `CKPTFS_BENCH_RUNS`,
//! `CKPTFS_BENCH_FIO_SECS` (default 10), `CKPTFS_BENCH_ROWS` (comma-separated row groups to
//! run: seq, rand, cp, incr, meta, comp; default all), `CKPTFS_BENCH_CACHE_MB` (default 64),
//! `CKPTFS_BENCH_TMP` (default /tmp), `CKPTFS_BENCH_OUT` (where copies are written; default
//! /dev/shm), `CKPTFS_BENCH_PYTHON` (a python3 with libnbd; default /usr/bin/python3),
//! `CKPTFS_BENCH_HOLD=1` (mount the main chain, print the PID and wait for Enter: for profiling).
//!
//! Needs root (drop_caches, FUSE), qemu-utils, qemu-storage-daemon (qemu-system-common), fuse3,
//! libnbd-bin, python3-libnbd and fio. Every external command runs under a timeout; every
//! daemon and mount it starts is stopped by a guard (also on error, panic, or SIGINT/SIGTERM),
//! and only processes it started are signalled.

use std::collections::BTreeMap;
use std::error::Error;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn Error>>;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const CLUSTER: u64 = 64 * KIB;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Cfg {
    gib: u64,
    big_gib: u64,
    comp_mib: u64,
    runs: usize,
    fio_secs: u64,
    cache_mb: u64,
    bin: PathBuf,
    tmp: PathBuf,
    out: PathBuf,
    python: String,
    script: PathBuf,
    groups: Vec<String>,
    hold: bool,
}

fn env_u64(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Ok(v) => Ok(v.parse().map_err(|_| format!("{name}={v}: not a number"))?),
        Err(_) => Ok(default),
    }
}

impl Cfg {
    fn from_env() -> Res<Cfg> {
        let small = std::env::var("CKPTFS_BENCH_SMALL").is_ok_and(|v| v != "0" && !v.is_empty());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bin = match std::env::var_os("CKPTFS_BIN") {
            Some(b) => PathBuf::from(b),
            None => {
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| manifest.join("target"));
                target.join("release/ckptfs")
            }
        };
        if !bin.is_file() {
            return Err(format!(
                "{}: no ckptfs binary; run `cargo build --release` first or set CKPTFS_BIN",
                bin.display()
            )
            .into());
        }
        let out = std::env::var_os("CKPTFS_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                if Path::new("/dev/shm").is_dir() {
                    PathBuf::from("/dev/shm")
                } else {
                    PathBuf::from("/tmp")
                }
            });
        Ok(Cfg {
            gib: env_u64("CKPTFS_BENCH_GIB", if small { 1 } else { 8 })?.max(1),
            big_gib: env_u64("CKPTFS_BENCH_BIG_GIB", if small { 64 } else { 1024 })?.max(1),
            comp_mib: env_u64("CKPTFS_BENCH_COMP_MIB", if small { 64 } else { 256 })?.max(4),
            runs: env_u64("CKPTFS_BENCH_RUNS", 3)?.max(1) as usize,
            fio_secs: env_u64("CKPTFS_BENCH_FIO_SECS", if small { 3 } else { 10 })?.max(1),
            cache_mb: env_u64("CKPTFS_BENCH_CACHE_MB", 64)?,
            bin: fs::canonicalize(bin)?,
            tmp: std::env::var_os("CKPTFS_BENCH_TMP")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp")),
            out,
            python: std::env::var("CKPTFS_BENCH_PYTHON")
                .unwrap_or_else(|_| "/usr/bin/python3".into()),
            script: manifest.join("contrib/bench/qemu_incremental.py"),
            groups: std::env::var("CKPTFS_BENCH_ROWS")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_else(|_| {
                    ["seq", "rand", "cp", "incr", "meta", "comp"]
                        .map(String::from)
                        .to_vec()
                }),
            hold: std::env::var("CKPTFS_BENCH_HOLD").is_ok_and(|v| v == "1"),
        })
    }

    fn wants(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

// ---------------------------------------------------------------------------------------------
// Resources: every daemon, mount and directory this program creates is registered here and
// released by a guard's Drop, or by the signal thread on SIGINT/SIGTERM/SIGHUP.

enum Resource {
    /// A child process (its own process group) and the mount it serves, if any.
    Proc { pid: i32, mount: Option<PathBuf> },
    /// A directory to remove (after unmounting anything left under it).
    Dir(PathBuf),
}

static REGISTRY: Mutex<Vec<(u64, Resource)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Guard(u64);

impl Guard {
    fn new(r: Resource) -> Guard {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        REGISTRY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, r));
        Guard(id)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let r = {
            let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
            reg.iter()
                .position(|(id, _)| *id == self.0)
                .map(|i| reg.remove(i).1)
        };
        if let Some(r) = r {
            release(r);
        }
    }
}

fn release_all() {
    loop {
        let r = REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match r {
            Some((_, r)) => release(r),
            None => break,
        }
    }
}

fn release(r: Resource) {
    match r {
        Resource::Proc { pid, mount } => stop_process(pid, mount.as_deref()),
        Resource::Dir(d) => {
            for m in mounts_under(&d) {
                lazy_unmount(&m);
            }
            let _ = fs::remove_dir_all(&d);
        }
    }
}

/// Did our child `pid` exit within `t`? Reaps it.
fn wait_exit(pid: i32, t: Duration) -> bool {
    let end = Instant::now() + t;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on a child of ours; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid || r < 0 {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stop_process(pid: i32, mount: Option<&Path>) {
    // SAFETY: kill(2) on a PID this program spawned and has not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    if !wait_exit(pid, Duration::from_secs(10)) {
        if let Some(m) = mount {
            lazy_unmount(m);
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_exit(pid, Duration::from_secs(10));
    }
    if let Some(m) = mount {
        if is_mounted(m) {
            lazy_unmount(m);
        }
    }
}

fn lazy_unmount(m: &Path) {
    let _ = run_status(
        "umount",
        &["-l", &m.to_string_lossy()],
        Duration::from_secs(10),
    );
}

/// Mount points listed in /proc/self/mountinfo (octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            let mut out = String::new();
            let b = p.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' && i + 3 < b.len() {
                    if let Ok(v) = u8::from_str_radix(&p[i + 1..i + 4], 8) {
                        out.push(v as char);
                        i += 4;
                        continue;
                    }
                }
                out.push(b[i] as char);
                i += 1;
            }
            PathBuf::from(out)
        })
        .collect()
}

/// Wait until `path` is mounted by child `pid` (named `what`), polling every `poll`; its log
/// tells why if it exits first.
fn wait_mounted(
    what: &str,
    pid: i32,
    path: &Path,
    log: &Path,
    secs: u64,
    poll: Duration,
) -> Res<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    while !is_mounted(path) {
        let mut st = 0;
        // SAFETY: waitpid on our child, WNOHANG.
        if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
            return Err(format!(
                "{what} exited before mounting: {}",
                fs::read_to_string(log).unwrap_or_default().trim()
            )
            .into());
        }
        if Instant::now() > end {
            return Err(format!("{what} did not mount within {secs} s").into());
        }
        std::thread::sleep(poll);
    }
    Ok(())
}

fn is_mounted(p: &Path) -> bool {
    mount_points().iter().any(|m| m == p)
}

fn mounts_under(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(d))
        .collect();
    v.reverse();
    v
}

fn install_signal_thread() {
    // Block the signals in every thread (children unblock them in pre_exec); one thread waits.
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: `set` is initialised; sigwait writes the signal number.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("bench: signal {sig}: cleaning up");
        release_all();
        std::process::exit(130);
    });
}

/// A command in its own process group with the default signal mask.
fn command(prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    c
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run a command to completion under `timeout` (its process group is killed on expiry).
fn run_cmd(mut c: Command, what: &str, timeout: Duration) -> Res<Output> {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("{what}: {e}"))?;
    let pid = child.id() as i32;
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(s) => s?,
        Err(_) => {
            // SAFETY: the process group of a child we spawned (setpgid in pre_exec).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = rx.recv_timeout(Duration::from_secs(10));
            return Err(format!("{what}: timed out after {timeout:?}").into());
        }
    };
    Ok(Output {
        ok: status.success(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Run `prog args`; error (with stderr) unless it succeeds. Returns stdout.
fn run(prog: &str, args: &[&str], timeout: Duration) -> Res<String> {
    let what = format!("{prog} {}", args.join(" "));
    let what_short: String = what.chars().take(200).collect();
    let o = run_cmd(command(prog, args), &what_short, timeout)?;
    if !o.ok {
        return Err(format!("{what_short}: failed: {}", o.stderr.trim()).into());
    }
    Ok(o.stdout)
}

fn run_status(prog: &str, args: &[&str], timeout: Duration) -> Res<bool> {
    Ok(run_cmd(command(prog, args), prog, timeout)?.ok)
}

/// Time `prog args` (wall clock, process start to exit).
fn timed(prog: &str, args: &[&str], timeout: Duration) -> Res<f64> {
    let t = Instant::now();
    run(prog, args, timeout)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Run `f` on a helper thread, giving up after `t` (a hung FUSE call must not hang the bench;
/// the guards then stop the daemon, which fails the stuck call).
fn with_timeout<T: Send + 'static>(
    t: Duration,
    what: &str,
    f: impl FnOnce() -> Res<T> + Send + 'static,
) -> Res<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f().map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(t) {
        Ok(r) => r.map_err(|e| format!("{what}: {e}").into()),
        Err(_) => Err(format!("{what}: timed out after {t:?}").into()),
    }
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

const T_SHORT: Duration = Duration::from_secs(60);
const T_LONG: Duration = Duration::from_secs(1800);

fn drop_caches() -> Res<()> {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("drop_caches (needs root): {e}"))?;
    Ok(())
}

/// Read files once so the host page cache holds them.
fn warm(files: &[PathBuf]) -> Res<()> {
    for f in files {
        run(
            "dd",
            &[
                &format!("if={}", p(f)),
                "of=/dev/null",
                "bs=4M",
                "status=none",
            ],
            T_LONG,
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Daemons

/// A ckptfs daemon (`ckptfs -f IMAGE DIR`) serving DIR.
struct Ckptfs {
    pid: i32,
    dir: PathBuf,
    log: PathBuf,
    /// Spawn to mount.
    mount_secs: f64,
    _guard: Guard,
}

impl Ckptfs {
    fn start(cfg: &Cfg, image: &Path, dir: &Path) -> Res<Ckptfs> {
        fs::create_dir_all(dir)?;
        let log = dir.with_extension("log");
        let err = File::create(&log)?;
        let opts = format!("cache_mb={}", cfg.cache_mb);
        let t = Instant::now();
        let mut c = command(&p(&cfg.bin), &["-f", "-o", &opts, &p(image), &p(dir)]);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(err);
        let child = c
            .spawn()
            .map_err(|e| format!("{}: {e}", cfg.bin.display()))?;
        let pid = child.id() as i32;
        let guard = Guard::new(Resource::Proc {
            pid,
            mount: Some(dir.to_path_buf()),
        });
        let dir = fs::canonicalize(dir)?;
        wait_mounted("ckptfs", pid, &dir, &log, 60, Duration::from_micros(500))?;
        let mount_secs = t.elapsed().as_secs_f64();
        Ok(Ckptfs {
            pid,
            dir,
            log,
            mount_secs,
            _guard: guard,
        })
    }

    /// (VmHWM, VmRSS) in MiB.
    fn memory(&self) -> (f64, f64) {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let field = |name: &str| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0.0, |kb| kb / 1024.0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    fn stats(&self) -> Res<serde_json::Value> {
        let f = self.dir.join("stats.json");
        let text = with_timeout(Duration::from_secs(30), "stats.json", move || {
            Ok(fs::read_to_string(f)?)
        })?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Peak RSS over every ckptfs mount, per chain.
static PEAK_MEM: Mutex<BTreeMap<String, f64>> = Mutex::new(BTreeMap::new());

fn note_memory(chain: &str, m: &Ckptfs) {
    let (hwm, _) = m.memory();
    let mut peak = PEAK_MEM.lock().unwrap_or_else(|e| e.into_inner());
    let e = peak.entry(chain.to_string()).or_insert(0.0);
    *e = e.max(hwm);
}

/// Stop a ckptfs mount, recording its peak memory first.
fn finish(chain: &str, m: Ckptfs) {
    note_memory(chain, &m);
    let log = m.log.clone();
    drop(m);
    let text = fs::read_to_string(&log).unwrap_or_default();
    if text
        .lines()
        .any(|l| l.contains("ERROR") || l.contains("WARN"))
    {
        eprintln!("  ckptfs log: {}", text.trim());
    }
}

/// qemu-storage-daemon exporting the chain's top read-only over FUSE on a regular file.
struct Qsd {
    file: PathBuf,
    _guard: Guard,
}

impl Qsd {
    fn start(top: &Path, file: &Path) -> Res<Qsd> {
        File::create(file)?;
        let file = fs::canonicalize(file)?;
        let blockdev = format!(
            "driver=qcow2,node-name=n,read-only=on,file.driver=file,file.filename={}",
            p(top)
        );
        let export = format!(
            "type=fuse,id=e,node-name=n,mountpoint={},writable=off,allow-other=off",
            p(&file)
        );
        let log = file.with_extension("log");
        let mut c = command(
            "qemu-storage-daemon",
            &["--blockdev", &blockdev, "--export", &export],
        );
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let child = c.spawn().map_err(|e| format!("qemu-storage-daemon: {e}"))?;
        let pid = child.id() as i32;
        let guard = Guard::new(Resource::Proc {
            pid,
            mount: Some(file.clone()),
        });
        wait_mounted(
            "qemu-storage-daemon",
            pid,
            &file,
            &log,
            30,
            Duration::from_millis(2),
        )?;
        Ok(Qsd {
            file,
            _guard: guard,
        })
    }
}

/// qemu-nbd serving an image read-only on a unix socket (optionally with a bitmap).
struct Nbd {
    sock: PathBuf,
    _guard: Guard,
}

impl Nbd {
    fn start(image: &Path, sock: &Path, bitmap: Option<&str>) -> Res<Nbd> {
        let _ = fs::remove_file(sock);
        let mut args = vec![
            "-r".to_string(),
            "-t".into(),
            "-e".into(),
            "8".into(),
            "-f".into(),
            "qcow2".into(),
            "-k".into(),
            p(sock),
        ];
        if let Some(b) = bitmap {
            args.push("-B".into());
            args.push(b.into());
        }
        args.push(p(image));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = command("qemu-nbd", &args);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = c.spawn().map_err(|e| format!("qemu-nbd: {e}"))?;
        let pid = child.id() as i32;
        let guard = Guard::new(Resource::Proc { pid, mount: None });
        let end = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            let mut st = 0;
            // SAFETY: waitpid on our child, WNOHANG.
            if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
                return Err("qemu-nbd exited before serving".into());
            }
            if Instant::now() > end {
                return Err("qemu-nbd did not listen within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Nbd {
            sock: sock.to_path_buf(),
            _guard: guard,
        })
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", p(&self.sock))
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

struct Chain {
    name: &'static str,
    size: u64,
    /// Bottom to top.
    layers: Vec<PathBuf>,
    /// The oldest checkpoint's bitmap name, and the layers that carry it.
    oldest: String,
    checkpoints: usize,
    changed_bytes: u64,
    extents: usize,
}

impl Chain {
    fn top(&self) -> &Path {
        self.layers.last().expect("layers")
    }
}

/// xorshift64*: deterministic offsets, so every run builds the same chains.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Text-like bytes that deflate about 2.5:1 (words from a small vocabulary).
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let words: Vec<Vec<u8>> = (0..2000)
        .map(|_| {
            let n = 2 + r.next() % 8;
            (0..n).map(|_| b'a' + (r.next() % 26) as u8).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(&words[(r.next() % words.len() as u64) as usize]);
        out.push(if r.next() % 10 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// The changed extents: (offset, length, zero), cluster aligned, the same sequence of lengths
/// for any disk size.
fn changes(n: usize, size: u64, seed: u64) -> Vec<(u64, u64, bool)> {
    let mut r = Rng(seed);
    let clusters = size / CLUSTER;
    (0..n)
        .map(|i| {
            let len = (1 + r.next() % 4) * CLUSTER;
            let off = (r.next() % (clusters - 4)) * CLUSTER;
            (off, len, i % 20 == 19)
        })
        .collect()
}

fn qemu_io(img: &Path, cmds: &[String]) -> Res<()> {
    for batch in cmds.chunks(400) {
        let mut args: Vec<&str> = vec!["-t", "unsafe"];
        for c in batch {
            args.push("-c");
            args.push(c);
        }
        let img_s = p(img);
        args.push(&img_s);
        run("qemu-io", &args, T_LONG)?;
    }
    Ok(())
}

fn qemu_img(args: &[&str]) -> Res<String> {
    run("qemu-img", args, T_LONG)
}

fn create_layer(path: &Path, size: u64, backing: Option<&Path>) -> Res<()> {
    let size_s = size.to_string();
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        "cluster_size=64k".into(),
    ];
    if let Some(b) = backing {
        args.extend(["-b".into(), p(b), "-F".into(), "qcow2".into()]);
    }
    args.push(p(path));
    args.push(size_s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&args)?;
    Ok(())
}

/// A libvirt-style chain: `per_layer[i]` checkpoints are taken in layer i (each overlay first
/// re-creates the recording bitmaps of every earlier checkpoint, as libvirt does); after each
/// checkpoint one slice of `extents` is written. `fill` writes the base before c1.
fn build_chain(
    name: &'static str,
    dir: &Path,
    size: u64,
    per_layer: &[usize],
    extents: &[(u64, u64, bool)],
    fill: &[String],
) -> Res<Chain> {
    fs::create_dir_all(dir)?;
    let total: usize = per_layer.iter().sum();
    let slice = extents.len().div_ceil(total);
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut ck = 0usize;
    for (li, &n) in per_layer.iter().enumerate() {
        let path = dir.join(format!("layer{li}.qcow2"));
        create_layer(&path, size, layers.last().map(PathBuf::as_path))?;
        if li == 0 && !fill.is_empty() {
            qemu_io(&path, fill)?;
        }
        for c in 1..=ck {
            qemu_img(&["bitmap", "--add", &p(&path), &format!("c{c}")])?;
        }
        for _ in 0..n {
            ck += 1;
            qemu_img(&["bitmap", "--add", &p(&path), &format!("c{ck}")])?;
            let part =
                &extents[((ck - 1) * slice).min(extents.len())..(ck * slice).min(extents.len())];
            let cmds: Vec<String> = part
                .iter()
                .map(|&(o, l, z)| {
                    if z {
                        format!("write -z {o} {l}")
                    } else {
                        format!("write -P {} {o} {l}", 0x40 + ck)
                    }
                })
                .collect();
            qemu_io(&path, &cmds)?;
        }
        layers.push(path);
    }
    // Changed bytes since c1 at cluster granularity (overlapping extents merge).
    let mut v: Vec<(u64, u64)> = extents.iter().map(|&(o, l, _)| (o, o + l)).collect();
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Ok(Chain {
        name,
        size,
        layers,
        oldest: "c1".into(),
        checkpoints: total,
        changed_bytes: merged.iter().map(|(s, e)| e - s).sum(),
        extents: merged.len(),
    })
}

fn build_main(cfg: &Cfg, dir: &Path, pattern: &Path) -> Res<Chain> {
    let size = cfg.gib * GIB;
    // 36 % plain data and 2 % compressed in the base, in 256 MiB stripes; the changes
    // (about 7 % of the disk) bring the written share to about 40 %.
    let stripe = 256 * MIB;
    let mut fill = Vec::new();
    for i in 0..size / stripe {
        let base = i * stripe;
        let data = (stripe * 36 / 100) / CLUSTER * CLUSTER;
        fill.push(format!("write -P {} {base} {data}", 0x10 + i % 200));
        let comp = (stripe * 2 / 100) / CLUSTER * CLUSTER;
        fill.push(format!(
            "write -c -s {} {} {comp}",
            p(pattern),
            base + stripe / 2
        ));
    }
    let n = ((3438 * cfg.gib) / 8).max(100) as usize;
    let ext = changes(n, size, 0x5eed_0001);
    build_chain("main", dir, size, &[2, 1, 1], &ext, &fill)
}

fn build_big(cfg: &Cfg, dir: &Path) -> Res<Chain> {
    let size = cfg.big_gib * GIB;
    // The same number and lengths of changes as the main chain, spread over the big disk.
    let n = ((3438 * cfg.gib) / 8).max(100) as usize;
    let ext = changes(n, size, 0x5eed_0001);
    build_chain("big", dir, size, &[7, 7, 6], &ext, &[])
}

/// A fully compressed image of `mib` MiB of text-like data.
fn build_compressed(cfg: &Cfg, dir: &Path, kind: &str, raw: &Path) -> Res<PathBuf> {
    let out = dir.join(format!("comp-{kind}.qcow2"));
    let opt = format!("cluster_size=64k,compression_type={kind}");
    let _ = cfg;
    qemu_img(&[
        "convert",
        "-c",
        "-W",
        "-m",
        "4",
        "-O",
        "qcow2",
        "-o",
        &opt,
        &p(raw),
        &p(&out),
    ])?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Rows

#[derive(Clone, Copy, PartialEq)]
enum Unit {
    Secs,
    MibS,
    Iops,
    Mib,
    Factor,
}

impl Unit {
    fn higher_better(self) -> bool {
        matches!(self, Unit::MibS | Unit::Iops)
    }
    fn fmt(self, v: f64) -> String {
        match self {
            Unit::Secs if v < 1.0 => format!("{:.1} ms", v * 1e3),
            Unit::Secs => format!("{v:.2} s"),
            Unit::MibS => format!("{v:.0} MiB/s"),
            Unit::Iops => format!("{v:.0} IOPS"),
            Unit::Mib => format!("{v:.1} MiB"),
            Unit::Factor => format!("{v:.2}x"),
        }
    }
}

enum Target {
    /// Ratio of medians (ckptfs better by this factor) at least x.
    Ratio(f64),
    /// ckptfs median at most x (in the row's unit).
    AtMost(f64),
    /// A yes/no check with its explanation.
    Check(bool, String),
    Info,
}

struct Row {
    name: String,
    unit: Unit,
    ck: Vec<f64>,
    anchor_name: String,
    anchor: Vec<f64>,
    target: Target,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

impl Row {
    fn new(name: &str, unit: Unit, anchor_name: &str, target: Target) -> Row {
        Row {
            name: name.into(),
            unit,
            ck: Vec::new(),
            anchor_name: anchor_name.into(),
            anchor: Vec::new(),
            target,
        }
    }

    fn ratio(&self) -> Option<f64> {
        if self.anchor.is_empty() || self.ck.is_empty() {
            return None;
        }
        let (c, a) = (median(&self.ck), median(&self.anchor));
        Some(if self.unit.higher_better() {
            c / a
        } else {
            a / c
        })
    }

    fn verdict(&self) -> (&'static str, String) {
        match &self.target {
            Target::Ratio(x) => match self.ratio() {
                Some(r) => (if r >= *x { "PASS" } else { "MISS" }, format!(">= {x}x")),
                None => ("-", format!(">= {x}x")),
            },
            Target::AtMost(x) => {
                let m = median(&self.ck);
                (
                    if m <= *x { "PASS" } else { "MISS" },
                    format!("<= {}", self.unit.fmt(*x)),
                )
            }
            Target::Check(ok, what) => (if *ok { "PASS" } else { "MISS" }, what.clone()),
            Target::Info => ("info", String::new()),
        }
    }

    fn print_progress(&self) {
        let (v, t) = self.verdict();
        println!(
            "  {:<44} ckptfs {:>12} | {} {:>12} | ratio {} | {t} {v}",
            self.name,
            self.unit.fmt(median(&self.ck)),
            if self.anchor_name.is_empty() {
                "-"
            } else {
                &self.anchor_name
            },
            if self.anchor.is_empty() {
                "-".into()
            } else {
                self.unit.fmt(median(&self.anchor))
            },
            self.ratio().map_or("-".into(), |r| format!("{r:.2}x")),
        );
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| row | ckptfs min / median | anchor | anchor min / median | ratio | target | result |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let (v, t) = r.verdict();
        let pair = |s: &[f64]| {
            if s.is_empty() {
                "-".to_string()
            } else {
                format!("{} / {}", r.unit.fmt(min(s)), r.unit.fmt(median(s)))
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            pair(&r.ck),
            if r.anchor_name.is_empty() {
                "-"
            } else {
                &r.anchor_name
            },
            pair(&r.anchor),
            r.ratio().map_or("-".into(), |x| format!("{x:.2}x")),
            t,
            v
        );
    }
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

fn dd_secs(file: &Path, direct: bool) -> Res<f64> {
    let iff = format!("if={}", p(file));
    let mut args = vec![iff.as_str(), "of=/dev/null", "bs=1M", "status=none"];
    if direct {
        args.push("iflag=direct");
    }
    timed("dd", &args, T_LONG)
}

fn fio_iops(file: &Path, secs: u64) -> Res<f64> {
    let rt = format!("--runtime={secs}");
    let ff = format!("--filename={}", p(file));
    let out = run(
        "fio",
        &[
            "--name=rand4k",
            &ff,
            "--readonly",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            "--numjobs=2",
            "--direct=1",
            "--time_based",
            &rt,
            "--group_reporting",
            "--output-format=json",
        ],
        Duration::from_secs(secs + 120),
    )?;
    let start = out.find('{').ok_or("fio: no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&out[start..])?;
    v["jobs"][0]["read"]["iops"]
        .as_f64()
        .ok_or_else(|| "fio: no read.iops".into())
}

/// The QEMU way of extracting the blocks changed since `bitmap`: merge the bitmap of every
/// layer into a temporary one in a scratch overlay, export it with qemu-nbd -B, walk the
/// dirty-bitmap block status and read the dirty extents into a sparse file. Returns seconds.
fn qemu_incremental(cfg: &Cfg, chain: &Chain, work: &Path, out: &Path) -> Res<f64> {
    let scratch = work.join("scratch.qcow2");
    let sock = work.join("incr.sock");
    let _ = fs::remove_file(&scratch);
    let t = Instant::now();
    let top = p(chain.top());
    let s = p(&scratch);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &top, "-F", "qcow2", &s])?;
    qemu_img(&["bitmap", "--add", "--disable", &s, "since"])?;
    for l in &chain.layers {
        qemu_img(&[
            "bitmap",
            "--merge",
            &chain.oldest,
            "-b",
            &p(l),
            "-F",
            "qcow2",
            &s,
            "since",
        ])?;
    }
    let nbd = Nbd::start(&scratch, &sock, Some("since"))?;
    run(
        &cfg.python,
        &[&p(&cfg.script), &p(&nbd.sock), "since", &p(out)],
        T_LONG,
    )?;
    drop(nbd);
    let secs = t.elapsed().as_secs_f64();
    let _ = fs::remove_file(&scratch);
    Ok(secs)
}

fn rm(f: &Path) {
    let _ = fs::remove_file(f);
}

fn first_byte(path: PathBuf) -> Res<f64> {
    with_timeout(Duration::from_secs(120), "first byte", move || {
        let t = Instant::now();
        let f = File::open(&path)?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0)?;
        Ok(t.elapsed().as_secs_f64())
    })
}

fn first_seek_data(path: PathBuf) -> Res<f64> {
    with_timeout(Duration::from_secs(120), "first SEEK_DATA", move || {
        let t = Instant::now();
        let f = File::open(&path)?;
        // SAFETY: lseek on an fd we own.
        let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(t.elapsed().as_secs_f64())
    })
}

fn read_all(path: PathBuf) -> Res<(f64, u64)> {
    with_timeout(Duration::from_secs(600), "full read", move || {
        let t = Instant::now();
        let mut f = File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok((t.elapsed().as_secs_f64(), n))
    })
}

fn cache_misses(m: &Ckptfs) -> Res<u64> {
    Ok(m.stats()?["cache"]["misses"].as_u64().unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Row groups

struct Ctx<'a> {
    cfg: &'a Cfg,
    work: PathBuf,
    out: PathBuf,
    rows: Vec<Row>,
}

impl Ctx<'_> {
    fn mnt(&self, name: &str) -> PathBuf {
        self.work.join(format!("mnt-{name}"))
    }

    fn ck(&self, chain: &Chain) -> Res<Ckptfs> {
        Ckptfs::start(self.cfg, chain.top(), &self.mnt(chain.name))
    }

    fn qsd(&self, chain: &Chain) -> Res<Qsd> {
        Qsd::start(
            chain.top(),
            &self.work.join(format!("qsd-{}.img", chain.name)),
        )
    }

    fn push(&mut self, r: Row) {
        r.print_progress();
        self.rows.push(r);
    }
}

fn seq_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let runs = cx.cfg.runs;
    let qsd_anchor = "QEMU FUSE export";
    let mut warm_row = Row::new(
        "seq dd bs=1M, warm (fresh mounts)",
        Unit::MibS,
        qsd_anchor,
        Target::Ratio(2.0),
    );
    let mut reread = Row::new(
        "seq dd bs=1M, re-read (kernel page cache)",
        Unit::MibS,
        qsd_anchor,
        Target::Info,
    );
    let mut direct = Row::new(
        "seq dd bs=1M iflag=direct, warm",
        Unit::MibS,
        qsd_anchor,
        Target::Info,
    );
    let mut cold = Row::new(
        "seq dd bs=1M, cold (drop_caches)",
        Unit::MibS,
        qsd_anchor,
        Target::Ratio(2.0),
    );
    warm(&c.layers)?;
    for _ in 0..runs {
        let m = cx.ck(c)?;
        let q = cx.qsd(c)?;
        let disk = m.dir.join("current/disk.img");
        warm_row.ck.push(mib_s(c.size, dd_secs(&disk, false)?));
        warm_row
            .anchor
            .push(mib_s(c.size, dd_secs(&q.file, false)?));
        reread.ck.push(mib_s(c.size, dd_secs(&disk, false)?));
        reread.anchor.push(mib_s(c.size, dd_secs(&q.file, false)?));
        direct.ck.push(mib_s(c.size, dd_secs(&disk, true)?));
        direct.anchor.push(mib_s(c.size, dd_secs(&q.file, true)?));
        finish(c.name, m);
        drop(q);
    }
    for _ in 0..runs {
        let m = cx.ck(c)?;
        let q = cx.qsd(c)?;
        drop_caches()?;
        cold.ck.push(mib_s(
            c.size,
            dd_secs(&m.dir.join("current/disk.img"), false)?,
        ));
        drop_caches()?;
        cold.anchor.push(mib_s(c.size, dd_secs(&q.file, false)?));
        finish(c.name, m);
        drop(q);
    }
    // The raw page cache, for reference: the layers read from cache (sum of file lengths).
    let mut raw = Row::new(
        "raw page cache (dd of the layer files)",
        Unit::MibS,
        "",
        Target::Info,
    );
    let bytes: u64 = c
        .layers
        .iter()
        .map(|l| fs::metadata(l).map_or(0, |m| m.len()))
        .sum();
    warm(&c.layers)?;
    for _ in 0..runs {
        let t = Instant::now();
        warm(&c.layers)?;
        raw.ck.push(mib_s(bytes, t.elapsed().as_secs_f64()));
    }
    cx.push(warm_row);
    cx.push(reread);
    cx.push(direct);
    cx.push(cold);
    cx.push(raw);
    Ok(())
}

fn rand_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let mut row = Row::new(
        "rand 4k fio psync 2 jobs O_DIRECT",
        Unit::Iops,
        "QEMU FUSE export",
        Target::Ratio(1.2),
    );
    warm(&c.layers)?;
    let m = cx.ck(c)?;
    let q = cx.qsd(c)?;
    for _ in 0..cx.cfg.runs {
        row.ck
            .push(fio_iops(&m.dir.join("current/disk.img"), cx.cfg.fio_secs)?);
        row.anchor.push(fio_iops(&q.file, cx.cfg.fio_secs)?);
    }
    finish(c.name, m);
    drop(q);
    cx.push(row);
    Ok(())
}

fn cp_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let mut row = Row::new(
        "cp --sparse=always current/disk.img",
        Unit::Secs,
        "qemu-nbd + nbdcopy",
        Target::Ratio(1.0),
    );
    warm(&c.layers)?;
    let out = cx.out.join("disk-copy.raw");
    let nbd = Nbd::start(c.top(), &cx.work.join("copy.sock"), None)?;
    for _ in 0..cx.cfg.runs {
        let m = cx.ck(c)?;
        row.ck.push(timed(
            "cp",
            &[
                "--sparse=always",
                &p(&m.dir.join("current/disk.img")),
                &p(&out),
            ],
            T_LONG,
        )?);
        rm(&out);
        finish(c.name, m);
        row.anchor
            .push(timed("nbdcopy", &[&nbd.uri(), &p(&out)], T_LONG)?);
        rm(&out);
    }
    drop(nbd);
    cx.push(row);
    Ok(())
}

/// cp --sparse=always of the oldest checkpoint's changed.img against the QEMU way; returns the
/// ckptfs median.
fn incr_row(cx: &mut Ctx, c: &Chain) -> Res<f64> {
    let name = format!(
        "incr cp {}/changed.img, {} GiB ({} MB in {} runs)",
        c.oldest,
        c.size / GIB,
        c.changed_bytes / 1_000_000,
        c.extents
    );
    let mut row = Row::new(
        &name,
        Unit::Secs,
        "QEMU way (merge, qemu-nbd -B, walk, read)",
        Target::Ratio(2.0),
    );
    warm(&c.layers)?;
    let out = cx.out.join("incr.raw");
    for _ in 0..cx.cfg.runs {
        let m = cx.ck(c)?;
        let src = m.dir.join(&c.oldest).join("changed.img");
        row.ck.push(timed(
            "cp",
            &["--sparse=always", &p(&src), &p(&out)],
            T_LONG,
        )?);
        let copied = fs::metadata(&out)?.blocks() * 512;
        rm(&out);
        finish(c.name, m);
        row.anchor
            .push(qemu_incremental(cx.cfg, c, &cx.work, &out)?);
        let copied_q = fs::metadata(&out)?.blocks() * 512;
        rm(&out);
        if copied.abs_diff(copied_q) > copied_q / 10 {
            eprintln!("  note: ckptfs copied {copied} bytes, the QEMU way {copied_q}");
        }
    }
    let med = median(&row.ck);
    cx.push(row);
    Ok(med)
}

fn meta_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let runs = cx.cfg.runs;
    let gib = c.size / GIB;
    let mut mount = Row::new(
        &format!("mount {gib} GiB chain, {} checkpoints", c.checkpoints),
        Unit::Secs,
        "",
        Target::AtMost(1.0),
    );
    let mut fb = Row::new(
        &format!("first byte of {}/bitmap.bin", c.oldest),
        Unit::Secs,
        "",
        Target::AtMost(0.1),
    );
    let mut seek = Row::new(
        &format!("first SEEK_DATA of {}/changed.img", c.oldest),
        Unit::Secs,
        "",
        Target::AtMost(0.1),
    );
    let mut full = Row::new(
        &format!("full {}/bitmap.bin (fresh mount)", c.oldest),
        Unit::Secs,
        &format!("qemu-img bitmap --merge x{}", c.checkpoints),
        Target::Ratio(1.0),
    );
    let mut again = Row::new(
        &format!("re-read {}/bitmap.bin after drop_caches", c.oldest),
        Unit::Secs,
        "",
        Target::Info,
    );
    let mut misses_added = 0;
    warm(&c.layers)?;
    let oldest = c.oldest.clone();
    for i in 0..runs {
        let m = cx.ck(c)?;
        mount.ck.push(m.mount_secs);
        fb.ck
            .push(first_byte(m.dir.join(&oldest).join("bitmap.bin"))?);
        finish(c.name, m);

        let m = cx.ck(c)?;
        seek.ck
            .push(first_seek_data(m.dir.join(&oldest).join("changed.img"))?);
        finish(c.name, m);

        let m = cx.ck(c)?;
        let (secs, n) = read_all(m.dir.join(&oldest).join("bitmap.bin"))?;
        full.ck.push(secs);
        let before = cache_misses(&m)?;
        drop_caches()?;
        warm(&c.layers)?;
        again
            .ck
            .push(read_all(m.dir.join(&oldest).join("bitmap.bin"))?.0);
        misses_added += cache_misses(&m)? - before;
        if i == 0 {
            let cj = fs::read_to_string(m.dir.join("checkpoints.json"))?;
            let v: serde_json::Value = serde_json::from_str(&cj)?;
            let first = v["checkpoints"][0]["name"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            if first != oldest {
                eprintln!("  note: checkpoints.json lists {first} first, not {oldest}");
            }
            println!("  bitmap.bin: {n} bytes");
        }
        finish(c.name, m);

        // Anchor: qemu-img merges the same checkpoints' bitmaps of the top into a temporary one.
        let scratch = cx.work.join(format!("merge-{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p(c.top()),
            "-F",
            "qcow2",
            &p(&scratch),
        ])?;
        let mut args: Vec<String> = vec!["bitmap".into(), "--add".into(), "--disable".into()];
        for k in 1..=c.checkpoints {
            args.push("--merge".into());
            args.push(format!("c{k}"));
        }
        args.extend([
            "-b".into(),
            p(c.top()),
            "-F".into(),
            "qcow2".into(),
            p(&scratch),
            "tmp".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        full.anchor.push(timed("qemu-img", &args, T_LONG)?);
        rm(&scratch);
    }
    again.target = Target::Check(
        misses_added == 0,
        format!("served from the chunk cache ({misses_added} new misses)"),
    );
    cx.push(mount);
    cx.push(fb);
    cx.push(seek);
    cx.push(full);
    cx.push(again);
    Ok(())
}

/// Decode speed of the library itself: the same data in 64 KiB clusters, compressed in memory.
fn library_decode_mib_s(kind: &str, data: &[u8]) -> Res<f64> {
    let cs = CLUSTER as usize;
    let mut packed: Vec<Vec<u8>> = Vec::new();
    for c in data.chunks(cs) {
        packed.push(match kind {
            "zlib" => {
                let mut e =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(c)?;
                e.finish()?
            }
            _ => zstd::bulk::compress(c, 0)?,
        });
    }
    let mut out = vec![0u8; cs];
    let t = Instant::now();
    for z in &packed {
        match kind {
            "zlib" => {
                let mut d = flate2::read::DeflateDecoder::new(&z[..]);
                d.read_exact(&mut out)?;
            }
            _ => {
                let n = zstd::bulk::decompress_to_buffer(z, &mut out[..])?;
                if n != cs {
                    return Err("zstd: short cluster".into());
                }
            }
        }
    }
    Ok(mib_s(data.len() as u64, t.elapsed().as_secs_f64()))
}

fn comp_rows(cx: &mut Ctx, images: &[(String, PathBuf)], data: &[u8]) -> Res<()> {
    for (kind, img) in images {
        let mut row = Row::new(
            &format!("{kind} compressed image, dd iflag=direct"),
            Unit::MibS,
            &format!("{kind} library decode (1 thread)"),
            Target::Ratio(0.8),
        );
        warm(std::slice::from_ref(img))?;
        let chain = Chain {
            name: "comp",
            size: data.len() as u64,
            layers: vec![img.clone()],
            oldest: String::new(),
            checkpoints: 0,
            changed_bytes: 0,
            extents: 0,
        };
        for _ in 0..cx.cfg.runs {
            let m = cx.ck(&chain)?;
            let secs = dd_secs(&m.dir.join("current/disk.img"), true)?;
            row.ck.push(mib_s(chain.size, secs));
            finish("comp", m);
            row.anchor.push(library_decode_mib_s(kind, data)?);
        }
        cx.push(row);
    }
    Ok(())
}

fn df(path: &Path) -> String {
    run("df", &["-h", &p(path)], T_SHORT)
        .map(|s| s.lines().last().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn main() {
    install_signal_thread();
    let r = std::panic::catch_unwind(real_main);
    release_all();
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
        Err(_) => std::process::exit(101),
    }
}

fn real_main() -> Res<()> {
    let cfg = Cfg::from_env()?;
    for tool in [
        "qemu-img",
        "qemu-io",
        "qemu-nbd",
        "qemu-storage-daemon",
        "nbdcopy",
        "fio",
        "cp",
        "dd",
    ] {
        if run_status("sh", &["-c", &format!("command -v {tool}")], T_SHORT).ok() != Some(true) {
            return Err(format!("{tool} not found (see the header of examples/bench.rs)").into());
        }
    }
    if !run_status(&cfg.python, &["-c", "import nbd"], T_SHORT).unwrap_or(false) {
        return Err(format!(
            "{}: no libnbd module (apt-get install python3-libnbd)",
            cfg.python
        )
        .into());
    }
    let work = cfg.tmp.join(format!("ckptfs-bench-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let _work_guard = Guard::new(Resource::Dir(work.clone()));
    let work = fs::canonicalize(&work)?;
    let out = cfg
        .out
        .join(format!("ckptfs-bench-out-{}", std::process::id()));
    fs::create_dir_all(&out)?;
    let _out_guard = Guard::new(Resource::Dir(out.clone()));

    let date = run("date", &["-u", "+%Y-%m-%d %H:%M UTC"], T_SHORT)?;
    println!("ckptfs bench {} — {}", date.trim(), cfg.bin.display());
    println!(
        "main {} GiB, big {} GiB, compressed {} MiB, {} runs per row, cache_mb={}, work {}",
        cfg.gib,
        cfg.big_gib,
        cfg.comp_mib,
        cfg.runs,
        cfg.cache_mb,
        work.display()
    );
    println!("  before: {}", df(&work));

    let pattern = work.join("pattern.dat");
    fs::write(&pattern, compressible(4 << 20, 7))?;

    let need_main = ["seq", "rand", "cp", "incr"].iter().any(|g| cfg.wants(g)) || cfg.hold;
    let need_big = cfg.wants("meta") || cfg.wants("incr");
    let t = Instant::now();
    let main_chain = if need_main {
        let c = build_main(&cfg, &work.join("main"), &pattern)?;
        println!(
            "built main chain in {:.1} s: {} changed bytes in {} runs since c1; {}",
            t.elapsed().as_secs_f64(),
            c.changed_bytes,
            c.extents,
            df(&work)
        );
        Some(c)
    } else {
        None
    };
    let t = Instant::now();
    let big_chain = if need_big {
        let c = build_big(&cfg, &work.join("big"))?;
        println!(
            "built big chain in {:.1} s: {} changed bytes in {} runs since c1; {}",
            t.elapsed().as_secs_f64(),
            c.changed_bytes,
            c.extents,
            df(&work)
        );
        Some(c)
    } else {
        None
    };

    let mut cx = Ctx {
        cfg: &cfg,
        work: work.clone(),
        out,
        rows: Vec::new(),
    };

    if cfg.hold {
        let c = main_chain.as_ref().expect("main chain");
        let m = cx.ck(c)?;
        println!(
            "HOLD: ckptfs pid {} mounted at {}; press Enter to stop",
            m.pid,
            m.dir.display()
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        finish(c.name, m);
        return Ok(());
    }

    if let Some(c) = &main_chain {
        if cfg.wants("seq") {
            println!("== sequential reads");
            seq_rows(&mut cx, c)?;
        }
        if cfg.wants("rand") {
            println!("== random reads");
            rand_rows(&mut cx, c)?;
        }
        if cfg.wants("cp") {
            println!("== sparse copy of current/disk.img");
            cp_rows(&mut cx, c)?;
        }
    }
    if cfg.wants("incr") {
        println!("== incremental copy");
        let small = incr_row(&mut cx, main_chain.as_ref().expect("main"))?;
        let big = incr_row(&mut cx, big_chain.as_ref().expect("big"))?;
        let ratio = big / small;
        let mut r = Row::new(
            "incr time, big disk / main disk (same changes)",
            Unit::Factor,
            "",
            Target::AtMost(1.25),
        );
        r.ck.push(ratio);
        cx.push(r);
    }
    if cfg.wants("meta") {
        println!("== metadata ({} GiB chain)", cfg.big_gib);
        meta_rows(&mut cx, big_chain.as_ref().expect("big"))?;
    }
    if cfg.wants("comp") {
        println!("== compressed clusters");
        let raw = work.join("comp.raw");
        let data = compressible((cfg.comp_mib * MIB) as usize, 11);
        fs::write(&raw, &data)?;
        let mut imgs = Vec::new();
        for kind in ["zlib", "zstd"] {
            imgs.push((kind.to_string(), build_compressed(&cfg, &work, kind, &raw)?));
        }
        rm(&raw);
        comp_rows(&mut cx, &imgs, &data)?;
    }

    let peak = PEAK_MEM.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let limit = 64.0 + cfg.cache_mb as f64;
    for (chain, hwm) in peak {
        let mut r = Row::new(
            &format!("ckptfs peak RSS (VmHWM), {chain} chain"),
            Unit::Mib,
            "",
            Target::AtMost(limit),
        );
        r.ck.push(hwm);
        cx.push(r);
    }
    println!("  after: {}", df(&work));
    println!(
        "\nResults ({}, {} runs per row; ratio = ckptfs vs anchor, medians, >1 = ckptfs better):",
        date.trim(),
        cfg.runs
    );
    print_table(&cx.rows);
    Ok(())
}

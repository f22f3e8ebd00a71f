//! Harness for the mount-level tests: mounts made through the real binary and owned by a guard
//! that always unmounts, every file access under a timeout, and small helpers to read the
//! mounted tree (SEEK_DATA/SEEK_HOLE maps, bitmap.bin, extents, JSON) and to build the
//! expected since-sets from a logged list of writes.
//!
//! Rules kept here: a hung filesystem fails the test instead of hanging it (file accesses run
//! in a thread with a 30 s timeout, external tools under `timeout`); only processes this test
//! started are ever killed, by PID.

#![allow(dead_code)]

use crate::common;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one access to the mounted tree may take.
pub const ACCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ckptfs")
}

/// Run `f` in a thread and wait at most `ACCESS_TIMEOUT` for it; a panic inside is re-raised.
pub fn timed<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    timed_for(what, ACCESS_TIMEOUT, f)
}

pub fn timed_for<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => std::panic::resume_unwind(p),
        Err(_) => panic!("{what}: no answer within {limit:?} (hung filesystem?)"),
    }
}

// ---------------------------------------------------------------------------------------
// File access through the mount (all timed)

pub fn try_read(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    timed(&format!("read {}", path.display()), move || {
        std::fs::read(p)
    })
}

pub fn read(path: &Path) -> Vec<u8> {
    try_read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn read_text(path: &Path) -> String {
    String::from_utf8(read(path)).unwrap_or_else(|e| panic!("{}: not UTF-8: {e}", path.display()))
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let t = read_text(path);
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: bad JSON ({e}):\n{t}", path.display()))
}

pub fn metadata(path: &Path) -> std::fs::Metadata {
    let p = path.to_path_buf();
    timed(&format!("stat {}", path.display()), move || {
        std::fs::metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
    })
}

pub fn exists(path: &Path) -> bool {
    let p = path.to_path_buf();
    timed(&format!("stat {}", path.display()), move || p.exists())
}

/// Directory entry names, sorted.
pub fn list_dir(path: &Path) -> Vec<String> {
    let p = path.to_path_buf();
    timed(&format!("readdir {}", path.display()), move || {
        let mut v: Vec<String> = std::fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    })
}

/// `pread` loop: up to `len` bytes at `off` (short only at end of file).
pub fn pread_full(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

/// The data ranges `[start, end)` of a file as `lseek(SEEK_DATA/SEEK_HOLE)` reports them.
pub fn seek_map_local(path: &Path) -> std::io::Result<Vec<(u64, u64)>> {
    let f = File::open(path)?;
    let fd = f.as_raw_fd();
    let size = f.metadata()?.len();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off: u64 = 0;
    while off < size {
        // SAFETY: lseek(2) on an fd owned by `f`, which outlives the calls.
        let d = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (d, h) = (d as u64, h as u64);
        assert!(
            h > d && d >= off,
            "{}: lseek went backwards or stuck: SEEK_DATA({off}) = {d}, SEEK_HOLE({d}) = {h}",
            path.display()
        );
        out.push((d, h));
        off = h;
    }
    Ok(out)
}

/// `seek_map_local` through the mount, timed.
pub fn seek_map(path: &Path) -> Vec<(u64, u64)> {
    let p = path.to_path_buf();
    timed(&format!("lseek map {}", path.display()), move || {
        seek_map_local(&p).unwrap_or_else(|e| panic!("lseek map {}: {e}", p.display()))
    })
}

/// `r` failed with `errno`.
pub fn assert_errno(r: std::io::Result<Vec<u8>>, errno: i32, what: &str) {
    match r {
        Ok(v) => panic!(
            "{what}: expected errno {errno}, read {} bytes instead (first {:02x?})",
            v.len(),
            &v[..v.len().min(16)]
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(errno), "{what}: got {e}"),
    }
}

/// Assert reading `path` fails with EIO (at open or at read).
pub fn assert_eio(path: &Path) {
    assert_errno(try_read(path), libc::EIO, &path.display().to_string());
}

// ---------------------------------------------------------------------------------------
// Processes and mounts

/// Mount points in /proc/mounts (octal escapes decoded).
pub fn mount_points() -> Vec<String> {
    let t = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    t.lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(unescape_mount)
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(dir: &Path) -> bool {
    let d = dir.to_string_lossy();
    mount_points().iter().any(|m| *m == d)
}

/// The fstype /proc/mounts gives for `dir`.
pub fn mount_type(dir: &Path) -> Option<String> {
    let t = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    let d = dir.to_string_lossy();
    t.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 2 && unescape_mount(f[1]) == d).then(|| f[2].to_string())
    })
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has closed its files and dropped its locks; it only waits to be reaped.
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// PIDs of live ckptfs processes whose argv names `dir` (each test's mount point is a unique
/// temp path, so these are the processes this test started).
pub fn ckptfs_pids_for(dir: &Path) -> Vec<i32> {
    let want = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_ckptfs = args
            .first()
            .and_then(|a0| Path::new(a0).file_name())
            .is_some_and(|n| n.to_string_lossy().contains("ckptfs"));
        if is_ckptfs
            && args
                .iter()
                .any(|a| a == &want || a.trim_end_matches('/') == want)
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// Wait until no ckptfs process serves `dir`; SIGKILL (by PID) any left after `grace`.
/// Returns whether they all ended by themselves.
pub fn reap_daemons(dir: &Path, grace: Duration) -> bool {
    let start = Instant::now();
    loop {
        let pids = ckptfs_pids_for(dir);
        if pids.is_empty() {
            return true;
        }
        if start.elapsed() > grace {
            for pid in pids {
                // SAFETY: kill(2) of a ckptfs process serving this test's unique mount point.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(200));
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for a process (not our child) to end, by PID.
pub fn wait_pid_gone(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Result of running a command with its output sent to files.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `cmd args` under `timeout -k 5 60`, stdout/stderr to files (not pipes: a daemonizing
/// child would keep pipes open), in `cwd` if given.
pub fn run_files<S: AsRef<OsStr>>(cwd: Option<&Path>, cmd: &str, args: &[S]) -> Ran {
    let logs = common::tempdir();
    let out_p = logs.path().join("out");
    let err_p = logs.path().join("err");
    let mut c = Command::new("timeout");
    c.args(["-k", "5", "60", cmd])
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_p).unwrap())
        .stderr(File::create(&err_p).unwrap());
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let st = c
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    Ran {
        ok: st.success(),
        code: st.code(),
        stdout: std::fs::read_to_string(out_p).unwrap_or_default(),
        stderr: std::fs::read_to_string(err_p).unwrap_or_default(),
    }
}

/// A ckptfs mount owned by the test. Drop unmounts (`fusermount3 -u`, then `umount -l` if
/// still mounted), then waits for the daemon to end (SIGKILL by PID after a grace period).
pub struct Mount {
    pub dir: PathBuf,
    /// The `-f` child, when mounted in the foreground.
    child: Option<Child>,
    done: bool,
}

impl Mount {
    /// `ckptfs [-o OPTS] IMAGE DIR` (daemonizing). Err(Ran) if it failed.
    pub fn try_new(image: &Path, dir: &Path, opts: Option<&str>) -> Result<Mount, Ran> {
        let dir = dir.canonicalize().expect("mount point exists");
        let mut args: Vec<&OsStr> = Vec::new();
        if let Some(o) = opts {
            args.push(OsStr::new("-o"));
            args.push(OsStr::new(o));
        }
        args.push(image.as_os_str());
        args.push(dir.as_os_str());
        let r = run_files(None, bin(), &args);
        let m = Mount {
            dir,
            child: None,
            done: false,
        };
        if r.ok {
            assert!(
                is_mounted(&m.dir),
                "ckptfs exited 0 but {} is not mounted",
                m.dir.display()
            );
            Ok(m)
        } else {
            // Nothing should be mounted; the guard still cleans up if something is.
            drop(m);
            Err(r)
        }
    }

    /// Mount or panic with ckptfs's message.
    pub fn new(image: &Path, dir: &Path, opts: Option<&str>) -> Mount {
        Mount::try_new(image, dir, opts).unwrap_or_else(|r| {
            panic!(
                "ckptfs {} {} failed ({:?}):\n{}{}",
                image.display(),
                dir.display(),
                r.code,
                r.stdout,
                r.stderr
            )
        })
    }

    /// `ckptfs -f [-o OPTS] IMAGE DIR` as a child of this test; waits until mounted.
    pub fn foreground(image: &Path, dir: &Path, opts: Option<&str>, log: &Path) -> Mount {
        let dir = dir.canonicalize().expect("mount point exists");
        let mut c = Command::new(bin());
        c.arg("-f");
        if let Some(o) = opts {
            c.arg("-o").arg(o);
        }
        c.arg(image).arg(&dir);
        c.stdin(Stdio::null())
            .stdout(File::create(log).unwrap())
            .stderr(File::create(log.with_extension("err")).unwrap());
        let child = c.spawn().expect("spawn ckptfs -f");
        let mut m = Mount {
            dir,
            child: Some(child),
            done: false,
        };
        let start = Instant::now();
        while !is_mounted(&m.dir) {
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "ckptfs -f exited ({st}) before mounting: {}",
                    std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < ACCESS_TIMEOUT,
                "ckptfs -f did not mount {} within 30 s",
                m.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// Take ownership of a mount made some other way (mount(8)).
    pub fn adopt(dir: &Path) -> Mount {
        Mount {
            dir: dir.canonicalize().unwrap(),
            child: None,
            done: false,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn child_pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Wait for the foreground child to exit (after a signal), returning its status.
    pub fn wait_child(&mut self, limit: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("a foreground mount");
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(start.elapsed() < limit, "ckptfs -f did not exit in time");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `wait_child` (within the access timeout) and assert it exited 0.
    pub fn wait_child_ok(&mut self, what: &str) {
        let st = self.wait_child(ACCESS_TIMEOUT);
        assert!(st.success(), "{what}: {st}");
    }

    /// Send `sig` to the foreground child (this test's own process, by PID).
    pub fn signal_child(&self, sig: i32) {
        let pid = self.child_pid().expect("a foreground mount");
        // SAFETY: kill(2) of the ckptfs -f child this test started.
        unsafe { libc::kill(pid, sig) };
    }

    /// Unmount with `fusermount3 -u` now, asserting it worked and the daemon ended by itself.
    ///
    /// EBUSY is retried for a few seconds: another test thread that forks a helper while this
    /// test has a file of the mount open hands that descriptor to the child until its exec
    /// closes it (O_CLOEXEC), which keeps the mount busy for that moment.
    pub fn unmount(mut self) {
        let start = Instant::now();
        loop {
            let r = run_files(
                None,
                "fusermount3",
                &[OsStr::new("-u"), self.dir.as_os_str()],
            );
            if r.ok {
                break;
            }
            let busy = r.stderr.contains("busy");
            assert!(
                busy && start.elapsed() < Duration::from_secs(5),
                "fusermount3 -u {}: {}",
                self.dir.display(),
                r.stderr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!is_mounted(&self.dir), "still mounted after fusermount3 -u");
        if let Some(mut c) = self.child.take() {
            let start = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if start.elapsed() > ACCESS_TIMEOUT {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("ckptfs -f did not exit after unmount");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        assert!(
            reap_daemons(&self.dir, ACCESS_TIMEOUT),
            "the ckptfs daemon for {} did not exit after unmount",
            self.dir.display()
        );
        self.done = true;
    }

    fn cleanup(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if is_mounted(&self.dir) {
            let _ = run_files(
                None,
                "fusermount3",
                &[OsStr::new("-u"), self.dir.as_os_str()],
            );
        }
        if is_mounted(&self.dir) {
            let _ = run_files(None, "umount", &[OsStr::new("-l"), self.dir.as_os_str()]);
        }
        if let Some(mut c) = self.child.take() {
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        reap_daemons(&self.dir, Duration::from_secs(10));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A qemu-storage-daemon (or qemu-nbd) started with a pid file; Drop sends SIGTERM by that
/// PID (then SIGKILL if it lingers).
pub struct PidFileDaemon {
    pub pid_file: PathBuf,
}

impl PidFileDaemon {
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|&p: &i32| p > 1)
    }

    /// Send `sig` by PID and wait for the process to end.
    pub fn signal_and_wait(&self, sig: i32) {
        let pid = self.pid().expect("daemon pid file");
        // SAFETY: kill(2) of the daemon this test started (its own pid file).
        unsafe { libc::kill(pid, sig) };
        assert!(
            wait_pid_gone(pid, ACCESS_TIMEOUT),
            "daemon {pid} did not end after signal {sig}"
        );
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

impl Drop for PidFileDaemon {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            if alive(pid) {
                // SAFETY: as in signal_and_wait.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                if !wait_pid_gone(pid, Duration::from_secs(10)) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    wait_pid_gone(pid, Duration::from_secs(5));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Write logs and expected since-sets

/// `64k`, `1M`, `12345` -> bytes.
pub fn parse_size(s: &str) -> u64 {
    let (num, mul) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .unwrap_or_else(|_| panic!("bad size {s}"))
        * mul
}

/// A global timeline of checkpoint moments and writes, so "everything written since C" is
/// known exactly.
#[derive(Debug, Default)]
pub struct History {
    clock: usize,
    marks: BTreeMap<String, usize>,
    /// (time, offset, length, qemu-io command)
    pub writes: Vec<(usize, u64, u64, String)>,
}

impl History {
    /// Record the moment checkpoint `name` is taken.
    pub fn mark(&mut self, name: &str) {
        self.clock += 1;
        self.marks.insert(name.to_string(), self.clock);
    }

    /// Run qemu-io commands (`write ... OFF LEN`, `discard OFF LEN`) on `image` in `dir`,
    /// logging each.
    pub fn io(&mut self, dir: &Path, image: &str, cmds: &[&str]) {
        common::qemu_io(dir, image, cmds);
        for c in cmds {
            let t: Vec<&str> = c.split_whitespace().collect();
            let off = parse_size(t[t.len() - 2]);
            let len = parse_size(t[t.len() - 1]);
            self.clock += 1;
            self.writes.push((self.clock, off, len, c.to_string()));
        }
    }

    /// Writes made after checkpoint `name`.
    pub fn since(&self, name: &str) -> Vec<(u64, u64, String)> {
        let t = *self
            .marks
            .get(name)
            .unwrap_or_else(|| panic!("no mark {name}"));
        self.writes
            .iter()
            .filter(|w| w.0 > t)
            .map(|w| (w.1, w.2, w.3.clone()))
            .collect()
    }

    /// The granularity blocks those writes touch, as merged byte ranges clipped to `size`.
    pub fn since_blocks(&self, name: &str, gran: u64, size: u64) -> Vec<(u64, u64)> {
        let r: Vec<(u64, u64)> = self.since(name).iter().map(|w| (w.0, w.0 + w.1)).collect();
        round_to_blocks(&r, gran, size)
    }
}

/// Sorted, merged `[start, end)` ranges.
pub fn merge(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.retain(|x| x.1 > x.0);
    r.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Widen ranges to whole `gran` blocks, clip to `size`, merge.
pub fn round_to_blocks(r: &[(u64, u64)], gran: u64, size: u64) -> Vec<(u64, u64)> {
    merge(
        r.iter()
            .map(|&(s, e)| ((s / gran) * gran, e.div_ceil(gran) * gran))
            .map(|(s, e)| (s.min(size), e.min(size)))
            .collect(),
    )
}

/// Bytes of whole `gran` blocks touched by `r` (QEMU's dirty count; virsh --size).
pub fn block_bytes(r: &[(u64, u64)], gran: u64) -> u64 {
    r.iter()
        .map(|&(s, e)| (e.div_ceil(gran) - s / gran) * gran)
        .sum()
}

pub fn total(r: &[(u64, u64)]) -> u64 {
    r.iter().map(|x| x.1 - x.0).sum()
}

/// Intersection of two sorted, merged range lists.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `a` minus `b` (both sorted, merged).
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut cur = s;
        for &(bs, be) in b {
            if be <= cur || bs >= e {
                continue;
            }
            if bs > cur {
                out.push((cur, bs));
            }
            cur = cur.max(be);
        }
        if cur < e {
            out.push((cur, e));
        }
    }
    out
}

/// Ranges the chain under `top` reads as zeros by metadata (`qemu-img map`: data false).
pub fn zero_by_metadata(top: &Path) -> Vec<(u64, u64)> {
    merge(
        common::qemu_map(top)
            .iter()
            .filter(|e| !e.data)
            .map(|e| (e.start, e.start + e.length))
            .collect(),
    )
}

/// `truth` with everything outside `keep` zeroed.
pub fn masked(truth: &[u8], keep: &[(u64, u64)]) -> Vec<u8> {
    let mut out = vec![0u8; truth.len()];
    for &(s, e) in keep {
        out[s as usize..e as usize].copy_from_slice(&truth[s as usize..e as usize]);
    }
    out
}

/// Decode bitmap.bin: bit j (LSB first) of byte i is block 8i+j. Returns merged byte ranges
/// clipped to `size`, and asserts the length and that no bit past the end is set.
pub fn decode_bitmap(bits: &[u8], gran: u64, size: u64, what: &str) -> Vec<(u64, u64)> {
    let nblocks = size.div_ceil(gran);
    assert_eq!(
        bits.len() as u64,
        nblocks.div_ceil(8),
        "{what}: bitmap.bin length for {nblocks} blocks"
    );
    let mut r = Vec::new();
    for (i, &byte) in bits.iter().enumerate() {
        for j in 0..8 {
            if byte >> j & 1 == 1 {
                let k = 8 * i as u64 + j;
                assert!(
                    k < nblocks,
                    "{what}: bit {k} set past the last block {nblocks}"
                );
                r.push((k * gran, ((k + 1) * gran).min(size)));
            }
        }
    }
    merge(r)
}

/// One parsed `extents` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub off: u64,
    pub len: u64,
    pub zero: bool,
}

pub fn parse_extents(text: &str, what: &str) -> Vec<Extent> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let bad = || panic!("{what}: bad extents line {l:?}");
            if f.len() < 2 || f.len() > 3 || (f.len() == 3 && f[2] != "zero") {
                bad();
            }
            Extent {
                off: f[0].parse().unwrap_or_else(|_| bad()),
                len: f[1].parse().unwrap_or_else(|_| bad()),
                zero: f.len() == 3,
            }
        })
        .collect()
}

/// The extents file ckptfs should write for `changed` (block ranges) given the ranges that
/// read as zeros by metadata: split by zero-ness, merged within a kind.
pub fn expected_extents(changed: &[(u64, u64)], zero: &[(u64, u64)]) -> Vec<Extent> {
    let z = intersect(changed, zero);
    let d = subtract(changed, zero);
    let mut all: Vec<Extent> = z
        .iter()
        .map(|&(s, e)| Extent {
            off: s,
            len: e - s,
            zero: true,
        })
        .chain(d.iter().map(|&(s, e)| Extent {
            off: s,
            len: e - s,
            zero: false,
        }))
        .collect();
    all.sort_by_key(|x| x.off);
    all
}

/// One checkpoint's entry in checkpoints.json.
pub fn ckpt_entry<'a>(cj: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    cj["checkpoints"]
        .as_array()
        .expect("checkpoints array")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no checkpoint {name} in {cj}"))
}

pub fn ckpt_names(cj: &serde_json::Value) -> Vec<String> {
    cj["checkpoints"]
        .as_array()
        .expect("checkpoints array")
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// Every view of one valid checkpoint directory against the expectation:
/// - changed.img's SEEK_DATA map equals `expect` (every logged write covered, extras only
///   within the same granularity block; `writes` name the writes for failure messages),
/// - changed.img reads `truth` inside, zeros outside; st_blocks*512 = changed bytes,
/// - bitmap.bin decodes to the same blocks,
/// - extents equals `expect` split by `zero` (ranges reading zeros by metadata),
/// - info.json: valid, granularity, changed_bytes.
pub fn check_checkpoint(
    mnt: &Mount,
    dir_name: &str,
    gran: u64,
    expect: &[(u64, u64)],
    writes: &[(u64, u64, String)],
    truth: &[u8],
    zero: &[(u64, u64)],
) {
    let size = truth.len() as u64;
    let what = format!("checkpoint {dir_name}");
    let changed = mnt.path(&format!("{dir_name}/changed.img"));
    let meta = metadata(&changed);
    assert_eq!(meta.len(), size, "{what}: changed.img size");
    let map = seek_map(&changed);
    for (off, len, cmd) in writes {
        let (s, e) = (*off, (*off + *len).min(size));
        let covered = intersect(&map, &[(s, e)]);
        assert_eq!(
            total(&covered),
            e - s,
            "{what}: write `{cmd}` ([{s}, {e})) not covered by changed.img's SEEK_DATA map \
             {map:?}"
        );
    }
    let extra = subtract(&map, expect);
    assert!(
        extra.is_empty(),
        "{what}: SEEK_DATA reports data outside the written {gran}-byte blocks: {extra:?} \
         (map {map:?}, expected {expect:?})"
    );
    assert_eq!(map, expect, "{what}: SEEK_DATA/SEEK_HOLE map");
    let bytes = total(expect);
    assert!(bytes <= size);
    let data = read(&changed);
    common::assert_same(
        &data,
        &masked(truth, expect),
        0,
        &format!("{what}: changed.img"),
    );
    let bits = read(&mnt.path(&format!("{dir_name}/bitmap.bin")));
    assert_eq!(
        decode_bitmap(&bits, gran, size, &what),
        expect,
        "{what}: bitmap.bin blocks"
    );
    let ext_text = read_text(&mnt.path(&format!("{dir_name}/extents")));
    let ext = parse_extents(&ext_text, &what);
    for w in ext.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(
            a.off + a.len <= b.off,
            "{what}: extents not sorted/overlapping: {a:?} {b:?}"
        );
        assert!(
            !(a.off + a.len == b.off && a.zero == b.zero),
            "{what}: adjacent extents of the same kind not merged: {a:?} {b:?}\n{ext_text}"
        );
    }
    assert_eq!(
        ext,
        expected_extents(expect, zero),
        "{what}: extents\n{ext_text}"
    );
    let info = read_json(&mnt.path(&format!("{dir_name}/info.json")));
    assert_eq!(info["valid"], true, "{what}: info.json {info}");
    // st_blocks counts the changed bytes SEEK_DATA reports (clipped to the size), so that
    // `cp --sparse` sizes come out right.
    assert_eq!(
        meta.blocks() * 512,
        bytes,
        "{what}: st_blocks*512 of changed.img should equal the bytes SEEK_DATA reports \
         (changed blocks clipped to the virtual size {size})"
    );
    assert_eq!(info["granularity"], gran, "{what}: info.json {info}");
    // QEMU's (and so virsh's) count is whole granularity blocks, even for a partial last one.
    assert_eq!(
        info["changed_bytes"],
        block_bytes(expect, gran),
        "{what}: info.json {info}"
    );
}

/// QEMU's own merged bitmap: a scratch overlay on `top` (in a new subdirectory of `dir`), an
/// empty disabled bitmap `since`, `qemu-img bitmap --merge` of every `(layer, bitmap)` source,
/// then `qemu-nbd -B since` + `nbdinfo --map`. Equal virtual sizes only.
pub fn qemu_since(dir: &Path, tag: &str, top: &Path, sources: &[(&Path, &str)]) -> Vec<(u64, u64)> {
    let gt = dir.join(format!("gt-{tag}"));
    std::fs::create_dir(&gt).unwrap();
    let top_s = top.to_str().unwrap();
    common::create(&gt, "gt.qcow2", "", "", Some((top_s, "qcow2")));
    common::qemu_img(&gt, &["bitmap", "--add", "--disable", "gt.qcow2", "since"]);
    for (layer, bm) in sources {
        common::qemu_img(
            &gt,
            &[
                "bitmap",
                "--merge",
                bm,
                "-b",
                layer.to_str().unwrap(),
                "-F",
                "qcow2",
                "gt.qcow2",
                "since",
            ],
        );
    }
    common::qemu_dirty_ranges(&gt, "gt.qcow2", "since")
}

/// An empty directory to mount on, inside `parent`.
pub fn mount_dir(parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    std::fs::create_dir(&d).unwrap();
    d.canonicalize().unwrap()
}

/// Byte-exact copy of a file's contents plus its mtime.
pub fn snapshot_file(p: &Path) -> (Vec<u8>, std::time::SystemTime) {
    let m = std::fs::metadata(p).unwrap();
    (std::fs::read(p).unwrap(), m.modified().unwrap())
}

/// A path as &str (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `qemu-img check IMAGE`: (exit code, output).
pub fn check(image: &Path) -> (Option<i32>, String) {
    let r = run_files(None, "qemu-img", &[OsStr::new("check"), image.as_os_str()]);
    (r.code, format!("{}{}", r.stdout, r.stderr))
}

/// `qemu-img check IMAGE` reports nothing at all.
pub fn assert_check_clean(image: &Path, what: &str) {
    let (code, out) = check(image);
    assert_eq!(
        code,
        Some(0),
        "{what}: qemu-img check {} should be clean:\n{out}",
        image.display()
    );
}

/// ckptfs has let go of `image`: QEMU may write it (no lock is left) and it still checks clean.
pub fn assert_released(image: &Path, what: &str) {
    let dir = image.parent().expect("image in a directory");
    common::qemu_io(dir, s(image), &["write -P 0x12 0 4k"]);
    assert_check_clean(image, what);
}

/// `qemu-img compare A B` (formats probed): must say identical.
pub fn assert_identical(a: &Path, b: &Path, what: &str) {
    let r = run_files(
        None,
        "qemu-img",
        &[OsStr::new("compare"), a.as_os_str(), b.as_os_str()],
    );
    assert_eq!(
        r.code,
        Some(0),
        "{what}: qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        r.stdout,
        r.stderr
    );
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub flags: Vec<String>,
    pub granularity: u64,
}

/// Bitmaps of `image` as `qemu-img info [-U] --output=json` lists them.
pub fn qemu_bitmaps(image: &Path, force_share: bool) -> Vec<BitmapInfo> {
    let mut args = vec![OsStr::new("info")];
    if force_share {
        args.push(OsStr::new("-U"));
    }
    args.extend([OsStr::new("--output=json"), image.as_os_str()]);
    let out = common::run("qemu-img", &args);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("qemu-img info json");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| BitmapInfo {
                    name: b["name"].as_str().unwrap().to_string(),
                    flags: b["flags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect(),
                    granularity: b["granularity"].as_u64().unwrap(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// (name, flags) of each bitmap of `image`; -U: also while ckptfs holds its write locks.
pub fn bitmap_flags(image: &Path) -> Vec<(String, Vec<String>)> {
    qemu_bitmaps(image, true)
        .into_iter()
        .map(|b| (b.name, b.flags))
        .collect()
}

/// Every bitmap of `image` stored after a clean stop: there is one at least and none is
/// flagged in-use (read with -U, so also while something still holds the image's locks).
pub fn assert_bitmaps_stored(image: &Path, what: &str) {
    let list = bitmap_flags(image);
    assert!(
        !list.is_empty(),
        "{what}: {} has no bitmaps",
        image.display()
    );
    for (name, flags) in &list {
        assert!(
            !flags.iter().any(|f| f == "in-use"),
            "{what}: bitmap {name} of {} still in use after a clean stop: {list:?}",
            image.display()
        );
    }
}

/// qemu-storage-daemon exporting `image` writable over NBD on DIR/TAG.sock: its guard and
/// how its start went.
pub fn start_writer(d: &Path, image: &Path, tag: &str) -> (PidFileDaemon, Ran) {
    let pid_file = d.join(format!("{tag}.pid"));
    let sock = d.join(format!("{tag}.sock"));
    let blockdev = format!(
        "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
        s(image)
    );
    let server = format!("addr.type=unix,addr.path={}", s(&sock));
    let r = run_files(
        Some(d),
        "qemu-storage-daemon",
        &[
            "--daemonize",
            "--pidfile",
            s(&pid_file),
            "--blockdev",
            &blockdev,
            "--nbd-server",
            &server,
            "--export",
            "type=nbd,id=e,node-name=q,writable=on",
        ],
    );
    (PidFileDaemon { pid_file }, r)
}

/// `cp --sparse=always SRC DST` (timed like every command here).
pub fn try_cp_sparse(src: &Path, dst: &Path) -> Ran {
    run_files(
        None,
        "cp",
        &[
            OsStr::new("--sparse=always"),
            src.as_os_str(),
            dst.as_os_str(),
        ],
    )
}

/// `cp --sparse=always SRC DST`, which must succeed.
pub fn cp_sparse(src: &Path, dst: &Path) {
    let r = try_cp_sparse(src, dst);
    assert!(r.ok, "cp --sparse=always {}: {}", src.display(), r.stderr);
}

/// Expect ckptfs to refuse: non-zero, one or two lines mentioning every needle, nothing
/// mounted, no daemon left.
pub fn expect_refusal(image: &Path, dir: &Path, opts: Option<&str>, needles: &[&str]) -> String {
    let r = match Mount::try_new(image, dir, opts) {
        Ok(m) => {
            drop(m);
            panic!(
                "ckptfs -o {opts:?} {} should have been refused",
                image.display()
            );
        }
        Err(r) => r,
    };
    let msg = r.stderr.trim().to_string();
    assert_ne!(r.code, Some(0), "{r:?}");
    let lines = msg.lines().count();
    assert!(
        (1..=2).contains(&lines),
        "-o {opts:?}: expected a one- or two-line message, got {lines}: {msg:?}"
    );
    for n in needles {
        assert!(
            msg.to_lowercase().contains(&n.to_lowercase()),
            "-o {opts:?}: the message should mention {n:?}: {msg:?}"
        );
    }
    assert!(
        !is_mounted(dir),
        "{} mounted after a refusal",
        dir.display()
    );
    assert!(
        reap_daemons(dir, Duration::from_secs(2)),
        "a ckptfs daemon was left behind for {}",
        dir.display()
    );
    msg
}

/// `image` holds exactly `model`: written as model.raw beside the image, then compared.
pub fn assert_image_equals_model(model: &[u8], image: &Path, what: &str) {
    let raw = image
        .parent()
        .expect("image in a directory")
        .join("model.raw");
    std::fs::write(&raw, model).unwrap_or_else(|e| panic!("write {}: {e}", raw.display()));
    assert_image_equals_raw(&raw, image, what);
}

/// `qemu-img compare -f raw -F qcow2 RAW IMAGE` must say identical.
pub fn assert_image_equals_raw(raw: &Path, image: &Path, what: &str) {
    assert_images_equal((raw, "raw"), (image, "qcow2"), what);
}

/// `qemu-img compare -f FMT_A -F FMT_B A B` must say identical.
pub fn assert_images_equal((a, fa): (&Path, &str), (b, fb): (&Path, &str), what: &str) {
    let r = run_files(
        None,
        "qemu-img",
        &[
            OsStr::new("compare"),
            OsStr::new("-f"),
            OsStr::new(fa),
            OsStr::new("-F"),
            OsStr::new(fb),
            a.as_os_str(),
            b.as_os_str(),
        ],
    );
    assert_eq!(
        r.code,
        Some(0),
        "{what}: qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        r.stdout,
        r.stderr
    );
}

// ---------------------------------------------------------------------------------------
// Other users (permissions)

/// uid and gid of `nobody` (or a `ckptfs-test` user, created when `nobody` is missing).
pub fn other_user() -> (u32, u32) {
    let find = |name: &str| -> Option<(u32, u32)> {
        let pw = std::fs::read_to_string("/etc/passwd").ok()?;
        pw.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[0] == name {
                Some((f[2].parse().ok()?, f[3].parse().ok()?))
            } else {
                None
            }
        })
    };
    if let Some(ids) = find("nobody") {
        return ids;
    }
    if find("ckptfs-test").is_none() {
        common::run("useradd", &["-M", "ckptfs-test"]);
    }
    find("ckptfs-test").expect("ckptfs-test user")
}

/// Run `cmd args` as the other user (setpriv, no supplementary groups; under `timeout`).
pub fn as_other(ids: (u32, u32), cmd: &str, args: &[&OsStr]) -> Output {
    let uid = format!("--reuid={}", ids.0);
    let gid = format!("--regid={}", ids.1);
    let mut a: Vec<&OsStr> = vec![
        OsStr::new(&uid),
        OsStr::new(&gid),
        OsStr::new("--clear-groups"),
        OsStr::new(cmd),
    ];
    a.extend_from_slice(args);
    common::run_status_in(None, "setpriv", &a)
}

pub fn denied(o: &Output) -> bool {
    !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Permission denied")
}

pub fn assert_denied(ids: (u32, u32), cmd: &str, args: &[&OsStr], what: &str) {
    let o = as_other(ids, cmd, args);
    assert!(
        denied(&o),
        "{what}: `{cmd} {args:?}` as uid {} should fail with EACCES; status {}, stdout {} bytes \
         ({:?}...), stderr: {}",
        ids.0,
        o.status,
        o.stdout.len(),
        String::from_utf8_lossy(&o.stdout[..o.stdout.len().min(200)]),
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn other_reads(ids: (u32, u32), p: &Path, what: &str) -> Vec<u8> {
    let o = as_other(ids, "cat", &[p.as_os_str()]);
    assert!(
        o.status.success(),
        "{what}: uid {} should read {}: {}",
        ids.0,
        p.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// MiB chunk `i` of a pseudo-random disk seeded with `seed`.
pub fn chunk_data(seed: u64, i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 1 << 20];
    common::Prng(seed ^ i.wrapping_mul(0x9e37_79b9)).fill(&mut b);
    b
}

/// A thread writing MiB chunks `chunk_data(seed, i)` at `i` MiB into a file, in order.
pub struct ChunkWriter {
    /// Bytes written so far.
    pub written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Bytes written before the last fsync that returned.
    pub synced: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// "finished", or what failed.
    pub thread: std::thread::JoinHandle<String>,
}

/// Start writing `chunks` chunks into `disk` (opened for writing), fsyncing after chunk `i`
/// where `sync_after(i)`.
pub fn spawn_chunk_writer(
    disk: PathBuf,
    seed: u64,
    chunks: u64,
    sync_after: fn(u64) -> bool,
) -> ChunkWriter {
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::{atomic::AtomicU64, Arc};
    let (written, synced) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (w, s) = (Arc::clone(&written), Arc::clone(&synced));
    let thread = std::thread::spawn(move || -> String {
        let f = match std::fs::OpenOptions::new().write(true).open(&disk) {
            Ok(f) => f,
            Err(e) => return format!("open: {e}"),
        };
        for i in 0..chunks {
            if let Err(e) = f.write_all_at(&chunk_data(seed, i), i << 20) {
                return format!("write of chunk {i}: {e}");
            }
            w.store((i + 1) << 20, SeqCst);
            if sync_after(i) {
                if let Err(e) = f.sync_all() {
                    return format!("fsync after chunk {i}: {e}");
                }
                s.store((i + 1) << 20, SeqCst);
            }
        }
        "finished".into()
    });
    ChunkWriter {
        written,
        synced,
        thread,
    }
}

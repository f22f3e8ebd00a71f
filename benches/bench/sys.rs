//! Processes, mounts and commands: every daemon, mount and directory the benchmark creates is
//! registered and released by a guard (also on error, panic or signal).

use super::*;

pub enum Resource {
    /// A child process (its own process group) and the mount it serves, if any.
    Proc { pid: i32, mount: Option<PathBuf> },
    /// A directory to remove (after unmounting anything left under it).
    Dir(PathBuf),
}

pub static REGISTRY: Mutex<Vec<(u64, Resource)>> = Mutex::new(Vec::new());
pub static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Guard(u64);

impl Guard {
    pub fn new(r: Resource) -> Guard {
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

pub fn release_all() {
    loop {
        let r = REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match r {
            Some((_, r)) => release(r),
            None => break,
        }
    }
}

pub fn release(r: Resource) {
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
pub fn wait_exit(pid: i32, t: Duration) -> bool {
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

pub fn stop_process(pid: i32, mount: Option<&Path>) {
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

pub fn lazy_unmount(m: &Path) {
    let _ = run_status(
        "umount",
        &["-l", &m.to_string_lossy()],
        Duration::from_secs(10),
    );
}

/// Mount points listed in /proc/self/mountinfo (octal escapes decoded).
pub fn mount_points() -> Vec<PathBuf> {
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
pub fn wait_mounted(
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

pub fn is_mounted(p: &Path) -> bool {
    mount_points().iter().any(|m| m == p)
}

pub fn mounts_under(d: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(d))
        .collect();
    v.reverse();
    v
}

pub fn install_signal_thread() {
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
pub fn command(prog: &str, args: &[&str]) -> Command {
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

pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Run a command to completion under `timeout` (its process group is killed on expiry).
pub fn run_cmd(mut c: Command, what: &str, timeout: Duration) -> Res<Output> {
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
pub fn run(prog: &str, args: &[&str], timeout: Duration) -> Res<String> {
    let what = format!("{prog} {}", args.join(" "));
    let what_short: String = what.chars().take(200).collect();
    let o = run_cmd(command(prog, args), &what_short, timeout)?;
    if !o.ok {
        return Err(format!("{what_short}: failed: {}", o.stderr.trim()).into());
    }
    Ok(o.stdout)
}

pub fn run_status(prog: &str, args: &[&str], timeout: Duration) -> Res<bool> {
    Ok(run_cmd(command(prog, args), prog, timeout)?.ok)
}

/// Time `prog args` (wall clock, process start to exit).
pub fn timed(prog: &str, args: &[&str], timeout: Duration) -> Res<f64> {
    let t = Instant::now();
    run(prog, args, timeout)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Run `f` on a helper thread, giving up after `t` (a hung FUSE call must not hang the bench;
/// the guards then stop the daemon, which fails the stuck call).
pub fn with_timeout<T: Send + 'static>(
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

pub fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

pub const T_SHORT: Duration = Duration::from_secs(60);
pub const T_LONG: Duration = Duration::from_secs(1800);

pub fn drop_caches() -> Res<()> {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| format!("drop_caches (needs root): {e}"))?;
    Ok(())
}

/// Read files once so the host page cache holds them.
pub fn warm(files: &[PathBuf]) -> Res<()> {
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

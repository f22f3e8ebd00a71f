//! Stopping the daemon by signal while the mount is busy, through the real binary.
//!
//! Holders are `sh` children of the test with their cwd (and an open file) inside the mount,
//! driven line by line over pipes. The contract (README, Use): the first SIGTERM/SIGINT/SIGHUP
//! unmounts, or detaches when busy; holders keep working; the daemon exits 0 once the last one
//! leaves, bitmaps stored under -o rw. A second signal stops at once: bitmaps stored, exit 0,
//! holders get ENOTCONN. A signal that arrives while ckptfs is starting is never lost half way.
//! The mount's type is `fuse.ckptfs`.
//!
//! Harness rules (see `mountutil`): every mount is owned by a guard, every wait is bounded,
//! only processes these tests started are signalled, by PID.

use crate::common::{self, tempdir};
use crate::mountutil::*;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const M: usize = 1 << 20;

/// A base of 0x41 and a top with bitmap c1 and some data of its own.
fn fixture() -> (tempfile::TempDir, PathBuf) {
    let t = tempdir();
    let top = common::c1_chain(
        t.path(),
        ["base.qcow2", "top.qcow2"],
        "8M",
        &["write -P 0x41 0 8M"],
        &["write -P 0x42 1M 64k"],
    );
    (t, top)
}

/// A `sh` child running `script` with `args` ($1...), stdin/stdout piped.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Holder {
    fn start(what: &str, script: &str, args: &[&OsStr]) -> Holder {
        let mut sh = Command::new("sh");
        sh.arg("-c").arg(script).arg("sh").args(args);
        Holder::spawn(what, sh)
    }

    fn spawn(what: &str, mut cmd: Command) -> Holder {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sh");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Holder {
            stdin: child.stdin.take(),
            child,
            lines,
            what: what.to_string(),
        }
    }

    /// The next line the script prints (within the access timeout).
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(ACCESS_TIMEOUT) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{}: no answer within {ACCESS_TIMEOUT:?}", self.what)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = self.child.wait();
                panic!("{}: ended without answering ({st:?})", self.what)
            }
        }
    }

    fn expect(&mut self, want: &str) {
        let got = self.line();
        assert_eq!(got, want, "{}", self.what);
    }

    /// Send one command line.
    fn say(&mut self, cmd: &str) {
        let w = self.stdin.as_mut().expect("stdin open");
        writeln!(w, "{cmd}").unwrap_or_else(|e| panic!("{}: write: {e}", self.what));
    }

    /// A `file_holder`'s `read OUT`: it succeeds and OUT holds `want`.
    fn assert_reads(&mut self, out: &Path, want: &[u8], what: &str) {
        self.say(&format!("read {}", s(out)));
        self.expect("read 0 ");
        common::assert_same(&std::fs::read(out).unwrap(), want, 0, what);
    }

    /// Close its stdin (its last `read` ends the script) and wait for it to exit.
    fn finish(mut self) -> ExitStatus {
        self.stdin = None;
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < ACCESS_TIMEOUT,
                "{}: did not exit",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // A failed test must not leave the mount busy: kill our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Holds `dir` as its cwd and `file` (in it) open on fd 3 (read-write with `rw`). Commands:
/// `read OUT` copies fd 3 from its current offset to OUT and says `read STATUS ERRNO-TEXT`;
/// `write OFF TEXT` writes TEXT at OFF into `file` opened anew by its relative name.
fn file_holder(what: &str, dir: &Path, file: &str, rw: bool) -> Holder {
    let script = r#"
        cd "$1" || exit 10
        if [ "$3" = rw ]; then exec 3<>"$2" || exit 11; else exec 3<"$2" || exit 11; fi
        echo ready
        while read cmd a b; do
            case "$cmd" in
            read) cat <&3 >"$a" 2>"$a.err"; s=$?; echo "read $s $(cat "$a.err")" ;;
            write) printf %s "$b" | dd of="$2" bs=64k seek="$a" oflag=seek_bytes conv=notrunc status=none; echo "write $?" ;;
            esac
        done
    "#;
    let mode = if rw { "rw" } else { "ro" };
    let mut h = Holder::start(
        what,
        script,
        &[dir.as_os_str(), OsStr::new(file), OsStr::new(mode)],
    );
    h.expect("ready");
    h
}

/// Holds `dir` as its cwd only.
fn cwd_holder(what: &str, dir: &Path) -> Holder {
    let mut h = Holder::start(
        what,
        r#"cd "$1" || exit 10; echo ready; while read x; do :; done"#,
        &[dir.as_os_str()],
    );
    h.expect("ready");
    h
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) of a ckptfs process this test started (its child, or the daemon naming
    // this test's unique mount point).
    unsafe { libc::kill(pid, sig) };
}

fn wait_unmounted(dir: &Path, what: &str) {
    let start = Instant::now();
    while is_mounted(dir) {
        assert!(
            start.elapsed() < ACCESS_TIMEOUT,
            "{what}: {} still in /proc/mounts",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_running(pid: i32, what: &str) {
    assert!(
        !wait_pid_gone(pid, Duration::from_millis(300)),
        "{what}: the daemon exited while the mount is still in use"
    );
}

/// SIGTERM to the daemon `pid` of the busy mount on `dir`, held by two holders: it detaches
/// and keeps serving.
fn sigterm_detaches(pid: i32, dir: &Path) {
    signal(pid, libc::SIGTERM);
    wait_unmounted(dir, "SIGTERM");
    assert_running(pid, "after SIGTERM, two holders");
}

/// Holder `a` leaves, the daemon `pid` stays for `b` (`what`), then `b` leaves.
fn leave_in_turn(a: Holder, b: Holder, pid: i32, what: &str) {
    assert!(a.finish().success());
    assert_running(pid, what);
    assert!(b.finish().success());
}

/// `findmnt -n -o FSTYPE DIR`.
fn findmnt_type(dir: &Path) -> String {
    let out = common::run(
        "findmnt",
        &[
            OsStr::new("-n"),
            OsStr::new("-o"),
            OsStr::new("FSTYPE"),
            dir.as_os_str(),
        ],
    );
    String::from_utf8_lossy(&out).trim().to_string()
}

fn write_through(path: &Path, off: u64, data: Vec<u8>) {
    let p = path.to_path_buf();
    timed("write through the mount", move || {
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&data, off).unwrap();
    });
}

#[test]
fn sigterm_busy_ro_detaches_and_exits_after_the_last_user() {
    let (t, top) = fixture();
    let d = t.path();
    let truth = common::truth_raw(&top);
    let mut mnt = Mount::foreground(&top, &mount_dir(d, "mnt"), None, &d.join("log"));
    assert_eq!(findmnt_type(&mnt.dir), "fuse.ckptfs", "findmnt FSTYPE");
    assert_eq!(mount_type(&mnt.dir).as_deref(), Some("fuse.ckptfs"));
    let pid = mnt.child_pid().unwrap();
    let mut a = file_holder("holder A", &mnt.path("current"), "disk.img", false);
    let b = cwd_holder("holder B", &mnt.path("c1"));

    sigterm_detaches(pid, &mnt.dir);
    a.assert_reads(
        &d.join("a.out"),
        &truth,
        "holder A's open file after the detach",
    );
    leave_in_turn(a, b, pid, "holder B still in c1/");
    mnt.wait_child_ok("ckptfs -f after the last user left");
    drop(mnt);
    // The locks are gone: QEMU may write.
    assert_released(&top, "ro after SIGTERM");
}

#[test]
fn sigterm_busy_rw_daemon_serves_holders_and_stores_bitmaps() {
    let (t, top) = fixture();
    let d = t.path();
    let mut model = common::truth_raw(&top);
    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), Some("rw"));
    assert_eq!(findmnt_type(&mnt.dir), "fuse.ckptfs", "findmnt FSTYPE");
    let pids = ckptfs_pids_for(&mnt.dir);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    let pid = pids[0];

    // Written and closed before the signal.
    let before = vec![0x5a; 70_000];
    write_through(
        &mnt.path("current/disk.img"),
        2 * M as u64 - 5,
        before.clone(),
    );
    model[2 * M - 5..2 * M - 5 + before.len()].copy_from_slice(&before);
    let mut a = file_holder("holder A", &mnt.path("current"), "disk.img", true);
    let b = cwd_holder("holder B", &mnt.dir);

    sigterm_detaches(pid, &mnt.dir);
    // A write after the detach, by a name relative to the cwd inside the mount.
    let text = "written-after-the-detach";
    let off = 5 * M + 3;
    a.say(&format!("write {off} {text}"));
    a.expect("write 0");
    model[off..off + text.len()].copy_from_slice(text.as_bytes());
    a.assert_reads(
        &d.join("a.out"),
        &model,
        "holder A reads the disk after the detach",
    );
    leave_in_turn(a, b, pid, "holder B still in the root");
    assert!(
        wait_pid_gone(pid, ACCESS_TIMEOUT),
        "the daemon did not exit after the last user left"
    );
    drop(mnt);

    assert_bitmaps_stored(&top, "rw after SIGTERM");
    assert_check_clean(&top, "rw after SIGTERM");
    assert_image_equals_model(&model, &top, "rw after SIGTERM");
    // Both writes are in the stored bitmap.
    let dirty = common::qemu_dirty_ranges(d, "top.qcow2", "c1");
    for (s, e) in [
        (2 * M as u64 - 5, 2 * M as u64 - 5 + 70_000),
        (off as u64, (off + text.len()) as u64),
    ] {
        assert_eq!(
            total(&intersect(&dirty, &[(s, e)])),
            e - s,
            "c1 misses [{s}, {e}): {dirty:?}"
        );
    }
}

#[test]
fn second_signal_stops_at_once_with_bitmaps_stored() {
    let (t, top) = fixture();
    let d = t.path();
    let mut model = common::truth_raw(&top);
    let mut mnt = Mount::foreground(&top, &mount_dir(d, "mnt"), Some("rw"), &d.join("log"));
    let pid = mnt.child_pid().unwrap();
    let before = vec![0x6b; 4096];
    write_through(&mnt.path("current/disk.img"), 3 * M as u64, before.clone());
    model[3 * M..3 * M + before.len()].copy_from_slice(&before);
    let mut a = file_holder("holder A", &mnt.path("current"), "disk.img", false);

    signal(pid, libc::SIGHUP);
    wait_unmounted(&mnt.dir, "SIGHUP");
    assert_running(pid, "after SIGHUP, one holder");
    signal(pid, libc::SIGINT);
    mnt.wait_child_ok("ckptfs -f after a second signal");
    // The holder's file is dead now, not silently empty.
    let out = d.join("a.out");
    a.say(&format!("read {}", s(&out)));
    let got = a.line();
    assert!(
        got.starts_with("read ") && !got.starts_with("read 0") && got.contains("not connected"),
        "holder A after the forced stop: {got:?}"
    );
    assert!(a.finish().success());
    drop(mnt);
    assert_bitmaps_stored(&top, "after a second signal");
    assert_check_clean(&top, "after a second signal");
    assert_image_equals_model(&model, &top, "after a second signal");
}

/// Whether every ckptfs process serving `dir` ends within `limit` (none is killed).
fn daemons_gone(dir: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while !ckptfs_pids_for(dir).is_empty() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// One start of ckptfs with a SIGTERM `delay` after spawn; checks what it left.
fn signal_while_starting(d: &Path, top: &Path, n: usize, delay: Duration, foreground: bool) {
    let dir = mount_dir(d, &format!("mnt{n}"));
    // Unmounts and reaps whatever is left for this mount point, even if an assert fails.
    let _guard = Mount::adopt(&dir);
    let what = format!(
        "{} start {n}, SIGTERM after {delay:?}",
        if foreground { "-f" } else { "daemon" }
    );
    let mut c = Command::new(bin());
    if foreground {
        c.arg("-f");
    }
    let mut child = c
        .args(["-o", "rw"])
        .arg(top)
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ckptfs");
    std::thread::sleep(delay);
    signal(child.id() as i32, libc::SIGTERM);
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > ACCESS_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: ckptfs did not end");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Killed before it blocked the signal: nothing may have happened. Otherwise it exits 0
    // and, in the daemon case, either passed the signal on or had finished starting.
    match st.signal() {
        Some(sig) => assert_eq!(sig, libc::SIGTERM, "{what}: {st}"),
        None => assert!(st.success(), "{what}: {st}"),
    }
    // Signalled after it had finished starting: the daemon must be serving. (One still
    // running without a mount is ending; the last check waits for it.)
    if !foreground
        && st.success()
        && !daemons_gone(&dir, Duration::from_secs(2))
        && is_mounted(&dir)
    {
        assert!(
            exists(&dir.join("current/disk.img")),
            "{what}: the mount does not answer"
        );
        for pid in ckptfs_pids_for(&dir) {
            signal(pid, libc::SIGTERM);
        }
    }
    assert!(
        daemons_gone(&dir, ACCESS_TIMEOUT),
        "{what}: a daemon was left"
    );
    assert!(!is_mounted(&dir), "{what}: left mounted");
    assert_bitmaps_stored(top, &what);
}

#[test]
fn signal_while_starting_is_never_lost_half_way() {
    let (t, top) = fixture();
    let d = t.path();
    let mut n = 0;
    for foreground in [true, false] {
        for step in 0..24u64 {
            n += 1;
            signal_while_starting(d, &top, n, Duration::from_micros(step * 250), foreground);
        }
    }
    assert_check_clean(&top, "after the starts");
}

/// The daemon of a detached mount, ending when its last user leaves, must not unmount what
/// has been mounted on the same path since (fuser 0.18 unmounted the path again at the end).
#[test]
fn a_mount_made_on_the_path_after_a_detach_survives_the_daemon() {
    let (t, top) = fixture();
    let d = t.path();
    let mut mnt = Mount::foreground(&top, &mount_dir(d, "mnt"), None, &d.join("log"));
    let pid = mnt.child_pid().unwrap();
    let b = cwd_holder("holder", &mnt.path("current"));
    let r = run_files(None, "umount", &[OsStr::new("-l"), mnt.dir.as_os_str()]);
    assert!(r.ok, "umount -l: {r:?}");
    common::run(
        "mount",
        &[
            OsStr::new("-t"),
            OsStr::new("tmpfs"),
            OsStr::new("ckptfs-test"),
            mnt.dir.as_os_str(),
        ],
    );
    assert_eq!(findmnt_type(&mnt.dir), "tmpfs");
    assert_running(pid, "holder in the detached mount");
    assert!(b.finish().success());
    mnt.wait_child_ok("ckptfs -f after the last user left");
    let after = mount_type(&mnt.dir);
    // The guard unmounts the tmpfs too.
    drop(mnt);
    assert_eq!(
        after.as_deref(),
        Some("tmpfs"),
        "the daemon unmounted the tmpfs mounted since"
    );
}

/// The fs type of the mount on `dir` in the mount namespace of process `pid`, if any.
fn type_in_namespace_of(pid: i32, dir: &Path) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    info.lines().rev().find_map(|l| {
        let (head, tail) = l.split_once(" - ")?;
        (head.split(' ').nth(4) == Some(s(dir)))
            .then(|| tail.split(' ').next().unwrap_or("").to_string())
    })
}

/// Mounted by an ordinary user (through fusermount3) the type is fuse.ckptfs too, SIGTERM
/// detaches a busy mount through `fusermount3 -u -z` and a second signal stops the daemon.
/// Run in a private mount namespace whose /dev/fuse is open to all (as on most distributions;
/// the host's stays as it is; the node lives on a tmpfs of that namespace, as /tmp may be
/// nodev), as `nobody`.
#[test]
fn unprivileged_mount_type_and_signals() {
    let t = tempdir();
    let d = t.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let u = d.join("u");
    std::fs::create_dir(&u).unwrap();
    let top = common::c1_chain(
        &u,
        ["base.qcow2", "top.qcow2"],
        "8M",
        &["write -P 0x41 0 8M"],
        &[],
    );
    let mnt = mount_dir(&u, "mnt");
    common::run(
        "chown",
        &[OsStr::new("-R"), OsStr::new("nobody"), u.as_os_str()],
    );
    // Reaps the daemon (by PID) if an assert fails.
    let _guard = Mount::adopt(&mnt);
    let script = r#"
        mkdir "$1/dev" && mount -t tmpfs -o dev,mode=755 ckptfs-test "$1/dev" &&
            mknod -m 666 "$1/dev/fuse" c 10 229 && mount --bind "$1/dev/fuse" /dev/fuse || exit 20
        user="--reuid=$(id -u nobody) --regid=$(id -g nobody) --clear-groups"
        setpriv $user "$2" -o rw "$1/u/top.qcow2" "$1/u/mnt" || exit 21
        exec setpriv $user sh -c '
            cd "$1/u/mnt/current" && exec 3<disk.img || exit 22
            echo ready
            read x; cat <&3 >/dev/null 2>"$1/u/cat.err"; echo "read $? $(cat "$1/u/cat.err")"
            read x; exit 0' sh "$1"
    "#;
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(d)
        .arg(bin());
    let mut h = Holder::spawn("unprivileged holder", cmd);
    h.expect("ready");
    let pids = ckptfs_pids_for(&mnt);
    assert_eq!(pids.len(), 1, "one daemon: {pids:?}");
    let pid = pids[0];
    assert_eq!(
        type_in_namespace_of(pid, &mnt).as_deref(),
        Some("fuse.ckptfs"),
        "type of a mount made through fusermount3"
    );

    signal(pid, libc::SIGTERM);
    let start = Instant::now();
    while type_in_namespace_of(pid, &mnt).is_some() {
        assert!(start.elapsed() < ACCESS_TIMEOUT, "SIGTERM did not detach");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_running(pid, "after SIGTERM, one holder");
    signal(pid, libc::SIGTERM);
    assert!(
        wait_pid_gone(pid, ACCESS_TIMEOUT),
        "the daemon did not stop on a second signal"
    );
    h.say("read");
    let got = h.line();
    assert!(
        got.starts_with("read ") && !got.starts_with("read 0") && got.contains("not connected"),
        "the holder after the forced stop: {got:?}"
    );
    assert!(h.finish().success());
    assert_bitmaps_stored(&top, "unprivileged, after two signals");
    assert_check_clean(&top, "unprivileged, after two signals");
}

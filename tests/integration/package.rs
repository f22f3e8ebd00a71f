//! The Debian package (`cargo deb`, metadata in Cargo.toml): its contents and Depends, then
//! installed on this machine: the installed ckptfs mounts a QEMU-made chain through mount(8),
//! `man -w ckptfs`, the bash completion, the backup scripts from PATH (a full backup and its
//! verify), `ckptfs --version`, and `dpkg -r` removing every file it installed.
//!
//! It installs and removes the package `ckptfs` machine-wide, so:
//! - it holds an exclusive lock file for the whole run (another run of it waits), and refuses
//!   to start if a ckptfs package is already installed (not this test's to remove);
//! - the package is built (`cargo deb --no-build`) from the binary under test, so any other
//!   test that happens to find /usr/bin/ckptfs while it is installed runs the same code;
//! - mount.rs links the test binary as /usr/local/bin/ckptfs, ahead of /usr/bin in PATH: the
//!   scripts and `ckptfs --version` run with PATH=/usr/sbin:/usr/bin:/sbin:/bin, and mount(8)
//!   (which resets PATH to /usr/local/sbin:/usr/local/bin:...) runs in a private mount
//!   namespace where /usr/local is empty (NsMount); nothing is hidden from other tests.
//!
//! Without cargo-deb (or in a debug build) it prints a SKIP line, except under CI=true, where
//! that is a failure. apt-get installs the .deb (so Depends must resolve) and removes it (it
//! runs `dpkg -r`), both waiting for the dpkg lock other apt users may hold.

use crate::common::{self, assert_same, create, qemu_img, qemu_io, truth_raw};
use crate::mountutil::{
    bin, ckpt_names, ckptfs_pids_for, mount_dir, mount_points, read, read_json, reap_daemons,
    run_files, s, Mount, Ran, ACCESS_TIMEOUT,
};
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// PATH for the installed tool run directly: no /usr/local.
const SYSTEM_PATH: &str = "PATH=/usr/sbin:/usr/bin:/sbin:/bin";
/// Seconds `cargo deb` and apt-get may take (strip, objcopy and xz of a 30 MB binary on a
/// loaded machine; apt waiting for the dpkg lock).
const SLOW_SECS: &str = "300";

/// The files (not directories) the package must hold, symlinks as "path -> target".
const CONTENTS: &[&str] = &[
    "/usr/bin/ckptfs",
    "/usr/bin/ckptfs-backup",
    "/usr/bin/ckptfs-restore",
    "/usr/share/man/man1/ckptfs.1.gz",
    "/usr/share/bash-completion/completions/ckptfs",
    "/usr/share/bash-completion/completions/ckptfs-backup -> ckptfs",
    "/usr/share/bash-completion/completions/ckptfs-restore -> ckptfs",
    "/usr/share/doc/ckptfs/examples/mnt-vm.mount",
    "/usr/share/doc/ckptfs/examples/fstab.example",
    "/usr/share/doc/ckptfs/README.md",
    "/usr/share/doc/ckptfs/copyright",
    "/usr/share/doc/ckptfs/changelog.Debian.gz",
];

/// Depends entries that must be there besides the shared-library ones ($auto).
const DEPENDS: &[&str] = &["fuse3", "qemu-utils", "mount", "mawk | awk", "jq"];

/// `cmd args` under `timeout -k 5 SECS` and `env ENV` (`-u NAME` first, then `NAME=value`).
fn run_env(secs: &str, env: &[&str], cmd: &str, args: &[&OsStr]) -> Ran {
    let out = Command::new("timeout")
        .args(["-k", "5", secs, "env"])
        .args(env)
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    Ran {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ok_env(secs: &str, env: &[&str], cmd: &str, args: &[&OsStr]) -> String {
    let r = run_env(secs, env, cmd, args);
    assert!(r.ok, "{cmd} {args:?}: {r:?}");
    r.stdout
}

fn os<'a>(a: &[&'a str]) -> Vec<&'a OsStr> {
    a.iter().map(|a| OsStr::new(*a)).collect()
}

/// A missing prerequisite: a failure under CI=true, else a visible skip (returns false).
fn prerequisite(ok: bool, what: &str) -> bool {
    if !ok {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "package::deb_package_installs_and_removes: {what} (CI=true)"
        );
        eprintln!("SKIP package::deb_package_installs_and_removes: {what}");
    }
    ok
}

/// An exclusive flock(2) on a machine-wide file, held until dropped.
struct MachineLock {
    _file: File,
}

impl MachineLock {
    fn take() -> MachineLock {
        let dir = if Path::new("/run/lock").is_dir() {
            "/run/lock"
        } else {
            "/tmp"
        };
        let path = Path::new(dir).join("ckptfs-package-test.lock");
        let f = File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let start = Instant::now();
        // SAFETY: flock(2) on a file descriptor this function owns.
        while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "{} held by another run for 10 minutes",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        MachineLock { _file: f }
    }
}

/// dpkg's status of the package `ckptfs` ("" if dpkg never knew it).
fn dpkg_status() -> String {
    run_env(
        "60",
        &[],
        "dpkg-query",
        &os(&["-W", "-f=${Status}", "ckptfs"]),
    )
    .stdout
}

fn installed() -> bool {
    dpkg_status().ends_with(" installed")
}

/// apt-get with the dpkg lock wait and no questions.
fn apt_get(args: &[&OsStr]) -> Ran {
    let mut a = os(&["-y", "-q", "-o", "DPkg::Lock::Timeout=240"]);
    a.extend_from_slice(args);
    run_env(
        SLOW_SECS,
        &["DEBIAN_FRONTEND=noninteractive"],
        "apt-get",
        &a,
    )
}

/// Removes the package when dropped if it is still installed (a failed assertion).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let _ = apt_get(&os(&["remove", "ckptfs"]));
        }
    }
}

/// Unmounts whatever the scripts left mounted under `dir` (a script killed by its timeout
/// cannot run its trap), waiting for the daemons, when dropped.
struct MountsUnder(PathBuf);

impl Drop for MountsUnder {
    fn drop(&mut self) {
        let prefix = self.0.to_string_lossy().into_owned();
        for m in mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&prefix))
        {
            drop(Mount::adopt(Path::new(&m)));
        }
    }
}

/// A mount by mount(8) (`mount -t fuse.ckptfs`) in a private mount namespace (unshare -m)
/// where /usr/local is an empty tmpfs: mount(8) runs mount.fuse3 with PATH reset to
/// /usr/local/sbin:/usr/local/bin:/usr/sbin:..., and mount.rs links the test binary as
/// /usr/local/bin/ckptfs, which would shadow the package's /usr/bin/ckptfs. Nothing outside the
/// namespace changes. The test reaches the tree through the daemon's /proc/PID/root; Drop
/// unmounts in the namespace (nsenter) and ends the daemon by PID, which ends the namespace.
struct NsMount {
    dir: PathBuf,
    daemon: i32,
    done: bool,
}

impl NsMount {
    fn new(cwd: &Path, image: &str, dir: &Path, opts: &str) -> NsMount {
        let script = "mount -t tmpfs -o size=64k,mode=755 ckptfs-test /usr/local && \
                      exec mount -t fuse.ckptfs \"$@\"";
        let r = run_files(
            Some(cwd),
            "unshare",
            &[
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
                image,
                s(dir),
                "-o",
                opts,
            ],
        );
        let pids = ckptfs_pids_for(dir);
        let m = NsMount {
            dir: dir.to_path_buf(),
            daemon: pids.first().copied().unwrap_or(0),
            done: false,
        };
        assert!(r.ok, "unshare -m ... mount -t fuse.ckptfs: {r:?}");
        assert_eq!(pids.len(), 1, "ckptfs daemons for {}", dir.display());
        m
    }

    /// `rel` in the mounted tree, as seen from outside the namespace.
    fn path(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.daemon, self.dir.display())).join(rel)
    }

    fn in_namespace(&self, cmd: &[&str]) -> Ran {
        let pid = self.daemon.to_string();
        let mut args = vec!["-t", &pid, "-m"];
        args.extend_from_slice(cmd);
        run_files(None, "nsenter", &args)
    }

    fn unmount(mut self) {
        let r = self.in_namespace(&["fusermount3", "-u", s(&self.dir)]);
        assert!(r.ok, "fusermount3 -u in the namespace: {r:?}");
        assert!(
            reap_daemons(&self.dir, ACCESS_TIMEOUT),
            "the ckptfs daemon did not exit after unmount"
        );
        self.done = true;
    }
}

impl Drop for NsMount {
    fn drop(&mut self) {
        if !self.done && self.daemon > 0 {
            let _ = self.in_namespace(&["umount", "-l", s(&self.dir)]);
            reap_daemons(&self.dir, Duration::from_secs(10));
        }
    }
}

/// The package's regular files and symlinks ("path -> target"), from `dpkg-deb -c`; files in
/// /usr/bin must be mode 755.
fn deb_contents(deb: &Path) -> BTreeSet<String> {
    let listing = ok_env("60", &[], "dpkg-deb", &[OsStr::new("-c"), deb.as_os_str()]);
    let mut out = BTreeSet::new();
    // -rwxr-xr-x 0/0     3442960 2026-12-06 00:00 ./usr/bin/ckptfs
    for line in listing.lines().filter(|l| !l.starts_with('d')) {
        let (_, path) = line
            .split_once(" ./")
            .unwrap_or_else(|| panic!("dpkg-deb -c line: {line:?}"));
        let path = format!("/{path}");
        if line.starts_with('-') && path.starts_with("/usr/bin/") {
            assert!(line.starts_with("-rwxr-xr-x"), "not mode 755: {line}");
        }
        out.insert(path);
    }
    out
}

/// What `ckptfs --version` must print: the version, and the revision build.rs reads.
fn expected_version() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let own = git(&["rev-parse", "--show-toplevel"])
        .and_then(|t| Path::new(&t).canonicalize().ok())
        .is_some_and(|t| Some(t) == Path::new(dir).canonicalize().ok());
    let rev = own
        .then(|| git(&["rev-parse", "--short", "HEAD"]))
        .flatten()
        .unwrap_or_else(|| "unknown".into());
    format!("ckptfs {} (git {rev})", env!("CARGO_PKG_VERSION"))
}

#[test]
fn deb_package_installs_and_removes() {
    let tool = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let have_tool = run_env("60", &[], &tool, &os(&["deb", "--version"])).ok;
    if !prerequisite(
        have_tool,
        "cargo-deb is not installed (cargo install cargo-deb)",
    ) {
        return;
    }
    // The binary under test is TARGET/release/ckptfs; cargo deb packages TARGET/release.
    let bin = Path::new(bin());
    let release = bin.parent().filter(|p| p.ends_with("release"));
    if !prerequisite(release.is_some(), "not a --release build") {
        return;
    }
    let target = release.and_then(Path::parent).unwrap();
    let _lock = MachineLock::take();
    assert!(
        !installed(),
        "a ckptfs package is already installed ({}): this test installs and removes it, \
         remove it first (dpkg -r ckptfs)",
        dpkg_status()
    );

    // Build.
    let t = common::tempdir();
    let d = t.path();
    let out_dir = d.join("deb");
    let target_env = format!("CARGO_TARGET_DIR={}", target.display());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    ok_env(
        SLOW_SECS,
        &[&target_env],
        &tool,
        &[
            OsStr::new("deb"),
            OsStr::new("--no-build"),
            OsStr::new("--manifest-path"),
            manifest.as_os_str(),
            OsStr::new("--output"),
            out_dir.as_os_str(),
        ],
    );
    let arch = ok_env("60", &[], "dpkg", &os(&["--print-architecture"]));
    let version = env!("CARGO_PKG_VERSION");
    let deb = out_dir.join(format!("ckptfs_{version}_{}.deb", arch.trim()));
    let ddeb = out_dir.join(format!("ckptfs-dbgsym_{version}_{}.ddeb", arch.trim()));
    assert!(
        deb.is_file() && ddeb.is_file(),
        "cargo deb did not make {} and {}",
        deb.display(),
        ddeb.display()
    );

    // Contents and control fields.
    let want: BTreeSet<String> = CONTENTS.iter().map(|p| p.to_string()).collect();
    assert_eq!(deb_contents(&deb), want, "dpkg-deb -c {}", deb.display());
    assert!(
        deb_contents(&ddeb)
            .iter()
            .any(|p| p.starts_with("/usr/lib/debug/.build-id/") && p.ends_with(".debug")),
        "no debug symbols in {}",
        ddeb.display()
    );
    let field = |name: &str| {
        ok_env(
            "60",
            &[],
            "dpkg-deb",
            &[OsStr::new("-f"), deb.as_os_str(), OsStr::new(name)],
        )
        .trim()
        .to_string()
    };
    assert_eq!(field("Package"), "ckptfs");
    assert_eq!(field("Version"), version);
    let depends = field("Depends");
    let deps: Vec<&str> = depends.split(',').map(str::trim).collect();
    for dep in DEPENDS {
        assert!(deps.contains(dep), "Depends lacks {dep}: {depends}");
    }
    assert!(
        deps.iter().any(|d| d.starts_with("libc6 (>= ")),
        "Depends lacks the binary's libraries ($auto: dpkg-shlibdeps): {depends}"
    );

    // Install: apt-get resolves Depends (and would install what is missing).
    let r = apt_get(&[OsStr::new("install"), deb.as_os_str()]);
    let guard = Installed;
    assert!(
        r.ok && installed(),
        "apt-get install {}: {r:?}",
        deb.display()
    );
    let listed = ok_env("60", &[], "dpkg", &os(&["-L", "ckptfs"]));
    for p in CONTENTS {
        let p = p.split(" -> ").next().unwrap();
        assert!(listed.lines().any(|l| l == p), "dpkg -L ckptfs lacks {p}");
        assert!(Path::new(p).exists(), "{p} not installed");
    }
    let installed_files: Vec<String> = listed
        .lines()
        .filter(|l| std::fs::symlink_metadata(l).is_ok_and(|m| !m.is_dir()))
        .map(String::from)
        .collect();

    // The installed binary: --version, and mount(8) through mount.fuse3 finding it in PATH.
    let v = ok_env("60", &[SYSTEM_PATH], "ckptfs", &os(&["--version"]));
    assert_eq!(v.trim(), expected_version(), "/usr/bin/ckptfs --version");
    create(d, "base.qcow2", "8M", "", None);
    qemu_io(d, "base.qcow2", &["write -P 0x41 0 1M"]);
    create(d, "vm.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "vm.qcow2", "c1"]);
    qemu_io(d, "vm.qcow2", &["write -P 0x62 2M 64k"]);
    let img = d.join("vm.qcow2");
    let truth = truth_raw(&img);
    let dir = mount_dir(d, "mnt");
    let m = NsMount::new(d, "vm.qcow2", &dir, "ro,allow_other");
    let exe = std::fs::read_link(format!("/proc/{}/exe", m.daemon));
    assert_eq!(
        exe.ok(),
        Some(PathBuf::from("/usr/bin/ckptfs")),
        "the daemon mount -t fuse.ckptfs started"
    );
    let cj = read_json(&m.path("checkpoints.json"));
    assert!(ckpt_names(&cj).contains(&"c1".to_string()), "{cj}");
    assert_same(
        &read(&m.path("current/disk.img")),
        &truth,
        0,
        "mounted disk.img",
    );
    m.unmount();

    // The scripts from PATH (which find ckptfs in PATH): a full backup, then verify.
    let scripts_tmp = d.join("scripts-tmp");
    std::fs::create_dir(&scripts_tmp).unwrap();
    let _mounts = MountsUnder(scripts_tmp.clone());
    let tmp_env = format!("TMPDIR={}", scripts_tmp.display());
    let env = [
        "-u",
        "CKPTFS",
        "-u",
        "CKPTFS_RESTORE",
        SYSTEM_PATH,
        &tmp_env,
    ];
    let help = ok_env("60", &env, "ckptfs-backup", &os(&["--help"]));
    assert!(help.starts_with("usage: ckptfs-backup"), "{help}");
    let help = ok_env("60", &env, "ckptfs-restore", &os(&["--help"]));
    assert!(help.contains("usage: ckptfs-restore"), "{help}");
    let dest = d.join("backup");
    let full = [
        OsStr::new("full"),
        img.as_os_str(),
        dest.as_os_str(),
        OsStr::new("--quiet"),
    ];
    ok_env(SLOW_SECS, &env, "ckptfs-backup", &full);
    // The repository is a qcow2 chain listed in backup.json: its one file is the disk.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("backup.json")).unwrap()).unwrap();
    let file = index["backups"][0]["file"]
        .as_str()
        .unwrap_or_else(|| panic!("backup.json names no file: {index}"));
    assert_same(&truth_raw(&dest.join(file)), &truth, 0, "the full backup");
    let verify = [
        OsStr::new("verify"),
        dest.as_os_str(),
        OsStr::new("--quiet"),
    ];
    let out = ok_env(SLOW_SECS, &env, "ckptfs-backup", &verify);
    assert!(out.contains("1 backup(s), files clean"), "verify: {out}");

    // man, the completion (also through the names the scripts' links give), the changelog.
    let page = ok_env("60", &[], "man", &os(&["-w", "ckptfs"]));
    assert_eq!(
        page.trim(),
        "/usr/share/man/man1/ckptfs.1.gz",
        "man -w ckptfs (an /etc/dpkg/dpkg.cfg.d path-exclude for man pages?)"
    );
    for name in ["ckptfs", "ckptfs-backup", "ckptfs-restore"] {
        let script =
            format!("source /usr/share/bash-completion/completions/{name} && complete -p {name}");
        let out = ok_env("60", &[], "bash", &[OsStr::new("-c"), OsStr::new(&script)]);
        let func = format!("_{}", name.replace('-', "_"));
        assert!(
            out.contains(&format!("-F {func} {name}")),
            "{script}: {out}"
        );
    }
    let changelog = ok_env(
        "60",
        &[],
        "gzip",
        &os(&["-dc", "/usr/share/doc/ckptfs/changelog.Debian.gz"]),
    );
    assert!(
        changelog.starts_with(&format!("ckptfs ({version}) ")),
        "contrib/changelog's first entry is not version {version}: {changelog}"
    );

    // Removal: every file dpkg installed is gone.
    let r = apt_get(&os(&["remove", "ckptfs"]));
    assert!(r.ok && !installed(), "apt-get remove ckptfs: {r:?}");
    drop(guard);
    let left: Vec<&String> = installed_files
        .iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    assert!(left.is_empty(), "left after removal: {left:?}");
    assert!(!Path::new("/usr/share/doc/ckptfs").exists());
}

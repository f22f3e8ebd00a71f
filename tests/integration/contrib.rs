//! contrib/ and examples/: the backup and restore scripts end to end on QEMU-made chains
//! (libvirt-style checkpoints across external snapshots, libvirt metadata), `qemu-img
//! compare` at every step; the man page against `ckptfs --help`; the bash completion; the
//! library examples against the mounted tree.
//!
//! The scripts mount on private directories under the TMPDIR each test gives them; a guard
//! unmounts anything left there (and ends the daemons serving it, by PID) whatever happens.
//! Every command runs under `timeout`.

use crate::common;
use crate::mountutil::{self, bin, is_mounted, mount_points, Mount, Ran};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Seconds one script run may take.
const SCRIPT_TIMEOUT: &str = "180";

fn contrib(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(name)
}

/// Unmounts whatever is still mounted under `tmp` when dropped (a script killed by its
/// timeout cannot run its own trap), then waits for the daemons serving it.
struct ScriptMounts {
    tmp: PathBuf,
}

impl ScriptMounts {
    fn left(&self) -> Vec<String> {
        let t = self.tmp.to_string_lossy().into_owned();
        mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&t))
            .collect()
    }
}

impl Drop for ScriptMounts {
    fn drop(&mut self) {
        for m in self.left() {
            drop(Mount::adopt(Path::new(&m)));
        }
    }
}

/// Where one test keeps its files: `dir` for images and backups, `tmp` as the scripts'
/// TMPDIR (their mount points), with the guard.
struct Env {
    _root: tempfile::TempDir,
    dir: PathBuf,
    guard: ScriptMounts,
}

impl Env {
    fn new() -> Env {
        let root = common::tempdir();
        let dir = root.path().canonicalize().unwrap();
        let tmp = dir.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        Env {
            dir,
            guard: ScriptMounts { tmp },
            _root: root,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Run contrib/`script` with `args` in `dir`, CKPTFS set to the binary under test and
    /// TMPDIR to the guarded directory; output to files (a daemon must not hold pipes).
    /// Asserts that the script left nothing mounted and no temporary directory behind.
    fn script(&self, script: &str, args: &[&str]) -> Ran {
        let logs = common::tempdir();
        let (out_p, err_p) = (logs.path().join("out"), logs.path().join("err"));
        let st = Command::new("timeout")
            .args(["-k", "5", SCRIPT_TIMEOUT])
            .arg(contrib(script))
            .args(args)
            .env("CKPTFS", bin())
            .env("TMPDIR", &self.guard.tmp)
            .env_remove("CKPTFS_RESTORE")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(File::create(&out_p).unwrap())
            .stderr(File::create(&err_p).unwrap())
            .status()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        let r = Ran {
            ok: st.success(),
            code: st.code(),
            stdout: std::fs::read_to_string(out_p).unwrap_or_default(),
            stderr: std::fs::read_to_string(err_p).unwrap_or_default(),
        };
        assert!(
            self.guard.left().is_empty(),
            "{script} {args:?} left mounts: {:?}\n{r:?}",
            self.guard.left()
        );
        let leftovers: Vec<_> = std::fs::read_dir(&self.guard.tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            leftovers.is_empty(),
            "{script} {args:?} left temporary files: {leftovers:?}\n{r:?}"
        );
        r
    }

    /// The script must succeed; returns its run.
    fn ok(&self, script: &str, args: &[&str]) -> Ran {
        let r = self.script(script, args);
        assert!(
            r.ok,
            "{script} {args:?} failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
            r.code, r.stdout, r.stderr
        );
        assert_eq!(
            r.stdout.lines().count(),
            1,
            "{script} {args:?}: expected a one-line summary on stdout:\n{}",
            r.stdout
        );
        eprintln!("  {script} {}: {}", args.join(" "), r.stdout.trim_end());
        r
    }

    /// The script must fail with exactly one line on stderr, naming `must_mention`.
    fn fails(&self, script: &str, args: &[&str], must_mention: &str) -> String {
        let r = self.script(script, args);
        assert!(!r.ok, "{script} {args:?} should fail:\n{r:?}");
        assert_eq!(r.code, Some(1), "{script} {args:?}: exit status\n{r:?}");
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{script} {args:?}: expected one line on stderr:\n{}",
            r.stderr
        );
        assert!(
            lines[0].starts_with(&format!("{script}: ")) && lines[0].contains(must_mention),
            "{script} {args:?}: the error should start with '{script}: ' and mention \
             {must_mention:?}: {}",
            lines[0]
        );
        lines[0].to_string()
    }

    fn qemu_img(&self, args: &[&str]) {
        common::qemu_img(&self.dir, args);
    }

    fn qemu_io(&self, image: &str, cmds: &[&str]) {
        common::qemu_io(&self.dir, image, cmds);
    }

    /// `qemu-img compare -f raw RAW IMAGE`: true when identical (panics on an error).
    fn same(&self, raw: &str, image: &str) -> bool {
        let out = common::run_status_in(
            Some(&self.dir),
            "qemu-img",
            &["compare", "-f", "raw", raw, image],
        );
        match out.status.code() {
            Some(0) => true,
            Some(1) => {
                eprintln!(
                    "  qemu-img compare {raw} {image}: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                );
                false
            }
            _ => panic!(
                "qemu-img compare {raw} {image} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Save the chain's current contents as `name` (qemu-img convert -O raw).
    fn truth(&self, image: &str, name: &str) {
        self.qemu_img(&["convert", "-O", "raw", image, name]);
    }

    fn sha256(&self, rel: &str) -> String {
        let out = common::run_in(Some(&self.dir), "sha256sum", &[rel]);
        String::from_utf8_lossy(&out)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }

    /// A libvirt checkpoint XML `meta/NAME.xml` (disk vda, bitmap NAME).
    fn meta(&self, name: &str, parent: Option<&str>, time: u64) {
        let d = self.p("meta");
        std::fs::create_dir_all(&d).unwrap();
        let parent = parent.map_or(String::new(), |p| {
            format!("  <parent>\n    <name>{p}</name>\n  </parent>\n")
        });
        let xml = format!(
            "<domaincheckpoint>\n  <name>{name}</name>\n{parent}  <creationTime>{time}\
             </creationTime>\n  <disks>\n    <disk name='vda' checkpoint='bitmap' \
             bitmap='{name}'/>\n    <disk name='vdb' checkpoint='no'/>\n  </disks>\n\
             </domaincheckpoint>\n"
        );
        std::fs::write(d.join(format!("{name}.xml")), xml).unwrap();
    }
}

/// key=value manifest -> value of `key`.
fn manifest(path: &Path, key: &str) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{}: no {key}= in\n{t}", path.display()))
        .to_string()
}

/// The libvirt-style chain of the qcow2-bitmaps cookbook, section 9, with more kinds of
/// writes: vda-1 (c1, c2) <- vda-2 (c1, c2 continued, c3), and libvirt metadata for them.
/// Writes include zeroing (write -z, discard) and literal zero bytes written as data, which
/// `cp --sparse` turns into holes in the incremental.
fn make_chain(env: &Env) {
    env.qemu_img(&["create", "-q", "-f", "qcow2", "vda-1.qcow2", "64M"]);
    env.qemu_img(&["bitmap", "--add", "vda-1.qcow2", "c1"]);
    env.qemu_io("vda-1.qcow2", &["write -P 1 0 64k", "write -P 0x11 4M 1M"]);
    env.qemu_img(&["bitmap", "--add", "vda-1.qcow2", "c2"]);
    env.qemu_io(
        "vda-1.qcow2",
        &["write -P 2 1M 64k", "write -P 0x12 6M 256k"],
    );
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vda-1.qcow2",
        "-F",
        "qcow2",
        "vda-2.qcow2",
    ]);
    for b in ["c1", "c2", "c3"] {
        env.qemu_img(&["bitmap", "--add", "vda-2.qcow2", b]);
    }
    env.qemu_io(
        "vda-2.qcow2",
        &[
            "write -P 3 2M 64k",
            "write -z 3M 64k",
            "discard 0 64k",
            "write -P 0 4M 64k",
            "write -c -P 0x13 10M 128k",
        ],
    );
    env.meta("c1", None, 1000);
    env.meta("c2", Some("c1"), 1001);
    env.meta("c3", Some("c2"), 1002);
}

/// Full backup, writes and a checkpoint, incremental, an external snapshot and more writes,
/// a second incremental; verify; restores (raw, qcow2, up to each step); a damaged backup.
#[test]
fn backup_and_restore_end_to_end() {
    let env = Env::new();
    make_chain(&env);
    let meta = env.p("meta");
    let meta = meta.to_str().unwrap();

    // Full backup at c3 (the newest checkpoint in libvirt's order).
    env.ok(
        "ckptfs-backup",
        &["full", "vda-2.qcow2", "bk", "--checkpoints", meta],
    );
    let fm = env.p("bk/full.manifest");
    assert_eq!(manifest(&fm, "checkpoint"), "c3");
    assert_eq!(manifest(&fm, "virtual_size"), (64u64 << 20).to_string());
    assert_eq!(manifest(&fm, "order"), "metadata");
    assert!(env.same("bk/full.raw", "vda-2.qcow2"), "full.raw != vda-2");
    assert_eq!(manifest(&fm, "sha256"), env.sha256("bk/full.raw"));
    let meta_full = std::fs::metadata(env.p("bk/full.raw")).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta_full) * 512 < 8 << 20,
        "full.raw should be sparse"
    );
    env.truth("vda-2.qcow2", "truth0.raw");

    // Writes after c3, then checkpoint c4: overwrite data, zero a base cluster, write zero
    // bytes as data into a data cluster, discard, write past everything so far.
    env.qemu_io(
        "vda-2.qcow2",
        &[
            "write -P 4 8M 128k",
            "write -z 1M 64k",
            "write -P 0 2M 4k",
            "write -P 0x44 6M 4k",
            "discard 4M 64k",
            "write -P 0x45 63M 1M",
        ],
    );
    env.qemu_img(&["bitmap", "--add", "vda-2.qcow2", "c4"]);
    env.meta("c4", Some("c3"), 1003);
    env.qemu_io("vda-2.qcow2", &["write -P 0x46 12M 64k"]);
    env.truth("vda-2.qcow2", "truth1.raw");

    // Incremental 1 since c3 (the full's checkpoint, by default), records c4.
    env.ok(
        "ckptfs-backup",
        &["inc", "vda-2.qcow2", "bk", "--checkpoints", meta],
    );
    let m1 = env.p("bk/inc-1.manifest");
    assert_eq!(manifest(&m1, "since"), "c3");
    assert_eq!(manifest(&m1, "checkpoint"), "c4");
    let ext1 = std::fs::read_to_string(env.p("bk/inc-1.extents")).unwrap();
    assert_eq!(
        manifest(&m1, "extents"),
        ext1.lines().count().to_string(),
        "extents count"
    );
    assert!(
        ext1.lines().any(|l| l.ends_with(" zero")),
        "inc-1.extents should list zeroed runs:\n{ext1}"
    );
    // The incremental's sha256 covers its data extents, concatenated.
    assert_eq!(manifest(&m1, "sha256_of"), "data-extents");
    let inc_bytes = std::fs::read(env.p("bk/inc-1.raw")).unwrap();
    let mut data = Vec::new();
    for l in ext1.lines().filter(|l| !l.ends_with(" zero")) {
        let f: Vec<usize> = l.split(' ').map(|x| x.parse().unwrap()).collect();
        data.extend_from_slice(&inc_bytes[f[0]..f[0] + f[1]]);
    }
    std::fs::write(env.p("inc-1.data"), &data).unwrap();
    assert_eq!(manifest(&m1, "sha256"), env.sha256("inc-1.data"));
    let inc1 = std::fs::metadata(env.p("bk/inc-1.raw")).unwrap();
    assert_eq!(inc1.len(), 64 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&inc1) * 512 <= 4 << 20,
        "inc-1.raw should hold only the changed blocks"
    );
    env.ok("ckptfs-backup", &["verify", "bk", "vda-2.qcow2"]);

    // libvirt's external snapshot: vda-3 continues the recording bitmaps; more writes; c5.
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "vda-2.qcow2",
        "-F",
        "qcow2",
        "vda-3.qcow2",
    ]);
    for b in ["c1", "c2", "c3", "c4"] {
        env.qemu_img(&["bitmap", "--add", "vda-3.qcow2", b]);
    }
    env.qemu_io(
        "vda-3.qcow2",
        &[
            "write -P 5 20M 192k",
            "write -z 8M 64k",
            "write -P 0 12M 64k",
            "discard 63M 512k",
            "write -P 0x55 0 4k",
        ],
    );
    env.qemu_img(&["bitmap", "--add", "vda-3.qcow2", "c5"]);
    env.meta("c5", Some("c4"), 1004);
    env.truth("vda-3.qcow2", "truth2.raw");

    // Incremental 2 since c4 (default), across the new layer; with --force-share (nothing
    // holds the image, so the bitmaps stay valid).
    env.ok(
        "ckptfs-backup",
        &[
            "inc",
            "vda-3.qcow2",
            "bk",
            "--checkpoints",
            meta,
            "--force-share",
            "--quiet",
        ],
    );
    let m2 = env.p("bk/inc-2.manifest");
    assert_eq!(manifest(&m2, "since"), "c4");
    assert_eq!(manifest(&m2, "checkpoint"), "c5");

    // verify rebuilds full + 2 incrementals and compares with the image (given, or named by
    // the last manifest).
    let v = env.ok("ckptfs-backup", &["verify", "bk", "vda-3.qcow2"]);
    assert!(v.stdout.contains("exactly"), "{}", v.stdout);
    env.ok("ckptfs-backup", &["verify", "bk"]);
    // ... and notices that the older image is not what the set rebuilds.
    env.fails(
        "ckptfs-backup",
        &["verify", "bk", "vda-1.qcow2"],
        "does not rebuild",
    );

    // Restores: all of it (raw and qcow2), and up to each step.
    env.ok("ckptfs-restore", &["bk", "out.raw"]);
    assert!(env.same("out.raw", "vda-3.qcow2"));
    env.ok("ckptfs-restore", &["--format", "qcow2", "bk", "out.qcow2"]);
    assert!(env.same("truth2.raw", "out.qcow2"));
    common::qemu_img(&env.dir, &["check", "-q", "out.qcow2"]);
    env.ok("ckptfs-restore", &["--upto", "1", "bk", "out1.raw"]);
    assert!(env.same("out1.raw", "truth1.raw"), "restore up to inc-1");
    env.ok("ckptfs-restore", &["--upto", "0", "bk", "out0.raw"]);
    assert!(
        env.same("out0.raw", "truth0.raw"),
        "restore of the full alone"
    );
    assert!(!env.same("out1.raw", "truth2.raw"));

    // Restore into a writable current/disk.img: the dd path, tried on a plain directory
    // (an -o rw mount is tested in `restore_into_rw_mount`).
    std::fs::create_dir_all(env.p("fake/current")).unwrap();
    let mut junk = vec![0x5au8; 64 << 20];
    junk[..4].copy_from_slice(b"junk");
    std::fs::write(env.p("fake/current/disk.img"), &junk).unwrap();
    let r = env.script("ckptfs-restore", &["--into-mount", "fake", "bk"]);
    assert!(r.ok, "{r:?}");
    assert!(r.stderr.contains("not a mount point"), "{}", r.stderr);
    assert!(env.same("fake/current/disk.img", "vda-3.qcow2"));

    // Errors: one line each.
    env.fails("ckptfs-restore", &["bk", "out.raw"], "exists");
    env.fails(
        "ckptfs-restore",
        &["--upto", "3", "bk", "x.raw"],
        "2 incremental",
    );
    env.fails(
        "ckptfs-backup",
        &["inc", "vda-3.qcow2", "bk", "--since", "nosuch"],
        "nosuch",
    );
    env.fails(
        "ckptfs-backup",
        &["full", "vda-3.qcow2", "bk"],
        "already holds a full backup",
    );

    // A damaged backup: verify and restore refuse it; without the check it rebuilds wrong.
    common::run_in(
        Some(&env.dir),
        "cp",
        &["-a", "--sparse=always", "bk", "bad"],
    );
    let first = ext1
        .lines()
        .find(|l| !l.ends_with(" zero"))
        .expect("a data extent");
    let off: u64 = first.split(' ').next().unwrap().parse().unwrap();
    let f = OpenOptions::new()
        .write(true)
        .open(env.p("bad/inc-1.raw"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\xde\xad", off).unwrap();
    drop(f);
    env.fails(
        "ckptfs-backup",
        &["verify", "bad", "vda-3.qcow2"],
        "sha256 mismatch",
    );
    env.fails("ckptfs-restore", &["bad", "bad.raw"], "sha256 mismatch");
    assert!(!env.p("bad.raw").exists() && !env.p("bad.raw.partial").exists());
    env.ok("ckptfs-restore", &["--no-verify", "bad", "bad.raw"]);
    assert!(!env.same("bad.raw", "vda-3.qcow2"));
}

/// A full backup as qcow2 and with the guessed order (no metadata), then an incremental
/// since an explicit checkpoint.
#[test]
fn backup_qcow2_and_guessed_order() {
    let env = Env::new();
    make_chain(&env);
    let r = env.ok(
        "ckptfs-backup",
        &["full", "vda-2.qcow2", "bq", "--format", "qcow2"],
    );
    assert!(
        r.stderr.contains("guessed"),
        "a guessed order is said: {}",
        r.stderr
    );
    let fm = env.p("bq/full.manifest");
    assert_eq!(manifest(&fm, "format"), "qcow2");
    assert_eq!(manifest(&fm, "order"), "guessed");
    env.truth("vda-2.qcow2", "t0.raw");
    assert!(env.same("t0.raw", "bq/full.qcow2"));
    assert_eq!(manifest(&fm, "sha256"), env.sha256("t0.raw"));
    env.qemu_io("vda-2.qcow2", &["write -P 9 30M 64k", "write -z 2M 64k"]);
    env.ok(
        "ckptfs-backup",
        &["inc", "vda-2.qcow2", "bq", "--since", "c2", "--quiet"],
    );
    env.ok("ckptfs-backup", &["verify", "bq", "vda-2.qcow2", "--quiet"]);
    env.ok("ckptfs-restore", &["--quiet", "bq", "r.raw"]);
    assert!(env.same("r.raw", "vda-2.qcow2"));
}

/// Script errors: one line on stderr, exit 1, nothing left mounted (the Env asserts that).
#[test]
fn backup_errors_are_one_line() {
    let env = Env::new();
    std::fs::write(env.p("empty.img"), b"").unwrap();
    std::fs::write(env.p("text.img"), vec![b'x'; 1 << 20]).unwrap();
    env.fails("ckptfs-backup", &["full", "empty.img", "b1"], "ckptfs: ");
    env.fails("ckptfs-backup", &["full", "text.img", "b2"], "text.img");
    env.fails(
        "ckptfs-backup",
        &["full", "missing.qcow2", "b3"],
        "missing.qcow2",
    );
    // A missing backing file: ckptfs's own message, in one line.
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "16M",
    ]);
    env.fails(
        "ckptfs-backup",
        &["inc", "top.qcow2", "b4", "--since", "x"],
        "gone.qcow2",
    );
    env.fails("ckptfs-backup", &["verify", "nosuchdir"], "nosuchdir");
    env.fails("ckptfs-restore", &["nosuchdir", "o.raw"], "nosuchdir");
    // Usage errors exit 2.
    for (s, a) in [
        ("ckptfs-backup", &["frobnicate"][..]),
        ("ckptfs-backup", &["full", "x"][..]),
        ("ckptfs-restore", &["--bogus", "a", "b"][..]),
    ] {
        let r = env.script(s, a);
        assert_eq!(r.code, Some(2), "{s} {a:?}: {r:?}");
    }
    // A chain without checkpoints: full works and says the next backup must be full; inc
    // without --since has nothing to start from.
    env.qemu_img(&["create", "-q", "-f", "qcow2", "plain.qcow2", "8M"]);
    env.qemu_io("plain.qcow2", &["write -P 7 1M 64k"]);
    let r = env.ok("ckptfs-backup", &["full", "plain.qcow2", "b5"]);
    assert!(r.stderr.contains("must be a full one"), "{}", r.stderr);
    assert_eq!(manifest(&env.p("b5/full.manifest"), "checkpoint"), "");
    let r = env.script("ckptfs-backup", &["inc", "plain.qcow2", "b5"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    // An invalid checkpoint (bitmap in use): the incremental is refused with the reason.
    env.qemu_img(&["bitmap", "--add", "plain.qcow2", "c1"]);
    env.qemu_io("plain.qcow2", &["write -P 8 2M 64k"]);
    common::set_bitmap_in_use(&env.p("plain.qcow2"), "c1");
    env.fails(
        "ckptfs-backup",
        &["inc", "plain.qcow2", "b5", "--since", "c1"],
        "not valid",
    );
}

/// `ckptfs-restore --into-mount` through a real `-o rw` mount, once ckptfs has one: skipped
/// (visibly) while `-o rw` still mounts read-only.
#[test]
fn restore_into_rw_mount() {
    let env = Env::new();
    make_chain(&env);
    env.ok(
        "ckptfs-backup",
        &["full", "vda-2.qcow2", "bk", "--checkpoint", "c2", "--quiet"],
    );
    env.qemu_io("vda-2.qcow2", &["write -P 6 5M 128k", "write -z 2M 64k"]);
    env.ok("ckptfs-backup", &["inc", "vda-2.qcow2", "bk", "--quiet"]);
    env.qemu_img(&["create", "-q", "-f", "qcow2", "target.qcow2", "64M"]);
    let mnt = mountutil::mount_dir(&env.dir, "rw-mnt");
    let m = match Mount::try_new(&env.p("target.qcow2"), &mnt, Some("rw")) {
        Ok(m) => m,
        Err(r) => {
            eprintln!(
                "SKIP contrib::restore_into_rw_mount: `ckptfs -o rw` does not mount yet: {}",
                r.stderr.trim()
            );
            return;
        }
    };
    let disk = m.path("current/disk.img");
    let writable = mountutil::timed("open current/disk.img for writing", move || {
        OpenOptions::new().write(true).open(&disk).map(drop)
    });
    if let Err(e) = writable {
        eprintln!(
            "SKIP contrib::restore_into_rw_mount: `ckptfs -o rw` is not writable yet \
             (opening current/disk.img for writing: {e})"
        );
        m.unmount();
        return;
    }
    let r = env.ok(
        "ckptfs-restore",
        &["--into-mount", mnt.to_str().unwrap(), "bk"],
    );
    assert!(!r.stderr.contains("not a mount point"), "{}", r.stderr);
    m.unmount();
    assert!(!is_mounted(&mnt));
    assert!(env.same_image("target.qcow2", "vda-2.qcow2"));
    common::qemu_img(&env.dir, &["check", "-q", "target.qcow2"]);
}

impl Env {
    /// `qemu-img compare A B` of two images of any format.
    fn same_image(&self, a: &str, b: &str) -> bool {
        let out = common::run_status_in(Some(&self.dir), "qemu-img", &["compare", a, b]);
        match out.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!(
                "qemu-img compare {a} {b}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Man page, completion, shellcheck

/// Option names in `ckptfs --help`: the flags of the usage lines and the entries of the
/// option list (`  name[=ARG]  text`), `=ARG` dropped.
fn help_options(help: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut in_usage = true;
    for line in help.lines() {
        if line.trim().is_empty() {
            in_usage = false;
            continue;
        }
        if in_usage {
            for w in line.split(|c: char| c.is_whitespace() || "[]|".contains(c)) {
                if w.starts_with('-') && w.len() > 1 {
                    out.insert(w.to_string());
                }
            }
        } else if let Some(rest) = line.strip_prefix("  ") {
            if !rest.starts_with(' ') {
                let name = rest.split_whitespace().next().unwrap();
                out.insert(name.split('=').next().unwrap().to_string());
            }
        }
    }
    out
}

/// Option names the man page's OPTIONS section lists: the first word after each `.TP`.
fn man_options(man: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut in_options = false;
    let mut after_tp = false;
    for line in man.lines() {
        if let Some(sh) = line.strip_prefix(".SH ") {
            in_options = sh.trim_matches('"') == "OPTIONS";
            continue;
        }
        if !in_options {
            continue;
        }
        if line.starts_with(".TP") {
            after_tp = true;
            continue;
        }
        if after_tp {
            after_tp = false;
            // `.B name`, `.BI name= ARG`, `.BI \-o " OPTS"`: the first word, unescaped.
            let w = line
                .split_whitespace()
                .nth(if line.starts_with('.') { 1 } else { 0 })
                .unwrap_or("");
            let w = w
                .replace("\\-", "-")
                .replace("\\fB", "")
                .replace("\\fI", "")
                .replace("\\fR", "")
                .replace('"', "");
            out.insert(w.split('=').next().unwrap().to_string());
        }
    }
    out
}

#[test]
fn man_page_matches_help() {
    let r = mountutil::run_files(None, bin(), &["--help"]);
    assert!(r.ok, "ckptfs --help: {r:?}");
    let help = help_options(&r.stdout);
    for must in [
        "-o",
        "-f",
        "--json",
        "--checkpoints",
        "--domain",
        "rw",
        "cache_mb",
    ] {
        assert!(
            help.contains(must),
            "parsing --help missed {must}: {help:?}"
        );
    }
    let man = std::fs::read_to_string(contrib("ckptfs.1")).unwrap();
    let documented = man_options(&man);
    let missing: Vec<_> = help.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&help).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "contrib/ckptfs.1 OPTIONS vs ckptfs --help: missing from the man page {missing:?}, \
         not in --help {extra:?}"
    );
    // The page renders without groff warnings, where man is installed.
    if Path::new("/usr/bin/man").exists() {
        let out = common::run_status_in(
            None,
            "man",
            &[
                OsStr::new("--warnings"),
                OsStr::new("-l"),
                contrib("ckptfs.1").as_os_str(),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "man --warnings: {err}"
        );
    }
}

/// Run the completion function for a command line whose last word is being completed.
fn complete(words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect();
    let func = match words[0] {
        "ckptfs" => "_ckptfs",
        "ckptfs-backup" => "_ckptfs_backup",
        _ => "_ckptfs_restore",
    };
    let script = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; {func}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        contrib("ckptfs.bash-completion").display(),
        quoted.join(" "),
        words.len() - 1
    );
    let out = common::run_in(None, "bash", &["-c", &script]);
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn bash_completion() {
    let has = |words: &[&str], want: &[&str]| {
        let got = complete(words);
        for w in want {
            assert!(got.iter().any(|g| g == w), "{words:?}: {w} not in {got:?}");
        }
    };
    has(&["ckptfs", "l"], &["ls"]);
    has(
        &["ckptfs", "ls", "--"],
        &["--json", "--checkpoints", "--domain"],
    );
    has(&["ckptfs", "--"], &["--help", "--version"]);
    has(&["ckptfs", "-o", "allow"], &["allow_other"]);
    has(
        &["ckptfs", "-o", "ro,de"],
        &["ro,debug", "ro,default_permissions"],
    );
    has(&["ckptfs", "-o", "force"], &["force_share"]);
    has(&["ckptfs", "-o", "ca"], &["cache_mb="]);
    has(&["ckptfs", "-oro,ch"], &["-oro,checkpoints="]);
    has(&["ckptfs-backup", ""], &["full", "inc", "verify"]);
    has(&["ckptfs-backup", "inc", "--s"], &["--since"]);
    has(
        &["ckptfs-backup", "full", "x", "y", "--format", ""],
        &["qcow2"],
    );
    has(&["ckptfs-restore", "--in"], &["--into-mount"]);
    // Every -o name in --help is offered.
    let r = mountutil::run_files(None, bin(), &["--help"]);
    let offered = complete(&["ckptfs", "-o", ""]);
    for o in help_options(&r.stdout)
        .into_iter()
        .filter(|o| !o.starts_with('-'))
    {
        assert!(
            offered
                .iter()
                .any(|g| g.split('=').next() == Some(o.as_str())),
            "-o {o} is not completed: {offered:?}"
        );
    }
}

#[test]
fn scripts_pass_shellcheck() {
    let files = [
        contrib("ckptfs-backup"),
        contrib("ckptfs-restore"),
        contrib("ckptfs.bash-completion"),
    ];
    for f in &files {
        common::run("bash", &[OsStr::new("-n"), f.as_os_str()]);
    }
    if Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP contrib::scripts_pass_shellcheck: shellcheck is not installed (bash -n passed)"
        );
        return;
    }
    let r = mountutil::run_files(None, "shellcheck", &files);
    assert!(r.ok, "shellcheck:\n{}{}", r.stdout, r.stderr);
}

// ---------------------------------------------------------------------------------------
// Examples

/// The built example binary, if `cargo test` built it (it builds examples by default).
fn example(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("examples").join(name);
    p.exists().then_some(p)
}

#[test]
fn examples_match_the_tree() {
    let (Some(list), Some(ext)) = (example("list_checkpoints"), example("changed_extents")) else {
        eprintln!("SKIP contrib::examples_match_the_tree: examples not built");
        return;
    };
    let env = Env::new();
    make_chain(&env);
    let meta = env.p("meta");
    let top = env.p("vda-2.qcow2");
    let r = mountutil::run_files(
        None,
        list.to_str().unwrap(),
        &[top.as_os_str(), meta.as_os_str()],
    );
    assert!(r.ok, "list_checkpoints: {r:?}");
    assert!(r.stdout.contains("order: libvirt metadata"), "{}", r.stdout);
    for c in ["c1", "c2", "c3"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(c) && l.ends_with("yes")),
            "list_checkpoints should list {c} as valid:\n{}",
            r.stdout
        );
    }
    let mnt = mountutil::mount_dir(&env.dir, "mnt");
    let m = Mount::new(
        &top,
        &mnt,
        Some(&format!("ro,checkpoints={}", meta.display())),
    );
    for c in ["c1", "c2", "c3"] {
        let r = mountutil::run_files(
            None,
            ext.to_str().unwrap(),
            &[top.as_os_str(), OsStr::new(c), meta.as_os_str()],
        );
        assert!(r.ok, "changed_extents {c}: {r:?}");
        assert_eq!(
            r.stdout,
            mountutil::read_text(&m.path(&format!("{c}/extents"))),
            "changed_extents {c} vs the mounted {c}/extents"
        );
        let info = mountutil::read_json(&m.path(&format!("{c}/info.json")));
        assert!(
            r.stderr
                .contains(&format!("changed_bytes {}", info["changed_bytes"])),
            "{c}: {} vs {info}",
            r.stderr
        );
        assert!(
            r.stdout.is_empty() || r.stderr.contains("run(s)"),
            "{}",
            r.stderr
        );
    }
    m.unmount();
    let r = mountutil::run_files(
        None,
        ext.to_str().unwrap(),
        &[top.as_os_str(), OsStr::new("nope")],
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("no checkpoint"), "{}", r.stderr);
    let _ = std::io::stderr().flush();
}

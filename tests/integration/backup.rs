//! contrib/ckptfs-backup and contrib/ckptfs-restore on offline images: a repository that is a
//! qcow2 chain (backup.json, one file per backup backed by the previous one), mounted with
//! ckptfs and compared point by point with the source at each backup (QEMU's raw conversion is
//! the truth); verify, prune, restores; refusals; a full REPO and a killed run, each followed
//! by a run that recovers. The live (libvirt) path is in `libvirt.rs`, on the same `Env`.
//!
//! The scripts mount on private directories under the TMPDIR each test gives them; a guard
//! unmounts anything left there (and ends the daemons serving it, by PID) whatever happens.
//! Every command runs under `timeout`.

use crate::common;
use crate::mountutil::{self, bin, mount_points, Mount, Ran};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Seconds one script run may take.
const SCRIPT_TIMEOUT: &str = "180";

pub fn contrib(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(name)
}

/// Unmounts whatever is still mounted under `tmp` when dropped (a script killed by its
/// timeout cannot run its own trap), then waits for the daemons serving it.
struct ScriptMounts {
    tmp: PathBuf,
    /// The mount namespace the scripts run in (a process in it), when not ours.
    ns: Option<u32>,
}

impl ScriptMounts {
    fn left(&self) -> Vec<String> {
        let t = self.tmp.to_string_lossy().into_owned();
        let all = match self.ns {
            None => mount_points(),
            Some(pid) => std::fs::read_to_string(format!("/proc/{pid}/mounts"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split(' ').nth(1).map(String::from))
                .collect(),
        };
        all.into_iter().filter(|m| m.starts_with(&t)).collect()
    }

    /// Unmount what is left (lazily, inside the namespace if there is one) and wait for the
    /// daemons that served it.
    fn unmount_left(&self) {
        for m in self.left() {
            match self.ns {
                None => drop(Mount::adopt(Path::new(&m))),
                Some(pid) => {
                    common::run_status_in(
                        None,
                        "nsenter",
                        &[&format!("--mount=/proc/{pid}/ns/mnt"), "umount", "-l", &m],
                    );
                    mountutil::reap_daemons(Path::new(&m), Duration::from_secs(10));
                }
            }
        }
    }
}

impl Drop for ScriptMounts {
    fn drop(&mut self) {
        self.unmount_left();
    }
}

/// Where one test keeps its files: `dir` for images and repositories, `tmp` as the scripts'
/// TMPDIR (their mount points), with the guard. `wrap` prefixes every script run (the
/// libvirt tests run them inside their mount namespace); `vars` are extra environment.
pub struct Env {
    _root: tempfile::TempDir,
    pub dir: PathBuf,
    guard: ScriptMounts,
    wrap: Vec<String>,
    pub vars: std::cell::RefCell<Vec<(String, String)>>,
}

impl Env {
    pub fn new() -> Env {
        let root = common::tempdir();
        let dir = root.path().canonicalize().unwrap();
        let tmp = dir.join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        Env {
            dir,
            guard: ScriptMounts { tmp, ns: None },
            _root: root,
            wrap: Vec::new(),
            vars: Default::default(),
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Run the scripts inside the mount namespace of process `pid` (in `dir`).
    pub fn enter_namespace(&mut self, pid: u32) {
        self.wrap = vec![
            "nsenter".into(),
            format!("--mount=/proc/{pid}/ns/mnt"),
            format!("--wd={}", self.dir.display()),
            "--".into(),
        ];
        self.guard.ns = Some(pid);
    }

    /// Unmount what scripts left (they were killed) wherever they ran.
    pub fn unmount_left(&self) {
        self.guard.unmount_left();
    }

    /// The command that runs contrib/`script` `args` (not started).
    pub fn command(&self, script: &str, args: &[&str], out: &Path, err: &Path) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-k", "5", SCRIPT_TIMEOUT])
            .args(&self.wrap)
            .arg(contrib(script))
            .args(args)
            .env("CKPTFS", bin())
            .env("TMPDIR", &self.guard.tmp)
            .env_remove("CKPTFS_RESTORE")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(File::create(out).unwrap())
            .stderr(File::create(err).unwrap());
        for (k, v) in self.vars.borrow().iter() {
            c.env(k, v);
        }
        c
    }

    /// Run contrib/`script` with `args` in `dir`, CKPTFS set to the binary under test and
    /// TMPDIR to the guarded directory; output to files (a daemon must not hold pipes).
    /// Asserts that the script left nothing mounted and no temporary directory behind.
    pub fn script(&self, script: &str, args: &[&str]) -> Ran {
        let logs = common::tempdir();
        let (out_p, err_p) = (logs.path().join("out"), logs.path().join("err"));
        let st = self
            .command(script, args, &out_p, &err_p)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
        let r = Ran {
            ok: st.success(),
            code: st.code(),
            stdout: std::fs::read_to_string(out_p).unwrap_or_default(),
            stderr: std::fs::read_to_string(err_p).unwrap_or_default(),
        };
        self.assert_clean(&format!("{script} {args:?}"), &r);
        r
    }

    /// Nothing mounted and no temporary file left under the scripts' TMPDIR.
    pub fn assert_clean(&self, what: &str, r: &Ran) {
        assert!(
            self.guard.left().is_empty(),
            "{what} left mounts: {:?}\n{r:?}",
            self.guard.left()
        );
        let leftovers: Vec<_> = std::fs::read_dir(&self.guard.tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            leftovers.is_empty(),
            "{what} left temporary files: {leftovers:?}\n{r:?}"
        );
    }

    /// Unmount what a killed script left under TMPDIR and remove its directories.
    pub fn sweep(&self) {
        self.guard.unmount_left();
        for e in std::fs::read_dir(&self.guard.tmp).unwrap() {
            let p = e.unwrap().path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }

    /// The script must succeed; returns its run.
    pub fn ok(&self, script: &str, args: &[&str]) -> Ran {
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
    pub fn fails(&self, script: &str, args: &[&str], must_mention: &str) -> String {
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

    pub fn qemu_img(&self, args: &[&str]) -> Vec<u8> {
        common::qemu_img(&self.dir, args)
    }

    /// A qcow2 overlay `name` on the qcow2 `backing`, of its size.
    pub fn overlay(&self, backing: &str, name: &str) {
        common::create(&self.dir, name, "", "", Some((backing, "qcow2")));
    }

    pub fn qemu_io(&self, image: &str, cmds: &[&str]) {
        common::qemu_io(&self.dir, image, cmds);
    }

    /// `qemu-img compare A B` (formats probed; a FUSE disk.img probes as raw): identical?
    pub fn same(&self, a: &str, b: &str) -> bool {
        let out = common::run_status_in(Some(&self.dir), "qemu-img", &["compare", a, b]);
        match out.status.code() {
            Some(0) => true,
            Some(1) => {
                eprintln!(
                    "  qemu-img compare {a} {b}: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                );
                false
            }
            _ => panic!(
                "qemu-img compare {a} {b} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Save the chain's current contents as `name` (qemu-img convert -O raw).
    pub fn truth(&self, image: &str, name: &str) {
        self.qemu_img(&["convert", "-O", "raw", image, name]);
    }

    /// A libvirt checkpoint XML `meta/NAME.xml` (disk vda, bitmap NAME).
    pub fn meta(&self, name: &str, parent: Option<&str>, time: u64) {
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

    pub fn json(&self, rel: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.p(rel)).unwrap())
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    /// `qemu-img info --output=json` of a file.
    pub fn info(&self, rel: &str) -> serde_json::Value {
        serde_json::from_slice(&self.qemu_img(&["info", "--output=json", "-U", rel])).unwrap()
    }

    /// `qemu-img map --output=json` of a chain.
    pub fn map(&self, rel: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_slice(&self.qemu_img(&["map", "--output=json", "-U", rel])).unwrap();
        v.as_array().unwrap().clone()
    }

    /// Bitmap names of an image.
    pub fn bitmaps(&self, rel: &str) -> Vec<String> {
        self.info(rel)["format-specific"]["data"]["bitmaps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The libvirt-style chain of the qcow2-bitmaps cookbook, section 9, with more kinds of
/// writes: vda-1 (c1, c2) <- vda-2 (c1, c2 continued, c3), and libvirt metadata for them.
pub fn make_chain(env: &Env) {
    env.qemu_img(&["create", "-q", "-f", "qcow2", "vda-1.qcow2", "64M"]);
    env.qemu_img(&["bitmap", "--add", "vda-1.qcow2", "c1"]);
    env.qemu_io("vda-1.qcow2", &["write -P 1 0 64k", "write -P 0x11 4M 1M"]);
    env.qemu_img(&["bitmap", "--add", "vda-1.qcow2", "c2"]);
    env.qemu_io(
        "vda-1.qcow2",
        &["write -P 2 1M 64k", "write -P 0x12 6M 256k"],
    );
    env.overlay("vda-1.qcow2", "vda-2.qcow2");
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

/// The repository's backup list.
pub fn backups(env: &Env, repo: &str) -> Vec<serde_json::Value> {
    env.json(&format!("{repo}/backup.json"))["backups"]
        .as_array()
        .unwrap()
        .clone()
}

/// Every structural promise of a repository: format 1; indexes; each file a clean qcow2
/// backed by the previous one (relative name, format qcow2), the oldest by nothing; an
/// incremental's own clusters exactly its changed bytes (zero runs as zero clusters, no data
/// there); returns the files, oldest first.
pub fn check_repo(env: &Env, repo: &str) -> Vec<String> {
    let j = env.json(&format!("{repo}/backup.json"));
    assert_eq!(j["format"], 1, "{j}");
    let b = j["backups"].as_array().unwrap();
    let mut files: Vec<String> = Vec::new();
    for (i, e) in b.iter().enumerate() {
        let file = e["file"].as_str().unwrap().to_string();
        let rel = format!("{repo}/{file}");
        mountutil::assert_check_clean(&env.p(&rel), &rel);
        let info = env.info(&rel);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], e["virtual_size"], "{rel}");
        assert_eq!(info["cluster-size"], e["cluster_size"], "{rel}");
        if i == 0 {
            assert_eq!(e["kind"], "full", "{e}");
            assert!(info["backing-filename"].is_null(), "{rel}: {info}");
        } else {
            assert_eq!(
                info["backing-filename"].as_str(),
                Some(files[i - 1].as_str()),
                "{rel} must name the previous backup, relatively"
            );
            assert_eq!(info["backing-filename-format"], "qcow2", "{rel}");
            assert!(e["index"].as_u64().unwrap() > b[i - 1]["index"].as_u64().unwrap());
        }
        if e["kind"] == "inc" {
            assert_eq!(e["since"], b[i - 1]["checkpoint"], "{e}");
            let own: Vec<_> = env
                .map(&rel)
                .into_iter()
                .filter(|m| m["depth"] == 0 && m["present"] == true)
                .collect();
            let sum = |zero: bool| -> u64 {
                own.iter()
                    .filter(|m| m["zero"] == zero && m["data"] != zero)
                    .map(|m| m["length"].as_u64().unwrap())
                    .sum()
            };
            assert_eq!(sum(false), e["data_bytes"].as_u64().unwrap(), "{rel}: data");
            assert_eq!(sum(true), e["zero_bytes"].as_u64().unwrap(), "{rel}: zeros");
            assert_eq!(
                sum(false) + sum(true),
                e["changed_bytes"].as_u64().unwrap(),
                "{rel}: an incremental holds exactly the changed clusters"
            );
            // Its size follows the changed data, not the disk: data + metadata (headers,
            // L1/L2 and refcount tables) of well under a MiB here.
            let stored = std::fs::metadata(env.p(&rel)).unwrap().len();
            assert!(
                stored <= sum(false) + (1 << 20),
                "{rel}: {stored} bytes stored for {} data",
                sum(false)
            );
        }
        files.push(file);
    }
    files
}

/// The whole check of `repo` after its backups: backup.json and its files (`check_repo`),
/// the mounted history against `truths` (a raw truth file a backup, oldest first) and
/// `ckptfs-backup verify`.
pub fn check_history(env: &Env, repo: &str, truths: &[&str]) {
    let files = check_repo(env, repo);
    let truths: Vec<String> = truths.iter().map(|t| t.to_string()).collect();
    check_mounted_history(env, repo, &files, &truths);
    env.ok("ckptfs-backup", &["verify", repo]);
}

/// `ckptfs REPO/<newest>`: the older backups are layer checkpoints named after their files,
/// each disk.img the truth at that backup; current/disk.img the newest. `truths[i]` is the
/// raw truth file of `files[i]`.
pub fn check_mounted_history(env: &Env, repo: &str, files: &[String], truths: &[String]) {
    let mnt = mountutil::mount_dir(&env.dir, &format!("{repo}-mnt"));
    let m = Mount::new(
        &env.p(&format!("{repo}/{}", files.last().unwrap())),
        &mnt,
        Some("ro"),
    );
    let cj = mountutil::read_json(&m.path("checkpoints.json"));
    let names = mountutil::ckpt_names(&cj);
    assert_eq!(
        names,
        files[..files.len() - 1].to_vec(),
        "every older backup is a layer checkpoint"
    );
    for (i, f) in files.iter().enumerate() {
        let disk = if i + 1 == files.len() {
            m.path("current/disk.img")
        } else {
            assert_eq!(mountutil::ckpt_entry(&cj, f)["kind"], "layer");
            m.path(&format!("{f}/disk.img"))
        };
        assert!(
            env.same(&truths[i], mountutil::s(&disk)),
            "mounted {repo}: point {f} differs from {}",
            truths[i]
        );
    }
    m.unmount();
    std::fs::remove_dir(&mnt).unwrap();
}

/// Offline image with libvirt metadata: full, writes of every kind, inc, an external snapshot
/// layer (bitmaps continued as libvirt does) and more writes, inc across the layers; the
/// repository checked, mounted and compared at every point; verify; restores of every point
/// (raw, qcow2, into an -o rw mount); prune; a damaged file found by verify.
#[test]
fn backup_repo_end_to_end() {
    let env = Env::new();
    make_chain(&env);
    let meta = env.p("meta");
    let meta = meta.to_str().unwrap();

    let r = env.ok(
        "ckptfs-backup",
        &[
            "full",
            "vda-2.qcow2",
            "repo",
            "--checkpoints",
            meta,
            "--name",
            "bk1",
        ],
    );
    assert!(r.stdout.starts_with("full: "), "{}", r.stdout);
    env.truth("vda-2.qcow2", "t1.raw");
    assert!(env.bitmaps("vda-2.qcow2").contains(&"bk1".to_string()));
    let b = backups(&env, "repo");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0]["checkpoint"], "bk1");
    assert_eq!(b[0]["since"], serde_json::Value::Null);
    assert_eq!(b[0]["sha256_of"], "disk");

    // Writes after bk1: overwrite data, zero a base cluster, write zero bytes as data,
    // discard, write at the end of the disk.
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
    let r = env.ok(
        "ckptfs-backup",
        &["inc", "vda-2.qcow2", "repo", "--checkpoints", meta],
    );
    assert!(r.stdout.contains("since 'bk1'"), "{}", r.stdout);
    env.truth("vda-2.qcow2", "t2.raw");
    let b = backups(&env, "repo");
    assert_eq!(b[1]["kind"], "inc");
    assert!(b[1]["zero_bytes"].as_u64().unwrap() >= 2 << 16, "{}", b[1]);

    // libvirt's external snapshot: vda-3 continues every bitmap; more writes.
    env.overlay("vda-2.qcow2", "vda-3.qcow2");
    for bm in env.bitmaps("vda-2.qcow2") {
        env.qemu_img(&["bitmap", "--add", "vda-3.qcow2", &bm]);
    }
    env.qemu_io(
        "vda-3.qcow2",
        &[
            "write -P 5 20M 192k",
            "write -z 8M 64k",
            "write -P 0 12M 64k",
            "discard 62M 512k",
            "write -P 0x55 0 4k",
        ],
    );
    env.ok(
        "ckptfs-backup",
        &[
            "inc",
            "vda-3.qcow2",
            "repo",
            "--checkpoints",
            meta,
            "--quiet",
        ],
    );
    env.truth("vda-3.qcow2", "t3.raw");
    // A fourth point with nothing changed: an empty incremental.
    env.ok("ckptfs-backup", &["inc", "vda-3.qcow2", "repo"]);
    let truths: Vec<String> = ["t1.raw", "t2.raw", "t3.raw", "t3.raw"]
        .map(String::from)
        .to_vec();
    assert_eq!(backups(&env, "repo")[3]["changed_bytes"], 0);

    let files = check_repo(&env, "repo");
    assert_eq!(files.len(), 4);
    check_mounted_history(&env, "repo", &files, &truths);
    let v = env.ok("ckptfs-backup", &["verify", "repo"]);
    assert!(v.stdout.contains("4 backup(s)"), "{}", v.stdout);

    // Restores of every point, raw and qcow2 (standalone).
    for (i, t) in truths.iter().enumerate() {
        let at = (i + 1).to_string();
        let raw = format!("r{at}.raw");
        env.ok("ckptfs-restore", &["repo", &raw, "--at", &at]);
        assert!(env.same(t, &raw), "restore --at {at}");
        let q = format!("r{at}.qcow2");
        env.ok(
            "ckptfs-restore",
            &["repo", &q, "--at", &at, "--format", "qcow2", "--quiet"],
        );
        assert!(env.same(t, &q), "restore --at {at} --format qcow2");
        assert!(env.info(&q)["backing-filename"].is_null());
    }
    env.ok("ckptfs-restore", &["repo", "newest.raw"]);
    assert!(env.same("t3.raw", "newest.raw"));

    // Into a writable mount of an image that holds other data: point 2, exactly.
    env.qemu_img(&["create", "-q", "-f", "qcow2", "target.qcow2", "64M"]);
    env.qemu_io("target.qcow2", &["write -P 0x77 0 64M"]);
    let mnt = mountutil::mount_dir(&env.dir, "rw-mnt");
    let m = Mount::new(&env.p("target.qcow2"), &mnt, Some("rw"));
    let r = env.ok(
        "ckptfs-restore",
        &["repo", "--into-mount", mountutil::s(&mnt), "--at", "2"],
    );
    assert!(!r.stderr.contains("not a mount point"), "{}", r.stderr);
    m.unmount();
    assert!(env.same("t2.raw", "target.qcow2"));
    mountutil::assert_check_clean(&env.p("target.qcow2"), "target after --into-mount");

    // Restore errors: one line each.
    env.fails("ckptfs-restore", &["repo", "newest.raw"], "exists");
    env.fails(
        "ckptfs-restore",
        &["repo", "x.raw", "--at", "9"],
        "no backup 9",
    );
    env.fails("ckptfs-restore", &["nosuch", "x.raw"], "nosuch");

    // A damaged data cluster of backup 3: verify names the file; the others still restore.
    common::run_in(Some(&env.dir), "cp", &["-a", "repo", "bad"]);
    let f3 = format!("bad/{}", files[2]);
    let host = env
        .map(&f3)
        .into_iter()
        .find(|m| m["depth"] == 0 && m["data"] == true)
        .expect("a data cluster in backup 3")["offset"]
        .as_u64()
        .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(env.p(&f3))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\xde\xad", host).unwrap();
    drop(f);
    env.fails("ckptfs-backup", &["verify", "bad"], &files[2]);
    // backup.json and the files disagree: verify says so.
    common::run_in(Some(&env.dir), "cp", &["-a", "repo", "bad2"]);
    let mut j = env.json("bad2/backup.json");
    j["backups"][1]["data_bytes"] = serde_json::json!(12345);
    std::fs::write(env.p("bad2/backup.json"), j.to_string()).unwrap();
    env.fails(
        "ckptfs-backup",
        &["verify", "bad2"],
        "backup.json says 12345",
    );

    // prune --keep 2: backups 1 and 2 merge into 3 (now a full, standalone), every remaining
    // point still byte-identical; the merged files are gone.
    let r = env.ok("ckptfs-backup", &["prune", "repo", "--keep", "2"]);
    assert!(r.stdout.contains("merged 2"), "{}", r.stdout);
    let b = backups(&env, "repo");
    assert_eq!(b.len(), 2);
    assert_eq!(b[0]["index"], 3);
    assert_eq!(b[0]["kind"], "full");
    let pruned = check_repo(&env, "repo");
    assert_eq!(pruned, files[2..].to_vec());
    assert!(!env.p(&format!("repo/{}", files[0])).exists());
    assert!(!env.p(&format!("repo/{}", files[1])).exists());
    check_mounted_history(&env, "repo", &pruned, &truths[2..]);
    env.ok("ckptfs-backup", &["verify", "repo"]);
    let r = env.ok("ckptfs-backup", &["prune", "repo", "--keep", "5"]);
    assert!(r.stdout.contains("nothing to merge"), "{}", r.stdout);

    // The chain goes on after a prune.
    env.qemu_io("vda-3.qcow2", &["write -P 0x66 30M 64k"]);
    env.ok(
        "ckptfs-backup",
        &["inc", "vda-3.qcow2", "repo", "--checkpoints", meta],
    );
    env.truth("vda-3.qcow2", "t5.raw");
    let files = check_repo(&env, "repo");
    check_mounted_history(
        &env,
        "repo",
        &files,
        &["t3.raw", "t3.raw", "t5.raw"].map(String::from),
    );
}

/// Refusals and errors: one line on stderr naming the problem, exit 1 (2 for usage), nothing
/// left mounted, no half backup.
#[test]
fn backup_refusals_are_one_line() {
    let env = Env::new();
    std::fs::write(env.p("empty.img"), b"").unwrap();
    env.fails("ckptfs-backup", &["full", "empty.img", "r0"], "ckptfs: ");
    env.fails(
        "ckptfs-backup",
        &["full", "missing.qcow2", "r0"],
        "missing.qcow2",
    );
    env.fails("ckptfs-backup", &["verify", "nosuchdir"], "nosuchdir");
    for (s, a) in [
        ("ckptfs-backup", &["frobnicate"][..]),
        ("ckptfs-backup", &["full", "x"][..]),
        ("ckptfs-backup", &["prune", "r"][..]),
        ("ckptfs-backup", &["verify", "r", "--name", "x"][..]),
        ("ckptfs-backup", &["inc", "x", "r", "--name", "c"][..]),
        ("ckptfs-restore", &["--bogus", "a", "b"][..]),
        (
            "ckptfs-restore",
            &["r", "--into-mount", "d", "--format", "raw"][..],
        ),
    ] {
        let r = env.script(s, a);
        assert_eq!(r.code, Some(2), "{s} {a:?}: {r:?}");
    }

    env.qemu_img(&["create", "-q", "-f", "qcow2", "d.qcow2", "8M"]);
    env.qemu_io("d.qcow2", &["write -P 7 1M 64k"]);
    env.fails(
        "ckptfs-backup",
        &["inc", "d.qcow2", "r1"],
        "full backup first",
    );
    env.ok("ckptfs-backup", &["full", "d.qcow2", "r1", "--name", "k1"]);
    env.fails(
        "ckptfs-backup",
        &["full", "d.qcow2", "r1"],
        "already holds 1",
    );
    // The checkpoint the next incremental needs is gone: refused, a full is needed.
    env.qemu_img(&["bitmap", "--remove", "d.qcow2", "k1"]);
    let e = env.fails("ckptfs-backup", &["inc", "d.qcow2", "r1"], "'k1' is gone");
    assert!(e.contains("full backup is needed"), "{e}");
    // ... or invalid (in use after a crash).
    env.ok("ckptfs-backup", &["full", "d.qcow2", "r2", "--name", "k2"]);
    common::set_bitmap_in_use(&env.p("d.qcow2"), "k2");
    let e = env.fails(
        "ckptfs-backup",
        &["inc", "d.qcow2", "r2"],
        "'k2' is not valid",
    );
    assert!(e.contains("full backup is needed"), "{e}");
    // Neither refusal left a file, a checkpoint or a pending note behind.
    for repo in ["r1", "r2"] {
        assert_eq!(backups(&env, repo).len(), 1);
        let names: Vec<String> = std::fs::read_dir(env.p(repo))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock" && n != "backup.json" && !n.starts_with("0001-"))
            .collect();
        assert!(names.is_empty(), "{repo}: left {names:?}");
    }
    assert_eq!(env.bitmaps("d.qcow2"), vec!["k2".to_string()]);

    // One backup of a disk at a time: a second one (any REPO) is refused while the first
    // waits in its hook before the copy (nothing of it mounted then).
    env.qemu_img(&["create", "-q", "-f", "qcow2", "e.qcow2", "8M"]);
    let logs = common::tempdir();
    let hook = r#"f() { [ "$1" != copy ] || { touch hooked; sleep 3; }; }; f"#;
    let mut first = env
        .command(
            "ckptfs-backup",
            &["full", "e.qcow2", "r3", "--hook", hook],
            &logs.path().join("out"),
            &logs.path().join("err"),
        )
        .env("TMPDIR", logs.path())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !env.p("hooked").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first backup never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.fails(
        "ckptfs-backup",
        &["full", "e.qcow2", "r4"],
        "another ckptfs-backup",
    );
    assert!(first.wait().unwrap().success(), "the first backup");
    assert!(!env.p("r4/backup.json").exists());
    assert_eq!(backups(&env, "r3").len(), 1);
}

/// REPO on a small file system: the incremental that does not fit fails at the copy step with
/// one line, leaves no half backup (no file, backup.json unchanged) and no extra checkpoint;
/// with room again the next run succeeds and the history is exact.
#[test]
fn backup_repo_full_recovers() {
    let env = Env::new();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "d.qcow2", "64M"]);
    env.qemu_io("d.qcow2", &["write -P 1 0 1M"]);
    let repo = mountutil::mount_dir(&env.dir, "small");
    common::run(
        "mount",
        &["-t", "tmpfs", "-o", "size=4m", "tmpfs", mountutil::s(&repo)],
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(repo.clone());
    env.ok("ckptfs-backup", &["full", "d.qcow2", "small", "--quiet"]);
    env.truth("d.qcow2", "t1.raw");
    let before = std::fs::read(repo.join("backup.json")).unwrap();
    env.qemu_io("d.qcow2", &["write -P 2 8M 6M", "write -z 0 64k"]);
    env.fails("ckptfs-backup", &["inc", "d.qcow2", "small"], "copy: ");
    assert_eq!(std::fs::read(repo.join("backup.json")).unwrap(), before);
    let left: Vec<String> = std::fs::read_dir(&repo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left.len(),
        3,
        "only .lock, backup.json and the full: {left:?}"
    );
    assert_eq!(
        env.bitmaps("d.qcow2").len(),
        1,
        "the failed run's checkpoint is gone"
    );

    common::run("mount", &["-o", "remount,size=32m", mountutil::s(&repo)]);
    env.ok("ckptfs-backup", &["inc", "d.qcow2", "small"]);
    env.truth("d.qcow2", "t2.raw");
    check_history(&env, "small", &["t1.raw", "t2.raw"]);
}

/// Start a script in its own process group and SIGKILL the group (script, dd, ckptfs daemon)
/// as soon as `ready` holds; returns whether it was killed before it ended by itself.
pub fn kill_when(env: &Env, script: &str, args: &[&str], ready: impl Fn() -> bool) -> bool {
    use std::os::unix::process::CommandExt;
    let logs = common::tempdir();
    let (out_p, err_p) = (logs.path().join("out"), logs.path().join("err"));
    let mut child = env
        .command(script, args, &out_p, &err_p)
        .process_group(0)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let killed = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        if ready() {
            // SAFETY: kill(2) of the process group this test just created (pgid = child's pid).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            break true;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{script} {args:?}: the moment to kill never came"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    child.wait().unwrap();
    env.sweep();
    killed
}

/// A file in `dir` whose name ends with `.part`, larger than `min` bytes.
pub fn part_bigger(dir: &Path, min: u64) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            e.file_name().to_string_lossy().ends_with(".part")
                && e.metadata().is_ok_and(|m| m.len() > min)
        })
    })
}

/// An offline incremental SIGKILLed in the middle of its copy: the next run removes the half
/// file and the dead run's checkpoint, and takes a complete, exact incremental.
#[test]
fn backup_killed_mid_copy_recovers() {
    let env = Env::new();
    env.qemu_img(&["create", "-q", "-f", "qcow2", "d.qcow2", "128M"]);
    env.qemu_io("d.qcow2", &["write -P 1 0 1M"]);
    env.ok("ckptfs-backup", &["full", "d.qcow2", "repo", "--quiet"]);
    env.truth("d.qcow2", "t1.raw");
    env.qemu_io("d.qcow2", &["write -P 2 8M 96M"]);
    let repo = env.p("repo");
    let killed = kill_when(&env, "ckptfs-backup", &["inc", "d.qcow2", "repo"], || {
        part_bigger(&repo, 4 << 20)
    });
    assert!(
        killed,
        "the incremental ended before it could be killed mid-copy"
    );
    assert_eq!(
        backups(&env, "repo").len(),
        1,
        "no half backup in the history"
    );
    assert_eq!(
        env.bitmaps("d.qcow2").len(),
        2,
        "the dead run's checkpoint is there"
    );

    env.ok("ckptfs-backup", &["inc", "d.qcow2", "repo", "--quiet"]);
    env.truth("d.qcow2", "t2.raw");
    assert!(
        !std::fs::read_dir(&repo).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".part")),
        "the half file is gone"
    );
    assert_eq!(
        env.bitmaps("d.qcow2").len(),
        1,
        "only the next incremental's checkpoint: the dead run's is gone, the old one retired"
    );
    check_history(&env, "repo", &["t1.raw", "t2.raw"]);
}

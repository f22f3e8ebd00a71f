//! ckptfs-backup on a running libvirt domain: a private libvirtd (its own mount namespace, no
//! systemd, stopped by PID) and a real QEMU guest (KVM where it works, else TCG) that boots
//! nothing; guest writes through `qemu-io` in the HMP monitor, applied as well to a raw model
//! of the disk with `qemu-io -f raw` (the truth at each backup; checked against the real disk
//! after shutdown). The disk is a two-layer chain. Full, incrementals with data, zero writes
//! and discards, every point of the mounted repository byte-identical; afterwards the chain as
//! it was (base never written), `qemu-img check` clean, no bitmap in use, sane checkpoints.
//! Failures: the copy killed mid-way, REPO full, the VM destroyed mid-backup, the commit
//! refused; each time the chain ends committed and the next run succeeds.
//!
//! Without libvirtd installed the tests say SKIP, except under CI=true where they fail
//! (`.ci/run` installs it).

use crate::backup::{self, Env};
use crate::common;
use crate::mountutil::{self, Ran};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DOM: &str = "ckptfs-bk";

/// A private libvirtd in its own mount namespace; Drop destroys the domain, stops libvirtd by
/// PID and waits for the namespace holder.
struct Libvirt {
    holder: Child,
    state: PathBuf,
    pid: u32,
    dir: PathBuf,
}

impl Libvirt {
    /// Start it for `env` (whose scripts then run in its namespace); None (SKIP) when libvirt
    /// is not installed and this is not CI.
    fn start(env: &mut Env, test: &str) -> Option<Libvirt> {
        let have = [
            "/usr/sbin/libvirtd",
            "/usr/bin/virsh",
            "/usr/bin/qemu-system-x86_64",
        ]
        .iter()
        .all(|p| Path::new(p).exists());
        if !have {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "libvirt::{test}: libvirtd, virsh or qemu-system-x86_64 missing under CI=true \
                 (.ci/run installs them)"
            );
            eprintln!("SKIP libvirt::{test}: libvirtd, virsh or qemu-system-x86_64 not installed");
            return None;
        }
        let state = env.p("libvirt");
        std::fs::create_dir(&state).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/libvirt-ns.sh");
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash"])
            .arg(&script)
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let mut lv = Libvirt {
            holder,
            state: state.clone(),
            pid: 0,
            dir: env.dir.clone(),
        };
        let start = Instant::now();
        while !state.join("ready").exists() {
            if let Ok(e) = std::fs::read_to_string(state.join("error")) {
                panic!("libvirt::{test}: the private libvirtd did not start: {e}");
            }
            if let Some(st) = lv.holder.try_wait().unwrap() {
                panic!("libvirt::{test}: libvirt-ns.sh ended ({st}) before libvirtd answered");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "libvirt::{test}: libvirtd did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lv.pid = std::fs::read_to_string(state.join("libvirtd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        env.enter_namespace(lv.pid);
        env.vars
            .borrow_mut()
            .push(("LIBVIRT_DEFAULT_URI".into(), "qemu:///system".into()));
        Some(lv)
    }

    /// `virsh ARGS` in the namespace: (ok, stdout + stderr).
    fn try_virsh(&self, args: &[&str]) -> Ran {
        let ns = format!("--mount=/proc/{}/ns/mnt", self.pid);
        let wd = format!("--wd={}", self.dir.display());
        let mut a = vec![
            ns.as_str(),
            wd.as_str(),
            "--",
            "virsh",
            "-c",
            "qemu:///system",
        ];
        a.extend_from_slice(args);
        mountutil::run_files(None, "nsenter", &a)
    }

    fn virsh(&self, args: &[&str]) -> String {
        let r = self.try_virsh(args);
        assert!(r.ok, "virsh {args:?}: {}{}", r.stdout, r.stderr);
        r.stdout
    }

    /// Define and start the domain on `image` (KVM, else TCG when KVM does not start).
    fn start_domain(&self, image: &Path) {
        for kind in ["kvm", "qemu"] {
            let xml = format!(
                "<domain type='{kind}'>\n  <name>{DOM}</name>\n  <memory unit='MiB'>128</memory>\n\
                 <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='q35'>hvm</type></os>\n\
                 <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n\
                 <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' \
                 discard='unmap'/>\n      <source file='{}'/>\n      <target dev='vda' \
                 bus='virtio'/>\n    </disk>\n    <controller type='usb' model='none'/>\n\
                 <memballoon model='none'/>\n  </devices>\n</domain>\n",
                image.display()
            );
            let path = self.state.join("dom.xml");
            std::fs::write(&path, xml).unwrap();
            // Without usable KVM, libvirt refuses type kvm at define or at start.
            let r = self.try_virsh(&["define", mountutil::s(&path)]);
            if !r.ok {
                eprintln!("  domain type {kind} refused: {}", r.stderr.trim());
                continue;
            }
            let r = self.try_virsh(&["start", DOM]);
            if r.ok {
                eprintln!("  domain {DOM} started ({kind})");
                return;
            }
            eprintln!("  domain type {kind} did not start: {}", r.stderr.trim());
            self.virsh(&["undefine", DOM]);
        }
        panic!("the test domain starts neither with KVM nor with TCG");
    }

    /// The qdev of the domain's disk (blockdev mode has no drive name).
    fn qdev(&self) -> String {
        let out = self.virsh(&["qemu-monitor-command", DOM, r#"{"execute":"query-block"}"#]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["return"][0]["qdev"].as_str().unwrap().to_string()
    }

    /// The disk's source files, top first, as libvirt has them now.
    fn sources(&self) -> Vec<String> {
        self.virsh(&["domblklist", DOM, "--details"])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 4 && f[1] == "disk").then(|| f[3].to_string())
            })
            .collect()
    }

    fn checkpoints(&self) -> Vec<String> {
        self.virsh(&["checkpoint-list", DOM, "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    fn state(&self) -> String {
        self.virsh(&["domstate", DOM]).trim().to_string()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // Whatever a killed script left mounted in the namespace, then the guest, then
        // libvirtd (by PID); the holder ends with it.
        let mounts =
            std::fs::read_to_string(format!("/proc/{}/mounts", self.pid)).unwrap_or_default();
        for m in mounts.lines().filter(|l| l.contains("fuse.ckptfs")) {
            if let Some(p) = m.split(' ').nth(1) {
                let ns = format!("--mount=/proc/{}/ns/mnt", self.pid);
                common::run_status_in(None, "nsenter", &[ns.as_str(), "umount", "-l", p]);
                mountutil::reap_daemons(Path::new(p), Duration::from_secs(10));
            }
        }
        let _ = self.try_virsh(&["destroy", DOM]);
        if let Ok(q) = std::fs::read_to_string(self.state.join(format!("run/qemu/{DOM}.pid"))) {
            if let Ok(qpid) = q.trim().parse::<i32>() {
                if !mountutil::wait_pid_gone(qpid, Duration::from_secs(10)) {
                    // SAFETY: kill(2) of the QEMU this test's libvirtd started, by its PID file.
                    unsafe { libc::kill(qpid, libc::SIGKILL) };
                }
            }
        }
        // SAFETY: kill(2) of the libvirtd this test started, by its PID file.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let start = Instant::now();
        while self.holder.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                // SAFETY: as above, the same libvirtd.
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                let _ = self.holder.kill();
                let _ = self.holder.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The guest's disk and its raw model: every write goes to both.
struct Guest<'a> {
    lv: &'a Libvirt,
    env: &'a Env,
    qdev: String,
}

impl<'a> Guest<'a> {
    /// The running domain's disk, as QEMU names its device.
    fn new(lv: &'a Libvirt, env: &'a Env) -> Guest<'a> {
        Guest {
            lv,
            env,
            qdev: lv.qdev(),
        }
    }

    /// `qemu-io` commands in the guest (HMP) and on model.raw.
    fn io(&self, cmds: &[&str]) {
        for c in cmds {
            let out = self.lv.virsh(&[
                "qemu-monitor-command",
                DOM,
                "--hmp",
                &format!("qemu-io -d {} \"{c}\"", self.qdev),
            ]);
            assert!(out.trim().is_empty(), "qemu-io {c}: {out}");
            // The same bytes on the model (raw has no compressed writes).
            let plain = c.replace("write -c ", "write ");
            common::run_in(
                Some(&self.env.dir),
                "qemu-io",
                &["-f", "raw", "-c", &plain, "model.raw"],
            );
        }
    }

    /// Save the model as the truth of the backup just taken.
    fn truth(&self, name: &str) {
        std::fs::copy(self.env.p("model.raw"), self.env.p(name)).unwrap();
    }
}

/// A 64 MiB disk that is a two-layer chain (base.qcow2 <- vm.qcow2, as after an earlier
/// snapshot: the backups must leave it so), its raw model, libvirtd and the running domain.
fn setup(test: &str, env: &mut Env) -> Option<Libvirt> {
    let lv = Libvirt::start(env, test)?;
    env.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    env.qemu_io("base.qcow2", &["write -P 0x11 0 2M"]);
    env.overlay("base.qcow2", "vm.qcow2");
    env.qemu_io("vm.qcow2", &["write -P 0x12 32M 1M"]);
    env.qemu_img(&["create", "-q", "-f", "raw", "model.raw", "64M"]);
    common::run_in(
        Some(&env.dir),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 2M",
            "-c",
            "write -P 0x12 32M 1M",
            "model.raw",
        ],
    );
    std::fs::copy(env.p("base.qcow2"), env.p("base.orig")).unwrap();
    lv.start_domain(&env.p("vm.qcow2"));
    Some(lv)
}

/// After shutdown (SIGTERM: QEMU stores its bitmaps): the chain as it was, `qemu-img check` clean, no
/// bitmap in use, the disk equal to the model, no overlay left, and the domain's checkpoints
/// exactly the one the newest backup recorded.
fn check_domain_after(env: &Env, lv: &Libvirt, repo: &str) {
    assert_eq!(
        lv.sources(),
        vec![mountutil::s(&env.p("vm.qcow2")).to_string()]
    );
    assert!(
        !env.p("vm.qcow2.ckptfs-backup.qcow2").exists(),
        "overlay left"
    );
    let last = backup::backups(env, repo).last().unwrap()["checkpoint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(lv.checkpoints(), vec![last.clone()], "checkpoint-list");
    if lv.state() == "running" {
        lv.virsh(&["destroy", DOM]);
    }
    mountutil::assert_check_clean(&env.p("vm.qcow2"), "the domain's disk after the backups");
    let info = env.info("vm.qcow2");
    assert_eq!(
        info["backing-filename"], "base.qcow2",
        "the chain is as it was: commits went into vm.qcow2 only"
    );
    assert_eq!(
        std::fs::read(env.p("base.qcow2")).unwrap(),
        std::fs::read(env.p("base.orig")).unwrap(),
        "base.qcow2 never written"
    );
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap();
    assert_eq!(bitmaps.len(), 1, "{info}");
    assert_eq!(bitmaps[0]["name"], last.as_str());
    assert!(
        !bitmaps[0]["flags"].to_string().contains("in-use"),
        "{info}"
    );
    assert!(
        env.same("model.raw", "vm.qcow2"),
        "the model is the guest's disk"
    );
}

/// An incremental of the domain into `repo` after a run that died mid-commit: it first
/// finishes that block commit, and says so.
fn inc_finishing_commit(env: &Env, repo: &str) {
    let r = env.ok("ckptfs-backup", &["inc", "--domain", DOM, repo]);
    assert!(
        r.stderr.contains("finishing the block commit"),
        "{}",
        r.stderr
    );
}

/// The whole loop on a running domain.
#[test]
fn live_backup_loop() {
    let mut env = Env::new();
    let Some(lv) = setup("live_backup_loop", &mut env) else {
        return;
    };
    let g = Guest::new(&lv, &env);
    env.fails(
        "ckptfs-backup",
        &["full", "--domain", "nosuch", "repo"],
        "domain: ",
    );
    env.fails(
        "ckptfs-backup",
        &["full", "--domain", DOM, "--disk", "vdz", "repo"],
        "no disk vdz (disks: vda)",
    );
    let r = env.ok("ckptfs-backup", &["full", "--domain", DOM, "repo"]);
    assert!(r.stdout.contains("snapshot"), "{}", r.stdout);
    g.truth("t1.raw");
    assert_eq!(lv.sources().len(), 1);

    g.io(&[
        "write -P 0x21 4M 1M",
        "write -z 1M 64k",
        "discard 32M 128k",
        "write -P 0x22 8M 4k",
        "write -P 0 10M 64k",
    ]);
    let r = env.ok(
        "ckptfs-backup",
        &["inc", "--domain", DOM, "repo", "--quiet"],
    );
    assert!(r.stdout.contains("commit"), "{}", r.stdout);
    g.truth("t2.raw");
    g.io(&[
        "write -P 0x31 4M 64k",
        "write -z 8M 192k",
        "discard 0 256k",
        "write -c -P 0x32 20M 128k",
        "write -P 0x33 63M 1M",
        "write -z -u 40M 64k",
    ]);
    env.ok("ckptfs-backup", &["inc", "--domain", DOM, "repo"]);
    g.truth("t3.raw");

    let b = backup::backups(&env, "repo");
    assert_eq!(b.len(), 3);
    assert!(b.iter().all(|e| e["live"] == true), "{b:?}");
    // 16 + 1 + 2 + 1 + 1 clusters written, zeroed or discarded.
    assert_eq!(b[1]["changed_bytes"], 21 << 16, "{}", b[1]);
    backup::check_history(&env, "repo", &["t1.raw", "t2.raw", "t3.raw"]);
    env.ok("ckptfs-restore", &["repo", "r2.raw", "--at", "2"]);
    assert!(env.same("t2.raw", "r2.raw"));
    check_domain_after(&env, &lv, "repo");

    // Shut off: the same domain backs up offline (its image, checkpoint by mkdir).
    common::run_in(
        Some(&env.dir),
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x41 12M 64k", "vm.qcow2"],
    );
    common::run_in(
        Some(&env.dir),
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x41 12M 64k", "model.raw"],
    );
    let r = env.ok("ckptfs-backup", &["inc", "--domain", DOM, "repo"]);
    assert!(r.stdout.contains("snapshot 0.00"), "{}", r.stdout);
    std::fs::copy(env.p("model.raw"), env.p("t4.raw")).unwrap();
    // libvirt knows the checkpoint taken offline (redefined), so the next live backup's
    // snapshot and commit carry it: started again, written, backed up live, exact.
    assert_eq!(
        lv.checkpoints(),
        vec![backup::backups(&env, "repo")[3]["checkpoint"]
            .as_str()
            .unwrap()
            .to_string()]
    );
    lv.virsh(&["start", DOM]);
    let g = Guest::new(&lv, &env);
    g.io(&["write -P 0x42 14M 128k", "write -z 2M 64k"]);
    env.ok("ckptfs-backup", &["inc", "--domain", DOM, "repo"]);
    g.truth("t5.raw");
    let files = backup::check_repo(&env, "repo");
    assert_eq!(files.len(), 5);
    backup::check_mounted_history(
        &env,
        "repo",
        &files,
        &["t1.raw", "t2.raw", "t3.raw", "t4.raw", "t5.raw"].map(String::from),
    );
    check_domain_after(&env, &lv, "repo");
}

/// Failures on a running domain: the copy killed mid-way, REPO full, the VM destroyed in the
/// middle of a backup; each time the domain ends on one committed layer and the next run
/// produces an exact backup.
#[test]
fn live_backup_failures_recover() {
    let mut env = Env::new();
    // A small REPO file system, mounted before libvirtd's namespace is made so that the
    // scripts (in it) and the test (outside) see the same one; a remount resizes both.
    let small = mountutil::mount_dir(&env.dir, "small");
    common::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            mountutil::s(&small),
        ],
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let Some(lv) = setup("live_backup_failures_recover", &mut env) else {
        return;
    };
    let g = Guest::new(&lv, &env);
    env.ok(
        "ckptfs-backup",
        &["full", "--domain", DOM, "small", "--quiet"],
    );
    g.truth("t1.raw");

    // 1. REPO full: the copy fails, the overlay is committed back, the new checkpoint deleted.
    g.io(&["write -P 0x51 8M 8M"]);
    let e = env.fails(
        "ckptfs-backup",
        &["inc", "--domain", DOM, "small"],
        "copy: ",
    );
    eprintln!("  {e}");
    assert_eq!(backup::backups(&env, "small").len(), 1);
    assert_eq!(
        lv.sources(),
        vec![mountutil::s(&env.p("vm.qcow2")).to_string()]
    );
    assert!(!env.p("vm.qcow2.ckptfs-backup.qcow2").exists());
    assert_eq!(
        lv.checkpoints().len(),
        1,
        "the failed run's checkpoint is gone"
    );
    common::run("mount", &["-o", "remount,size=64m", mountutil::s(&small)]);
    env.ok("ckptfs-backup", &["inc", "--domain", DOM, "small"]);
    g.truth("t2.raw");

    // 2. Killed (SIGKILL, the whole process group) in the middle of the copy: the domain
    // runs on the overlay; the next run commits it, drops the dead run's checkpoint and
    // half file, and backs up.
    g.io(&["write -P 0x61 0 48M"]);
    let killed = backup::kill_when(
        &env,
        "ckptfs-backup",
        &["inc", "--domain", DOM, "small"],
        || backup::part_bigger(&small, 4 << 20),
    );
    assert!(
        killed,
        "the incremental ended before it could be killed mid-copy"
    );
    env.unmount_left();
    assert_eq!(backup::backups(&env, "small").len(), 2);
    let src = lv.sources();
    assert!(
        src[0].ends_with(".ckptfs-backup.qcow2"),
        "the killed run left the domain on its overlay: {src:?}"
    );
    g.io(&["write -P 0x62 60M 64k"]);
    inc_finishing_commit(&env, "small");
    g.truth("t3.raw");
    assert_eq!(
        lv.sources(),
        vec![mountutil::s(&env.p("vm.qcow2")).to_string()]
    );
    assert_eq!(lv.checkpoints().len(), 1);

    // 3. The VM destroyed mid-backup (by the hook before the copy): the copy reads the frozen
    // layer, the commit is done offline (bitmaps merged, the definition pointed back at the
    // base); the domain starts again and the next incremental since that checkpoint is exact.
    g.io(&["write -P 0x71 16M 1M", "write -z 0 64k"]);
    let hook = format!("f() {{ [ \"$1\" != copy ] || virsh destroy {DOM} >/dev/null; }}; f");
    env.ok(
        "ckptfs-backup",
        &["inc", "--domain", DOM, "small", "--hook", &hook],
    );
    g.truth("t4.raw");
    assert_eq!(lv.state(), "shut off");
    assert!(!env.p("vm.qcow2.ckptfs-backup.qcow2").exists());
    assert!(
        !lv.virsh(&["dumpxml", "--inactive", DOM])
            .contains("ckptfs-backup.qcow2"),
        "the definition names the base again"
    );
    mountutil::assert_check_clean(&env.p("vm.qcow2"), "after the offline commit");
    assert!(env.same("model.raw", "vm.qcow2"));
    lv.virsh(&["start", DOM]);
    let g = Guest::new(&lv, &env);
    g.io(&["write -P 0x81 24M 64k"]);
    env.ok("ckptfs-backup", &["inc", "--domain", DOM, "small"]);
    g.truth("t5.raw");

    // 4. The block commit refused (a virsh that fails blockcommit, as $VIRSH): retried, then
    // one line naming the step, no backup published, the domain left on the overlay; the
    // next run (the real virsh) commits it and backs up.
    g.io(&["write -P 0x91 28M 256k"]);
    let fake = env.p("fake-virsh");
    std::fs::write(
        &fake,
        r#"#!/bin/sh
[ "$1" != blockcommit ] || { echo 'error: refused for the test' >&2; exit 1; }
exec virsh "$@"
"#,
    )
    .unwrap();
    common::run("chmod", &["755", mountutil::s(&fake)]);
    env.vars
        .borrow_mut()
        .push(("VIRSH".into(), mountutil::s(&fake).into()));
    let e = env.fails(
        "ckptfs-backup",
        &["inc", "--domain", DOM, "small"],
        "commit: ",
    );
    assert!(e.contains("refused for the test"), "{e}");
    env.vars.borrow_mut().pop();
    assert_eq!(backup::backups(&env, "small").len(), 5);
    assert!(lv.sources()[0].ends_with(".ckptfs-backup.qcow2"));
    inc_finishing_commit(&env, "small");
    g.truth("t6.raw");

    backup::check_history(
        &env,
        "small",
        &["t1.raw", "t2.raw", "t3.raw", "t4.raw", "t5.raw", "t6.raw"],
    );
    check_domain_after(&env, &lv, "small");
}

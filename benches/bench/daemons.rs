//! The daemons measured: ckptfs, qemu-storage-daemon's FUSE export, qemu-nbd.

use super::*;

/// A ckptfs daemon (`ckptfs -f IMAGE DIR`) serving DIR.
pub struct Ckptfs {
    pub pid: i32,
    pub dir: PathBuf,
    pub log: PathBuf,
    /// Spawn to mount.
    pub mount_secs: f64,
    pub _guard: Guard,
}

impl Ckptfs {
    pub fn start(cfg: &Cfg, image: &Path, dir: &Path) -> Res<Ckptfs> {
        Ckptfs::start_with(cfg, image, dir, "")
    }

    /// `start` with more mount options (`extra`, e.g. "rw,").
    pub fn start_with(cfg: &Cfg, image: &Path, dir: &Path, extra: &str) -> Res<Ckptfs> {
        fs::create_dir_all(dir)?;
        let log = dir.with_extension("log");
        let err = File::create(&log)?;
        let opts = format!("{extra}cache_mb={}", cfg.cache_mb);
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
    pub fn memory(&self) -> (f64, f64) {
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

    pub fn stats(&self) -> Res<serde_json::Value> {
        let f = self.dir.join("stats.json");
        let text = with_timeout(Duration::from_secs(30), "stats.json", move || {
            Ok(fs::read_to_string(f)?)
        })?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Peak RSS over every ckptfs mount, per chain.
pub static PEAK_MEM: Mutex<BTreeMap<String, f64>> = Mutex::new(BTreeMap::new());

pub fn note_memory(chain: &str, m: &Ckptfs) {
    let (hwm, _) = m.memory();
    let mut peak = PEAK_MEM.lock().unwrap_or_else(|e| e.into_inner());
    let e = peak.entry(chain.to_string()).or_insert(0.0);
    *e = e.max(hwm);
}

/// Stop a ckptfs mount, recording its peak memory first.
pub fn finish(chain: &str, m: Ckptfs) {
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
pub struct Qsd {
    pub file: PathBuf,
    pub _guard: Guard,
}

impl Qsd {
    pub fn start(top: &Path, file: &Path) -> Res<Qsd> {
        Qsd::start_with(top, file, false)
    }

    /// `start`, exporting the image writable when `writable`.
    pub fn start_with(top: &Path, file: &Path, writable: bool) -> Res<Qsd> {
        File::create(file)?;
        let file = fs::canonicalize(file)?;
        let (ro, w) = if writable {
            ("off", "on")
        } else {
            ("on", "off")
        };
        let blockdev = format!(
            "driver=qcow2,node-name=n,read-only={ro},file.driver=file,file.filename={}",
            p(top)
        );
        let export = format!(
            "type=fuse,id=e,node-name=n,mountpoint={},writable={w},allow-other=off",
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
pub struct Nbd {
    pub sock: PathBuf,
    pub _guard: Guard,
}

impl Nbd {
    pub fn start(image: &Path, sock: &Path, bitmap: Option<&str>) -> Res<Nbd> {
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

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", p(&self.sock))
    }
}

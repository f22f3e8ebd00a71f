//! Configuration from the environment.

use super::*;

pub struct Cfg {
    pub gib: u64,
    pub big_gib: u64,
    pub comp_mib: u64,
    pub restore_mib: u64,
    pub runs: usize,
    pub fio_secs: u64,
    pub cache_mb: u64,
    pub bin: PathBuf,
    pub tmp: PathBuf,
    pub out: PathBuf,
    pub python: String,
    pub script: PathBuf,
    pub groups: Vec<String>,
    pub hold: bool,
}

pub fn env_u64(name: &str, default: u64) -> Res<u64> {
    match std::env::var(name) {
        Ok(v) => Ok(v.parse().map_err(|_| format!("{name}={v}: not a number"))?),
        Err(_) => Ok(default),
    }
}

impl Cfg {
    pub fn from_env() -> Res<Cfg> {
        let small = std::env::var("CKPTFS_BENCH_SMALL").is_ok_and(|v| v != "0" && !v.is_empty());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        // Cargo builds the binary with the benchmark and names it here.
        let bin = std::env::var_os("CKPTFS_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_ckptfs")),
            PathBuf::from,
        );
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
            restore_mib: env_u64("CKPTFS_BENCH_RESTORE_MIB", if small { 256 } else { 2048 })?
                .max(4),
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
                    ["seq", "rand", "cp", "incr", "meta", "comp", "restore"]
                        .map(String::from)
                        .to_vec()
                }),
            hold: std::env::var("CKPTFS_BENCH_HOLD").is_ok_and(|v| v == "1"),
        })
    }

    pub fn wants(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

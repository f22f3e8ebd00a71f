//! The performance benchmark: ckptfs against QEMU's own tools, side by side in one run.
//!
//!     cargo bench --bench bench                        # ~15 min, as root
//!     CKPTFS_BENCH_SMALL=1 cargo bench --bench bench   # a quick run
//!
//! Builds, under a temporary directory in /tmp (removed at the end), with qemu-img/qemu-io:
//! - the main chain: `CKPTFS_BENCH_GIB` GiB (default 8), 3 layers, 64 KiB clusters, about 40 %
//!   written, 2 % compressed, libvirt-style checkpoints c1..c4, about 3,438 changed extents
//!   (~579 MB, scaled with the size) since the oldest checkpoint c1;
//! - the big chain: `CKPTFS_BENCH_BIG_GIB` GiB (default 1024), 3 layers, 20 checkpoints, the
//!   same number and sizes of changed extents (sparse: only they and the bitmaps take space);
//! - two fully compressed images (zlib and zstd) of `CKPTFS_BENCH_COMP_MIB` MiB (default 256);
//! - a raw file of `CKPTFS_BENCH_RESTORE_MIB` MiB (default 2048) to restore into a fresh qcow2.
//!
//! Then runs every row `CKPTFS_BENCH_RUNS` times (default 3) against its QEMU anchor
//! (qemu-storage-daemon's FUSE export, qemu-nbd + nbdcopy, the "QEMU way" incremental copy
//! of contrib/bench/qemu_incremental.py, qemu-img bitmap --merge, the decoders' own speed) and
//! prints min/median per row, the ratio of medians and PASS/MISS against the target.
//! Reference rows ("info") show the ceilings on this machine: the page cache (the same copy from
//! a local sparse file) and the FUSE ceiling, a file system in this process that answers from
//! memory with no work of its own (ideal.rs), against the same anchors.
//!
//! Environment: `CKPTFS_BIN` (the ckptfs binary; default the one cargo built with this
//! benchmark), `CKPTFS_BENCH_SMALL=1` (a quick run: 1 GiB / 64 GiB / 64 MiB / 256 MiB, 3 s of
//! fio), `CKPTFS_BENCH_GIB`, `CKPTFS_BENCH_BIG_GIB`, `CKPTFS_BENCH_COMP_MIB`,
//! `CKPTFS_BENCH_RESTORE_MIB`, `CKPTFS_BENCH_RUNS`, `CKPTFS_BENCH_FIO_SECS` (default 10),
//! `CKPTFS_BENCH_ROWS` (comma-separated row groups to run: seq, rand, cp, incr, meta, comp,
//! restore; default all), `CKPTFS_BENCH_CACHE_MB` (default 64),
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

mod cfg;
mod daemons;
mod fixtures;
mod groups;
mod ideal;
mod measure;
mod restore;
mod sys;
mod table;

use cfg::*;
use daemons::*;
use fixtures::*;
use groups::*;
use ideal::*;
use measure::*;
use restore::*;
use sys::*;
use table::*;

type Res<T> = Result<T, Box<dyn Error>>;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const CLUSTER: u64 = 64 * KIB;

fn df(path: &Path) -> String {
    run("df", &["-h", &p(path)], T_SHORT)
        .map(|s| s.lines().last().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The chain `build` makes when `needed`, with a line saying how long it took, what it holds
/// and how full the work directory's file system is.
fn build_if(
    needed: bool,
    name: &str,
    work: &Path,
    build: impl FnOnce() -> Res<Chain>,
) -> Res<Option<Chain>> {
    if !needed {
        return Ok(None);
    }
    let t = Instant::now();
    let c = build()?;
    println!(
        "built {name} chain in {:.1} s: {} changed bytes in {} runs since c1; {}",
        t.elapsed().as_secs_f64(),
        c.changed_bytes,
        c.extents,
        df(work)
    );
    Ok(Some(c))
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
            return Err(
                format!("{tool} not found (see the header of benches/bench/main.rs)").into(),
            );
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
    let main_chain = build_if(need_main, "main", &work, || {
        build_main(&cfg, &work.join("main"), &pattern)
    })?;
    let big_chain = build_if(need_big, "big", &work, || {
        build_big(&cfg, &work.join("big"))
    })?;

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
        let bc = big_chain.as_ref().expect("big");
        let big = incr_row(&mut cx, bc)?;
        let mut r = Row::new(
            &format!(
                "incr cp, {} GiB chain: changed bytes per second",
                bc.size / GIB
            ),
            Unit::MibS,
            "",
            Target::AtLeast(1024.0),
        );
        r.ck.push(mib_s(bc.changed_bytes, big));
        cx.push(r);
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

    if cfg.wants("restore") {
        println!("== rw restore");
        restore_rows(&mut cx)?;
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

//! Single measurements: dd, fio, the QEMU-way incremental copy, first byte, full reads.

use super::*;

pub fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

pub fn dd_secs(file: &Path, direct: bool) -> Res<f64> {
    let iff = format!("if={}", p(file));
    let mut args = vec![iff.as_str(), "of=/dev/null", "bs=1M", "status=none"];
    if direct {
        args.push("iflag=direct");
    }
    timed("dd", &args, T_LONG)
}

pub fn fio_iops(file: &Path, secs: u64) -> Res<f64> {
    let rt = format!("--runtime={secs}");
    let ff = format!("--filename={}", p(file));
    let out = run(
        "fio",
        &[
            "--name=rand4k",
            &ff,
            "--readonly",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            "--numjobs=2",
            "--direct=1",
            "--time_based",
            &rt,
            "--group_reporting",
            "--output-format=json",
        ],
        Duration::from_secs(secs + 120),
    )?;
    let start = out.find('{').ok_or("fio: no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&out[start..])?;
    v["jobs"][0]["read"]["iops"]
        .as_f64()
        .ok_or_else(|| "fio: no read.iops".into())
}

/// The QEMU way of extracting the blocks changed since `bitmap`: merge the bitmap of every
/// layer into a temporary one in a scratch overlay, export it with qemu-nbd -B, walk the
/// dirty-bitmap block status and read the dirty extents into a sparse file. Returns seconds.
pub fn qemu_incremental(cfg: &Cfg, chain: &Chain, work: &Path, out: &Path) -> Res<f64> {
    let scratch = work.join("scratch.qcow2");
    let sock = work.join("incr.sock");
    let _ = fs::remove_file(&scratch);
    let t = Instant::now();
    let top = p(chain.top());
    let s = p(&scratch);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &top, "-F", "qcow2", &s])?;
    qemu_img(&["bitmap", "--add", "--disable", &s, "since"])?;
    for l in &chain.layers {
        qemu_img(&[
            "bitmap",
            "--merge",
            &chain.oldest,
            "-b",
            &p(l),
            "-F",
            "qcow2",
            &s,
            "since",
        ])?;
    }
    let nbd = Nbd::start(&scratch, &sock, Some("since"))?;
    run(
        &cfg.python,
        &[&p(&cfg.script), &p(&nbd.sock), "since", &p(out)],
        T_LONG,
    )?;
    drop(nbd);
    let secs = t.elapsed().as_secs_f64();
    let _ = fs::remove_file(&scratch);
    Ok(secs)
}

pub fn rm(f: &Path) {
    let _ = fs::remove_file(f);
}

pub fn first_byte(path: PathBuf) -> Res<f64> {
    with_timeout(Duration::from_secs(120), "first byte", move || {
        let t = Instant::now();
        let f = File::open(&path)?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0)?;
        Ok(t.elapsed().as_secs_f64())
    })
}

pub fn first_seek_data(path: PathBuf) -> Res<f64> {
    with_timeout(Duration::from_secs(120), "first SEEK_DATA", move || {
        let t = Instant::now();
        let f = File::open(&path)?;
        // SAFETY: lseek on an fd we own.
        let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(t.elapsed().as_secs_f64())
    })
}

/// What `cp --sparse=always` does to its source, without writing a copy: SEEK_DATA and
/// SEEK_HOLE from run to run, each run read in `chunk`-byte pieces into one buffer. Returns the
/// seconds and the data bytes read.
pub fn walk_read(path: PathBuf, chunk: usize) -> Res<(f64, u64)> {
    with_timeout(Duration::from_secs(600), "walk and read", move || {
        let t = Instant::now();
        let f = File::open(&path)?;
        let fd = f.as_raw_fd();
        let mut buf = vec![0u8; chunk];
        let (mut pos, mut n) = (0i64, 0u64);
        loop {
            // SAFETY: lseek on an fd we own.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(e.into());
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut at = data as u64;
            while at < hole as u64 {
                let k = ((hole as u64 - at) as usize).min(chunk);
                f.read_exact_at(&mut buf[..k], at)?;
                at += k as u64;
                n += k as u64;
            }
            pos = hole;
        }
        Ok((t.elapsed().as_secs_f64(), n))
    })
}

pub fn read_all(path: PathBuf) -> Res<(f64, u64)> {
    with_timeout(Duration::from_secs(600), "full read", move || {
        let t = Instant::now();
        let mut f = File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok((t.elapsed().as_secs_f64(), n))
    })
}

pub fn cache_misses(m: &Ckptfs) -> Res<u64> {
    Ok(m.stats()?["cache"]["misses"].as_u64().unwrap_or(0))
}

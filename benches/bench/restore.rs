//! The rw restore row: a raw disk image from the page cache into a fresh qcow2, end to end,
//! against `qemu-img convert -n` + fsync (the limit) and a writable qemu-storage-daemon FUSE
//! export of the same image; every result passes `qemu-img check` and `qemu-img compare`.

use super::*;

/// A raw file of `bytes` of text-like data (no zero clusters; every 4 MiB chunk distinct).
fn restore_source(path: &Path, bytes: u64) -> Res<()> {
    let chunk = compressible(4 << 20, 13);
    let mut f = File::create(path)?;
    let (mut done, mut i) = (0u64, 0u64);
    while done < bytes {
        let mut c = chunk.clone();
        c[..8].copy_from_slice(&i.to_le_bytes());
        let n = (bytes - done).min(c.len() as u64) as usize;
        f.write_all(&c[..n])?;
        done += n as u64;
        i += 1;
    }
    Ok(())
}

fn fresh_qcow2(path: &Path, size: u64) -> Res<()> {
    rm(path);
    let size = size.to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        &p(path),
        &size,
    ])?;
    Ok(())
}

/// `dd if=SRC of=DST bs=1M conv=notrunc,fsync`.
fn dd_into(src: &Path, dst: &Path) -> Res<()> {
    let (i, o) = (format!("if={}", p(src)), format!("of={}", p(dst)));
    run(
        "dd",
        &[&i, &o, "bs=1M", "conv=notrunc,fsync", "status=none"],
        T_LONG,
    )?;
    Ok(())
}

/// The restored image is consistent and reads as the source.
fn verify(img: &Path, src: &Path, what: &str) -> Res<()> {
    qemu_img(&["check", "-q", &p(img)]).map_err(|e| format!("{what}: {e}"))?;
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &p(src),
        &p(img),
    ])
    .map_err(|e| format!("{what}: {e}"))?;
    Ok(())
}

pub fn restore_rows(cx: &mut Ctx) -> Res<()> {
    let bytes = cx.cfg.restore_mib * MIB;
    let src = cx.out.join("restore-src.raw");
    restore_source(&src, bytes)?;
    warm(std::slice::from_ref(&src))?;
    let img = cx.work.join("restore.qcow2");
    let mnt = cx.work.join("mnt-restore");
    let name = format!(
        "restore {} MiB: -o rw mount, dd conv=fsync, unmount",
        cx.cfg.restore_mib
    );
    let mut limit = Row::new(
        &name,
        Unit::Secs,
        "qemu-img convert -n + fsync",
        Target::Ratio(0.8),
    );
    let mut qsd = Row::new(
        &name,
        Unit::Secs,
        "QEMU FUSE export, writable",
        Target::Info,
    );
    for _ in 0..cx.cfg.runs {
        fresh_qcow2(&img, bytes)?;
        let t = Instant::now();
        let m = Ckptfs::start_with(cx.cfg, &img, &mnt, "rw,")?;
        dd_into(&src, &m.dir.join("current/disk.img"))?;
        finish("restore", m);
        let secs = t.elapsed().as_secs_f64();
        verify(&img, &src, "ckptfs restore")?;
        limit.ck.push(secs);
        qsd.ck.push(secs);

        fresh_qcow2(&img, bytes)?;
        let t = Instant::now();
        qemu_img(&[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &p(&src),
            &p(&img),
        ])?;
        // coreutils `sync FILE` fsyncs that file.
        run("sync", &[&p(&img)], T_LONG)?;
        limit.anchor.push(t.elapsed().as_secs_f64());
        verify(&img, &src, "qemu-img convert")?;

        fresh_qcow2(&img, bytes)?;
        let t = Instant::now();
        let q = Qsd::start_with(&img, &cx.work.join("qsd-restore.img"), true)?;
        dd_into(&src, &q.file)?;
        drop(q);
        qsd.anchor.push(t.elapsed().as_secs_f64());
        verify(&img, &src, "qemu-storage-daemon export")?;
    }
    rm(&src);
    rm(&img);
    cx.push(limit);
    cx.push(qsd);
    Ok(())
}

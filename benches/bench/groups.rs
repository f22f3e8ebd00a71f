//! The row groups.

use super::*;

pub struct Ctx<'a> {
    pub cfg: &'a Cfg,
    pub work: PathBuf,
    pub out: PathBuf,
    pub rows: Vec<Row>,
}

impl Ctx<'_> {
    pub fn mnt(&self, name: &str) -> PathBuf {
        self.work.join(format!("mnt-{name}"))
    }

    pub fn ck(&self, chain: &Chain) -> Res<Ckptfs> {
        Ckptfs::start(self.cfg, chain.top(), &self.mnt(chain.name))
    }

    pub fn qsd(&self, chain: &Chain) -> Res<Qsd> {
        Qsd::start(
            chain.top(),
            &self.work.join(format!("qsd-{}.img", chain.name)),
        )
    }

    pub fn push(&mut self, r: Row) {
        r.print_progress();
        self.rows.push(r);
    }
}

/// The ideal FUSE file system (`ideal.rs`) against the anchor of `of`, from its `samples`.
fn fuse_ceiling(of: &Row, samples: Vec<f64>) -> Row {
    Row {
        ck: samples,
        anchor: of.anchor.clone(),
        ..Row::new(
            "  FUSE ceiling: a file system answering from memory",
            of.unit,
            &of.anchor_name,
            Target::Info,
        )
    }
}

/// The ideal FUSE file system for chain `c`, its changed.img holding the runs changed since
/// the oldest checkpoint (as ckptfs lists them).
fn ideal_for(cx: &Ctx, c: &Chain) -> Res<Ideal> {
    let m = cx.ck(c)?;
    let extents = fs::read_to_string(m.dir.join(&c.oldest).join("extents"))?;
    finish(c.name, m);
    Ideal::start(&cx.mnt(&format!("ideal-{}", c.name)), c.size, &extents)
}

pub fn seq_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let runs = cx.cfg.runs;
    let qsd_anchor = "QEMU FUSE export";
    let mut warm_row = Row::new(
        "seq dd bs=1M, warm (fresh mounts)",
        Unit::MibS,
        qsd_anchor,
        Target::Ratio(2.0),
    );
    let mut reread = Row::new(
        "seq dd bs=1M, re-read (same mount)",
        Unit::MibS,
        qsd_anchor,
        Target::Info,
    );
    let mut direct = Row::new(
        "seq dd bs=1M iflag=direct, warm",
        Unit::MibS,
        qsd_anchor,
        Target::Info,
    );
    let mut cold = Row::new(
        "seq dd bs=1M, cold (drop_caches)",
        Unit::MibS,
        "qemu-img convert -> null",
        Target::Ratio(0.9),
    );
    let ideal = ideal_for(cx, c)?;
    let mut ideal_warm = Vec::new();
    warm(&c.layers)?;
    for _ in 0..runs {
        let m = cx.ck(c)?;
        let q = cx.qsd(c)?;
        let disk = m.dir.join("current/disk.img");
        ideal_warm.push(mib_s(c.size, dd_secs(&ideal.disk(), false)?));
        warm_row.ck.push(mib_s(c.size, dd_secs(&disk, false)?));
        warm_row
            .anchor
            .push(mib_s(c.size, dd_secs(&q.file, false)?));
        reread.ck.push(mib_s(c.size, dd_secs(&disk, false)?));
        reread.anchor.push(mib_s(c.size, dd_secs(&q.file, false)?));
        direct.ck.push(mib_s(c.size, dd_secs(&disk, true)?));
        direct.anchor.push(mib_s(c.size, dd_secs(&q.file, true)?));
        finish(c.name, m);
        drop(q);
    }
    let null = format!("driver=null-co,size={}", c.size);
    for _ in 0..runs {
        let m = cx.ck(c)?;
        drop_caches()?;
        cold.ck.push(mib_s(
            c.size,
            dd_secs(&m.dir.join("current/disk.img"), false)?,
        ));
        finish(c.name, m);
        drop_caches()?;
        let top = p(c.top());
        let args = [
            "convert",
            "-n",
            "-f",
            "qcow2",
            "--target-image-opts",
            &top,
            &null,
        ];
        cold.anchor
            .push(mib_s(c.size, timed("qemu-img", &args, T_LONG)?));
    }
    // The raw page cache, for reference: the layers read from cache (sum of file lengths).
    let mut raw = Row::new(
        "raw page cache (dd of the layer files)",
        Unit::MibS,
        "",
        Target::Info,
    );
    let bytes: u64 = c
        .layers
        .iter()
        .map(|l| fs::metadata(l).map_or(0, |m| m.len()))
        .sum();
    warm(&c.layers)?;
    for _ in 0..runs {
        let t = Instant::now();
        warm(&c.layers)?;
        raw.ck.push(mib_s(bytes, t.elapsed().as_secs_f64()));
    }
    drop(ideal);
    let ceiling = fuse_ceiling(&warm_row, ideal_warm);
    cx.push(warm_row);
    cx.push(ceiling);
    cx.push(reread);
    cx.push(direct);
    cx.push(cold);
    cx.push(raw);
    Ok(())
}

pub fn rand_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let mut row = Row::new(
        "rand 4k fio psync 2 jobs O_DIRECT",
        Unit::Iops,
        "QEMU FUSE export",
        Target::Ratio(8.0),
    );
    let ideal = ideal_for(cx, c)?;
    let mut ideal_iops = Vec::new();
    warm(&c.layers)?;
    let m = cx.ck(c)?;
    let q = cx.qsd(c)?;
    for _ in 0..cx.cfg.runs {
        row.ck
            .push(fio_iops(&m.dir.join("current/disk.img"), cx.cfg.fio_secs)?);
        row.anchor.push(fio_iops(&q.file, cx.cfg.fio_secs)?);
        ideal_iops.push(fio_iops(&ideal.disk(), cx.cfg.fio_secs)?);
    }
    finish(c.name, m);
    drop(q);
    drop(ideal);
    let ceiling = fuse_ceiling(&row, ideal_iops);
    cx.push(row);
    cx.push(ceiling);
    Ok(())
}

pub fn cp_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let mut row = Row::new(
        "cp --sparse=always current/disk.img",
        Unit::Secs,
        "qemu-nbd + nbdcopy",
        Target::Ratio(1.0),
    );
    warm(&c.layers)?;
    let out = cx.out.join("disk-copy.raw");
    let nbd = Nbd::start(c.top(), &cx.work.join("copy.sock"), None)?;
    for _ in 0..cx.cfg.runs {
        let m = cx.ck(c)?;
        row.ck.push(timed(
            "cp",
            &[
                "--sparse=always",
                &p(&m.dir.join("current/disk.img")),
                &p(&out),
            ],
            T_LONG,
        )?);
        rm(&out);
        finish(c.name, m);
        row.anchor
            .push(timed("nbdcopy", &[&nbd.uri(), &p(&out)], T_LONG)?);
        rm(&out);
    }
    drop(nbd);
    cx.push(row);
    Ok(())
}

/// cp --sparse=always of the oldest checkpoint's changed.img against the QEMU way; returns the
/// ckptfs median.
pub fn incr_row(cx: &mut Ctx, c: &Chain) -> Res<f64> {
    let name = format!(
        "incr cp {}/changed.img, {} GiB ({} MB in {} runs)",
        c.oldest,
        c.size / GIB,
        c.changed_bytes / 1_000_000,
        c.extents
    );
    let mut row = Row::new(
        &name,
        Unit::Secs,
        "QEMU way (merge, qemu-nbd -B, walk, read)",
        Target::Ratio(4.0),
    );
    // The same walk without writing a copy on both sides: what extracting the changed blocks
    // costs (in this VM, filling fresh memory pages for the copy varies 3x from run to run and
    // is the same for both). ckptfs: cp's reads (SEEK_DATA, SEEK_HOLE, 128 KiB pieces); QEMU:
    // the NBD client writing into /dev/null. (cp into /dev/null would write the holes.)
    let mut null_row = Row::new(
        &format!(
            "  same walk, no copy written (extraction, {} GiB)",
            c.size / GIB
        ),
        Unit::Secs,
        "QEMU way into /dev/null",
        Target::Ratio(4.0),
    );
    warm(&c.layers)?;
    let out = cx.out.join("incr.raw");
    let null = Path::new("/dev/null");
    for _ in 0..cx.cfg.runs {
        let m = cx.ck(c)?;
        let src = m.dir.join(&c.oldest).join("changed.img");
        row.ck.push(timed(
            "cp",
            &["--sparse=always", &p(&src), &p(&out)],
            T_LONG,
        )?);
        let copied = fs::metadata(&out)?.blocks() * 512;
        rm(&out);
        finish(c.name, m);
        row.anchor
            .push(qemu_incremental(cx.cfg, c, &cx.work, &out)?);
        let copied_q = fs::metadata(&out)?.blocks() * 512;
        rm(&out);
        if copied.abs_diff(copied_q) > copied_q / 10 {
            eprintln!("  note: ckptfs copied {copied} bytes, the QEMU way {copied_q}");
        }
        let m = cx.ck(c)?;
        let src = m.dir.join(&c.oldest).join("changed.img");
        let (secs, read) = walk_read(src, 128 << 10)?;
        if read != c.changed_bytes {
            eprintln!(
                "  note: read {read} bytes of changed.img, {} changed",
                c.changed_bytes
            );
        }
        null_row.ck.push(secs);
        finish(c.name, m);
        null_row
            .anchor
            .push(qemu_incremental(cx.cfg, c, &cx.work, null)?);
    }
    let (local_cp, local_walk) = page_cache_walks(cx, c)?;
    let (ideal_cp, ideal_walk) = ideal_walks(cx, c)?;
    let med = median(&row.ck);
    let ceiling = |name: &str, ours: &Row, local: Vec<f64>| {
        let vs_ck = Row {
            ck: ours.ck.clone(),
            anchor: local.clone(),
            ..Row::new(
                &format!("  ckptfs vs the page cache ({name})"),
                Unit::Secs,
                "a local sparse copy, cached",
                Target::Info,
            )
        };
        let vs_qemu = Row {
            ck: local,
            anchor: ours.anchor.clone(),
            ..Row::new(
                &format!(
                    "  the page cache ({name}) vs {}: the ceiling",
                    ours.anchor_name
                ),
                Unit::Secs,
                &ours.anchor_name,
                Target::Info,
            )
        };
        [vs_ck, vs_qemu]
    };
    let rows = [
        ceiling("cp", &row, local_cp),
        ceiling("walk", &null_row, local_walk),
    ];
    let fuse = [
        fuse_ceiling(&row, ideal_cp),
        fuse_ceiling(&null_row, ideal_walk),
    ];
    cx.push(row);
    cx.push(null_row);
    for r in rows.into_iter().flatten().chain(fuse) {
        cx.push(r);
    }
    Ok(med)
}

/// The same copy and walk from the ideal FUSE file system (no FUSE file system can be faster).
fn ideal_walks(cx: &mut Ctx, c: &Chain) -> Res<(Vec<f64>, Vec<f64>)> {
    let ideal = ideal_for(cx, c)?;
    cp_and_walks(cx, &ideal.changed(), "incr-ideal.raw")
}

/// `runs` times: `cp --sparse=always` of `src` into `out` (in the output directory), then the
/// walk of `src` with cp's 128 KiB reads: (cp seconds, walk seconds).
fn cp_and_walks(cx: &Ctx, src: &Path, out: &str) -> Res<(Vec<f64>, Vec<f64>)> {
    let out = cx.out.join(out);
    let (mut cp, mut walk) = (Vec::new(), Vec::new());
    for _ in 0..cx.cfg.runs {
        cp.push(timed(
            "cp",
            &["--sparse=always", &p(src), &p(&out)],
            T_LONG,
        )?);
        rm(&out);
        walk.push(walk_read(src.to_path_buf(), 128 << 10)?.0);
    }
    Ok((cp, walk))
}

/// The same copy and walk from a local sparse copy of the changed blocks held in the page
/// cache: what the page cache itself gives (no FUSE file system can be faster).
fn page_cache_walks(cx: &mut Ctx, c: &Chain) -> Res<(Vec<f64>, Vec<f64>)> {
    let local = cx.work.join("changed-local.raw");
    let m = cx.ck(c)?;
    let src = m.dir.join(&c.oldest).join("changed.img");
    timed("cp", &["--sparse=always", &p(&src), &p(&local)], T_LONG)?;
    finish(c.name, m);
    // Its data in the page cache (dd would read a sparse 1 TiB copy's holes too).
    walk_read(local.clone(), 1 << 20)?;
    let walks = cp_and_walks(cx, &local, "incr-local.raw");
    rm(&local);
    walks
}

pub fn meta_rows(cx: &mut Ctx, c: &Chain) -> Res<()> {
    let runs = cx.cfg.runs;
    let gib = c.size / GIB;
    let mut mount = Row::new(
        &format!("mount {gib} GiB chain, {} checkpoints", c.checkpoints),
        Unit::Secs,
        "",
        Target::AtMost(1.0),
    );
    let mut fb = Row::new(
        &format!("first byte of {}/bitmap.bin", c.oldest),
        Unit::Secs,
        "",
        Target::AtMost(0.1),
    );
    let mut seek = Row::new(
        &format!("first SEEK_DATA of {}/changed.img", c.oldest),
        Unit::Secs,
        "",
        Target::AtMost(0.1),
    );
    let mut full = Row::new(
        &format!("full {}/bitmap.bin (fresh mount)", c.oldest),
        Unit::Secs,
        &format!("qemu-img bitmap --merge x{}", c.checkpoints),
        Target::Ratio(10.0),
    );
    let mut again = Row::new(
        &format!("re-read {}/bitmap.bin after drop_caches", c.oldest),
        Unit::Secs,
        "",
        Target::Info,
    );
    let mut misses_added = 0;
    warm(&c.layers)?;
    let oldest = c.oldest.clone();
    for i in 0..runs {
        let m = cx.ck(c)?;
        mount.ck.push(m.mount_secs);
        fb.ck
            .push(first_byte(m.dir.join(&oldest).join("bitmap.bin"))?);
        finish(c.name, m);

        let m = cx.ck(c)?;
        seek.ck
            .push(first_seek_data(m.dir.join(&oldest).join("changed.img"))?);
        finish(c.name, m);

        let m = cx.ck(c)?;
        let (secs, n) = read_all(m.dir.join(&oldest).join("bitmap.bin"))?;
        full.ck.push(secs);
        let before = cache_misses(&m)?;
        drop_caches()?;
        warm(&c.layers)?;
        again
            .ck
            .push(read_all(m.dir.join(&oldest).join("bitmap.bin"))?.0);
        misses_added += cache_misses(&m)? - before;
        if i == 0 {
            let cj = fs::read_to_string(m.dir.join("checkpoints.json"))?;
            let v: serde_json::Value = serde_json::from_str(&cj)?;
            let first = v["checkpoints"][0]["name"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            if first != oldest {
                eprintln!("  note: checkpoints.json lists {first} first, not {oldest}");
            }
            println!("  bitmap.bin: {n} bytes");
        }
        finish(c.name, m);

        // Anchor: qemu-img merges the same checkpoints' bitmaps of the top into a temporary one.
        let scratch = cx.work.join(format!("merge-{i}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p(c.top()),
            "-F",
            "qcow2",
            &p(&scratch),
        ])?;
        let mut args: Vec<String> = vec!["bitmap".into(), "--add".into(), "--disable".into()];
        for k in 1..=c.checkpoints {
            args.push("--merge".into());
            args.push(format!("c{k}"));
        }
        args.extend([
            "-b".into(),
            p(c.top()),
            "-F".into(),
            "qcow2".into(),
            p(&scratch),
            "tmp".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        full.anchor.push(timed("qemu-img", &args, T_LONG)?);
        rm(&scratch);
    }
    again.target = Target::Check(
        misses_added == 0,
        format!("served from the chunk cache ({misses_added} new misses)"),
    );
    cx.push(mount);
    cx.push(fb);
    cx.push(seek);
    cx.push(full);
    cx.push(again);
    Ok(())
}

/// Decode speed of the library itself: the same data in 64 KiB clusters, compressed in memory.
pub fn library_decode_mib_s(kind: &str, data: &[u8]) -> Res<f64> {
    let cs = CLUSTER as usize;
    let mut packed: Vec<Vec<u8>> = Vec::new();
    for c in data.chunks(cs) {
        packed.push(match kind {
            "zlib" => {
                let mut e =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(c)?;
                e.finish()?
            }
            _ => zstd::bulk::compress(c, 0)?,
        });
    }
    let mut out = vec![0u8; cs];
    let t = Instant::now();
    for z in &packed {
        match kind {
            "zlib" => {
                let mut d = flate2::read::DeflateDecoder::new(&z[..]);
                d.read_exact(&mut out)?;
            }
            _ => {
                let n = zstd::bulk::decompress_to_buffer(z, &mut out[..])?;
                if n != cs {
                    return Err("zstd: short cluster".into());
                }
            }
        }
    }
    Ok(mib_s(data.len() as u64, t.elapsed().as_secs_f64()))
}

pub fn comp_rows(cx: &mut Ctx, images: &[(String, PathBuf)], data: &[u8]) -> Res<()> {
    for (kind, img) in images {
        let mut row = Row::new(
            &format!("{kind} compressed image, dd iflag=direct"),
            Unit::MibS,
            &format!("{kind} library decode (1 thread)"),
            Target::Ratio(0.8),
        );
        warm(std::slice::from_ref(img))?;
        let chain = Chain {
            name: "comp",
            size: data.len() as u64,
            layers: vec![img.clone()],
            oldest: String::new(),
            checkpoints: 0,
            changed_bytes: 0,
            extents: 0,
        };
        for _ in 0..cx.cfg.runs {
            let m = cx.ck(&chain)?;
            let secs = dd_secs(&m.dir.join("current/disk.img"), true)?;
            row.ck.push(mib_s(chain.size, secs));
            finish("comp", m);
            row.anchor.push(library_decode_mib_s(kind, data)?);
        }
        cx.push(row);
    }
    Ok(())
}

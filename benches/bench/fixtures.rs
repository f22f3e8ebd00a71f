//! The chains measured, built with qemu-img and qemu-io.

use super::*;

pub struct Chain {
    pub name: &'static str,
    pub size: u64,
    /// Bottom to top.
    pub layers: Vec<PathBuf>,
    /// The oldest checkpoint's bitmap name, and the layers that carry it.
    pub oldest: String,
    pub checkpoints: usize,
    pub changed_bytes: u64,
    pub extents: usize,
}

impl Chain {
    pub fn top(&self) -> &Path {
        self.layers.last().expect("layers")
    }
}

/// xorshift64*: deterministic offsets, so every run builds the same chains.
pub struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Text-like bytes that deflate about 2.5:1 (words from a small vocabulary).
pub fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let words: Vec<Vec<u8>> = (0..2000)
        .map(|_| {
            let n = 2 + r.next() % 8;
            (0..n).map(|_| b'a' + (r.next() % 26) as u8).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(&words[(r.next() % words.len() as u64) as usize]);
        out.push(if r.next() % 10 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// The changed extents: (offset, length, zero), cluster aligned, the same sequence of lengths
/// for any disk size.
pub fn changes(n: usize, size: u64, seed: u64) -> Vec<(u64, u64, bool)> {
    let mut r = Rng(seed);
    let clusters = size / CLUSTER;
    (0..n)
        .map(|i| {
            let len = (1 + r.next() % 4) * CLUSTER;
            let off = (r.next() % (clusters - 4)) * CLUSTER;
            (off, len, i % 20 == 19)
        })
        .collect()
}

pub fn qemu_io(img: &Path, cmds: &[String]) -> Res<()> {
    for batch in cmds.chunks(400) {
        let mut args: Vec<&str> = vec!["-t", "unsafe"];
        for c in batch {
            args.push("-c");
            args.push(c);
        }
        let img_s = p(img);
        args.push(&img_s);
        run("qemu-io", &args, T_LONG)?;
    }
    Ok(())
}

pub fn qemu_img(args: &[&str]) -> Res<String> {
    run("qemu-img", args, T_LONG)
}

pub fn create_layer(path: &Path, size: u64, backing: Option<&Path>) -> Res<()> {
    let size_s = size.to_string();
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        "cluster_size=64k".into(),
    ];
    if let Some(b) = backing {
        args.extend(["-b".into(), p(b), "-F".into(), "qcow2".into()]);
    }
    args.push(p(path));
    args.push(size_s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img(&args)?;
    Ok(())
}

/// A libvirt-style chain: `per_layer[i]` checkpoints are taken in layer i (each overlay first
/// re-creates the recording bitmaps of every earlier checkpoint, as libvirt does); after each
/// checkpoint one slice of `extents` is written. `fill` writes the base before c1.
pub fn build_chain(
    name: &'static str,
    dir: &Path,
    size: u64,
    per_layer: &[usize],
    extents: &[(u64, u64, bool)],
    fill: &[String],
) -> Res<Chain> {
    fs::create_dir_all(dir)?;
    let total: usize = per_layer.iter().sum();
    let slice = extents.len().div_ceil(total);
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut ck = 0usize;
    for (li, &n) in per_layer.iter().enumerate() {
        let path = dir.join(format!("layer{li}.qcow2"));
        create_layer(&path, size, layers.last().map(PathBuf::as_path))?;
        if li == 0 && !fill.is_empty() {
            qemu_io(&path, fill)?;
        }
        for c in 1..=ck {
            qemu_img(&["bitmap", "--add", &p(&path), &format!("c{c}")])?;
        }
        for _ in 0..n {
            ck += 1;
            qemu_img(&["bitmap", "--add", &p(&path), &format!("c{ck}")])?;
            let part =
                &extents[((ck - 1) * slice).min(extents.len())..(ck * slice).min(extents.len())];
            let cmds: Vec<String> = part
                .iter()
                .map(|&(o, l, z)| {
                    if z {
                        format!("write -z {o} {l}")
                    } else {
                        format!("write -P {} {o} {l}", 0x40 + ck)
                    }
                })
                .collect();
            qemu_io(&path, &cmds)?;
        }
        layers.push(path);
    }
    // Changed bytes since c1 at cluster granularity (overlapping extents merge).
    let mut v: Vec<(u64, u64)> = extents.iter().map(|&(o, l, _)| (o, o + l)).collect();
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    Ok(Chain {
        name,
        size,
        layers,
        oldest: "c1".into(),
        checkpoints: total,
        changed_bytes: merged.iter().map(|(s, e)| e - s).sum(),
        extents: merged.len(),
    })
}

pub fn build_main(cfg: &Cfg, dir: &Path, pattern: &Path) -> Res<Chain> {
    let size = cfg.gib * GIB;
    // 36 % plain data and 2 % compressed in the base, in 256 MiB stripes; the changes
    // (about 7 % of the disk) bring the written share to about 40 %.
    let stripe = 256 * MIB;
    let mut fill = Vec::new();
    for i in 0..size / stripe {
        let base = i * stripe;
        let data = (stripe * 36 / 100) / CLUSTER * CLUSTER;
        fill.push(format!("write -P {} {base} {data}", 0x10 + i % 200));
        let comp = (stripe * 2 / 100) / CLUSTER * CLUSTER;
        fill.push(format!(
            "write -c -s {} {} {comp}",
            p(pattern),
            base + stripe / 2
        ));
    }
    let n = ((3438 * cfg.gib) / 8).max(100) as usize;
    let ext = changes(n, size, 0x5eed_0001);
    build_chain("main", dir, size, &[2, 1, 1], &ext, &fill)
}

pub fn build_big(cfg: &Cfg, dir: &Path) -> Res<Chain> {
    let size = cfg.big_gib * GIB;
    // The same number and lengths of changes as the main chain, spread over the big disk.
    let n = ((3438 * cfg.gib) / 8).max(100) as usize;
    let ext = changes(n, size, 0x5eed_0001);
    build_chain("big", dir, size, &[7, 7, 6], &ext, &[])
}

/// A fully compressed image of `mib` MiB of text-like data.
pub fn build_compressed(cfg: &Cfg, dir: &Path, kind: &str, raw: &Path) -> Res<PathBuf> {
    let out = dir.join(format!("comp-{kind}.qcow2"));
    let opt = format!("cluster_size=64k,compression_type={kind}");
    let _ = cfg;
    qemu_img(&[
        "convert",
        "-c",
        "-W",
        "-m",
        "4",
        "-O",
        "qcow2",
        "-o",
        &opt,
        &p(raw),
        &p(&out),
    ])?;
    Ok(out)
}

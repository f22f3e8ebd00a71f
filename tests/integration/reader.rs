//! Reads through ckptfs's chain reader are byte-exact against QEMU (`qemu-img convert -O raw`),
//! allocation agrees with `qemu-img map`, bitmap bits agree with `qemu-nbd` + `nbdinfo`, and bad
//! inputs are refused with a clear error. Every fixture is made at test time in a temp dir
//! (digest `/work/shared/docs/qcow2-bitmaps.md`, section 9).

use crate::common::*;
use ckptfs::chain::{Chain, Disk};
use ckptfs::qcow2::{BitmapCluster, HostOffset, Mapping, Table};
use std::path::Path;
use std::sync::Arc;

/// Random ranges compared per view, on top of the whole-disk compare.
const RANGES: usize = 40;

/// The cookbook chain: `top.qcow2 (8M) -> mid.qcow2 (6M) -> sub/base.qcow2 (4M)`, relative
/// names, compressed and zero clusters.
fn cookbook_chain(d: &Path) {
    std::fs::create_dir(d.join("sub")).unwrap();
    create(d, "sub/base.qcow2", "4M", "", None);
    qemu_io(d, "sub/base.qcow2", &["write -P 0x11 0 4M"]);
    create(d, "mid.qcow2", "6M", "", Some(("sub/base.qcow2", "qcow2")));
    qemu_io(
        d,
        "mid.qcow2",
        &[
            "write -P 0x22 64k 64k",
            "write -z 128k 64k",
            "discard 192k 64k",
            "write -c -P 0x23 256k 64k",
        ],
    );
    create(d, "top.qcow2", "8M", "", Some(("mid.qcow2", "qcow2")));
    qemu_io(
        d,
        "top.qcow2",
        &["write -P 0x33 4096 4096", "write -z -u 64k 64k"],
    );
}

#[test]
fn cookbook_chain_every_layer() {
    let t = tempdir();
    let d = t.path();
    cookbook_chain(d);
    let chain = check_chain(&d.join("top.qcow2"), RANGES);
    assert_eq!(chain.layers.len(), 3);
    assert_eq!(
        chain.layers[2].path.canonicalize().unwrap(),
        d.join("sub/base.qcow2").canonicalize().unwrap()
    );
    // The digest's spot checks: zeros past the smaller layers' ends, zero clusters stop the
    // descent, the compressed cluster at 256k.
    let disk = Disk::new(chain.clone(), 0, Table::Active);
    let (r, _) = disk.resolve(5 << 20, 4096).unwrap();
    assert_eq!(r.depth, None);
    let (r, _) = disk.resolve(7 << 20, 4096).unwrap();
    assert_eq!(r.depth, None);
    let (r, _) = disk.resolve(65536, 4096).unwrap();
    assert_eq!((r.depth, r.mapping), (Some(0), Mapping::Zero));
    let (r, _) = disk.resolve(262144 + 100, 1).unwrap();
    assert_eq!(r.depth, Some(1));
    assert!(matches!(r.mapping, Mapping::Compressed { .. }));
}

/// `top2 -> sub/mid2.qcow2 -> base.qcow2`, where `base.qcow2` is stored in `sub/mid2.qcow2` and
/// so means `sub/base.qcow2` (the name resolves against the naming image's directory).
#[test]
fn backing_names_resolve_against_the_naming_image() {
    let t = tempdir();
    let d = t.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    create(d, "sub/base.qcow2", "2M", "", None);
    qemu_io(d, "sub/base.qcow2", &["write -P 0x71 0 2M"]);
    // A decoy base.qcow2 next to top2 that must not be used.
    create(d, "base.qcow2", "2M", "", None);
    qemu_io(d, "base.qcow2", &["write -P 0xee 0 2M"]);
    create(
        &d.join("sub"),
        "mid2.qcow2",
        "2M",
        "",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(d, "sub/mid2.qcow2", &["write -P 0x72 64k 64k"]);
    create(d, "top2.qcow2", "2M", "", Some(("sub/mid2.qcow2", "qcow2")));
    qemu_io(d, "top2.qcow2", &["write -P 0x73 1M 4k"]);
    let chain = check_chain(&d.join("top2.qcow2"), RANGES);
    assert_eq!(
        chain.layers[2].path.canonicalize().unwrap(),
        d.join("sub/base.qcow2").canonicalize().unwrap()
    );
}

/// `convert -c` of varied data, checking that the fixture really exercises packed streams
/// (unaligned starts, host-cluster crossings) where the cluster size allows it.
fn compressed_image(compression: &str, cluster: &str, len: usize, seed: u64) {
    let t = tempdir();
    let d = t.path();
    std::fs::write(d.join("src.raw"), varied_data(len, seed)).unwrap();
    let mut opts = format!("cluster_size={cluster}");
    if compression != "zlib" {
        opts.push_str(&format!(",compression_type={compression}"));
    }
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &opts,
            "src.raw",
            "conv.qcow2",
        ],
    );
    let chain = check_chain(&d.join("conv.qcow2"), RANGES);
    let layer = &chain.layers[0];
    let cs = layer.cluster_size().unwrap();
    let (mut compressed, mut unaligned, mut crossing) = (0, 0, 0);
    let mut off = 0;
    while off < layer.size(Table::Active) {
        let (m, n) = layer.map(Table::Active, off, cs).unwrap();
        if let Mapping::Compressed {
            host_off: HostOffset(host_off),
            len,
        } = m
        {
            compressed += 1;
            unaligned += usize::from(host_off % 512 != 0);
            crossing += usize::from(host_off / cs != (host_off + len - 1) / cs);
        }
        off += n.max(1);
    }
    eprintln!(
        "{compression} {cluster}: {compressed} compressed clusters, {unaligned} start mid-sector, \
         {crossing} cross a host cluster"
    );
    assert!(compressed > 0, "fixture has no compressed clusters");
    if cs >= 4096 {
        assert!(unaligned > 0, "fixture has no mid-sector compressed starts");
        assert!(
            crossing > 0,
            "fixture has no compressed cluster crossing a host cluster"
        );
    }
}

#[test]
fn compressed_zlib() {
    compressed_image("zlib", "64k", (4 << 20) + 12345, 1);
    compressed_image("zlib", "4k", (1 << 20) + 512, 2);
    compressed_image("zlib", "512", 300_000, 3);
    compressed_image("zlib", "2M", 8 << 20, 4);
}

#[test]
fn compressed_zstd() {
    compressed_image("zstd", "64k", (4 << 20) + 12345, 5);
    compressed_image("zstd", "4k", (1 << 20) + 512, 6);
    compressed_image("zstd", "512", 300_000, 7);
    compressed_image("zstd", "2M", 8 << 20, 8);
}

/// Extended L2 (128 KiB clusters, 4 KiB subclusters) over the cookbook chain, with partial,
/// zero, discarded and compressed (sub)clusters.
#[test]
fn extended_l2_over_backing() {
    let t = tempdir();
    let d = t.path();
    cookbook_chain(d);
    create(
        d,
        "ext.qcow2",
        "6M",
        "extended_l2=on,cluster_size=128k",
        Some(("mid.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "ext.qcow2",
        &[
            "write -P 0x44 4k 8k",
            "write -z 32k 4k",
            "write -P 0x45 300000 5000",
            "write -z 512k 128k",
            "write -c -P 0x46 1M 128k",
            "write -P 0x47 2M 256k",
            "discard 2M 128k",
            "write -P 0x48 4194000 1000",
            "write -z 5M 4k",
        ],
    );
    let chain = check_chain(&d.join("ext.qcow2"), RANGES);
    assert!(chain.layers[0].qcow2().unwrap().geo.extended);
}

#[test]
fn v2_overlay() {
    let t = tempdir();
    let d = t.path();
    cookbook_chain(d);
    create(
        d,
        "v2.qcow2",
        "",
        "compat=0.10",
        Some(("mid.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "v2.qcow2",
        &[
            "write -P 0x55 0 64k",
            "write -z 1M 64k",
            "discard 64k 64k",
            "write -P 0x56 1000 3000",
        ],
    );
    let chain = check_chain(&d.join("v2.qcow2"), RANGES);
    assert_eq!(chain.layers[0].qcow2().unwrap().header.version, 2);
}

/// A raw backing file of 1000000 bytes (virtual size 1000448) with an overlay write straddling
/// its EOF, and a second overlay that leaves the raw tail visible.
#[test]
fn raw_backing_straddling_eof() {
    let t = tempdir();
    let d = t.path();
    let mut raw = vec![0u8; 1_000_000];
    Prng(42).fill(&mut raw);
    std::fs::write(d.join("base.raw"), &raw).unwrap();
    create(d, "over-raw.qcow2", "4M", "", Some(("base.raw", "raw")));
    qemu_io(d, "over-raw.qcow2", &["write -P 0x66 900000 200000"]);
    let chain = check_chain(&d.join("over-raw.qcow2"), RANGES);
    assert_eq!(chain.layers[1].format(), "raw");
    assert_eq!(chain.layers[1].size(Table::Active), 1_000_448);

    create(d, "over-raw2.qcow2", "2M", "", Some(("base.raw", "raw")));
    qemu_io(
        d,
        "over-raw2.qcow2",
        &["write -P 0x67 999000 100", "write -P 0x68 0 512"],
    );
    check_chain(&d.join("over-raw2.qcow2"), RANGES);
}

/// Cluster sizes 512, 4k, 2M: a base and an overlay of the same cluster size, odd writes.
#[test]
fn cluster_sizes_512_4k_2m() {
    for (cs, size) in [("512", "3M"), ("4k", "3M"), ("2M", "16M")] {
        let t = tempdir();
        let d = t.path();
        let opts = format!("cluster_size={cs}");
        let cs_bytes: u64 = match cs {
            "512" => 512,
            "4k" => 4096,
            _ => 2 << 20,
        };
        let base_compressed = format!("write -c -P 0x13 2M {}", cs_bytes.max(512 << 10));
        create(d, "base.qcow2", size, &opts, None);
        qemu_io(
            d,
            "base.qcow2",
            &[
                "write -P 0x11 0 1M",
                "write -P 0x12 1234567 99999",
                base_compressed.as_str(),
            ],
        );
        create(d, "top.qcow2", size, &opts, Some(("base.qcow2", "qcow2")));
        // Compressed writes need a cluster the image has not allocated yet.
        let free = (1536u64 << 10).div_ceil(cs_bytes) * cs_bytes;
        let cluster_write = format!("write -c -P 0x24 {free} {}", 2 * cs_bytes);
        let zero = format!("write -z {} {}", 4 * cs_bytes, cs_bytes);
        let discard = format!("discard {} {}", 6 * cs_bytes, cs_bytes);
        qemu_io(
            d,
            "top.qcow2",
            &[
                "write -P 0x21 777 5000",
                "write -P 0x22 1048575 2",
                cluster_write.as_str(),
                zero.as_str(),
                discard.as_str(),
            ],
        );
        let chain = check_chain(&d.join("top.qcow2"), RANGES);
        assert_eq!(chain.layers[0].cluster_size(), Some(cs_bytes), "{cs}");
    }
}

#[test]
fn refcount_bits_1_and_64() {
    for bits in ["1", "64"] {
        let t = tempdir();
        let d = t.path();
        let opts = format!("refcount_bits={bits}");
        create(d, "base.qcow2", "2M", &opts, None);
        qemu_io(d, "base.qcow2", &["write -P 0x31 0 1M"]);
        create(d, "top.qcow2", "2M", &opts, Some(("base.qcow2", "qcow2")));
        qemu_io(
            d,
            "top.qcow2",
            &[
                "write -P 0x32 100000 100000",
                "write -c -P 0x33 1M 128k",
                "write -z 0 64k",
                "discard 512k 64k",
            ],
        );
        let chain = check_chain(&d.join("top.qcow2"), RANGES);
        let order = chain.layers[0].qcow2().unwrap().header.refcount_order;
        assert_eq!(1u32 << order, bits.parse::<u32>().unwrap());
    }
}

#[test]
fn lazy_refcounts() {
    let t = tempdir();
    let d = t.path();
    create(d, "base.qcow2", "2M", "lazy_refcounts=on", None);
    qemu_io(d, "base.qcow2", &["write -P 0x41 0 2M"]);
    create(
        d,
        "top.qcow2",
        "2M",
        "lazy_refcounts=on",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(
        d,
        "top.qcow2",
        &["write -P 0x42 70000 70000", "write -z 1M 64k"],
    );
    let chain = check_chain(&d.join("top.qcow2"), RANGES);
    assert_eq!(
        chain.layers[0].qcow2().unwrap().header.compatible_features & 1,
        1
    );
}

/// Internal snapshots in an overlay: s1, more writes, a grow, s2, more writes; each snapshot
/// read as `Table::Snapshot(i)` (through the backing file) equals `qemu-img convert -l`.
#[test]
fn internal_snapshots() {
    internal_snapshots_with("");
}

/// The same in a v2 (compat=0.10) overlay.
#[test]
fn internal_snapshots_v2() {
    internal_snapshots_with("compat=0.10");
}

fn internal_snapshots_with(opts: &str) {
    let t = tempdir();
    let d = t.path();
    create(d, "base.qcow2", "4M", "", None);
    qemu_io(d, "base.qcow2", &["write -P 0x51 0 4M"]);
    create(d, "snap.qcow2", "4M", opts, Some(("base.qcow2", "qcow2")));
    qemu_io(
        d,
        "snap.qcow2",
        &["write -P 0x52 64k 64k", "write -c -P 0x53 1M 64k"],
    );
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    qemu_io(
        d,
        "snap.qcow2",
        &[
            "write -P 0x54 64k 4k",
            "write -z 1M 64k",
            "write -P 0x55 2M 100000",
        ],
    );
    // QEMU refuses to resize a v2 image with snapshots.
    let v2 = opts.contains("0.10");
    if !v2 {
        qemu_img(d, &["resize", "-q", "snap.qcow2", "6M"]);
    }
    qemu_img(d, &["snapshot", "-c", "s2", "snap.qcow2"]);
    qemu_io(
        d,
        "snap.qcow2",
        &[
            if v2 {
                "write -P 0x56 3M 64k"
            } else {
                "write -P 0x56 5M 64k"
            },
            "discard 2M 64k",
            "write -P 0x57 0 512",
        ],
    );
    let chain = check_chain(&d.join("snap.qcow2"), RANGES);
    let img = chain.layers[0].qcow2().unwrap();
    assert_eq!(img.snapshots.len(), 2);
    for (i, s) in img.snapshots.iter().enumerate() {
        let name = s.entry.name.clone();
        // Truth 1: apply the snapshot to a copy (in the same directory, so the backing name
        // resolves) and convert it: the disk as the guest saw it, at the snapshot's size.
        let copy = d.join(format!("applied-{name}.qcow2"));
        std::fs::copy(d.join("snap.qcow2"), &copy).unwrap();
        qemu_img(d, &["snapshot", "-a", &name, copy.to_str().unwrap()]);
        let truth = truth_raw(&copy);
        let disk = Disk::new(chain.clone(), 0, Table::Snapshot(i));
        check_reads(
            &disk,
            &truth,
            &format!("snapshot {name}"),
            77 + i as u64,
            RANGES,
        );
        // Truth 2: `convert -l` reads the snapshot's tables but keeps the image's current
        // size (QEMU's load_tmp does not resize): same bytes, zeros beyond the snapshot.
        let by_l = truth_snapshot_raw(&d.join("snap.qcow2"), &name);
        assert_eq!(by_l.len() as u64, img.size());
        assert_same(
            &by_l[..truth.len()],
            &truth,
            0,
            &format!("convert -l {name} vs snapshot -a"),
        );
        assert!(by_l[truth.len()..].iter().all(|&b| b == 0));
    }
    assert_eq!(img.snapshots[0].size, 4 << 20);
    assert_eq!(img.snapshots[1].size, if v2 { 4 << 20 } else { 6 << 20 });
}

// ---------------------------------------------------------------------------------------
// Bitmaps

/// Bitmaps of granularity 512, 64k and the default, enabled and disabled, compared bit for bit
/// with what qemu-nbd exports. Two geometries so that 512-byte bitmaps span several bitmap
/// data clusters (4k clusters: one covers 16 MiB at 512 B granularity; 64k: 256 MiB).
#[test]
fn bitmap_bits_match_qemu() {
    for (cluster, size) in [("64k", "300M"), ("4k", "41943552")] {
        let t = tempdir();
        let d = t.path();
        create(
            d,
            "bm.qcow2",
            size,
            &format!("cluster_size={cluster}"),
            None,
        );
        qemu_img(d, &["bitmap", "--add", "-g", "512", "bm.qcow2", "g512"]);
        qemu_img(d, &["bitmap", "--add", "-g", "64k", "bm.qcow2", "g64k"]);
        qemu_img(d, &["bitmap", "--add", "bm.qcow2", "gdef"]);
        // 40 MiB + 512: the last 64 KiB granule is only partly inside the disk.
        let size_bytes: u64 = if size == "300M" { 300 << 20 } else { 41943552 };
        let near_boundary = if cluster == "64k" {
            (256u64 << 20) - 1000
        } else {
            (16u64 << 20) - 1000
        };
        let a = format!("write -P 0x61 {near_boundary} 3000");
        let last = format!("write -P 0x62 {} 1", size_bytes - 1);
        qemu_io(
            d,
            "bm.qcow2",
            &[
                "write -P 0x63 196608 1",
                "write -P 0x64 720896 70000",
                a.as_str(),
                last.as_str(),
            ],
        );
        // A second generation: a bitmap added later, and one disabled after this round.
        qemu_img(d, &["bitmap", "--add", "-g", "512", "bm.qcow2", "later"]);
        qemu_img(d, &["bitmap", "--disable", "bm.qcow2", "g64k"]);
        qemu_io(
            d,
            "bm.qcow2",
            &[
                "write -z 5M 70000",
                "discard 8M 1M",
                "write -P 0x65 12345 1",
            ],
        );

        let chain = open_chain(&d.join("bm.qcow2"));
        let img = chain.layers[0].qcow2().unwrap();
        let bms = img.bitmaps();
        let names: Vec<&str> = bms.iter().map(|b| b.entry.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        for (i, b) in img.bitmaps().iter().enumerate() {
            let name = b.entry.name.as_str();
            assert!(b.distrust.is_none(), "{name}: {:?}", b.distrust);
            assert!(!b.entry.in_use(), "{name}");
            assert_eq!(b.entry.auto(), name != "g64k", "{name}: auto flag");
            let want_gran = match name {
                "g512" | "later" => 512,
                "g64k" => 65536,
                _ => {
                    if cluster == "4k" {
                        4096
                    } else {
                        65536
                    }
                }
            };
            assert_eq!(b.entry.granularity(), want_gran, "{name}: granularity");
            let ours = ckptfs_dirty_ranges(img, i);
            let qemu = qemu_dirty_ranges(d, "bm.qcow2", name);
            assert_eq!(
                ours, qemu,
                "{cluster} clusters, bitmap {name}: ckptfs bits vs qemu-nbd"
            );
            assert!(!ours.is_empty(), "{name}: no dirty bits at all");
        }
        // The digest's worked example, at 64 KiB granularity: byte 0 = 0x08, byte 1 = 0x18.
        let g = img
            .bitmaps()
            .iter()
            .position(|b| b.entry.name == "g64k")
            .unwrap();
        match img.bitmap_cluster(g, 0).unwrap() {
            BitmapCluster::Data(bits) => assert_eq!(&bits[..2], &[0x08, 0x18]),
            other => panic!("g64k cluster 0: {other:?}"),
        }
    }
}

fn bitmap_fixture(d: &Path) {
    create(d, "iu.qcow2", "16M", "", None);
    qemu_img(d, &["bitmap", "--add", "iu.qcow2", "c1"]);
    qemu_img(d, &["bitmap", "--add", "iu.qcow2", "c2"]);
    qemu_io(d, "iu.qcow2", &["write -P 5 1M 64k"]);
}

#[test]
fn bitmap_in_use_is_distrusted() {
    let t = tempdir();
    let d = t.path();
    bitmap_fixture(d);
    set_bitmap_in_use(&d.join("iu.qcow2"), "c2");
    // QEMU agrees the flag is set.
    let info = String::from_utf8(qemu_img(d, &["info", "--output=json", "iu.qcow2"])).unwrap();
    assert!(info.contains("in-use"), "qemu-img info: {info}");
    let chain = open_chain(&d.join("iu.qcow2"));
    let img = chain.layers[0].qcow2().unwrap();
    let bms = img.bitmaps();
    let c1 = bms.iter().find(|b| b.entry.name == "c1").unwrap();
    let c2 = bms.iter().find(|b| b.entry.name == "c2").unwrap();
    assert!(c1.distrust.is_none(), "c1: {:?}", c1.distrust);
    assert!(c2.entry.in_use());
    let why = c2
        .distrust
        .as_deref()
        .expect("in-use bitmap must be distrusted");
    assert!(
        why.contains("c2") && why.contains("in use"),
        "reason: {why}"
    );
}

#[test]
fn bitmap_autoclear_cleared_is_distrusted() {
    let t = tempdir();
    let d = t.path();
    bitmap_fixture(d);
    clear_autoclear_bitmaps(&d.join("iu.qcow2"));
    // QEMU no longer lists the bitmaps.
    let info = String::from_utf8(qemu_img(d, &["info", "--output=json", "iu.qcow2"])).unwrap();
    assert!(
        !info.contains("\"c1\""),
        "qemu-img info still lists c1: {info}"
    );
    let chain = open_chain(&d.join("iu.qcow2"));
    let img = chain.layers[0].qcow2().unwrap();
    assert_eq!(img.bitmaps().len(), 2);
    for b in &img.bitmaps() {
        let why = b
            .distrust
            .as_deref()
            .unwrap_or_else(|| panic!("{}: must be distrusted", b.entry.name));
        assert!(why.contains("autoclear"), "reason: {why}");
    }
}

// ---------------------------------------------------------------------------------------
// Refusals: Chain::open returns Err with a clear message, never panics.

fn open_err(path: &Path) -> String {
    match Chain::open(path) {
        Ok(c) => panic!(
            "Chain::open({}) succeeded with {} layers; expected a refusal",
            path.display(),
            c.layers.len()
        ),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{}: {msg}", path.display());
            assert!(!msg.is_empty());
            msg
        }
    }
}

#[test]
fn refuse_missing_backing_file() {
    let t = tempdir();
    let d = t.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "orphan.qcow2",
            "1M",
        ],
    );
    let msg = open_err(&d.join("orphan.qcow2"));
    assert!(msg.contains("gone.qcow2"), "{msg}");
    assert!(msg.contains("orphan.qcow2"), "{msg}");
}

#[test]
fn refuse_backing_loop() {
    let t = tempdir();
    let d = t.path();
    create(d, "b.qcow2", "1M", "", None);
    create(d, "a.qcow2", "1M", "", Some(("b.qcow2", "qcow2")));
    qemu_img(
        d,
        &["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"],
    );
    let msg = open_err(&d.join("a.qcow2"));
    assert!(msg.contains("loop"), "{msg}");
}

#[test]
fn refuse_self_loop() {
    let t = tempdir();
    let d = t.path();
    create(d, "self.qcow2", "1M", "", None);
    qemu_img(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    );
    let msg = open_err(&d.join("self.qcow2"));
    assert!(msg.contains("loop"), "{msg}");
}

#[test]
fn refuse_truncated() {
    let t = tempdir();
    let d = t.path();
    // Data first, then a far write whose L2 table lands after the data: cutting the file in
    // half loses that L2 table.
    create(d, "good.qcow2", "2G", "", None);
    qemu_io(
        d,
        "good.qcow2",
        &["write -P 0x11 0 4M", "write -P 0x12 1G 64k"],
    );
    let good = std::fs::read(d.join("good.qcow2")).unwrap();
    std::fs::write(d.join("trunc50.qcow2"), &good[..50]).unwrap();
    let msg = open_err(&d.join("trunc50.qcow2"));
    assert!(msg.contains("trunc50.qcow2"), "{msg}");
    std::fs::write(d.join("half.qcow2"), &good[..good.len() / 2]).unwrap();
    let msg = open_err(&d.join("half.qcow2"));
    assert!(msg.contains("half.qcow2"), "{msg}");
}

/// Half of an image whose metadata all sits before its data: the header, L1 and L2 survive,
/// data clusters lie past EOF. Whether ckptfs refuses at open or at read, it must be an
/// error, not a panic and not silent zeros.
#[test]
fn truncated_data_is_an_error() {
    let t = tempdir();
    let d = t.path();
    create(d, "good.qcow2", "4M", "", None);
    qemu_io(d, "good.qcow2", &["write -P 0x11 0 4M"]);
    let good = std::fs::read(d.join("good.qcow2")).unwrap();
    std::fs::write(d.join("half.qcow2"), &good[..good.len() / 2]).unwrap();
    match Chain::open(&d.join("half.qcow2")) {
        Err(e) => eprintln!("refused at open: {e}"),
        Ok(c) => {
            let disk = Disk::new(std::sync::Arc::new(c), 0, Table::Active);
            let mut buf = vec![0u8; disk.size() as usize];
            let e = disk
                .read(0, &mut buf)
                .expect_err("reading data clusters past EOF must fail");
            eprintln!("refused at read: {e}");
            assert!(e.to_string().contains("half.qcow2"), "{e}");
        }
    }
}

#[test]
fn refuse_luks() {
    let t = tempdir();
    let d = t.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "luks.qcow2",
            "1M",
        ],
    );
    let msg = open_err(&d.join("luks.qcow2"));
    assert!(msg.to_lowercase().contains("encrypt"), "{msg}");
}

#[test]
fn refuse_external_data_file() {
    let t = tempdir();
    let d = t.path();
    create(d, "ed.qcow2", "1M", "data_file=ed.raw", None);
    let msg = open_err(&d.join("ed.qcow2"));
    assert!(msg.to_lowercase().contains("data file"), "{msg}");
}

#[test]
fn refuse_non_qcow2_and_empty() {
    let t = tempdir();
    let d = t.path();
    std::fs::write(d.join("text.img"), b"hello, this is not a disk image\n").unwrap();
    let msg = open_err(&d.join("text.img"));
    assert!(msg.contains("text.img") && msg.contains("qcow2"), "{msg}");
    std::fs::write(d.join("empty.img"), b"").unwrap();
    let msg = open_err(&d.join("empty.img"));
    assert!(msg.contains("empty"), "{msg}");
    // A 1 MiB raw file of zeros is no qcow2 either.
    std::fs::write(d.join("zeros.img"), vec![0u8; 1 << 20]).unwrap();
    open_err(&d.join("zeros.img"));
    // A directory.
    open_err(d);
}

/// Bitmap table entries without a data cluster: bit 0 = 1 means "all ones", 0 "all zeros".
/// QEMU honours both; so must `bitmap_cluster`.
#[test]
fn bitmap_fill_table_entries() {
    let t = tempdir();
    let d = t.path();
    // 4k clusters, 512 B granularity: one bitmap data cluster covers 16 MiB; 40 MiB + 512
    // needs 3 table entries, the last one partly past the end.
    create(d, "fill.qcow2", "41943552", "cluster_size=4k", None);
    qemu_img(d, &["bitmap", "--add", "-g", "512", "fill.qcow2", "b"]);
    qemu_io(
        d,
        "fill.qcow2",
        &[
            "write 1000 5000",
            "write 17M 64k",
            "write 33M 4k",
            "write 41943551 1",
        ],
    );
    let img_path = d.join("fill.qcow2");
    patch_bitmap_table_entry(&img_path, "b", 1, 1);
    patch_bitmap_table_entry(&img_path, "b", 2, 0);
    let chain = open_chain(&img_path);
    let img = chain.layers[0].qcow2().unwrap();
    assert!(matches!(
        img.bitmap_cluster(0, 1).unwrap(),
        BitmapCluster::Fill(true)
    ));
    assert!(matches!(
        img.bitmap_cluster(0, 2).unwrap(),
        BitmapCluster::Fill(false)
    ));
    let ours = ckptfs_dirty_ranges(img, 0);
    let qemu = qemu_dirty_ranges(d, "fill.qcow2", "b");
    assert_eq!(ours, qemu);
    assert!(ours.contains(&(16 << 20, 32 << 20)), "{ours:?}");
}

/// Preallocated images (metadata, falloc, full): every cluster mapped up front, data reads
/// zeros until written.
#[test]
fn preallocated_images() {
    for mode in ["metadata", "falloc", "full"] {
        let t = tempdir();
        let d = t.path();
        create(d, "pre.qcow2", "3M", &format!("preallocation={mode}"), None);
        qemu_io(
            d,
            "pre.qcow2",
            &[
                "write -P 0x81 100000 5000",
                "write -z 1M 64k",
                "discard 2M 64k",
            ],
        );
        check_chain(&d.join("pre.qcow2"), RANGES);
    }
    // Extended L2 allows preallocation over a backing file.
    let t = tempdir();
    let d = t.path();
    create(d, "base.qcow2", "2M", "", None);
    qemu_io(d, "base.qcow2", &["write -P 0x82 0 2M"]);
    create(
        d,
        "pre.qcow2",
        "3M",
        "preallocation=metadata,extended_l2=on",
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io(d, "pre.qcow2", &["write -P 0x83 100000 5000"]);
    check_chain(&d.join("pre.qcow2"), RANGES);
}

/// Writes straddling L2 table boundaries (4k clusters: one table maps 2 MiB; 16k clusters with
/// extended L2: 16 MiB), read and mapped across them.
#[test]
fn l2_table_boundaries() {
    for (opts, size, boundary) in [
        ("cluster_size=4k", "9M", 2u64 << 20),
        ("cluster_size=16k,extended_l2=on", "40M", 16 << 20),
    ] {
        let t = tempdir();
        let d = t.path();
        create(d, "base.qcow2", size, opts, None);
        let w1 = format!("write -P 0x91 {} 10000", boundary - 5000);
        let w2 = format!("write -P 0x92 {} 3", 2 * boundary - 1);
        qemu_io(d, "base.qcow2", &[w1.as_str(), w2.as_str()]);
        create(d, "top.qcow2", size, opts, Some(("base.qcow2", "qcow2")));
        let z = format!("write -z {} {}", boundary - 16384, 32768);
        let w3 = format!("write -P 0x93 {} 100", boundary - 50);
        qemu_io(d, "top.qcow2", &[z.as_str(), w3.as_str()]);
        check_chain(&d.join("top.qcow2"), RANGES);
    }
}

/// The extents text stays within a quarter of the engine's cache budget, including a budget
/// below one 4 KiB allocation step: same text as with a large budget while it fits, EFBIG
/// (ErrorKind::TooLarge) once it does not.
#[test]
fn extents_within_a_small_budget() {
    use ckptfs::checkpoint::{Engine, Model};
    use ckptfs::ErrorKind;
    let t = tempdir();
    let d = t.path();
    create(d, "e.qcow2", "64M", "", None);
    qemu_img(d, &["bitmap", "--add", "e.qcow2", "c1"]);
    // 200 separate 64 KiB runs: about 3 KiB of extents text.
    let writes: Vec<String> = (0..200)
        .map(|i| format!("write -P 1 {}k 64k", i * 256))
        .collect();
    let cmds: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(d, "e.qcow2", &cmds);
    let engine = |budget: u64| {
        let chain = open_chain(&d.join("e.qcow2"));
        Engine::new(Arc::new(Model::build(chain, &Default::default())), budget)
    };
    let big = engine(64 << 20);
    let ci = big
        .model
        .checkpoints
        .iter()
        .position(|c| c.name == "c1")
        .unwrap();
    let want = big.extents(ci).unwrap();
    assert_eq!(want.lines().count(), 200);
    let fits = engine(4 * (want.len() as u64 + 100));
    assert_eq!(
        fits.extents(ci).unwrap(),
        want,
        "a budget just above the text"
    );
    let small = engine(4 * 1000);
    let e = small.extents(ci).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");
    assert!(e.to_string().contains("c1/extents"), "{e}");
}

/// changed.img and bitmap.bin reads write every byte of their buffer (the FUSE layer reuses
/// its reply buffers without zeroing them): at any offset and length, a read into a buffer
/// full of 0xee equals the same read into zeros, and changed.img equals the current disk on
/// the changed runs and zeros elsewhere.
#[test]
fn changed_and_bitmap_reads_write_every_byte() {
    use ckptfs::checkpoint::{Engine, Model};
    let t = tempdir();
    let d = t.path();
    create(d, "b.qcow2", "8M", "", None);
    qemu_io(d, "b.qcow2", &["write -P 0x21 0 8M"]);
    create(d, "t.qcow2", "", "", Some(("b.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "t.qcow2", "c1"]);
    qemu_io(
        d,
        "t.qcow2",
        &[
            "write -P 0x31 100k 200k",
            "write -z 1M 128k",
            "write -P 0x32 3M 64k",
            "discard 5M 64k",
            "write -P 0x33 7M 1M",
        ],
    );
    let engine = Engine::new(
        Arc::new(Model::build(
            open_chain(&d.join("t.qcow2")),
            &Default::default(),
        )),
        64 << 20,
    );
    let ci = engine
        .model
        .checkpoints
        .iter()
        .position(|c| c.name == "c1")
        .unwrap();
    let disk = truth_raw(&d.join("t.qcow2"));
    let extents = engine.extents(ci).unwrap();
    let mut want = vec![0u8; disk.len()];
    for line in extents.lines() {
        let mut w = line.split_whitespace().map(|v| v.parse::<usize>().unwrap());
        let (s, n) = (w.next().unwrap(), w.next().unwrap());
        want[s..s + n].copy_from_slice(&disk[s..s + n]);
    }
    let bitmap_len = engine.bitmap_len(ci) as usize;
    for (off, len) in [
        (0usize, 8usize << 20),
        (4096, 300 << 10),
        (1000, 70_000),
        ((1 << 20) - 1, 200 << 10),
        (5 << 20, 1 << 20),
        ((7 << 20) + 12345, 1 << 20),
    ] {
        let len = len.min(disk.len() - off);
        let mut dirty = vec![0xeeu8; len];
        engine.read_changed(ci, off as u64, &mut dirty).unwrap();
        assert!(dirty == want[off..off + len], "changed.img at {off}+{len}");
        let (boff, blen) = (
            off % bitmap_len,
            (len / 4096).max(1).min(bitmap_len - off % bitmap_len),
        );
        let mut clean = vec![0u8; blen];
        let mut dirty = vec![0xeeu8; blen];
        engine.read_bitmap(ci, boff as u64, &mut clean).unwrap();
        engine.read_bitmap(ci, boff as u64, &mut dirty).unwrap();
        assert_eq!(clean, dirty, "bitmap.bin at {boff}+{blen}");
    }
}

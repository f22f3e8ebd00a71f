//! The README's read-write refusals hold on hostile images made from QEMU-made ones: a file
//! claiming more than 2^32 host clusters is still checked (in bounded memory), guest data
//! placed on any metadata structure is refused naming it (and still read as QEMU reads it),
//! bitmaps QEMU refuses make their checkpoints invalid, and header extensions past cluster 0
//! are refused as QEMU refuses them.

use crate::common::{
    bitmap_entry_offset, create, qemu_img, qemu_io, set_bitmap_in_use, tempdir, truth_raw,
};
use crate::hostile::{be, patch, small_rw_image};
use crate::mountutil::{bin, ckpt_entry, expect_refusal, mount_dir, read, read_json, Mount};
use std::path::Path;
use std::time::{Duration, Instant};

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// `ckptfs -f -o OPTS IMAGE DIR` with its address space limited to `limit_mib`, which must
/// exit within 60 s: (exit code, stderr).
fn run_limited(image: &Path, dir: &Path, opts: &str, limit_mib: u64) -> (Option<i32>, String) {
    use std::os::unix::process::CommandExt;
    let err = dir.with_extension("stderr");
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["-f", "-o", opts])
        .arg(image)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap());
    let limit = libc::rlimit {
        rlim_cur: limit_mib << 20,
        rlim_max: limit_mib << 20,
    };
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ckptfs -o {opts} {} did not exit", image.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(&err).unwrap())
}

/// A 512-byte-cluster file claiming 2^33 host clusters (sparse, 4 TiB): the reference check
/// used to be skipped above 2^32 (a bitmap of them all would take 1 GiB), so guest cluster 1 pointing at a cluster counted free was
/// mounted read-write and the next allocating write landed on that cluster too.
#[test]
fn rw_reference_check_beyond_2_32_host_clusters() {
    let t = tempdir();
    let d = t.path();
    create(d, "big.qcow2", "1M", "cluster_size=512", None);
    qemu_io(d, "big.qcow2", &["write -P 1 0 512"]);
    let p = d.join("big.qcow2");
    let b = std::fs::read(&p).unwrap();
    let l2 = be(&b, be(&b, 40, 8) as usize, 8) & OFFSET_MASK;
    // The first cluster past QEMU's data: counted free, the one an allocation hands out.
    let free = (b.len() as u64).div_ceil(512) * 512;
    patch(&p, l2 + 8, &(free | COPIED).to_be_bytes());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(512 << 33)
        .unwrap();
    let mnt = mount_dir(d, "mnt");
    let msg = expect_refusal(&p, &mnt, Some("rw"), &["refcount is 0"]);
    assert!(msg.contains(&format!("{free:#x}")), "{msg}");
    // In bounded memory: a bit per host cluster would take 1 GiB here.
    let (code, err) = run_limited(&p, &mnt, "rw", 256);
    assert!(
        code == Some(1) && err.contains("refcount is 0"),
        "under a 256 MiB address space limit: {code:?} {err}"
    );
    // Read-only it mounts, and reads what QEMU reads (guest cluster 1 holds zeros there).
    let m = Mount::new(&p, &mnt, None);
    let got = read(&m.path("current/disk.img"));
    assert_eq!(&got[..512], &[1u8; 512][..]);
    assert!(got[512..].iter().all(|&x| x == 0));
    m.unmount();
}

/// An image with bitmap `b1` holding one data cluster (4 KiB clusters, guest cluster 0 written).
fn bitmap_image(d: &Path, name: &str) -> std::path::PathBuf {
    create(d, name, "1M", "cluster_size=4k", None);
    qemu_img(d, &["bitmap", "--add", name, "b1"]);
    qemu_io(d, name, &["write -P 3 0 4k", "write -P 4 64k 4k"]);
    d.join(name)
}

/// Guest cluster 0's data placed on each metadata structure: refused for rw with one line
/// naming the structure (QEMU counts the cluster twice: refcount too low), read-only reads
/// match `qemu-img convert`.
#[test]
fn rw_refuses_data_inside_metadata() {
    let t = tempdir();
    let d = t.path();
    type Target = fn(&Path, &crate::hostile::Layout) -> u64;
    let cases: [(&str, &str, bool, Target); 8] = [
        ("own-l2", "L2 table", false, |_, l| l.l2),
        ("l1", "L1 table", false, |_, l| l.l1),
        ("refblock", "refcount block", false, |_, l| l.refblock),
        ("reftable", "refcount table", false, |_, l| l.reftable),
        ("bitmap-dir", "bitmap directory", true, |p, _| {
            let b = std::fs::read(p).unwrap();
            let hl = be(&b, 100, 4) as usize;
            let mut at = hl;
            while be(&b, at, 4) != 0x2385_2875 {
                at += 8 + (be(&b, at + 4, 4) as usize).div_ceil(8) * 8;
            }
            be(&b, at + 24, 8)
        }),
        ("bitmap-table", "bitmap table", true, |p, _| {
            let b = std::fs::read(p).unwrap();
            be(&b, bitmap_entry_offset(p, "b1") as usize, 8)
        }),
        ("bitmap-data", "bitmap data", true, bitmap_data),
        ("in-use-bitmap-data", "bitmap data", true, |p, l| {
            set_bitmap_in_use(p, "b1");
            bitmap_data(p, l)
        }),
    ];
    for (name, what, bitmaps, target) in cases {
        let file = format!("{name}.qcow2");
        let (p, l) = if bitmaps {
            let p = bitmap_image(d, &file);
            let b = std::fs::read(&p).unwrap();
            let (l1, reftable) = (be(&b, 40, 8), be(&b, 48, 8));
            let l = crate::hostile::Layout {
                l1,
                l2: be(&b, l1 as usize, 8) & OFFSET_MASK,
                reftable,
                refblock: be(&b, reftable as usize, 8),
            };
            (p, l)
        } else {
            small_rw_image(d, &file)
        };
        let host = target(&p, &l);
        patch(&p, l.l2, &(host | COPIED).to_be_bytes());
        let mnt = mount_dir(d, &format!("mnt-{name}"));
        let msg = expect_refusal(&p, &mnt, Some("rw"), &[&format!("inside the {what}")]);
        assert!(msg.contains(&format!("{host:#x}")), "{name}: {msg}");
        let m = Mount::new(&p, &mnt, None);
        let got = read(&m.path("current/disk.img"));
        assert!(
            got == truth_raw(&p),
            "{name}: ro read differs from qemu-img convert"
        );
        m.unmount();
    }
}

/// The data cluster of bitmap b1 (table entry 0).
fn bitmap_data(p: &Path, _: &crate::hostile::Layout) -> u64 {
    let b = std::fs::read(p).unwrap();
    let table = be(&b, bitmap_entry_offset(p, "b1") as usize, 8);
    let e = be(&b, table as usize, 8) & OFFSET_MASK;
    assert_ne!(e, 0, "fixture: b1 has a data cluster");
    e
}

/// granularity_bits outside QEMU's 9..31: QEMU opens the image not at all; ckptfs shows that
/// bitmap's checkpoint as invalid with the reason (it was valid, with changed_bytes 0 at 63),
/// and the other checkpoints still work.
#[test]
fn bitmap_granularity_outside_qemu_range() {
    let t = tempdir();
    let d = t.path();
    for bits in [8u8, 32, 63] {
        let name = format!("g{bits}.qcow2");
        create(d, &name, "4M", "", None);
        qemu_img(d, &["bitmap", "--add", &name, "c1"]);
        qemu_io(d, &name, &["write -P 1 0 64k"]);
        qemu_img(d, &["bitmap", "--add", &name, "c2"]);
        qemu_io(d, &name, &["write -P 2 1M 64k"]);
        let p = d.join(&name);
        patch(&p, bitmap_entry_offset(&p, "c1") + 17, &[bits]);
        let info = crate::common::run_status_in(Some(d), "qemu-img", &["info", &name]);
        let qemu_says = String::from_utf8_lossy(&info.stderr).to_string();
        assert!(
            !info.status.success() && qemu_says.contains("'c1' doesn't satisfy the constraints"),
            "qemu-img info: {qemu_says}"
        );
        let mnt = mount_dir(d, &format!("mnt{bits}"));
        let m = Mount::new(&p, &mnt, None);
        let cj = read_json(&m.path("checkpoints.json"));
        let c1 = ckpt_entry(&cj, "c1");
        assert_eq!(c1["valid"], false, "bits {bits}: {c1}");
        let reason = c1["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(&format!("granularity_bits {bits}, outside QEMU's 9..31")),
            "bits {bits}: {reason}"
        );
        crate::mountutil::assert_eio(&m.path("c1/changed.img"));
        let c2 = ckpt_entry(&cj, "c2");
        assert_eq!(c2["valid"], true, "bits {bits}: {c2}");
        assert_eq!(c2["changed_bytes"], 65536, "bits {bits}: {c2}");
        let changed = read(&m.path("c2/changed.img"));
        assert_eq!(&changed[1 << 20..(1 << 20) + 65536], &[2u8; 65536][..]);
        m.unmount();
        // Read-write is refused: QEMU could not open the image either.
        let msg = expect_refusal(&p, &mnt, Some("rw"), &["granularity_bits"]);
        assert!(msg.contains("QEMU refuses"), "{msg}");
    }
}

/// Header extensions running past cluster 0 (512-byte clusters; ckptfs reads 4 KiB of header)
/// are refused as QEMU refuses them; they used to be accepted, and mkdir on such an rw mount
/// panicked rewriting them.
#[test]
fn header_extensions_past_cluster_0_refused() {
    let t = tempdir();
    let d = t.path();
    create(d, "ext.qcow2", "1M", "cluster_size=512", None);
    let p = d.join("ext.qcow2");
    let hl = be(&std::fs::read(&p).unwrap(), 100, 4);
    let mut ext = 0x1234_5678u32.to_be_bytes().to_vec();
    ext.extend(400u32.to_be_bytes());
    patch(&p, hl, &ext);
    let info = crate::common::run_status_in(Some(d), "qemu-img", &["info", "ext.qcow2"]);
    let qemu_says = String::from_utf8_lossy(&info.stderr).to_string();
    assert!(
        qemu_says.contains("Header extension too large"),
        "qemu-img info: {qemu_says}"
    );
    let mnt = mount_dir(d, "mnt");
    for opts in [Some("rw"), None] {
        expect_refusal(&p, &mnt, opts, &["header extensions run past byte 512"]);
    }
}

/// A compressed cluster whose data lies in the header (offset 0 with the compressed flag, or
/// 0x100): QEMU counts cluster 0 twice (refcount too low) and cannot read it. Refused for rw
/// naming the header (offset 0 used to be taken for unallocated); read-only, the cluster is
/// EIO, as it is for QEMU.
#[test]
fn rw_refuses_compressed_data_in_header() {
    let t = tempdir();
    let d = t.path();
    for off in [0u64, 0x100] {
        let name = format!("comp-header-{off}.qcow2");
        let (p, l) = small_rw_image(d, &name);
        patch(&p, l.l2, &((1u64 << 62) | off).to_be_bytes());
        let r = crate::common::run_status_in(
            Some(d),
            "qemu-img",
            &["convert", "-O", "raw", &name, "x.raw"],
        );
        assert!(!r.status.success(), "qemu-img convert reads {name}");
        let mnt = mount_dir(d, &format!("mnt-{off}"));
        expect_refusal(&p, &mnt, Some("rw"), &["inside the header"]);
        let m = Mount::new(&p, &mnt, None);
        crate::mountutil::assert_eio(&m.path("current/disk.img"));
        m.unmount();
    }
}

/// A compressed cluster whose deflate stream copies from further back than the 4 KiB window
/// QEMU names when it inflates (windowBits -12): zlib still takes the copy from the output of
/// the same call, so QEMU reads it, and ckptfs reads the same bytes. A stream that ends short
/// of the cluster is EIO for both.
#[test]
fn deflate_reaching_past_the_named_window_reads_as_qemu() {
    let t = tempdir();
    let d = t.path();
    // 8 KiB of noise, 8 times: a compressor with a 32 KiB window copies each repeat from
    // 8 KiB back; with a 4 KiB window it cannot.
    let mut x = 0x2545_f491_u32;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 23) as u8
        })
        .collect();
    for (bits, len, readable) in [(12u8, 65536, true), (15, 65536, true), (15, 61440, false)] {
        let name = format!("window-{bits}-{len}.qcow2");
        create(d, &name, "1M", "", None);
        qemu_io(d, &name, &["write -c -P 0x11 0 64k"]);
        let p = d.join(&name);
        let data = noise.repeat(8);
        let mut c =
            flate2::Compress::new_with_window_bits(flate2::Compression::best(), false, bits);
        let mut stream = Vec::with_capacity(2 * data.len());
        c.compress_vec(&data[..len], &mut stream, flate2::FlushCompress::Finish)
            .unwrap();
        // The cluster's L2 entry now points at this stream, appended at a sector boundary.
        let b = std::fs::read(&p).unwrap();
        let l2 = be(&b, be(&b, 40, 8) as usize, 8) & OFFSET_MASK;
        let at = (b.len() as u64).next_multiple_of(512);
        let sectors = (stream.len() as u64).div_ceil(512);
        patch(&p, at, &stream);
        patch(
            &p,
            l2,
            &((1u64 << 62) | (sectors - 1) << 54 | at).to_be_bytes(),
        );
        let raw = format!("{name}.raw");
        let r = crate::common::run_status_in(
            Some(d),
            "qemu-img",
            &["convert", "-O", "raw", &name, &raw],
        );
        assert_eq!(r.status.success(), readable, "qemu-img convert of {name}");
        let m = Mount::new(&p, &mount_dir(d, &format!("mnt-{bits}-{len}")), None);
        let disk = m.path("current/disk.img");
        if readable {
            let want = std::fs::read(d.join(&raw)).unwrap();
            assert!(read(&disk) == want, "{name} reads other bytes than QEMU");
        } else {
            crate::mountutil::assert_eio(&disk);
        }
        m.unmount();
    }
}

//! Mount-level tests: the real `ckptfs` binary mounts fixtures made at test time with
//! qemu-img/qemu-io/qemu-storage-daemon, and every file of the tree is checked against QEMU's
//! own answers (`qemu-img convert`, `qemu-img map`, `qemu-nbd -B` + `nbdinfo`) and a log of
//! the writes made. Harness rules: see `mountutil`.

use crate::common::{
    assert_same, c1_chain, create, qemu_img, qemu_io, tempdir, truth_raw, truth_snapshot_raw,
};
use crate::mountutil::*;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const K64: u64 = 65536;
const M64: u64 = 64 << 20;

/// The cookbook's libvirt scheme (every checkpoint bitmap recording) across an external
/// snapshot, with more writes: unaligned, block-crossing, zeroing over older data, discard,
/// data that happens to be zeros, the last block, and a checkpoint added after the snapshot.
fn libvirt_chain(d: &Path) -> History {
    let mut h = History::default();
    create(d, "vda-1.qcow2", "64M", "", None);
    qemu_img(d, &["bitmap", "--add", "vda-1.qcow2", "c1"]);
    h.mark("c1");
    h.io(
        d,
        "vda-1.qcow2",
        &["write -P 1 0 64k", "write -P 0x41 100000 5000"],
    );
    qemu_img(d, &["bitmap", "--add", "vda-1.qcow2", "c2"]);
    h.mark("c2");
    h.io(
        d,
        "vda-1.qcow2",
        &["write -P 2 1M 64k", "write -P 7 8392704 70000"],
    );
    create(d, "vda-2.qcow2", "", "", Some(("vda-1.qcow2", "qcow2")));
    h.mark("vda-1.qcow2");
    for b in ["c1", "c2"] {
        qemu_img(d, &["bitmap", "--add", "vda-2.qcow2", b]);
    }
    qemu_img(d, &["bitmap", "--add", "vda-2.qcow2", "c3"]);
    h.mark("c3");
    h.io(
        d,
        "vda-2.qcow2",
        &[
            "write -P 3 2M 64k",
            "write -z 3M 64k",
            "discard 0 64k",
            "write -P 0 5M 64k",
            "write -P 0x55 20983865 200000",
            "write -z 1M 64k",
        ],
    );
    qemu_img(d, &["bitmap", "--add", "vda-2.qcow2", "c4"]);
    h.mark("c4");
    h.io(
        d,
        "vda-2.qcow2",
        &["write -P 9 40M 1024", "write -P 0x0a 67043328 64k"],
    );
    h
}

/// Test 1: cumulative libvirt scheme across an external snapshot.
#[test]
fn cumulative_libvirt_scheme_across_external_snapshot() {
    let t = tempdir();
    let d = t.path();
    let h = libvirt_chain(d);
    let top = d.join("vda-2.qcow2");
    let truth = truth_raw(&top);
    let base_truth = truth_raw(&d.join("vda-1.qcow2"));
    let zero = zero_by_metadata(&top);
    assert_eq!(truth.len() as u64, M64);
    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), None);

    let names = ["c1", "c2", "vda-1.qcow2", "c3", "c4"];
    let mut root = vec!["checkpoints.json", "current", "stats.json"];
    root.extend(names);
    root.sort();
    assert_eq!(list_dir(&mnt.dir), root);
    assert_eq!(
        list_dir(&mnt.path("c1")),
        ["bitmap.bin", "changed.img", "extents", "info.json"],
        "a bitmap checkpoint has no disk.img"
    );
    assert_eq!(
        list_dir(&mnt.path("vda-1.qcow2")),
        [
            "bitmap.bin",
            "changed.img",
            "disk.img",
            "extents",
            "info.json"
        ]
    );

    let cj = read_json(&mnt.path("checkpoints.json"));
    assert_eq!(cj["order"], "guessed", "{cj}");
    assert_eq!(ckpt_names(&cj), names, "checkpoints oldest first: {cj}");
    for name in names {
        let expect = h.since_blocks(name, K64, M64);
        check_checkpoint(&mnt, name, K64, &expect, &h.since(name), &truth, &zero);
        let e = ckpt_entry(&cj, name);
        let kind = if name == "vda-1.qcow2" {
            "layer"
        } else {
            "bitmap"
        };
        assert_eq!(e["kind"], kind, "{e}");
        assert_eq!(e["valid"], true, "{e}");
        assert_eq!(e["changed_bytes"], block_bytes(&expect, K64), "{e}");
    }
    // The expectation itself, spelled out for c1 (cookbook: {0, 1M, 2M, 3M} and more).
    let c1 = h.since_blocks("c1", K64, M64);
    assert!(c1.contains(&(0, 2 * K64)) && c1.contains(&(1 << 20, (1 << 20) + K64)));

    assert_same(
        &read(&mnt.path("current/disk.img")),
        &truth,
        0,
        "current/disk.img vs qemu-img convert",
    );
    assert_same(
        &read(&mnt.path("vda-1.qcow2/disk.img")),
        &base_truth,
        0,
        "vda-1.qcow2/disk.img vs qemu-img convert of the layer",
    );
    let info = read_json(&mnt.path("current/info.json"));
    assert!(info.is_object(), "{info}");
    mnt.unmount();
}

/// A chain whose virtual size is not a multiple of the granularity (164 blocks of 64 KiB, the
/// last one 1536 bytes), with the digest's bit-order examples.
const ODD: u64 = 10 * 1024 * 1024 + 3 * K64 + 1536;

fn odd_chain(d: &Path) -> History {
    let mut h = History::default();
    create(d, "b.qcow2", &ODD.to_string(), "", None);
    qemu_img(d, &["bitmap", "--add", "b.qcow2", "c1"]);
    h.mark("c1");
    h.io(
        d,
        "b.qcow2",
        &["write -P 9 196608 1", "write -P 8 720896 70000"],
    );
    qemu_img(d, &["bitmap", "--add", "b.qcow2", "c2"]);
    h.mark("c2");
    h.io(d, "b.qcow2", &[&format!("write -P 7 {} 1536", ODD - 1536)]);
    create(d, "t.qcow2", "", "", Some(("b.qcow2", "qcow2")));
    h.mark("b.qcow2");
    for b in ["c1", "c2", "c3"] {
        qemu_img(d, &["bitmap", "--add", "t.qcow2", b]);
    }
    h.mark("c3");
    h.io(d, "t.qcow2", &["write -P 6 5M 1", "write -z 6M 128k"]);
    h
}

/// Test 2: bitmap.bin bit order against QEMU's own merged bitmap.
#[test]
fn bitmap_bin_bit_order_matches_qemu() {
    let t = tempdir();
    let d = t.path();
    let h = odd_chain(d);
    let (b, top) = (d.join("b.qcow2"), d.join("t.qcow2"));
    let truth = truth_raw(&top);
    assert_eq!(truth.len() as u64, ODD);
    let zero = zero_by_metadata(&top);
    // since(C) = C and every later checkpoint in C's layer, and the same in the layer above
    // (its bitmaps continue the ones below).
    let sources: [(&str, Vec<(&Path, &str)>); 3] = [
        (
            "c1",
            vec![
                (&b, "c1"),
                (&b, "c2"),
                (&top, "c1"),
                (&top, "c2"),
                (&top, "c3"),
            ],
        ),
        ("c2", vec![(&b, "c2"), (&top, "c2"), (&top, "c3")]),
        ("c3", vec![(&top, "c3")]),
    ];
    let qemu: Vec<(&str, Vec<(u64, u64)>)> = sources
        .iter()
        .map(|(n, src)| (*n, qemu_since(d, n, &top, src)))
        .collect();
    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), None);
    for (name, q) in &qemu {
        let bits = read(&mnt.path(&format!("{name}/bitmap.bin")));
        let got = decode_bitmap(&bits, K64, ODD, name);
        let want = round_to_blocks(q, K64, ODD);
        assert_eq!(
            got, want,
            "{name}: bitmap.bin (bit j of byte i = block 8i+j) vs QEMU's merged bitmap \
             {q:?}\nbytes: {bits:02x?}"
        );
        assert_eq!(
            want,
            h.since_blocks(name, K64, ODD),
            "{name}: QEMU vs the write log"
        );
        check_checkpoint(&mnt, name, K64, &want, &h.since(name), &truth, &zero);
        if *name == "c1" {
            // Digest examples: 1 byte at 196608 -> byte 0 = 0x08; 70000 bytes at 720896 ->
            // byte 1 = 0x18; the partial last block 163 -> byte 20 = 0x08, tail bits zero.
            assert_eq!(bits.len(), 21);
            assert_eq!(bits[0], 0x08, "{bits:02x?}");
            assert_eq!(bits[1], 0x18, "{bits:02x?}");
            assert_eq!(bits[20], 0x08, "{bits:02x?}");
        }
    }
    // The layer checkpoint: allocation of t.qcow2.
    let expect = h.since_blocks("b.qcow2", K64, ODD);
    check_checkpoint(
        &mnt,
        "b.qcow2",
        K64,
        &expect,
        &h.since("b.qcow2"),
        &truth,
        &zero,
    );
    mnt.unmount();
}

/// Test 3: the delta scheme with `c2^c1` names.
#[test]
fn delta_scheme_with_caret_names() {
    let t = tempdir();
    let d = t.path();
    let mut h = History::default();
    create(d, "d-base.qcow2", "64M", "", None);
    qemu_img(d, &["bitmap", "--add", "d-base.qcow2", "c1"]);
    h.mark("c1");
    h.io(d, "d-base.qcow2", &["write 0 64k"]);
    qemu_img(d, &["bitmap", "--disable", "d-base.qcow2", "c1"]);
    qemu_img(d, &["bitmap", "--add", "d-base.qcow2", "c2^c1"]);
    h.mark("c2");
    h.io(d, "d-base.qcow2", &["write 1M 64k"]);
    create(d, "d-top.qcow2", "", "", Some(("d-base.qcow2", "qcow2")));
    h.mark("d-base.qcow2");
    qemu_img(d, &["bitmap", "--add", "d-top.qcow2", "c2^c1"]);
    h.io(d, "d-top.qcow2", &["write 2M 64k"]);
    let (base, top) = (d.join("d-base.qcow2"), d.join("d-top.qcow2"));
    let truth = truth_raw(&top);
    let zero = zero_by_metadata(&top);
    let q_c1 = qemu_since(
        d,
        "c1",
        &top,
        &[(&base, "c1"), (&base, "c2^c1"), (&top, "c2^c1")],
    );
    let q_c2 = qemu_since(d, "c2", &top, &[(&base, "c2^c1"), (&top, "c2^c1")]);

    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), None);
    let root = list_dir(&mnt.dir);
    assert!(
        root.contains(&"c2".to_string()) && !root.iter().any(|n| n.contains('^')),
        "the c2^c1 checkpoint's directory is c2: {root:?}"
    );
    let cj = read_json(&mnt.path("checkpoints.json"));
    assert_eq!(ckpt_names(&cj), ["c1", "c2", "d-base.qcow2"], "{cj}");
    let c1 = h.since_blocks("c1", K64, M64);
    assert_eq!(
        c1,
        [
            (0, K64),
            (1 << 20, (1 << 20) + K64),
            (2 << 20, (2 << 20) + K64)
        ]
    );
    assert_eq!(c1, round_to_blocks(&q_c1, K64, M64), "since(c1) vs QEMU");
    let c2 = h.since_blocks("c2", K64, M64);
    assert_eq!(c2, round_to_blocks(&q_c2, K64, M64), "since(c2) vs QEMU");
    check_checkpoint(&mnt, "c1", K64, &c1, &h.since("c1"), &truth, &zero);
    check_checkpoint(&mnt, "c2", K64, &c2, &h.since("c2"), &truth, &zero);
    let l = h.since_blocks("d-base.qcow2", K64, M64);
    check_checkpoint(
        &mnt,
        "d-base.qcow2",
        K64,
        &l,
        &h.since("d-base.qcow2"),
        &truth,
        &zero,
    );
    mnt.unmount();
}

fn checkpoint_xml(name: &str, parent: Option<&str>, time: u64, bitmap: &str) -> String {
    let parent = parent.map_or(String::new(), |p| {
        format!("  <parent>\n    <name>{p}</name>\n  </parent>\n")
    });
    format!(
        "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE\n\
         OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:\n  \
         virsh checkpoint-edit vm1 {name}\nor other application using the libvirt API.\n-->\n\n\
         <domaincheckpoint>\n  <name>{name}</name>\n{parent}  <creationTime>{time}</creationTime>\n  \
         <disks>\n    <disk name='vdb' checkpoint='bitmap' bitmap='vdb-{bitmap}'/>\n    \
         <disk name='vda' checkpoint='bitmap' bitmap='{bitmap}'/>\n    \
         <disk name='vdc' checkpoint='no'/>\n  </disks>\n  <domain type='kvm'>\n    \
         <name>vm1</name>\n    <uuid>6f1c7a84-4d2e-4f8e-9b0a-2b6b8f0c1d11</uuid>\n    \
         <memory unit='KiB'>1048576</memory>\n    <devices>\n      \
         <disk type='file' device='disk'>\n        <driver name='qemu' type='qcow2'/>\n        \
         <source file='/var/lib/libvirt/images/vm1.qcow2'/>\n        \
         <target dev='vda' bus='virtio'/>\n      </disk>\n    </devices>\n  </domain>\n\
         </domaincheckpoint>\n"
    )
}

/// Test 4: libvirt checkpoint XML: order from parents (creation times tie, the base's bitmap
/// directory lists c2 before c1), a listed checkpoint without a bitmap is invalid with EIO on
/// its since-set files, a bitmap libvirt does not know is shown under its own name.
#[test]
fn libvirt_metadata_order_and_missing_bitmap() {
    let t = tempdir();
    let d = t.path();
    let mut h = History::default();
    let size = 16u64 << 20;
    create(d, "base.qcow2", "16M", "", None);
    // c2 first in the directory, but created (enabled) after c1: c1 = {1M, 2M}, c2 = {2M}.
    qemu_img(d, &["bitmap", "--add", "--disable", "base.qcow2", "c2"]);
    qemu_img(d, &["bitmap", "--add", "base.qcow2", "c1"]);
    h.mark("c1");
    h.io(d, "base.qcow2", &["write -P 0x0b 1M 64k"]);
    qemu_img(d, &["bitmap", "--enable", "base.qcow2", "c2"]);
    h.mark("c2");
    h.io(d, "base.qcow2", &["write -P 0x0c 2M 64k"]);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    h.mark("base.qcow2");
    for b in ["c1", "c2", "c3"] {
        qemu_img(d, &["bitmap", "--add", "top.qcow2", b]);
    }
    h.mark("c3");
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "adhoc"]);
    h.mark("adhoc");
    h.io(d, "top.qcow2", &["write -P 0x0d 3M 64k"]);
    let top = d.join("top.qcow2");
    let info: serde_json::Value =
        serde_json::from_slice(&qemu_img(d, &["info", "--output=json", "base.qcow2"])).unwrap();
    let dir_order: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(dir_order, ["c2", "c1"], "fixture: base's bitmap directory");

    let ck = d.join("checkpoint-vm1");
    std::fs::create_dir(&ck).unwrap();
    // Written newest first; c2, c3 and c4 share one creation second.
    for (name, parent, time) in [
        ("c4", Some("c3"), 1_700_000_005),
        ("c3", Some("c2"), 1_700_000_005),
        ("c2", Some("c1"), 1_700_000_005),
        ("c1", None, 1_700_000_000),
    ] {
        std::fs::write(
            ck.join(format!("{name}.xml")),
            checkpoint_xml(name, parent, time, name),
        )
        .unwrap();
    }
    let truth = truth_raw(&top);
    let zero = zero_by_metadata(&top);
    let opts = format!("checkpoints={}", s(&ck));
    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), Some(&opts));
    let cj = read_json(&mnt.path("checkpoints.json"));
    assert_eq!(cj["order"], "metadata", "{cj}");
    let names = ckpt_names(&cj);
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("no checkpoint {n}: {names:?}"))
    };
    assert!(
        pos("c1") < pos("c2")
            && pos("c2") < pos("base.qcow2")
            && pos("base.qcow2") < pos("c3")
            && pos("c3") < pos("c4"),
        "order c1 < c2 < base.qcow2 < c3 < c4 expected: {names:?}"
    );
    assert!(pos("adhoc") > pos("base.qcow2"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("vdb-") || n == "vm1"),
        "{names:?}"
    );
    for name in ["c1", "c2", "c3"] {
        let expect = h.since_blocks(name, K64, size);
        check_checkpoint(&mnt, name, K64, &expect, &h.since(name), &truth, &zero);
    }
    // Parents, not the directory order: since(c2) must not include c1's 1M block.
    assert_eq!(
        h.since_blocks("c2", K64, size),
        [(2 << 20, (2 << 20) + K64), (3 << 20, (3 << 20) + K64)]
    );
    let adhoc = h.since_blocks("adhoc", K64, size);
    check_checkpoint(&mnt, "adhoc", K64, &adhoc, &h.since("adhoc"), &truth, &zero);

    // c4: listed, no bitmap anywhere.
    let c4 = ckpt_entry(&cj, "c4");
    assert_eq!(c4["valid"], false, "{c4}");
    assert!(c4["reason"].as_str().is_some_and(|r| !r.is_empty()), "{c4}");
    for f in ["changed.img", "bitmap.bin", "extents"] {
        assert_eio(&mnt.path(&format!("c4/{f}")));
    }
    let info = read_json(&mnt.path("c4/info.json"));
    assert_eq!(info["valid"], false, "{info}");
    assert_same(
        &read(&mnt.path("current/disk.img")),
        &truth,
        0,
        "current/disk.img",
    );
    // Still working after the EIOs.
    check_checkpoint(
        &mnt,
        "c1",
        K64,
        &h.since_blocks("c1", K64, size),
        &h.since("c1"),
        &truth,
        &zero,
    );
    mnt.unmount();
}

/// Test 5: an internal snapshot.
#[test]
fn internal_snapshot_checkpoint() {
    let t = tempdir();
    let d = t.path();
    let size = 16u64 << 20;
    let mut h = History::default();
    create(d, "snap.qcow2", "16M", "", None);
    qemu_io(d, "snap.qcow2", &["write -P 1 0 4M", "write -P 4 12M 64k"]);
    qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]);
    h.mark("s1");
    h.io(
        d,
        "snap.qcow2",
        &[
            "write -P 2 1M 4k",
            "write -z 2M 64k",
            "write -P 3 10M 100000",
            "discard 12M 64k",
        ],
    );
    let img = d.join("snap.qcow2");
    let truth = truth_raw(&img);
    // `qemu-img convert -l s1` (the snapshot's name; `-l snapshot.name=s1` is the long form).
    let s1 = truth_snapshot_raw(&img, "s1");
    assert_ne!(s1, truth);
    let zero = zero_by_metadata(&img);
    let mnt = Mount::new(&img, &mount_dir(d, "mnt"), None);
    let cj = read_json(&mnt.path("checkpoints.json"));
    let e = ckpt_entry(&cj, "s1");
    assert_eq!(e["kind"], "snapshot", "{e}");
    assert_eq!(e["valid"], true, "{e}");
    assert_same(
        &read(&mnt.path("s1/disk.img")),
        &s1,
        0,
        "s1/disk.img vs convert -l s1",
    );
    let expect = h.since_blocks("s1", K64, size);
    check_checkpoint(&mnt, "s1", K64, &expect, &h.since("s1"), &truth, &zero);
    assert_same(
        &read(&mnt.path("current/disk.img")),
        &truth,
        0,
        "current/disk.img",
    );
    mnt.unmount();
}

/// qemu-storage-daemon serving `image` read-write over NBD: its guard and NBD URI.
fn start_nbd_writer(d: &Path, image: &Path, tag: &str) -> (PidFileDaemon, String) {
    let (daemon, r) = start_writer(d, image, tag);
    assert!(r.ok, "qemu-storage-daemon: {}{}", r.stdout, r.stderr);
    let sock = d.join(format!("{tag}.sock"));
    (daemon, format!("nbd+unix:///q?socket={}", s(&sock)))
}

fn nbd_write(d: &Path, uri: &str, cmd: &str) {
    let r = run_files(Some(d), "qemu-io", &["-f", "raw", "-c", cmd, uri]);
    assert!(
        r.ok && !r.stdout.contains("failed"),
        "qemu-io {cmd} {uri}: {}{}",
        r.stdout,
        r.stderr
    );
}

/// Test 6: in-use bitmaps, from a crashed writer and from a live one.
#[test]
fn in_use_bitmaps_crashed_and_live_writer() {
    let t = tempdir();
    let d = t.path();
    // Crashed writer.
    create(d, "iu.qcow2", "16M", "", None);
    qemu_img(d, &["bitmap", "--add", "iu.qcow2", "c1"]);
    let iu = d.join("iu.qcow2");
    {
        let (qsd, uri) = start_nbd_writer(d, &iu, "qsd");
        nbd_write(d, &uri, "write -P 5 1M 64k");
        qsd.signal_and_wait(libc::SIGKILL);
    }
    let info = String::from_utf8(qemu_img(d, &["info", "iu.qcow2"])).unwrap();
    assert!(info.contains("in-use"), "fixture: {info}");
    let truth = truth_raw(&iu);
    {
        let mnt = Mount::new(&iu, &mount_dir(d, "mnt"), None);
        let cj = read_json(&mnt.path("checkpoints.json"));
        let c1 = ckpt_entry(&cj, "c1");
        assert_eq!(c1["valid"], false, "{c1}");
        let reason = c1["reason"].as_str().unwrap_or("").to_lowercase();
        assert!(
            reason.contains("in use") || reason.contains("in_use") || reason.contains("in-use"),
            "reason should say the bitmap is in use: {c1}"
        );
        for f in ["changed.img", "bitmap.bin", "extents"] {
            assert_eio(&mnt.path(&format!("c1/{f}")));
        }
        assert_eq!(read_json(&mnt.path("c1/info.json"))["valid"], false);
        assert_same(
            &read(&mnt.path("current/disk.img")),
            &truth,
            0,
            "current/disk.img",
        );
        mnt.unmount();
    }

    // Live writer: an overlay held by a running qemu-storage-daemon.
    let live = c1_chain(
        d,
        ["live-base.qcow2", "live.qcow2"],
        "16M",
        &["write -P 0x31 0 2M"],
        &["write -P 0x32 4M 64k"],
    );
    let (qsd, uri) = start_nbd_writer(d, &live, "live");
    nbd_write(d, &uri, "write -P 0x33 6M 64k");
    let dir = mount_dir(d, "mnt-live");
    match Mount::try_new(&live, &dir, None) {
        Ok(_m) => panic!("a plain mount of an image a running QEMU writes must be refused"),
        Err(r) => {
            let msg = r.stderr.to_lowercase();
            assert!(
                msg.contains("lock") || msg.contains("in use") || msg.contains("open for writing"),
                "the refusal should mention the lock / the writer: {r:?}"
            );
            assert!(
                msg.contains("force_share"),
                "the refusal should name the way out: {r:?}"
            );
            assert_ne!(r.code, Some(0));
        }
    }
    assert!(!is_mounted(&dir), "nothing mounted after the refusal");
    assert!(
        reap_daemons(&dir, Duration::from_secs(2)),
        "no daemon may be left after the refusal"
    );
    {
        let mnt = Mount::new(&live, &dir, Some("ro,force_share"));
        let cj = read_json(&mnt.path("checkpoints.json"));
        let c1 = ckpt_entry(&cj, "c1");
        assert_eq!(c1["valid"], false, "{c1}");
        let reason = c1["reason"].as_str().unwrap_or("").to_lowercase();
        assert!(
            reason.contains("live")
                || reason.contains("in use")
                || reason.contains("in_use")
                || reason.contains("running"),
            "reason should say the image is live: {c1}"
        );
        let layer = ckpt_entry(&cj, "live-base.qcow2");
        assert_eq!(layer["valid"], true, "{layer}");
        for f in ["changed.img", "bitmap.bin", "extents"] {
            assert_eio(&mnt.path(&format!("c1/{f}")));
        }
        // Both read what is on disk now (the writer is idle).
        let out = d.join("live.truth.raw");
        qemu_img(d, &["convert", "-U", "-O", "raw", "live.qcow2", s(&out)]);
        let truth = std::fs::read(&out).unwrap();
        assert_same(
            &read(&mnt.path("current/disk.img")),
            &truth,
            0,
            "live current/disk.img",
        );
        mnt.unmount();
    }
    qsd.signal_and_wait(libc::SIGTERM);
}

fn dd(args: &[String]) {
    let r = run_files(None, "dd", args);
    assert!(r.ok, "dd {args:?}: {}", r.stderr);
}

/// Apply one incremental onto `rebuild_a` (data ranges of the sparse copy `inc`, plus the
/// `zero` runs of `extents`) and onto `rebuild_b` (dd of every `extents` line).
fn apply_incremental(
    mnt: &Mount,
    ckpt: &str,
    work: &Path,
    n: usize,
    rebuild_a: &Path,
    rebuild_b: &Path,
) {
    let changed = mnt.path(&format!("{ckpt}/changed.img"));
    let inc = work.join(format!("inc{n}.img"));
    cp_sparse(&changed, &inc);
    let ext_text = read_text(&mnt.path(&format!("{ckpt}/extents")));
    let ext = parse_extents(&ext_text, ckpt);
    let changed_ranges = merge(ext.iter().map(|e| (e.off, e.off + e.len)).collect());
    // The sparse copy holds only changed blocks.
    let inc_map = seek_map_local(&inc).unwrap();
    assert!(
        subtract(&inc_map, &changed_ranges).is_empty(),
        "inc{n}: data outside the changed ranges: {inc_map:?} vs {changed_ranges:?}"
    );
    let inc_meta = std::fs::metadata(&inc).unwrap();
    assert!(
        inc_meta.blocks() * 512 <= total(&changed_ranges),
        "inc{n}: cp --sparse=always copied {} bytes for {} changed",
        inc_meta.blocks() * 512,
        total(&changed_ranges)
    );
    // (a) every changed range zeroed (cp --sparse=always turns changed blocks that now read
    // zeros into holes), then the data ranges of the sparse copy.
    {
        let src = File::open(&inc).unwrap();
        let dst = std::fs::OpenOptions::new()
            .write(true)
            .open(rebuild_a)
            .unwrap();
        for x in &ext {
            dst.write_all_at(&vec![0u8; x.len as usize], x.off).unwrap();
        }
        for (s, e) in &inc_map {
            let buf = pread_full(&src, *s, (e - s) as usize).unwrap();
            dst.write_all_at(&buf, *s).unwrap();
        }
    }
    // (b) dd of every extents line, from changed.img or /dev/zero.
    for x in &ext {
        let input = if x.zero {
            "/dev/zero".to_string()
        } else {
            s(&changed).to_string()
        };
        let mut a = vec![
            format!("if={input}"),
            format!("of={}", s(rebuild_b)),
            "bs=1M".into(),
            "iflag=count_bytes".into(),
            "oflag=seek_bytes".into(),
            format!("seek={}", x.off),
            format!("count={}", x.len),
            "conv=notrunc".into(),
            "status=none".into(),
        ];
        if !x.zero {
            a[3] = "iflag=skip_bytes,count_bytes".into();
            a.push(format!("skip={}", x.off));
        }
        dd(&a);
    }
}

/// Test 7: a full backup from the mount, then two incrementals (cp --sparse=always of
/// changed.img, and dd of extents), rebuilt and compared with the image.
#[test]
fn incremental_backup_chain() {
    let t = tempdir();
    let d = t.path();
    let data = crate::common::varied_data(32 << 20, 0x1234);
    std::fs::write(d.join("seed.raw"), &data).unwrap();
    qemu_img(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "seed.raw",
            "base.qcow2",
        ],
    );
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_io(d, "top.qcow2", &["write -P 0x10 0 1M", "write -z 2M 64k"]);
    let top = d.join("top.qcow2");
    let dir = mount_dir(d, "mnt");
    let work = d.join("backup");
    std::fs::create_dir(&work).unwrap();
    let full = work.join("full.raw");
    {
        let mnt = Mount::new(&top, &dir, None);
        cp_sparse(&mnt.path("current/disk.img"), &full);
        mnt.unmount();
    }
    assert_image_equals_raw(&full, &top, "full backup");
    let (ra, rb) = (work.join("rebuild-a.raw"), work.join("rebuild-b.raw"));
    std::fs::copy(&full, &ra).unwrap();
    std::fs::copy(&full, &rb).unwrap();

    let rounds: [(&str, &[&str]); 2] = [
        (
            "c1",
            &[
                "write -P 0x21 1M 64k",
                "write -P 0x22 5000000 300000",
                "write -z 8M 128k",
                "discard 12M 64k",
                "write -P 0 16M 64k",
                "write -z 0 4k",
            ],
        ),
        (
            "c2",
            &[
                "write -P 0x31 1M 4k",
                "write -P 0x32 20M 1M",
                "write -z 5000000 100000",
                "discard 24M 128k",
                "write -P 0x33 33488896 65536",
            ],
        ),
    ];
    for (n, (ckpt, writes)) in rounds.iter().enumerate() {
        qemu_img(d, &["bitmap", "--add", "top.qcow2", ckpt]);
        qemu_io(d, "top.qcow2", writes);
        let mnt = Mount::new(&top, &dir, None);
        apply_incremental(&mnt, ckpt, &work, n + 1, &ra, &rb);
        mnt.unmount();
        assert_image_equals_raw(&ra, &top, "rebuilt from sparse copies + zero runs");
        assert_image_equals_raw(&rb, &top, "rebuilt by dd of extents lines");
    }
}

/// Test 8: mount errors.
#[test]
fn mount_errors_leave_nothing_behind() {
    let t = tempdir();
    let d = t.path();
    create(d, "base.qcow2", "4M", "", None);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    create(d, "good.qcow2", "4M", "", None);
    let top = d.join("top.qcow2");
    let good = d.join("good.qcow2");
    let dir = mount_dir(d, "mnt");

    // Non-empty mount point.
    let full = mount_dir(d, "full");
    std::fs::write(full.join("file"), b"x").unwrap();
    expect_refusal(&good, &full, None, &["empty"]);
    // Unknown option (named), rw with force_share.
    expect_refusal(&good, &dir, Some("ro,frobnicate"), &["frobnicate"]);
    expect_refusal(&good, &dir, Some("rw,force_share"), &["force_share"]);
    // Empty and non-qcow2 files.
    std::fs::write(d.join("empty.qcow2"), b"").unwrap();
    expect_refusal(&d.join("empty.qcow2"), &dir, None, &["empty.qcow2"]);
    std::fs::write(d.join("text.qcow2"), vec![b'x'; 4096]).unwrap();
    expect_refusal(&d.join("text.qcow2"), &dir, None, &["text.qcow2"]);
    // A backing loop.
    create(d, "la.qcow2", "4M", "", None);
    create(d, "lb.qcow2", "", "", Some(("la.qcow2", "qcow2")));
    qemu_img(
        d,
        &["rebase", "-u", "-b", "lb.qcow2", "-F", "qcow2", "la.qcow2"],
    );
    expect_refusal(&d.join("lb.qcow2"), &dir, None, &["loop"]);
    // Missing backing file: named, with where it was looked for.
    std::fs::remove_file(d.join("base.qcow2")).unwrap();
    expect_refusal(
        &top,
        &dir,
        None,
        &["base.qcow2", s(&d.canonicalize().unwrap())],
    );
    // The mount point still works afterwards.
    let m = Mount::new(&good, &dir, None);
    assert!(exists(&m.path("current/disk.img")));
    m.unmount();
}

/// Make `ckptfs` reachable on mount(8)'s fixed PATH. NOTE: this symlinks the test binary to
/// /usr/local/bin/ckptfs when nothing is there (or the link there is dangling) and leaves it
/// in place, since other tests may be using it concurrently.
fn install_on_mount_path() -> PathBuf {
    let link = PathBuf::from("/usr/local/bin/ckptfs");
    let dangling = std::fs::symlink_metadata(&link).is_ok() && !link.exists();
    if dangling {
        let _ = std::fs::remove_file(&link);
    }
    if std::fs::symlink_metadata(&link).is_err() {
        let _ = std::os::unix::fs::symlink(bin(), &link);
    }
    assert!(link.exists(), "cannot make /usr/local/bin/ckptfs");
    link
}

fn check_helper_mount(dir: &Path, truth: &[u8], what: &str) {
    assert!(is_mounted(dir), "{what}: not mounted");
    let cj = read_json(&dir.join("checkpoints.json"));
    assert_eq!(ckpt_names(&cj), ["c1"], "{what}: {cj}");
    assert_same(&read(&dir.join("current/disk.img")), truth, 0, what);
    let info = read_json(&dir.join("current/info.json"));
    assert!(
        info.to_string().contains("allow_other"),
        "{what}: options in info.json: {info}"
    );
}

/// Test 9: mount(8) with type fuse.ckptfs, type fuse with `prog#source`, and an fstab line.
#[test]
fn mount_helper_and_fstab() {
    let t = tempdir();
    let d = t.path();
    create(d, "vm.qcow2", "8M", "", None);
    qemu_img(d, &["bitmap", "--add", "vm.qcow2", "c1"]);
    qemu_io(d, "vm.qcow2", &["write -P 0x61 1M 64k"]);
    let img = d.join("vm.qcow2");
    let truth = truth_raw(&img);
    install_on_mount_path();

    // mount -t fuse.ckptfs, with a relative source (mount.fuse passes it verbatim; ckptfs
    // must resolve it against the caller's directory).
    let dir = mount_dir(d, "m1");
    let r = run_files(
        Some(d),
        "mount",
        &[
            "-t",
            "fuse.ckptfs",
            "vm.qcow2",
            s(&dir),
            "-o",
            "ro,allow_other",
        ],
    );
    let m = Mount::adopt(&dir);
    assert!(r.ok, "mount -t fuse.ckptfs: {r:?}");
    check_helper_mount(&dir, &truth, "mount -t fuse.ckptfs");
    m.unmount();

    // mount -t fuse '/path/to/ckptfs#IMAGE'.
    let dir = mount_dir(d, "m2");
    let src = format!("{}#{}", bin(), s(&img));
    let r = run_files(
        None,
        "mount",
        &["-t", "fuse", &src, s(&dir), "-o", "ro,allow_other"],
    );
    let m = Mount::adopt(&dir);
    assert!(r.ok, "mount -t fuse {src}: {r:?}");
    check_helper_mount(&dir, &truth, "mount -t fuse prog#src");
    m.unmount();

    // fstab line through mount -T.
    let dir = mount_dir(d, "m3");
    let fstab = d.join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n{}  {}  fuse.ckptfs  ro,allow_other,noauto,nofail,_netdev  0 0\n",
            s(&img),
            s(&dir)
        ),
    )
    .unwrap();
    let r = run_files(None, "mount", &["-T", s(&fstab), s(&dir)]);
    let m = Mount::adopt(&dir);
    assert!(r.ok, "mount -T fstab: {r:?}");
    check_helper_mount(&dir, &truth, "mount -T fstab");
    m.unmount();
}

fn qemu_io_write_status(d: &Path, image: &str) -> Ran {
    run_files(Some(d), "qemu-io", &["-c", "write -P 0x77 0 4k", image])
}

/// Test 10: unmounting (fusermount3 -u, and SIGTERM to a foreground ckptfs) leaves the images
/// untouched and releases the locks; while mounted, a QEMU writer is locked out.
#[test]
fn clean_unmount_keeps_images_and_releases_locks() {
    let t = tempdir();
    let d = t.path();
    let top = c1_chain(
        d,
        ["base.qcow2", "top.qcow2"],
        "8M",
        &["write -P 1 0 2M"],
        &["write -P 2 1M 64k"],
    );
    let files: Vec<PathBuf> = ["base.qcow2", "top.qcow2"]
        .iter()
        .map(|f| d.join(f))
        .collect();
    let before: Vec<_> = files.iter().map(|f| snapshot_file(f)).collect();
    let truth = truth_raw(&top);
    let dir = mount_dir(d, "mnt");
    let unchanged = |when: &str| {
        for (f, b) in files.iter().zip(&before) {
            let now = snapshot_file(f);
            assert!(now.0 == b.0, "{when}: {} changed", f.display());
            assert_eq!(now.1, b.1, "{when}: {} mtime changed", f.display());
        }
    };

    // Daemon mode, fusermount3 -u.
    let m = Mount::new(&top, &dir, None);
    let _ = read(&m.path("c1/changed.img"));
    assert_same(
        &read(&m.path("current/disk.img")),
        &truth,
        0,
        "current/disk.img",
    );
    for img in ["top.qcow2", "base.qcow2"] {
        let r = qemu_io_write_status(d, img);
        assert!(
            !r.ok && (r.stderr + &r.stdout).to_lowercase().contains("lock"),
            "a QEMU write to {img} while mounted must fail with a lock error"
        );
    }
    m.unmount();
    unchanged("after fusermount3 -u");

    // Foreground child, SIGTERM.
    let mut m = Mount::foreground(&top, &dir, None, &d.join("fg.log"));
    let _ = read(&m.path("c1/bitmap.bin"));
    let r = qemu_io_write_status(d, "top.qcow2");
    assert!(!r.ok, "locked while mounted (foreground): {r:?}");
    let pid = m.child_pid().unwrap();
    // SAFETY: kill(2) of the ckptfs child this test spawned.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let st = m.wait_child(ACCESS_TIMEOUT);
    assert!(st.success(), "ckptfs -f after SIGTERM: {st}");
    assert!(!is_mounted(&dir), "SIGTERM must unmount");
    drop(m);
    unchanged("after SIGTERM");

    // Daemon mode, SIGTERM to the daemon (the only ckptfs naming this unique mount point).
    let m = Mount::new(&top, &dir, None);
    let _ = read(&m.path("c1/extents"));
    let pids = ckptfs_pids_for(&dir);
    assert_eq!(pids.len(), 1, "daemon for {}: {pids:?}", dir.display());
    // SAFETY: kill(2) of the daemon serving this test's unique mount point.
    unsafe { libc::kill(pids[0], libc::SIGTERM) };
    assert!(
        wait_pid_gone(pids[0], ACCESS_TIMEOUT),
        "the daemon did not exit on SIGTERM"
    );
    assert!(!is_mounted(&dir), "SIGTERM to the daemon must unmount");
    drop(m);
    unchanged("after SIGTERM to the daemon");

    // Locks released: QEMU can write now.
    for img in ["top.qcow2", "base.qcow2"] {
        let r = qemu_io_write_status(d, img);
        assert!(
            r.ok && !r.stdout.contains("failed"),
            "qemu-io write to {img} after unmount: {r:?}"
        );
    }
}

/// Test 11: parallel readers of current/disk.img and a changed.img.
#[test]
fn parallel_readers() {
    let t = tempdir();
    let d = t.path();
    let size = 48u64 << 20;
    let data = crate::common::varied_data(size as usize, 0xabcdef);
    std::fs::write(d.join("seed.raw"), &data).unwrap();
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "seed.raw",
            "base.qcow2",
        ],
    );
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    qemu_img(d, &["bitmap", "--add", "top.qcow2", "c1"]);
    let mut h = History::default();
    h.mark("c1");
    let mut rng = crate::common::Prng(99);
    let mut cmds = Vec::new();
    for i in 0..24 {
        let off = rng.range(0, size - 300_000);
        let len = rng.range(1, 300_000);
        cmds.push(if i % 5 == 4 {
            format!("write -z {} {}", off / 512 * 512, len.div_ceil(512) * 512)
        } else {
            format!("write -P {} {off} {len}", 0x40 + i)
        });
    }
    let cmd_refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    h.io(d, "top.qcow2", &cmd_refs);
    let top = d.join("top.qcow2");
    let truth = std::sync::Arc::new(truth_raw(&top));
    let expect = h.since_blocks("c1", K64, size);
    let changed_truth = std::sync::Arc::new(masked(&truth, &expect));
    let mnt = Mount::new(&top, &mount_dir(d, "mnt"), None);
    let files = [
        (mnt.path("current/disk.img"), truth.clone()),
        (mnt.path("c1/changed.img"), changed_truth.clone()),
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    for th in 0..4u64 {
        let files = files.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(|| {
                let opened: Vec<(File, &std::sync::Arc<Vec<u8>>, &PathBuf)> = files
                    .iter()
                    .map(|(p, t)| (File::open(p).unwrap(), t, p))
                    .collect();
                let mut rng = crate::common::Prng(th * 7919 + 1);
                for _ in 0..150 {
                    let (f, want, p) = &opened[(rng.next() % 2) as usize];
                    let len = rng.range(1, 400_000) as usize;
                    let off = rng.range(0, size + 100_000);
                    let got = pread_full(f, off, len).unwrap();
                    let end = ((off as usize).saturating_add(len)).min(want.len());
                    let exp: &[u8] = if (off as usize) < want.len() {
                        &want[off as usize..end]
                    } else {
                        &[]
                    };
                    assert_same(&got, exp, off, &format!("thread {th}: {}", p.display()));
                }
            });
            let _ = tx.send(r.map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            }));
        });
    }
    drop(tx);
    for _ in 0..4 {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => panic!("reader failed: {msg}"),
            Err(_) => panic!("parallel readers did not finish within 120 s (hung filesystem?)"),
        }
    }
    check_checkpoint(
        &mnt,
        "c1",
        K64,
        &expect,
        &h.since("c1"),
        &truth,
        &zero_by_metadata(&top),
    );
    mnt.unmount();
}

/// The harness itself: a daemon that stops answering makes an access fail by timeout (not
/// hang), and the guard still unmounts and ends the daemon (by its PID).
#[test]
fn harness_recovers_from_a_hung_daemon() {
    let t = tempdir();
    let d = t.path();
    create(d, "h.qcow2", "4M", "", None);
    let mnt = Mount::new(&d.join("h.qcow2"), &mount_dir(d, "mnt"), None);
    let dir = mnt.dir.clone();
    let pids = ckptfs_pids_for(&dir);
    assert_eq!(
        pids.len(),
        1,
        "one daemon serves {}: {pids:?}",
        dir.display()
    );
    // SAFETY: kill(2) of the daemon serving this test's unique mount point.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    let p = mnt.path("current/disk.img");
    let r = std::panic::catch_unwind(move || {
        timed_for(
            "read from a stopped daemon",
            Duration::from_secs(3),
            move || std::fs::read(p).map(|v| v.len()),
        )
    });
    assert!(r.is_err(), "a read from a stopped daemon must time out");
    drop(mnt);
    assert!(!is_mounted(&dir), "the guard must unmount a hung mount");
    assert!(
        ckptfs_pids_for(&dir).is_empty(),
        "the guard must end the hung daemon"
    );
}

/// The daemon leaves the caller's directory: a ckptfs started from a directory on another
/// mount must not keep that mount busy (its cwd is `/`, as libfuse's daemonize does).
#[test]
fn daemon_keeps_no_directory_busy() {
    let d = tempdir();
    create(d.path(), "top.qcow2", "1M", "", None);
    let dir = mount_dir(d.path(), "mnt");
    let cwd = d.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let r = run_files(
        Some(&cwd),
        bin(),
        &[d.path().join("top.qcow2").as_os_str(), dir.as_os_str()],
    );
    assert!(r.ok, "ckptfs failed: {}{}", r.stdout, r.stderr);
    let m = Mount::adopt(&dir);
    let pids = ckptfs_pids_for(&m.dir);
    assert_eq!(
        pids.len(),
        1,
        "one daemon for {}: {pids:?}",
        m.dir.display()
    );
    let daemon_cwd = std::fs::read_link(format!("/proc/{}/cwd", pids[0])).unwrap();
    assert_eq!(daemon_cwd, Path::new("/"), "daemon's working directory");
    m.unmount();
}

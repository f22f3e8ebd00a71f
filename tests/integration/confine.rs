//! What users may do with a mount root makes for them: read only what the layer files let them
//! read (allow_other confinement), and change nothing but what the README lists (errnos).
//!
//! 1. `allow_other_refuses_layers_the_owner_cannot_read`: a user's image backed by a root-only
//!    file (absolute name, symlink, `../`, a probed raw with no backing format, a 0644 file in a
//!    0700 directory, a 0644 file whose ACL denies the user): root's `-o allow_other` mount is
//!    refused with one line naming the layer; ACLs that grant the user r (file) and x
//!    (directory) let the mount go ahead; without allow_other only root enters.
//! 2. `allow_other_tree_bits_are_anded_over_layers`: a user's own 0600 chain is readable by
//!    that user through root's allow_other mount and by no other user; the tree keeps the group
//!    (other) read bit only when every layer grants it to that whole class.
//! 3. `tree_changes_get_erofs_or_eperm`: unlink, rename, create, mknod, link, symlink, setxattr,
//!    removexattr, chmod, utime on a read-only mount (also remounted rw, so the requests reach
//!    ckptfs) and on an rw mount.
//!
//! Harness rules (see `mountutil`): every mount is owned by a guard, every access to the
//! mounted tree runs under a timeout.

use crate::common::{self, create, qemu_img, tempdir};
use crate::mountutil::*;
use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Numeric ids with no passwd or group entry: setpriv and chown take them as they are.
const STRANGER: (u32, u32) = (61_001, 61_001);
const GROUP_TOP: u32 = 61_010;
const GROUP_BASE: u32 = 61_011;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

/// A temp dir every user may enter.
fn open_dir() -> tempfile::TempDir {
    let t = tempdir();
    chmod(t.path(), 0o755);
    t
}

/// Turn the image's backing-format header extension into an unknown one (which QEMU and
/// ckptfs skip): the backing file is then probed, as for images made before `-F` existed.
fn drop_backing_format(image: &Path) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut be = |off: u64| {
        let mut b = [0u8; 4];
        f.seek(SeekFrom::Start(off)).unwrap();
        f.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b) as u64
    };
    let mut off = be(100);
    loop {
        let (ty, len) = (be(off), be(off + 4));
        assert_ne!(ty, 0, "no backing format extension in {}", image.display());
        if ty == 0xe279_2aca {
            break;
        }
        off += 8 + len.div_ceil(8) * 8;
    }
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&0x7a7a_7a7au32.to_be_bytes()).unwrap();
    let info = String::from_utf8_lossy(&qemu_img(
        image.parent().unwrap(),
        &["info", image.to_str().unwrap()],
    ))
    .to_string();
    assert!(
        info.contains("backing file:") && !info.contains("backing file format"),
        "{info}"
    );
}

#[test]
fn allow_other_refuses_layers_the_owner_cannot_read() {
    let user = other_user();
    let t = open_dir();
    let d = t.path();
    // A root-only secret (as /etc/shadow is), and a world-readable one in a root-only
    // directory (as files in /root often are).
    let secret = d.join("secret.raw");
    std::fs::write(&secret, common::varied_data(1 << 20, 7)).unwrap();
    chmod(&secret, 0o600);
    std::fs::create_dir(d.join("private")).unwrap();
    chmod(&d.join("private"), 0o700);
    let hidden = d.join("private/notes.raw");
    std::fs::write(&hidden, common::varied_data(1 << 20, 8)).unwrap();
    chmod(&hidden, 0o644);
    std::os::unix::fs::symlink("secret.raw", d.join("link.raw")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    chmod(&d.join("sub"), 0o755);

    let abs = secret.to_str().unwrap().to_string();
    let evil: [(&str, &str, &str); 5] = [
        ("abs.qcow2", &abs, "secret.raw"),
        ("link.qcow2", "link.raw", "secret.raw"),
        ("sub/up.qcow2", "../secret.raw", "secret.raw"),
        ("probed.qcow2", "secret.raw", "secret.raw"),
        (
            "hidden.qcow2",
            "private/notes.raw",
            "private is not searchable",
        ),
    ];
    for (name, backing, says) in evil {
        create(d, name, "", "", Some((backing, "raw")));
        let top = d.join(name);
        if name == "probed.qcow2" {
            drop_backing_format(&top);
        }
        chown(&top, user.0, user.1);
        chmod(&top, 0o644);
        let mnt = mount_dir(d, &format!("mnt-{}", name.replace('/', "-")));
        let msg = expect_refusal(
            &top,
            &mnt,
            Some("allow_other"),
            &[
                says,
                "not readable by the owner of",
                &format!("(uid {}", user.0),
                "refused with allow_other",
            ],
        );
        assert!(msg.contains(name), "{name}: {msg}");
        // rw too: refused before anything is written.
        let before = std::fs::read(&top).unwrap();
        expect_refusal(
            &top,
            &mnt,
            Some("rw,allow_other"),
            &["refused with allow_other"],
        );
        assert_eq!(
            std::fs::read(&top).unwrap(),
            before,
            "{name}: rw wrote the image"
        );
    }

    // POSIX ACLs decide where present (set as xattrs: no setfacl needed). A 0644 file whose ACL
    // names the user with no rights is refused; a root-only file in a root-only directory whose
    // ACLs give the user r and x is theirs: the mount goes ahead, the user reads, nobody else.
    let denied_acl = d.join("denied.raw");
    std::fs::write(&denied_acl, common::varied_data(1 << 20, 9)).unwrap();
    set_acl(
        &denied_acl,
        &[
            (1, 6, 0),
            (2, 0, user.0),
            (4, 4, 0),
            (0x10, 4, 0),
            (0x20, 4, 0),
        ],
    );
    create(d, "acl-denied.qcow2", "", "", Some(("denied.raw", "raw")));
    let top = d.join("acl-denied.qcow2");
    chown(&top, user.0, user.1);
    let msg = expect_refusal(
        &top,
        &mount_dir(d, "mnt-acl-denied"),
        Some("allow_other"),
        &[],
    );
    assert!(
        msg.contains("denied.raw: not readable by the owner"),
        "{msg}"
    );
    let granted = d.join("private/granted.raw");
    std::fs::write(&granted, common::varied_data(1 << 20, 10)).unwrap();
    set_acl(
        &granted,
        &[
            (1, 6, 0),
            (2, 4, user.0),
            (4, 0, 0),
            (0x10, 4, 0),
            (0x20, 0, 0),
        ],
    );
    let dir_acl = [
        (1, 7, 0),
        (2, 1, user.0),
        (4, 0, 0),
        (0x10, 1, 0),
        (0x20, 0, 0),
    ];
    set_acl(&d.join("private"), &dir_acl);
    create(
        d,
        "acl-granted.qcow2",
        "",
        "",
        Some(("private/granted.raw", "raw")),
    );
    let top = d.join("acl-granted.qcow2");
    chown(&top, user.0, user.1);
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-acl-granted"), Some("allow_other"));
    let disk = mnt.path("current/disk.img");
    assert_eq!(
        metadata(&disk).mode() & 0o777,
        0o400,
        "only the owner's bit is kept"
    );
    let got = other_reads(user, &disk, "ACL granted");
    common::assert_same(
        &got,
        &common::truth_raw(&top),
        0,
        "the user reads the granted layer",
    );
    assert_denied(
        STRANGER,
        "cat",
        &[disk.as_os_str()],
        "ACL granted: a stranger",
    );
    mnt.unmount();

    // Without allow_other only root (the mounter) enters: the same image mounts, root reads the
    // chain as QEMU does, the user cannot even stat inside.
    let top = d.join("abs.qcow2");
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-root-only"), None);
    let disk = mnt.path("current/disk.img");
    assert_eq!(read(&disk), common::truth_raw(&top), "root reads the chain");
    assert_denied(user, "stat", &[disk.as_os_str()], "no allow_other: stat");
    mnt.unmount();
}

/// Give `path` this POSIX access ACL: (tag, perm, id) entries in the kernel's order.
fn set_acl(path: &Path, entries: &[(u16, u16, u32)]) {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        let id = if tag == 2 || tag == 8 { id } else { u32::MAX };
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let name = c"system.posix_acl_access";
    // SAFETY: NUL-terminated names and a buffer of `v.len()` bytes that outlive the call.
    let r = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    assert_eq!(
        r,
        0,
        "set an ACL on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// A two-layer chain (base <- top) of `owner`'s files, with a layer checkpoint for the base.
fn own_chain(d: &Path, owner: (u32, u32)) -> (PathBuf, PathBuf) {
    create(d, "base.qcow2", "2M", "", None);
    common::qemu_io(d, "base.qcow2", &["write -P 0x41 0 1M"]);
    create(d, "top.qcow2", "", "", Some(("base.qcow2", "qcow2")));
    common::qemu_io(d, "top.qcow2", &["write -P 0x42 1M 64k"]);
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    for p in [&base, &top] {
        chown(p, owner.0, owner.1);
    }
    (base, top)
}

#[test]
fn allow_other_tree_bits_are_anded_over_layers() {
    let owner = other_user();
    let t = open_dir();
    let d = t.path();
    let (base, top) = own_chain(d, owner);
    let truth = common::truth_raw(&top);
    let base_truth = common::truth_raw(&base);
    let member = (STRANGER.0 + 1, GROUP_TOP);
    let mode_of = |mnt: &Mount, rel: &str| metadata(&mnt.path(rel)).mode() & 0o777;

    // The user's own private chain: the user reads it through root's mount, nobody else does.
    chmod(&top, 0o600);
    chmod(&base, 0o600);
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-own"), Some("allow_other"));
    assert_eq!(mode_of(&mnt, "current/disk.img"), 0o400);
    let got = other_reads(owner, &mnt.path("current/disk.img"), "own chain");
    common::assert_same(&got, &truth, 0, "own chain: current/disk.img as its owner");
    let layer = mnt.path("base.qcow2/disk.img");
    let got = other_reads(owner, &layer, "own chain, layer checkpoint");
    common::assert_same(&got, &base_truth, 0, "own chain: base.qcow2/disk.img");
    for rel in [
        "current/disk.img",
        "base.qcow2/disk.img",
        "checkpoints.json",
    ] {
        let p = mnt.path(rel);
        assert_denied(
            STRANGER,
            "cat",
            &[p.as_os_str()],
            &format!("own chain: {rel}"),
        );
    }
    mnt.unmount();

    // Top 0644 over a 0600 base of the same owner: others may not read the base's bytes.
    chmod(&top, 0o644);
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-other"), Some("allow_other"));
    assert_eq!(mode_of(&mnt, "current/disk.img"), 0o400, "other bit AND-ed");
    assert_eq!(mode_of(&mnt, "current"), 0o500);
    for rel in ["current/disk.img", "base.qcow2/disk.img"] {
        let p = mnt.path(rel);
        assert_denied(
            STRANGER,
            "cat",
            &[p.as_os_str()],
            &format!("0644 over 0600: {rel}"),
        );
    }
    mnt.unmount();

    // Top 0640 in group G over a 0640 base in group H: a member of G (not H) may not read.
    chmod(&top, 0o640);
    chmod(&base, 0o640);
    chown(&top, owner.0, GROUP_TOP);
    chown(&base, owner.0, GROUP_BASE);
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-group"), Some("allow_other"));
    assert_eq!(mode_of(&mnt, "current/disk.img"), 0o400, "group bit AND-ed");
    let p = mnt.path("current/disk.img");
    assert_denied(member, "cat", &[p.as_os_str()], "group G over group H");
    mnt.unmount();

    // Both layers in group G: the member reads, others do not.
    chown(&base, owner.0, GROUP_TOP);
    let mnt = Mount::new(&top, &mount_dir(d, "mnt-group-ok"), Some("allow_other"));
    assert_eq!(mode_of(&mnt, "current/disk.img"), 0o440);
    let got = other_reads(member, &mnt.path("current/disk.img"), "group G over G");
    common::assert_same(&got, &truth, 0, "group member reads current/disk.img");
    let p = mnt.path("current/disk.img");
    assert_denied(
        STRANGER,
        "cat",
        &[p.as_os_str()],
        "group G over G: stranger",
    );
    let info = read_json(&mnt.path("current/info.json"));
    assert_eq!(
        info["mount_options"]["default_permissions"],
        serde_json::json!(true),
        "allow_other enables default_permissions: {info}"
    );
    mnt.unmount();
}

/// The errno of `f` run under the access timeout (0: it worked).
fn errno_of(what: &str, f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> i32 {
    match timed(what, f) {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn xattr(path: &Path, set: bool) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated names and a 1-byte value that outlive the calls.
    let r = unsafe {
        if set {
            libc::setxattr(p.as_ptr(), c"user.x".as_ptr(), c"1".as_ptr().cast(), 1, 0)
        } else {
            libc::removexattr(p.as_ptr(), c"user.x".as_ptr())
        }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Every change of the tree but mkdir/rmdir and writing disk.img: (name, errno on a read-only
/// mount, errno on an rw mount).
fn check_changes(mnt: &Mount, entry: i32, xattrs: i32, owner: i32, times: i32, what: &str) {
    let f = mnt.path("checkpoints.json");
    let disk = mnt.path("current/disk.img");
    let dir = mnt.path("current");
    let new = mnt.path("new");
    type Op = Box<dyn FnOnce() -> std::io::Result<()> + Send>;
    let ops: Vec<(&str, i32, Op)> = vec![
        ("unlink", entry, {
            let f = f.clone();
            Box::new(move || std::fs::remove_file(f))
        }),
        ("rename", entry, {
            let (f, new) = (f.clone(), new.clone());
            Box::new(move || std::fs::rename(f, new))
        }),
        ("rename dir", entry, {
            let (dir, new) = (dir.clone(), new.clone());
            Box::new(move || std::fs::rename(dir, new))
        }),
        ("create", entry, {
            let new = new.clone();
            Box::new(move || std::fs::File::create(new).map(drop))
        }),
        ("mknod", entry, {
            let new = new.clone();
            Box::new(move || {
                let p = CString::new(new.as_os_str().as_bytes()).unwrap();
                // SAFETY: a NUL-terminated path that outlives the call.
                match unsafe { libc::mkfifo(p.as_ptr(), 0o644) } {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            })
        }),
        ("link", entry, {
            let (f, new) = (f.clone(), new.clone());
            Box::new(move || std::fs::hard_link(f, new))
        }),
        ("symlink", entry, {
            let new = new.clone();
            Box::new(move || std::os::unix::fs::symlink("checkpoints.json", new))
        }),
        ("setxattr", xattrs, {
            let f = f.clone();
            Box::new(move || xattr(&f, true))
        }),
        ("removexattr", xattrs, {
            let disk = disk.clone();
            Box::new(move || xattr(&disk, false))
        }),
        ("chmod", owner, {
            let disk = disk.clone();
            Box::new(move || std::fs::set_permissions(disk, std::fs::Permissions::from_mode(0o666)))
        }),
        ("chown", owner, {
            let f = f.clone();
            Box::new(move || std::os::unix::fs::chown(f, Some(1), None))
        }),
        ("utime", times, {
            let disk = disk.clone();
            Box::new(move || {
                std::fs::File::open(disk)?.set_modified(std::time::SystemTime::UNIX_EPOCH)
            })
        }),
    ];
    let mut wrong = Vec::new();
    for (name, want, op) in ops {
        let got = errno_of(&format!("{what}: {name}"), op);
        if got != want {
            wrong.push(format!(
                "{name}: got {} ({got}), want {} ({want})",
                std::io::Error::from_raw_os_error(got),
                std::io::Error::from_raw_os_error(want)
            ));
        }
    }
    assert!(wrong.is_empty(), "{what}:\n{}", wrong.join("\n"));
    assert!(!exists(&new), "{what}: a new entry appeared");
    assert!(exists(&f) && exists(&dir), "{what}: an entry went away");
}

#[test]
fn tree_changes_get_erofs_or_eperm() {
    let t = tempdir();
    let d = t.path();
    let top = common::c1_chain(d, ["base.qcow2", "top.qcow2"], "4M", &[], &[]);
    let before = common::truth_raw(&top);
    let (rofs, perm, nosup) = (libc::EROFS, libc::EPERM, libc::EOPNOTSUPP);

    let mnt = Mount::new(&top, &mount_dir(d, "mnt-ro"), None);
    check_changes(&mnt, rofs, rofs, rofs, rofs, "ro");
    // Remounted rw by root: the kernel no longer answers for ckptfs, which must say EROFS.
    let r = run_files(
        None,
        "mount",
        &[
            OsStr::new("-i"),
            OsStr::new("-o"),
            OsStr::new("remount,rw"),
            mnt.dir.as_os_str(),
        ],
    );
    assert!(r.ok, "mount -o remount,rw: {}", r.stderr);
    check_changes(&mnt, rofs, rofs, rofs, rofs, "ro remounted rw");
    mnt.unmount();

    let mnt = Mount::new(&top, &mount_dir(d, "mnt-rw"), Some("rw"));
    check_changes(&mnt, perm, nosup, perm, 0, "rw");
    mnt.unmount();
    assert_eq!(common::truth_raw(&top), before, "the disk changed");
    assert_check_clean(&top, "after the rw mount");
}

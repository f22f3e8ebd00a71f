//! Who may read a chain's bytes. A mount that other users enter (`allow_other`) shows files
//! whose bytes come from every layer, so it must not let anyone read more than the layer files
//! themselves would let them: the top's owner must be able to read every layer (else the mount
//! is refused), and the tree keeps its group and other read bits only where every layer is
//! readable by that whole class. A layer is judged by its own mode or POSIX access ACL and by
//! every directory from `/` down to it, walked with `O_NOFOLLOW` along the open file's real
//! path (so a symlink or `../` in a backing name is judged where it really leads, and a file
//! swapped while mounting is noticed). Nothing here knows FUSE.

use crate::chain::Chain;
use crate::error::{Error, ErrorKind, Result};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

const READ: u16 = 4;
const SEARCH: u16 = 1;

/// One entry of a POSIX ACL (a plain mode is the ACL of `UserObj`, `GroupObj` and `Other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    UserObj,
    User(u32),
    GroupObj,
    Group(u32),
    Mask,
    Other,
}

/// What one file allows: its owner and group, and its mode bits or POSIX access ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Perms {
    uid: u32,
    gid: u32,
    entries: Vec<(Tag, u16)>,
}

/// A class of users the tree's mode bits speak for.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// One user with these groups (the tree's owner bits).
    User { uid: u32, groups: &'a [u32] },
    /// Every member of this group (the tree's group bits).
    Members(u32),
    /// Everyone (the tree's other bits).
    Anyone,
}

impl Perms {
    pub fn from_mode(uid: u32, gid: u32, mode: u32) -> Perms {
        let bits = |shift: u32| ((mode >> shift) & 7) as u16;
        Perms {
            uid,
            gid,
            entries: vec![
                (Tag::UserObj, bits(6)),
                (Tag::GroupObj, bits(3)),
                (Tag::Other, bits(0)),
            ],
        }
    }

    /// From the value of `system.posix_acl_access` (version 2: a 4-byte header, then 8-byte
    /// little-endian entries tag u16, perm u16, id u32); None when it is not a valid ACL.
    pub fn from_acl(uid: u32, gid: u32, xattr: &[u8]) -> Option<Perms> {
        let (head, rest) = xattr.split_first_chunk::<4>()?;
        if u32::from_le_bytes(*head) != 2 || rest.len() % 8 != 0 {
            return None;
        }
        let mut entries = Vec::with_capacity(rest.len() / 8);
        for e in rest.chunks_exact(8) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let perm = u16::from_le_bytes([e[2], e[3]]) & 7;
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            entries.push((
                match tag {
                    0x01 => Tag::UserObj,
                    0x02 => Tag::User(id),
                    0x04 => Tag::GroupObj,
                    0x08 => Tag::Group(id),
                    0x10 => Tag::Mask,
                    0x20 => Tag::Other,
                    _ => return None,
                },
                perm,
            ));
        }
        let has = |t: Tag| entries.iter().any(|(x, _)| *x == t);
        (has(Tag::UserObj) && has(Tag::GroupObj) && has(Tag::Other)).then_some(Perms {
            uid,
            gid,
            entries,
        })
    }

    /// The permission an entry grants once the mask (if any) is applied.
    fn effective(&self, tag: Tag, perm: u16) -> u16 {
        let mask = self
            .entries
            .iter()
            .find(|(t, _)| *t == Tag::Mask)
            .map_or(7, |(_, p)| *p);
        match tag {
            Tag::User(_) | Tag::GroupObj | Tag::Group(_) => perm & mask,
            _ => perm,
        }
    }

    fn matching(&self, f: impl Fn(Tag) -> bool) -> Vec<(Tag, u16)> {
        self.entries
            .iter()
            .copied()
            .filter(|&(t, _)| f(t))
            .collect()
    }

    /// Does `who` get `want` (READ or SEARCH) on this file? For one user, the kernel's
    /// algorithm (owner, named user, any matching group, other; root always); for a class,
    /// only if every user that may belong to it does.
    pub fn allows(&self, who: Who, want: u16) -> bool {
        let grants = |t: Tag, p: u16| self.effective(t, p) & want == want;
        let all = |skip_other: bool| {
            self.entries
                .iter()
                .filter(|(t, _)| *t != Tag::Mask && !(skip_other && *t == Tag::Other))
                .all(|&(t, p)| grants(t, p))
        };
        match who {
            Who::User { uid: 0, .. } => true,
            Who::User { uid, groups } => {
                // The first class that matches decides: owner, named user, groups, other.
                let mine = self.matching(|t| match t {
                    Tag::UserObj => uid == self.uid,
                    Tag::User(id) => id == uid,
                    _ => false,
                });
                if let Some(&(t, p)) = mine.first() {
                    return grants(t, p);
                }
                let ours = self.matching(|t| match t {
                    Tag::GroupObj => groups.contains(&self.gid),
                    Tag::Group(id) => groups.contains(&id),
                    _ => false,
                });
                if !ours.is_empty() {
                    return ours.iter().any(|&(t, p)| grants(t, p));
                }
                self.matching(|t| t == Tag::Other)
                    .iter()
                    .any(|&(t, p)| grants(t, p))
            }
            // A member of the file's own group matches its group entries, never `Other`.
            Who::Members(gid) => all(false) || (gid == self.gid && all(true)),
            Who::Anyone => all(false),
        }
    }
}

/// The owner, group and mode bits a mount's tree carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeOwner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// The top image's owner, group and mode. With `confine` (a mount other users enter): refuse
/// when the owner cannot read some layer, and drop the group (other) read bit unless every
/// layer is readable by every member of the top's group (by everyone).
pub fn tree_owner(chain: &Chain, confine: bool) -> Result<TreeOwner> {
    let top = chain.top();
    let meta = top
        .file()
        .metadata()
        .map_err(|e| Error::io(format!("{}: stat", top.path.display()), e))?;
    let mut owner = TreeOwner {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode(),
    };
    if !confine {
        return Ok(owner);
    }
    let groups = user_groups(owner.uid);
    let user = Who::User {
        uid: owner.uid,
        groups: &groups,
    };
    for layer in &chain.layers {
        let w = walk(layer.file()).map_err(|e| e.context(layer.path.display()))?;
        let named = if w.real == layer.path {
            layer.path.display().to_string()
        } else {
            format!("{} ({})", layer.path.display(), w.real.display())
        };
        if let Some(why) = w.denies(user) {
            return Err(Error::new(
                ErrorKind::Refused,
                format!(
                    "{named}: not readable by the owner of {} (uid {}{why}); refused with allow_other",
                    top.path.display(),
                    owner.uid
                ),
            ));
        }
        if w.denies(Who::Members(owner.gid)).is_some() {
            owner.mode &= !0o040;
        }
        if w.denies(Who::Anyone).is_some() {
            owner.mode &= !0o004;
        }
    }
    Ok(owner)
}

/// A layer file's real path, what every directory from `/` down to it allows, and what the
/// file itself allows.
struct Walk {
    real: PathBuf,
    dirs: Vec<(PathBuf, Perms)>,
    file: Perms,
}

impl Walk {
    /// None when `who` may read the file through its path, else why not (for the message).
    fn denies(&self, who: Who) -> Option<String> {
        if let Some((d, _)) = self.dirs.iter().find(|(_, p)| !p.allows(who, SEARCH)) {
            return Some(format!(": {} is not searchable", d.display()));
        }
        (!self.file.allows(who, READ)).then(String::new)
    }
}

/// Walk the open file's real path (the kernel's name for it, from /proc/self/fd) one
/// component at a time with `O_NOFOLLOW`, and check that it ends at the same file.
fn walk(file: &File) -> Result<Walk> {
    let proc = format!("/proc/self/fd/{}", file.as_raw_fd());
    let real = std::fs::read_link(&proc)
        .map_err(|e| Error::io(format!("cannot find its path ({proc})"), e))?;
    let names: Vec<&std::ffi::OsStr> = real
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let Some((last, parents)) = names.split_last().filter(|_| real.is_absolute()) else {
        return Err(Error::invalid(format!(
            "{}: not an absolute path to a file",
            real.display()
        )));
    };
    let mut at = PathBuf::from("/");
    let mut dir = File::open(&at).map_err(|e| Error::io("/", e))?;
    let mut dirs = vec![(at.clone(), perms(&dir, &at)?)];
    for name in parents {
        at.push(name);
        dir = open_at(&dir, name, libc::O_DIRECTORY, &at)?;
        dirs.push((at.clone(), perms(&dir, &at)?));
    }
    at.push(last);
    let found = open_at(&dir, last, 0, &at)?;
    let (a, b) = (meta(&found, &at)?, meta(file, &at)?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(Error::invalid(format!(
            "{}: replaced while being mounted",
            at.display()
        )));
    }
    Ok(Walk {
        file: perms(file, &at)?,
        real,
        dirs,
    })
}

fn meta(f: &File, path: &Path) -> Result<std::fs::Metadata> {
    f.metadata()
        .map_err(|e| Error::io(format!("{}: stat", path.display()), e))
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW | extra)`: a handle that only names the file, so
/// no read permission is needed and nothing (a FIFO, a device) is opened for real.
fn open_at(dir: &File, name: &std::ffi::OsStr, extra: i32, path: &Path) -> Result<File> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| Error::invalid(format!("{}: NUL in a file name", path.display())))?;
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra;
    // SAFETY: `dir` is an open descriptor and `c` a NUL-terminated name; openat only reads them.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::io(
            format!("{}: cannot walk to it", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: openat just returned this descriptor, owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// What an open file (or an O_PATH handle) allows: its ACL when it has one, else its mode.
fn perms(f: &File, path: &Path) -> Result<Perms> {
    let m = meta(f, path)?;
    let proc = CString::new(format!("/proc/self/fd/{}", f.as_raw_fd())).expect("no NUL");
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: both names are NUL-terminated and `buf` is writable for `buf.len()` bytes.
    let n = unsafe {
        libc::getxattr(
            proc.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    match usize::try_from(n) {
        Ok(n) => Perms::from_acl(m.uid(), m.gid(), &buf[..n.min(buf.len())])
            .ok_or_else(|| Error::invalid(format!("{}: unreadable POSIX ACL", path.display()))),
        Err(_) => {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => {
                    Ok(Perms::from_mode(m.uid(), m.gid(), m.mode()))
                }
                _ => Err(Error::io(format!("{}: read its ACL", path.display()), e)),
            }
        }
    }
}

/// The groups a user is in (primary and supplementary, as at login); none for a uid without
/// a passwd entry.
fn user_groups(uid: u32) -> Vec<u32> {
    // SAFETY: passwd is plain data that getpwuid_r fills in.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 1 << 16];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the sizes given; the strings pwd points at live in buf.
    let r = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if r != 0 || found.is_null() {
        return Vec::new();
    }
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let want = n;
        // SAFETY: pw_name points into buf (alive); groups holds `n` entries.
        let r = unsafe { libc::getgrouplist(pwd.pw_name, pwd.pw_gid, groups.as_mut_ptr(), &mut n) };
        if r >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        // Too small: n now says how many there are (grow, within reason).
        if n <= want || n > 1 << 16 {
            return vec![pwd.pw_gid];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for &(t, p, id) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    const U: u32 = 1000;
    const G: u32 = 1000;

    fn user(groups: &[u32]) -> Who<'_> {
        Who::User { uid: U, groups }
    }

    #[test]
    fn mode_bits_pick_one_class() {
        // Owner, then group, then other: an owner without r is refused even if other has r.
        let p = Perms::from_mode(U, G, 0o044);
        assert!(!p.allows(user(&[G]), READ));
        assert!(Perms::from_mode(U, G, 0o400).allows(user(&[]), READ));
        // A group member whose group lacks r does not fall through to other.
        let p = Perms::from_mode(0, 50, 0o604);
        assert!(!p.allows(user(&[50]), READ));
        assert!(p.allows(user(&[G]), READ));
        // Root reads everything; 0600 root-owned is nobody else's.
        let p = Perms::from_mode(0, 0, 0o600);
        assert!(p.allows(
            Who::User {
                uid: 0,
                groups: &[]
            },
            READ
        ));
        assert!(!p.allows(user(&[0]), READ));
        assert!(!p.allows(Who::Members(0), READ));
        assert!(!p.allows(Who::Anyone, READ));
    }

    #[test]
    fn classes_need_every_possible_member() {
        let p = Perms::from_mode(U, G, 0o640);
        assert!(p.allows(Who::Members(G), READ));
        assert!(!p.allows(Who::Members(G + 1), READ));
        assert!(!p.allows(Who::Anyone, READ));
        let p = Perms::from_mode(U, G, 0o644);
        assert!(p.allows(Who::Members(G + 1), READ) && p.allows(Who::Anyone, READ));
        // Other has r but the group does not: a member of the file's group is refused.
        let p = Perms::from_mode(U, G, 0o604);
        assert!(!p.allows(Who::Anyone, READ) && !p.allows(Who::Members(G + 1), READ));
        let d = Perms::from_mode(0, 0, 0o711);
        assert!(d.allows(Who::Anyone, SEARCH) && !d.allows(Who::Anyone, READ));
    }

    #[test]
    fn acl_named_entries_and_mask() {
        // 0644-looking file whose ACL denies user U by name: U falls to no class.
        let a = acl(&[
            (0x01, 6, u32::MAX),
            (0x02, 0, U),
            (0x04, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 4, u32::MAX),
        ]);
        let p = Perms::from_acl(0, 0, &a).unwrap();
        assert!(!p.allows(user(&[]), READ));
        assert!(p.allows(
            Who::User {
                uid: U + 1,
                groups: &[]
            },
            READ
        ));
        assert!(!p.allows(Who::Anyone, READ));
        // A named group grants r through the mask; the mask can take it away.
        let grant = |mask: u16| {
            let a = acl(&[
                (0x01, 6, u32::MAX),
                (0x04, 0, u32::MAX),
                (0x08, 4, 77),
                (0x10, mask, u32::MAX),
                (0x20, 0, u32::MAX),
            ]);
            Perms::from_acl(0, 0, &a).unwrap().allows(user(&[77]), READ)
        };
        assert!(grant(4));
        assert!(!grant(0));
        // Entries out of the kernel's order: the named user still decides before any group.
        let a = acl(&[
            (0x08, 4, 77),
            (0x20, 4, u32::MAX),
            (0x04, 4, u32::MAX),
            (0x02, 0, U),
            (0x01, 6, u32::MAX),
        ]);
        assert!(!Perms::from_acl(0, 0, &a)
            .unwrap()
            .allows(user(&[77, 0]), READ));
    }

    #[test]
    fn malformed_acls_are_refused() {
        assert!(Perms::from_acl(0, 0, &[]).is_none());
        assert!(Perms::from_acl(0, 0, &acl(&[(0x01, 6, 0)])).is_none());
        let mut bad = acl(&[(0x01, 6, 0), (0x04, 4, 0), (0x20, 4, 0)]);
        assert!(Perms::from_acl(0, 0, &bad).is_some());
        bad.push(0);
        assert!(Perms::from_acl(0, 0, &bad).is_none());
        let unknown = acl(&[(0x01, 6, 0), (0x04, 4, 0), (0x40, 4, 0), (0x20, 4, 0)]);
        assert!(Perms::from_acl(0, 0, &unknown).is_none());
        let v1 = [1u8, 0, 0, 0];
        assert!(Perms::from_acl(0, 0, &v1).is_none());
    }

    #[test]
    fn walk_follows_the_open_file_not_its_name() {
        let t = std::env::temp_dir().join(format!("ckptfs-walk-{}", std::process::id()));
        std::fs::create_dir_all(t.join("d")).unwrap();
        std::fs::write(t.join("d/f"), b"x").unwrap();
        std::os::unix::fs::symlink("d/f", t.join("link")).unwrap();
        let f = File::open(t.join("link")).unwrap();
        let w = walk(&f).unwrap();
        assert_eq!(w.real, std::fs::canonicalize(t.join("d/f")).unwrap());
        assert_eq!(
            w.dirs.first().map(|d| d.0.clone()),
            Some(PathBuf::from("/"))
        );
        assert_eq!(
            w.dirs.last().map(|d| d.0.clone()),
            w.real.parent().map(Path::to_path_buf)
        );
        // Renamed after it was opened: found under its new name.
        std::fs::rename(t.join("d/f"), t.join("d/g")).unwrap();
        assert_eq!(walk(&f).unwrap().real, w.real.with_file_name("g"));
        std::fs::remove_dir_all(&t).unwrap();
        assert!(walk(&f).is_err(), "a deleted file has no path to walk");
    }
}

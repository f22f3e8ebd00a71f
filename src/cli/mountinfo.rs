//! Which mount the kernel shows at a path, from /proc/self/mountinfo (read, never stat: a stat
//! of the mount point would wait on the daemon asking).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The device number ("MAJOR:MINOR") of the topmost mount on `mountpoint`, if any.
pub fn device_of(mountpoint: &Path) -> Option<String> {
    let text = std::fs::read("/proc/self/mountinfo").ok()?;
    device_in(&text, mountpoint)
}

/// `device_of` over the text of a mountinfo file. Later lines are mounts made later, so the
/// last line naming the path is the mount on top.
fn device_in(text: &[u8], mountpoint: &Path) -> Option<String> {
    let want = escape(mountpoint.as_os_str().as_bytes());
    text.split(|&b| b == b'\n').rev().find_map(|line| {
        // "ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS ..."
        let mut fields = line.split(|&b| b == b' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        (point == want.as_slice()).then(|| String::from_utf8_lossy(dev).into_owned())
    })
}

/// A path as mountinfo shows it: space, tab, newline and backslash as three octal digits.
fn escape(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for &b in path {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::device_in;
    use std::path::Path;

    const INFO: &[u8] = b"22 1 253:1 / / rw,relatime - ext4 /dev/vda1 rw\n\
        45 22 0:40 / /mnt/a\\040b rw,nosuid - fuse.ckptfs /img/vm.qcow2 rw,user_id=0\n\
        46 22 0:41 / /mnt/vm ro - fuse.ckptfs /img/old.qcow2 ro,user_id=0\n\
        47 46 0:42 / /mnt/vm ro - fuse.ckptfs /img/new.qcow2 ro,user_id=0\n";

    #[test]
    fn finds_the_topmost_mount_by_its_escaped_path() {
        assert_eq!(
            device_in(INFO, Path::new("/mnt/vm")).as_deref(),
            Some("0:42")
        );
        assert_eq!(
            device_in(INFO, Path::new("/mnt/a b")).as_deref(),
            Some("0:40")
        );
        assert_eq!(device_in(INFO, Path::new("/mnt/a\\040b")), None);
        assert_eq!(device_in(INFO, Path::new("/mnt")), None);
        assert_eq!(device_in(b"garbage\n\n1 2\n", Path::new("/mnt/vm")), None);
    }
}

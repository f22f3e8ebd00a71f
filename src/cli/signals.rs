//! How the mount daemon stops. SIGTERM, SIGINT and SIGHUP are blocked from the start of the
//! mount command, in every thread and in the daemon it forks: one that arrives while the image
//! is opened or the mount is made waits instead of killing the process half way (bitmaps left
//! in use). Once mounted, one thread takes them with sigwait for the life of the daemon:
//!
//! - the first unmounts; when processes still hold a file or a cwd inside, it detaches instead
//!   (lazily, as libfuse does: `umount2(MNT_DETACH)` as root, `fusermount3 -u -z` otherwise).
//!   The name goes at once, those processes keep being served, and when the last one leaves
//!   the kernel ends the connection: the session ends the ordinary way (bitmaps stored, exit 0);
//! - any later one stops at once (what libfuse does on the first): the bitmaps are stored and,
//!   with the writer still held so that no request writes after that, the process exits 0; the
//!   kernel then ends the connection and whoever still uses the mount gets ENOTCONN.

use super::mountinfo;
use crate::fs::FsCore;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

/// The stop signals, blocked in the thread that made this (and in threads and children it
/// starts afterwards).
#[derive(Clone, Copy)]
pub struct StopSignals(libc::sigset_t);

impl StopSignals {
    pub fn block() -> StopSignals {
        // SAFETY: sigset_t is plain data; the calls only initialise and install it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            StopSignals(set)
        }
    }

    fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: an initialised set; sigwait writes the signal number.
        unsafe { libc::sigwait(&self.0, &mut sig) };
        sig
    }

    /// Pass the stop signals this process received while it started the daemon `pid` (which
    /// did not inherit them) on to it.
    pub fn forward_pending(&self, pid: libc::pid_t) {
        let now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // Each pending signal is taken once; -1 (EAGAIN) when none is left.
        loop {
            // SAFETY: an initialised set, no siginfo wanted (null is allowed), a valid timeout.
            let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &now) };
            if sig <= 0 {
                return;
            }
            // SAFETY: kill(2) of the daemon this process forked.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

/// Take the stop signals for the mount of `core` on `mountpoint` (the kernel's device
/// `device`, from mountinfo) in a thread of its own, for the life of the process.
pub fn serve(
    signals: StopSignals,
    mountpoint: PathBuf,
    device: Option<String>,
    core: Arc<FsCore>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = signals.wait();
            detach(sig, &mountpoint, device.as_deref());
            let sig = signals.wait();
            stop_now(sig, &core, &mountpoint, device.as_deref())
        })
        .map(drop)
}

/// Unmount the mount point if the kernel still shows this daemon's mount (`device`) there
/// when the daemon ends (a connection aborted while mounted, an earlier unmount that failed),
/// never a mount made since.
pub fn unmount_left_over(mountpoint: &Path, device: &str) {
    if mountinfo::device_of(mountpoint).as_deref() != Some(device) {
        return;
    }
    let name = mountpoint.display();
    match unmount(mountpoint) {
        Ok(_) => log::warn!("{name} was still mounted at the end: unmounted"),
        Err(e) => log::error!("{name} is still mounted at the end: {e}"),
    }
}

fn detach(sig: i32, mountpoint: &Path, device: Option<&str>) {
    let name = mountpoint.display();
    // Unmounted by someone else (perhaps with another mount now on that path): nothing to do,
    // the session ends by itself once the last user leaves.
    if device.is_some() && mountinfo::device_of(mountpoint).as_deref() != device {
        log::info!("signal {sig}: {name} is not mounted any more");
        return;
    }
    match unmount(mountpoint) {
        Ok(Unmounted::Now) => log::info!("signal {sig}: unmounted {name}"),
        Ok(Unmounted::Detached) => log::warn!(
            "signal {sig}: {name} is busy: detached, serving the processes still using it; \
             the daemon ends when the last one leaves (another signal stops it now)"
        ),
        Err(e) => log::error!(
            "signal {sig}: cannot unmount {name}: {e} (another signal stops the daemon now)"
        ),
    }
}

enum Unmounted {
    Now,
    /// Lazily: the mount stays alive while processes use it.
    Detached,
}

fn unmount(mountpoint: &Path) -> Result<Unmounted, String> {
    let path = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: umount2(2) with a NUL-terminated path.
    let umount2 = |flags| match unsafe { libc::umount2(path.as_ptr(), flags) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    match umount2(0) {
        Ok(()) => Ok(Unmounted::Now),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => umount2(libc::MNT_DETACH)
            .map(|()| Unmounted::Detached)
            .map_err(|e| e.to_string()),
        // Not root: the setuid helper unmounts a mount its user made.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            if fusermount(mountpoint, &["-u"]).is_ok() {
                return Ok(Unmounted::Now);
            }
            fusermount(mountpoint, &["-u", "-z"]).map(|()| Unmounted::Detached)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn fusermount(mountpoint: &Path, flags: &[&str]) -> Result<(), String> {
    let out = Command::new("fusermount3")
        .args(flags)
        .arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fusermount3: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "fusermount3 {}: {}",
            flags.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

fn stop_now(sig: i32, core: &FsCore, mountpoint: &Path, device: Option<&str>) -> ! {
    log::warn!("signal {sig}: stopping now; processes still using the mount get ENOTCONN");
    // While requests are still served: unmounting may need an answer.
    if let Some(d) = device {
        unmount_left_over(mountpoint, d);
    }
    core.shutdown_then(|r| {
        let code = match r {
            Ok(()) => 0,
            Err(e) => {
                log::error!("closing the image: {e}");
                1
            }
        };
        std::process::exit(code)
    })
}

//! The mount command: check everything while the caller's terminal still sees errors, then
//! fork (before any thread exists), mount in the child and report success or the error text
//! to the waiting parent through a pipe. SIGTERM/SIGINT/SIGHUP stop it cleanly (`signals`).

use super::options::MountOptions;
use super::signals::{self, StopSignals};
use super::{mountinfo, setup};
use crate::chain::access;
use crate::chain::lock::{self, LockMode};
use crate::checkpoint::Editor;
use crate::error::{Error, ErrorKind, Result};
use crate::fs::handlers::FuseFs;
use crate::fs::ops::Invalidator;
use crate::fs::{FsCore, MountInfo};
use fuser::{Config, MountOption, SessionACL};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn canonical(p: &Path, what: &str) -> Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| Error::path(p, what, e))
}

fn check_mountpoint(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("{}: mountpoint", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(format!(
            "{}: mountpoint is not a directory",
            dir.display()
        )));
    }
    let mut rd = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("{}: mountpoint", dir.display()), e))?;
    if rd.next().is_some() {
        return Err(Error::invalid(format!(
            "{}: mountpoint is not an empty directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Everything the child needs, prepared (and checked) in the parent.
struct Prepared {
    core: Arc<FsCore>,
    config: Config,
    mountpoint: PathBuf,
    _locks: lock::ImageLocks,
}

fn prepare(image: &Path, mountpoint: &Path, o: &MountOptions) -> Result<Prepared> {
    let image = canonical(image, "cannot open image")?;
    let mountpoint = canonical(mountpoint, "mountpoint does not exist")?;
    check_mountpoint(&mountpoint)?;
    let checkpoints = o
        .checkpoints
        .as_deref()
        .map(|d| canonical(d, "checkpoint directory"))
        .transpose()?;
    let live = o.force_share && lock::writer_present(&image);
    let engine = setup::engine(&image, checkpoints.as_deref(), live, o.cache_mb, o.rw)?;
    let mode = match (o.rw, o.force_share) {
        (true, _) => LockMode::ReadWrite,
        (false, true) => LockMode::ForceShare,
        (false, false) => LockMode::ReadOnly,
    };
    let locks = lock::lock_chain(&engine.model.chain, mode).map_err(|e| {
        if e.kind == ErrorKind::Busy {
            Error::new(
                ErrorKind::Busy,
                format!(
                    "{}\n  to read it anyway, mount with -o ro,force_share (read-only)",
                    e.msg
                ),
            )
        } else {
            e
        }
    })?;
    let meta = std::fs::metadata(&image)
        .map_err(|e| Error::io(format!("{}: stat", image.display()), e))?;
    // Before anything is written: other users must not read through the tree what the layer
    // files would not let them read.
    let owner = access::tree_owner(&engine.model.chain, o.allow_other)?;
    let info = MountInfo {
        options: serde_json::json!({
            "given": o.given, "rw": o.rw, "allow_other": o.allow_other,
            "default_permissions": o.default_permissions || o.allow_other, "force_share": o.force_share,
            "checkpoints": checkpoints.as_ref().map(|p| p.display().to_string()),
            "cache_mb": o.cache_mb, "live": live,
        }),
        uid: owner.uid,
        gid: owner.gid,
        image_mode: owner.mode,
        mtime: meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH),
        watch_from: usize::from(o.rw || o.force_share),
    };
    // Only after the locks: marking bitmaps in use writes to the image.
    let writer = if o.rw {
        Some(Editor::open(engine.model.chain.clone())?)
    } else {
        None
    };
    let core = Arc::new(FsCore::new(engine, info, writer));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(image.display().to_string()),
        // fuser 0.18 mounts with mount(2) as root and always passes the type "fuse": its
        // Subtype option only reaches fusermount3. As a mount parameter (`subtype=`, which
        // fusermount3 also takes) the kernel itself shows "fuse.ckptfs" on both paths.
        MountOption::CUSTOM("subtype=ckptfs".into()),
        if o.rw {
            MountOption::RW
        } else {
            MountOption::RO
        },
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // With allow_other the kernel must check modes: otherwise every user could read a
    // private image through a root-owned mount.
    if o.default_permissions || o.allow_other {
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    config.acl = if o.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(4);
    config.clone_fd = true;
    Ok(Prepared {
        core,
        config,
        mountpoint,
        _locks: locks,
    })
}

/// Ask the kernel for larger readahead on the new mount, the kernel's `device` (its FUSE bdi
/// starts at 128 KiB, which caps sequential requests at 128 KiB). Best effort: needs root,
/// silently skipped otherwise.
fn raise_readahead(device: &str) {
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "4096") {
        log::debug!("{path}: {e}");
    }
}

/// Mount and serve until unmounted. `ready` is called once the mount is up (or failed).
fn serve(
    p: Prepared,
    stop: StopSignals,
    ready: impl FnOnce(std::result::Result<(), String>),
) -> Result<()> {
    let fs = FuseFs {
        core: p.core.clone(),
    };
    let session = match fuser::Session::new(fs, &p.mountpoint, &p.config) {
        Ok(s) => s,
        Err(e) => {
            let err = Error::io(format!("{}: mount failed", p.mountpoint.display()), e);
            ready(Err(err.to_string()));
            return Err(err);
        }
    };
    p.core.set_invalidator(invalidator(session.notifier()));
    let device = mountinfo::device_of(&p.mountpoint);
    if let Err(e) = signals::serve(stop, p.mountpoint.clone(), device.clone(), p.core.clone()) {
        let err = Error::io("signal thread", e);
        ready(Err(err.to_string()));
        return Err(err);
    }
    log::info!(
        "mounted {} on {} ({} checkpoints)",
        p.core.state().engine.model.chain.top().path.display(),
        p.mountpoint.display(),
        p.core.state().engine.model.checkpoints.len()
    );
    if let Some(d) = &device {
        raise_readahead(d);
    }
    ready(Ok(()));
    let ended = session_ended(run_session(session));
    if let Some(d) = &device {
        signals::unmount_left_over(&p.mountpoint, d);
    }
    ended.map_err(|e| Error::io("FUSE session", e))?;
    log::info!("unmounted {}", p.mountpoint.display());
    Ok(())
}

/// Serve until the kernel ends the connection. fuser 0.18's session, dropped, unmounts its
/// mount point by path even when the kernel has already ended the connection (its is_mounted
/// takes POLLERR for "mounted"), and after a lazy detach that path may hold another mount by
/// then. So the session runs in fuser's background thread, joined through a swapped-out
/// handle, its mount guard is forgotten, and `signals::unmount_left_over` checks the device
/// before unmounting anything.
fn run_session(session: fuser::Session<FuseFs>) -> std::io::Result<()> {
    let mut bg = session.spawn()?;
    let guard = std::mem::replace(&mut bg.guard, std::thread::spawn(|| Ok(())));
    std::mem::forget(bg);
    guard
        .join()
        .map_err(|_| std::io::Error::other("the FUSE session thread panicked"))?
}

/// Drops the kernel's cached pages and attributes of inodes, through FUSE notifications.
fn invalidator(n: fuser::Notifier) -> Invalidator {
    Arc::new(move |inos: &[u64]| {
        for &ino in inos {
            if let Err(e) = n.inval_inode(fuser::INodeNo(ino), 0, 0) {
                log::debug!("invalidate inode {ino}: {e}");
            }
        }
    })
}

/// How a FUSE session ended. A request the kernel had queued when the filesystem was unmounted
/// makes that read of /dev/fuse fail with ECONNABORTED instead of ENODEV: still a clean end
/// (the handlers' `destroy` has run either way).
fn session_ended(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            log::info!("connection closed by the kernel with a request in flight");
            Ok(())
        }
        r => r,
    }
}

/// Is this process run by mount(8) through its FUSE helper?
fn run_by_mount_helper() -> bool {
    let mut pid = std::process::id();
    for _ in 0..4 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            return false;
        };
        // mount(8) forks, execs mount.fuse3, which execs `sh -c "ckptfs ..."`.
        if head.ends_with("(mount") || head.contains("(mount.fuse") {
            return true;
        }
        match tail.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

pub fn run(image: &Path, mountpoint: &Path, o: &MountOptions, foreground: bool) -> Result<()> {
    let mut o = o.clone();
    if run_by_mount_helper() && o.under_mount_helper() {
        eprintln!("ckptfs: mounting read-only (mount(8) passes rw by default; use -o rw,writable to write)");
    }
    let o = &o;
    // From here on a stop signal waits for the daemon's signal thread (or is passed to it).
    let stop = StopSignals::block();
    let prepared = prepare(image, mountpoint, o)?;
    if foreground {
        return serve(prepared, stop, |_| {});
    }
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid 2-element array for pipe(2).
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: the pipe fds were just created and are owned here exactly once.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no thread has been started yet (checked by design: prepare() is single-threaded).
    match unsafe { libc::fork() } {
        -1 => Err(Error::io("fork", std::io::Error::last_os_error())),
        0 => {
            drop(rd);
            // SAFETY: setsid in the fresh child detaches it from the terminal's session.
            unsafe { libc::setsid() };
            // Every path the daemon needs is absolute or already open: keep no directory of
            // the caller's busy (a daemon left in /mnt/x would stop `umount /mnt/x`).
            if let Err(e) = std::env::set_current_dir("/") {
                log::warn!("chdir /: {e}");
            }
            let mut wr = std::fs::File::from(wr);
            let r = serve(prepared, stop, move |status| {
                let msg = match status {
                    Ok(()) => "OK\n".to_string(),
                    Err(m) => format!("ERR {m}\n"),
                };
                let _ = wr.write_all(msg.as_bytes());
                drop(wr);
                redirect_stdio();
            });
            std::process::exit(if r.is_ok() { 0 } else { 1 });
        }
        child => {
            drop(wr);
            // The child owns the mount now: this process must not run the writer's close
            // (which would store bitmaps and clear in_use under the child's feet).
            std::mem::forget(prepared);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            match msg.strip_prefix("OK") {
                Some(_) => {
                    stop.forward_pending(child);
                    Ok(())
                }
                None => Err(Error::io(
                    msg.strip_prefix("ERR ")
                        .map_or("the daemon died before mounting", str::trim)
                        .to_string(),
                    std::io::Error::other("mount failed"),
                )),
            }
        }
    }
}

fn redirect_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// A mount served by threads of this process (for examples and embedding); dropping it
/// unmounts, then releases the image locks.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    pub core: Arc<FsCore>,
    _locks: lock::ImageLocks,
}

impl Mounted {
    /// Unmount now, reporting failure.
    pub fn unmount(mut self) -> Result<()> {
        match self.session.take() {
            Some(s) => session_ended(s.umount_and_join()).map_err(|e| Error::io("unmount", e)),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// Mount `image` on `mountpoint` in this process, served by background threads.
pub fn spawn(image: &Path, mountpoint: &Path, o: &MountOptions) -> Result<Mounted> {
    let p = prepare(image, mountpoint, o)?;
    let fs = FuseFs {
        core: p.core.clone(),
    };
    let session = fuser::spawn_mount(fs, &p.mountpoint, &p.config)
        .map_err(|e| Error::io(format!("{}: mount failed", p.mountpoint.display()), e))?;
    p.core.set_invalidator(invalidator(session.notifier()));
    if let Some(d) = mountinfo::device_of(&p.mountpoint) {
        raise_readahead(&d);
    }
    Ok(Mounted {
        session: Some(session),
        core: p.core,
        _locks: p._locks,
    })
}

#[cfg(test)]
mod tests {
    use super::session_ended;
    use std::io::Error;

    #[test]
    fn unmount_racing_a_request_is_a_clean_end() {
        // Found by the `mount` fuzz target: the kernel aborts the connection at unmount, and a
        // request it had queued makes that read of /dev/fuse fail with ECONNABORTED.
        let aborted = Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(session_ended(Err(aborted)).is_ok());
        assert!(session_ended(Ok(())).is_ok());
        let other = Error::from_raw_os_error(libc::EIO);
        assert!(session_ended(Err(other)).is_err());
    }
}

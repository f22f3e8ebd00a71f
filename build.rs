//! Build script: records the git revision the binary is built from, for `ckptfs --version`.
//!
//! `CKPTFS_GIT_REV` is `git rev-parse --short HEAD` of the repository holding this crate, or
//! "unknown" when there is none (a source tarball) or git is missing: the build never fails
//! for it. Cargo reruns this when HEAD or the branch it points at moves.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let rev = if in_own_repo() {
        watch_head();
        git(&["rev-parse", "--short", "HEAD"])
    } else {
        None
    };
    println!(
        "cargo:rustc-env=CKPTFS_GIT_REV={}",
        rev.as_deref().unwrap_or("unknown")
    );
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()))
}

/// `git ARGS` in the crate's directory: its trimmed stdout if it succeeded and is not empty.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(manifest_dir())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

/// Whether the crate's directory is the top of a git work tree (not a tarball unpacked inside
/// some other repository, whose revision would be wrong).
fn in_own_repo() -> bool {
    let Some(top) = git(&["rev-parse", "--show-toplevel"]) else {
        return false;
    };
    match (
        Path::new(&top).canonicalize(),
        manifest_dir().canonicalize(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Rerun when HEAD moves: the HEAD file (a branch switch or a detached checkout), HEAD's reflog
/// (every commit, reset or checkout, also when the branch ref is packed), the branch's ref file
/// and packed-refs. Paths come from git, so a linked worktree (HEAD in .git/worktrees/NAME,
/// refs in the main .git) works too.
fn watch_head() {
    let mut files = ["HEAD", "logs/HEAD", "packed-refs"]
        .map(String::from)
        .to_vec();
    files.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for f in files {
        if let Some(p) = git(&["rev-parse", "--git-path", &f]) {
            let p = manifest_dir().join(p);
            // A missing file would make cargo rerun this on every build.
            if p.exists() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

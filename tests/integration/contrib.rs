//! contrib/ and examples/: the man page against `ckptfs --help`; the bash completion;
//! shellcheck of the scripts; the library examples against the mounted tree. The backup and
//! restore scripts are tested in `backup.rs` and `libvirt.rs`.

use crate::backup::{contrib, make_chain, Env};
use crate::common;
use crate::mountutil::{self, bin, Mount};
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------
// Man page, completion, shellcheck

/// Option names in `ckptfs --help`: the flags of the usage lines and the entries of the
/// option list (`  name[=ARG]  text`), `=ARG` dropped.
fn help_options(help: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut in_usage = true;
    for line in help.lines() {
        if line.trim().is_empty() {
            in_usage = false;
            continue;
        }
        if in_usage {
            for w in line.split(|c: char| c.is_whitespace() || "[]|".contains(c)) {
                if w.starts_with('-') && w.len() > 1 {
                    out.insert(w.to_string());
                }
            }
        } else if let Some(rest) = line.strip_prefix("  ") {
            if !rest.starts_with(' ') {
                let name = rest.split_whitespace().next().unwrap();
                out.insert(name.split('=').next().unwrap().to_string());
            }
        }
    }
    out
}

/// Option names the man page's OPTIONS section lists: the first word after each `.TP`.
fn man_options(man: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut in_options = false;
    let mut after_tp = false;
    for line in man.lines() {
        if let Some(sh) = line.strip_prefix(".SH ") {
            in_options = sh.trim_matches('"') == "OPTIONS";
            continue;
        }
        if !in_options {
            continue;
        }
        if line.starts_with(".TP") {
            after_tp = true;
            continue;
        }
        if after_tp {
            after_tp = false;
            // `.B name`, `.BI name= ARG`, `.BI \-o " OPTS"`: the first word, unescaped.
            let w = line
                .split_whitespace()
                .nth(if line.starts_with('.') { 1 } else { 0 })
                .unwrap_or("");
            let w = w
                .replace("\\-", "-")
                .replace("\\fB", "")
                .replace("\\fI", "")
                .replace("\\fR", "")
                .replace('"', "");
            out.insert(w.split('=').next().unwrap().to_string());
        }
    }
    out
}

#[test]
fn man_page_matches_help() {
    let r = mountutil::run_files(None, bin(), &["--help"]);
    assert!(r.ok, "ckptfs --help: {r:?}");
    let help = help_options(&r.stdout);
    for must in [
        "-o",
        "-f",
        "--json",
        "--checkpoints",
        "--domain",
        "rw",
        "cache_mb",
    ] {
        assert!(
            help.contains(must),
            "parsing --help missed {must}: {help:?}"
        );
    }
    let man = std::fs::read_to_string(contrib("ckptfs.1")).unwrap();
    let documented = man_options(&man);
    let missing: Vec<_> = help.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&help).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "contrib/ckptfs.1 OPTIONS vs ckptfs --help: missing from the man page {missing:?}, \
         not in --help {extra:?}"
    );
    // The page renders without groff warnings, where man is installed.
    if Path::new("/usr/bin/man").exists() {
        let out = common::run_status_in(
            None,
            "man",
            &[
                OsStr::new("--warnings"),
                OsStr::new("-l"),
                contrib("ckptfs.1").as_os_str(),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "man --warnings: {err}"
        );
    }
}

/// Run the completion function for a command line whose last word is being completed.
fn complete(words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect();
    let func = match words[0] {
        "ckptfs" => "_ckptfs",
        "ckptfs-backup" => "_ckptfs_backup",
        _ => "_ckptfs_restore",
    };
    let script = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; {func}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        contrib("ckptfs.bash-completion").display(),
        quoted.join(" "),
        words.len() - 1
    );
    let out = common::run_in(None, "bash", &["-c", &script]);
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn bash_completion() {
    let has = |words: &[&str], want: &[&str]| {
        let got = complete(words);
        for w in want {
            assert!(got.iter().any(|g| g == w), "{words:?}: {w} not in {got:?}");
        }
    };
    has(&["ckptfs", "l"], &["ls"]);
    has(
        &["ckptfs", "ls", "--"],
        &["--json", "--checkpoints", "--domain"],
    );
    has(&["ckptfs", "--"], &["--help", "--version"]);
    has(&["ckptfs", "-o", "allow"], &["allow_other"]);
    has(
        &["ckptfs", "-o", "ro,de"],
        &["ro,debug", "ro,default_permissions"],
    );
    has(&["ckptfs", "-o", "force"], &["force_share"]);
    has(&["ckptfs", "-o", "ca"], &["cache_mb="]);
    has(&["ckptfs", "-oro,ch"], &["-oro,checkpoints="]);
    has(&["ckptfs-backup", ""], &["full", "inc", "verify", "prune"]);
    has(&["ckptfs-backup", "inc", "--d"], &["--domain", "--disk"]);
    has(&["ckptfs-backup", "prune", "r", "--k"], &["--keep"]);
    has(&["ckptfs-restore", "--in"], &["--into-mount"]);
    has(&["ckptfs-restore", "r", "o", "--format", ""], &["qcow2"]);
    // Every option a script's --help names is completed for it.
    for (script, sub) in [
        ("ckptfs-backup", "full"),
        ("ckptfs-backup", "inc"),
        ("ckptfs-backup", "prune"),
        ("ckptfs-restore", ""),
    ] {
        let help = mountutil::run_files(None, contrib(script).to_str().unwrap(), &["--help"]);
        assert!(help.ok, "{script} --help: {help:?}");
        let usage_line = help
            .stdout
            .lines()
            .find(|l| l.contains(&format!("{script} {sub}")))
            .unwrap_or_else(|| panic!("{script} --help has no usage line for {sub:?}"));
        let mut words = vec![script];
        if !sub.is_empty() {
            words.push(sub);
        }
        words.push("--");
        let offered = complete(&words);
        for opt in usage_line
            .split(|c: char| c.is_whitespace() || "[]()|".contains(c))
            .filter(|w| w.starts_with("--"))
        {
            assert!(
                offered.iter().any(|o| o == opt),
                "{script} {sub}: {opt} is in --help but not completed: {offered:?}"
            );
        }
    }
    // Every -o name in --help is offered.
    let r = mountutil::run_files(None, bin(), &["--help"]);
    let offered = complete(&["ckptfs", "-o", ""]);
    for o in help_options(&r.stdout)
        .into_iter()
        .filter(|o| !o.starts_with('-'))
    {
        assert!(
            offered
                .iter()
                .any(|g| g.split('=').next() == Some(o.as_str())),
            "-o {o} is not completed: {offered:?}"
        );
    }
}

#[test]
fn scripts_pass_shellcheck() {
    let files = [
        contrib("ckptfs-backup"),
        contrib("ckptfs-restore"),
        contrib("ckptfs.bash-completion"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/libvirt-ns.sh"),
    ];
    for f in &files {
        common::run("bash", &[OsStr::new("-n"), f.as_os_str()]);
    }
    if Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP contrib::scripts_pass_shellcheck: shellcheck is not installed (bash -n passed)"
        );
        return;
    }
    let r = mountutil::run_files(None, "shellcheck", &files);
    assert!(r.ok, "shellcheck:\n{}{}", r.stdout, r.stderr);
}

// ---------------------------------------------------------------------------------------
// Examples

/// The built example binary, if `cargo test` built it (it builds examples by default).
fn example(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("examples").join(name);
    p.exists().then_some(p)
}

#[test]
fn examples_match_the_tree() {
    let (Some(list), Some(ext)) = (example("list_checkpoints"), example("changed_extents")) else {
        eprintln!("SKIP contrib::examples_match_the_tree: examples not built");
        return;
    };
    let env = Env::new();
    make_chain(&env);
    let meta = env.p("meta");
    let top = env.p("vda-2.qcow2");
    let r = mountutil::run_files(
        None,
        list.to_str().unwrap(),
        &[top.as_os_str(), meta.as_os_str()],
    );
    assert!(r.ok, "list_checkpoints: {r:?}");
    assert!(r.stdout.contains("order: libvirt metadata"), "{}", r.stdout);
    for c in ["c1", "c2", "c3"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(c) && l.ends_with("yes")),
            "list_checkpoints should list {c} as valid:\n{}",
            r.stdout
        );
    }
    let mnt = mountutil::mount_dir(&env.dir, "mnt");
    let m = Mount::new(
        &top,
        &mnt,
        Some(&format!("ro,checkpoints={}", meta.display())),
    );
    for c in ["c1", "c2", "c3"] {
        let r = mountutil::run_files(
            None,
            ext.to_str().unwrap(),
            &[top.as_os_str(), OsStr::new(c), meta.as_os_str()],
        );
        assert!(r.ok, "changed_extents {c}: {r:?}");
        assert_eq!(
            r.stdout,
            mountutil::read_text(&m.path(&format!("{c}/extents"))),
            "changed_extents {c} vs the mounted {c}/extents"
        );
        let info = mountutil::read_json(&m.path(&format!("{c}/info.json")));
        assert!(
            r.stderr
                .contains(&format!("changed_bytes {}", info["changed_bytes"])),
            "{c}: {} vs {info}",
            r.stderr
        );
        assert!(
            r.stdout.is_empty() || r.stderr.contains("run(s)"),
            "{}",
            r.stderr
        );
    }
    m.unmount();
    let r = mountutil::run_files(
        None,
        ext.to_str().unwrap(),
        &[top.as_os_str(), OsStr::new("nope")],
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("no checkpoint"), "{}", r.stderr);
    let _ = std::io::stderr().flush();
}

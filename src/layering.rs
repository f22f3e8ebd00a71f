//! The layering rule as a test: qcow2/ < chain/ < checkpoint/ < fs/ < cli/, no arrow runs back
//! up, and fs/ reaches the format and the writer only through `checkpoint::Editor`.

use std::path::Path;

/// (file, text) of every .rs file under src/DIR.
fn sources(dir: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&root).expect("src dir") {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p).expect("source file");
            out.push((p.display().to_string(), text));
        }
    }
    assert!(!out.is_empty(), "no sources under {}", root.display());
    out
}

fn assert_none(dir: &str, banned: &[&str]) {
    for (file, text) in sources(dir) {
        for b in banned {
            assert!(!text.contains(b), "{file} mentions {b}");
        }
    }
}

#[test]
fn no_layer_reaches_up() {
    let above_checkpoint = ["crate::fs", "crate::cli", "fuser"];
    assert_none("qcow2", &["crate::chain", "crate::checkpoint"]);
    assert_none("qcow2", &above_checkpoint);
    assert_none("chain", &["crate::checkpoint"]);
    assert_none("chain", &above_checkpoint);
    assert_none("checkpoint", &above_checkpoint);
    assert_none("fs", &["crate::cli"]);
}

#[test]
fn fs_uses_neither_the_format_nor_the_writer() {
    assert_none("fs", &["crate::qcow2", "chain::write", "chain::bitmap_dir"]);
}

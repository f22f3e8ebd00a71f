//! `ckptfs ls`: the chain and the checkpoint table, as text or JSON. Mounts nothing.

use super::setup;
use crate::checkpoint::{render, Engine};
use crate::error::Result;
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

/// Merge every valid checkpoint's since-set up front, showing progress on a terminal (a large
/// chain can take a while); the renderings then read the cached counts.
fn compute_all(engine: &Engine) {
    let n = engine.model.checkpoints.len();
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let disk = engine.model.disk_size();
    for ci in 0..n {
        if engine.model.checkpoints[ci].invalid.is_some() {
            continue;
        }
        let _ = engine.changed_bytes(ci);
        if tty {
            let done = (ci + 1) as f64 * disk as f64;
            let rate = done / start.elapsed().as_secs_f64().max(1e-3) / (1u64 << 30) as f64;
            eprint!(
                "\rckptfs ls: merged {}/{n} checkpoints ({rate:.1} GiB of disk/s)   ",
                ci + 1
            );
            let _ = std::io::stderr().flush();
        }
    }
    if tty && n > 0 {
        eprint!("\r{:70}\r", "");
    }
}

pub fn run(image: &Path, checkpoints: Option<&Path>, as_json: bool) -> Result<String> {
    let engine = setup::engine(image, checkpoints, false, 64, false)?;
    compute_all(&engine);
    if as_json {
        let v = json!({
            "image": engine.model.chain.top().path.display().to_string(),
            "virtual_size": engine.model.disk_size(),
            "chain": render::chain_json(&engine.model.chain),
            "order": render::checkpoints_json(&engine)["order"],
            "checkpoints": render::checkpoints_json(&engine)["checkpoints"],
        });
        Ok(render::to_text(&v))
    } else {
        let m = &engine.model;
        let valid = m.checkpoints.iter().filter(|c| c.invalid.is_none()).count();
        Ok(format!(
            "{}\n{} layers, {} checkpoints ({valid} valid), virtual size {} bytes\n",
            render::ls_text(&engine),
            m.chain.layers.len(),
            m.checkpoints.len(),
            m.disk_size()
        ))
    }
}

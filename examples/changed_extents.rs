//! The extents changed since one checkpoint, with the library API: what the mounted
//! `CHECKPOINT/extents` file holds ("OFFSET LENGTH", "OFFSET LENGTH zero" for runs that now
//! read as zeros), and a summary on stderr.
//!
//!     cargo run --release --example changed_extents -- IMAGE CHECKPOINT [CHECKPOINT_METADATA_DIR]
//!
//! A backup tool could copy exactly these ranges from `Engine::current` (the disk now).

use ckptfs::chain::Chain;
use ckptfs::checkpoint::{libvirt, Engine, Model, ModelOptions};
use std::path::Path;
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 || args[0].starts_with('-') {
        eprintln!("usage: changed_extents IMAGE CHECKPOINT [CHECKPOINT_METADATA_DIR]");
        std::process::exit(2);
    }
    let meta = args.get(2).map(Path::new);
    if let Err(e) = run(Path::new(&args[0]), &args[1], meta) {
        eprintln!("changed_extents: {e}");
        std::process::exit(1);
    }
}

fn run(image: &Path, name: &str, metadata_dir: Option<&Path>) -> Result<(), String> {
    let chain = Arc::new(Chain::open(image).map_err(|e| e.to_string())?);
    let metadata = metadata_dir
        .map(libvirt::read_dir)
        .transpose()
        .map_err(|e| e.to_string())?;
    let model = Arc::new(Model::build(
        chain,
        &ModelOptions {
            metadata,
            live: false,
        },
    ));
    // A checkpoint by name, or by its directory name in the mounted tree.
    let Some(ci) = model
        .checkpoints
        .iter()
        .position(|c| c.name == name || c.dir_name == name)
    else {
        let names: Vec<&str> = model.checkpoints.iter().map(|c| c.name.as_str()).collect();
        return Err(format!(
            "no checkpoint {name:?} in {} (checkpoints: {})",
            image.display(),
            names.join(" ")
        ));
    };
    if let Some(reason) = &model.checkpoints[ci].invalid {
        return Err(format!("checkpoint {name:?} is not valid: {reason}"));
    }
    let engine = Engine::new(model.clone(), 64 << 20);
    let extents = engine.extents(ci).map_err(|e| e.to_string())?;
    print!("{extents}");
    let (mut runs, mut data, mut zero) = (0u64, 0u64, 0u64);
    for line in extents.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let len: u64 = f
            .get(1)
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| format!("bad extents line {line:?}"))?;
        runs += 1;
        if f.get(2) == Some(&"zero") {
            zero += len;
        } else {
            data += len;
        }
    }
    let changed = engine.changed_bytes(ci).map_err(|e| e.to_string())?;
    eprintln!(
        "since {name}: {runs} run(s), {data} data bytes + {zero} zeroed bytes; \
         changed_bytes {changed} (whole {}-byte blocks) of a {}-byte disk",
        engine.granularity(ci),
        model.disk_size()
    );
    Ok(())
}

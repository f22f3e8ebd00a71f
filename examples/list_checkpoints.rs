//! List the checkpoints of a qcow2 backing chain with the library API (what `ckptfs ls`
//! prints, without the CLI): open the chain, build the checkpoint model, ask the engine for
//! each checkpoint's changed bytes.
//!
//!     cargo run --release --example list_checkpoints -- IMAGE [CHECKPOINT_METADATA_DIR]
//!
//! CHECKPOINT_METADATA_DIR is libvirt's /var/lib/libvirt/qemu/checkpoint/DOMAIN; without it the
//! order is guessed from the chain.

use ckptfs::chain::Chain;
use ckptfs::checkpoint::{libvirt, Engine, Model, ModelOptions, Order};
use std::path::PathBuf;
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.len() > 2 || args[0].starts_with('-') {
        eprintln!("usage: list_checkpoints IMAGE [CHECKPOINT_METADATA_DIR]");
        std::process::exit(2);
    }
    if let Err(e) = run(PathBuf::from(&args[0]), args.get(1).map(PathBuf::from)) {
        eprintln!("list_checkpoints: {e}");
        std::process::exit(1);
    }
}

fn run(image: PathBuf, metadata_dir: Option<PathBuf>) -> ckptfs::Result<()> {
    // The chain, top first: every backing file opened and checked.
    let chain = Arc::new(Chain::open(&image)?);
    for (depth, layer) in chain.layers.iter().enumerate() {
        println!(
            "layer {depth}: {} ({})",
            layer.path.display(),
            layer.format()
        );
    }
    // libvirt's metadata, when given, names the checkpoints and decides their order.
    let metadata = metadata_dir.as_deref().map(libvirt::read_dir).transpose()?;
    let model = Arc::new(Model::build(
        chain,
        &ModelOptions {
            metadata,
            live: false,
        },
    ));
    let order = match model.order {
        Order::Metadata => "libvirt metadata",
        Order::Guessed => "guessed from the chain",
    };
    println!(
        "{} checkpoint(s), oldest first (order: {order}); disk {} bytes",
        model.checkpoints.len(),
        model.disk_size()
    );
    // The engine merges bitmaps lazily, within its cache budget (here 64 MiB).
    let engine = Engine::new(model.clone(), 64 << 20);
    println!(
        "{:<20} {:<8} {:<20} {:>11} {:>14}  VALID",
        "NAME", "KIND", "LAYER", "GRANULARITY", "CHANGED"
    );
    for (i, c) in model.checkpoints.iter().enumerate() {
        let layer = c
            .layer
            .and_then(|l| model.chain.layers[l].path.file_name())
            .map_or("-".into(), |n| n.to_string_lossy().into_owned());
        let (changed, valid) = match (&c.invalid, engine.changed_bytes(i)) {
            (Some(reason), _) => ("-".to_string(), format!("no: {reason}")),
            (None, Ok(bytes)) => (bytes.to_string(), "yes".to_string()),
            (None, Err(e)) => ("-".to_string(), format!("no: {e}")),
        };
        println!(
            "{:<20} {:<8} {:<20} {:>11} {:>14}  {valid}",
            c.name,
            c.kind.as_str(),
            layer,
            c.granularity,
            changed
        );
    }
    Ok(())
}

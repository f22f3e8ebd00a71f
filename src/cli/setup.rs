//! From an image path and options to a ready engine: open the chain, read libvirt metadata,
//! build the checkpoint model. Shared by `ls` and the mount.

use crate::chain::Chain;
use crate::checkpoint::{libvirt, Engine, Model, ModelOptions};
use crate::error::Result;
use std::path::Path;
use std::sync::Arc;

/// Open the chain (`write_top`: the top image read-write) and build the engine.
pub fn engine(
    image: &Path,
    checkpoints: Option<&Path>,
    live: bool,
    cache_mb: u64,
    write_top: bool,
) -> Result<Engine> {
    let chain = Arc::new(Chain::open_with(image, write_top)?);
    let metadata = checkpoints.map(libvirt::read_dir).transpose()?;
    let model = Model::build(chain, &ModelOptions { metadata, live });
    Ok(Engine::new(Arc::new(model), cache_mb << 20))
}

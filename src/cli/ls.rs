//! `ckptfs ls`: the chain and the checkpoint table, as text or JSON. Mounts nothing.

use super::setup;
use crate::checkpoint::render;
use crate::error::Result;
use serde_json::json;
use std::path::Path;

pub fn run(image: &Path, checkpoints: Option<&Path>, as_json: bool) -> Result<String> {
    let engine = setup::engine(image, checkpoints, false, 64, false)?;
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
        Ok(render::ls_text(&engine))
    }
}

//! Checkpoints: the model (kinds, order, sources), since-set chunks and their cache, the
//! engine answering range questions, libvirt metadata, and the JSON/text renderings.

pub mod cache;
pub mod engine;
pub mod libvirt;
pub mod model;
pub mod render;
pub mod since;

pub use engine::Engine;
pub use model::{Checkpoint, Kind, Model, ModelOptions, Order, Source};

//! Checkpoints: the model (kinds, order, sources), since-set chunks and their cache, the
//! engine answering range questions, libvirt metadata, the JSON/text renderings, and the
//! checkpoint-editing policy (`edit`) behind the rw handle `Editor`.

pub mod cache;
pub mod edit;
pub mod editor;
pub mod engine;
pub mod libvirt;
pub mod model;
pub mod render;
pub mod since;
pub mod stats;

pub use editor::Editor;
pub use engine::Engine;
pub use model::{Checkpoint, Kind, Model, ModelOptions, Order, Source};

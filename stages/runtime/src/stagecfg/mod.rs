//! Per-stage configuration sections, one file each.

mod audio;
mod face;
mod infer;
mod models;
mod mux;

pub use audio::AudioConfig;
pub use face::FaceConfig;
pub use infer::InferConfig;
pub use models::ModelsConfig;
pub use mux::MuxConfig;

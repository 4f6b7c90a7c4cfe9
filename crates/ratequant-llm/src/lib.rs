//! ratequant-llm: real models for ratequant.
//!
//! text → [`tokenizer`] → tokens → [`decoder`] (weights from [`gguf`] or [`hf`], configured by
//! [`config`]) → K/V through a [`kv::KvCache`] → logits → [`eval`] metrics.

pub mod assets;
pub mod config;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod loader;
pub mod model;
pub mod text;
pub mod tokenizer;

pub use assets::AssetCache;
pub use config::{Arch, ModelConfig, RopeLayout};
pub use kv::{AttnParams, KvCache};
pub use loader::{load_model, LoadError, LoadedModel};
pub use model::Weights;
pub use text::load_text;
pub use tokenizer::Tokenizer;

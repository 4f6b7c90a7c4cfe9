//! ratequant-llm: real models for ratequant.
//!
//! text → [`tokenizer`] → tokens → [`decoder`] (weights from [`gguf`] or [`hf`], configured by
//! [`config`]) → K/V through a [`kv::KvCache`] → logits → [`eval`] metrics.

pub mod config;
pub mod kv;
pub mod model;

pub use config::{Arch, ModelConfig, RopeLayout};
pub use kv::{AttnParams, KvCache};
pub use model::Weights;

//! ratequant-llm: real models for ratequant.
//!
//! text → [`tokenizer`] → tokens → [`decoder`] (weights from [`gguf`] or [`hf`], configured by
//! [`config`]) → K/V through a [`kv::KvCache`] → logits → [`eval`] metrics.

pub mod assets;
pub mod attention;
pub mod calibrate;
pub mod config;
pub mod decoder;
pub mod eval;
pub mod frozen;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod kv_fp;
pub mod kv_packed;
pub mod kv_sim;
pub mod loader;
pub mod model;
pub mod reference;
pub mod rope;
pub mod synthetic;
pub mod sysmem;
pub mod text;
pub mod tokenizer;

pub use assets::AssetCache;
pub use config::{Arch, ModelConfig, RopeLayout};
pub use decoder::{Decoder, Mode};
pub use kv::{AttnParams, KvCache};
pub use kv_fp::FpCache;
pub use kv_sim::{KvQuantPlan, KvSpec, SimQuantCache, SimSemantics, UnitQuant};
pub use loader::{load_model, LoadError, LoadedModel};
pub use model::Weights;
pub use text::load_text;
pub use tokenizer::{byte_level_chars, Tokenizer};

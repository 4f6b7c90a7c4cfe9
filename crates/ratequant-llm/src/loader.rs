//! One entry point from a model or text spec to something in memory, and the error type of
//! every loading module (assets, GGUF, HF, tokenizer, text).
//!
//! Errors are a library type ([`LoadError`], thiserror) that converts into
//! `candle_core::Error` for code that works in candle results; the CLI wraps them in anyhow.

use std::path::{Path, PathBuf};

use crate::assets::{find_asset, AssetCache, AssetKind};
use crate::config::ModelConfig;
use crate::model::Weights;
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is malformed, truncated, or uses something we do not support.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A spec names neither a known asset nor an existing path, or is malformed.
    #[error("{0}")]
    Spec(String),
    /// Downloading or installing an asset failed (client missing, network, bad archive).
    #[error("fetching asset `{asset}`: {msg}")]
    Fetch { asset: String, msg: String },
    /// A downloaded or assembled file does not have the pinned sha256.
    #[error(
        "fetching asset `{asset}`: sha256 mismatch for {what}: expected {expected}, got {actual}"
    )]
    Checksum {
        asset: String,
        what: String,
        expected: String,
        actual: String,
    },
    /// The tokenizer cannot be built from the file, or cannot encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T> = std::result::Result<T, LoadError>;

impl LoadError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        LoadError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

impl From<LoadError> for candle_core::Error {
    fn from(e: LoadError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// A model ready for the decoder.
pub struct LoadedModel {
    pub config: ModelConfig,
    /// f32 tensors on the CPU under the canonical names documented on [`Weights`].
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    /// Where it came from: the asset name and file, or the path.
    pub source: String,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("config", &self.config)
            .field("tensors", &self.weights.tensors.len())
            .field("source", &self.source)
            .finish()
    }
}

/// Loads a model from `spec`: an asset name (`smollm2`, `qwen2.5-0.5b`, `gemma3-270m`; fetched
/// into `cache` when missing) or a local path (a `.gguf` file, or a Hugging Face directory with
/// `config.json`, `*.safetensors` and `tokenizer.json`).
pub fn load_model(spec: &str, cache: &AssetCache) -> Result<LoadedModel> {
    if let Some(asset) = find_asset(spec) {
        if asset.kind != AssetKind::Model {
            return Err(LoadError::Spec(format!(
                "asset `{spec}` is a text, not a model"
            )));
        }
        let path = cache.ensure(asset)?;
        let mut model = crate::gguf::load_gguf(&path)?;
        model.source = format!("{} ({})", asset.name, path.display());
        return Ok(model);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        crate::hf::load_hf_dir(path)
    } else if path.is_file() {
        crate::gguf::load_gguf(path)
    } else {
        Err(LoadError::Spec(format!(
            "model `{spec}` is neither a known asset ({}) nor an existing .gguf file or Hugging Face directory",
            crate::assets::asset_names(AssetKind::Model).join(", ")
        )))
    }
}

/// Checks that `weights` holds exactly the tensors `config` implies, with the shapes the
/// decoder expects, naming the first tensor that is missing, misshapen or unexpected.
pub(crate) fn validate_weights(config: &ModelConfig, weights: &Weights, path: &Path) -> Result<()> {
    let h = config.hidden_size;
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let ffn = config.intermediate_size;
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![config.vocab_size, h]),
        ("output_norm.weight".into(), vec![h]),
    ];
    if !config.tie_embeddings {
        expected.push(("output.weight".into(), vec![config.vocab_size, h]));
    }
    for l in 0..config.num_layers {
        let mut add =
            |name: &str, shape: Vec<usize>| expected.push((format!("blk.{l}.{name}"), shape));
        add("attn_norm.weight", vec![h]);
        add("attn_q.weight", vec![q, h]);
        add("attn_k.weight", vec![kv, h]);
        add("attn_v.weight", vec![kv, h]);
        add("attn_output.weight", vec![h, q]);
        add("ffn_norm.weight", vec![h]);
        add("ffn_gate.weight", vec![ffn, h]);
        add("ffn_up.weight", vec![ffn, h]);
        add("ffn_down.weight", vec![h, ffn]);
        if config.qkv_bias {
            add("attn_q.bias", vec![q]);
            add("attn_k.bias", vec![kv]);
            add("attn_v.bias", vec![kv]);
        }
        if config.qk_norm {
            add("attn_q_norm.weight", vec![config.head_dim]);
            add("attn_k_norm.weight", vec![config.head_dim]);
        }
        if config.post_norms {
            add("post_attention_norm.weight", vec![h]);
            add("post_ffw_norm.weight", vec![h]);
        }
    }
    for (name, shape) in &expected {
        let t = weights.tensors.get(name).ok_or_else(|| {
            LoadError::format(
                path,
                format!("tensor `{name}` is missing (expected shape {shape:?})"),
            )
        })?;
        if t.dims() != shape.as_slice() {
            return Err(LoadError::format(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, but the config implies {shape:?}",
                    t.dims()
                ),
            ));
        }
    }
    if weights.tensors.len() != expected.len() {
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&String> = weights
            .tensors
            .keys()
            .filter(|n| !known.contains(n.as_str()))
            .collect();
        extra.sort();
        return Err(LoadError::format(
            path,
            format!(
                "unexpected tensor(s) {} for a {}-layer {:?} model (a feature we do not implement, or a layer-count mismatch)",
                extra.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                config.num_layers,
                config.arch
            ),
        ));
    }
    Ok(())
}

//! One module per command, each exposing `<Name>Args` and `run`.

pub mod allocate;
pub mod calibrate;
pub mod eval;
pub mod fetch;
pub mod fit;
pub mod generate;
pub mod sweep;

use std::path::Path;

use anyhow::{Context, Result};
use ratequant_llm::{
    load_model, load_text, AssetCache, Decoder, LoadedModel, ModelConfig, Tokenizer,
};

/// A decoder ready to run on tokenized texts.
pub struct ModelAndTexts {
    pub decoder: Decoder,
    pub config: ModelConfig,
    /// Where the model came from ([`LoadedModel::source`]).
    pub source: String,
    /// One token list per requested text, in order.
    pub tokens: Vec<Vec<u32>>,
}

/// Loads `model` (fetching an asset on first use), runs `check` on its config (so that settings
/// the model cannot serve fail before any text is read), then loads and tokenizes each of
/// `texts` and builds the decoder.
pub fn load_model_and_texts(
    model: &str,
    texts: &[&str],
    check: impl FnOnce(&ModelConfig) -> Result<()>,
) -> Result<ModelAndTexts> {
    let cache = AssetCache::from_env();
    let loaded = load_model(model, &cache).with_context(|| format!("loading model `{model}`"))?;
    check(&loaded.config)?;
    let tokens = texts
        .iter()
        .map(|spec| {
            let text = load_text(spec, &cache).with_context(|| format!("loading text `{spec}`"))?;
            loaded
                .tokenizer
                .encode(&text, loaded.config.add_bos)
                .with_context(|| format!("tokenizing `{spec}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = loaded.config.clone();
    let source = loaded.source.clone();
    let (decoder, _) = build_decoder(loaded)?;
    Ok(ModelAndTexts {
        decoder,
        config,
        source,
        tokens,
    })
}

/// Builds the decoder and drops the loaded weights (the decoder holds its own tensors, so
/// keeping both would hold the model twice); returns it with the tokenizer.
pub fn build_decoder(model: LoadedModel) -> Result<(Decoder, Tokenizer)> {
    let decoder = Decoder::new(&model.config, &model.weights).context("building the decoder")?;
    Ok((decoder, model.tokenizer))
}

/// Fails early (before a long run) when an output file's directory does not exist or the path
/// names no file; `flag` is the option that named it (`--json`).
pub fn check_output_path(path: &Path, flag: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write {flag} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.file_name().is_none() {
        anyhow::bail!("{flag} {} names no file", path.display());
    }
    Ok(())
}

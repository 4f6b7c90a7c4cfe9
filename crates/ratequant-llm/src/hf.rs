//! Hugging Face checkpoint directories: `config.json`, `*.safetensors` (f32/f16/bf16, possibly
//! sharded with `model.safetensors.index.json`) and `tokenizer.json`.
//!
//! Tensor names are mapped to the canonical GGUF-style names of [`Weights`]; HF checkpoints use
//! "halves" RoPE for every architecture. Gemma's RMSNorm multiplies by `1 + w`; the stored `w`
//! gets the `+1` here so the decoder always multiplies by the stored weight (as in GGUF files).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::config::{Activation, Arch, ModelConfig, RopeLayout};
use crate::loader::{validate_weights, LoadError, LoadedModel, Result};
use crate::model::Weights;
use crate::tokenizer::Tokenizer;

/// Loads a Hugging Face model directory.
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let raw = read_json(&config_path)?;
    // Multimodal Gemma 3 checkpoints nest the language model's settings.
    let cfg = raw
        .get("text_config")
        .filter(|v| v.is_object())
        .unwrap_or(&raw);
    let model_type = str_field(&raw, "model_type", &config_path)?;
    let arch = match model_type {
        "llama" => Arch::Llama,
        "mistral" => Arch::Mistral,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma3" | "gemma3_text" => Arch::Gemma3,
        other => {
            return Err(LoadError::format(
                &config_path,
                format!("unsupported model_type `{other}` (supported: llama, mistral, qwen2, qwen3, gemma3, gemma3_text)"),
            ))
        }
    };
    let raw_tensors = read_safetensors_dir(dir)?;
    let mut weights = map_names(raw_tensors, arch, dir)?;
    let tokenizer = load_tokenizer(dir, &raw, cfg)?;
    let config = build_config(cfg, arch, &weights, &tokenizer, &config_path)?;
    if config.tie_embeddings {
        weights.tensors.remove("output.weight");
    }
    if arch == Arch::Gemma3 {
        add_one_to_norms(&mut weights, dir)?;
    }
    validate_weights(&config, &weights, dir)?;
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: dir.display().to_string(),
    })
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| LoadError::format(path, format!("invalid JSON: {e}")))
}

fn str_field<'a>(v: &'a Json, key: &str, path: &Path) -> Result<&'a str> {
    v.get(key)
        .and_then(Json::as_str)
        .ok_or_else(|| LoadError::format(path, format!("`{key}` is missing or not a string")))
}

fn usize_field(v: &Json, key: &str, path: &Path) -> Result<usize> {
    opt_usize(v, key, path)?.ok_or_else(|| LoadError::format(path, format!("`{key}` is missing")))
}

fn opt_usize(v: &Json, key: &str, path: &Path) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            LoadError::format(
                path,
                format!("`{key}` should be a non-negative integer, found {x}"),
            )
        }),
    }
}

fn opt_f64(v: &Json, key: &str, path: &Path) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| {
            LoadError::format(path, format!("`{key}` should be a number, found {x}"))
        }),
    }
}

fn opt_bool(v: &Json, key: &str, path: &Path) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(x) => x.as_bool().map(Some).ok_or_else(|| {
            LoadError::format(path, format!("`{key}` should be true or false, found {x}"))
        }),
    }
}

/// A token id field that may also be a list (the first entry is used).
fn opt_token_id(v: &Json, key: &str) -> Option<u32> {
    match v.get(key)? {
        Json::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        x => x.as_u64().map(|x| x as u32),
    }
}

fn build_config(
    cfg: &Json,
    arch: Arch,
    weights: &Weights,
    tokenizer: &Tokenizer,
    path: &Path,
) -> Result<ModelConfig> {
    let hidden_size = usize_field(cfg, "hidden_size", path)?;
    let num_heads = usize_field(cfg, "num_attention_heads", path)?;
    let num_kv_heads = opt_usize(cfg, "num_key_value_heads", path)?.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(LoadError::format(
            path,
            format!("num_attention_heads {num_heads} must be a positive multiple of num_key_value_heads {num_kv_heads}"),
        ));
    }
    let head_dim = match opt_usize(cfg, "head_dim", path)? {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(LoadError::format(
                path,
                format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                ),
            ))
        }
    };
    if let Some(scaling) = cfg.get("rope_scaling").filter(|v| !v.is_null()) {
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Json::as_str)
            .unwrap_or("?");
        let factor = scaling.get("factor").and_then(Json::as_f64).unwrap_or(1.0);
        if !(kind == "default" || factor == 1.0) {
            return Err(LoadError::format(
                path,
                format!("rope_scaling `{kind}` (factor {factor}) is not supported"),
            ));
        }
    }
    if let Some(p) = opt_f64(cfg, "partial_rotary_factor", path)? {
        if p != 1.0 {
            return Err(LoadError::format(
                path,
                format!("partial_rotary_factor {p} is not supported"),
            ));
        }
    }
    let gemma = arch == Arch::Gemma3;
    let embd = weights
        .get("token_embd.weight")
        .map_err(|e| LoadError::format(path, e.to_string()))?;
    let vocab_size = match opt_usize(cfg, "vocab_size", path)? {
        Some(v) => v,
        None => embd.dims()[0],
    };
    let tie_default = gemma;
    let tie_embeddings = opt_bool(cfg, "tie_word_embeddings", path)?.unwrap_or(tie_default)
        || !weights.contains("output.weight");
    let sliding_window = match arch {
        Arch::Gemma3 => Some(usize_field(cfg, "sliding_window", path)?),
        Arch::Mistral => opt_usize(cfg, "sliding_window", path)?,
        Arch::Qwen2 | Arch::Qwen3 if opt_bool(cfg, "use_sliding_window", path)? == Some(true) => {
            return Err(LoadError::format(
                path,
                "use_sliding_window = true (Qwen's mixed sliding layers) is not supported",
            ))
        }
        _ => None,
    };
    let activation = match cfg
        .get("hidden_activation")
        .or_else(|| cfg.get("hidden_act"))
        .and_then(Json::as_str)
        .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" })
    {
        "silu" | "swish" => Activation::Silu,
        "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
        other => {
            return Err(LoadError::format(
                path,
                format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)"),
            ))
        }
    };
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: usize_field(cfg, "intermediate_size", path)?,
        num_layers: usize_field(cfg, "num_hidden_layers", path)?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: opt_f64(cfg, "rms_norm_eps", path)?.unwrap_or(1e-6),
        rope_theta: opt_f64(cfg, "rope_theta", path)?.unwrap_or(10_000.0),
        rope_layout: RopeLayout::Halves,
        max_position: opt_usize(cfg, "max_position_embeddings", path)?.unwrap_or(2048),
        tie_embeddings,
        qkv_bias: weights.contains("blk.0.attn_q.bias"),
        qk_norm: weights.contains("blk.0.attn_q_norm.weight"),
        sliding_window,
        sliding_window_pattern: if gemma {
            Some(opt_usize(cfg, "sliding_window_pattern", path)?.unwrap_or(6))
        } else {
            None
        },
        rope_local_theta: if gemma {
            Some(opt_f64(cfg, "rope_local_base_freq", path)?.unwrap_or(10_000.0))
        } else {
            None
        },
        query_pre_attn_scalar: if gemma {
            Some(opt_f64(cfg, "query_pre_attn_scalar", path)?.unwrap_or(head_dim as f64))
        } else {
            None
        },
        scale_embeddings: gemma,
        norm_weight_offset: gemma,
        post_norms: weights.contains("blk.0.post_attention_norm.weight"),
        final_logit_softcapping: opt_f64(cfg, "final_logit_softcapping", path)?,
        activation,
        bos_token_id: tokenizer.bos_id(),
        eos_token_id: tokenizer.eos_id(),
        add_bos: tokenizer.add_bos_default(),
    })
}

fn load_tokenizer(dir: &Path, raw: &Json, cfg: &Json) -> Result<Tokenizer> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(LoadError::format(dir, "tokenizer.json is missing"));
    }
    let tok_cfg_path = dir.join("tokenizer_config.json");
    let tok_cfg = if tok_cfg_path.is_file() {
        Some(read_json(&tok_cfg_path)?)
    } else {
        None
    };
    let bos = opt_token_id(raw, "bos_token_id").or_else(|| opt_token_id(cfg, "bos_token_id"));
    let eos = opt_token_id(raw, "eos_token_id").or_else(|| opt_token_id(cfg, "eos_token_id"));
    let add_bos = match &tok_cfg {
        Some(t) => opt_bool(t, "add_bos_token", &tok_cfg_path)?,
        None => None,
    };
    Tokenizer::from_hf_json(&tok_path, bos, eos, add_bos)
}

/// Every tensor of the directory's safetensors files (the index's shards, or every
/// `*.safetensors`), converted to f32.
fn read_safetensors_dir(dir: &Path) -> Result<Vec<(String, Tensor, PathBuf)>> {
    let index_path = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index_path.is_file() {
        let index = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(Json::as_object)
            .ok_or_else(|| LoadError::format(&index_path, "`weight_map` is missing"))?;
        let shards: BTreeSet<String> = map
            .values()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    LoadError::format(&index_path, "weight_map values must be file names")
                })
            })
            .collect::<Result<_>>()?;
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| LoadError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        files
    };
    if files.is_empty() {
        return Err(LoadError::format(dir, "no *.safetensors files"));
    }
    let mut out = Vec::new();
    for file in files {
        let f = std::fs::File::open(&file).map_err(|e| LoadError::io(&file, e))?;
        // SAFETY: read-only map, only read while converting the tensors below.
        let bytes = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| LoadError::io(&file, e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            LoadError::format(&file, format!("not a readable safetensors file: {e}"))
        })?;
        let mut names: Vec<&str> = st.names();
        names.sort();
        for name in names {
            let view = st
                .tensor(name)
                .map_err(|e| LoadError::format(&file, format!("tensor `{name}`: {e}")))?;
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(LoadError::format(
                        &file,
                        format!(
                        "tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 are supported"
                    ),
                    ))
                }
            };
            let t = Tensor::from_vec(values, view.shape(), &Device::Cpu)
                .map_err(|e| LoadError::format(&file, format!("tensor `{name}`: {e}")))?;
            out.push((name.to_string(), t, file.clone()));
        }
    }
    Ok(out)
}

/// Maps HF tensor names to the canonical names; tensors of a vision tower are dropped.
fn map_names(raw: Vec<(String, Tensor, PathBuf)>, arch: Arch, dir: &Path) -> Result<Weights> {
    let mut tensors = HashMap::new();
    for (name, t, file) in raw {
        if name.starts_with("vision_tower.")
            || name.starts_with("multi_modal_projector.")
            || name.starts_with("model.vision_tower.")
            || name.starts_with("model.multi_modal_projector.")
        {
            continue;
        }
        let canonical = canonical_name(&name, arch).ok_or_else(|| {
            LoadError::format(
                &file,
                format!("tensor `{name}` has no counterpart in the {arch:?} decoder"),
            )
        })?;
        if tensors.insert(canonical.clone(), t).is_some() {
            return Err(LoadError::format(
                dir,
                format!("tensor `{canonical}` appears twice (from `{name}`)"),
            ));
        }
    }
    Ok(Weights { tensors })
}

/// The canonical name of an HF tensor name, if it is one the decoder uses.
pub fn canonical_name(name: &str, arch: Arch) -> Option<String> {
    // Multimodal checkpoints keep the language model under one of two prefixes.
    let name = if let Some(rest) = name.strip_prefix("language_model.") {
        rest.to_string()
    } else if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else {
        name.to_string()
    };
    match name.as_str() {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, param) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let gemma = arch == Arch::Gemma3;
    let mapped = match param {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        // Gemma 3 normalises after attention and around the MLP; llama-style models use the
        // "post-attention" norm as the MLP's input norm.
        "post_attention_layernorm.weight" if gemma => "post_attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "pre_feedforward_layernorm.weight" if gemma => "ffn_norm.weight",
        "post_feedforward_layernorm.weight" if gemma => "post_ffw_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

fn add_one_to_norms(weights: &mut Weights, dir: &Path) -> Result<()> {
    for (name, t) in weights.tensors.iter_mut() {
        if name.ends_with("norm.weight") {
            *t =
                (&*t + 1.0).map_err(|e| LoadError::format(dir, format!("tensor `{name}`: {e}")))?;
        }
    }
    Ok(())
}

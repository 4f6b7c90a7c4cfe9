//! GGUF v3 checkpoints: configuration from the metadata, weights dequantized to f32 with
//! candle's quantized module, tokenizer from the file's own vocabulary.
//!
//! GGUF stores dimensions innermost-first; candle reverses them, so a linear weight arrives as
//! `[out_features, in_features]`, the layout [`Weights`] documents. llama.cpp's converter
//! permutes the Q/K rows of `llama` checkpoints for ggml's "normal" RoPE (adjacent pairs); the
//! other supported architectures use "neox" RoPE (halves). Gemma norm weights already carry the
//! `+1` of Gemma's `(1 + w)` RMSNorm (the converter adds it), so they are used as stored.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::config::{Activation, Arch, ModelConfig, RopeLayout};
use crate::loader::{validate_weights, LoadError, LoadedModel, Result};
use crate::model::Weights;
use crate::tokenizer::Tokenizer;

/// The tensor types we dequantize (the ones candle implements that real checkpoints use).
const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Loads a `.gguf` file: config, f32 weights, tokenizer.
pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    // SAFETY: the map is read-only and lives only while we copy tensors out of it; a file
    // truncated underneath us is the documented hazard of memory maps, accepted as for any
    // mmap-based loader.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
    let content = read_content(path, &bytes)?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let arch_name = meta.string("general.architecture")?;
    let arch = parse_arch(arch_name).ok_or_else(|| {
        LoadError::format(
            path,
            format!(
                "unsupported architecture `{arch_name}` (supported: llama, qwen2, qwen3, gemma3)"
            ),
        )
    })?;
    let tokenizer = Tokenizer::from_gguf_metadata(&content.metadata, path)?;
    let config = read_config(&meta, arch, arch_name, &content, &tokenizer)?;
    let weights = read_weights(path, &bytes, &content)?;
    validate_weights(&config, &weights, path)?;
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: path.display().to_string(),
    })
}

fn read_content(path: &Path, bytes: &[u8]) -> Result<Content> {
    Content::read(&mut Cursor::new(bytes)).map_err(|e| {
        // candle names neither the tensor nor the type when it meets an unknown tensor type;
        // walk the header ourselves to say which.
        if let Some((name, type_id)) = first_unknown_tensor_type(bytes) {
            LoadError::format(
                path,
                format!(
                    "tensor `{name}` has type {} ({type_id}), which is not supported (supported: {})",
                    ggml_type_name(type_id),
                    supported_type_names()
                ),
            )
        } else {
            LoadError::format(path, format!("not a readable GGUF file: {e}"))
        }
    })
}

fn parse_arch(name: &str) -> Option<Arch> {
    match name {
        "llama" => Some(Arch::Llama),
        "mistral" => Some(Arch::Mistral),
        "qwen2" => Some(Arch::Qwen2),
        "qwen3" => Some(Arch::Qwen3),
        "gemma3" => Some(Arch::Gemma3),
        _ => None,
    }
}

/// Typed access to GGUF metadata with errors that name the file and key.
struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md
            .get(key)
            .ok_or_else(|| LoadError::format(self.path, format!("metadata key `{key}` is missing")))
    }

    fn string(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<&str>> {
        if self.md.contains_key(key) {
            self.string(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        value_to_u64(v)
            .map(|x| x as usize)
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.md.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        match v {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            other => value_to_u64(other)
                .map(|x| x as f64)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        if self.md.contains_key(key) {
            self.f64(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &Value) -> LoadError {
        LoadError::format(
            self.path,
            format!(
                "metadata key `{key}` should be {expected}, found {:?}",
                got.value_type()
            ),
        )
    }
}

pub(crate) fn value_to_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

fn read_config(
    meta: &Meta,
    arch: Arch,
    a: &str,
    content: &Content,
    tokenizer: &Tokenizer,
) -> Result<ModelConfig> {
    let path = meta.path;
    let key = |k: &str| format!("{a}.{k}");
    let hidden_size = meta.usize(&key("embedding_length"))?;
    let num_heads = meta.usize(&key("attention.head_count"))?;
    let num_kv_heads = match meta.md.get(&key("attention.head_count_kv")) {
        None => num_heads,
        Some(Value::Array(per_layer)) => uniform_per_layer(per_layer).ok_or_else(|| {
            LoadError::format(
                path,
                format!("`{a}.attention.head_count_kv` varies by layer; not supported"),
            )
        })?,
        Some(_) => meta.usize(&key("attention.head_count_kv"))?,
    };
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(LoadError::format(
            path,
            format!("head counts {num_heads} (query) / {num_kv_heads} (key-value): query heads must be a positive multiple of KV heads"),
        ));
    }
    let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None => {
            if hidden_size % num_heads != 0 {
                return Err(LoadError::format(
                    path,
                    format!(
                        "embedding_length {hidden_size} is not divisible by head_count {num_heads}"
                    ),
                ));
            }
            hidden_size / num_heads
        }
    };
    if let Some(v) = meta.opt_usize(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(LoadError::format(
                path,
                format!("value head size {v} differs from key head size {head_dim}; not supported"),
            ));
        }
    }
    if let Some(rot) = meta.opt_usize(&key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(LoadError::format(
                path,
                format!("partial RoPE ({rot} of {head_dim} dimensions) is not supported"),
            ));
        }
    }
    if let Some(kind) = meta.opt_string(&key("rope.scaling.type"))? {
        let factor = meta.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
        if kind != "none" && factor != 1.0 {
            return Err(LoadError::format(
                path,
                format!("RoPE scaling `{kind}` (factor {factor}) is not supported"),
            ));
        }
    }
    let token_embd = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| LoadError::format(path, "tensor `token_embd.weight` is missing"))?;
    let vocab_size = token_embd.shape.dims().first().copied().unwrap_or(0);
    if tokenizer.vocab_size() > vocab_size {
        return Err(LoadError::format(
            path,
            format!(
                "tokenizer has {} tokens but token_embd.weight has only {vocab_size} rows",
                tokenizer.vocab_size()
            ),
        ));
    }
    let has = |name: &str| content.tensor_infos.contains_key(name);
    let gemma = arch == Arch::Gemma3;
    // llama.cpp: Gemma 3 slides only when the file gives a positive window.
    let sliding_window = if gemma {
        meta.opt_usize(&key("attention.sliding_window"))?
            .filter(|w| *w > 0)
    } else {
        None
    };
    let sliding = sliding_window.is_some();
    let config = ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_layers: meta.usize(&key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_layout: match arch {
            Arch::Llama | Arch::Mistral => RopeLayout::Adjacent,
            Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => RopeLayout::Halves,
        },
        max_position: meta.usize(&key("context_length"))?,
        tie_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        qk_norm: has("blk.0.attn_q_norm.weight"),
        sliding_window,
        // llama.cpp hard-codes these for gemma3 when the file does not say otherwise: every
        // sixth layer global, local layers on RoPE base 10 000, queries scaled by head_dim^-0.5.
        sliding_window_pattern: if sliding {
            Some(
                meta.opt_usize(&key("attention.sliding_window_pattern"))?
                    .unwrap_or(6),
            )
        } else {
            None
        },
        rope_local_theta: if sliding {
            Some(
                meta.opt_f64(&key("rope.freq_base_swa"))?
                    .unwrap_or(10_000.0),
            )
        } else {
            None
        },
        query_pre_attn_scalar: if gemma { Some(head_dim as f64) } else { None },
        scale_embeddings: gemma,
        norm_weight_offset: gemma,
        post_norms: has("blk.0.post_attention_norm.weight"),
        final_logit_softcapping: meta.opt_f64(&key("final_logit_softcapping"))?,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        bos_token_id: tokenizer.bos_id(),
        eos_token_id: tokenizer.eos_id(),
        add_bos: tokenizer.add_bos_default(),
    };
    Ok(config)
}

fn uniform_per_layer(values: &[Value]) -> Option<usize> {
    let first = value_to_u64(values.first()?)?;
    values
        .iter()
        .all(|v| value_to_u64(v) == Some(first))
        .then_some(first as usize)
}

fn read_weights(path: &Path, bytes: &[u8], content: &Content) -> Result<Weights> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in &names {
        let dtype = content.tensor_infos[*name].ggml_dtype;
        if !SUPPORTED_TYPES.contains(&dtype) {
            return Err(LoadError::format(
                path,
                format!(
                    "tensor `{name}` has type {dtype:?}, which is not supported (supported: {})",
                    supported_type_names()
                ),
            ));
        }
    }
    let tensors: Vec<(String, Tensor)> = names
        .par_iter()
        .map(|name| {
            let fail =
                |e: candle_core::Error| LoadError::format(path, format!("tensor `{name}`: {e}"));
            let q = content
                .tensor(&mut Cursor::new(bytes), name, &Device::Cpu)
                .map_err(fail)?;
            let t = q.dequantize(&Device::Cpu).map_err(fail)?;
            let t = if t.dtype() == DType::F32 {
                t
            } else {
                t.to_dtype(DType::F32).map_err(fail)?
            };
            Ok(((*name).clone(), t))
        })
        .collect::<Result<_>>()?;
    Ok(Weights {
        tensors: tensors.into_iter().collect(),
    })
}

fn supported_type_names() -> String {
    SUPPORTED_TYPES
        .iter()
        .map(|t| format!("{t:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// ggml's names for its type ids (ggml.h), for error messages.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// Walks a GGUF v2/v3 header far enough to find the first tensor whose type id candle does
/// not know. `None` when the header is unreadable for another reason.
fn first_unknown_tensor_type(bytes: &[u8]) -> Option<(String, u32)> {
    let mut r = HeaderReader { bytes, pos: 0 };
    if r.u32()? != 0x4655_4747 || !(2..=3).contains(&r.u32()?) {
        return None;
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    for _ in 0..n_kv {
        r.string()?;
        let ty = r.u32()?;
        r.skip_value(ty, 0)?;
    }
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > 8 {
            return None;
        }
        for _ in 0..n_dims {
            r.u64()?;
        }
        let ty = r.u32()?;
        r.u64()?;
        let known = matches!(ty, 0..=3 | 6..=15 | 30);
        if !known {
            return Some((String::from_utf8_lossy(name).into_owned(), ty));
        }
    }
    None
}

struct HeaderReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> HeaderReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u64()?).ok()?;
        self.take(n)
    }
    fn skip_value(&mut self, ty: u32, depth: u32) -> Option<()> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                self.string()?;
                return Some(());
            }
            9 if depth < 4 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                for _ in 0..n {
                    self.skip_value(elem, depth + 1)?;
                }
                return Some(());
            }
            _ => return None,
        };
        self.take(fixed).map(|_| ())
    }
}

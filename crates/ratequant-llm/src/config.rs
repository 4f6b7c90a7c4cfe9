//! One configuration for every supported architecture. Loaders (GGUF, HF) fill it in; the
//! decoder reads nothing else.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
    Gemma3,
}

/// How RoPE pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeLayout {
    /// Dimension `2i` pairs with `2i+1` (GGUF llama weights, ggml "normal" rope).
    Adjacent,
    /// Dimension `i` pairs with `i + head_dim/2` (HF checkpoints, ggml "neox" rope).
    Halves,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_layout: RopeLayout,
    /// Maximum context the model was trained for.
    pub max_position: usize,
    /// Output projection shares the embedding matrix.
    pub tie_embeddings: bool,
    /// Q/K/V projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm on each head's q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    // --- Gemma 3 ---
    /// Sliding-window size of local layers (Gemma 3); `None` = every layer global.
    pub sliding_window: Option<usize>,
    /// Every `n`-th layer (1-based: layers with `(l+1) % n == 0`) is global; others slide.
    pub sliding_window_pattern: Option<usize>,
    /// RoPE base of local (sliding) layers, when it differs from `rope_theta`.
    pub rope_local_theta: Option<f64>,
    /// Attention scale is `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Embeddings multiplied by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// RMSNorm weights stored as `w - 1` (Gemma's `(1 + w)` convention) — loaders normalise
    /// weights so the decoder always multiplies by the stored weight; kept for reference.
    pub norm_weight_offset: bool,
    /// Extra norms after attention and after the MLP (Gemma 3).
    pub post_norms: bool,
    /// Final logits become `c·tanh(logits/c)` when set (Gemma 2/3 configs that carry
    /// `final_logit_softcapping`).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// MLP activation.
    pub activation: Activation,
    /// Token id of beginning-of-sequence, and whether the tokenizer adds it.
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub add_bos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    GeluTanh,
}

impl ModelConfig {
    /// Whether `layer` uses sliding-window attention.
    pub fn is_sliding(&self, layer: usize) -> bool {
        match (self.sliding_window, self.sliding_window_pattern) {
            (Some(_), Some(n)) if n > 0 => !(layer + 1).is_multiple_of(n),
            (Some(_), None) => true,
            _ => false,
        }
    }
}

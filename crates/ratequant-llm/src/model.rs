//! What a loader hands the decoder: configuration, weights under canonical names, tokenizer.

use std::collections::HashMap;

use candle_core::Tensor;

/// Weights under GGUF-style canonical names, whatever the file format:
/// `token_embd.weight`, `output_norm.weight`, `output.weight` (absent when tied),
/// `blk.{l}.attn_norm.weight`, `blk.{l}.attn_q.weight` / `.bias`, `attn_k`, `attn_v`,
/// `attn_output`, `blk.{l}.attn_q_norm.weight`, `attn_k_norm`, `blk.{l}.post_attention_norm.weight`,
/// `blk.{l}.ffn_norm.weight`, `ffn_gate`, `ffn_up`, `ffn_down`, `blk.{l}.post_ffw_norm.weight`.
/// Linear weights are `[out_features, in_features]` (PyTorch layout), dequantized to f32.
/// Q/K projection rows are in the order the config's `rope_layout` expects.
#[derive(Debug, Default)]
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// The tensor `name`, or an error naming it.
    pub fn get(&self, name: &str) -> candle_core::Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("weight `{name}` is missing from the checkpoint"))
        })
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

//! The one interface between the decoder and its KV cache.
//!
//! The decoder hands each layer's new keys and values (after RoPE, exactly as a cache stores
//! them) together with the queries; the cache stores them however it likes (full precision,
//! simulated quantization, packed codes) and returns the attention output. So the same
//! decoder runs unchanged over every cache.

use candle_core::{Result, Tensor};

/// Per-layer attention parameters the cache needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// Multiplier on `q·k` before softmax (usually `head_dim^-0.5`).
    pub scale: f64,
    /// Only the last `w` positions (the query's own included) are visible, if set.
    pub sliding_window: Option<usize>,
}

pub trait KvCache {
    /// Appends `k`, `v` (`[kv_heads, new_tokens, head_dim]`) for `layer` at positions
    /// `len()..len()+new_tokens` and returns causal attention of `q`
    /// (`[heads, new_tokens, head_dim]`, heads a multiple of kv_heads: grouped-query) over
    /// everything stored for that layer, shape `[heads, new_tokens, head_dim]`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, params: &AttnParams) -> Result<Tensor>;

    /// Tokens stored so far (the position of the next token). The decoder calls `attend` for
    /// every layer of one step before `advance`.
    fn len(&self) -> usize;

    /// Marks the `new_tokens` just appended to every layer as stored.
    fn advance(&mut self, new_tokens: usize);

    /// Forgets everything (new sequence).
    fn reset(&mut self);

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

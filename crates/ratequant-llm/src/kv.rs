//! The one interface between the decoder and its KV cache.
//!
//! The decoder hands each layer's new keys and values (after RoPE, exactly as a cache stores
//! them) together with the queries; the cache stores them however it likes (full precision,
//! simulated quantization, packed codes) and returns the attention output. So the same
//! decoder runs unchanged over every cache, and a cache that computes attention directly on
//! packed codes fits behind the same call.
//!
//! Positions: the cache's [`KvCache::len`] is the absolute position of the first new token.
//! Query `t` of a call sits at position `len() + t` and sees the keys at positions
//! `0..=len() + t` (fewer under a sliding window).

use candle_core::{Result, Tensor};

/// Per-layer attention parameters the cache needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// Multiplier on `q·k` before softmax (usually `head_dim^-0.5`).
    pub scale: f64,
    /// Only the last `w` positions (the query's own included) are visible, if set: key `s` is
    /// visible to the query at position `p` when `p - w < s <= p`.
    pub sliding_window: Option<usize>,
    /// The caller needs gradients through the attention (calibration): use only candle ops that
    /// have a backward pass (candle's fused softmax has none). The fast path sets `false`.
    pub differentiable: bool,
}

pub trait KvCache {
    /// Appends `k`, `v` (`[kv_heads, new_tokens, head_dim]`) for `layer` at positions
    /// `len()..len()+new_tokens` and returns causal attention of `q`
    /// (`[heads, new_tokens, head_dim]`, heads a multiple of kv_heads: grouped-query, query
    /// head `h` reads KV head `h / (heads / kv_heads)`) over everything stored for that layer,
    /// shape `[heads, new_tokens, head_dim]`.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor>;

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

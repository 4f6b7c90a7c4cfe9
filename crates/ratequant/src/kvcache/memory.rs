//! Exact memory accounting of the packed cache, and its prediction for a planned context.
//!
//! Counted: code bytes (every allocated key block, including the unfilled slots of the last
//! per-token key block), f16 scales and zero-points, the live residual rows (unquantized,
//! f16: 2 bytes per element), and [`CODE_PADDING`] bytes per code buffer. Not counted: vector capacity slack and
//! residual rows already quantized but not yet compacted away (at most as many as the live
//! ones, released at the next compaction), nor the fixed-size structs themselves.

use serde::Serialize;

use super::attention::{int8, CODE_PADDING};
use super::store::{UnitCore, UnitLayout, PER_TOKEN_KEY_BLOCK};
use super::{AttentionKernel, CacheShape, UnitFormat};
use crate::quant::{self, Kind};
use crate::{pack, Result};

/// Bytes per element of an unquantized residual row (f16).
pub const RESIDUAL_ELEMENT_BYTES: usize = 2;

/// Bytes held by a cache, by category, against an f16 cache of the same shape and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemoryReport {
    /// Tokens stored (the longest layer).
    pub tokens: usize,
    pub code_bytes: usize,
    pub metadata_bytes: usize,
    /// Unquantized residual rows, f16.
    pub residual_bytes: usize,
    pub padding_bytes: usize,
    /// An f16 cache of the same layers, KV heads, head_dim and lengths.
    pub f16_bytes: usize,
}

impl MemoryReport {
    pub fn total_bytes(&self) -> usize {
        self.code_bytes + self.metadata_bytes + self.residual_bytes + self.padding_bytes
    }

    /// Total bytes per stored token (all layers and heads), 0 when empty.
    pub fn bytes_per_token(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.total_bytes() as f64 / self.tokens as f64
        }
    }

    pub fn f16_bytes_per_token(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.f16_bytes as f64 / self.tokens as f64
        }
    }

    /// How many times smaller than the f16 cache.
    pub fn compression(&self) -> f64 {
        self.f16_bytes as f64 / self.total_bytes().max(1) as f64
    }
}

fn f16_bytes(shape: CacheShape, lens: &[usize]) -> usize {
    lens.iter().sum::<usize>() * shape.kv_heads * shape.head_dim * 2 * 2
}

pub(crate) fn report<'a>(
    shape: CacheShape,
    lens: &[usize],
    cores: impl Iterator<Item = &'a UnitCore>,
) -> MemoryReport {
    let mut r = MemoryReport {
        tokens: lens.iter().copied().max().unwrap_or(0),
        f16_bytes: f16_bytes(shape, lens),
        ..MemoryReport::default()
    };
    for core in cores {
        r.code_bytes += core.code_bytes();
        r.metadata_bytes += core.metadata_bytes();
        r.residual_bytes +=
            core.residual.tokens(core.head_dim) * core.head_dim * RESIDUAL_ELEMENT_BYTES;
        r.padding_bytes += CODE_PADDING;
    }
    r
}

/// The memory a cache of this shape and these unit formats will hold once `tokens` tokens are
/// stored in every layer: what [`super::PackedKvCache::memory`] then reports, byte for byte.
/// Lets a caller refuse a context that doesn't fit before allocating anything. `kernel`: the
/// integer kernels keep values in whole tiles of 32 tokens.
pub fn estimate(
    shape: CacheShape,
    units: &[UnitFormat],
    residual: usize,
    tokens: usize,
    kernel: AttentionKernel,
) -> Result<MemoryReport> {
    if units.len() != shape.units() {
        return Err(crate::Error::invalid(format!(
            "memory estimate: {} units expected for {shape:?}, got {}",
            shape.units(),
            units.len()
        )));
    }
    let d = shape.head_dim;
    let mut r = MemoryReport {
        tokens,
        f16_bytes: f16_bytes(shape, &vec![tokens; shape.layers]),
        ..MemoryReport::default()
    };
    for (i, unit) in units.iter().enumerate() {
        let kind = if i % 2 == 0 { Kind::K } else { Kind::V };
        let quantizer = quant::build(&unit.quantizer)?;
        quant::check_bits(unit.bits)?;
        let layout = UnitLayout::of(quantizer.as_ref(), kind, d)?;
        let quantized = layout.quantized_len(tokens, residual);
        let b = unit.bits;
        if layout.per_channel {
            let blocks = quantized / layout.group;
            r.code_bytes += blocks * d * pack::packed_len(layout.group, b);
            r.metadata_bytes += blocks * d * 2 * 2;
        } else {
            r.code_bytes += match kind {
                Kind::K => {
                    quantized.div_ceil(PER_TOKEN_KEY_BLOCK)
                        * d
                        * pack::packed_len(PER_TOKEN_KEY_BLOCK, b)
                }
                Kind::V if kernel == AttentionKernel::Int8 => {
                    quantized.div_ceil(int8::VALUE_TILE_TOKENS) * int8::value_tile_bytes(d, b)
                }
                Kind::V => quantized * pack::packed_len(d, b),
            };
            r.metadata_bytes += quantized * layout.channel_groups(d) * 2 * 2;
        }
        r.residual_bytes += (tokens - quantized) * d * RESIDUAL_ELEMENT_BYTES;
        r.padding_bytes += CODE_PADDING;
    }
    Ok(r)
}

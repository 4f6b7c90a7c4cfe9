//! The packed mixed-precision KV cache ([`ratequant::kvcache::PackedKvCache`]) behind the
//! decoder's [`KvCache`] interface: every unit stored bit-packed at its planned bits, attention
//! computed on the codes.
//!
//! Residual semantics are the core cache's (issue 5, KIVI as published): KIVI keys stay
//! unquantized until their group of `G` tokens is complete; every per-token unit keeps its
//! `residual` most recent tokens unquantized, in f16 (every K/V value is rounded to f16 as it
//! is stored, and tokens are quantized from those values). [`crate::SimQuantCache`] under
//! [`crate::SimSemantics::Packed`] simulates exactly this (same attention outputs up to float
//! rounding on the same inputs); its default tile semantics (K/V in f32) agree on f16-rounded
//! K/V for per-token designs (QuaRot, RTN-token, KIVI's values) but not for KIVI *keys* (the
//! tile simulation re-fits the trailing partial group and keeps the window in full precision
//! instead).

use candle_core::{DType, Result, Tensor};

use ratequant::formats::Plan;
use ratequant::kvcache::{
    AttentionKernel, AttentionParams, CacheShape, MemoryReport, PackedKvCache, UnitFormat,
};
use ratequant::quant::{Kind, QuantizerSpec};

use crate::kv::{AttnParams, KvCache};

/// A packed cache for a model of `layers × kv_heads` heads of `head_dim`.
pub struct PackedCache {
    cache: PackedKvCache,
    len: usize,
}

fn wrap(e: ratequant::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl PackedCache {
    /// Unit `(layer · kv_heads + head) · 2 + (K = 0, V = 1)` uses `units[i]`.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        units: &[UnitFormat],
        residual: usize,
    ) -> Result<Self> {
        Self::with_kernel(
            layers,
            kv_heads,
            head_dim,
            units,
            residual,
            AttentionKernel::Float,
        )
    }

    /// [`PackedCache::new`] with the given attention kernel (`Int8`: faster, approximate).
    pub fn with_kernel(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        units: &[UnitFormat],
        residual: usize,
        kernel: AttentionKernel,
    ) -> Result<Self> {
        let shape = CacheShape {
            layers,
            kv_heads,
            head_dim,
        };
        Ok(PackedCache {
            cache: PackedKvCache::with_kernel(shape, units, residual, kernel).map_err(wrap)?,
            len: 0,
        })
    }

    /// Every unit with the same design and bits (`--kv kivi:2`).
    pub fn uniform(
        quantizer: &QuantizerSpec,
        bits: u8,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        residual: usize,
    ) -> Result<Self> {
        let units = uniform_units(quantizer, bits, layers, kv_heads);
        PackedCache::new(layers, kv_heads, head_dim, &units, residual)
    }

    /// The units a PLAN.json describes; the plan must cover exactly this model's units.
    pub fn from_plan(
        plan: &Plan,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        residual: usize,
    ) -> Result<Self> {
        let units = plan_units(plan, layers, kv_heads)?;
        PackedCache::new(layers, kv_heads, head_dim, &units, residual)
    }

    /// Exact bytes held, against an f16 cache of the same model and length.
    pub fn memory(&self) -> MemoryReport {
        self.cache.memory()
    }

    pub fn inner(&self) -> &PackedKvCache {
        &self.cache
    }

    pub fn inner_mut(&mut self) -> &mut PackedKvCache {
        &mut self.cache
    }
}

/// Every unit of a model of `layers × kv_heads` heads as a PLAN.json describes it, in
/// [`ratequant::kvcache::CacheShape::unit_index`] order (for [`PackedCache::new`] or a memory
/// estimate before allocating); the plan must cover exactly this model's units.
pub fn plan_units(plan: &Plan, layers: usize, kv_heads: usize) -> Result<Vec<UnitFormat>> {
    let quantizer = plan.quantizer.spec().map_err(wrap)?;
    if let Some(u) = plan
        .units
        .iter()
        .find(|u| u.layer >= layers || u.head >= kv_heads)
    {
        candle_core::bail!(
            "the plan has a unit for layer {} head {} ({}), but the model has {layers} layers × {kv_heads} KV heads: \
             the plan was made for another model",
            u.layer,
            u.head,
            u.kind.as_str()
        );
    }
    let mut units = Vec::with_capacity(layers * kv_heads * 2);
    for layer in 0..layers {
        for head in 0..kv_heads {
            for kind in [Kind::K, Kind::V] {
                let bits = plan.bits(layer, head, kind).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "the plan has no unit for layer {layer} head {head} ({}), but the model has {layers} layers × \
                         {kv_heads} KV heads: the plan was made for another model",
                        kind.as_str()
                    ))
                })?;
                units.push(UnitFormat {
                    quantizer: quantizer.clone(),
                    bits,
                });
            }
        }
    }
    Ok(units)
}

/// Every unit of a model of `layers × kv_heads` heads with the same design and bits.
pub fn uniform_units(
    quantizer: &QuantizerSpec,
    bits: u8,
    layers: usize,
    kv_heads: usize,
) -> Vec<UnitFormat> {
    vec![
        UnitFormat {
            quantizer: quantizer.clone(),
            bits
        };
        layers * kv_heads * 2
    ]
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

impl KvCache for PackedCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor> {
        if params.differentiable {
            candle_core::bail!("the packed KV cache computes attention on codes and has no backward pass; calibrate over the full-precision cache");
        }
        let (heads, tokens, head_dim) = q.dims3()?;
        let shape = self.cache.shape();
        if k.dims3()? != (shape.kv_heads, tokens, shape.head_dim)
            || v.dims3()? != (shape.kv_heads, tokens, shape.head_dim)
        {
            candle_core::bail!(
                "layer {layer}: k {:?} and v {:?} must be [{} KV heads, {tokens} tokens, head_dim {}]",
                k.dims(),
                v.dims(),
                shape.kv_heads,
                shape.head_dim
            );
        }
        if layer < shape.layers && self.cache.len(layer) != self.len {
            candle_core::bail!(
                "layer {layer} holds {} tokens but the cache is at position {}: attend each layer once per step, then advance",
                self.cache.len(layer),
                self.len
            );
        }
        let attn = AttentionParams {
            scale: params.scale as f32,
            window: params.sliding_window,
        };
        let out = self
            .cache
            .attend(
                layer,
                &to_vec(q)?,
                heads,
                &to_vec(k)?,
                &to_vec(v)?,
                tokens,
                &attn,
            )
            .map_err(wrap)?;
        Tensor::from_vec(out, (heads, tokens, head_dim), q.device())?.to_dtype(q.dtype())
    }

    fn len(&self) -> usize {
        self.len
    }

    fn advance(&mut self, new_tokens: usize) {
        self.len += new_tokens;
    }

    fn reset(&mut self) {
        self.cache.reset();
        self.len = 0;
    }
}

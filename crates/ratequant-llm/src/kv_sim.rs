//! Simulated KV quantization: K and V are stored in full precision and every unit (layer,
//! KV head, K or V) is fake-quantized with its design and bits right before attention.
//!
//! What a call quantizes: at each [`KvCache::attend`] the unit's whole stored tile so far
//! (`[tokens stored, head_dim]`, the new tokens included) is quantized as one tile with
//! [`Quantizer::fake_quantize`], and every query of the call reads that quantized tile.
//! * `eval` hands a whole chunk to one call, so each unit's chunk is quantized exactly once,
//!   as a cache that quantizes a prefill block would. For designs whose groups span tokens
//!   (KIVI keys: per channel over groups of `G` consecutive tokens) a query then sees keys
//!   quantized with a min/max that includes up to `G − 1` later tokens of its group; per-token
//!   designs (KIVI values, QuaRot, RTN-token) depend on nothing but the token itself.
//! * Token-by-token decoding re-quantizes the tile at every step, so a trailing partial group
//!   is re-fitted as it fills; completed groups come out the same at every step.
//!
//! `residual = R` keeps, for each query, the `R` most recent keys and values (its own
//! included) in full precision, exactly per query (see
//! [`crate::attention::attention_with_residual`]).
//!
//! All of the above is [`SimSemantics::Tile`], `eval`'s default. [`SimSemantics::Packed`]
//! instead simulates exactly what the packed cache ([`crate::kv_packed::PackedCache`]) stores,
//! so that both give the same logits up to float rounding:
//! * per-channel-grouped keys (KIVI) are quantized one completed group of `G` tokens at a
//!   time; the tokens of a group that is not yet complete stay in full precision (nothing is
//!   re-fitted), and the residual window does not apply to them;
//! * every per-token unit (KIVI values, QuaRot, RTN-token) keeps the `R` most recent tokens of
//!   each query in full precision, as in tile mode;
//! * the query at position `p` sees each unit as the packed cache holds it right after token
//!   `p` was appended ([`ratequant::kvcache::UnitLayout::quantized_len`] of `p + 1` tokens),
//!   also inside a prefill block, so prefill in one call, in blocks, or token by token agree;
//! * every K and V value is rounded to f16 (nearest, ties to even) as it is stored, with the
//!   packed cache's own [`ratequant::kvcache::round_to_residual_precision`]: the packed cache
//!   holds unquantized tokens (the residual window, a KIVI key group not yet complete) in f16
//!   and quantizes tokens from those f16 values, so the simulation uses the rounded values
//!   both for the full-precision part and as the input of the fake quantization. Units the
//!   plan leaves unquantized are held in f16 too. Values whose f16 rounding is infinite are
//!   refused, as the packed cache refuses them.
//!
//! Tile semantics keep K and V in f32, so `eval`'s default measurements stay comparable with
//! earlier ones.
//!
//! Gradients do not flow through quantized K/V (the fake-quantized copy is a new tensor);
//! calibration captures gradients over the full-precision cache.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use ratequant::formats::Plan;
use ratequant::kvcache::UnitLayout;
use ratequant::quant::{self, Kind, Quantizer, QuantizerSpec, TileShape};

use crate::attention::{attention_with_precision_masks, attention_with_residual};
use crate::kv::{AttnParams, KvCache};
use crate::kv_fp::LayerStore;

/// The design and bit-width one unit is quantized with.
#[derive(Clone)]
pub struct UnitQuant {
    pub quantizer: Arc<dyn Quantizer>,
    pub bits: u8,
}

impl std::fmt::Debug for UnitQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.quantizer.name(), self.bits)
    }
}

/// How every unit of a model is quantized: `None` keeps the unit in full precision.
#[derive(Debug, Clone)]
pub struct KvQuantPlan {
    num_layers: usize,
    kv_heads: usize,
    /// Indexed by `(layer · kv_heads + head) · 2 + kind` (K = 0, V = 1).
    units: Vec<Option<UnitQuant>>,
}

impl KvQuantPlan {
    /// Every unit in full precision (the simulated cache then equals [`crate::FpCache`]).
    pub fn full_precision(num_layers: usize, kv_heads: usize) -> Self {
        KvQuantPlan {
            num_layers,
            kv_heads,
            units: vec![None; num_layers * kv_heads * 2],
        }
    }

    /// Every unit with the same design and bits.
    pub fn uniform(
        quantizer: Arc<dyn Quantizer>,
        bits: u8,
        num_layers: usize,
        kv_heads: usize,
    ) -> Result<Self> {
        quant::check_bits(bits).map_err(candle_core::Error::wrap)?;
        let unit = UnitQuant { quantizer, bits };
        Ok(KvQuantPlan {
            num_layers,
            kv_heads,
            units: vec![Some(unit); num_layers * kv_heads * 2],
        })
    }

    /// The plan a PLAN.json file describes, for a model of `num_layers` × `kv_heads` heads of
    /// `head_dim`: the file must cover every unit of the model and nothing else.
    pub fn from_plan(
        plan: &Plan,
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let spec = plan.quantizer.spec().map_err(candle_core::Error::wrap)?;
        let q: Arc<dyn Quantizer> =
            Arc::from(quant::build(&spec).map_err(candle_core::Error::wrap)?);
        q.check_head_dim(head_dim)
            .map_err(candle_core::Error::wrap)?;
        // The packed cache's reading of the plan: the same coverage checks and unit order.
        let formats = crate::kv_packed::plan_units(plan, num_layers, kv_heads)?;
        let mut out = KvQuantPlan::full_precision(num_layers, kv_heads);
        for (layer, per_layer) in formats.chunks(kv_heads * 2).enumerate() {
            for (head, pair) in per_layer.chunks(2).enumerate() {
                for (kind, format) in [Kind::K, Kind::V].into_iter().zip(pair) {
                    let unit = UnitQuant {
                        quantizer: q.clone(),
                        bits: format.bits,
                    };
                    out.set(layer, head, kind, Some(unit))?;
                }
            }
        }
        Ok(out)
    }

    /// Sets one unit; errors name the unit when it lies outside the model.
    pub fn set(
        &mut self,
        layer: usize,
        head: usize,
        kind: Kind,
        unit: Option<UnitQuant>,
    ) -> Result<()> {
        if layer >= self.num_layers || head >= self.kv_heads {
            candle_core::bail!(
                "unit (layer {layer}, head {head}, {}) is outside the model's {} layers × {} KV heads",
                kind.as_str(),
                self.num_layers,
                self.kv_heads
            );
        }
        if let Some(u) = &unit {
            quant::check_bits(u.bits).map_err(candle_core::Error::wrap)?;
        }
        let i = self.index(layer, head, kind);
        self.units[i] = unit;
        Ok(())
    }

    pub fn unit(&self, layer: usize, head: usize, kind: Kind) -> Option<&UnitQuant> {
        self.units
            .get(self.index(layer, head, kind))
            .and_then(Option::as_ref)
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Mean nominal bits over quantized units (full-precision units excluded), if any.
    pub fn mean_bits(&self) -> Option<f64> {
        let bits: Vec<f64> = self.units.iter().flatten().map(|u| u.bits as f64).collect();
        (!bits.is_empty()).then(|| bits.iter().sum::<f64>() / bits.len() as f64)
    }

    /// Checks every design can serve heads of `head_dim` (QuaRot needs a power of two).
    pub fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        for u in self.units.iter().flatten() {
            u.quantizer
                .check_head_dim(head_dim)
                .map_err(candle_core::Error::wrap)?;
        }
        Ok(())
    }

    fn index(&self, layer: usize, head: usize, kind: Kind) -> usize {
        (layer * self.kv_heads + head) * 2 + matches!(kind, Kind::V) as usize
    }
}

/// A KV cache choice as written on the command line: `fp`, or a quantizer spec and bits,
/// `DESIGN[:PARAMS]:BITS` (`kivi:2`, `quarot:4`, `kivi:g=64:2`).
#[derive(Debug, Clone, PartialEq)]
pub enum KvSpec {
    FullPrecision,
    Uniform { quantizer: QuantizerSpec, bits: u8 },
}

impl KvSpec {
    pub fn parse(s: &str) -> std::result::Result<KvSpec, String> {
        let s = s.trim();
        if s == "fp" || s == "f32" {
            return Ok(KvSpec::FullPrecision);
        }
        let (design, bits) = s.rsplit_once(':').ok_or_else(|| {
            format!("KV spec `{s}`: expected `fp` or DESIGN:BITS such as `kivi:2` or `quarot:4`")
        })?;
        let bits: u8 = bits.parse().map_err(|_| {
            format!(
                "KV spec `{s}`: bits must be an integer in 1..=8 after the last `:`, got `{bits}`"
            )
        })?;
        quant::check_bits(bits).map_err(|e| format!("KV spec `{s}`: {e}"))?;
        let quantizer = QuantizerSpec::parse(design).map_err(|e| format!("KV spec `{s}`: {e}"))?;
        Ok(KvSpec::Uniform { quantizer, bits })
    }

    /// The plan this spec means for a model (`None` for full precision).
    pub fn plan(
        &self,
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Option<KvQuantPlan>> {
        match self {
            KvSpec::FullPrecision => Ok(None),
            KvSpec::Uniform { quantizer, bits } => {
                let q: Arc<dyn Quantizer> =
                    Arc::from(quant::build(quantizer).map_err(candle_core::Error::wrap)?);
                q.check_head_dim(head_dim)
                    .map_err(candle_core::Error::wrap)?;
                Ok(Some(KvQuantPlan::uniform(q, *bits, num_layers, kv_heads)?))
            }
        }
    }
}

impl std::fmt::Display for KvSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvSpec::FullPrecision => f.write_str("fp"),
            KvSpec::Uniform { quantizer, bits } => write!(f, "{quantizer}:{bits}"),
        }
    }
}

/// Which quantization a [`SimQuantCache`] simulates (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimSemantics {
    /// Every unit's whole stored tile fake-quantized at each call (KIVI keys: the trailing
    /// partial group re-fitted), the `residual` most recent keys and values of each query in
    /// full precision (f32). What `eval` has always measured.
    #[default]
    Tile,
    /// Exactly what the packed cache stores: K and V rounded to f16, KIVI keys quantized by
    /// completed groups only, per-token units outside the residual window.
    Packed,
}

impl SimSemantics {
    pub fn as_str(self) -> &'static str {
        match self {
            SimSemantics::Tile => "tile",
            SimSemantics::Packed => "packed",
        }
    }
}

impl std::str::FromStr for SimSemantics {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tile" => Ok(SimSemantics::Tile),
            "packed" => Ok(SimSemantics::Packed),
            other => Err(format!(
                "unknown KV semantics `{other}` (known: tile, packed)"
            )),
        }
    }
}

impl std::fmt::Display for SimSemantics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// K/V stored in full precision, fake-quantized per unit before every attention.
#[derive(Debug, Clone)]
pub struct SimQuantCache {
    plan: KvQuantPlan,
    residual: usize,
    semantics: SimSemantics,
    store: LayerStore,
    len: usize,
}

impl SimQuantCache {
    /// A cache quantizing by `plan` with [`SimSemantics::Tile`], keeping the `residual` most
    /// recent tokens of each query in full precision.
    pub fn new(plan: KvQuantPlan, residual: usize) -> Self {
        SimQuantCache::with_semantics(plan, residual, SimSemantics::Tile)
    }

    /// A cache quantizing by `plan` under `semantics` with residual window `residual`.
    pub fn with_semantics(plan: KvQuantPlan, residual: usize, semantics: SimSemantics) -> Self {
        let store = LayerStore::new(plan.num_layers);
        SimQuantCache {
            plan,
            residual,
            semantics,
            store,
            len: 0,
        }
    }

    pub fn plan(&self) -> &KvQuantPlan {
        &self.plan
    }

    pub fn residual(&self) -> usize {
        self.residual
    }

    pub fn semantics(&self) -> SimSemantics {
        self.semantics
    }

    /// Fake-quantizes every head of `x` (`[kv_heads, tokens, head_dim]`) of `layer`: head `h`'s
    /// first `prefix[h]` tokens as one tile (all tokens when `prefix` is `None`); the other
    /// tokens, and heads whose unit is full precision, are copied unchanged.
    fn quantize(
        &self,
        layer: usize,
        kind: Kind,
        x: &Tensor,
        prefix: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (kv_heads, tokens, head_dim) = x.dims3()?;
        if kv_heads != self.plan.kv_heads {
            candle_core::bail!(
                "layer {layer}: {kv_heads} KV heads, the plan has {}",
                self.plan.kv_heads
            );
        }
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let tile_len = tokens * head_dim;
        let mut out = vec![0f32; data.len()];
        out.par_chunks_mut(tile_len.max(1))
            .zip(data.par_chunks(tile_len.max(1)))
            .enumerate()
            .try_for_each(|(head, (dst, src))| {
                let quantized = prefix.map_or(tokens, |p| p[head].min(tokens));
                let Some(u) = self.plan.unit(layer, head, kind).filter(|_| quantized > 0) else {
                    dst.copy_from_slice(src);
                    return Ok(());
                };
                let shape = TileShape {
                    tokens: quantized,
                    head_dim,
                };
                let (q_dst, fp_dst) = dst.split_at_mut(shape.len());
                fp_dst.copy_from_slice(&src[shape.len()..]);
                u.quantizer
                    .fake_quantize(&src[..shape.len()], shape, kind, u.bits, q_dst)
                    .map_err(|e| {
                        candle_core::Error::Msg(format!(
                            "layer {layer} head {head} {}: {e}",
                            kind.as_str()
                        ))
                    })
            })?;
        Tensor::from_vec(out, (kv_heads, tokens, head_dim), x.device())
    }

    /// The packed cache's layout of every KV head's `kind` unit in `layer` (`None`: full
    /// precision, never quantized).
    fn packed_layouts(
        &self,
        layer: usize,
        kind: Kind,
        head_dim: usize,
    ) -> Result<Vec<Option<UnitLayout>>> {
        (0..self.plan.kv_heads)
            .map(|head| {
                self.plan
                    .unit(layer, head, kind)
                    .map(|u| {
                        UnitLayout::of(u.quantizer.as_ref(), kind, head_dim).map_err(|e| {
                            candle_core::Error::Msg(format!(
                                "layer {layer} head {head} {}: {e}",
                                kind.as_str()
                            ))
                        })
                    })
                    .transpose()
            })
            .collect()
    }

    /// [`SimSemantics::Packed`] attention of `q` (queries at `self.len..`) over all stored
    /// `k_all`, `v_all`.
    fn attend_packed(
        &self,
        layer: usize,
        q: &Tensor,
        k_all: &Tensor,
        v_all: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor> {
        let (kv_heads, stored, head_dim) = k_all.dims3()?;
        let queries = q.dim(1)?;
        let first = self.len;
        let residual = self.residual;
        // Tokens unit `layout` holds as codes once `len` tokens are stored.
        let quantized = |layout: &Option<UnitLayout>, len: usize| {
            layout.map_or(0, |l| l.quantized_len(len, residual))
        };
        let mut quantized_views = Vec::with_capacity(2);
        let mut masks = Vec::with_capacity(2);
        for (kind, x) in [(Kind::K, k_all), (Kind::V, v_all)] {
            let layouts = self.packed_layouts(layer, kind, head_dim)?;
            // The last query sees the most codes; earlier ones read fewer of them (mask).
            let prefix: Vec<usize> = layouts.iter().map(|l| quantized(l, stored)).collect();
            quantized_views.push(self.quantize(layer, kind, x, Some(&prefix))?);
            let mut mask = vec![0u8; kv_heads * queries * stored];
            for (h, layout) in layouts.iter().enumerate() {
                for i in 0..queries {
                    let codes = quantized(layout, first + i + 1);
                    let row = &mut mask[(h * queries + i) * stored..(h * queries + i + 1) * stored];
                    row[codes.min(stored)..].fill(1);
                }
            }
            masks.push(Tensor::from_vec(
                mask,
                (kv_heads, queries, stored),
                q.device(),
            )?);
        }
        attention_with_precision_masks(
            q,
            k_all,
            v_all,
            &quantized_views[0],
            &quantized_views[1],
            first,
            &masks[0],
            &masks[1],
            params,
        )
    }
}

/// `x` (`[kv_heads, tokens, head_dim]`, f32) with every value rounded to f16 exactly as the
/// packed cache rounds what it has not quantized; a value that overflows f16 (or is not
/// finite) is an error naming where it is, as in the packed cache.
fn rounded_to_f16(layer: usize, name: &str, x: &Tensor) -> Result<Tensor> {
    let (_, tokens, head_dim) = x.dims3()?;
    let mut data = x.flatten_all()?.to_vec1::<f32>()?;
    ratequant::kvcache::round_to_residual_precision(&mut data);
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let original = x.flatten_all()?.get(i)?.to_scalar::<f32>()?;
        let per_head = tokens * head_dim;
        candle_core::bail!(
            "layer {layer} {name}: value {original} at kv head {}, new token {}, channel {} is \
             not finite in f16 (the packed semantics hold K/V in f16, finite only below 65520 in magnitude)",
            i / per_head,
            (i % per_head) / head_dim,
            i % head_dim
        );
    }
    Tensor::from_vec(data, x.dims(), x.device())
}

impl KvCache for SimQuantCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor> {
        if layer >= self.plan.num_layers {
            candle_core::bail!(
                "the KV plan covers {} layers, the model asked for layer {layer}",
                self.plan.num_layers
            );
        }
        if self.semantics == SimSemantics::Packed {
            let k = rounded_to_f16(layer, "k", k)?;
            let v = rounded_to_f16(layer, "v", v)?;
            let (k_all, v_all) = self.store.append(layer, &k, &v, self.len)?;
            return self.attend_packed(layer, q, &k_all, &v_all, params);
        }
        let (k_all, v_all) = self.store.append(layer, k, v, self.len)?;
        let k_q = self.quantize(layer, Kind::K, &k_all, None)?;
        let v_q = self.quantize(layer, Kind::V, &v_all, None)?;
        attention_with_residual(
            q,
            &k_all,
            &v_all,
            &k_q,
            &v_q,
            self.len,
            self.residual,
            params,
        )
    }

    fn len(&self) -> usize {
        self.len
    }

    fn advance(&mut self, new_tokens: usize) {
        self.len += new_tokens;
    }

    fn reset(&mut self) {
        self.store.clear();
        self.len = 0;
    }
}

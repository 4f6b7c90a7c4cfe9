//! Scaled dot-product attention shared by the caches that hold K/V as tensors.
//!
//! Grouped-query attention without copying K/V: query heads `g·j .. g·(j+1)` all read KV head
//! `j`, so `q` (`[heads, T, d]`, contiguous) is viewed as `[kv_heads, g·T, d]` and multiplied
//! by each KV head's keys once. Row `r` of a group's scores belongs to query `r % T`.
//!
//! The fast path fuses scale, causal/sliding-window mask and softmax into one pass over the
//! scores ([`masked_softmax`]): no mask tensor is built and masked entries never reach `exp`.
//! The differentiable path spells the same computation with candle ops that have a backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::kv::AttnParams;

/// The keys visible to the query at absolute position `pos`: `lo..=pos` (clipped to the
/// stored length by the caller).
#[inline]
pub fn visible_from(pos: usize, sliding_window: Option<usize>) -> usize {
    match sliding_window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

/// Causal attention of `q` (`[heads, T, d]`, query `t` at position `q_start + t`) over `k`, `v`
/// (`[kv_heads, S, d]`, key `s` at position `s`; `S >= q_start + T`). Returns `[heads, T, d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_start: usize,
    params: &AttnParams,
) -> Result<Tensor> {
    let g = Grouping::new(q, k, v, q_start)?;
    let qg = g.grouped_queries(q)?;
    let scores = qg.matmul(&k.t()?)?;
    let probs = if params.differentiable {
        let mask = causal_mask(g.t, g.s, q_start, params.sliding_window, q.device())?;
        let scores = (scores * params.scale)?.reshape((g.kv_heads, g.group, g.t, g.s))?;
        candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?.reshape((
            g.kv_heads,
            g.group * g.t,
            g.s,
        ))?
    } else {
        masked_softmax(&scores, g.t, q_start, params.scale, params.sliding_window)?
    };
    probs.matmul(v)?.reshape((g.heads, g.t, g.d))
}

/// Attention where, for every query, keys and values closer than `residual` positions (the
/// query's own included) come from `k_fp`/`v_fp` and all older ones from `k_q`/`v_q`:
/// scores are `q·k_fp` or `q·k_q` per (query, key), and the output is
/// `P_recent·V_fp + P_old·V_q` under one softmax. Exact per query, as a cache that keeps a
/// sliding full-precision window would compute it.
#[allow(clippy::too_many_arguments)]
pub fn attention_with_residual(
    q: &Tensor,
    k_fp: &Tensor,
    v_fp: &Tensor,
    k_q: &Tensor,
    v_q: &Tensor,
    q_start: usize,
    residual: usize,
    params: &AttnParams,
) -> Result<Tensor> {
    let g = Grouping::new(q, k_fp, v_fp, q_start)?;
    if k_q.dims() != k_fp.dims() || v_q.dims() != v_fp.dims() {
        candle_core::bail!(
            "quantized K/V {:?}/{:?} differ in shape from full-precision K/V {:?}/{:?}",
            k_q.dims(),
            v_q.dims(),
            k_fp.dims(),
            v_fp.dims()
        );
    }
    // Every visible key is recent for every query: plain full-precision attention.
    if residual >= q_start + g.t {
        return attention(q, k_fp, v_fp, q_start, params);
    }
    if residual == 0 {
        return attention(q, k_q, v_q, q_start, params);
    }
    // The same window for keys and values: the general two-mask attention with one mask.
    let recent = recent_mask(g.t, g.s, q_start, residual, q.device())?
        .reshape((1, g.t, g.s))?
        .broadcast_as((g.kv_heads, g.t, g.s))?;
    attention_with_precision_masks(q, k_fp, v_fp, k_q, v_q, q_start, &recent, &recent, params)
}

/// Attention where each KV head decides, per (query, key), whether that key and that value are
/// read in full precision (`k_fp`/`v_fp`) or quantized (`k_q`/`v_q`): `k_fp_mask` and
/// `v_fp_mask` are u8 `[kv_heads, T, S]`, 1 = full precision. Keys and values have separate
/// masks because a cache may hold them under different rules (the packed cache quantizes
/// KIVI keys by completed groups and per-token values by a residual window). One softmax over
/// the mixed scores; the output is `P·(mask_v ? V_fp : V_q)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_with_precision_masks(
    q: &Tensor,
    k_fp: &Tensor,
    v_fp: &Tensor,
    k_q: &Tensor,
    v_q: &Tensor,
    q_start: usize,
    k_fp_mask: &Tensor,
    v_fp_mask: &Tensor,
    params: &AttnParams,
) -> Result<Tensor> {
    let g = Grouping::new(q, k_fp, v_fp, q_start)?;
    if k_q.dims() != k_fp.dims() || v_q.dims() != v_fp.dims() {
        candle_core::bail!(
            "quantized K/V {:?}/{:?} differ in shape from full-precision K/V {:?}/{:?}",
            k_q.dims(),
            v_q.dims(),
            k_fp.dims(),
            v_fp.dims()
        );
    }
    for (name, mask) in [("key", k_fp_mask), ("value", v_fp_mask)] {
        if mask.dims() != [g.kv_heads, g.t, g.s] {
            candle_core::bail!(
                "{name} precision mask {:?} must be [kv_heads {}, queries {}, keys {}]",
                mask.dims(),
                g.kv_heads,
                g.t,
                g.s
            );
        }
    }
    let four_d = (g.kv_heads, g.group, g.t, g.s);
    let spread = |m: &Tensor| -> Result<Tensor> {
        m.reshape((g.kv_heads, 1, g.t, g.s))?.broadcast_as(four_d)
    };
    let (k_mask, v_mask) = (spread(k_fp_mask)?, spread(v_fp_mask)?);
    let qg = g.grouped_queries(q)?;
    let scores_fp = qg.matmul(&k_fp.t()?)?.reshape(four_d)?;
    let scores_q = qg.matmul(&k_q.t()?)?.reshape(four_d)?;
    let scores = k_mask.where_cond(&scores_fp, &scores_q)?;
    let probs = if params.differentiable {
        let mask = causal_mask(g.t, g.s, q_start, params.sliding_window, q.device())?;
        candle_nn::ops::softmax(&(scores * params.scale)?.broadcast_add(&mask)?, D::Minus1)?
    } else {
        let flat = scores.reshape((g.kv_heads, g.group * g.t, g.s))?;
        masked_softmax(&flat, g.t, q_start, params.scale, params.sliding_window)?.reshape(four_d)?
    };
    let zeros = probs.zeros_like()?;
    let p_fp = v_mask.where_cond(&probs, &zeros)?;
    let p_q = v_mask.where_cond(&zeros, &probs)?;
    let flat = (g.kv_heads, g.group * g.t, g.s);
    let out = (p_fp.reshape(flat)?.matmul(v_fp)? + p_q.reshape(flat)?.matmul(v_q)?)?;
    out.reshape((g.heads, g.t, g.d))
}

/// Shapes of one attention call, checked.
struct Grouping {
    heads: usize,
    kv_heads: usize,
    group: usize,
    t: usize,
    s: usize,
    d: usize,
}

impl Grouping {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, q_start: usize) -> Result<Self> {
        let (heads, t, d) = q.dims3()?;
        let (kv_heads, s, dk) = k.dims3()?;
        if v.dims() != k.dims() || dk != d {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!(
                "attention: {heads} query heads are not a multiple of {kv_heads} KV heads"
            );
        }
        if s < q_start + t {
            candle_core::bail!(
                "attention: {s} stored keys cannot serve queries at positions {q_start}..{}",
                q_start + t
            );
        }
        Ok(Grouping {
            heads,
            kv_heads,
            group: heads / kv_heads,
            t,
            s,
            d,
        })
    }

    /// `[heads, T, d]` viewed as `[kv_heads, group·T, d]` (free when `q` is contiguous).
    fn grouped_queries(&self, q: &Tensor) -> Result<Tensor> {
        q.contiguous()?
            .reshape((self.kv_heads, self.group * self.t, self.d))
    }
}

/// `[T, S]` additive mask: 0 where query `t` (position `q_start + t`) may see key `s`, −∞
/// elsewhere.
pub fn causal_mask(
    t: usize,
    s: usize,
    q_start: usize,
    sliding_window: Option<usize>,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut mask = vec![f32::NEG_INFINITY; t * s];
    for (i, row) in mask.chunks_mut(s).enumerate() {
        let pos = q_start + i;
        let lo = visible_from(pos, sliding_window);
        row[lo..=pos.min(s - 1)].fill(0.0);
    }
    Tensor::from_vec(mask, (t, s), device)
}

/// `[T, S]` u8 mask: 1 where key `s` is less than `residual` positions behind query `t`.
fn recent_mask(
    t: usize,
    s: usize,
    q_start: usize,
    residual: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut mask = vec![0u8; t * s];
    for (i, row) in mask.chunks_mut(s).enumerate() {
        let pos = q_start + i;
        let lo = (pos + 1).saturating_sub(residual);
        row[lo..=pos.min(s - 1)].fill(1);
    }
    Tensor::from_vec(mask, (t, s), device)
}

/// Softmax of `scale·scores` over the keys each query may see, zero elsewhere, in one pass.
/// `scores` is `[batch, rows, S]` where row `r` is query `r % queries` (grouped heads stacked).
pub fn masked_softmax(
    scores: &Tensor,
    queries: usize,
    q_start: usize,
    scale: f64,
    sliding_window: Option<usize>,
) -> Result<Tensor> {
    scores.apply_op1_no_bwd(&MaskedSoftmax {
        queries,
        q_start,
        scale: scale as f32,
        sliding_window,
    })
}

struct MaskedSoftmax {
    queries: usize,
    q_start: usize,
    scale: f32,
    sliding_window: Option<usize>,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = match storage {
            CpuStorage::F32(data) => data,
            other => candle_core::bail!(
                "masked softmax supports f32 scores, got {:?}",
                other.dtype()
            ),
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("masked softmax needs contiguous scores");
        };
        let src = &src[start..end];
        let s = layout.dims().last().copied().unwrap_or(0);
        if s == 0 || self.queries == 0 || s < self.q_start + self.queries {
            candle_core::bail!(
                "masked softmax: {s} keys cannot serve {} queries from position {}",
                self.queries,
                self.q_start
            );
        }
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(s)
            .zip(src.par_chunks(s))
            .enumerate()
            .for_each(|(row, (out, scores))| {
                let pos = self.q_start + row % self.queries;
                let lo = visible_from(pos, self.sliding_window);
                softmax_row(&scores[lo..=pos], &mut out[lo..=pos], self.scale);
            });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// `out = softmax(scale · x)`; `scale > 0`, `x` non-empty.
fn softmax_row(x: &[f32], out: &mut [f32], scale: f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        let e = ((v - max) * scale).exp();
        *o = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

//! The decoder written out as plain loops over `f32` slices, with `f64` accumulation.
//!
//! Slow and obvious on purpose: tests compare the candle decoder and the KV caches against it
//! on tiny models. It shares no code with [`crate::decoder`] or [`crate::attention`].

use candle_core::Result;
use ratequant::quant::Kind;

use crate::config::{Activation, ModelConfig, RopeLayout};
use crate::model::Weights;

/// One attention head's inputs, row-major.
pub struct HeadTiles<'a> {
    /// `[T, d]` queries, query `t` at position `q_start + t`.
    pub q: &'a [f32],
    /// `[S, d]` keys/values in full precision, key `s` at position `s`.
    pub k_fp: &'a [f32],
    pub v_fp: &'a [f32],
    /// `[S, d]` keys/values as quantized (equal to the full-precision ones when unquantized).
    pub k_q: &'a [f32],
    pub v_q: &'a [f32],
}

/// Attention of one query head over one KV head: query at position `p` sees key `s` when
/// `s <= p` and (with a window `w`) `p - s < w`; keys with `p - s < residual` are read from the
/// full-precision tiles, older ones from the quantized tiles. Returns `[T, d]`.
pub fn attention_head(
    tiles: &HeadTiles<'_>,
    d: usize,
    q_start: usize,
    scale: f64,
    sliding_window: Option<usize>,
    residual: usize,
) -> Vec<f32> {
    let t_len = tiles.q.len() / d;
    let mut out = vec![0f32; t_len * d];
    for t in 0..t_len {
        let p = q_start + t;
        let q = &tiles.q[t * d..(t + 1) * d];
        let visible: Vec<usize> = (0..=p)
            .filter(|&s| sliding_window.is_none_or(|w| p - s < w))
            .collect();
        let recent = |s: usize| p - s < residual;
        let scores: Vec<f64> = visible
            .iter()
            .map(|&s| {
                let k = if recent(s) { tiles.k_fp } else { tiles.k_q };
                scale * dot(q, &k[s * d..(s + 1) * d])
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for (&s, w) in visible.iter().zip(&weights) {
            let v = if recent(s) { tiles.v_fp } else { tiles.v_q };
            for c in 0..d {
                out[t * d + c] += (w / total * v[s * d + c] as f64) as f32;
            }
        }
    }
    out
}

/// How the reference forward treats K/V tiles before attention: given (layer, kv head, kind)
/// and the full-precision tile `[S, d]`, return the tile attention reads for old keys.
pub type TileQuantizer<'a> = dyn Fn(usize, usize, Kind, &[f32], usize) -> Vec<f32> + 'a;

/// Reference forward of `tokens` from position 0 in one call: logits `[T][vocab]`.
/// `quantize` (if given) transforms every unit's tile, read for keys at least `residual`
/// positions behind the query.
pub fn forward(
    config: &ModelConfig,
    weights: &Weights,
    tokens: &[u32],
    quantize: Option<&TileQuantizer<'_>>,
    residual: usize,
) -> Result<Vec<Vec<f32>>> {
    let c = config;
    let get =
        |name: &str| -> Result<Vec<f32>> { weights.get(name)?.flatten_all()?.to_vec1::<f32>() };
    let (h, d, heads, kvh) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
    let t_len = tokens.len();
    let embed = get("token_embd.weight")?;
    let mut x: Vec<Vec<f32>> = tokens
        .iter()
        .map(|&tok| {
            let row = &embed[tok as usize * h..(tok as usize + 1) * h];
            let s = if c.scale_embeddings {
                (h as f32).sqrt()
            } else {
                1.0
            };
            row.iter().map(|v| v * s).collect()
        })
        .collect();
    let scale = match c.query_pre_attn_scalar {
        Some(s) => 1.0 / s.sqrt(),
        None => 1.0 / (d as f64).sqrt(),
    };
    for l in 0..c.num_layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        let sliding = c.is_sliding(l);
        let window = if sliding { c.sliding_window } else { None };
        let base = if sliding {
            c.rope_local_theta.unwrap_or(c.rope_theta)
        } else {
            c.rope_theta
        };
        let attn_norm = get(&p("attn_norm.weight"))?;
        let (wq, wk, wv, wo) = (
            get(&p("attn_q.weight"))?,
            get(&p("attn_k.weight"))?,
            get(&p("attn_v.weight"))?,
            get(&p("attn_output.weight"))?,
        );
        let bias = |n: &str| -> Result<Option<Vec<f32>>> {
            if c.qkv_bias {
                get(&p(n)).map(Some)
            } else {
                Ok(None)
            }
        };
        let (bq, bk, bv) = (
            bias("attn_q.bias")?,
            bias("attn_k.bias")?,
            bias("attn_v.bias")?,
        );
        // Per position: q [heads·d], k/v [kvh·d].
        let mut q_rows = Vec::with_capacity(t_len);
        let mut k_rows = Vec::with_capacity(t_len);
        let mut v_rows = Vec::with_capacity(t_len);
        for (pos, xt) in x.iter().enumerate() {
            let hn = rms_norm(xt, &attn_norm, c.rms_norm_eps);
            let mut q = matvec(&wq, &hn, bq.as_deref());
            let mut k = matvec(&wk, &hn, bk.as_deref());
            let v = matvec(&wv, &hn, bv.as_deref());
            if c.qk_norm {
                let (qn, kn) = (
                    get(&p("attn_q_norm.weight"))?,
                    get(&p("attn_k_norm.weight"))?,
                );
                for head in q.chunks_mut(d) {
                    let normed = rms_norm(head, &qn, c.rms_norm_eps);
                    head.copy_from_slice(&normed);
                }
                for head in k.chunks_mut(d) {
                    let normed = rms_norm(head, &kn, c.rms_norm_eps);
                    head.copy_from_slice(&normed);
                }
            }
            for head in q.chunks_mut(d).chain(k.chunks_mut(d)) {
                rope(head, pos, base, c.rope_layout);
            }
            q_rows.push(q);
            k_rows.push(k);
            v_rows.push(v);
        }
        // Per head tiles and attention.
        let mut attn_rows = vec![vec![0f32; heads * d]; t_len];
        let group = heads / kvh;
        for j in 0..kvh {
            let tile = |rows: &Vec<Vec<f32>>| -> Vec<f32> {
                rows.iter()
                    .flat_map(|r| r[j * d..(j + 1) * d].to_vec())
                    .collect()
            };
            let (k_fp, v_fp) = (tile(&k_rows), tile(&v_rows));
            let (k_q, v_q) = match quantize {
                Some(f) => (f(l, j, Kind::K, &k_fp, d), f(l, j, Kind::V, &v_fp, d)),
                None => (k_fp.clone(), v_fp.clone()),
            };
            for hq in j * group..(j + 1) * group {
                let q = tile_of(&q_rows, hq, d);
                let tiles = HeadTiles {
                    q: &q,
                    k_fp: &k_fp,
                    v_fp: &v_fp,
                    k_q: &k_q,
                    v_q: &v_q,
                };
                let res = if quantize.is_some() {
                    residual
                } else {
                    usize::MAX
                };
                let out = attention_head(&tiles, d, 0, scale, window, res);
                for t in 0..t_len {
                    attn_rows[t][hq * d..(hq + 1) * d].copy_from_slice(&out[t * d..(t + 1) * d]);
                }
            }
        }
        let post_attn = if c.post_norms {
            Some(get(&p("post_attention_norm.weight"))?)
        } else {
            None
        };
        let ffn_norm = get(&p("ffn_norm.weight"))?;
        let (wg, wu, wd) = (
            get(&p("ffn_gate.weight"))?,
            get(&p("ffn_up.weight"))?,
            get(&p("ffn_down.weight"))?,
        );
        let post_ffw = if c.post_norms {
            Some(get(&p("post_ffw_norm.weight"))?)
        } else {
            None
        };
        for (xt, attn) in x.iter_mut().zip(&attn_rows) {
            let mut o = matvec(&wo, attn, None);
            if let Some(w) = &post_attn {
                o = rms_norm(&o, w, c.rms_norm_eps);
            }
            add_into(xt, &o);
            let hn = rms_norm(xt, &ffn_norm, c.rms_norm_eps);
            let gate = matvec(&wg, &hn, None);
            let up = matvec(&wu, &hn, None);
            let act: Vec<f32> = gate
                .iter()
                .zip(&up)
                .map(|(&g, &u)| activation(g, c.activation) * u)
                .collect();
            let mut dn = matvec(&wd, &act, None);
            if let Some(w) = &post_ffw {
                dn = rms_norm(&dn, w, c.rms_norm_eps);
            }
            add_into(xt, &dn);
        }
    }
    let final_norm = get("output_norm.weight")?;
    let out_w = if weights.contains("output.weight") {
        get("output.weight")?
    } else {
        embed
    };
    Ok(x.iter()
        .map(|xt| {
            let hn = rms_norm(xt, &final_norm, c.rms_norm_eps);
            let logits = matvec(&out_w, &hn, None);
            match c.final_logit_softcapping {
                Some(cap) => logits
                    .iter()
                    .map(|&v| ((v as f64 / cap).tanh() * cap) as f32)
                    .collect(),
                None => logits,
            }
        })
        .collect())
}

fn tile_of(rows: &[Vec<f32>], head: usize, d: usize) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| r[head * d..(head + 1) * d].to_vec())
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// `W·x (+ b)` for `W` `[out, in]` row-major.
fn matvec(w: &[f32], x: &[f32], b: Option<&[f32]>) -> Vec<f32> {
    let n = x.len();
    w.chunks(n)
        .enumerate()
        .map(|(i, row)| (dot(row, x) + b.map_or(0.0, |b| b[i] as f64)) as f32)
        .collect()
}

fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let mean_sq = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &g)| (v as f64 * inv * g as f64) as f32)
        .collect()
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

fn activation(x: f32, act: Activation) -> f32 {
    let x = x as f64;
    let y = match act {
        Activation::Silu => x / (1.0 + (-x).exp()),
        Activation::GeluTanh => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
    };
    y as f32
}

/// Rotates one head vector in place for position `pos`.
pub fn rope(head: &mut [f32], pos: usize, base: f64, layout: RopeLayout) {
    let d = head.len();
    for i in 0..d / 2 {
        let angle = pos as f64 * base.powf(-(2.0 * i as f64) / d as f64);
        let (sin, cos) = angle.sin_cos();
        let (a, b) = match layout {
            RopeLayout::Adjacent => (2 * i, 2 * i + 1),
            RopeLayout::Halves => (i, i + d / 2),
        };
        let (x0, x1) = (head[a] as f64, head[b] as f64);
        head[a] = (x0 * cos - x1 * sin) as f32;
        head[b] = (x0 * sin + x1 * cos) as f32;
    }
}

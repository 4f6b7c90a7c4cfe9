//! Calibration capture: every unit's keys and values (after RoPE, as a cache stores them) and
//! their Fisher importance, from a few sequences run through the differentiable decoder.
//!
//! [`CaptureCache`] adds a zero [`Var`] ("probe") to each layer's K and V before attention.
//! The loss does not depend on a probe's value at zero, but its gradient with respect to the
//! probe is exactly dL/dK (dL/dV) of that layer. Weights are plain tensors and the decoder's
//! linear layers use [`crate::frozen::matmul`], so the backward pass computes activation
//! gradients only.
//!
//! Per element the importance is the squared gradient of the sequence's mean next-token loss;
//! the core's distortion code sums it over a unit's elements and averages over sequences.

use std::time::Instant;

use candle_core::{DType, Result as CandleResult, Tensor, Var};
use ratequant::distortion::{UnitImportance, UnitTiles};
use ratequant::quant::{Kind, TileShape};

use crate::attention::attention;
use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::kv::{AttnParams, KvCache};

#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error(
        "the calibration text tokenizes to {tokens} tokens: {available} sequence(s) of --ctx {ctx}, \
         fewer than the {requested} requested (--sequences); use a longer text, fewer sequences or a smaller --ctx"
    )]
    TextTooShort {
        tokens: usize,
        ctx: usize,
        available: usize,
        requested: usize,
    },
    #[error("--sequences must be at least 1 and --ctx at least 2 (got {sequences} and {ctx})")]
    BadShape { sequences: usize, ctx: usize },
    #[error("--ctx {ctx} exceeds the model's maximum context of {max} tokens")]
    ContextTooLarge { ctx: usize, max: usize },
    #[error(
        "calibration would need about {:.1} GiB ({}), but only {:.1} GiB of memory is available; \
         use fewer --sequences or a smaller --ctx",
        gib(.needed), .breakdown, gib(.available)
    )]
    OutOfMemory {
        needed: u64,
        available: u64,
        breakdown: String,
    },
    #[error("the model adds BOS but its config names no BOS token id")]
    MissingBos,
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

fn gib(bytes: &u64) -> f64 {
    *bytes as f64 / (1u64 << 30) as f64
}

/// Cuts `tokens` into `sequences` consecutive, non-overlapping sequences of `ctx` tokens, the
/// first token of each replaced by `bos` when given (as evaluation chunks are).
pub fn calibration_sequences(
    tokens: &[u32],
    ctx: usize,
    sequences: usize,
    bos: Option<u32>,
) -> Result<Vec<Vec<u32>>, CalibrateError> {
    if sequences == 0 || ctx < 2 {
        return Err(CalibrateError::BadShape { sequences, ctx });
    }
    let available = tokens.len() / ctx;
    if available < sequences {
        return Err(CalibrateError::TextTooShort {
            tokens: tokens.len(),
            ctx,
            available,
            requested: sequences,
        });
    }
    Ok((0..sequences)
        .map(|i| {
            let mut s = tokens[i * ctx..(i + 1) * ctx].to_vec();
            if let Some(b) = bos {
                s[0] = b;
            }
            s
        })
        .collect())
}

/// What a calibration run will hold in memory, by part.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// Captured K, V and their per-element importance, all sequences.
    pub captured: u64,
    /// The forward graph and gradients of one sequence (sequences run one at a time).
    pub graph: u64,
    /// Distortion measurement scratch (one fake-quantized copy per worker thread and unit).
    pub scratch: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.captured + self.graph + self.scratch
    }
    pub fn breakdown(&self) -> String {
        format!(
            "captured K/V and importance {:.2} GiB + one sequence's graph {:.2} GiB + scratch {:.2} GiB",
            gib(&self.captured),
            gib(&self.graph),
            gib(&self.scratch)
        )
    }
}

/// Upper estimate of the memory a calibration of `sequences × ctx` tokens needs besides the
/// weights. The graph term counts every f32 activation the differentiable forward keeps for
/// the backward pass (attention scores in several forms, hidden states, MLP activations,
/// logits) and the same again for their gradients.
pub fn estimate_memory(config: &ModelConfig, sequences: usize, ctx: usize) -> MemoryEstimate {
    let c = config;
    let f = 4u64;
    let (t, s) = (ctx as u64, sequences as u64);
    let kv_elems = c.num_layers as u64 * c.num_kv_heads as u64 * c.head_dim as u64 * t;
    // K, V, K importance, V importance.
    let captured = 4 * kv_elems * s * f;
    // Per layer: scores, scaled, masked, exp, normalised probabilities (5 × heads·T²);
    // hidden-sized tensors (norms, residuals: ~10), qkv + rope copies (~4× its width), MLP
    // gate/up/activation/product (~5× intermediate).
    let qkv_width = ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim) as u64;
    let per_layer = 5 * c.num_heads as u64 * t * t
        + t * (10 * c.hidden_size as u64 + 4 * qkv_width + 5 * c.intermediate_size as u64);
    // Logits, log-softmax and their gradients.
    let logits = 4 * t * c.vocab_size as u64;
    let graph = 2 * (c.num_layers as u64 * per_layer + logits) * f;
    let threads = rayon::current_num_threads() as u64;
    let scratch = 2 * threads * s * t * c.head_dim as u64 * f;
    MemoryEstimate {
        captured,
        graph,
        scratch,
    }
}

/// Refuses when `estimate` exceeds 90% of `available` (keeping room for the weights' growth
/// and the allocator).
pub fn check_memory(
    estimate: &MemoryEstimate,
    available: Option<u64>,
) -> Result<(), CalibrateError> {
    match available {
        Some(avail) if estimate.total() > avail / 10 * 9 => Err(CalibrateError::OutOfMemory {
            needed: estimate.total(),
            available: avail,
            breakdown: estimate.breakdown(),
        }),
        _ => Ok(()),
    }
}

/// One layer's captured tensors for the current sequence.
struct LayerProbe {
    k: Tensor,
    v: Tensor,
    k_probe: Var,
    v_probe: Var,
}

/// A KV cache that records each layer's K and V and mixes a zero probe into them so that
/// dL/dK and dL/dV can be read after `backward`. It takes a whole sequence in one forward call.
pub struct CaptureCache {
    layers: Vec<Option<LayerProbe>>,
    len: usize,
}

impl CaptureCache {
    pub fn new(num_layers: usize) -> Self {
        CaptureCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Keys of `layer` (`[kv_heads, T, head_dim]`, detached) and the probe whose gradient is
    /// dL/dK.
    pub fn keys(&self, layer: usize) -> Option<(&Tensor, &Var)> {
        self.layers.get(layer)?.as_ref().map(|p| (&p.k, &p.k_probe))
    }

    /// Values of `layer` and their probe.
    pub fn values(&self, layer: usize) -> Option<(&Tensor, &Var)> {
        self.layers.get(layer)?.as_ref().map(|p| (&p.v, &p.v_probe))
    }
}

impl KvCache for CaptureCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> CandleResult<Tensor> {
        if self.len != 0 {
            candle_core::bail!("the capture cache takes each sequence in one forward call (reset it between sequences)");
        }
        let num_layers = self.layers.len();
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "capture cache has {num_layers} layers, asked for layer {layer}"
            ))
        })?;
        if !params.differentiable {
            candle_core::bail!("the capture cache needs the differentiable forward (Decoder::forward_differentiable)");
        }
        let k_probe = Var::zeros(k.shape(), k.dtype(), k.device())?;
        let v_probe = Var::zeros(v.shape(), v.dtype(), v.device())?;
        // K and V stay attached to the graph: earlier layers' probes reach the loss through them.
        let k_probed = k.broadcast_add(k_probe.as_tensor())?;
        let v_probed = v.broadcast_add(v_probe.as_tensor())?;
        let out = attention(q, &k_probed, &v_probed, 0, params)?;
        *slot = Some(LayerProbe {
            k: k.detach(),
            v: v.detach(),
            k_probe,
            v_probe,
        });
        Ok(out)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn advance(&mut self, new_tokens: usize) {
        self.len += new_tokens;
    }

    fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}

/// Mean next-token cross-entropy of a sequence: position `i` predicts token `i + 1`.
pub fn next_token_loss(logits: &Tensor, tokens: &[u32]) -> CandleResult<Tensor> {
    let (t, _vocab) = logits.dims2()?;
    if t != tokens.len() || t < 2 {
        candle_core::bail!(
            "{t} logits rows for a sequence of {} tokens (need at least 2)",
            tokens.len()
        );
    }
    let targets = Tensor::from_slice(&tokens[1..], t - 1, logits.device())?;
    candle_nn::loss::cross_entropy(&logits.narrow(0, 0, t - 1)?, &targets)
}

/// Wall-clock seconds of the capture's phases.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CaptureTimings {
    pub forward_s: f64,
    pub backward_s: f64,
}

/// Captured K/V and squared gradients: per layer and kind, per sequence, the
/// `[kv_heads, T, head_dim]` row-major data.
pub struct Capture {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub tokens: usize,
    pub sequences: usize,
    /// `data[layer][kind][sequence]`, kind 0 = K, 1 = V.
    data: Vec<[Vec<Vec<f32>>; 2]>,
    /// Squared gradients, same layout.
    importance: Vec<[Vec<Vec<f32>>; 2]>,
    /// Mean next-token loss over the sequences.
    pub mean_loss: f64,
    pub timings: CaptureTimings,
}

impl Capture {
    /// One [`UnitTiles`] per (layer, head, K/V), ordered by layer, head, K before V, with
    /// per-element importance (squared gradients) when `with_importance`.
    pub fn into_units(self, with_importance: bool) -> Vec<UnitTiles> {
        let shape = TileShape {
            tokens: self.tokens,
            head_dim: self.head_dim,
        };
        let per_head = shape.len();
        let split = |seqs: &[Vec<f32>], head: usize| -> Vec<Vec<f32>> {
            seqs.iter()
                .map(|s| s[head * per_head..(head + 1) * per_head].to_vec())
                .collect()
        };
        let mut units = Vec::with_capacity(self.num_layers * self.kv_heads * 2);
        for (layer, (data, imp)) in self.data.iter().zip(&self.importance).enumerate() {
            for head in 0..self.kv_heads {
                for (ki, kind) in [Kind::K, Kind::V].into_iter().enumerate() {
                    units.push(UnitTiles {
                        layer,
                        head,
                        kind,
                        shape,
                        tiles: split(&data[ki], head),
                        importance: with_importance
                            .then(|| UnitImportance::PerElement(split(&imp[ki], head))),
                    });
                }
            }
        }
        units
    }

    /// Per-unit importance `Σ_elements grad² / sequences`, indexed `[layer][head][kind]`.
    pub fn unit_importance(&self) -> Vec<Vec<[f64; 2]>> {
        let per_head = self.tokens * self.head_dim;
        self.importance
            .iter()
            .map(|imp| {
                (0..self.kv_heads)
                    .map(|h| {
                        let sum = |k: usize| {
                            imp[k]
                                .iter()
                                .map(|s| {
                                    s[h * per_head..(h + 1) * per_head]
                                        .iter()
                                        .map(|&x| x as f64)
                                        .sum::<f64>()
                                })
                                .sum::<f64>()
                                / self.sequences as f64
                        };
                        [sum(0), sum(1)]
                    })
                    .collect()
            })
            .collect()
    }
}

fn flat(t: &Tensor) -> CandleResult<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// Runs every sequence through the differentiable decoder, capturing K/V and the squared
/// gradients of the sequence's mean next-token loss with respect to them.
/// `progress(done, total)` is called after each sequence.
pub fn capture(
    decoder: &Decoder,
    sequences: &[Vec<u32>],
    progress: &mut dyn FnMut(usize, usize),
) -> CandleResult<Capture> {
    let c = decoder.config();
    let tokens = sequences.first().map_or(0, Vec::len);
    if sequences.is_empty() || sequences.iter().any(|s| s.len() != tokens) {
        candle_core::bail!("calibration needs at least one sequence, all of the same length");
    }
    let empty = || -> [Vec<Vec<f32>>; 2] {
        [
            Vec::with_capacity(sequences.len()),
            Vec::with_capacity(sequences.len()),
        ]
    };
    let mut data: Vec<_> = (0..c.num_layers).map(|_| empty()).collect();
    let mut importance: Vec<_> = (0..c.num_layers).map(|_| empty()).collect();
    let mut timings = CaptureTimings::default();
    let mut loss_sum = 0f64;
    let mut cache = CaptureCache::new(c.num_layers);
    for (i, seq) in sequences.iter().enumerate() {
        cache.reset();
        let t0 = Instant::now();
        let logits = decoder.forward_differentiable(seq, &mut cache)?;
        let loss = next_token_loss(&logits, seq)?;
        timings.forward_s += t0.elapsed().as_secs_f64();

        let t0 = Instant::now();
        let grads = loss.backward()?;
        drop(logits);
        loss_sum += loss.to_scalar::<f32>()? as f64;
        for layer in 0..c.num_layers {
            let ((k, k_probe), (v, v_probe)) = match (cache.keys(layer), cache.values(layer)) {
                (Some(k), Some(v)) => (k, v),
                _ => candle_core::bail!("the decoder did not attend layer {layer}"),
            };
            for (kind, (x, probe)) in [(k, k_probe), (v, v_probe)].into_iter().enumerate() {
                // A probe the loss does not reach (impossible in a causal decoder, but cheap to
                // handle) has zero gradient.
                let sq = match grads.get(probe.as_tensor()) {
                    Some(g) => flat(&g.sqr()?)?,
                    None => vec![0.0; x.elem_count()],
                };
                importance[layer][kind].push(sq);
                data[layer][kind].push(flat(x)?);
            }
        }
        timings.backward_s += t0.elapsed().as_secs_f64();
        progress(i + 1, sequences.len());
    }
    Ok(Capture {
        num_layers: c.num_layers,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        tokens,
        sequences: sequences.len(),
        data,
        importance,
        mean_loss: loss_sum / sequences.len() as f64,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, RopeLayout};
    use crate::kv_fp::FpCache;
    use crate::synthetic::{random_weights, tiny_config, SplitMix64};

    /// Full-precision attention with one element of one layer's K or V shifted by `delta`.
    struct Perturbed {
        inner: FpCache,
        layer: usize,
        kind: Kind,
        /// Flat index into `[kv_heads, T, head_dim]`.
        index: usize,
        delta: f32,
    }

    impl KvCache for Perturbed {
        fn attend(
            &mut self,
            layer: usize,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            params: &AttnParams,
        ) -> CandleResult<Tensor> {
            if layer != self.layer {
                return self.inner.attend(layer, q, k, v, params);
            }
            let target = if self.kind == Kind::K { k } else { v };
            let mut bump = vec![0f32; target.elem_count()];
            bump[self.index] = self.delta;
            let shifted = (target + Tensor::from_vec(bump, target.shape(), target.device())?)?;
            match self.kind {
                Kind::K => self.inner.attend(layer, q, &shifted, v, params),
                Kind::V => self.inner.attend(layer, q, k, &shifted, params),
            }
        }
        fn len(&self) -> usize {
            self.inner.len()
        }
        fn advance(&mut self, n: usize) {
            self.inner.advance(n)
        }
        fn reset(&mut self) {
            self.inner.reset()
        }
    }

    /// Mean next-token loss in f64 from the logits of a perturbed forward.
    fn loss_with(
        decoder: &Decoder,
        tokens: &[u32],
        layer: usize,
        kind: Kind,
        index: usize,
        delta: f32,
    ) -> f64 {
        let mut cache = Perturbed {
            inner: FpCache::new(decoder.config().num_layers),
            layer,
            kind,
            index,
            delta,
        };
        let logits = decoder
            .forward(tokens, &mut cache)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        next_token_loss(&logits, tokens)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn tiny(arch: Arch) -> (Decoder, Vec<u32>) {
        let config = tiny_config(arch, RopeLayout::Halves);
        let weights = random_weights(&config, 7).unwrap();
        let decoder = Decoder::new(&config, &weights).unwrap();
        let mut rng = SplitMix64::new(3);
        let tokens: Vec<u32> = (0..12)
            .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
            .collect();
        (decoder, tokens)
    }

    #[test]
    fn fisher_importance_matches_central_finite_differences() {
        for arch in [Arch::Llama, Arch::Gemma3] {
            let (decoder, tokens) = tiny(arch);
            let cap = capture(&decoder, std::slice::from_ref(&tokens), &mut |_, _| {}).unwrap();
            let c = decoder.config().clone();
            let mut checked = 0;
            for layer in 0..c.num_layers {
                for (ki, kind) in [Kind::K, Kind::V].into_iter().enumerate() {
                    let imp = &cap.importance[layer][ki][0];
                    // The element with the largest gradient, and one in the middle of the order
                    // (a small but non-zero gradient).
                    let mut order: Vec<usize> = (0..imp.len()).collect();
                    order.sort_by(|&a, &b| imp[b].total_cmp(&imp[a]));
                    for &index in [order[0], order[order.len() / 4]].iter() {
                        let h = 1e-2f32;
                        let plus = loss_with(&decoder, &tokens, layer, kind, index, h);
                        let minus = loss_with(&decoder, &tokens, layer, kind, index, -h);
                        let fd = (plus - minus) / (2.0 * h as f64);
                        let grad = (imp[index] as f64).sqrt();
                        let tol = 0.03 * fd.abs() + 2e-5;
                        assert!(
                            (fd.abs() - grad).abs() <= tol,
                            "{arch:?} layer {layer} {kind:?} element {index}: |finite difference| {} vs |gradient| {grad}",
                            fd.abs()
                        );
                        checked += 1;
                    }
                    // The capture holds the unperturbed K/V: the fp cache sees the same values.
                    assert_eq!(
                        cap.data[layer][ki][0].len(),
                        c.num_kv_heads * tokens.len() * c.head_dim
                    );
                }
            }
            assert_eq!(checked, 4 * c.num_layers);
        }
    }

    #[test]
    fn captured_keys_equal_the_full_precision_cache_and_logits_match() {
        let (decoder, tokens) = tiny(Arch::Qwen2);
        let c = decoder.config().clone();
        let mut fp = FpCache::new(c.num_layers);
        let fast = decoder.forward(&tokens, &mut fp).unwrap();
        let mut cc = CaptureCache::new(c.num_layers);
        let slow = decoder.forward_differentiable(&tokens, &mut cc).unwrap();
        let (a, b) = (flat(&fast).unwrap(), flat(&slow).unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{x} vs {y}");
        }
        for layer in 0..c.num_layers {
            let k_fp = flat(fp.keys(layer).unwrap()).unwrap();
            let k_cap = flat(cc.keys(layer).unwrap().0).unwrap();
            for (x, y) in k_fp.iter().zip(&k_cap) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0));
            }
        }
        let cap = capture(
            &decoder,
            &[tokens.clone(), tokens.iter().rev().copied().collect()],
            &mut |_, _| {},
        )
        .unwrap();
        assert!(cap.mean_loss.is_finite() && cap.mean_loss > 0.0);
        let units = cap.into_units(true);
        assert_eq!(units.len(), c.num_layers * c.num_kv_heads * 2);
        assert_eq!(
            (units[1].layer, units[1].head, units[1].kind),
            (0, 0, Kind::V)
        );
        assert_eq!(units[2].head, 1);
        for u in &units {
            u.validate().unwrap();
            assert_eq!(u.tiles.len(), 2);
        }
    }

    #[test]
    fn too_short_text_and_memory_are_refused_with_numbers() {
        let tokens: Vec<u32> = (0..100).collect();
        let err = calibration_sequences(&tokens, 32, 4, Some(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("100 tokens")
                && err.contains("3 sequence(s)")
                && err.contains("4 requested"),
            "{err}"
        );
        let seqs = calibration_sequences(&tokens, 32, 3, Some(1)).unwrap();
        assert_eq!(seqs.len(), 3);
        assert_eq!(seqs[1][0], 1);
        assert_eq!(seqs[1][1], 33);

        let config = crate::synthetic::smollm2_shapes();
        let est = estimate_memory(&config, 16, 512);
        // 30 layers × 3 heads × 64 dims × 512 tokens × 16 sequences × 4 tensors × 4 bytes.
        assert_eq!(est.captured, 30 * 3 * 64 * 512 * 16 * 16);
        assert!(check_memory(&est, Some(64 << 30)).is_ok());
        let err = check_memory(&est, Some(1 << 30)).unwrap_err().to_string();
        assert!(err.contains("GiB") && err.contains("captured K/V"), "{err}");
    }
}

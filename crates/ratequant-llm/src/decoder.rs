//! One decoder-only transformer configured by [`ModelConfig`]: Llama/SmolLM2, Qwen2 (QKV
//! bias), Qwen3 (q/k norm), Mistral and Gemma 3 (q/k norm, post-norms, scaled embeddings,
//! tanh-GELU, sliding-window layers with their own RoPE base, final logit soft-capping).
//!
//! The KV cache is an argument of every forward call, never a field: the same weights run over
//! a full-precision, simulated-quantization or packed cache.
//!
//! Two modes share every line but three ops: [`Decoder::forward`] uses candle's fused RMSNorm,
//! RoPE and a fused masked softmax (no backward, fastest); [`Decoder::forward_differentiable`]
//! uses only ops with a backward pass so that a cache can add a zero `Var` to K and V and read
//! dL/dK, dL/dV (calibration). Weights are plain tensors, so they never join the backward graph.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::config::{Activation, ModelConfig};
use crate::kv::{AttnParams, KvCache};
use crate::model::Weights;
use crate::rope::RopeAngles;

/// Which ops a forward pass may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Candle's fused kernels, no gradient support.
    Fast,
    /// Only ops with a backward pass.
    Differentiable,
}

/// A linear layer `y = x·Wᵀ + b`, with `Wᵀ` stored contiguous `[in, out]` so the matmul reads
/// both operands row-major.
#[derive(Debug, Clone)]
struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Frozen weight: a backward pass (calibration) computes the input gradient only.
        let y = crate::frozen::matmul(x, &self.weight_t)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn out_features(&self) -> usize {
        self.weight_t.dims()[1]
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Normalises over the last dimension.
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Fast => candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32),
            Mode::Differentiable => {
                let dim = x.dim(D::Minus1)? as f64;
                let mean_sq = (x.sqr()?.sum_keepdim(D::Minus1)? / dim)?;
                x.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?
                    .broadcast_mul(&self.weight)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: RmsNorm,
    /// Q, K and V projections fused into one matmul: output columns `[q | k | v]`.
    qkv: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    attn_output: Linear,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    /// Gate and up projections fused: output columns `[gate | up]`.
    gate_up: Linear,
    down: Linear,
    post_ffw_norm: Option<RmsNorm>,
    attn: AttnParams,
    rope_base: f64,
}

/// The decoder: embeddings, layers, final norm and output projection.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    /// Output projection transposed, `[hidden, vocab]`.
    lm_head_t: Tensor,
    device: Device,
}

impl Decoder {
    /// Builds the decoder from canonical weights (see [`Weights`]), checking every shape
    /// against the configuration. Weights are converted to f32.
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        check_config(config)?;
        let c = config;
        let embed = weight(weights, "token_embd.weight", &[c.vocab_size, c.hidden_size])?;
        let device = embed.device().clone();
        let lm_head = if weights.contains("output.weight") {
            weight(weights, "output.weight", &[c.vocab_size, c.hidden_size])?
        } else if c.tie_embeddings {
            embed.clone()
        } else {
            candle_core::bail!(
                "weight `output.weight` is missing and the config does not tie embeddings"
            );
        };
        let norm = |name: &str, dim: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: weight(weights, name, &[dim])?,
                eps: c.rms_norm_eps,
            })
        };
        let default_scale = 1.0 / (c.head_dim as f64).sqrt();
        let scale = c
            .query_pre_attn_scalar
            .map_or(default_scale, |s| 1.0 / s.sqrt());
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = |name: &str| format!("blk.{l}.{name}");
            let proj = |name: &str, out: usize| {
                weight(
                    weights,
                    &p(&format!("{name}.weight")),
                    &[out, c.hidden_size],
                )
            };
            let qkv_t = Tensor::cat(
                &[
                    proj("attn_q", q_dim)?.t()?,
                    proj("attn_k", kv_dim)?.t()?,
                    proj("attn_v", kv_dim)?.t()?,
                ],
                1,
            )?;
            let qkv_bias = if c.qkv_bias {
                let bias =
                    |name: &str, out: usize| weight(weights, &p(&format!("{name}.bias")), &[out]);
                Some(Tensor::cat(
                    &[
                        bias("attn_q", q_dim)?,
                        bias("attn_k", kv_dim)?,
                        bias("attn_v", kv_dim)?,
                    ],
                    0,
                )?)
            } else {
                None
            };
            let gate = weight(
                weights,
                &p("ffn_gate.weight"),
                &[c.intermediate_size, c.hidden_size],
            )?;
            let up = weight(
                weights,
                &p("ffn_up.weight"),
                &[c.intermediate_size, c.hidden_size],
            )?;
            let down = weight(
                weights,
                &p("ffn_down.weight"),
                &[c.hidden_size, c.intermediate_size],
            )?;
            let attn_output = weight(weights, &p("attn_output.weight"), &[c.hidden_size, q_dim])?;
            let sliding = c.is_sliding(l);
            layers.push(Layer {
                attn_norm: norm(&p("attn_norm.weight"), c.hidden_size)?,
                qkv: Linear {
                    weight_t: qkv_t.contiguous()?,
                    bias: qkv_bias,
                },
                q_norm: c
                    .qk_norm
                    .then(|| norm(&p("attn_q_norm.weight"), c.head_dim))
                    .transpose()?,
                k_norm: c
                    .qk_norm
                    .then(|| norm(&p("attn_k_norm.weight"), c.head_dim))
                    .transpose()?,
                attn_output: Linear {
                    weight_t: attn_output.t()?.contiguous()?,
                    bias: None,
                },
                post_attn_norm: c
                    .post_norms
                    .then(|| norm(&p("post_attention_norm.weight"), c.hidden_size))
                    .transpose()?,
                ffn_norm: norm(&p("ffn_norm.weight"), c.hidden_size)?,
                gate_up: Linear {
                    weight_t: Tensor::cat(&[gate.t()?, up.t()?], 1)?.contiguous()?,
                    bias: None,
                },
                down: Linear {
                    weight_t: down.t()?.contiguous()?,
                    bias: None,
                },
                post_ffw_norm: c
                    .post_norms
                    .then(|| norm(&p("post_ffw_norm.weight"), c.hidden_size))
                    .transpose()?,
                attn: AttnParams {
                    scale,
                    sliding_window: if sliding { c.sliding_window } else { None },
                    differentiable: false,
                },
                rope_base: match (sliding, c.rope_local_theta) {
                    (true, Some(local)) => local,
                    _ => c.rope_theta,
                },
            });
        }
        Ok(Decoder {
            config: config.clone(),
            final_norm: norm("output_norm.weight", c.hidden_size)?,
            lm_head_t: lm_head.t()?.contiguous()?,
            embed,
            layers,
            device,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[T, vocab]` for `tokens` appended after what `cache` holds (fast path).
    pub fn forward(&self, tokens: &[u32], cache: &mut dyn KvCache) -> Result<Tensor> {
        self.forward_with(tokens, cache, Mode::Fast)
    }

    /// Logits `[T, vocab]` computed with differentiable ops only: gradients flow from the
    /// logits to whatever tracked tensors the cache mixes into K and V.
    pub fn forward_differentiable(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
    ) -> Result<Tensor> {
        self.forward_with(tokens, cache, Mode::Differentiable)
    }

    /// Logits `[T, vocab]` in the given mode.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        cache: &mut dyn KvCache,
        mode: Mode,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(tokens, cache, mode)?;
        self.logits(&hidden, mode)
    }

    /// Logits `[vocab]` of the last token only (generation: skips the output projection of
    /// the others).
    pub fn forward_last(&self, tokens: &[u32], cache: &mut dyn KvCache) -> Result<Tensor> {
        let hidden = self.hidden_states(tokens, cache, Mode::Fast)?;
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        self.logits(&last, Mode::Fast)?.squeeze(0)
    }

    /// Runs every layer; returns the final hidden states `[T, hidden]` before the final norm,
    /// and advances `cache` by `tokens.len()`.
    fn hidden_states(&self, tokens: &[u32], cache: &mut dyn KvCache, mode: Mode) -> Result<Tensor> {
        let c = &self.config;
        if tokens.is_empty() {
            candle_core::bail!("forward needs at least one token");
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {} tokens",
                c.vocab_size
            );
        }
        let start = cache.len();
        let t = tokens.len();
        if start + t > c.max_position {
            candle_core::bail!(
                "positions {start}..{} exceed the model's maximum context of {} tokens",
                start + t,
                c.max_position
            );
        }
        let ids = Tensor::from_slice(tokens, t, &self.device)?;
        let mut x = self.embed.embedding(&ids)?;
        if c.scale_embeddings {
            x = (x * (c.hidden_size as f64).sqrt())?;
        }
        // One angle table per distinct RoPE base (Gemma 3: local and global layers).
        let mut angles: Vec<(f64, RopeAngles)> = Vec::new();
        for layer in &self.layers {
            if !angles.iter().any(|(b, _)| *b == layer.rope_base) {
                let a = RopeAngles::new(
                    layer.rope_base,
                    c.head_dim,
                    c.rope_layout,
                    start,
                    t,
                    &self.device,
                )?;
                angles.push((layer.rope_base, a));
            }
        }
        for (index, layer) in self.layers.iter().enumerate() {
            let rope = &angles
                .iter()
                .find(|(b, _)| *b == layer.rope_base)
                .expect("angles built above")
                .1;
            x = self.layer_forward(index, layer, &x, rope, cache, mode)?;
        }
        cache.advance(t);
        Ok(x)
    }

    fn layer_forward(
        &self,
        index: usize,
        layer: &Layer,
        x: &Tensor,
        rope: &RopeAngles,
        cache: &mut dyn KvCache,
        mode: Mode,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = x.dim(0)?;
        let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);

        // Attention block.
        let h = layer.attn_norm.forward(x, mode)?;
        // [T, (H + 2·KV)·d] → [H + 2·KV, T, d] in one copy; q, k, v are contiguous views.
        let qkv = layer
            .qkv
            .forward(&h)?
            .reshape((t, heads + 2 * kv_heads, hd))?
            .transpose(0, 1)?
            .contiguous()?;
        let mut q = qkv.narrow(0, 0, heads)?;
        let mut k = qkv.narrow(0, heads, kv_heads)?;
        let v = qkv.narrow(0, heads + kv_heads, kv_heads)?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = qn.forward(&q, mode)?;
            k = kn.forward(&k, mode)?;
        }
        let (q, k) = match mode {
            Mode::Fast => (rope.apply(&q)?, rope.apply(&k)?),
            Mode::Differentiable => (
                rope.apply_differentiable(&q)?,
                rope.apply_differentiable(&k)?,
            ),
        };
        let params = AttnParams {
            differentiable: mode == Mode::Differentiable,
            ..layer.attn
        };
        let attn = cache.attend(index, &q, &k, &v, &params)?;
        let attn = attn.transpose(0, 1)?.reshape((t, heads * hd))?;
        let mut o = layer.attn_output.forward(&attn)?;
        if let Some(n) = &layer.post_attn_norm {
            o = n.forward(&o, mode)?;
        }
        let x = (x + o)?;

        // Feed-forward block.
        let h = layer.ffn_norm.forward(&x, mode)?;
        let gate_up = layer.gate_up.forward(&h)?;
        let ffn = layer.gate_up.out_features() / 2;
        let gate = gate_up.narrow(1, 0, ffn)?;
        let up = gate_up.narrow(1, ffn, ffn)?;
        let act = match c.activation {
            Activation::Silu => gate.silu()?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let mut d = layer.down.forward(&(act * up)?)?;
        if let Some(n) = &layer.post_ffw_norm {
            d = n.forward(&d, mode)?;
        }
        x + d
    }

    /// Final norm, output projection and optional soft-capping: `[T, hidden]` → `[T, vocab]`.
    fn logits(&self, hidden: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.final_norm.forward(hidden, mode)?;
        let logits = crate::frozen::matmul(&h, &self.lm_head_t)?;
        match self.config.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }
}

/// Rejects configurations the decoder cannot run.
fn check_config(c: &ModelConfig) -> Result<()> {
    let fail = |msg: String| -> Result<()> { candle_core::bail!("model config: {msg}") };
    if c.num_layers == 0 || c.hidden_size == 0 || c.vocab_size == 0 || c.intermediate_size == 0 {
        return fail(format!(
            "layers ({}), hidden size ({}), vocabulary ({}) and intermediate size ({}) must be positive",
            c.num_layers, c.hidden_size, c.vocab_size, c.intermediate_size
        ));
    }
    if c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return fail(format!(
            "{} query heads are not a multiple of {} KV heads",
            c.num_heads, c.num_kv_heads
        ));
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
        return fail(format!(
            "head_dim {} must be even and positive (RoPE rotates pairs)",
            c.head_dim
        ));
    }
    if c.sliding_window == Some(0) {
        return fail("sliding_window 0 would hide every key".into());
    }
    if !(c.rms_norm_eps >= 0.0 && c.rope_theta > 0.0) {
        return fail(format!(
            "rms_norm_eps {} / rope_theta {} out of range",
            c.rms_norm_eps, c.rope_theta
        ));
    }
    Ok(())
}

/// The weight `name` as f32 with exactly `shape`, or an error naming it.
fn weight(weights: &Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let w = weights.get(name)?;
    if w.dims() != shape {
        candle_core::bail!(
            "weight `{name}` has shape {:?}, the config expects {:?}",
            w.dims(),
            shape
        );
    }
    let w = if w.dtype() == DType::F32 {
        w.clone()
    } else {
        w.to_dtype(DType::F32)?
    };
    w.contiguous()
}

//! Synthetic models for tests and benchmarks: small configurations exercising each
//! architecture's features, and deterministic random weights of any configuration.

use candle_core::{Device, Result, Tensor};

use crate::config::{Activation, Arch, ModelConfig, RopeLayout};
use crate::model::Weights;

/// SplitMix64: a tiny deterministic generator, enough for synthetic weights.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in `[-a, a)`.
    pub fn uniform(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_signed() * a).collect()
    }
}

/// A small configuration with `arch`'s features: 2 layers (Gemma 3: 4, alternating local and
/// global), hidden 32, 4 query heads over 2 KV heads of 16 dims, vocabulary 61.
pub fn tiny_config(arch: Arch, rope_layout: RopeLayout) -> ModelConfig {
    let mut c = ModelConfig {
        arch,
        vocab_size: 61,
        hidden_size: 32,
        intermediate_size: 48,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_layout,
        max_position: 256,
        tie_embeddings: true,
        qkv_bias: false,
        qk_norm: false,
        sliding_window: None,
        sliding_window_pattern: None,
        rope_local_theta: None,
        query_pre_attn_scalar: None,
        scale_embeddings: false,
        norm_weight_offset: false,
        post_norms: false,
        final_logit_softcapping: None,
        activation: Activation::Silu,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        add_bos: true,
    };
    match arch {
        Arch::Llama => {}
        Arch::Mistral => {
            c.tie_embeddings = false;
            c.sliding_window = Some(5);
        }
        Arch::Qwen2 => {
            c.qkv_bias = true;
            c.rope_theta = 1_000_000.0;
            c.add_bos = false;
        }
        Arch::Qwen3 => {
            c.qk_norm = true;
            c.tie_embeddings = false;
        }
        Arch::Gemma3 => {
            c.num_layers = 4;
            c.qk_norm = true;
            c.post_norms = true;
            c.scale_embeddings = true;
            c.activation = Activation::GeluTanh;
            c.sliding_window = Some(4);
            c.sliding_window_pattern = Some(2);
            c.rope_theta = 1_000_000.0;
            c.rope_local_theta = Some(10_000.0);
            c.query_pre_attn_scalar = Some(24.0);
            c.final_logit_softcapping = Some(3.0);
        }
    }
    c
}

/// SmolLM2-135M's shapes (30 layers, hidden 576, 9 heads over 3 KV heads of 64 dims, MLP 1536,
/// vocabulary 49152, tied embeddings), for benchmarks on random weights.
pub fn smollm2_shapes() -> ModelConfig {
    ModelConfig {
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rope_theta: 100_000.0,
        max_position: 8192,
        add_bos: false,
        bos_token_id: Some(1),
        ..tiny_config(Arch::Llama, RopeLayout::Adjacent)
    }
}

/// Deterministic random weights for `config` under the canonical names of [`Weights`].
/// Linear weights are uniform with variance `1/in_features` (activations keep their scale
/// through the layers), norm weights near 1, biases and embeddings small.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<Weights> {
    let c = config;
    let mut rng = SplitMix64::new(seed);
    let mut weights = Weights::default();
    let dev = Device::Cpu;
    let mut put = |name: String, shape: &[usize], values: Vec<f32>| -> Result<()> {
        weights
            .tensors
            .insert(name, Tensor::from_vec(values, shape, &dev)?);
        Ok(())
    };
    let linear = |rng: &mut SplitMix64, out: usize, inp: usize| {
        rng.uniform(out * inp, (3.0 / inp as f32).sqrt())
    };
    let norm = |rng: &mut SplitMix64, n: usize| {
        rng.uniform(n, 0.2)
            .into_iter()
            .map(|x| 1.0 + x)
            .collect::<Vec<_>>()
    };

    put(
        "token_embd.weight".into(),
        &[c.vocab_size, c.hidden_size],
        rng.uniform(c.vocab_size * c.hidden_size, 1.0),
    )?;
    if !c.tie_embeddings {
        put(
            "output.weight".into(),
            &[c.vocab_size, c.hidden_size],
            linear(&mut rng, c.vocab_size, c.hidden_size),
        )?;
    }
    put(
        "output_norm.weight".into(),
        &[c.hidden_size],
        norm(&mut rng, c.hidden_size),
    )?;
    let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    for l in 0..c.num_layers {
        let p = |n: &str| format!("blk.{l}.{n}");
        put(
            p("attn_norm.weight"),
            &[c.hidden_size],
            norm(&mut rng, c.hidden_size),
        )?;
        put(
            p("attn_q.weight"),
            &[q_dim, c.hidden_size],
            linear(&mut rng, q_dim, c.hidden_size),
        )?;
        put(
            p("attn_k.weight"),
            &[kv_dim, c.hidden_size],
            linear(&mut rng, kv_dim, c.hidden_size),
        )?;
        put(
            p("attn_v.weight"),
            &[kv_dim, c.hidden_size],
            linear(&mut rng, kv_dim, c.hidden_size),
        )?;
        if c.qkv_bias {
            put(p("attn_q.bias"), &[q_dim], rng.uniform(q_dim, 0.3))?;
            put(p("attn_k.bias"), &[kv_dim], rng.uniform(kv_dim, 0.3))?;
            put(p("attn_v.bias"), &[kv_dim], rng.uniform(kv_dim, 0.3))?;
        }
        if c.qk_norm {
            put(
                p("attn_q_norm.weight"),
                &[c.head_dim],
                norm(&mut rng, c.head_dim),
            )?;
            put(
                p("attn_k_norm.weight"),
                &[c.head_dim],
                norm(&mut rng, c.head_dim),
            )?;
        }
        put(
            p("attn_output.weight"),
            &[c.hidden_size, q_dim],
            linear(&mut rng, c.hidden_size, q_dim),
        )?;
        put(
            p("ffn_norm.weight"),
            &[c.hidden_size],
            norm(&mut rng, c.hidden_size),
        )?;
        put(
            p("ffn_gate.weight"),
            &[c.intermediate_size, c.hidden_size],
            linear(&mut rng, c.intermediate_size, c.hidden_size),
        )?;
        put(
            p("ffn_up.weight"),
            &[c.intermediate_size, c.hidden_size],
            linear(&mut rng, c.intermediate_size, c.hidden_size),
        )?;
        put(
            p("ffn_down.weight"),
            &[c.hidden_size, c.intermediate_size],
            linear(&mut rng, c.hidden_size, c.intermediate_size),
        )?;
        if c.post_norms {
            put(
                p("post_attention_norm.weight"),
                &[c.hidden_size],
                norm(&mut rng, c.hidden_size),
            )?;
            put(
                p("post_ffw_norm.weight"),
                &[c.hidden_size],
                norm(&mut rng, c.hidden_size),
            )?;
        }
    }
    Ok(weights)
}

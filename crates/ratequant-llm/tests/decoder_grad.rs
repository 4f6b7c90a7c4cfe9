//! Gradients through the differentiable path: a cache that adds a zero `Var` to every layer's
//! K and V (what calibration does) receives dL/dK and dL/dV, and they match central finite
//! differences.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
use ratequant_llm::{Arch, AttnParams, Decoder, FpCache, KvCache, ModelConfig, RopeLayout};

/// Full-precision cache that adds a per-layer offset (`Var`) to the keys and values it is given.
struct OffsetCache {
    inner: FpCache,
    k_offsets: Vec<Var>,
    v_offsets: Vec<Var>,
}

impl OffsetCache {
    fn new(config: &ModelConfig, tokens: usize) -> Self {
        let shape = (config.num_kv_heads, tokens, config.head_dim);
        let zeros = || Var::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        OffsetCache {
            inner: FpCache::new(config.num_layers),
            k_offsets: (0..config.num_layers).map(|_| zeros()).collect(),
            v_offsets: (0..config.num_layers).map(|_| zeros()).collect(),
        }
    }
}

impl KvCache for OffsetCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor> {
        let k = (k + self.k_offsets[layer].as_tensor())?;
        let v = (v + self.v_offsets[layer].as_tensor())?;
        self.inner.attend(layer, q, &k, &v, params)
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

/// Summed next-token cross-entropy of `logits` `[T, vocab]` for `tokens`.
fn loss(logits: &Tensor, tokens: &[u32]) -> Result<Tensor> {
    let t = tokens.len();
    let log_probs = candle_nn::ops::log_softmax(&logits.narrow(0, 0, t - 1)?, D::Minus1)?;
    let targets = Tensor::from_slice(&tokens[1..], (t - 1, 1), &Device::Cpu)?;
    log_probs.gather(&targets, 1)?.sum_all()?.neg()
}

fn loss_with_offset(decoder: &Decoder, cache: &mut OffsetCache, tokens: &[u32]) -> f64 {
    cache.reset();
    let logits = decoder.forward(tokens, cache).unwrap();
    loss(&logits, tokens).unwrap().to_scalar::<f32>().unwrap() as f64
}

fn check_gradients(config: &ModelConfig) {
    let weights = random_weights(config, 5).unwrap();
    let decoder = Decoder::new(config, &weights).unwrap();
    let mut rng = SplitMix64::new(17);
    let tokens: Vec<u32> = (0..10)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();
    let mut cache = OffsetCache::new(config, tokens.len());
    let logits = decoder.forward_differentiable(&tokens, &mut cache).unwrap();
    let grads = loss(&logits, &tokens).unwrap().backward().unwrap();

    let (kvh, d) = (config.num_kv_heads, config.head_dim);
    for layer in 0..config.num_layers {
        // Clones share storage with the cache's variables (`Var::set` writes in place).
        let (k_offsets, v_offsets) = (cache.k_offsets.clone(), cache.v_offsets.clone());
        for (is_k, offsets) in [(true, &k_offsets), (false, &v_offsets)] {
            let g = grads
                .get(offsets[layer].as_tensor())
                .expect("gradient reaches the K/V offset");
            assert_eq!(g.dims(), &[kvh, tokens.len(), d]);
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                norm > 1e-6,
                "layer {layer} {}: zero gradient",
                if is_k { "K" } else { "V" }
            );
            // An early token, whose K/V most later queries read; the finite difference runs
            // through the fast path, so this also ties the two paths together.
            let (head, token, dim) = (kvh - 1, 2, d / 2 + 1);
            let index = (head * tokens.len() + token) * d + dim;
            let eps = 1e-2f32;
            let mut bump = |delta: f32| {
                let mut values = vec![0f32; kvh * tokens.len() * d];
                values[index] = delta;
                let t = Tensor::from_vec(values, (kvh, tokens.len(), d), &Device::Cpu).unwrap();
                offsets[layer].set(&t).unwrap();
                let l = loss_with_offset(&decoder, &mut cache, &tokens);
                offsets[layer].set(&t.zeros_like().unwrap()).unwrap();
                l
            };
            let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps as f64);
            let analytic = g[index] as f64;
            let tol = 2e-3 + 2e-2 * analytic.abs();
            assert!(
                (numeric - analytic).abs() < tol,
                "{:?} layer {layer} {}: analytic {analytic} vs finite difference {numeric}",
                config.arch,
                if is_k { "K" } else { "V" }
            );
        }
    }
}

#[test]
fn kv_gradients_match_finite_differences() {
    check_gradients(&tiny_config(Arch::Llama, RopeLayout::Adjacent));
    check_gradients(&tiny_config(Arch::Qwen3, RopeLayout::Halves));
    check_gradients(&tiny_config(Arch::Gemma3, RopeLayout::Halves));
}

#[test]
fn weights_stay_out_of_the_backward_graph() {
    // Only the offsets are variables: the gradient store holds nothing for the weights.
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 5).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let tokens: Vec<u32> = (0..6).collect();
    let mut cache = OffsetCache::new(&config, tokens.len());
    let logits = decoder.forward_differentiable(&tokens, &mut cache).unwrap();
    let grads = loss(&logits, &tokens).unwrap().backward().unwrap();
    for (name, w) in &weights.tensors {
        assert!(grads.get(w).is_none(), "weight {name} received a gradient");
    }
    // And without any variable nothing is tracked at all.
    let logits = decoder
        .forward_differentiable(&tokens, &mut FpCache::new(config.num_layers))
        .unwrap();
    assert!(!logits.track_op());
}

//! The packed cache through the decoder: where both define the same quantization (per-token
//! designs, same residual window), `eval`'s default simulation (tile semantics) of the K/V
//! the packed cache stores (rounded to f16) gives the same attention outputs at every layer
//! and step of a decoder run, for one prefill call and for token-by-token decoding; and clear
//! errors on mismatched plans.
//!
//! The comparison replays the packed cache's own inputs (`replay_support`): two decoders
//! running freely would round their slightly different K/V to f16 differently now and then,
//! and low-bit codes amplify that (see `kv_agreement.rs`).

mod replay_support;

use std::sync::Arc;

use ratequant::kvcache::UnitFormat;
use ratequant::quant::{self, Kind, Quantizer, QuantizerSpec};
use ratequant_llm::kv_packed::PackedCache;
use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
use ratequant_llm::{
    Arch, Decoder, FpCache, KvCache, KvQuantPlan, RopeLayout, SimQuantCache, UnitQuant,
};
use replay_support::{replay_difference, F16Inputs, Recording};

fn design(name: &str) -> Arc<dyn Quantizer> {
    Arc::from(quant::build(&QuantizerSpec::parse(name).unwrap()).unwrap())
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(9);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

fn logits(decoder: &Decoder, toks: &[u32], cache: &mut dyn KvCache) -> Vec<f32> {
    decoder
        .forward(toks, cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Logits of every position, feeding one token per forward call.
fn logits_stepwise(decoder: &Decoder, toks: &[u32], cache: &mut dyn KvCache) -> Vec<f32> {
    let mut all = Vec::new();
    for t in toks {
        all.extend(logits(decoder, &[*t], cache));
    }
    all
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn packed_logits_equal_simulated_logits_for_per_token_designs() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 5).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let (layers, kv_heads, head_dim) = (config.num_layers, config.num_kv_heads, config.head_dim);
    let toks = tokens(37, config.vocab_size);
    for name in ["rtn-token", "quarot", "rtn-token:g=8"] {
        if name == "quarot" && !head_dim.is_power_of_two() {
            continue;
        }
        for residual in [0, 5] {
            // Mixed bits across units.
            let mut plan = KvQuantPlan::full_precision(layers, kv_heads);
            let mut units = Vec::new();
            for layer in 0..layers {
                for head in 0..kv_heads {
                    for kind in [Kind::K, Kind::V] {
                        let bits = 2 + ((layer + 2 * head + kind as usize) % 3) as u8;
                        plan.set(
                            layer,
                            head,
                            kind,
                            Some(UnitQuant {
                                quantizer: design(name),
                                bits,
                            }),
                        )
                        .unwrap();
                        units.push(UnitFormat {
                            quantizer: QuantizerSpec::parse(name).unwrap(),
                            bits,
                        });
                    }
                }
            }
            let mut packed_cache = Recording::new(
                PackedCache::new(layers, kv_heads, head_dim, &units, residual).unwrap(),
            );
            let packed = logits(&decoder, &toks, &mut packed_cache);
            let diff = replay_difference(
                &packed_cache.calls,
                &mut F16Inputs(SimQuantCache::new(plan.clone(), residual)),
            );
            assert!(
                diff < 1e-5,
                "{name} residual {residual}: prefill |packed − sim| = {diff} (relative)"
            );

            let mut stepped_cache = Recording::new(
                PackedCache::new(layers, kv_heads, head_dim, &units, residual).unwrap(),
            );
            logits_stepwise(&decoder, &toks, &mut stepped_cache);
            let diff = replay_difference(
                &stepped_cache.calls,
                &mut F16Inputs(SimQuantCache::new(plan, residual)),
            );
            assert!(
                diff < 1e-5,
                "{name} residual {residual}: decode |packed − sim| = {diff} (relative)"
            );
            // Quantization is visible, so the agreement is not trivial.
            let fp = logits(&decoder, &toks, &mut FpCache::new(layers));
            let scale = 1.0 + fp.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let quant_effect = max_abs_diff(&fp, &packed);
            assert!(
                quant_effect > 0.01 * scale,
                "{name} residual {residual}: packed ≈ fp ({quant_effect})"
            );
            assert!(stepped_cache.inner.memory().compression() > 1.0);
        }
    }
}

#[test]
fn packed_cache_rejects_a_plan_for_another_model_and_gradients() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 5).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let units = vec![
        UnitFormat {
            quantizer: QuantizerSpec::parse("kivi").unwrap(),
            bits: 2
        };
        2
    ];
    let err = PackedCache::new(
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        &units,
        4,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("unit formats"), "{err}");
    let mut cache = PackedCache::uniform(
        &QuantizerSpec::parse("kivi").unwrap(),
        2,
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        4,
    )
    .unwrap();
    let err = decoder
        .forward_differentiable(&tokens(3, config.vocab_size), &mut cache)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("backward"), "{err}");
}

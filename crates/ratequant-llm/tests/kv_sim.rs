//! The simulated-quantization cache: which tile each unit quantizes, the residual window, and
//! its agreement with the full-precision cache where it must agree.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use ratequant::quant::{self, Kind, Quantizer, QuantizerSpec, TileShape};
use ratequant_llm::reference::{attention_head, HeadTiles};
use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
use ratequant_llm::{
    Arch, AttnParams, Decoder, FpCache, KvCache, KvQuantPlan, KvSpec, RopeLayout, SimQuantCache,
    UnitQuant,
};

fn design(name: &str) -> Arc<dyn Quantizer> {
    Arc::from(quant::build(&QuantizerSpec::parse(name).unwrap()).unwrap())
}

fn logits(decoder: &Decoder, tokens: &[u32], cache: &mut dyn KvCache) -> Vec<f32> {
    decoder
        .forward(tokens, cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(4);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

#[test]
fn full_precision_plan_equals_fp_cache() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        let config = tiny_config(arch, RopeLayout::Halves);
        let weights = random_weights(&config, 3).unwrap();
        let decoder = Decoder::new(&config, &weights).unwrap();
        let toks = tokens(20, config.vocab_size);
        let fp = logits(&decoder, &toks, &mut FpCache::new(config.num_layers));
        let plan = KvQuantPlan::full_precision(config.num_layers, config.num_kv_heads);
        // Without a window the same kernel runs on an unchanged copy: bit-identical.
        let sim = logits(&decoder, &toks, &mut SimQuantCache::new(plan.clone(), 0));
        assert!(fp == sim, "{arch:?} residual 0 differs from the fp cache");
        // With a window the mixing path sums two products: equal up to float rounding.
        let sim = logits(&decoder, &toks, &mut SimQuantCache::new(plan.clone(), 4));
        let d = max_abs_diff(&fp, &sim);
        assert!(d < 1e-4, "{arch:?} residual 4: max |Δlogit| {d}");
    }
}

#[test]
fn residual_covering_the_sequence_equals_fp_and_quantization_hurts_otherwise() {
    let config = tiny_config(Arch::Llama, RopeLayout::Adjacent);
    let weights = random_weights(&config, 3).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let toks = tokens(24, config.vocab_size);
    let fp = logits(&decoder, &toks, &mut FpCache::new(config.num_layers));
    let plan = KvQuantPlan::uniform(
        design("kivi:g=8"),
        2,
        config.num_layers,
        config.num_kv_heads,
    )
    .unwrap();
    for residual in [toks.len(), toks.len() + 10, usize::MAX] {
        let sim = logits(
            &decoder,
            &toks,
            &mut SimQuantCache::new(plan.clone(), residual),
        );
        assert!(fp == sim, "residual {residual} differs from the fp cache");
    }
    // A smaller window must change something, and more bits must get closer to fp
    // (mean |Δlogit|).
    let err = |bits: u8, residual: usize| {
        let plan = KvQuantPlan::uniform(
            design("kivi:g=8"),
            bits,
            config.num_layers,
            config.num_kv_heads,
        )
        .unwrap();
        let q = logits(&decoder, &toks, &mut SimQuantCache::new(plan, residual));
        fp.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f32>() / fp.len() as f32
    };
    let (e2, e2_res, e8) = (err(2, 0), err(2, 8), err(8, 0));
    assert!(e2 > 1e-3, "2-bit KIVI left the logits unchanged ({e2})");
    assert!(
        e8 < e2 / 4.0,
        "8 bits ({e8}) not much closer than 2 bits ({e2})"
    );
    assert!(
        e2_res > 0.0 && e2_res < e2,
        "residual 8 ({e2_res}) vs none ({e2})"
    );
}

/// Fake-quantizes the head tiles of `x` (`[kv_heads, S, d]` row-major) by `plan` like the
/// cache should: one tile per (head, kind), the whole stored length.
fn quantize_tiles(
    plan: &KvQuantPlan,
    layer: usize,
    kind: Kind,
    x: &[f32],
    kv_heads: usize,
    d: usize,
) -> Vec<f32> {
    let s = x.len() / (kv_heads * d);
    let mut out = x.to_vec();
    for j in 0..kv_heads {
        if let Some(u) = plan.unit(layer, j, kind) {
            let tile = &x[j * s * d..(j + 1) * s * d];
            u.quantizer
                .fake_quantize(
                    tile,
                    TileShape {
                        tokens: s,
                        head_dim: d,
                    },
                    kind,
                    u.bits,
                    &mut out[j * s * d..(j + 1) * s * d],
                )
                .unwrap();
        }
    }
    out
}

#[test]
fn cache_quantizes_the_stored_tile_per_unit_with_its_bits() {
    // A mixed plan: different designs and bits per unit, one unit left in full precision.
    let (layers, kv_heads, heads, d) = (2, 2, 4, 16);
    let mut plan = KvQuantPlan::full_precision(layers, kv_heads);
    plan.set(
        1,
        0,
        Kind::K,
        Some(UnitQuant {
            quantizer: design("kivi:g=4"),
            bits: 2,
        }),
    )
    .unwrap();
    plan.set(
        1,
        0,
        Kind::V,
        Some(UnitQuant {
            quantizer: design("rtn-token"),
            bits: 3,
        }),
    )
    .unwrap();
    plan.set(
        1,
        1,
        Kind::K,
        Some(UnitQuant {
            quantizer: design("quarot"),
            bits: 2,
        }),
    )
    .unwrap();
    // (1, 1, V) stays full precision.
    let layer = 1;
    let mut rng = SplitMix64::new(8);
    let mut cache = SimQuantCache::new(plan.clone(), 3);
    let (mut all_k, mut all_v): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
        (vec![vec![]; kv_heads], vec![vec![]; kv_heads]);
    // Two calls: a prefill of 6 tokens, then 3 more: the second call quantizes all 9 tokens.
    for (start, t) in [(0usize, 6usize), (6, 3)] {
        let q = rng.uniform(heads * t * d, 1.0);
        let k = rng.uniform(kv_heads * t * d, 1.0);
        let v = rng.uniform(kv_heads * t * d, 1.0);
        for j in 0..kv_heads {
            all_k[j].extend_from_slice(&k[j * t * d..(j + 1) * t * d]);
            all_v[j].extend_from_slice(&v[j * t * d..(j + 1) * t * d]);
        }
        let tensor =
            |x: &Vec<f32>, h: usize| Tensor::from_vec(x.clone(), (h, t, d), &Device::Cpu).unwrap();
        let params = AttnParams {
            scale: 0.25,
            sliding_window: None,
            differentiable: false,
        };
        // Layer 0 first (every layer is called each step), then the layer under test.
        cache
            .attend(
                0,
                &tensor(&q, heads),
                &tensor(&k, kv_heads),
                &tensor(&v, kv_heads),
                &params,
            )
            .unwrap();
        let got = cache
            .attend(
                layer,
                &tensor(&q, heads),
                &tensor(&k, kv_heads),
                &tensor(&v, kv_heads),
                &params,
            )
            .unwrap();
        cache.advance(t);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let k_fp: Vec<f32> = all_k.concat();
        let v_fp: Vec<f32> = all_v.concat();
        let k_q = quantize_tiles(&plan, layer, Kind::K, &k_fp, kv_heads, d);
        let v_q = quantize_tiles(&plan, layer, Kind::V, &v_fp, kv_heads, d);
        let s = start + t;
        let sd = s * d;
        let mut want = Vec::new();
        for h in 0..heads {
            let j = h / (heads / kv_heads);
            let tiles = HeadTiles {
                q: &q[h * t * d..(h + 1) * t * d],
                k_fp: &k_fp[j * sd..(j + 1) * sd],
                v_fp: &v_fp[j * sd..(j + 1) * sd],
                k_q: &k_q[j * sd..(j + 1) * sd],
                v_q: &v_q[j * sd..(j + 1) * sd],
            };
            want.extend(attention_head(&tiles, d, start, 0.25, None, 3));
        }
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "step starting at {start}: max diff {diff}");
        // The quantized units really are quantized: the tiles differ from full precision.
        assert_ne!(k_q, k_fp);
    }
}

#[test]
fn kv_spec_parsing() {
    assert_eq!(KvSpec::parse("fp").unwrap(), KvSpec::FullPrecision);
    let s = KvSpec::parse("kivi:2").unwrap();
    assert_eq!(
        s,
        KvSpec::Uniform {
            quantizer: QuantizerSpec::parse("kivi").unwrap(),
            bits: 2
        }
    );
    assert_eq!(s.to_string(), "kivi:2");
    let s = KvSpec::parse("kivi:g=64:3").unwrap();
    assert_eq!(
        s,
        KvSpec::Uniform {
            quantizer: QuantizerSpec::parse("kivi:g=64").unwrap(),
            bits: 3
        }
    );
    for bad in ["kivi", "kivi:0", "kivi:9", "nope:2", "kivi:x", ""] {
        assert!(KvSpec::parse(bad).is_err(), "`{bad}` should not parse");
    }
    // QuaRot needs a power-of-two head_dim.
    let err = KvSpec::parse("quarot:4")
        .unwrap()
        .plan(2, 2, 24)
        .unwrap_err()
        .to_string();
    assert!(err.contains("24") || err.contains("power"), "{err}");
}

#[test]
fn plan_units_outside_the_model_are_rejected() {
    let mut plan = KvQuantPlan::full_precision(2, 2);
    let unit = UnitQuant {
        quantizer: design("kivi"),
        bits: 2,
    };
    let err = plan
        .set(2, 0, Kind::K, Some(unit.clone()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 2"), "{err}");
    let err = plan.set(0, 5, Kind::V, Some(unit)).unwrap_err().to_string();
    assert!(err.contains("head 5"), "{err}");
}

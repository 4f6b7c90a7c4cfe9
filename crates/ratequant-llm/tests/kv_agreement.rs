//! Issue 5's agreement: for the same plan and residual window, the packed cache equals the
//! simulated cache under [`SimSemantics::Packed`] — for KIVI (keys grouped per channel over
//! tokens, groups left incomplete), QuaRot, RTN-token and mixed plans, residual 0 and > 0,
//! prefill in one block, in blocks, and token by token, with and without a sliding window.
//!
//! Both caches hold unquantized K/V in f16 (the packed semantics round every K/V value to f16
//! as it is stored). Levels:
//! * the caches alone, fed identical q/k/v: outputs equal to float rounding (`1e-5`), so every
//!   stored code and every full-precision/quantized boundary is the same;
//! * inside the decoder, with identical inputs: every attention call of a decoder run over
//!   the packed cache is replayed into the simulation (`replay_support`), outputs equal to
//!   `1e-5`, for real call patterns (prefill blocks, GQA, Gemma 3's sliding windows);
//! * the decoder running freely over each cache: the logits differ by more than rounding. The
//!   caches' ~1e-6 float differences reach the next layer's K/V, and next to an f16 rounding
//!   midpoint one becomes a whole f16 step (~5e-4 relative), which can shift a group's min/max
//!   and low-bit codes; that grows layer by layer (up to ~0.2 of the quantization effect on
//!   these tiny random models at 2 bits). Checked: it stays below half the quantization
//!   effect, and quantization is visible at all.
//!
//! The default tile semantics (K/V in f32) must *differ* for KIVI keys (otherwise the packed
//! mode would be untested) and, on inputs that are already f16 values, agree for per-token
//! designs.

mod replay_support;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ratequant::kvcache::UnitFormat;
use ratequant::quant::{self, Kind, Quantizer, QuantizerSpec};
use ratequant_llm::attention::attention_with_precision_masks;
use ratequant_llm::kv_packed::PackedCache;
use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
use ratequant_llm::{
    Arch, AttnParams, Decoder, FpCache, KvCache, KvQuantPlan, ModelConfig, RopeLayout,
    SimQuantCache, SimSemantics, UnitQuant,
};
use replay_support::{replay_difference, Recording};

/// Relative tolerance of "equal up to float rounding" for the caches fed identical inputs.
const ROUNDING: f32 = 1e-5;

/// Relative tolerance of the logits through the decoder where nothing but the f16 rounding of
/// K/V separates two runs (see the module docs).
const DECODER_TOLERANCE: f32 = 1e-3;

/// 37 tokens: KIVI's default group of 32 leaves 5 keys in an incomplete group, `g=8` leaves 5.
const TOKENS: usize = 37;

fn design(name: &str) -> Arc<dyn Quantizer> {
    Arc::from(quant::build(&QuantizerSpec::parse(name).unwrap()).unwrap())
}

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(21);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Logits of every position, feeding the tokens in blocks of `block` per forward call.
fn logits_in_blocks(
    decoder: &Decoder,
    toks: &[u32],
    block: usize,
    cache: &mut dyn KvCache,
) -> Vec<f32> {
    let mut all = Vec::new();
    for chunk in toks.chunks(block) {
        let logits = decoder.forward(chunk, cache).unwrap();
        all.extend(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
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

/// The same per-unit formats for both caches: `pick(layer, head, kind)` gives design and bits.
struct Setting {
    label: String,
    /// Some unit is KIVI keys (quantized per channel over groups of tokens).
    has_grouped_keys: bool,
    plan: KvQuantPlan,
    units: Vec<UnitFormat>,
}

fn setting(
    label: &str,
    config: &ModelConfig,
    pick: impl Fn(usize, usize, Kind) -> (&'static str, u8),
) -> Setting {
    let mut plan = KvQuantPlan::full_precision(config.num_layers, config.num_kv_heads);
    let mut units = Vec::new();
    let mut has_grouped_keys = false;
    for layer in 0..config.num_layers {
        for head in 0..config.num_kv_heads {
            for kind in [Kind::K, Kind::V] {
                let (name, bits) = pick(layer, head, kind);
                has_grouped_keys |= kind == Kind::K && name.starts_with("kivi");
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
    Setting {
        label: label.to_string(),
        has_grouped_keys,
        plan,
        units,
    }
}

fn settings(config: &ModelConfig) -> Vec<Setting> {
    let mixed_bits =
        |layer: usize, head: usize, kind: Kind| 2 + ((layer + 2 * head + kind as usize) % 3) as u8;
    vec![
        setting("kivi:2", config, |_, _, _| ("kivi", 2)),
        setting("kivi:g=8 mixed bits", config, move |l, h, k| {
            ("kivi:g=8", mixed_bits(l, h, k))
        }),
        setting("quarot mixed bits", config, move |l, h, k| {
            ("quarot", mixed_bits(l, h, k))
        }),
        setting("rtn-token:g=8:3", config, |_, _, _| ("rtn-token:g=8", 3)),
        // Designs and bits differ per unit: KIVI keys next to QuaRot and RTN units.
        setting("mixed designs", config, move |l, h, k| {
            let names = ["kivi:g=8", "quarot", "rtn-token"];
            (names[(l + h + k as usize) % 3], mixed_bits(l, h, k))
        }),
    ]
}

fn check_decoder_agreement(arch: Arch) {
    let config = tiny_config(arch, RopeLayout::Halves);
    let weights = random_weights(&config, 11).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let (layers, kv_heads, head_dim) = (config.num_layers, config.num_kv_heads, config.head_dim);
    let toks = tokens(TOKENS, config.vocab_size);
    let fp = logits_in_blocks(&decoder, &toks, TOKENS, &mut FpCache::new(layers));
    let scale = 1.0 + fp.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    for s in settings(&config) {
        // 0: everything leaves the window at once; 5: some tokens in it; 40: all per-token
        // units stay in full precision (KIVI keys are still quantized by completed groups).
        for residual in [0, 5, 40] {
            for block in [TOKENS, 7, 1] {
                let what = format!("{arch:?} {} residual {residual} blocks of {block}", s.label);
                let mut packed_cache = Recording::new(
                    PackedCache::new(layers, kv_heads, head_dim, &s.units, residual).unwrap(),
                );
                let packed = logits_in_blocks(&decoder, &toks, block, &mut packed_cache);
                let replayed = replay_difference(
                    &packed_cache.calls,
                    &mut SimQuantCache::with_semantics(
                        s.plan.clone(),
                        residual,
                        SimSemantics::Packed,
                    ),
                );
                assert!(
                    replayed < ROUNDING,
                    "{what}: simulation fed the packed cache's inputs differs by {replayed} (relative)"
                );
                let mut sim_cache =
                    SimQuantCache::with_semantics(s.plan.clone(), residual, SimSemantics::Packed);
                let sim = logits_in_blocks(&decoder, &toks, block, &mut sim_cache);
                let diff = max_abs_diff(&sim, &packed);
                let tolerance = DECODER_TOLERANCE * scale;
                // Quantization is visible, so the agreement is not trivial — unless the
                // window covers every token and no unit groups keys by tokens; then only the
                // f16 rounding of K/V separates the runs.
                let effect = max_abs_diff(&fp, &packed);
                if residual < TOKENS || s.has_grouped_keys {
                    assert!(effect > 20.0 * tolerance, "{what}: packed ≈ fp ({effect})");
                    assert!(
                        diff < 0.5 * effect,
                        "{what}: free-running |packed − simulated| = {diff}, quantization effect {effect}"
                    );
                } else {
                    assert!(
                        effect < tolerance,
                        "{what}: nothing quantized, yet {effect}"
                    );
                    assert!(
                        diff < tolerance,
                        "{what}: |packed − simulated| = {diff} (tolerance {tolerance})"
                    );
                }
            }
        }
    }
}

#[test]
fn decoder_logits_packed_equal_simulated_llama() {
    check_decoder_agreement(Arch::Llama);
}

#[test]
fn decoder_logits_packed_equal_simulated_gemma3_sliding_window() {
    check_decoder_agreement(Arch::Gemma3);
}

/// Where the two simulation modes must differ (KIVI keys, incomplete group, and inside a
/// prefill block where earlier queries see groups not yet complete) and where they must agree
/// (per-token designs: the window rule is the same). Tile semantics keep K/V in f32, so the
/// agreement is checked on inputs that are f16 values already (the packed semantics' rounding
/// is then the identity); through a free-running decoder the rounding itself separates them.
#[test]
fn tile_semantics_differ_only_for_grouped_keys() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 11).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let toks = tokens(TOKENS, config.vocab_size);
    let fp = logits_in_blocks(
        &decoder,
        &toks,
        TOKENS,
        &mut FpCache::new(config.num_layers),
    );
    let scale = 1.0 + fp.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let (layers, heads, kv_heads, head_dim) = (
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    );
    for s in settings(&config) {
        for (residual, block) in [(0, 1), (0, TOKENS), (5, 1)] {
            let what = format!("{} residual {residual} blocks of {block}", s.label);
            if s.has_grouped_keys {
                let run = |semantics| {
                    let mut cache =
                        SimQuantCache::with_semantics(s.plan.clone(), residual, semantics);
                    logits_in_blocks(&decoder, &toks, block, &mut cache)
                };
                let diff = max_abs_diff(&run(SimSemantics::Tile), &run(SimSemantics::Packed));
                assert!(
                    diff > 20.0 * DECODER_TOLERANCE * scale,
                    "{what}: tile and packed semantics agree ({diff}) although KIVI keys differ"
                );
            }
            let blocks = if block == 1 {
                vec![1; TOKENS]
            } else {
                vec![TOKENS]
            };
            let [o_tile, o_packed] = cache_outputs(
                [
                    &mut SimQuantCache::new(s.plan.clone(), residual),
                    &mut SimQuantCache::with_semantics(
                        s.plan.clone(),
                        residual,
                        SimSemantics::Packed,
                    ),
                ],
                layers,
                heads,
                kv_heads,
                head_dim,
                &blocks,
                None,
                true,
            );
            let out_scale = 1.0 + o_packed.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let diff = max_abs_diff(&o_tile, &o_packed);
            if s.has_grouped_keys {
                assert!(
                    diff > 1000.0 * ROUNDING * out_scale,
                    "{what}, f16 inputs: tile and packed semantics agree ({diff}) although KIVI keys differ"
                );
            } else {
                assert!(
                    diff < ROUNDING * out_scale,
                    "{what}, f16 inputs: tile and packed semantics differ ({diff}) for per-token designs"
                );
            }
        }
    }
}

/// The last token of a decode step whose group just completed: both caches quantize the
/// completed group at once; the step after it reads codes for all of it.
#[test]
fn completing_a_group_quantizes_it_in_both_caches() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 11).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let (layers, kv_heads, head_dim) = (config.num_layers, config.num_kv_heads, config.head_dim);
    let s = setting("kivi:g=8:2", &config, |_, _, _| ("kivi:g=8", 2));
    // 8 tokens in one block (the group completes at the block's last query), then 1 token.
    let toks = tokens(9, config.vocab_size);
    let mut packed_cache = PackedCache::new(layers, kv_heads, head_dim, &s.units, 0).unwrap();
    let mut sim_cache = SimQuantCache::with_semantics(s.plan.clone(), 0, SimSemantics::Packed);
    let mut fp_cache = FpCache::new(layers);
    let mut packed = logits_in_blocks(&decoder, &toks[..8], 8, &mut packed_cache);
    let mut sim = logits_in_blocks(&decoder, &toks[..8], 8, &mut sim_cache);
    let fp = logits_in_blocks(&decoder, &toks[..8], 8, &mut fp_cache);
    let scale = 1.0 + fp.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert_eq!(packed_cache.inner().len(0), 8);
    let memory = packed_cache.memory();
    assert_eq!(
        memory.residual_bytes, 0,
        "a completed group and residual-0 values leave nothing in full precision: {memory:?}"
    );
    packed.extend(logits_in_blocks(&decoder, &toks[8..], 1, &mut packed_cache));
    sim.extend(logits_in_blocks(&decoder, &toks[8..], 1, &mut sim_cache));
    let diff = max_abs_diff(&sim, &packed);
    assert!(
        diff < DECODER_TOLERANCE * scale,
        "|packed − simulated| = {diff}"
    );
    // The 9th key opens a new group and is kept unquantized (f16) by both.
    assert_eq!(
        packed_cache.memory().residual_bytes,
        layers * kv_heads * head_dim * 2,
        "one f16 key per head unquantized"
    );
}

/// Random `[n0, n1, n2]` values; every key channel `c % 5 == 0` is an outlier (×6), as real
/// keys have, so per-channel grouping matters.
fn random_tensor(rng: &mut SplitMix64, shape: (usize, usize, usize), outliers: bool) -> Tensor {
    let mut v = rng.uniform(shape.0 * shape.1 * shape.2, 1.0);
    if outliers {
        for (i, x) in v.iter_mut().enumerate() {
            if (i % shape.2).is_multiple_of(5) {
                *x *= 6.0;
            }
        }
    }
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Feeds both caches identical q/k/v for two layers in the block pattern `blocks`, returning
/// every attention output of each. With `f16_inputs` the keys and values are f16 values.
#[allow(clippy::too_many_arguments)]
fn cache_outputs(
    caches: [&mut dyn KvCache; 2],
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    blocks: &[usize],
    window: Option<usize>,
    f16_inputs: bool,
) -> [Vec<f32>; 2] {
    let mut rng = SplitMix64::new(77);
    let params = AttnParams {
        scale: 1.0 / (head_dim as f64).sqrt(),
        sliding_window: window,
        differentiable: false,
    };
    let mut outs = [Vec::new(), Vec::new()];
    let [a, b] = caches;
    for &t in blocks {
        for layer in 0..layers {
            let q = random_tensor(&mut rng, (heads, t, head_dim), false);
            let mut k = random_tensor(&mut rng, (kv_heads, t, head_dim), true);
            let mut v = random_tensor(&mut rng, (kv_heads, t, head_dim), false);
            if f16_inputs {
                let as_f16 = |x: &Tensor| x.to_dtype(DType::F16)?.to_dtype(DType::F32);
                k = as_f16(&k).unwrap();
                v = as_f16(&v).unwrap();
            }
            for (cache, out) in [&mut *a, &mut *b].into_iter().zip(outs.iter_mut()) {
                let o = cache.attend(layer, &q, &k, &v, &params).unwrap();
                out.extend(o.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
        a.advance(t);
        b.advance(t);
    }
    outs
}

#[test]
fn caches_fed_identical_kv_agree_to_rounding() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let (layers, heads, kv_heads, head_dim) = (
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
    );
    let patterns: [&[usize]; 4] = [
        &[TOKENS],
        &[1; TOKENS],
        &[7, 7, 7, 7, 7, 2],
        &[20, 1, 1, 15],
    ];
    for s in settings(&config) {
        for residual in [0, 5, 40] {
            for window in [None, Some(9)] {
                for blocks in patterns {
                    let what = format!(
                        "{} residual {residual} window {window:?} blocks {blocks:?}",
                        s.label
                    );
                    let mut sim = SimQuantCache::with_semantics(
                        s.plan.clone(),
                        residual,
                        SimSemantics::Packed,
                    );
                    let mut packed =
                        PackedCache::new(layers, kv_heads, head_dim, &s.units, residual).unwrap();
                    let [o_sim, o_packed] = cache_outputs(
                        [&mut sim, &mut packed],
                        layers,
                        heads,
                        kv_heads,
                        head_dim,
                        blocks,
                        window,
                        false,
                    );
                    let scale = 1.0 + o_sim.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    let diff = max_abs_diff(&o_sim, &o_packed);
                    assert!(
                        diff < ROUNDING * scale,
                        "{what}: |packed − simulated| = {diff}"
                    );
                    // Tile semantics read different keys whenever KIVI keys are in play.
                    let mut tile = SimQuantCache::new(s.plan.clone(), residual);
                    let mut fp = FpCache::new(layers);
                    let [o_tile, o_fp] = cache_outputs(
                        [&mut tile, &mut fp],
                        layers,
                        heads,
                        kv_heads,
                        head_dim,
                        blocks,
                        window,
                        false,
                    );
                    let tile_diff = max_abs_diff(&o_tile, &o_packed);
                    if s.has_grouped_keys {
                        assert!(
                            tile_diff > 1000.0 * ROUNDING * scale,
                            "{what}: tile semantics equal packed ({tile_diff})"
                        );
                    }
                    let effect = max_abs_diff(&o_fp, &o_packed);
                    if residual < TOKENS || s.has_grouped_keys {
                        assert!(
                            effect > 1000.0 * ROUNDING * scale,
                            "{what}: packed ≈ fp ({effect})"
                        );
                    }
                }
            }
        }
    }
}

/// The mixed-precision attention against plain loops: each (head, query, key) reads the key
/// and the value from the tile its own mask names.
#[test]
fn precision_mask_attention_equals_plain_loops() {
    let (heads, kv_heads, t, q_start, d) = (4, 2, 5, 6, 8);
    let s_len = q_start + t;
    let mut rng = SplitMix64::new(3);
    let q = rng.uniform(heads * t * d, 1.0);
    let tiles: Vec<Vec<f32>> = (0..4)
        .map(|_| rng.uniform(kv_heads * s_len * d, 1.0))
        .collect();
    let masks: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            (0..kv_heads * t * s_len)
                .map(|_| (rng.next_u64() % 2) as u8)
                .collect()
        })
        .collect();
    let tensor = |v: &[f32], shape: (usize, usize, usize)| {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    };
    let kv_shape = (kv_heads, s_len, d);
    let mask_shape = (kv_heads, t, s_len);
    let scale = 0.4;
    for window in [None, Some(3)] {
        let mut want = vec![0f32; heads * t * d];
        for h in 0..heads {
            let j = h / (heads / kv_heads);
            for i in 0..t {
                let p = q_start + i;
                let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
                let pick = |m: usize, fp: usize, qz: usize, pos: usize| {
                    let tile = if masks[m][(j * t + i) * s_len + pos] == 1 {
                        fp
                    } else {
                        qz
                    };
                    &tiles[tile][(j * s_len + pos) * d..(j * s_len + pos + 1) * d]
                };
                let qi = &q[(h * t + i) * d..(h * t + i + 1) * d];
                let scores: Vec<f64> = (lo..=p)
                    .map(|pos| {
                        let k = pick(0, 0, 2, pos);
                        scale * qi.iter().zip(k).map(|(a, b)| (*a * *b) as f64).sum::<f64>()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (n, pos) in (lo..=p).enumerate() {
                    let v = pick(1, 1, 3, pos);
                    for c in 0..d {
                        want[(h * t + i) * d + c] += (exps[n] / sum * v[c] as f64) as f32;
                    }
                }
            }
        }
        for differentiable in [false, true] {
            let params = AttnParams {
                scale,
                sliding_window: window,
                differentiable,
            };
            let got = attention_with_precision_masks(
                &tensor(&q, (heads, t, d)),
                &tensor(&tiles[0], kv_shape),
                &tensor(&tiles[1], kv_shape),
                &tensor(&tiles[2], kv_shape),
                &tensor(&tiles[3], kv_shape),
                q_start,
                &Tensor::from_vec(masks[0].clone(), mask_shape, &Device::Cpu).unwrap(),
                &Tensor::from_vec(masks[1].clone(), mask_shape, &Device::Cpu).unwrap(),
                &params,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff < 1e-5,
                "window {window:?} differentiable {differentiable}: {diff}"
            );
        }
    }
}

/// A K/V value that f16 cannot hold (its rounding is infinite) is refused by both caches with
/// an error naming where it is, rather than stored as infinity; the largest value that rounds
/// to a finite f16 is accepted.
#[test]
fn both_caches_refuse_values_beyond_f16() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let (layers, kv_heads, head_dim) = (config.num_layers, config.num_kv_heads, config.head_dim);
    let s = setting("kivi:2", &config, |_, _, _| ("kivi", 2));
    let params = AttnParams {
        scale: 1.0 / (head_dim as f64).sqrt(),
        sliding_window: None,
        differentiable: false,
    };
    let q = Tensor::zeros((config.num_heads, 1, head_dim), DType::F32, &Device::Cpu).unwrap();
    let with_value = |x: f32| {
        let mut data = vec![0.5f32; kv_heads * head_dim];
        data[head_dim + 3] = x; // KV head 1, channel 3
        Tensor::from_vec(data, (kv_heads, 1, head_dim), &Device::Cpu).unwrap()
    };
    let ok = with_value(65519.0);
    let too_big = with_value(-70000.0);
    let mut sim = SimQuantCache::with_semantics(s.plan.clone(), 4, SimSemantics::Packed);
    let mut packed = PackedCache::new(layers, kv_heads, head_dim, &s.units, 4).unwrap();
    for (name, cache) in [
        ("simulation", &mut sim as &mut dyn KvCache),
        ("packed", &mut packed),
    ] {
        cache.attend(0, &q, &ok, &ok, &params).unwrap();
        let e = cache
            .attend(1, &q, &ok, &too_big, &params)
            .err()
            .unwrap_or_else(|| panic!("{name}: -70000 accepted"))
            .to_string();
        assert!(
            e.contains("layer 1 v")
                && e.contains("f16")
                && e.contains("kv head 1")
                && e.contains("channel 3"),
            "{name}: {e}"
        );
    }
}

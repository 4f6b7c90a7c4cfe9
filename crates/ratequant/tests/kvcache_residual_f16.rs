//! The packed cache holds unquantized (residual) tokens in f16: attention reads the rounded
//! values, tokens are quantized from them when they leave, values beyond f16's range are
//! refused, and the rounding is f16's round-to-nearest-even.

use half::f16;
use ratequant::kvcache::{
    round_to_residual_precision, AttentionParams, CacheShape, PackedKvCache, UnitFormat,
    F16_OVERFLOW,
};
use ratequant::quant::{self, Kind, QuantizerSpec, TileShape};

fn spec(s: &str) -> QuantizerSpec {
    QuantizerSpec::parse(s).unwrap()
}

fn f16_rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Deterministic values in `[-2, 2)` that are mostly not representable in f16.
fn awkward_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed)
                .wrapping_mul(2_654_435_761)
                .rotate_left(13);
            (h % 1_000_003) as f32 / 250_000.75 - 2.0
        })
        .collect()
}

const PARAMS: AttentionParams = AttentionParams {
    scale: 1.0,
    window: None,
};

#[test]
fn slice_rounding_equals_per_element_round_to_nearest_even() {
    // Ties (1 + 2^-11 sits halfway between 1 and 1 + 2^-10), subnormals, the largest finite
    // f16 and what rounds down to it, signed zeros, and many ordinary values; 300+ values so
    // that the vectorised chunks and the tail are both exercised.
    let mut values = vec![
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        -(1.0 + 2f32.powi(-11)),
        2f32.powi(-25),
        3.0 * 2f32.powi(-25),
        1e-6,
        -1e-7,
        6.1e-5,
        65504.0,
        65519.0,
        -65519.0,
        0.0,
        -0.0,
        0.1,
        1.0 / 3.0,
    ];
    values.extend(awkward_values(300, 7));
    values.extend(awkward_values(37, 9).iter().map(|x| x * 1000.0));
    let mut rounded = values.clone();
    round_to_residual_precision(&mut rounded);
    for (i, (&x, &r)) in values.iter().zip(&rounded).enumerate() {
        let want = f16::from_f32(x).to_f32();
        assert_eq!(
            r.to_bits(),
            want.to_bits(),
            "value {i}: {x} rounded to {r}, not {want}"
        );
    }
    // The rounding does something: 1 + 2^-11 is a tie that goes to the even neighbour, 1.
    assert_eq!(rounded[0], 1.0);
    assert_eq!(rounded[1], 1.0 + 2f32.powi(-9));
    assert_eq!(rounded[9], 65504.0);
}

#[test]
fn a_residual_value_comes_back_rounded_to_f16() {
    // One token: its attention weight is exactly 1, so the output is the stored value row
    // itself, which must be the f16 rounding of what was appended (for every design: QuaRot's
    // residual is unrotated, KIVI's key group is incomplete, all values inside the window).
    let d = 64;
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: d,
    };
    let v: Vec<f32> = (0..d).map(|c| 1.0 + (c as f32 + 0.3) * 3e-4).collect();
    let k = awkward_values(d, 1);
    let q = awkward_values(d, 2);
    let v_f16 = f16_rounded(&v);
    assert!(
        max_abs_diff(&v, &v_f16) > 1e-4,
        "the test values must not be representable in f16"
    );
    for design in ["kivi", "quarot", "rtn-token"] {
        let mut cache = PackedKvCache::uniform(shape, &spec(design), 2, 4).unwrap();
        let out = cache.attend(0, &q, 1, &k, &v, 1, &PARAMS).unwrap();
        assert!(
            max_abs_diff(&out, &v_f16) <= 1e-6,
            "{design}: output is not the f16-rounded value row: {:?}",
            &out[..4]
        );
    }
}

#[test]
fn residual_keys_are_compared_in_f16() {
    // Two keys that differ by less than half an f16 ulp round to the same f16 key: their
    // scores tie and the output is the exact mean of the values. Kept in f32, the second key
    // would score 64·8·2^-13 = 0.0625 higher and move the output to about 0.5156.
    let d = 64;
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: d,
    };
    let mut k = vec![1.0f32; d];
    k.extend(vec![1.0 + 2f32.powi(-13); d]);
    let mut v = vec![0.0f32; d];
    v.extend(vec![1.0f32; d]);
    let q = vec![8.0f32; d];
    for design in ["kivi", "quarot", "rtn-token"] {
        for block in [1, 2] {
            let mut cache = PackedKvCache::uniform(shape, &spec(design), 4, 8).unwrap();
            let out = if block == 2 {
                let both = cache.attend(0, &[q.clone(), q.clone()].concat(), 1, &k, &v, 2, &PARAMS);
                both.unwrap()[d..].to_vec()
            } else {
                cache.append(0, &k[..d], &v[..d], 1).unwrap();
                cache
                    .attend(0, &q, 1, &k[d..], &v[d..], 1, &PARAMS)
                    .unwrap()
            };
            assert!(
                out.iter().all(|&o| (o - 0.5).abs() < 1e-6),
                "{design}, block {block}: {:?}",
                &out[..4]
            );
        }
    }
}

#[test]
fn tokens_leaving_the_residual_are_quantized_from_their_f16_values() {
    // Residual 0: per-token values are quantized at once. With one token per KV head the
    // output is that head's dequantized value row, which must be the design's fake
    // quantization of the f16-rounded row, and differ visibly from that of the f32 row.
    let d = 64;
    let kv_heads = 8;
    let shape = CacheShape {
        layers: 1,
        kv_heads,
        head_dim: d,
    };
    let v = awkward_values(kv_heads * d, 3);
    let k = awkward_values(kv_heads * d, 4);
    let q = awkward_values(kv_heads * d, 5);
    for design in ["kivi", "quarot", "rtn-token:g=16"] {
        let s = spec(design);
        let quantizer = quant::build(&s).unwrap();
        let mut cache = PackedKvCache::uniform(shape, &s, 8, 0).unwrap();
        let out = cache.attend(0, &q, kv_heads, &k, &v, 1, &PARAMS).unwrap();
        let fake = |rows: &[f32]| {
            let mut out = vec![0.0f32; rows.len()];
            for (src, dst) in rows.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                quantizer
                    .fake_quantize(src, TileShape::new(1, d), Kind::V, 8, dst)
                    .unwrap();
            }
            out
        };
        let from_f16 = fake(&f16_rounded(&v));
        let from_f32 = fake(&v);
        let agreement = max_abs_diff(&out, &from_f16);
        let difference = max_abs_diff(&from_f16, &from_f32);
        assert!(
            agreement < 1e-5,
            "{design}: |cache − f16 reference| = {agreement}"
        );
        assert!(
            difference > 100.0 * 1e-5,
            "{design}: f16 and f32 quantization must differ for this test to mean anything ({difference})"
        );
    }
}

#[test]
fn a_token_is_stored_the_same_whenever_it_leaves_the_residual() {
    // Prefill in one block (tokens leave inside the block, quantized from the scratch rows)
    // and token by token (tokens leave the f16 residual later): the stored codes, scales and
    // residual rows must be identical, so the next decode step's attention is bit for bit
    // the same.
    let d = 32;
    let shape = CacheShape {
        layers: 1,
        kv_heads: 2,
        head_dim: d,
    };
    let tokens = 75;
    let k = awkward_values(2 * tokens * d, 11);
    let v = awkward_values(2 * tokens * d, 12);
    let head_rows = |x: &[f32], t: usize| -> Vec<f32> {
        (0..2)
            .flat_map(|h| x[(h * tokens + t) * d..(h * tokens + t + 1) * d].to_vec())
            .collect()
    };
    for design in ["kivi:g=16", "quarot", "rtn-token"] {
        let s = spec(design);
        let mut whole = PackedKvCache::uniform(shape, &s, 3, 10).unwrap();
        let mut stepped = PackedKvCache::uniform(shape, &s, 3, 10).unwrap();
        let q_block = awkward_values(2 * tokens * d, 13);
        whole
            .attend(0, &q_block, 2, &k, &v, tokens, &PARAMS)
            .unwrap();
        for t in 0..tokens {
            stepped
                .append(0, &head_rows(&k, t), &head_rows(&v, t), 1)
                .unwrap();
        }
        assert_eq!(whole.memory(), stepped.memory(), "{design}");
        let q = awkward_values(2 * d, 14);
        let a = whole.attend_last(0, &q, 2, &PARAMS).unwrap();
        let b = stepped.attend_last(0, &q, 2, &PARAMS).unwrap();
        assert_eq!(a, b, "{design}");
    }
}

#[test]
fn values_beyond_the_f16_range_are_refused() {
    let d = 16;
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: d,
    };
    let units = vec![
        UnitFormat {
            quantizer: spec("kivi:g=8"),
            bits: 2,
        };
        2
    ];
    let mut cache = PackedKvCache::new(shape, &units, 4).unwrap();
    let ok = vec![65519.0f32; d];
    cache.append(0, &ok, &ok, 1).unwrap();
    let mut too_big = vec![0.5f32; d];
    too_big[3] = -F16_OVERFLOW;
    let e = cache.append(0, &ok, &too_big, 1).unwrap_err().to_string();
    assert!(
        e.contains("v:") && e.contains("f16 range") && e.contains("channel 3"),
        "{e}"
    );
    assert_eq!(cache.len(0), 1, "a refused append stores nothing");
}

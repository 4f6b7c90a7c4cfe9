//! Exact memory accounting and clear errors on bad input.

use ratequant::kvcache::memory::{estimate, MemoryReport};
use ratequant::kvcache::{
    AttentionParams, CacheShape, PackedKvCache, UnitFormat, DEFAULT_RESIDUAL,
};
use ratequant::quant::QuantizerSpec;

fn spec(s: &str) -> QuantizerSpec {
    QuantizerSpec::parse(s).unwrap()
}

fn rows(tokens: usize, d: usize, heads: usize, seed: u32) -> Vec<f32> {
    (0..heads * tokens * d)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
        .collect()
}

#[test]
fn memory_of_a_hand_computed_example() {
    // One layer, one KV head, head_dim 64. K: kivi (G = 32) at 2 bits; V: kivi at 3 bits
    // (per token, 2 groups of 32 channels); residual window 8; 70 tokens.
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 64,
    };
    let units = [
        UnitFormat {
            quantizer: spec("kivi"),
            bits: 2,
        },
        UnitFormat {
            quantizer: spec("kivi"),
            bits: 3,
        },
    ];
    let mut cache = PackedKvCache::new(shape, &units, 8).unwrap();
    let d = 64;
    // Mixed appends: a prefill block, then token by token.
    cache
        .append(0, &rows(40, d, 1, 1), &rows(40, d, 1, 2), 40)
        .unwrap();
    for t in 0..30 {
        cache
            .append(0, &rows(1, d, 1, 10 + t), &rows(1, d, 1, 50 + t), 1)
            .unwrap();
    }
    let m = cache.memory();
    // Keys: ⌊70/32⌋ = 2 groups quantized: 2 blocks × 64 channels × (32 tokens × 2 bits = 8
    // bytes) = 1024 code bytes; 2 × 64 (scale, zero) pairs of f16 = 512 bytes; 70 − 64 = 6
    // residual rows × 64 × 4 bytes = 1536.
    // Values: 70 − 8 = 62 tokens quantized: 62 × (64 × 3 bits = 24 bytes) = 1488 code bytes;
    // 62 tokens × 2 groups × 4 bytes = 496; 8 residual rows × 256 bytes = 2048.
    // Padding: 16 bytes per code buffer, 2 buffers.
    let want = MemoryReport {
        tokens: 70,
        code_bytes: 1024 + 1488,
        metadata_bytes: 512 + 496,
        residual_bytes: 1536 + 2048,
        padding_bytes: 32,
        f16_bytes: 70 * 64 * 2 * 2,
    };
    assert_eq!(m, want);
    assert_eq!(m.total_bytes(), 7136);
    assert!((m.bytes_per_token() - 7136.0 / 70.0).abs() < 1e-9);
    assert!((m.compression() - 17920.0 / 7136.0).abs() < 1e-9);
    assert_eq!(estimate(shape, &units, 8, 70).unwrap(), want);
}

#[test]
fn estimate_equals_the_report_for_mixed_units_and_lengths() {
    let shape = CacheShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 64,
    };
    let designs = ["kivi", "quarot", "rtn-token:g=16", "kivi:g=48"];
    let units: Vec<UnitFormat> = (0..shape.units())
        .map(|i| UnitFormat {
            quantizer: spec(designs[(i * 3) % 4]),
            bits: (i % 8) as u8 + 1,
        })
        .collect();
    for residual in [0, 5, DEFAULT_RESIDUAL] {
        let mut cache = PackedKvCache::new(shape, &units, residual).unwrap();
        let mut len = 0;
        for block in [1usize, 31, 1, 64, 200, 3] {
            for layer in 0..2 {
                let k = rows(block, 64, 2, (len + layer) as u32);
                cache.append(layer, &k, &k, block).unwrap();
            }
            len += block;
            assert_eq!(
                cache.memory(),
                estimate(shape, &units, residual, len).unwrap(),
                "residual {residual}, {len} tokens"
            );
        }
    }
}

#[test]
fn two_and_a_half_bits_is_several_times_smaller_than_f16() {
    // SmolLM2's geometry at 8K tokens, half the units at 2 bits and half at 3, kivi G = 128.
    let shape = CacheShape {
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
    };
    let units: Vec<UnitFormat> = (0..shape.units())
        .map(|i| UnitFormat {
            quantizer: spec("kivi:g=128"),
            bits: 2 + (i % 2) as u8,
        })
        .collect();
    let m = estimate(shape, &units, DEFAULT_RESIDUAL, 8192).unwrap();
    assert_eq!(m.f16_bytes, 8192 * 30 * 3 * 64 * 2 * 2);
    let compression = m.compression();
    assert!(
        compression > 4.5 && compression < 16.0 / 2.5,
        "compression {compression}"
    );
}

fn err<T>(r: ratequant::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let shape = CacheShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 64,
    };
    let uniform = |s: &str, bits| {
        vec![
            UnitFormat {
                quantizer: spec(s),
                bits
            };
            shape.units()
        ]
    };

    let e = err(PackedKvCache::new(shape, &uniform("kivi", 0), 128));
    assert!(e.contains("bits") && e.contains('0'), "{e}");
    let e = err(PackedKvCache::new(shape, &uniform("kivi", 9), 128));
    assert!(e.contains("bits") && e.contains('9'), "{e}");
    let e = err(PackedKvCache::new(
        CacheShape {
            head_dim: 48,
            ..shape
        },
        &uniform("quarot", 4),
        128,
    ));
    assert!(e.contains("power-of-two") && e.contains("48"), "{e}");
    let e = err(PackedKvCache::new(shape, &uniform("kivi", 2)[..5], 128));
    assert!(e.contains("8 unit formats") && e.contains("got 5"), "{e}");
    let e = err(PackedKvCache::new(
        CacheShape {
            kv_heads: 0,
            ..shape
        },
        &[],
        128,
    ));
    assert!(e.contains("kv_heads"), "{e}");
    let bad_spec = QuantizerSpec {
        name: "lloyd".into(),
        group: None,
    };
    let e = err(PackedKvCache::new(
        shape,
        &vec![
            UnitFormat {
                quantizer: bad_spec,
                bits: 2
            };
            8
        ],
        128,
    ));
    assert!(e.contains("lloyd"), "{e}");

    let mut cache = PackedKvCache::new(shape, &uniform("kivi", 2), 128).unwrap();
    let k = rows(3, 64, 2, 1);
    let p = AttentionParams {
        scale: 0.125,
        window: None,
    };
    let e = err(cache.append(2, &k, &k, 3));
    assert!(e.contains("layer 2") && e.contains("2 layers"), "{e}");
    let e = err(cache.append(0, &k[..100], &k, 3));
    assert!(e.contains("k:") && e.contains("head_dim 64"), "{e}");
    let mut nan = k.clone();
    nan[64 * 3 + 65] = f32::NAN;
    let e = err(cache.append(0, &k, &nan, 3));
    assert!(
        e.contains("v:")
            && e.contains("kv head 1")
            && e.contains("new token 1")
            && e.contains("channel 1"),
        "{e}"
    );
    let q = rows(3, 64, 3, 2);
    let e = err(cache.attend(0, &q, 3, &k, &k, 3, &p));
    assert!(e.contains("multiple") && e.contains("KV heads (2)"), "{e}");
    let e = err(cache.attend(0, &q[..64 * 3 * 2 - 1], 2, &k, &k, 3, &p));
    assert!(e.contains("q:"), "{e}");
    let e = err(cache.attend_last(0, &q[..128], 2, &p));
    assert!(e.contains("empty"), "{e}");
    // Nothing was stored by the failed calls.
    assert!(cache.is_empty());
    assert_eq!(cache.memory().total_bytes(), 16 * 8);
}

//! Exact memory accounting and clear errors on bad input.

use ratequant::kvcache::memory::{estimate, MemoryReport};
use ratequant::kvcache::{
    AttentionKernel, AttentionParams, CacheShape, PackedKvCache, UnitFormat, DEFAULT_RESIDUAL,
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
    // residual rows × 64 × 2 bytes (f16) = 768.
    // Values: 70 − 8 = 62 tokens quantized: 62 × (64 × 3 bits = 24 bytes) = 1488 code bytes;
    // 62 tokens × 2 groups × 4 bytes = 496; 8 residual rows × 128 bytes = 1024.
    // Padding: 16 bytes per code buffer, 2 buffers.
    let want = MemoryReport {
        tokens: 70,
        code_bytes: 1024 + 1488,
        metadata_bytes: 512 + 496,
        residual_bytes: 768 + 1024,
        padding_bytes: 32,
        f16_bytes: 70 * 64 * 2 * 2,
    };
    assert_eq!(m, want);
    assert_eq!(m.total_bytes(), 5344);
    assert!((m.bytes_per_token() - 5344.0 / 70.0).abs() < 1e-9);
    assert!((m.compression() - 17920.0 / 5344.0).abs() < 1e-9);
    assert_eq!(
        estimate(shape, &units, 8, 70, AttentionKernel::Float).unwrap(),
        want
    );
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
                estimate(shape, &units, residual, len, AttentionKernel::Float).unwrap(),
                "residual {residual}, {len} tokens"
            );
        }
    }
}

#[test]
fn residual_rows_cost_two_bytes_per_element() {
    // Uniform caches whose residual size follows from the semantics alone: KIVI keys hold
    // `len mod G` tokens unquantized, every per-token unit `min(len, R)`. Checked on the
    // cache's report and on the estimate, for several designs, bits, windows and lengths.
    let shape = CacheShape {
        layers: 2,
        kv_heads: 3,
        head_dim: 32,
    };
    let heads = shape.layers * shape.kv_heads;
    for (design, key_group) in [("kivi", Some(32)), ("kivi:g=7", Some(7)), ("quarot", None)] {
        for bits in [1u8, 3, 8] {
            for residual in [0usize, 9, 40] {
                let mut cache =
                    PackedKvCache::uniform(shape, &spec(design), bits, residual).unwrap();
                let mut len = 0;
                for block in [1usize, 5, 30, 1, 77] {
                    for layer in 0..shape.layers {
                        let x = rows(block, 32, 3, (len * 7 + layer) as u32);
                        cache.append(layer, &x, &x, block).unwrap();
                    }
                    len += block;
                    let key_rows = key_group.map_or(len.min(residual), |g| len % g);
                    let value_rows = len.min(residual);
                    let want = heads * (key_rows + value_rows) * 32 * 2;
                    let got = cache.memory();
                    assert_eq!(
                        got.residual_bytes, want,
                        "{design} at {bits} bits, residual {residual}, {len} tokens"
                    );
                    let units = vec![
                        UnitFormat {
                            quantizer: spec(design),
                            bits
                        };
                        shape.units()
                    ];
                    assert_eq!(
                        got,
                        estimate(shape, &units, residual, len, AttentionKernel::Float).unwrap()
                    );
                }
            }
        }
    }
}

/// SmolLM2-135M's attention geometry: 30 layers, 3 KV heads of 64.
const SMOLLM2: CacheShape = CacheShape {
    layers: 30,
    kv_heads: 3,
    head_dim: 64,
};

/// Every unit of `shape` in `design`; `mixed` puts half the KV heads (K and V) at `bits` and
/// half at `bits + 1`.
fn smollm2_units(design: &str, bits: u8, mixed: bool) -> Vec<UnitFormat> {
    (0..SMOLLM2.units())
        .map(|i| UnitFormat {
            quantizer: spec(design),
            bits: bits + u8::from(mixed && (i / 2) % 2 == 1),
        })
        .collect()
}

#[test]
fn smollm2_compression_table() {
    // The estimate's arithmetic at SmolLM2's full context (8192 tokens, residual 128), printed
    // as the table in docs/generate.md (`cargo test -p ratequant --test kvcache_memory
    // smollm2_compression_table -- --nocapture`). The last column is what the same cache
    // would be with an f32 residual (twice the residual bytes), for comparison.
    let tokens = 8192;
    let rows = [
        ("kivi (G=32)", "kivi", 2, false, "2"),
        ("kivi (G=32)", "kivi", 2, true, "2.5"),
        ("kivi (G=32)", "kivi", 4, false, "4"),
        ("kivi (G=128)", "kivi:g=128", 2, false, "2"),
        ("kivi (G=128)", "kivi:g=128", 2, true, "2.5"),
        ("kivi (G=128)", "kivi:g=128", 4, false, "4"),
        ("quarot", "quarot", 2, false, "2"),
        ("quarot", "quarot", 2, true, "2.5"),
    ];
    println!("| design | bits | KV bytes/token | total MiB | f16 MiB | × smaller than f16 | with an f32 residual |");
    println!("|---|---|---|---|---|---|---|");
    let mut compression = std::collections::HashMap::new();
    for (label, design, bits, mixed, bits_label) in rows {
        let units = smollm2_units(design, bits, mixed);
        let m = estimate(
            SMOLLM2,
            &units,
            DEFAULT_RESIDUAL,
            tokens,
            AttentionKernel::Float,
        )
        .unwrap();
        let with_f32_residual = m.f16_bytes as f64 / (m.total_bytes() + m.residual_bytes) as f64;
        println!(
            "| {label} | {bits_label} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            m.bytes_per_token(),
            m.total_bytes() as f64 / (1u64 << 20) as f64,
            m.f16_bytes as f64 / (1u64 << 20) as f64,
            m.compression(),
            with_f32_residual
        );
        compression.insert((design, bits_label), m);
    }
    // Hand arithmetic for kivi G=128 at 2.5 bits, per KV head (mean over the 2- and 3-bit
    // heads): keys, all 8192 tokens quantized (a multiple of 128): 20 code bytes + one f16
    // (scale, zero) per channel per 128 tokens = 2 bytes per token; values, 8192 − 128 tokens
    // quantized: 20 code bytes + one (scale, zero) per token = 24 bytes, and 128 residual rows
    // of 64 f16 = 128 bytes each. Plus 16 padding bytes per unit (180 units).
    let residual_rows = 128 * 64 * 2;
    let per_head = 8192 * (20 + 2) + 8064 * (20 + 4) + residual_rows;
    let m = compression[&("kivi:g=128", "2.5")];
    assert_eq!(m.total_bytes(), 90 * per_head + 16 * 180);
    assert_eq!(m.residual_bytes, 90 * residual_rows);
    // Issue 5's end-to-end target: at least 5× smaller than f16 at 2.5 bits.
    assert!(m.compression() >= 5.0, "{}", m.compression());
    // kivi G=32 at 2 bits: keys 16 code bytes + 64 (scale, zero) per 32 tokens = 8 bytes per
    // token; values 16 + two (scale, zero) per token = 24 bytes for 8064 tokens.
    let per_head = 8192 * (16 + 8) + 8064 * (16 + 8) + residual_rows;
    let m = compression[&("kivi", "2")];
    assert_eq!(m.total_bytes(), 90 * per_head + 16 * 180);
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
    let m = estimate(
        shape,
        &units,
        DEFAULT_RESIDUAL,
        8192,
        AttentionKernel::Float,
    )
    .unwrap();
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

#[test]
fn int8_tiles_are_counted_exactly() {
    // The integer kernels keep values in whole 32-token tiles: the report and the estimate
    // agree byte for byte at every length, and a full tile costs what the bit runs cost.
    let shape = CacheShape {
        layers: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    for design in ["kivi", "quarot", "kivi:g=48"] {
        for bits in [2u8, 3, 8] {
            let units = vec![
                UnitFormat {
                    quantizer: spec(design),
                    bits
                };
                shape.units()
            ];
            let mut int8 =
                PackedKvCache::with_kernel(shape, &units, 8, AttentionKernel::Int8).unwrap();
            let mut float = PackedKvCache::new(shape, &units, 8).unwrap();
            let mut len = 0;
            for block in [1usize, 40, 23, 1, 31] {
                for layer in 0..shape.layers {
                    let x = rows(block, 64, 1, (len + layer) as u32);
                    int8.append(layer, &x, &x, block).unwrap();
                    float.append(layer, &x, &x, block).unwrap();
                }
                len += block;
                let got = int8.memory();
                let want = estimate(shape, &units, 8, len, AttentionKernel::Int8).unwrap();
                assert_eq!(got, want, "{design} {bits} bits, {len} tokens");
                let values = len - 8.min(len);
                let tile_slack = (values.div_ceil(32) * 32 - values) * 64 * bits as usize / 8;
                assert_eq!(
                    got.code_bytes,
                    float.memory().code_bytes + shape.layers * tile_slack,
                    "{design} {bits} bits, {len} tokens"
                );
            }
        }
    }
}

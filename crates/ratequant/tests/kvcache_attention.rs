//! The packed KV cache against plain attention over `fake_quantize`d keys and values with the
//! same residual semantics, across designs, bits, mixed units, GQA, odd lengths, prefill
//! blocks, sliding windows and instruction sets. The cache holds unquantized tokens in f16 and
//! quantizes tokens from those f16 values, so the reference rounds every key and value to f16
//! first (element by element with `half`, independently of the cache's slice conversion).

use half::f16;
use ratequant::kvcache::attention::int8::Kernels;
use ratequant::kvcache::{
    AttentionKernel, AttentionParams, CacheShape, Isa, PackedKvCache, UnitFormat,
};
use ratequant::quant::{self, Kind, QuantizerSpec, TileShape};

/// Small deterministic generator (xorshift64*), so the tests need no dependencies.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u = self.uniform().max(1e-7);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}

/// `[heads, tokens, d]` activations with a few outlier channels, like real keys.
fn activations(rng: &mut Rng, heads: usize, tokens: usize, d: usize) -> Vec<f32> {
    let gains: Vec<f32> = (0..d)
        .map(|c| if c % 13 == 5 { 6.0 } else { 1.0 })
        .collect();
    (0..heads * tokens * d)
        .map(|i| rng.normal() * gains[i % d] + if i % d == 7 { 2.0 } else { 0.0 })
        .collect()
}

fn spec(s: &str) -> QuantizerSpec {
    QuantizerSpec::parse(s).unwrap()
}

/// Each value rounded to the nearest f16 (ties to even), as the cache's residual holds it.
fn f16_rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

/// Tokens quantized once `n` are stored, as issue 5 defines it (independent of the cache).
fn quantized_len(spec: &QuantizerSpec, kind: Kind, n: usize, residual: usize) -> usize {
    if spec.name == "kivi" && kind == Kind::K {
        let g = spec.group.unwrap_or(32);
        n / g * g
    } else {
        n.saturating_sub(residual)
    }
}

/// Fake-quantized copy of one head's `[tokens, d]` rows: per-channel KIVI keys over the whole
/// groups only (what any query can see quantized), per-token units over every row.
fn fake_quantized(spec: &QuantizerSpec, kind: Kind, bits: u8, rows: &[f32], d: usize) -> Vec<f32> {
    let tokens = rows.len() / d;
    let q = quant::build(spec).unwrap();
    let n = if spec.name == "kivi" && kind == Kind::K {
        quantized_len(spec, kind, tokens, 0)
    } else {
        tokens
    };
    let mut out = rows.to_vec();
    if n > 0 {
        q.fake_quantize(
            &rows[..n * d],
            TileShape::new(n, d),
            kind,
            bits,
            &mut out[..n * d],
        )
        .unwrap();
    }
    out
}

struct Model {
    shape: CacheShape,
    heads: usize,
    units: Vec<UnitFormat>,
    residual: usize,
}

/// Reference outputs `[layer][heads, tokens, d]` of every query position, in f64, over keys
/// and values rounded to f16.
fn reference(
    m: &Model,
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    tokens: usize,
    params: &AttentionParams,
) -> Vec<Vec<f32>> {
    let d = m.shape.head_dim;
    let rep = m.heads / m.shape.kv_heads;
    let mut outs = Vec::new();
    for layer in 0..m.shape.layers {
        let mut out = vec![0.0f32; m.heads * tokens * d];
        for h in 0..m.shape.kv_heads {
            let ku = &m.units[m.shape.unit_index(layer, h, Kind::K)];
            let vu = &m.units[m.shape.unit_index(layer, h, Kind::V)];
            let kh = &f16_rounded(&k[layer][h * tokens * d..(h + 1) * tokens * d]);
            let vh = &f16_rounded(&v[layer][h * tokens * d..(h + 1) * tokens * d]);
            let kf = fake_quantized(&ku.quantizer, Kind::K, ku.bits, kh, d);
            let vf = fake_quantized(&vu.quantizer, Kind::V, vu.bits, vh, d);
            for p in 0..tokens {
                let kq = quantized_len(&ku.quantizer, Kind::K, p + 1, m.residual);
                let vq = quantized_len(&vu.quantizer, Kind::V, p + 1, m.residual);
                let start = params.window.map_or(0, |w| (p + 1).saturating_sub(w));
                for r in 0..rep {
                    let head = h * rep + r;
                    let qr = &q[layer][(head * tokens + p) * d..(head * tokens + p + 1) * d];
                    let scores: Vec<f64> = (start..=p)
                        .map(|s| {
                            let kr = if s < kq {
                                &kf[s * d..(s + 1) * d]
                            } else {
                                &kh[s * d..(s + 1) * d]
                            };
                            params.scale as f64
                                * qr.iter()
                                    .zip(kr)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        let mut acc = 0.0f64;
                        for (j, s) in (start..=p).enumerate() {
                            let vr = if s < vq {
                                &vf[s * d..(s + 1) * d]
                            } else {
                                &vh[s * d..(s + 1) * d]
                            };
                            acc += e[j] * vr[c] as f64;
                        }
                        out[(head * tokens + p) * d + c] = (acc / sum) as f32;
                    }
                }
            }
        }
        outs.push(out);
    }
    outs
}

/// Runs the cache over the whole sequence in blocks of the given sizes (cycled), returning
/// `[layer][heads, tokens, d]`.
#[allow(clippy::too_many_arguments)]
fn run_cache(
    m: &Model,
    isa: Isa,
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    tokens: usize,
    blocks: &[usize],
    params: &AttentionParams,
) -> Vec<Vec<f32>> {
    let kernel = AttentionKernel::Float;
    run_cache_with(m, kernel, isa, q, k, v, tokens, blocks, params)
}

#[allow(clippy::too_many_arguments)]
fn run_cache_with(
    m: &Model,
    kernel: AttentionKernel,
    isa: Isa,
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    tokens: usize,
    blocks: &[usize],
    params: &AttentionParams,
) -> Vec<Vec<f32>> {
    run_cache_on(m, kernel, isa, None, q, k, v, tokens, blocks, params)
}

/// [`run_cache_with`], the integer kernels on `int8` where given.
#[allow(clippy::too_many_arguments)]
fn run_cache_on(
    m: &Model,
    kernel: AttentionKernel,
    isa: Isa,
    int8: Option<Kernels>,
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    tokens: usize,
    blocks: &[usize],
    params: &AttentionParams,
) -> Vec<Vec<f32>> {
    let d = m.shape.head_dim;
    let mut cache = PackedKvCache::with_kernel(m.shape, &m.units, m.residual, kernel).unwrap();
    cache.set_isa(isa).unwrap();
    if let Some(kernels) = int8 {
        cache.set_int8_kernels(kernels).unwrap();
        assert_eq!(cache.kernel_isa(), kernels.name());
    }
    let mut outs = vec![vec![0.0f32; m.heads * tokens * d]; m.shape.layers];
    let mut at = 0;
    let mut bi = 0;
    while at < tokens {
        let n = blocks[bi % blocks.len()].min(tokens - at);
        bi += 1;
        for layer in 0..m.shape.layers {
            let slice = |x: &[f32], heads: usize| -> Vec<f32> {
                (0..heads)
                    .flat_map(|h| x[(h * tokens + at) * d..(h * tokens + at + n) * d].to_vec())
                    .collect()
            };
            let qb = slice(&q[layer], m.heads);
            let kb = slice(&k[layer], m.shape.kv_heads);
            let vb = slice(&v[layer], m.shape.kv_heads);
            let o = cache
                .attend(layer, &qb, m.heads, &kb, &vb, n, params)
                .unwrap();
            for h in 0..m.heads {
                outs[layer][(h * tokens + at) * d..(h * tokens + at + n) * d]
                    .copy_from_slice(&o[h * n * d..(h + 1) * n * d]);
            }
        }
        at += n;
    }
    assert_eq!(cache.len(0), tokens);
    outs
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Per layer: queries, keys, values.
type Qkv = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>);

fn data(m: &Model, tokens: usize, seed: u64) -> Qkv {
    let mut rng = Rng(seed);
    let d = m.shape.head_dim;
    let q = (0..m.shape.layers)
        .map(|_| activations(&mut rng, m.heads, tokens, d))
        .collect();
    let k = (0..m.shape.layers)
        .map(|_| activations(&mut rng, m.shape.kv_heads, tokens, d))
        .collect();
    let v = (0..m.shape.layers)
        .map(|_| activations(&mut rng, m.shape.kv_heads, tokens, d))
        .collect();
    (q, k, v)
}

/// Float-rounding tolerance: the kernels sum `(q·s)·code + q·z` in another order than the
/// reference's `q·(z + s·code)`, and low-bit scales make those terms large, so it scales with
/// the outputs' magnitude.
fn tol(want: &[Vec<f32>]) -> f32 {
    5e-5 * (1.0 + want.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs())))
}

fn params(d: usize) -> AttentionParams {
    AttentionParams {
        scale: 1.0 / (d as f32).sqrt(),
        window: None,
    }
}

#[test]
fn every_design_and_bit_width_matches_fake_quantized_attention() {
    for design in ["kivi", "kivi:g=16", "quarot", "rtn-token", "rtn-token:g=16"] {
        for bits in 1..=8u8 {
            let shape = CacheShape {
                layers: 1,
                kv_heads: 2,
                head_dim: 64,
            };
            let m = Model {
                shape,
                heads: 6,
                units: vec![
                    UnitFormat {
                        quantizer: spec(design),
                        bits
                    };
                    shape.units()
                ],
                residual: 12,
            };
            let tokens = 77;
            let (q, k, v) = data(&m, tokens, 11 + bits as u64);
            let p = params(64);
            let want = reference(&m, &q, &k, &v, tokens, &p);
            let got = run_cache(&m, Isa::detect(), &q, &k, &v, tokens, &[1], &p);
            let diff = max_abs_diff(&want, &got);
            assert!(
                diff < tol(&want),
                "{design} at {bits} bits: max |packed − reference| = {diff}"
            );
        }
    }
}

#[test]
fn quantization_is_visible_so_the_comparison_can_fail() {
    // At 1 bit the quantized reference must differ clearly from full precision; otherwise
    // the agreement test above would pass for a cache that never quantized.
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 64,
    };
    let m = Model {
        shape,
        heads: 2,
        units: vec![
            UnitFormat {
                quantizer: spec("kivi"),
                bits: 1
            };
            2
        ],
        residual: 0,
    };
    let tokens = 70;
    let (q, k, v) = data(&m, tokens, 3);
    let p = params(64);
    let quantized = reference(&m, &q, &k, &v, tokens, &p);
    let m8 = Model {
        units: vec![
            UnitFormat {
                quantizer: spec("kivi"),
                bits: 8
            };
            2
        ],
        ..m
    };
    let fine = reference(&m8, &q, &k, &v, tokens, &p);
    assert!(max_abs_diff(&quantized, &fine) > 100.0 * tol(&fine));
}

fn mixed_units(shape: CacheShape) -> Vec<UnitFormat> {
    let designs = ["kivi", "quarot", "rtn-token", "kivi:g=16"];
    (0..shape.units())
        .map(|i| UnitFormat {
            quantizer: spec(designs[(i / 3) % designs.len()]),
            bits: (i * 5 % 8) as u8 + 1,
        })
        .collect()
}

#[test]
fn mixed_bits_and_designs_across_units_with_gqa() {
    let shape = CacheShape {
        layers: 3,
        kv_heads: 3,
        head_dim: 32,
    };
    let m = Model {
        shape,
        heads: 9,
        units: mixed_units(shape),
        residual: 5,
    };
    let tokens = 53;
    let (q, k, v) = data(&m, tokens, 99);
    let p = params(32);
    let want = reference(&m, &q, &k, &v, tokens, &p);
    let got = run_cache(&m, Isa::detect(), &q, &k, &v, tokens, &[1], &p);
    assert!(max_abs_diff(&want, &got) < tol(&want));
}

#[test]
fn prefill_blocks_equal_token_by_token_and_the_reference() {
    let shape = CacheShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 64,
    };
    for residual in [0, 1, 16, 200] {
        let m = Model {
            shape,
            heads: 4,
            units: mixed_units(shape),
            residual,
        };
        let tokens = 131;
        let (q, k, v) = data(&m, tokens, 5 + residual as u64);
        let p = params(64);
        let want = reference(&m, &q, &k, &v, tokens, &p);
        let single = run_cache(&m, Isa::detect(), &q, &k, &v, tokens, &[1], &p);
        let blocks = run_cache(
            &m,
            Isa::detect(),
            &q,
            &k,
            &v,
            tokens,
            &[7, 33, 2, 50, 1],
            &p,
        );
        let whole = run_cache(&m, Isa::detect(), &q, &k, &v, tokens, &[tokens], &p);
        assert!(
            max_abs_diff(&single, &blocks) < tol(&want),
            "residual {residual}: blocks differ from token by token"
        );
        assert!(
            max_abs_diff(&single, &whole) < tol(&want),
            "residual {residual}: one block differs from token by token"
        );
        assert!(
            max_abs_diff(&want, &blocks) < tol(&want),
            "residual {residual}: blocks differ from the reference"
        );
    }
}

#[test]
fn long_context_spans_several_attention_tasks() {
    // More than one 1024-token task per query, merged by the blockwise softmax.
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 64,
    };
    let units = vec![
        UnitFormat {
            quantizer: spec("kivi"),
            bits: 2,
        },
        UnitFormat {
            quantizer: spec("quarot"),
            bits: 3,
        },
    ];
    let m = Model {
        shape,
        heads: 3,
        units,
        residual: 128,
    };
    let tokens = 2600;
    let (q, k, v) = data(&m, tokens, 1);
    let p = params(64);
    let want = reference(&m, &q, &k, &v, tokens, &p);
    let got = run_cache(
        &m,
        Isa::detect(),
        &q,
        &k,
        &v,
        tokens,
        &[1000, 1, 599, 1000],
        &p,
    );
    assert!(max_abs_diff(&want, &got) < tol(&want));
}

#[test]
fn sliding_window_matches_reference() {
    let shape = CacheShape {
        layers: 1,
        kv_heads: 2,
        head_dim: 64,
    };
    let m = Model {
        shape,
        heads: 4,
        units: mixed_units(shape),
        residual: 8,
    };
    let tokens = 90;
    let (q, k, v) = data(&m, tokens, 8);
    let p = AttentionParams {
        scale: 0.125,
        window: Some(20),
    };
    let want = reference(&m, &q, &k, &v, tokens, &p);
    let got = run_cache(&m, Isa::detect(), &q, &k, &v, tokens, &[1, 13], &p);
    assert!(max_abs_diff(&want, &got) < tol(&want));
}

#[test]
fn every_instruction_set_matches_scalar() {
    // Odd head_dim exercises partial SIMD chunks; group 24 is not 8-aligned for per-token
    // values and falls back to the scalar value kernel.
    for (d, designs) in [
        (64, ["kivi", "quarot", "rtn-token:g=16"]),
        (40, ["kivi:g=20", "rtn-token", "rtn-token:g=24"]),
    ] {
        let shape = CacheShape {
            layers: 1,
            kv_heads: 2,
            head_dim: d,
        };
        for bits in 1..=8u8 {
            let units: Vec<UnitFormat> = (0..shape.units())
                .map(|i| UnitFormat {
                    quantizer: spec(designs[i % 3]),
                    bits,
                })
                .collect();
            let m = Model {
                shape,
                heads: 2 * 9,
                units,
                residual: 3,
            };
            let tokens = 70;
            let (q, k, v) = data(&m, tokens, 21 + bits as u64);
            let p = params(d);
            let scalar = run_cache(&m, Isa::Scalar, &q, &k, &v, tokens, &[1, 30], &p);
            let want = reference(&m, &q, &k, &v, tokens, &p);
            for isa in Isa::available() {
                let got = run_cache(&m, isa, &q, &k, &v, tokens, &[1, 30], &p);
                let diff = max_abs_diff(&scalar, &got);
                assert!(
                    diff < tol(&want),
                    "head_dim {d}, {bits} bits, {}: max |simd − scalar| = {diff}",
                    isa.name()
                );
            }
            let diff = max_abs_diff(&want, &scalar);
            assert!(
                diff < tol(&want),
                "head_dim {d}, {bits} bits: max |scalar − reference| = {diff}"
            );
        }
    }
}

#[test]
fn attend_last_equals_the_decode_step() {
    let shape = CacheShape {
        layers: 1,
        kv_heads: 3,
        head_dim: 64,
    };
    let units = vec![
        UnitFormat {
            quantizer: spec("kivi"),
            bits: 2
        };
        shape.units()
    ];
    let mut cache = PackedKvCache::new(shape, &units, 32).unwrap();
    let mut rng = Rng(4);
    let tokens = 300;
    let k = activations(&mut rng, 3, tokens, 64);
    let v = activations(&mut rng, 3, tokens, 64);
    cache.append(0, &k, &v, tokens).unwrap();
    let q = activations(&mut rng, 9, 1, 64);
    let k1 = activations(&mut rng, 3, 1, 64);
    let v1 = activations(&mut rng, 3, 1, 64);
    let p = params(64);
    let decoded = cache.attend(0, &q, 9, &k1, &v1, 1, &p).unwrap();
    let again = cache.attend_last(0, &q, 9, &p).unwrap();
    assert_eq!(decoded, again);
}

/// Root mean square of `a − b` over every output.
fn rms_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        sum += ((x - y) as f64).powi(2);
        n += 1;
    }
    (sum / n as f64).sqrt()
}

/// Attention over the unquantized (f16-rounded) keys and values: per-token units whose
/// residual window holds every token.
fn unquantized(
    m: &Model,
    q: &[Vec<f32>],
    k: &[Vec<f32>],
    v: &[Vec<f32>],
    tokens: usize,
    p: &AttentionParams,
) -> Vec<Vec<f32>> {
    let unit = UnitFormat {
        quantizer: spec("rtn-token"),
        bits: 8,
    };
    let fp = Model {
        shape: m.shape,
        heads: m.heads,
        units: vec![unit; m.units.len()],
        residual: tokens,
    };
    reference(&fp, q, k, v, tokens, p)
}

#[test]
fn int8_kernels_add_a_small_fraction_of_the_quantization_error() {
    // The integer kernels round the query (per key block) and the probabilities (per value
    // tile) to 8 bits; that error must stay well below what quantizing the cache costs.
    let shape = CacheShape {
        layers: 1,
        kv_heads: 2,
        head_dim: 64,
    };
    // Below 4 bits one i8 per weight (measured: 6–15% of the quantization error); from 4 bits
    // two (hi + lo/254, measured: 0.1%).
    for (designs, bits, ratio) in [
        (["kivi", "kivi"], 2u8, 0.2),
        (["kivi", "quarot"], 3, 0.2),
        (["quarot", "rtn-token"], 2, 0.2),
        (["kivi:g=128", "rtn-token:g=32"], 4, 0.01),
        (["kivi", "quarot"], 6, 0.01),
    ] {
        let units: Vec<UnitFormat> = (0..shape.units())
            .map(|i| UnitFormat {
                quantizer: spec(designs[(i / 2) % 2]),
                bits,
            })
            .collect();
        let m = Model {
            shape,
            heads: 6,
            units,
            residual: 16,
        };
        let tokens = 300;
        let (q, k, v) = data(&m, tokens, 5 + bits as u64);
        let p = params(64);
        let want = reference(&m, &q, &k, &v, tokens, &p);
        let exact = unquantized(&m, &q, &k, &v, tokens, &p);
        let got = run_cache_with(
            &m,
            AttentionKernel::Int8,
            Isa::detect(),
            &q,
            &k,
            &v,
            tokens,
            &[1, 77],
            &p,
        );
        let quant_err = rms_diff(&want, &exact);
        let int8_err = rms_diff(&got, &want);
        eprintln!("{designs:?} {bits} bits: quantization rms {quant_err:.5}, int8 rounding rms {int8_err:.6}");
        assert!(quant_err > 1e-3, "quantization must be visible");
        assert!(
            int8_err < ratio * quant_err,
            "{designs:?} {bits} bits: int8 rounding rms {int8_err} ≥ {ratio} × quantization rms {quant_err}"
        );
        // Rounding does happen: the integer path is not the float path in disguise.
        assert!(int8_err > 1e-7);
    }
}

#[test]
fn int8_simd_kernels_agree_with_the_scalar_integer_kernels() {
    // Every implementation sums the same integers exactly and rounds the same weights (unit
    // tests in `int8`); the weight builders of each ISA add the zero-point terms in their own
    // order, so caches whose builders differ agree to float rounding, and those that share
    // them (AVX2 with and without AVX-VNNI) bit for bit. Isa::Scalar (scalar glue too) also
    // differs only in float rounding.
    if !Isa::Avx2.is_available() {
        eprintln!("skipped: needs AVX2");
        return;
    }
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 64,
    };
    for bits in 1..=8u8 {
        let units = vec![
            UnitFormat {
                quantizer: spec(if bits % 2 == 0 { "kivi" } else { "quarot" }),
                bits,
            },
            UnitFormat {
                quantizer: spec("kivi"),
                bits: 9 - bits,
            },
        ];
        let m = Model {
            shape,
            heads: 3,
            units,
            residual: 5,
        };
        let tokens = 200;
        let (q, k, v) = data(&m, tokens, 40 + bits as u64);
        let p = params(64);
        let run = |isa| {
            run_cache_with(
                &m,
                AttentionKernel::Int8,
                isa,
                &q,
                &k,
                &v,
                tokens,
                &[1, 64],
                &p,
            )
        };
        let run_on = |isa, kernels| {
            run_cache_on(
                &m,
                AttentionKernel::Int8,
                isa,
                Some(kernels),
                &q,
                &k,
                &v,
                tokens,
                &[1, 64],
                &p,
            )
        };
        let reference_kernels = run_on(Isa::Avx2, Kernels::Scalar);
        let mut simd = Vec::new();
        for kernels in [Kernels::Avx2, Kernels::AvxVnni] {
            if kernels.is_available() {
                simd.push((kernels, run_on(Isa::Avx2, kernels)));
            }
        }
        if Kernels::Avx512Vnni.is_available() {
            simd.push((Kernels::Avx512Vnni, run(Isa::Avx512)));
        }
        assert!(!simd.is_empty());
        let size = reference_kernels
            .iter()
            .flatten()
            .fold(0.0f32, |m, x| m.max(x.abs()));
        for (kernels, out) in &simd {
            let diff = max_abs_diff(&reference_kernels, out);
            assert!(
                diff <= 1e-5 * (1.0 + size),
                "{kernels:?}, {bits} bits: {diff} from the scalar kernels"
            );
        }
        if let [(Kernels::Avx2, a), (Kernels::AvxVnni, b), ..] = &simd[..] {
            assert_eq!(max_abs_diff(a, b), 0.0, "AVX2 and AVX-VNNI, {bits} bits");
        }
        let vnni = &simd.last().unwrap().1;
        let scalar = run(Isa::Scalar);
        let want = reference(&m, &q, &k, &v, tokens, &p);
        assert!(
            rms_diff(&scalar, vnni) < 0.1 * rms_diff(vnni, &want) + 1e-6,
            "{bits} bits"
        );
    }
}

#[test]
fn int8_kernel_refuses_layouts_it_cannot_tile() {
    let units = |d: &str| {
        vec![
            UnitFormat {
                quantizer: spec(d),
                bits: 2
            };
            2
        ]
    };
    let shape = |head_dim| CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim,
    };
    for (head_dim, design, want) in [
        (40, "kivi", "head_dim a multiple of 32"),
        (64, "kivi:g=20", "multiple of 16 tokens"),
        (64, "rtn-token:g=16", "multiple of 32 channels"),
    ] {
        let err =
            PackedKvCache::with_kernel(shape(head_dim), &units(design), 8, AttentionKernel::Int8)
                .err()
                .unwrap_or_else(|| panic!("{design} at head_dim {head_dim} accepted"))
                .to_string();
        assert!(
            err.contains(want) && err.contains("layer 0 head 0"),
            "{err}"
        );
        // The float kernels take every one of these.
        PackedKvCache::with_kernel(shape(head_dim), &units(design), 8, AttentionKernel::Float)
            .unwrap();
    }
}

#[test]
fn int8_kernels_follow_the_isa_and_refuse_what_it_cannot_run() {
    let shape = CacheShape {
        layers: 1,
        kv_heads: 1,
        head_dim: 64,
    };
    let units = vec![
        UnitFormat {
            quantizer: spec("kivi"),
            bits: 2
        };
        2
    ];
    let mut cache = PackedKvCache::with_kernel(shape, &units, 8, AttentionKernel::Int8).unwrap();
    // The scalar ISA runs only the scalar definition, and says so when asked for more.
    cache.set_isa(Isa::Scalar).unwrap();
    assert_eq!(cache.int8_kernels(), Kernels::Scalar);
    assert_eq!(cache.kernel_isa(), "scalar");
    let err = cache
        .set_int8_kernels(Kernels::Avx2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("avx2") && err.contains("scalar"), "{err}");
    if Isa::Avx2.is_available() && Kernels::Avx2.is_available() {
        // AVX2 picks an AVX2 level and refuses the AVX-512 kernels (their glue needs AVX-512).
        cache.set_isa(Isa::Avx2).unwrap();
        assert!(matches!(
            cache.int8_kernels(),
            Kernels::Avx2 | Kernels::AvxVnni
        ));
        let err = cache
            .set_int8_kernels(Kernels::Avx512Vnni)
            .unwrap_err()
            .to_string();
        assert!(err.contains("avx512-vnni") && err.contains("avx2"), "{err}");
        cache.set_int8_kernels(Kernels::Avx2).unwrap();
        assert_eq!(cache.kernel_isa(), "avx2");
        cache.set_int8_kernels(Kernels::Scalar).unwrap();
        assert_eq!(cache.kernel_isa(), "scalar");
    }
}

#[test]
fn int8_long_context_tasks_cover_every_position() {
    // From 8192 positions on, the integer kernels cut a query's positions into 2048-token
    // tasks. Eight "needles" (key channel 0 at 1, every other key at 0 there; needle j's value
    // row 8 in channel 8j and 0 elsewhere, every other value 0; both exact at 2 bits) lie on
    // and around task boundaries, inside key blocks and in the residual. The query sees each
    // needle at a score 20 above the rest, so each needle it covers puts 8/n in its own channel
    // (n needles covered), and one it misses leaves 0 there.
    let shape = CacheShape {
        layers: 1,
        kv_heads: 2,
        head_dim: 64,
    };
    let (heads, d, tokens) = (6, 64, 9000);
    let needles = [0, 2047, 2048, 4000, 6143, 6200, 8191, 8900];
    let units = vec![
        UnitFormat {
            quantizer: spec("kivi"),
            bits: 2
        };
        shape.units()
    ];
    let mut rng = Rng(11);
    let mut k = vec![0.0f32; 2 * tokens * d];
    let mut v = vec![0.0f32; 2 * tokens * d];
    for h in 0..2 {
        for t in 0..tokens {
            let row = (h * tokens + t) * d;
            for c in 1..d {
                k[row + c] = rng.normal();
            }
            if let Some(j) = needles.iter().position(|&n| n == t) {
                k[row] = 1.0;
                v[row + 8 * j] = 8.0;
            }
        }
    }
    // Score = 20 · k₀ after the 1/√d scale.
    let mut q = vec![0.0f32; heads * d];
    for h in 0..heads {
        q[h * d] = 20.0 * (d as f32).sqrt();
    }
    let mut int8 = PackedKvCache::with_kernel(shape, &units, 128, AttentionKernel::Int8).unwrap();
    int8.append(0, &k, &v, tokens).unwrap();
    for window in [None, Some(8500), Some(8192)] {
        let p = AttentionParams {
            scale: 1.0 / (d as f32).sqrt(),
            window,
        };
        let start = window.map_or(0, |w| tokens - w);
        let n = needles.iter().filter(|&&t| t >= start).count() as f32;
        let mut want = vec![0.0f32; d];
        for (j, _) in needles.iter().enumerate().filter(|(_, &t)| t >= start) {
            want[8 * j] = 8.0 / n;
        }
        let got = int8.attend_last(0, &q, heads, &p).unwrap();
        for (h, out) in got.chunks(d).enumerate() {
            for (c, (&x, &y)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (x - y).abs() < 0.02,
                    "window {window:?}, head {h}, channel {c}: {x}, want {y}"
                );
            }
        }
    }
}

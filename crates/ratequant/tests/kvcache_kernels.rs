//! The SIMD kernels against the scalar reference on random codes: every bit-width, odd token
//! and channel ranges, 1..=11 query rows (more than one pass of eight).

use ratequant::kvcache::attention::{self, Isa, CODE_PADDING};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn close(a: &[f32], b: &[f32], what: &str) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn key_scores_simd_equals_scalar() {
    let mut rng = Rng(7);
    for bits in 1..=8u8 {
        for (block_tokens, d) in [(32usize, 64usize), (20, 40), (16, 7), (128, 64)] {
            let slot_bytes = (block_tokens * bits as usize).div_ceil(8);
            let mut codes: Vec<u8> = (0..d * slot_bytes).map(|_| rng.next() as u8).collect();
            codes.extend([0u8; CODE_PADDING]);
            for rows in [1usize, 3, 7, 8, 11] {
                let weights: Vec<f32> = (0..rows * d).map(|_| rng.f()).collect();
                for (tokens, channels) in [
                    (0..block_tokens, 0..d),
                    (3..block_tokens - 1, 1..d),
                    (5..6, d / 2..d),
                ] {
                    let n = tokens.len();
                    let mut want = vec![0.0f32; rows * n];
                    attention::key_scores(
                        Isa::Scalar,
                        &codes,
                        slot_bytes,
                        bits,
                        channels.clone(),
                        tokens.clone(),
                        &weights,
                        d,
                        rows,
                        &mut want,
                        n,
                    );
                    // The scalar kernel is itself checked against a direct bit read.
                    let t = tokens.start;
                    let direct: f32 = channels
                        .clone()
                        .map(|c| {
                            let bit = c * slot_bytes * 8 + t * bits as usize;
                            let word = codes[bit / 8] as u32 | (codes[bit / 8 + 1] as u32) << 8;
                            weights[c] * ((word >> (bit % 8)) & ((1 << bits) - 1)) as f32
                        })
                        .sum();
                    assert!((direct - want[0]).abs() <= 1e-4 * (1.0 + direct.abs()));
                    for isa in Isa::available() {
                        let mut got = vec![0.0f32; rows * n];
                        attention::key_scores(
                            isa,
                            &codes,
                            slot_bytes,
                            bits,
                            channels.clone(),
                            tokens.clone(),
                            &weights,
                            d,
                            rows,
                            &mut got,
                            n,
                        );
                        close(
                            &want,
                            &got,
                            &format!(
                                "key_scores {} bits {bits} rows {rows} tokens {tokens:?}",
                                isa.name()
                            ),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn value_accumulate_simd_equals_scalar() {
    let mut rng = Rng(9);
    for bits in 1..=8u8 {
        for d in [64usize, 40, 13, 128] {
            let row_bytes = (d * bits as usize).div_ceil(8);
            for tokens in [1usize, 17, 64] {
                let mut codes: Vec<u8> =
                    (0..tokens * row_bytes).map(|_| rng.next() as u8).collect();
                codes.extend([0u8; CODE_PADDING]);
                for rows in [1usize, 3, 9] {
                    let weights: Vec<f32> = (0..rows * tokens).map(|_| rng.f()).collect();
                    for channels in [0..d, 8..d, 3..d.min(20)] {
                        let init: Vec<f32> = (0..rows * d).map(|_| rng.f()).collect();
                        let mut want = init.clone();
                        attention::value_accumulate(
                            Isa::Scalar,
                            &codes,
                            row_bytes,
                            bits,
                            tokens,
                            channels.clone(),
                            &weights,
                            tokens,
                            rows,
                            &mut want,
                            d,
                        );
                        for isa in Isa::available() {
                            let mut got = init.clone();
                            attention::value_accumulate(
                                isa,
                                &codes,
                                row_bytes,
                                bits,
                                tokens,
                                channels.clone(),
                                &weights,
                                tokens,
                                rows,
                                &mut got,
                                d,
                            );
                            close(&want, &got, &format!("value_accumulate {} bits {bits} d {d} rows {rows} channels {channels:?}", isa.name()));
                            // Channels outside the range are untouched.
                            for r in 0..rows {
                                for c in (0..d).filter(|c| !channels.contains(c)) {
                                    assert_eq!(got[r * d + c], init[r * d + c]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn exp_is_accurate() {
    let mut x = -87.0f32;
    while x < 0.0 {
        let want = (x as f64).exp();
        let got = attention::exp_f32(x) as f64;
        assert!(
            (got - want).abs() <= 4e-7 * want,
            "exp({x}) = {got}, want {want}"
        );
        x += 0.0137;
    }
    assert_eq!(attention::exp_f32(0.0), 1.0);
    assert!(attention::exp_f32(-1000.0) < 1e-37);
}

#[test]
fn softmax_block_simd_equals_scalar_bit_for_bit() {
    let mut rng = Rng(11);
    for len in (0..40).chain([255, 1024]) {
        for spread in [0.1f32, 10.0, 300.0] {
            let scores: Vec<f32> = (0..len).map(|_| rng.f() * spread).collect();
            let mut want = scores.clone();
            let (want_max, want_sum) = attention::softmax_block(Isa::Scalar, &mut want);
            if len > 0 {
                // The reference itself: exp(x − max), summed.
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                assert_eq!(want_max, max);
                let sum: f64 = scores.iter().map(|&x| ((x - max) as f64).exp()).sum();
                assert!(
                    (want_sum as f64 - sum).abs() <= 1e-5 * sum,
                    "len {len}: sum {want_sum} vs {sum}"
                );
            }
            for isa in Isa::available() {
                let mut got = scores.clone();
                let (max, sum) = attention::softmax_block(isa, &mut got);
                let what = format!("softmax {} len {len} spread {spread}", isa.name());
                assert_eq!(max.to_bits(), want_max.to_bits(), "{what}: max");
                assert_eq!(sum.to_bits(), want_sum.to_bits(), "{what}: sum");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}");
                }
            }
        }
    }
}

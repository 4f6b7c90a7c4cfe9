//! The integer attention kernels one at a time, on one thread, over one task of the packed
//! cache's decode step (2048 tokens of one KV head, 3 query rows, head_dim 64: SmolLM2's
//! geometry at 16K tokens, KIVI G = 32), with everything they read in L1/L2.
//!
//! The attention bench times whole steps, where memory stalls and the two threads' ends mix
//! with the kernels' own cost; here each kernel's compute is measured alone, the number to
//! compare with what its instructions need from the ports. Codes, scales and zero-points
//! start on a 64-byte boundary, as in the cache.
//!
//! Printed per kernel: the fastest and the median of 1000 samples of 10 calls each, the
//! kernels sampled in turn so that each sees the whole run. On the shared VMs measured here
//! the machine slows down by a third for seconds at a time; the fastest sample, a call that
//! nothing slowed down, is the number to compare between builds (not criterion: its
//! estimates are means, which those spells move).
//! `cargo bench -p ratequant --bench int8_kernels [-- FILTER]`.
//!
//! Kernels: key scores (per-channel keys, fused float step) and value accumulation (two
//! channel groups) at 2, 3 and 4 bits; the key block weights; the value weights with the
//! softmax's `exp` fused (the step's path for units under 4 bits), from probabilities, and
//! split in two `i8` (units of 4 bits and more).

use std::hint::black_box;
use std::time::Instant;

use half::f16;

use ratequant::kvcache::attention::int8::{self, Kernels, KeyScoreScales, KeyWeights};
use ratequant::kvcache::Isa;

const D: usize = 64;
const ROWS: usize = 3;
const TOKENS: usize = 2048;
const KEY_GROUP: usize = 32;
const VALUE_GROUP: usize = 32;
const GROUPS: usize = D / VALUE_GROUP;
const KEY_TILES: usize = TOKENS / int8::KEY_TILE_TOKENS;
const VALUE_TILES: usize = TOKENS / int8::VALUE_TILE_TOKENS;
const BLOCKS: usize = TOKENS / KEY_GROUP;

/// A fixed pseudo-random sequence (the kernels' speed does not depend on the values, but the
/// weights must not all round to zero).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// In `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next() >> 7) as f32 / (1u32 << 24) as f32
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn f16s(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f16> {
        (0..n)
            .map(|_| f16::from_f32(lo + (hi - lo) * self.unit()))
            .collect()
    }
}

type Kernel = Box<dyn FnMut()>;

/// A copy of `v` on a 64-byte boundary, where the packed cache keeps its codes, scales and
/// zero-points (`kvcache::aligned`; from a plain `Vec` the kernels' line loads straddle two
/// cache lines and run 1–8% slower).
struct Aligned<T> {
    buf: Vec<T>,
    at: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    fn new(v: &[T]) -> Aligned<T> {
        let size = std::mem::size_of::<T>();
        let mut buf = vec![T::default(); v.len() + 64 / size];
        let at = buf.as_ptr().align_offset(64);
        buf[at..at + v.len()].copy_from_slice(v);
        Aligned {
            buf,
            at,
            len: v.len(),
        }
    }

    fn get(&self) -> &[T] {
        &self.buf[self.at..self.at + self.len]
    }
}

fn key_scores(kernels: Kernels, bits: u8, rng: &mut Lcg) -> Kernel {
    let split = bits >= 4;
    let q_rows = if split { 2 * ROWS } else { ROWS };
    let codes = Aligned::new(&rng.bytes(KEY_TILES * int8::key_tile_bytes(D, bits)));
    let w8: Vec<i8> = rng
        .bytes(BLOCKS * q_rows * D)
        .into_iter()
        .map(|b| b as i8)
        .collect();
    let sigma: Vec<f32> = (0..BLOCKS * ROWS).map(|_| 0.01 * rng.unit()).collect();
    let bias: Vec<f32> = (0..BLOCKS * ROWS).map(|_| rng.unit()).collect();
    let (mut scores, mut max, mut sums) = (vec![0f32; ROWS * TOKENS], [0f32; ROWS], vec![]);
    Box::new(move || {
        let weights = KeyWeights {
            q: &w8,
            stride: D,
            rows: q_rows,
            block_tiles: KEY_GROUP / int8::KEY_TILE_TOKENS,
            block_stride: q_rows * D,
        };
        let scales = KeyScoreScales {
            sigma: &sigma,
            bias: &bias,
            rows: ROWS,
            lo_scale: split.then_some(1.0 / 254.0),
        };
        int8::key_scores(
            kernels,
            black_box(codes.get()),
            KEY_TILES,
            D,
            bits,
            weights,
            scales,
            &mut scores,
            TOKENS,
            &mut max,
            &mut sums,
        )
    })
}

fn value_accumulate(kernels: Kernels, bits: u8, rng: &mut Lcg) -> Kernel {
    let codes = Aligned::new(&rng.bytes(VALUE_TILES * int8::value_tile_bytes(D, bits)));
    let w: Vec<i8> = rng
        .bytes(GROUPS * ROWS * TOKENS)
        .into_iter()
        .map(|b| (b >> 1) as i8)
        .collect();
    let scales: Vec<f32> = (0..GROUPS * ROWS * VALUE_TILES)
        .map(|_| 0.01 * rng.unit())
        .collect();
    let mut acc = vec![0f32; ROWS * D];
    Box::new(move || {
        int8::value_accumulate_groups(
            kernels,
            black_box(codes.get()),
            VALUE_TILES,
            D,
            bits,
            VALUE_GROUP,
            &w,
            TOKENS,
            ROWS * TOKENS,
            &scales,
            VALUE_TILES,
            ROWS * VALUE_TILES,
            ROWS,
            &mut acc,
            D,
        )
    })
}

fn key_block_weights(kernels: Kernels, split: bool, rng: &mut Lcg) -> Kernel {
    let q: Vec<f32> = (0..ROWS * D).map(|_| 2.0 * rng.unit() - 1.0).collect();
    let s = Aligned::new(&rng.f16s(BLOCKS * D, 0.05, 0.15));
    let z = Aligned::new(&rng.f16s(BLOCKS * D, -0.4, -0.1));
    let mut w8 = vec![0i8; BLOCKS * 2 * ROWS * D];
    let (mut sigma, mut bias) = (vec![0f32; BLOCKS * ROWS], vec![0f32; BLOCKS * ROWS]);
    Box::new(move || {
        int8::key_block_weights(
            kernels,
            black_box(&q),
            ROWS,
            s.get(),
            z.get(),
            BLOCKS,
            split,
            &mut w8,
            &mut sigma,
            &mut bias,
        )
    })
}

/// How [`value_weights`] gets its probabilities.
#[derive(Clone, Copy, PartialEq)]
enum Probabilities {
    /// Scores, with the softmax's `exp` fused.
    FromScores,
    Given,
    /// Given, each weight split in two `i8` (one channel group).
    Split,
}

fn value_weights(kernels: Kernels, how: Probabilities, rng: &mut Lcg) -> Kernel {
    let scores: Vec<f32> = (0..ROWS * TOKENS).map(|_| -10.0 * rng.unit()).collect();
    let probs: Vec<f32> = scores.iter().map(|x| x.exp()).collect();
    let s: Vec<Aligned<f16>> = (0..GROUPS)
        .map(|_| Aligned::new(&rng.f16s(TOKENS, 0.05, 0.15)))
        .collect();
    let z: Vec<Aligned<f16>> = (0..GROUPS)
        .map(|_| Aligned::new(&rng.f16s(TOKENS, -0.3, -0.1)))
        .collect();
    let mut hi = vec![0i8; 2 * GROUPS * ROWS * TOKENS];
    let mut sigma = vec![0f32; 2 * GROUPS * ROWS * VALUE_TILES];
    let mut zero = vec![0f32; 2 * GROUPS * ROWS];
    let (row_max, mut row_sums) = ([0f32; ROWS], [0f32; ROWS]);
    Box::new(move || {
        // Borrowed on the stack: an allocation here would be timed with the kernel.
        let s: [&[f16]; GROUPS] = std::array::from_fn(|g| s[g].get());
        let z: [&[f16]; GROUPS] = std::array::from_fn(|g| z[g].get());
        match how {
            Probabilities::Split => {
                let (his, los) = hi.split_at_mut(ROWS * TOKENS);
                int8::value_weights(
                    kernels,
                    black_box(&probs),
                    TOKENS,
                    ROWS,
                    TOKENS,
                    s[0],
                    z[0],
                    0,
                    his,
                    Some(los),
                    &mut sigma,
                    &mut zero,
                )
            }
            _ => {
                let fused = how == Probabilities::FromScores;
                int8::value_weights_groups(
                    kernels,
                    black_box(if fused { &scores } else { &probs }),
                    TOKENS,
                    ROWS,
                    TOKENS,
                    &s,
                    &z,
                    0,
                    &mut hi,
                    &mut sigma,
                    &mut zero,
                    fused.then_some((&row_max[..], &mut row_sums[..])),
                )
            }
        }
    })
}

fn main() {
    // `cargo bench` passes `--bench`; an argument not starting with `-` filters by name.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let kernels = Kernels::best(Isa::detect());
    let mut rng = Lcg(1);
    let mut cases: Vec<(String, Kernel)> = Vec::new();
    for bits in [2u8, 3, 4] {
        let k = key_scores(kernels, bits, &mut rng);
        cases.push((format!("key_scores/{bits}-bit"), k));
        let v = value_accumulate(kernels, bits, &mut rng);
        cases.push((format!("value_accumulate/{bits}-bit"), v));
    }
    for (name, split) in [("single", false), ("split", true)] {
        let k = key_block_weights(kernels, split, &mut rng);
        cases.push((format!("key_block_weights/{name}"), k));
    }
    for (name, how) in [
        ("fused-exp", Probabilities::FromScores),
        ("probabilities", Probabilities::Given),
        ("split", Probabilities::Split),
    ] {
        let k = value_weights(kernels, how, &mut rng);
        cases.push((format!("value_weights/{name}"), k));
    }
    cases.retain(|(name, _)| filter.as_ref().is_none_or(|f| name.contains(f.as_str())));

    const SAMPLES: usize = 1000;
    const CALLS: u32 = 10;
    for (_, f) in &mut cases {
        for _ in 0..100 {
            f();
        }
    }
    let mut ns = vec![Vec::with_capacity(SAMPLES); cases.len()];
    for _ in 0..SAMPLES {
        for ((_, f), times) in cases.iter_mut().zip(&mut ns) {
            let start = Instant::now();
            for _ in 0..CALLS {
                f();
            }
            times.push(start.elapsed().as_nanos() as f64 / CALLS as f64);
        }
    }
    println!(
        "int8 kernels ({}), one thread, one task: {TOKENS} tokens, {ROWS} query rows, head_dim {D}",
        kernels.name()
    );
    println!("{:<30} {:>12} {:>12}", "kernel", "fastest", "median");
    for ((name, _), times) in cases.iter().zip(&mut ns) {
        times.sort_by(f64::total_cmp);
        println!(
            "{name:<30} {:>9.0} ns {:>9.0} ns",
            times[0],
            times[SAMPLES / 2]
        );
    }
}

//! The glue around the integer kernels ([`super::attention::int8`]): the float factors of
//! each sum are rounded to 8 bits with one scale per kernel call, the integer sums scaled
//! back and the zero-points added in f32, exactly as the float path adds them.
//!
//! * Per-channel keys (KIVI): per block of `G` tokens, `w = q ∘ scale` (the block's channel
//!   scales folded into the query, as the float path does) is rounded to `i8` with scale
//!   `σ = max|w|·(1/127)`; `score = σ · Σ_c w8_c · code_c + q · zero`.
//! * Per-token keys (QuaRot, RTN): the query is rounded once per task; per channel group
//!   `score += s_t · σ · Σ_{c∈g} q8_c · code_c + z_t · Σ_{c∈g} q_c`.
//! * Values: per channel group and 32-token tile, `w_t = p_t · s_t` rounded to `i8` (all
//!   weights are non-negative) with the tile's own scale; `Σ_t p_t · z_t` in f32.
//!
//! One `i8` per weight costs about as much accuracy as 2- or 3-bit codes lose anyway (on
//! outlier-heavy synthetic keys the rounding error of the output is about a tenth of the
//! quantization error at 2 bits), but as much as the quantization itself at 4 bits. So units
//! of [`SPLIT_BITS`] bits or more use two `i8` per weight, `x ≈ σ·(hi + lo/254)`: the kernels
//! take the `lo` rows as extra query rows (one unpack serves both), and the rounding error
//! drops 254-fold.

use super::attention::int8;
use super::store::{KeyStore, UnitCore, ValueStore};
use super::timing::{self, Phase};
use super::{to_f32, GlueScratch, QueryPrep};

/// Units of this many bits or more round their weights to two `i8` (`hi + lo/254`).
pub const SPLIT_BITS: u8 = 4;

/// The scale of the `lo` part relative to the `hi` part.
const LO: f32 = 1.0 / 254.0;

/// The first `n` elements of `v`, grown as needed. Not cleared: every caller writes each
/// element it reads.
fn take<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Scores of quantized positions `a..e` into `scores[r·len + pos − a]` (tiled keys). For
/// per-channel keys over whole blocks, returns each row's largest score too (the kernel
/// finds it on the way).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn key_scores<'s, const F16C: bool>(
    kernels: int8::Kernels,
    key: &KeyStore,
    prep: &QueryPrep,
    a: usize,
    e: usize,
    scores: &mut [f32],
    len: usize,
    scratch: &'s mut GlueScratch,
) -> Option<&'s mut [f32]> {
    let core = &key.core;
    let (d, bits, rows) = (core.head_dim, core.bits, prep.rows);
    let g_tokens = key.block_tokens;
    let block_tiles = g_tokens / int8::KEY_TILE_TOKENS;
    let block_bytes = key.block_bytes();
    let blocks = a / g_tokens..e.div_ceil(g_tokens);
    let nb = blocks.len();
    let tiles = nb * block_tiles;
    // Rows `0..rows` hold `hi`, rows `rows..2·rows` `lo` when split.
    let split = bits >= SPLIT_BITS;
    let q_rows = if split { 2 * rows } else { rows };
    let codes = &core.codes[blocks.start * block_bytes..];
    // Integer sums of every token of the blocks, `q_rows × (nb·G)`; positions from `a` on are
    // at `skip + pos − a`.
    let n = nb * g_tokens;
    let skip = a - blocks.start * g_tokens;
    let GlueScratch {
        sums,
        w8,
        sigma,
        bias,
        s,
        z,
        max,
        ..
    } = scratch;
    if core.layout.per_channel {
        // Every block's weights first (one pass over the scales), then one kernel call over
        // all tiles, each block reading its own weights.
        let w8 = take(w8, nb * q_rows * d);
        let sigma = take(sigma, nb * rows);
        let bias = take(bias, nb * rows);
        let span = blocks.start * d..blocks.end * d;
        let clock = timing::start();
        int8::key_block_weights(
            kernels,
            &prep.q_packed,
            rows,
            &core.scales[0][span.clone()],
            &core.zeros[0][span],
            nb,
            split,
            w8,
            sigma,
            bias,
        );
        timing::nested(Phase::KeyWeights, Phase::KeyScores, clock);
        let weights = int8::KeyWeights {
            q: w8,
            stride: d,
            rows: q_rows,
            block_tiles,
            block_stride: q_rows * d,
        };
        if skip == 0 && n == e - a && int8::key_scores_fused(kernels, q_rows) {
            // Whole blocks (every task but one that starts inside a block): the kernel
            // turns the sums into scores while they are in registers. (The other kernels'
            // float step is the loop below, vectorized with the glue.)
            let scales = int8::KeyScoreScales {
                sigma,
                bias,
                rows,
                lo_scale: split.then_some(LO),
            };
            let max = take(max, rows);
            int8::key_scores(
                kernels, codes, tiles, d, bits, weights, scales, scores, len, max, sums,
            );
            return Some(max);
        }
        let sums = take(sums, q_rows * n);
        int8::key_dot(kernels, codes, tiles, d, bits, 0..d, weights, sums, n);
        // Block by block, so each inner loop is one scale and bias over contiguous sums.
        for j in 0..nb {
            let (lo, hi) = (
                (j * g_tokens).max(skip),
                ((j + 1) * g_tokens).min(skip + e - a),
            );
            if lo >= hi {
                continue;
            }
            for r in 0..rows {
                let (sig, b) = (sigma[j * rows + r], bias[j * rows + r]);
                let dst = &mut scores[r * len + lo - skip..r * len + hi - skip];
                let his = &sums[r * n + lo..r * n + hi];
                if split {
                    let los = &sums[(rows + r) * n + lo..(rows + r) * n + hi];
                    for ((x, &h), &l) in dst.iter_mut().zip(his).zip(los) {
                        *x = (h as f32).mul_add(sig, (l as f32).mul_add(sig * LO, b));
                    }
                } else {
                    for (x, &h) in dst.iter_mut().zip(his) {
                        *x = (h as f32).mul_add(sig, b);
                    }
                }
            }
        }
        return None;
    }
    let sums = take(sums, q_rows * n);
    let q8 = take(w8, q_rows * d);
    let sigma = take(sigma, rows);
    for (r, row) in prep.q_packed.chunks_exact(d).enumerate() {
        let (his, los) = q8.split_at_mut(rows * d);
        let lo = split.then(|| &mut los[r * d..(r + 1) * d]);
        sigma[r] = int8::quantize_i8(row, &mut his[r * d..(r + 1) * d], lo);
    }
    let group = core.layout.group;
    let groups = core.layout.channel_groups(d);
    let weights = int8::KeyWeights::shared(q8, d, q_rows);
    for (g, c0) in (0..d).step_by(group).enumerate() {
        let c1 = (c0 + group).min(d);
        int8::key_dot(kernels, codes, tiles, d, bits, c0..c1, weights, sums, n);
        to_f32::<F16C>(&core.scales[g][a..e], s);
        to_f32::<F16C>(&core.zeros[g][a..e], z);
        for r in 0..rows {
            let qsum = prep.q_group_sums[r * groups + g];
            let dst = &mut scores[r * len..r * len + (e - a)];
            let his = &sums[r * n + skip..r * n + skip + (e - a)];
            let sig = sigma[r];
            if split {
                let los = &sums[(rows + r) * n + skip..(rows + r) * n + skip + (e - a)];
                for ((((x, &sc), &zz), &h), &l) in
                    dst.iter_mut().zip(s.iter()).zip(z.iter()).zip(his).zip(los)
                {
                    let dot = (h as f32).mul_add(sig, l as f32 * (sig * LO));
                    *x += sc * dot + zz * qsum;
                }
            } else {
                for (((x, &sc), &zz), &h) in dst.iter_mut().zip(s.iter()).zip(z.iter()).zip(his) {
                    *x += sc * (sig * h as f32) + zz * qsum;
                }
            }
        }
    }
    None
}

/// Whether [`values`] can take scores and their row maxima (`exp`) instead of
/// probabilities, computing the softmax's exponentials as it rounds the weights: single-`i8`
/// weights of up to 4 channel groups, on the AVX-512 kernels (elsewhere it would gain
/// nothing over the softmax's own pass).
pub(super) fn values_fuse_exp(kernels: int8::Kernels, value: &ValueStore, rows: usize) -> bool {
    let core = &value.core;
    kernels == int8::Kernels::Avx512Vnni
        && int8::vnni_available()
        && values_in_one_pass(core)
        && rows * core.layout.channel_groups(core.head_dim) <= 16
}

/// Whether [`values`] rounds every channel group's weights in one pass and accumulates all
/// channels in another: single-`i8` weights of up to 4 channel groups.
fn values_in_one_pass(core: &UnitCore) -> bool {
    core.bits < SPLIT_BITS && core.layout.channel_groups(core.head_dim) <= 4
}

/// Accumulates `Σ_pos p[r][pos]·v[pos]` over quantized positions `a..e` into `acc`
/// (`rows × head_dim`), `p[r][pos] = probs[r·len + pos − a]` (tiled values). With `exp =
/// Some((max, sums))` (only where [`values_fuse_exp`]), `probs` holds scores:
/// `p = exp(score − max[r])`, whose sums are added to `sums[r]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn values<const F16C: bool>(
    kernels: int8::Kernels,
    value: &ValueStore,
    probs: &[f32],
    len: usize,
    a: usize,
    e: usize,
    rows: usize,
    acc: &mut [f32],
    scratch: &mut GlueScratch,
    exp: Option<(&[f32], &mut [f32])>,
) {
    const T: usize = int8::VALUE_TILE_TOKENS;
    let core = &value.core;
    let (d, bits) = (core.head_dim, core.bits);
    let tiles = a / T..e.div_ceil(T);
    let nt = tiles.len();
    let codes = &core.codes[tiles.start * value.tile_bytes()..];
    // As for keys: rows `rows..2·rows` hold `lo` when split, accumulated apart and added.
    let split = bits >= SPLIT_BITS;
    let w_rows = if split { 2 * rows } else { rows };
    let groups_max = core.layout.channel_groups(d).max(if split { 2 } else { 1 });
    let w8 = take(&mut scratch.w8, groups_max * rows * nt * T);
    let sigma = take(&mut scratch.sigma, groups_max * rows * nt);
    let lo_acc = take(&mut scratch.tmp, if split { 2 * rows * d } else { 0 });
    // Position `pos` sits at tile position `pos − tiles.start·T`; others weigh 0.
    let first = a - tiles.start * T;
    if values_in_one_pass(core) {
        let group = core.layout.group.min(d);
        let groups = core.layout.channel_groups(d);
        // Every channel group's weights from one pass over the probabilities, then one pass
        // over the tiles for all channels (the same numbers as group by group below).
        let (mut s, mut z) = ([&[][..]; 4], [&[][..]; 4]);
        for g in 0..groups {
            (s[g], z[g]) = (&core.scales[g][a..e], &core.zeros[g][a..e]);
        }
        let zero = take(&mut scratch.bias, groups * rows);
        let clock = timing::start();
        int8::value_weights_groups(
            kernels,
            probs,
            len,
            rows,
            e - a,
            &s[..groups],
            &z[..groups],
            first,
            w8,
            sigma,
            zero,
            exp,
        );
        for g in 0..groups {
            let (c0, c1) = (g * group, ((g + 1) * group).min(d));
            for r in 0..rows {
                for x in &mut acc[r * d + c0..r * d + c1] {
                    *x += zero[g * rows + r];
                }
            }
        }
        timing::nested(Phase::ValueWeights, Phase::ValueAccumulate, clock);
        let ws = nt * T;
        int8::value_accumulate_groups(
            kernels,
            codes,
            nt,
            d,
            bits,
            group,
            w8,
            ws,
            rows * ws,
            sigma,
            nt,
            rows * nt,
            rows,
            acc,
            d,
        );
        return;
    }
    assert!(
        exp.is_none(),
        "values: probabilities from scores only where fuse_exp says"
    );
    for (g, c0) in (0..d).step_by(core.layout.group).enumerate() {
        let c1 = (c0 + core.layout.group).min(d);
        let (s, z) = (&core.scales[g][a..e], &core.zeros[g][a..e]);
        let (his, los) = w8.split_at_mut(rows * nt * T);
        let (sig_hi, sig_lo) = sigma.split_at_mut(rows * nt);
        let zero = take(&mut scratch.bias, rows);
        let lo = split.then_some(&mut los[..]);
        let clock = timing::start();
        int8::value_weights(
            kernels,
            probs,
            len,
            rows,
            e - a,
            s,
            z,
            first,
            his,
            lo,
            sig_hi,
            zero,
        );
        timing::nested(Phase::ValueWeights, Phase::ValueAccumulate, clock);
        for r in 0..rows {
            for x in &mut acc[r * d + c0..r * d + c1] {
                *x += zero[r];
            }
        }
        if split {
            for (l, &h) in sig_lo.iter_mut().zip(sig_hi.iter()) {
                *l = h * LO;
            }
        }
        let ws = nt * T;
        if split {
            // Both parts into a zeroed buffer (the lo rows land beside the hi rows), then added.
            lo_acc.fill(0.0);
            let ch = c0..c1;
            int8::value_accumulate(
                kernels, codes, nt, d, bits, ch, w8, ws, sigma, nt, w_rows, lo_acc, d,
            );
            for r in 0..rows {
                for c in c0..c1 {
                    acc[r * d + c] += lo_acc[r * d + c] + lo_acc[(rows + r) * d + c];
                }
            }
        } else {
            int8::value_accumulate(
                kernels,
                codes,
                nt,
                d,
                bits,
                c0..c1,
                w8,
                ws,
                sigma,
                nt,
                rows,
                acc,
                d,
            );
        }
    }
}

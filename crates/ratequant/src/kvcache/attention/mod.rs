//! Kernels that compute attention directly on packed codes, never materialising dequantized
//! keys or values.
//!
//! Two primitives carry all the work; the cache folds scales and zero-points around them:
//! * [`key_scores`]: keys are stored *channel-major* inside a block of tokens (channel `c`'s
//!   codes for the block's tokens are one contiguous LSB-first bit run, `slot_bytes` long), so
//!   a vector holds one channel's codes for 8 (AVX2) or 16 (AVX-512) consecutive tokens and
//!   `score[t] += w[c]·code[c][t]` is one broadcast-FMA per channel, for every query row that
//!   shares the KV head. KIVI's per-channel keys pass `w = q ∘ scale` (the scales folded into
//!   the query); per-token keys pass `w = q` and apply each token's scale afterwards.
//! * [`value_accumulate`]: values are stored *row-major* (one LSB-first bit run per token), so
//!   a vector holds 8/16 consecutive channels of one token and `acc[c] += (p·s)[t]·code[t][c]`
//!   is again one broadcast-FMA per row.
//!
//! Eight consecutive codes always start on a byte boundary, whatever the bit-width, so one
//! unpack sequence per bit-width (broadcast or shuffle bytes, per-lane mask, convert; lanes
//! hold their code times a power of two, undone once per output vector: see `simd.rs`) serves
//! all positions. The AVX2 and AVX-512 paths are one generic implementation over the vector
//! width. Every code buffer keeps [`CODE_PADDING`] zero bytes past its end so that a chunk's
//! vector load never crosses it.

pub mod int8;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod simd;

#[cfg(target_arch = "x86_64")]
mod int8_avx2;
#[cfg(target_arch = "x86_64")]
mod int8_avx512;
/// Sixteen horizontal sums or maxima at once (AVX-512), for the dense baseline too.
#[cfg(target_arch = "x86_64")]
pub(crate) use int8_avx512::reduce16;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use std::ops::Range;

/// How far ahead of its reads each stream of a cache is prefetched. The hardware prefetcher
/// stops at 4 KiB page boundaries, and a decode step finds its layer's bytes in memory, not
/// in cache (the other layers ran since): without a look-ahead every page of every stream
/// (codes, scales, zero-points) starts with a demand miss and a page walk.
pub(crate) const PREFETCH_AHEAD: usize = 2048;

/// Prefetches into L1 the lines of the `bytes` bytes at `p + PREFETCH_AHEAD`. A hint: it
/// never faults, so the address may lie past the end of the data.
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, bytes: usize) {
    prefetch_ahead_by::<PREFETCH_AHEAD>(p, bytes)
}

/// [`prefetch_ahead`] at `AHEAD` bytes ahead.
#[inline(always)]
pub(crate) fn prefetch_ahead_by<const AHEAD: usize>(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = p.wrapping_add(AHEAD);
        for line in (0..bytes).step_by(64) {
            // SAFETY: prefetching has no architectural effect and cannot fault; SSE is part
            // of x86_64.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.wrapping_add(line) as *const i8,
                )
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// Zero bytes kept after the last code of every code buffer (a 16-lane load reads 16 bytes
/// from the start of a chunk that may hold as few as 2 bytes of codes).
pub const CODE_PADDING: usize = 16;

/// Query rows a kernel pass handles at once; more rows run in several passes.
pub const MAX_ROWS: usize = 8;

/// Instruction set the kernels run on, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU offers.
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// Every instruction set this CPU can run (scalar always), for tests and benchmarks.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// `out[r·out_stride + (t − tokens.start)] = Σ_{c ∈ channels} weights[r·w_stride + c] · code(c, t)`
/// for `r < rows`, `t ∈ tokens`, where `code(c, t)` is the `bits`-wide code at stream bit
/// `c·slot_bytes·8 + t·bits` of `codes` (one block of channel-major keys).
///
/// `codes` must extend [`CODE_PADDING`] bytes past the byte where the last code starts.
#[allow(clippy::too_many_arguments)]
pub fn key_scores(
    isa: Isa,
    codes: &[u8],
    slot_bytes: usize,
    bits: u8,
    channels: Range<usize>,
    tokens: Range<usize>,
    weights: &[f32],
    w_stride: usize,
    rows: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if rows == 0 || channels.is_empty() || tokens.is_empty() {
        if !channels.is_empty() || tokens.is_empty() {
            return;
        }
        // No channels: every score is zero.
        for r in 0..rows {
            out[r * out_stride..r * out_stride + tokens.len()].fill(0.0);
        }
        return;
    }
    assert!(
        (1..=8).contains(&bits),
        "key_scores: bits {bits} outside 1..=8"
    );
    assert!(
        tokens.end * bits as usize <= slot_bytes * 8,
        "key_scores: tokens {tokens:?} overflow a {slot_bytes}-byte slot"
    );
    let last_chunk = (channels.end - 1) * slot_bytes + (tokens.end - 1) / 8 * bits as usize;
    assert!(
        codes.len() >= last_chunk + CODE_PADDING,
        "key_scores: code buffer lacks its padding"
    );
    assert!(
        weights.len() >= (rows - 1) * w_stride + channels.end,
        "key_scores: weights too short"
    );
    assert!(
        out.len() >= (rows - 1) * out_stride + tokens.len(),
        "key_scores: output too short"
    );
    for r0 in (0..rows).step_by(MAX_ROWS) {
        let n = MAX_ROWS.min(rows - r0);
        let w = &weights[r0 * w_stride..];
        let o = &mut out[r0 * out_stride..];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if isa.is_available() => {
                // SAFETY: features checked; bounds asserted above.
                unsafe {
                    avx512::key_scores(
                        codes,
                        slot_bytes,
                        bits,
                        channels.clone(),
                        tokens.clone(),
                        w,
                        w_stride,
                        n,
                        o,
                        out_stride,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_available() => {
                // SAFETY: features checked; bounds asserted above.
                unsafe {
                    avx2::key_scores(
                        codes,
                        slot_bytes,
                        bits,
                        channels.clone(),
                        tokens.clone(),
                        w,
                        w_stride,
                        n,
                        o,
                        out_stride,
                    )
                }
            }
            _ => scalar::key_scores(
                codes,
                slot_bytes,
                bits,
                channels.clone(),
                tokens.clone(),
                w,
                w_stride,
                n,
                o,
                out_stride,
            ),
        }
    }
}

/// `acc[r·acc_stride + c] += Σ_{t < tokens} weights[r·w_stride + t] · code(t, c)` for
/// `r < rows`, `c ∈ channels`, where `code(t, c)` is the `bits`-wide code at stream bit
/// `t·row_bytes·8 + c·bits` of `codes` (row-major values).
///
/// `codes` must extend [`CODE_PADDING`] bytes past the byte where the last code starts. The
/// SIMD paths need `channels.start·bits` to be a multiple of 8 (byte-aligned chunks); other
/// ranges run the scalar kernel.
#[allow(clippy::too_many_arguments)]
pub fn value_accumulate(
    isa: Isa,
    codes: &[u8],
    row_bytes: usize,
    bits: u8,
    tokens: usize,
    channels: Range<usize>,
    weights: &[f32],
    w_stride: usize,
    rows: usize,
    acc: &mut [f32],
    acc_stride: usize,
) {
    if rows == 0 || channels.is_empty() || tokens == 0 {
        return;
    }
    assert!(
        (1..=8).contains(&bits),
        "value_accumulate: bits {bits} outside 1..=8"
    );
    assert!(
        channels.end * bits as usize <= row_bytes * 8,
        "value_accumulate: channels {channels:?} overflow a {row_bytes}-byte row"
    );
    let last_chunk = (tokens - 1) * row_bytes + (channels.end - 1) / 8 * bits as usize;
    assert!(
        codes.len() >= last_chunk + CODE_PADDING,
        "value_accumulate: code buffer lacks its padding"
    );
    assert!(
        weights.len() >= (rows - 1) * w_stride + tokens,
        "value_accumulate: weights too short"
    );
    assert!(
        acc.len() >= (rows - 1) * acc_stride + channels.end,
        "value_accumulate: accumulator too short"
    );
    let aligned = (channels.start * bits as usize).is_multiple_of(8);
    for r0 in (0..rows).step_by(MAX_ROWS) {
        let n = MAX_ROWS.min(rows - r0);
        let w = &weights[r0 * w_stride..];
        let a = &mut acc[r0 * acc_stride..];
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if aligned && isa.is_available() => {
                // SAFETY: features checked; bounds and alignment asserted above.
                unsafe {
                    avx512::value_accumulate(
                        codes,
                        row_bytes,
                        bits,
                        tokens,
                        channels.clone(),
                        w,
                        w_stride,
                        n,
                        a,
                        acc_stride,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if aligned && isa.is_available() => {
                // SAFETY: features checked; bounds and alignment asserted above.
                unsafe {
                    avx2::value_accumulate(
                        codes,
                        row_bytes,
                        bits,
                        tokens,
                        channels.clone(),
                        w,
                        w_stride,
                        n,
                        a,
                        acc_stride,
                    )
                }
            }
            _ => scalar::value_accumulate(
                codes,
                row_bytes,
                bits,
                tokens,
                channels.clone(),
                w,
                w_stride,
                n,
                a,
                acc_stride,
            ),
        }
    }
}

/// `exp(x)` for the softmax, accurate to a few ulp over `[−87, 88]` (and 0 below), written as
/// branch-free arithmetic so that loops over it vectorise: `x = n·ln2 + r`, `|r| ≤ ln2/2`,
/// `e^r` by its degree-6 Taylor polynomial in Horner form, `2^n` built in the exponent bits.
/// Every step is a fused multiply-add, as the AVX2 path computes it, so both return the same
/// bits (where the CPU lacks FMA, `mul_add` is exact in software: slow, but this scalar path
/// is the reference, not the one AVX2 machines run).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2^23 trick.
    let n = x.mul_add(std::f32::consts::LOG2_E, EXP_ROUND) - EXP_ROUND;
    let r = n.mul_add(-EXP_LN2_HI, x);
    let r = n.mul_add(-EXP_LN2_LO, r);
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(r, *c);
    }
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

pub(super) const EXP_ROUND: f32 = 12_582_912.0;
/// ln 2 split in two so that `n·LN2_HI` is exact.
pub(super) const EXP_LN2_HI: f32 = 0.693_359_4;
pub(super) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// Taylor coefficients of `e^r`, highest degree first.
pub(super) const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// Replaces `scores` by `exp(score − max)` and returns `(max, Σ exp)`: one block's share of a
/// softmax, merged with the other blocks' by [`merge_factors`]. Every path returns the
/// same bits.
pub fn softmax_block(isa: Isa, scores: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.is_available() {
        // SAFETY: AVX-512 F is available.
        return unsafe { avx512::softmax_block(scores) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && isa.is_available() {
        // SAFETY: AVX2/FMA are implied by both SIMD paths being available.
        return unsafe { avx2::softmax_block(scores) };
    }
    let _ = isa;
    softmax_block_generic(scores)
}

/// [`softmax_block`] of each `len`-long row of `scores` (one row per query), in place.
#[inline(always)]
pub fn softmax_rows(isa: Isa, scores: &mut [f32], len: usize) -> Vec<SoftmaxPart> {
    scores
        .chunks_exact_mut(len)
        .map(|row| {
            let (max, sum) = softmax_block(isa, row);
            SoftmaxPart { max, sum }
        })
        .collect()
}

/// [`softmax_rows`] given each row's maximum (as [`softmax_block`] would find it): one pass
/// over the scores instead of two.
#[inline(always)]
pub fn softmax_rows_with_max(
    isa: Isa,
    scores: &mut [f32],
    len: usize,
    maxes: &[f32],
) -> Vec<SoftmaxPart> {
    scores
        .chunks_exact_mut(len)
        .zip(maxes)
        .map(|(row, &max)| SoftmaxPart {
            max,
            sum: softmax_exp(isa, row, max),
        })
        .collect()
}

/// The second half of [`softmax_block`]: `exp(score − max)` in place and their sum, for the
/// block's maximum `max`.
pub fn softmax_exp(isa: Isa, scores: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && isa.is_available() {
        // SAFETY: AVX-512 F is available.
        return unsafe { avx512::softmax_exp(scores, max) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && isa.is_available() {
        // SAFETY: AVX2/FMA are implied by both SIMD paths being available.
        return unsafe { avx2::softmax_exp(scores, max) };
    }
    let _ = isa;
    softmax_exp_generic(scores, max)
}

/// Lanes of the softmax's running maxima and sums: one AVX-512 vector, two AVX2 vectors.
pub(super) const SOFTMAX_LANES: usize = 16;

#[inline(always)]
fn softmax_block_generic(scores: &mut [f32]) -> (f32, f32) {
    const L: usize = SOFTMAX_LANES;
    // Sixteen running maxima so that the reduction vectorises.
    let mut maxes = [f32::NEG_INFINITY; L];
    let mut chunks = scores.chunks_exact(L);
    for chunk in &mut chunks {
        for (m, &x) in maxes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxes)
        .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    if scores.is_empty() {
        return (max, 0.0);
    }
    (max, softmax_exp_generic(scores, max))
}

#[inline(always)]
fn softmax_exp_generic(scores: &mut [f32], max: f32) -> f32 {
    const L: usize = SOFTMAX_LANES;
    let mut sums = [0.0f32; L];
    let mut chunks = scores.chunks_exact_mut(L);
    for chunk in &mut chunks {
        for (s, sum) in chunk.iter_mut().zip(sums.iter_mut()) {
            *s = exp_f32(*s - max);
            *sum += *s;
        }
    }
    for s in chunks.into_remainder() {
        *s = exp_f32(*s - max);
        sums[0] += *s;
    }
    sums.iter().sum()
}

/// `Σ_c a[c]·b[c]` with eight partial sums, so that it vectorises.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with::<false>(a, b)
}

/// [`dot`], with fused multiply-adds when `FUSED`: for glue compiled with FMA enabled, where
/// `mul_add` is one instruction (elsewhere it is a slow exact software routine).
#[inline(always)]
pub fn dot_with<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    // The check is a cached flag: it keeps this safe function sound if it is ever called with
    // `FUSED` on a CPU without FMA.
    #[cfg(target_arch = "x86_64")]
    if FUSED && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { dot_fma(a, b) };
    }
    dot_lanes::<FUSED>(a, b)
}

/// The definition of [`dot_with`]: eight partial sums over whole chunks of eight, a tail over
/// the remainders, then the lanes summed in order.
#[inline(always)]
fn dot_lanes<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    let madd = |x: f32, y: f32, acc: f32| {
        if FUSED {
            x.mul_add(y, acc)
        } else {
            acc + x * y
        }
    };
    let mut sums = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            sums[i] = madd(x[i], y[i], sums[i]);
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = madd(*x, *y, tail);
    }
    sums.iter().sum::<f32>() + tail
}

/// [`dot_lanes::<true>`] in AVX2, operation for operation (vector lane `i` is `sums[i]`), so
/// the result is bit-identical; the compiler turns the array of `mul_add`s into scalar and
/// 2-wide code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let chunks = (a.len() / 8).min(b.len() / 8);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = _mm256_setzero_ps();
    for k in 0..chunks {
        let i = 8 * k;
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc);
    }
    let mut sums = [0.0f32; 8];
    _mm256_storeu_ps(sums.as_mut_ptr(), acc);
    let mut tail = 0.0f32;
    let (ra, rb) = (&a[a.len() / 8 * 8..], &b[b.len() / 8 * 8..]);
    for (x, y) in ra.iter().zip(rb) {
        tail = x.mul_add(*y, tail);
    }
    sums.iter().sum::<f32>() + tail
}

/// `Σ_i a[i]·b[i]` over long inputs (the zero-point sums over a task's tokens): as
/// [`dot_with`], but with [`LONG_LANES`] partial sums, so that the AVX2 version runs four
/// independent FMA chains instead of one latency-bound chain, and the partial sums added
/// pairwise (a tree that vectorises) rather than in order.
#[inline(always)]
pub fn dot_long<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FUSED && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { dot_long_fma(a, b) };
    }
    dot_long_lanes::<FUSED>(a, b)
}

/// Partial sums of [`dot_long`]: four AVX2 vectors.
const LONG_LANES: usize = 32;

/// Adds the upper half of `sums[..n]` onto the lower until one sum is left.
#[inline(always)]
fn tree_sum(sums: &mut [f32; LONG_LANES]) -> f32 {
    let mut n = LONG_LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            sums[i] += sums[i + n];
        }
    }
    sums[0]
}

/// The definition of [`dot_long`]: [`LONG_LANES`] partial sums over whole chunks of that many
/// elements (both inputs cut to the shorter), added by [`tree_sum`], then a tail in order.
#[inline(always)]
fn dot_long_lanes<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    let madd = |x: f32, y: f32, acc: f32| {
        if FUSED {
            x.mul_add(y, acc)
        } else {
            acc + x * y
        }
    };
    let n = a.len().min(b.len());
    let whole = n / LONG_LANES * LONG_LANES;
    let mut sums = [0.0f32; LONG_LANES];
    for (x, y) in a[..whole]
        .chunks_exact(LONG_LANES)
        .zip(b[..whole].chunks_exact(LONG_LANES))
    {
        for i in 0..LONG_LANES {
            sums[i] = madd(x[i], y[i], sums[i]);
        }
    }
    let mut total = tree_sum(&mut sums);
    for (x, y) in a[whole..n].iter().zip(&b[whole..n]) {
        total = madd(*x, *y, total);
    }
    total
}

/// [`dot_long_lanes::<true>`] in AVX2, operation for operation (lane `j` of vector `v` is
/// `sums[8v + j]`), so the result is bit-identical.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_long_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let whole = n / LONG_LANES * LONG_LANES;
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); LONG_LANES / 8];
    for k in (0..whole).step_by(LONG_LANES) {
        for (v, acc) in acc.iter_mut().enumerate() {
            let i = k + 8 * v;
            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), *acc);
        }
    }
    let mut sums = [0.0f32; LONG_LANES];
    for (v, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(sums.as_mut_ptr().add(8 * v), *acc);
    }
    let mut total = tree_sum(&mut sums);
    for (x, y) in a[whole..n].iter().zip(&b[whole..n]) {
        total = x.mul_add(*y, total);
    }
    total
}

/// `acc[c] += w·x[c]`.
#[inline(always)]
pub fn axpy(w: f32, x: &[f32], acc: &mut [f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

/// `acc[r·d..(r + 1)·d] += p[r·p_stride + i] · v_i` for every f16 row `v_i` of `v` (`d` wide)
/// and `r < rows`, with the sums held in registers across the rows: [`axpy`] of each
/// widened row into each row's sums, the same bits. Runs where a register-blocked kernel
/// fits (AVX-512, 64-wide heads, up to 4 rows) and returns whether it ran; elsewhere it
/// does nothing, and the caller widens and adds row by row.
pub fn try_axpy_f16_rows(
    isa: Isa,
    p: &[f32],
    p_stride: usize,
    rows: usize,
    v: &[half::f16],
    d: usize,
    acc: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && d == 64 && isa.is_available() && is_x86_feature_detected!("f16c") {
        let n = v.len() / d;
        assert!(v.len() == n * d, "axpy_f16_rows: rows not whole");
        assert!(rows == 0 || (p.len() >= (rows - 1) * p_stride + n && acc.len() >= rows * d));
        // SAFETY: AVX-512 F and F16C detected; lengths asserted.
        unsafe {
            match rows {
                1 => avx512::axpy_f16_rows_64::<1>(p, p_stride, v, acc),
                2 => avx512::axpy_f16_rows_64::<2>(p, p_stride, v, acc),
                3 => avx512::axpy_f16_rows_64::<3>(p, p_stride, v, acc),
                4 => avx512::axpy_f16_rows_64::<4>(p, p_stride, v, acc),
                _ => return false,
            }
        }
        return true;
    }
    let _ = (isa, p, p_stride, rows, v, d, acc);
    false
}

/// One block's unnormalised softmax state: running max, sum of exponentials, and the rows'
/// accumulated outputs scaled by `exp(−max)`.
#[derive(Debug, Clone)]
pub struct SoftmaxPart {
    pub max: f32,
    pub sum: f32,
}

/// Merges one row's blocks: brings every block to their common max at once. Writes each
/// block's factor `exp(max_b − max)` to `factors` (0 for a block without mass, which the
/// callers skip) and returns the merged sum of exponentials.
pub fn merge_factors<'a>(
    parts: impl Iterator<Item = &'a SoftmaxPart> + Clone,
    factors: &mut Vec<f32>,
) -> f32 {
    let max = parts
        .clone()
        .filter(|p| p.sum != 0.0)
        .map(|p| p.max)
        .fold(f32::NEG_INFINITY, f32::max);
    factors.clear();
    let mut sum = 0.0;
    for p in parts {
        let f = if p.sum == 0.0 {
            0.0
        } else {
            (p.max - max).exp()
        };
        sum += p.sum * f;
        factors.push(f);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Xorshift values uniform in `[−scale/2, scale/2)`, reproducible from `seed`.
    fn uniform(mut state: u64, scale: f32) -> impl FnMut() -> f32 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        }
    }

    /// `try_axpy_f16_rows` gives what widening each row and `axpy` give, bit for bit, where
    /// it runs; it runs exactly where its kernel fits, and elsewhere leaves the sums alone.
    #[test]
    fn axpy_f16_rows_equals_axpy_per_row() {
        let mut next = uniform(0x2545_F491_4F6C_DD1Du64, 4.0);
        let cases = [
            (64usize, 3usize, 130usize),
            (64, 1, 1),
            (64, 4, 7),
            (64, 5, 9),
            (32, 2, 5),
        ];
        for (d, rows, n) in cases {
            let p_stride = n + 3;
            let p: Vec<f32> = (0..rows * p_stride).map(|_| next().abs()).collect();
            let v: Vec<half::f16> = (0..n * d).map(|_| half::f16::from_f32(next())).collect();
            let init: Vec<f32> = (0..rows * d).map(|_| next()).collect();
            let mut want = init.clone();
            for i in 0..n {
                let row: Vec<f32> = v[i * d..(i + 1) * d].iter().map(|h| h.to_f32()).collect();
                for r in 0..rows {
                    axpy(p[r * p_stride + i], &row, &mut want[r * d..(r + 1) * d]);
                }
            }
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                let mut got = init.clone();
                let ran = try_axpy_f16_rows(isa, &p, p_stride, rows, &v, d, &mut got);
                let fits = isa == Isa::Avx512 && isa.is_available() && d == 64 && rows <= 4;
                assert_eq!(ran, fits, "{isa:?} d {d} rows {rows}");
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let expected = if ran { &want } else { &init };
                assert_eq!(
                    bits(&got),
                    bits(expected),
                    "{isa:?} d {d} rows {rows} n {n}"
                );
            }
        }
    }

    /// The AVX2 dot product equals its definition bit for bit, for every length around the
    /// chunk size and for operands of unequal length (chunks and tails pair up as the
    /// definition pairs them).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dot_fma_equals_dot_lanes_bit_for_bit() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2/FMA: nothing to compare");
            return;
        }
        let mut next = uniform(0x9E37_79B9_7F4A_7C15u64, 8.0);
        let a: Vec<f32> = (0..80).map(|_| next()).collect();
        let b: Vec<f32> = (0..80).map(|_| next()).collect();
        for la in 0..=40usize {
            for lb in [la, la + 1, la + 7, la + 8, la.saturating_sub(3)] {
                let (x, y) = (&a[..la], &b[..lb]);
                let want = dot_lanes::<true>(x, y);
                // SAFETY: AVX2 and FMA were detected.
                let got = unsafe { dot_fma(x, y) };
                assert_eq!(want.to_bits(), got.to_bits(), "lengths {la} and {lb}");
            }
        }
    }

    /// The long dot product: AVX2 equals the definition bit for bit, and both are the sum.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn dot_long_fma_equals_its_definition() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2/FMA: nothing to compare");
            return;
        }
        let mut next = uniform(0x2545_F491_4F6C_DD1Du64, 8.0);
        let a: Vec<f32> = (0..1200).map(|_| next()).collect();
        let b: Vec<f32> = (0..1200).map(|_| next()).collect();
        for la in (0..=100usize).chain([1023, 1024, 1025, 1100]) {
            for lb in [la, la + 1, la + 33, la.saturating_sub(5)] {
                let (x, y) = (&a[..la], &b[..lb]);
                let want = dot_long_lanes::<true>(x, y);
                // SAFETY: AVX2 and FMA were detected.
                let got = unsafe { dot_long_fma(x, y) };
                assert_eq!(want.to_bits(), got.to_bits(), "lengths {la} and {lb}");
                let exact: f64 = x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum();
                let tol = 1e-5 * (1.0 + x.iter().map(|v| v.abs() as f64).sum::<f64>() * 4.0);
                assert!(
                    (want as f64 - exact).abs() < tol,
                    "{la} {lb}: {want} vs {exact}"
                );
                assert_eq!(
                    dot_long::<false>(x, y).to_bits(),
                    dot_long_lanes::<false>(x, y).to_bits()
                );
            }
        }
    }
}

//! The two kernels written once over a vector width: the AVX2 (8 lanes) and AVX-512 (16 lanes)
//! modules supply the vector operations ([`Simd`]) and the code unpackers ([`Unpack`]), and
//! instantiate these functions inside their own `#[target_feature]` entry points, where
//! everything here is inlined.
//!
//! `LANES` consecutive `b`-bit codes always fill exactly `LANES·b/8` whole bytes, so one
//! unpacker per bit-width serves every position. Unpackers never shift per lane (`vpsrlvd`
//! costs as much as an FMA on the CPUs measured and was the kernels' bottleneck): lane `i`
//! holds its code times a power of two, `code·2^shift[i]`, and the kernels multiply their sums
//! by `2^−shift` ([`Unpack::lane_scale`]) once per output vector. Scaling by a power of two
//! commutes exactly with every f32 rounding (barring overflow and subnormals, far outside
//! attention's range), so the results are bit-identical to accumulating the plain codes.

// Indexing accumulator arrays by row and chunk keeps the register blocking readable.
#![allow(clippy::needless_range_loop)]

/// One vector width's f32 operations. Every method is `#[inline(always)]` and only called
/// from inside a `#[target_feature]` function that enables the instructions it uses.
pub(super) trait Simd {
    type V: Copy;
    const LANES: usize;
    unsafe fn zero() -> Self::V;
    /// Every lane `*p`.
    unsafe fn splat(p: *const f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a·b + c`, fused.
    unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    /// `if a > b { a } else { b }` per lane (`maxps`'s operand order).
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// [`super::exp_f32`] per lane: the same operations in the same order, so the same bits.
    unsafe fn exp(x: Self::V) -> Self::V;
}

/// [`super::softmax_block`]: [`super::SOFTMAX_LANES`] running maxima and sums, held in one
/// AVX-512 vector or two AVX2 vectors, so every width returns the scalar definition's bits.
#[inline(always)]
pub(super) unsafe fn softmax_block<S: Simd>(scores: &mut [f32]) -> (f32, f32) {
    const L: usize = super::SOFTMAX_LANES;
    let per = L / S::LANES;
    debug_assert!(per * S::LANES == L && per <= 2);
    let whole = scores.len() / L * L;
    let p = scores.as_mut_ptr();
    let mut maxes = [S::splat(&f32::NEG_INFINITY); 2];
    for i in (0..whole).step_by(L) {
        for h in 0..per {
            // max(x, m) = if x > m { x } else { m }, as the scalar loop.
            maxes[h] = S::max(S::load(p.add(i + h * S::LANES)), maxes[h]);
        }
    }
    let mut lanes = [0f32; L];
    for h in 0..per {
        S::store(lanes.as_mut_ptr().add(h * S::LANES), maxes[h]);
    }
    let max = scores[whole..]
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    if scores.is_empty() {
        return (max, 0.0);
    }
    (max, softmax_exp::<S>(scores, max))
}

/// The second half of [`softmax_block`], given the block's maximum: `exp(score − max)` in
/// place, and their sum.
#[inline(always)]
pub(super) unsafe fn softmax_exp<S: Simd>(scores: &mut [f32], max: f32) -> f32 {
    const L: usize = super::SOFTMAX_LANES;
    let per = L / S::LANES;
    let whole = scores.len() / L * L;
    let p = scores.as_mut_ptr();
    let mut lanes = [0f32; L];
    let vmax = S::splat(&max);
    let mut sums = [S::zero(); 2];
    for i in (0..whole).step_by(L) {
        for h in 0..per {
            let at = p.add(i + h * S::LANES);
            let e = S::exp(S::sub(S::load(at), vmax));
            S::store(at, e);
            sums[h] = S::add(sums[h], e);
        }
    }
    for h in 0..per {
        S::store(lanes.as_mut_ptr().add(h * S::LANES), sums[h]);
    }
    for s in &mut scores[whole..] {
        *s = super::exp_f32(*s - max);
        lanes[0] += *s;
    }
    lanes.iter().sum()
}

/// Turns `LANES` consecutive `b`-bit codes into f32 lanes holding `code·2^shift[lane]`.
pub(super) trait Unpack<S: Simd> {
    unsafe fn new(bits: u8) -> Self;
    /// The codes starting at byte `p`.
    unsafe fn load(&self, p: *const u8) -> S::V;
    /// `2^−shift[lane]`.
    unsafe fn lane_scale(&self) -> S::V;
}

/// A byte-shuffle unpacker's constants for `L` lanes (`B = 4·L` control bytes) at `bits`:
/// lane `i`'s code starts at bit `i·bits`, in byte `i·bits/8` of the loaded bytes at offset
/// `i·bits mod 8`. The control gives lane `i` that byte and the next (byte indices refer to
/// the lane's own 128-bit block, each of which holds the same loaded bytes; a next byte past
/// the block, needed only at 8 bits where it is masked off anyway, reads as zero); the mask
/// keeps the code where it lies, `(2^bits − 1) << offset`; the scale is `2^−offset`.
pub(super) const fn shuffle_table<const L: usize, const B: usize>(
    bits: usize,
) -> ([u8; B], [i32; L], [f32; L]) {
    let mut ctrl = [0x80u8; B];
    let mut mask = [0i32; L];
    let mut scale = [0f32; L];
    let mut lane = 0;
    while lane < L {
        let bit = lane * bits;
        let byte = (bit / 8) as u8;
        let at = (lane / 4) * 16 + (lane % 4) * 4;
        ctrl[at] = byte;
        ctrl[at + 1] = if byte < 15 { byte + 1 } else { 0x80 };
        mask[lane] = ((1 << bits) - 1) << (bit % 8);
        scale[lane] = 1.0 / (1u32 << (bit % 8)) as f32;
        lane += 1;
    }
    (ctrl, mask, scale)
}

/// Scores of `NC` chunks of `LANES` tokens starting at token `t0`, for `R` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_pass<S: Simd, U: Unpack<S>, const R: usize, const NC: usize>(
    unpack: &U,
    codes: *const u8,
    slot_bytes: usize,
    b: usize,
    c0: usize,
    c1: usize,
    t0: usize,
    w: *const f32,
    w_stride: usize,
) -> [[S::V; NC]; R] {
    let chunk_bytes = S::LANES * b / 8;
    let mut acc = [[S::zero(); NC]; R];
    let mut p = codes.add(c0 * slot_bytes + t0 * b / 8);
    for c in c0..c1 {
        // Each channel is its own stream: one look-ahead line per channel and pass.
        super::prefetch_ahead(p, 1);
        let mut wr = [S::zero(); R];
        for (r, x) in wr.iter_mut().enumerate() {
            *x = S::splat(w.add(r * w_stride + c));
        }
        for k in 0..NC {
            let v = unpack.load(p.add(k * chunk_bytes));
            for r in 0..R {
                acc[r][k] = S::fmadd(wr[r], v, acc[r][k]);
            }
        }
        p = p.add(slot_bytes);
    }
    acc
}

/// Stores the lanes of `acc` (chunks from token `t0`), times the lane scale, that fall in
/// `t_begin..t_end`.
#[inline(always)]
unsafe fn store_scores<S: Simd, const R: usize, const NC: usize>(
    lane_scale: S::V,
    acc: &[[S::V; NC]; R],
    t0: usize,
    t_begin: usize,
    t_end: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for k in 0..NC {
        let base = t0 + S::LANES * k;
        let lo = t_begin.max(base);
        let hi = t_end.min(base + S::LANES);
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = out.add(r * out_stride);
            let scores = S::mul(acc_r[k], lane_scale);
            if lo == base && hi == base + S::LANES {
                S::store(dst.add(base - t_begin), scores);
            } else if lo < hi {
                let mut tmp = [0f32; 16];
                S::store(tmp.as_mut_ptr(), scores);
                for t in lo..hi {
                    *dst.add(t - t_begin) = tmp[t - base];
                }
            }
        }
    }
}

/// See [`super::key_scores`]. `R` query rows, `NC` chunks of `LANES` tokens per pass
/// (independent accumulators hide the FMA latency).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn key_scores_rows<S: Simd, U: Unpack<S>, const R: usize, const NC: usize>(
    codes: *const u8,
    slot_bytes: usize,
    bits: u8,
    c0: usize,
    c1: usize,
    t_begin: usize,
    t_end: usize,
    w: *const f32,
    w_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let unpack = U::new(bits);
    let scale = unpack.lane_scale();
    let b = bits as usize;
    let n = S::LANES;
    let end = t_end.div_ceil(n) * n;
    let mut t0 = t_begin / n * n;
    // Full passes of NC chunks, then single chunks, never reading past the last chunk.
    while t0 + NC * n <= end {
        let acc = key_pass::<S, U, R, NC>(&unpack, codes, slot_bytes, b, c0, c1, t0, w, w_stride);
        store_scores::<S, R, NC>(scale, &acc, t0, t_begin, t_end, out, out_stride);
        t0 += NC * n;
    }
    // Pairs of chunks before single ones: a 32-token KIVI block is two AVX-512 chunks, and a
    // single chunk leaves only R accumulators, too few to hide the FMA latency.
    while NC > 2 && t0 + 2 * n <= end {
        let acc = key_pass::<S, U, R, 2>(&unpack, codes, slot_bytes, b, c0, c1, t0, w, w_stride);
        store_scores::<S, R, 2>(scale, &acc, t0, t_begin, t_end, out, out_stride);
        t0 += 2 * n;
    }
    while t0 < t_end {
        let acc = key_pass::<S, U, R, 1>(&unpack, codes, slot_bytes, b, c0, c1, t0, w, w_stride);
        store_scores::<S, R, 1>(scale, &acc, t0, t_begin, t_end, out, out_stride);
        t0 += n;
    }
}

/// `NC` chunks of `LANES` channels from channel `ch`, accumulated over `tokens` rows, for `R`
/// rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_pass<S: Simd, U: Unpack<S>, const R: usize, const NC: usize>(
    unpack: &U,
    codes: *const u8,
    row_bytes: usize,
    b: usize,
    tokens: usize,
    ch: usize,
    w: *const f32,
    w_stride: usize,
) -> [[S::V; NC]; R] {
    let chunk_bytes = S::LANES * b / 8;
    let mut acc = [[S::zero(); NC]; R];
    let mut p = codes.add(ch * b / 8);
    for t in 0..tokens {
        if (t * row_bytes) % 64 < row_bytes {
            super::prefetch_ahead(p, NC * chunk_bytes);
        }
        let mut v = [S::zero(); NC];
        for (k, vk) in v.iter_mut().enumerate() {
            *vk = unpack.load(p.add(k * chunk_bytes));
        }
        for r in 0..R {
            let wr = S::splat(w.add(r * w_stride + t));
            for k in 0..NC {
                acc[r][k] = S::fmadd(wr, v[k], acc[r][k]);
            }
        }
        p = p.add(row_bytes);
    }
    acc
}

/// Adds the lanes of `acc` (chunks from channel `ch`) below `c1`, times the lane scale, into
/// the accumulator rows.
#[inline(always)]
unsafe fn add_values<S: Simd, const R: usize, const NC: usize>(
    lane_scale: S::V,
    acc: &[[S::V; NC]; R],
    ch: usize,
    c1: usize,
    acc_out: *mut f32,
    acc_stride: usize,
) {
    for k in 0..NC {
        let base = ch + S::LANES * k;
        let hi = c1.min(base + S::LANES);
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = acc_out.add(r * acc_stride + base);
            let sums = S::mul(acc_r[k], lane_scale);
            if hi == base + S::LANES {
                S::store(dst, S::add(S::load(dst), sums));
            } else if base < hi {
                let mut tmp = [0f32; 16];
                S::store(tmp.as_mut_ptr(), sums);
                for (i, v) in tmp.iter().take(hi - base).enumerate() {
                    *dst.add(i) += v;
                }
            }
        }
    }
}

/// See [`super::value_accumulate`]. `R` rows, `NC` chunks of `LANES` channels per pass;
/// `c0·bits` must be a multiple of 8.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_accumulate_rows<
    S: Simd,
    U: Unpack<S>,
    const R: usize,
    const NC: usize,
>(
    codes: *const u8,
    row_bytes: usize,
    bits: u8,
    tokens: usize,
    c0: usize,
    c1: usize,
    w: *const f32,
    w_stride: usize,
    acc_out: *mut f32,
    acc_stride: usize,
) {
    let unpack = U::new(bits);
    let scale = unpack.lane_scale();
    let b = bits as usize;
    let n = S::LANES;
    let end = c0 + (c1 - c0).div_ceil(n) * n;
    let mut ch = c0;
    while ch + NC * n <= end {
        let acc = value_pass::<S, U, R, NC>(&unpack, codes, row_bytes, b, tokens, ch, w, w_stride);
        add_values::<S, R, NC>(scale, &acc, ch, c1, acc_out, acc_stride);
        ch += NC * n;
    }
    // Pairs before single chunks, as for keys (a 32-channel value group is two AVX-512 chunks).
    while NC > 2 && ch + 2 * n <= end {
        let acc = value_pass::<S, U, R, 2>(&unpack, codes, row_bytes, b, tokens, ch, w, w_stride);
        add_values::<S, R, 2>(scale, &acc, ch, c1, acc_out, acc_stride);
        ch += 2 * n;
    }
    while ch < c1 {
        let acc = value_pass::<S, U, R, 1>(&unpack, codes, row_bytes, b, tokens, ch, w, w_stride);
        add_values::<S, R, 1>(scale, &acc, ch, c1, acc_out, acc_stride);
        ch += n;
    }
}

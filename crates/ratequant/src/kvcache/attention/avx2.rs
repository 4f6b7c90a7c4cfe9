//! AVX2 + FMA kernels: 8 codes per vector.
//!
//! Eight `b`-bit codes always fill exactly `b` whole bytes, so one constant set per bit-width
//! serves every position. Up to 3 bits they fit one 32-bit word ([`MaskUnpack`]: broadcast,
//! per-lane mask, convert); wider codes take one byte shuffle more ([`ShuffleUnpack`]). Neither
//! shifts: lanes carry their code times a power of two, undone once per output vector.

// Indexing accumulator arrays by row and chunk keeps the register blocking readable.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

/// Turns eight consecutive `b`-bit codes (always `b` whole bytes) into eight f32 lanes that
/// hold each code times a power of two (`code·2^shift[lane]`), with no per-lane variable shift
/// (`vpsrlvd` costs as much as an FMA on this class of CPU and was the kernels' bottleneck).
/// The kernels accumulate in that scaled domain and multiply by [`Unpack8::lane_scale`]
/// (`2^−shift`) once at the end. Scaling by a power of two commutes exactly with every f32
/// rounding (barring overflow and subnormals, far outside attention's range), so the results
/// are bit-identical to accumulating the plain codes.
trait Unpack8 {
    unsafe fn new(bits: u8) -> Self;
    /// Eight codes starting at byte `p`, lane `i` scaled by `2^shift[i]`.
    unsafe fn load(&self, p: *const u8) -> __m256;
    /// `2^−shift[i]` per lane.
    fn lane_scale(&self) -> __m256;
}

/// Up to 3 bits the eight codes fit the low 24 bits of one 32-bit word: broadcast the word and
/// mask lane `i` with `(2^b − 1) << i·b`, leaving `code·2^(i·b)` (below 2^24, exact in f32).
struct MaskUnpack {
    mask: __m256i,
    scale: __m256,
}

impl Unpack8 for MaskUnpack {
    #[inline(always)]
    unsafe fn new(bits: u8) -> Self {
        debug_assert!((1..=3).contains(&bits));
        let (mask, scale) = &MASK_TABLES[bits as usize];
        MaskUnpack {
            mask: _mm256_loadu_si256(mask.as_ptr() as *const __m256i),
            scale: _mm256_loadu_ps(scale.as_ptr()),
        }
    }

    /// Reads 4 bytes.
    #[inline(always)]
    unsafe fn load(&self, p: *const u8) -> __m256 {
        let word = _mm256_set1_epi32((p as *const i32).read_unaligned());
        _mm256_cvtepi32_ps(_mm256_and_si256(word, self.mask))
    }

    #[inline(always)]
    fn lane_scale(&self) -> __m256 {
        self.scale
    }
}

/// Any width: load 8 bytes into both 128-bit halves, `vpshufb` gives each lane the two bytes
/// its code starts in, and a per-lane mask keeps the code in place: `code·2^(bit offset)`,
/// below 2^15.
struct ShuffleUnpack {
    ctrl: __m256i,
    mask: __m256i,
    scale: __m256,
}

impl Unpack8 for ShuffleUnpack {
    #[inline(always)]
    unsafe fn new(bits: u8) -> Self {
        let (ctrl, mask, scale) = &SHUFFLE_TABLES[bits as usize];
        ShuffleUnpack {
            ctrl: _mm256_loadu_si256(ctrl.as_ptr() as *const __m256i),
            mask: _mm256_loadu_si256(mask.as_ptr() as *const __m256i),
            scale: _mm256_loadu_ps(scale.as_ptr()),
        }
    }

    /// Reads 8 bytes.
    #[inline(always)]
    unsafe fn load(&self, p: *const u8) -> __m256 {
        let both = _mm256_broadcastq_epi64(_mm_loadl_epi64(p as *const __m128i));
        let spread = _mm256_shuffle_epi8(both, self.ctrl);
        _mm256_cvtepi32_ps(_mm256_and_si256(spread, self.mask))
    }

    #[inline(always)]
    fn lane_scale(&self) -> __m256 {
        self.scale
    }
}

/// [`MaskUnpack`]'s per-lane masks `(2^b − 1) << i·b` and scales `2^−i·b`, by bit-width
/// (built at compile time: the kernels are called once per block of a few dozen tokens).
const MASK_TABLES: [([i32; 8], [f32; 8]); 4] = {
    let mut t = [([0i32; 8], [0f32; 8]); 4];
    let mut b = 1;
    while b <= 3 {
        let mut lane = 0;
        while lane < 8 {
            t[b].0[lane] = ((1 << b) - 1) << (lane * b);
            t[b].1[lane] = 1.0 / (1u32 << (lane * b)) as f32;
            lane += 1;
        }
        b += 1;
    }
    t
};

/// [`ShuffleUnpack`]'s byte shuffle, per-lane masks and scales, by bit-width. Lane `i`'s code
/// starts at bit `i·b`: byte `i·b/8`, offset `i·b mod 8`.
const SHUFFLE_TABLES: [([u8; 32], [i32; 8], [f32; 8]); 9] = {
    let mut t = [([0x80u8; 32], [0i32; 8], [0f32; 8]); 9];
    let mut b = 1;
    while b <= 8 {
        let mut lane = 0;
        while lane < 8 {
            let bit = lane * b;
            let byte = (bit / 8) as u8;
            // Byte indices refer to the lane's own 128-bit half; both halves hold the same 8
            // loaded bytes.
            let at = (lane / 4) * 16 + (lane % 4) * 4;
            t[b].0[at] = byte;
            t[b].0[at + 1] = byte + 1;
            t[b].1[lane] = ((1 << b) - 1) << (bit % 8);
            t[b].2[lane] = 1.0 / (1u32 << (bit % 8)) as f32;
            lane += 1;
        }
        b += 1;
    }
    t
};

/// Scores of `NC` chunks of 8 tokens starting at token `t0` into `acc`, for `R` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_pass<const R: usize, const NC: usize, U: Unpack8>(
    unpack: &U,
    codes: *const u8,
    slot_bytes: usize,
    b: usize,
    c0: usize,
    c1: usize,
    t0: usize,
    w: *const f32,
    w_stride: usize,
) -> [[__m256; NC]; R] {
    let mut acc = [[_mm256_setzero_ps(); NC]; R];
    let mut p = codes.add(c0 * slot_bytes + t0 * b / 8);
    for c in c0..c1 {
        let mut wr = [_mm256_setzero_ps(); R];
        for (r, x) in wr.iter_mut().enumerate() {
            *x = _mm256_broadcast_ss(&*w.add(r * w_stride + c));
        }
        for k in 0..NC {
            let v = unpack.load(p.add(k * b));
            for r in 0..R {
                acc[r][k] = _mm256_fmadd_ps(wr[r], v, acc[r][k]);
            }
        }
        p = p.add(slot_bytes);
    }
    acc
}

/// Stores the lanes of `acc` (chunks from token `t0`), times the unpacker's lane scale, that
/// fall in `t_begin..t_end`.
#[inline(always)]
unsafe fn store_scores<const R: usize, const NC: usize>(
    lane_scale: __m256,
    acc: &[[__m256; NC]; R],
    t0: usize,
    t_begin: usize,
    t_end: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for k in 0..NC {
        let base = t0 + 8 * k;
        let lo = t_begin.max(base);
        let hi = t_end.min(base + 8);
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = out.add(r * out_stride);
            let scores = _mm256_mul_ps(acc_r[k], lane_scale);
            if lo == base && hi == base + 8 {
                _mm256_storeu_ps(dst.add(base - t_begin), scores);
            } else if lo < hi {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), scores);
                for t in lo..hi {
                    *dst.add(t - t_begin) = tmp[t - base];
                }
            }
        }
    }
}

/// See [`super::key_scores`]. `R` query rows, `NC` chunks of 8 tokens per pass (independent
/// accumulators hide the FMA latency).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn key_scores_rows<const R: usize, const NC: usize, U: Unpack8>(
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
    let b = bits as usize;
    let end8 = t_end.div_ceil(8) * 8;
    let mut t0 = t_begin / 8 * 8;
    // Full passes of NC chunks, then single chunks, never reading past the last chunk.
    while t0 + NC * 8 <= end8 {
        let acc = key_pass::<R, NC, U>(&unpack, codes, slot_bytes, b, c0, c1, t0, w, w_stride);
        store_scores::<R, NC>(unpack.lane_scale(), &acc, t0, t_begin, t_end, out, out_stride);
        t0 += NC * 8;
    }
    while t0 < t_end {
        let acc = key_pass::<R, 1, U>(&unpack, codes, slot_bytes, b, c0, c1, t0, w, w_stride);
        store_scores::<R, 1>(unpack.lane_scale(), &acc, t0, t_begin, t_end, out, out_stride);
        t0 += 8;
    }
}

/// `NC` chunks of 8 channels from channel `ch`, accumulated over `tokens` rows, for `R` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_pass<const R: usize, const NC: usize, U: Unpack8>(
    unpack: &U,
    codes: *const u8,
    row_bytes: usize,
    b: usize,
    tokens: usize,
    ch: usize,
    w: *const f32,
    w_stride: usize,
) -> [[__m256; NC]; R] {
    let mut acc = [[_mm256_setzero_ps(); NC]; R];
    let mut p = codes.add(ch * b / 8);
    for t in 0..tokens {
        let mut v = [_mm256_setzero_ps(); NC];
        for (k, vk) in v.iter_mut().enumerate() {
            *vk = unpack.load(p.add(k * b));
        }
        for r in 0..R {
            let wr = _mm256_broadcast_ss(&*w.add(r * w_stride + t));
            for k in 0..NC {
                acc[r][k] = _mm256_fmadd_ps(wr, v[k], acc[r][k]);
            }
        }
        p = p.add(row_bytes);
    }
    acc
}

/// Adds the lanes of `acc` (chunks from channel `ch`) below `c1`, times the unpacker's lane
/// scale, into the accumulator rows.
#[inline(always)]
unsafe fn add_values<const R: usize, const NC: usize>(
    lane_scale: __m256,
    acc: &[[__m256; NC]; R],
    ch: usize,
    c1: usize,
    acc_out: *mut f32,
    acc_stride: usize,
) {
    for k in 0..NC {
        let base = ch + 8 * k;
        let hi = c1.min(base + 8);
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = acc_out.add(r * acc_stride + base);
            let sums = _mm256_mul_ps(acc_r[k], lane_scale);
            if hi == base + 8 {
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), sums));
            } else if base < hi {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), sums);
                for (i, v) in tmp.iter().take(hi - base).enumerate() {
                    *dst.add(i) += v;
                }
            }
        }
    }
}

/// See [`super::value_accumulate`]. `R` rows, `NC` chunks of 8 channels per pass.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn value_accumulate_rows<const R: usize, const NC: usize, U: Unpack8>(
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
    let b = bits as usize;
    let end8 = c0 + (c1 - c0).div_ceil(8) * 8;
    let mut ch = c0;
    while ch + NC * 8 <= end8 {
        let acc = value_pass::<R, NC, U>(&unpack, codes, row_bytes, b, tokens, ch, w, w_stride);
        add_values::<R, NC>(unpack.lane_scale(), &acc, ch, c1, acc_out, acc_stride);
        ch += NC * 8;
    }
    while ch < c1 {
        let acc = value_pass::<R, 1, U>(&unpack, codes, row_bytes, b, tokens, ch, w, w_stride);
        add_values::<R, 1>(unpack.lane_scale(), &acc, ch, c1, acc_out, acc_stride);
        ch += 8;
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $rows:expr, $bits:expr, ($($arg:expr),*)) => {
        if $bits <= 3 {
            dispatch_rows!(@rows $f, MaskUnpack, $rows, ($($arg),*))
        } else {
            dispatch_rows!(@rows $f, ShuffleUnpack, $rows, ($($arg),*))
        }
    };
    (@rows $f:ident, $u:ty, $rows:expr, ($($arg:expr),*)) => {
        match $rows {
            // R·NC accumulators plus the three unpack constants and temporaries stay
            // within the 16 ymm registers.
            1 => $f::<1, 4, $u>($($arg),*),
            2 => $f::<2, 3, $u>($($arg),*),
            3 => $f::<3, 2, $u>($($arg),*),
            4 => $f::<4, 2, $u>($($arg),*),
            5 => $f::<5, 1, $u>($($arg),*),
            6 => $f::<6, 1, $u>($($arg),*),
            7 => $f::<7, 1, $u>($($arg),*),
            8 => $f::<8, 1, $u>($($arg),*),
            n => unreachable!("row batches hold 1..=8 rows, got {n}"),
        }
    };
}

/// # Safety
/// AVX2 and FMA must be available; the caller checked every index against the slices and
/// that `codes` extends [`super::CODE_PADDING`] bytes past the last chunk start.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn key_scores(
    codes: &[u8],
    slot_bytes: usize,
    bits: u8,
    channels: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    weights: &[f32],
    w_stride: usize,
    rows: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    dispatch_rows!(
        key_scores_rows,
        rows,
        bits,
        (
            codes.as_ptr(),
            slot_bytes,
            bits,
            channels.start,
            channels.end,
            tokens.start,
            tokens.end,
            weights.as_ptr(),
            w_stride,
            out.as_mut_ptr(),
            out_stride
        )
    )
}

/// # Safety
/// As [`key_scores`]; `channels.start` is a multiple of 8.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_accumulate(
    codes: &[u8],
    row_bytes: usize,
    bits: u8,
    tokens: usize,
    channels: std::ops::Range<usize>,
    weights: &[f32],
    w_stride: usize,
    rows: usize,
    acc: &mut [f32],
    acc_stride: usize,
) {
    dispatch_rows!(
        value_accumulate_rows,
        rows,
        bits,
        (
            codes.as_ptr(),
            row_bytes,
            bits,
            tokens,
            channels.start,
            channels.end,
            weights.as_ptr(),
            w_stride,
            acc.as_mut_ptr(),
            acc_stride
        )
    )
}

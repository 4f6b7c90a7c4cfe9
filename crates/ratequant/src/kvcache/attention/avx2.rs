//! AVX2 + FMA: 8 codes per vector, for the kernels in [`super::simd`].
//!
//! Eight `b`-bit codes always fill exactly `b` whole bytes. Up to 3 bits they fit one 32-bit
//! word ([`MaskUnpack`]: broadcast, per-lane mask, convert); wider codes take one byte shuffle
//! more ([`ShuffleUnpack`]).

use std::arch::x86_64::*;

use super::simd::{self, Simd, Unpack};

/// The AVX2 vector width.
pub(super) struct Avx2;

impl Simd for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> __m256 {
        _mm256_broadcast_ss(&*p)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        use super::{EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, EXP_ROUND};
        let set = _mm256_set1_ps;
        let x = _mm256_min_ps(_mm256_max_ps(x, set(-87.0)), set(88.0));
        let round = set(EXP_ROUND);
        let n = _mm256_sub_ps(
            _mm256_fmadd_ps(x, set(std::f32::consts::LOG2_E), round),
            round,
        );
        let r = _mm256_fmadd_ps(n, set(-EXP_LN2_HI), x);
        let r = _mm256_fmadd_ps(n, set(-EXP_LN2_LO), r);
        let mut poly = set(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            poly = _mm256_fmadd_ps(poly, r, set(*c));
        }
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(_mm256_castsi256_ps(pow2), poly)
    }
}

/// Up to 3 bits the eight codes fit the low 24 bits of one 32-bit word: broadcast the word and
/// mask lane `i` with `(2^b − 1) << i·b`, leaving `code·2^(i·b)` (below 2^24, exact in f32).
struct MaskUnpack {
    mask: __m256i,
    scale: __m256,
}

impl Unpack<Avx2> for MaskUnpack {
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
    unsafe fn lane_scale(&self) -> __m256 {
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

impl Unpack<Avx2> for ShuffleUnpack {
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
    unsafe fn lane_scale(&self) -> __m256 {
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

/// [`ShuffleUnpack`]'s constants by bit-width ([`simd::shuffle_table`]).
const SHUFFLE_TABLES: [([u8; 32], [i32; 8], [f32; 8]); 9] = {
    let mut t = [([0u8; 32], [0i32; 8], [0f32; 8]); 9];
    let mut b = 1;
    while b <= 8 {
        t[b] = simd::shuffle_table::<8, 32>(b);
        b += 1;
    }
    t
};

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
            1 => simd::$f::<Avx2, $u, 1, 4>($($arg),*),
            2 => simd::$f::<Avx2, $u, 2, 3>($($arg),*),
            3 => simd::$f::<Avx2, $u, 3, 2>($($arg),*),
            4 => simd::$f::<Avx2, $u, 4, 2>($($arg),*),
            5 => simd::$f::<Avx2, $u, 5, 1>($($arg),*),
            6 => simd::$f::<Avx2, $u, 6, 1>($($arg),*),
            7 => simd::$f::<Avx2, $u, 7, 1>($($arg),*),
            8 => simd::$f::<Avx2, $u, 8, 1>($($arg),*),
            n => unreachable!("row batches hold 1..=8 rows, got {n}"),
        }
    };
}

/// # Safety
/// AVX2 and FMA must be available; the caller checked every index against the slices and
/// that `codes` extends [`super::CODE_PADDING`] bytes past the last chunk start.
#[target_feature(enable = "avx2,fma")]
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
#[target_feature(enable = "avx2,fma")]
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

/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax_block(scores: &mut [f32]) -> (f32, f32) {
    simd::softmax_block::<Avx2>(scores)
}

/// # Safety
/// As [`softmax_block`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax_exp(scores: &mut [f32], max: f32) -> f32 {
    simd::softmax_exp::<Avx2>(scores, max)
}

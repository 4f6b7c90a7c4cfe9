//! AVX-512 (F + BW): 16 codes per vector, for the kernels in [`super::simd`].
//!
//! Sixteen `b`-bit codes fill exactly `2b ≤ 16` bytes: load 16 bytes, broadcast them to the
//! four 128-bit blocks, `vpshufb` gives each 32-bit lane the two bytes its code starts in, and
//! a per-lane mask keeps the code in place (`code·2^(bit offset)`, no per-lane shift).

use std::arch::x86_64::*;

use super::simd::{self, Simd, Unpack};

/// The AVX-512 vector width.
pub(super) struct Avx512;

impl Simd for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> __m512 {
        _mm512_set1_ps(*p)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        exp_of_clamped(_mm512_min_ps(_mm512_max_ps(x, set(-87.0)), set(88.0)))
    }
}

/// [`Simd::exp`] of `x ≤ 0` (a softmax's exponents): the same result without the upper
/// clamp, one instruction fewer (NaN, clamped to −87 first, also gives the same).
#[inline(always)]
pub(super) unsafe fn exp_nonpositive(x: __m512) -> __m512 {
    exp_of_clamped(_mm512_max_ps(x, _mm512_set1_ps(-87.0)))
}

/// `e^x` for `x ∈ [−87, 88]`, as the scalar `softmax`'s `exp` computes it.
#[inline(always)]
unsafe fn exp_of_clamped(x: __m512) -> __m512 {
    use super::{EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, EXP_ROUND};
    let set = _mm512_set1_ps;
    let round = set(EXP_ROUND);
    let n = _mm512_sub_ps(
        _mm512_fmadd_ps(x, set(std::f32::consts::LOG2_E), round),
        round,
    );
    let r = _mm512_fmadd_ps(n, set(-EXP_LN2_HI), x);
    let r = _mm512_fmadd_ps(n, set(-EXP_LN2_LO), r);
    let mut poly = set(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        poly = _mm512_fmadd_ps(poly, r, set(*c));
    }
    // poly · 2^n in one instruction; n ∈ [−126, 127] after the clamp, so 2^n is a normal
    // float and the product rounds exactly as the scalar `poly · pow2` does.
    _mm512_scalef_ps(poly, n)
}

/// [`ShuffleUnpack`]'s constants by bit-width ([`simd::shuffle_table`]; 16 bytes are loaded
/// into every 128-bit block).
const SHUFFLE_TABLES: [([u8; 64], [i32; 16], [f32; 16]); 9] = {
    let mut t = [([0u8; 64], [0i32; 16], [0f32; 16]); 9];
    let mut b = 1;
    while b <= 8 {
        t[b] = simd::shuffle_table::<16, 64>(b);
        b += 1;
    }
    t
};

struct ShuffleUnpack {
    ctrl: __m512i,
    mask: __m512i,
    scale: __m512,
}

impl Unpack<Avx512> for ShuffleUnpack {
    #[inline(always)]
    unsafe fn new(bits: u8) -> Self {
        let (ctrl, mask, scale) = &SHUFFLE_TABLES[bits as usize];
        ShuffleUnpack {
            ctrl: _mm512_loadu_si512(ctrl.as_ptr() as *const __m512i),
            mask: _mm512_loadu_si512(mask.as_ptr() as *const __m512i),
            scale: _mm512_loadu_ps(scale.as_ptr()),
        }
    }

    /// Reads 16 bytes.
    #[inline(always)]
    unsafe fn load(&self, p: *const u8) -> __m512 {
        let all = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
        let spread = _mm512_shuffle_epi8(all, self.ctrl);
        _mm512_cvtepi32_ps(_mm512_and_si512(spread, self.mask))
    }

    #[inline(always)]
    unsafe fn lane_scale(&self) -> __m512 {
        self.scale
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $rows:expr, ($($arg:expr),*)) => {
        match $rows {
            // R·NC accumulators plus the three unpack constants and temporaries stay
            // within the 32 zmm registers.
            1 => simd::$f::<Avx512, ShuffleUnpack, 1, 4>($($arg),*),
            2 => simd::$f::<Avx512, ShuffleUnpack, 2, 4>($($arg),*),
            3 => simd::$f::<Avx512, ShuffleUnpack, 3, 4>($($arg),*),
            4 => simd::$f::<Avx512, ShuffleUnpack, 4, 4>($($arg),*),
            5 => simd::$f::<Avx512, ShuffleUnpack, 5, 3>($($arg),*),
            6 => simd::$f::<Avx512, ShuffleUnpack, 6, 3>($($arg),*),
            7 => simd::$f::<Avx512, ShuffleUnpack, 7, 2>($($arg),*),
            8 => simd::$f::<Avx512, ShuffleUnpack, 8, 2>($($arg),*),
            n => unreachable!("row batches hold 1..=8 rows, got {n}"),
        }
    };
}

/// # Safety
/// AVX-512 F and BW must be available; the caller checked every index against the slices and
/// that `codes` extends [`super::CODE_PADDING`] bytes past the last chunk start.
#[target_feature(enable = "avx512f,avx512bw")]
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
#[target_feature(enable = "avx512f,avx512bw")]
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
/// AVX-512 F must be available.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softmax_block(scores: &mut [f32]) -> (f32, f32) {
    simd::softmax_block::<Avx512>(scores)
}

/// # Safety
/// As [`softmax_block`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn softmax_exp(scores: &mut [f32], max: f32) -> f32 {
    simd::softmax_exp::<Avx512>(scores, max)
}

/// See [`super::axpy_f16_rows`]: `R ≤ 4` rows of a 64-wide head, the sums in registers for
/// all positions (each element gets the same `acc + p·v` in the same order as
/// [`super::axpy`]), the f16 rows prefetched a few rows ahead.
#[target_feature(enable = "avx512f,f16c")]
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn axpy_f16_rows_64<const R: usize>(
    p: &[f32],
    p_stride: usize,
    v: &[half::f16],
    acc: &mut [f32],
) {
    const D: usize = 64;
    let n = v.len() / D;
    let (pp, vp, ap) = (p.as_ptr(), v.as_ptr() as *const u16, acc.as_mut_ptr());
    let mut sums = [[_mm512_setzero_ps(); 4]; R];
    for r in 0..R {
        for c in 0..4 {
            sums[r][c] = _mm512_loadu_ps(ap.add(r * D + 16 * c));
        }
    }
    for i in 0..n {
        super::prefetch_ahead_by::<{ 8 * 2 * D }>(vp.add(i * D) as *const u8, 2 * D);
        let row: [__m512; 4] = std::array::from_fn(|c| {
            _mm512_cvtph_ps(_mm256_loadu_si256(vp.add(i * D + 16 * c) as *const _))
        });
        for r in 0..R {
            let w = _mm512_set1_ps(*pp.add(r * p_stride + i));
            for c in 0..4 {
                sums[r][c] = _mm512_add_ps(sums[r][c], _mm512_mul_ps(w, row[c]));
            }
        }
    }
    for r in 0..R {
        for c in 0..4 {
            _mm512_storeu_ps(ap.add(r * D + 16 * c), sums[r][c]);
        }
    }
}

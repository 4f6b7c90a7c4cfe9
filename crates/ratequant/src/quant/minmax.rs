//! Shared asymmetric min-max arithmetic: f16 parameter rounding, the quantization grid of one
//! group, and the element kernels every design uses.
//!
//! All functions here are `#[inline(always)]` so that the block kernels in `engine` can be
//! compiled several times, once per instruction set (see `engine::Isa`), and still be one
//! loop nest LLVM can vectorise. The arithmetic never uses fused multiply-add or any
//! instruction-set-dependent rounding, so every compiled variant gives identical bits.

/// Largest finite f16 value.
pub(crate) const F16_MAX: f32 = 65504.0;
/// Smallest positive normal f16 value, 2^-14.
const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;
/// 2^24: f16 subnormals are the multiples of 2^-24.
const TWO_POW_24: f32 = 16_777_216.0;
/// Adding 1.5·2^23 to a float in [0, 2^22) rounds it to the nearest integer (ties to even),
/// which then sits in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Round-to-nearest-even of `t` for |t| < 2^22, as `ROUND_MAGIC`-offset arithmetic.
#[inline(always)]
fn round_small(t: f32) -> f32 {
    (t + ROUND_MAGIC) - ROUND_MAGIC
}

/// The largest f16-representable value `≤ v`, as an f32 (exact for finite `v` with
/// `|v| ≤ 65504`; larger magnitudes fail the range check in [`Grid::fits_f16`]).
#[inline(always)]
pub(crate) fn f16_round_down(v: f32) -> f32 {
    let bits = v.to_bits();
    // Normal range: f16 keeps 10 of f32's 23 mantissa bits. Clearing the low 13 bits rounds
    // the magnitude down, so it rounds positives down; negatives need the magnitude rounded up.
    let normal = if v >= 0.0 {
        bits & !0x1FFF
    } else {
        bits.wrapping_add(0x1FFF) & !0x1FFF
    };
    // Subnormal range: multiples of 2^-24; floor(t) = round(t) − (round(t) > t).
    let t = v * TWO_POW_24;
    let r = round_small(t);
    let floor = if r > t { r - 1.0 } else { r };
    if v.abs() < F16_MIN_NORMAL {
        floor * (1.0 / TWO_POW_24)
    } else {
        f32::from_bits(normal)
    }
}

/// The smallest f16-representable value `≥ v` (+0, never −0, for a zero `v`).
#[inline(always)]
pub(crate) fn f16_round_up(v: f32) -> f32 {
    0.0 - f16_round_down(-v)
}

/// The next f16 value above a non-negative f16-representable `v`.
#[inline(always)]
fn f16_next_up_nonneg(v: f32) -> f32 {
    if v < F16_MIN_NORMAL {
        v + 1.0 / TWO_POW_24
    } else {
        f32::from_bits(v.to_bits() + 0x2000)
    }
}

/// f16 bit pattern of an f32 that is exactly representable in f16 (no rounding happens).
#[inline(always)]
pub(crate) fn f16_bits_exact(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let magnitude = v.abs();
    let normal = ((bits & 0x7FFF_FFFF) >> 13).wrapping_sub((127 - 15) << 10) as u16;
    // `magnitude·2^24` is an integer below 2^10 here; read it from the mantissa after the
    // rounding offset rather than by a float-to-int cast, so that loops of this vectorise
    let subnormal = (magnitude * TWO_POW_24 + ROUND_MAGIC).to_bits() as u16;
    sign | if magnitude < F16_MIN_NORMAL {
        subnormal
    } else {
        normal
    }
}

/// Value of finite f16 bits (decode checks the metadata is finite first).
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let magnitude = (h & 0x7FFF) as u32;
    let normal = f32::from_bits(sign | ((magnitude << 13) + ((127 - 15) << 23)));
    let subnormal = f32::from_bits(sign | (magnitude as f32 * (1.0 / TWO_POW_24)).to_bits());
    if magnitude < 0x0400 {
        subnormal
    } else {
        normal
    }
}

/// `2^bits − 1` as f32.
#[inline(always)]
pub(crate) fn levels(bits: u8) -> f32 {
    ((1u32 << bits) - 1) as f32
}

/// Quantization grid of one group: reconstruction `zero + scale·code`, code in `0..=levels`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grid {
    /// Group minimum rounded down to f16.
    pub zero: f32,
    /// Step, rounded up to f16 so that `zero + scale·levels ≥ max`.
    pub scale: f32,
    /// `1 / scale`, or 0 for a constant group (scale 0), whose codes are then all 0.
    pub inv_scale: f32,
}

impl Grid {
    /// Grid covering `[lo, hi]` with `levels + 1` points and f16 parameters.
    #[inline(always)]
    pub fn covering(lo: f32, hi: f32, levels: f32) -> Grid {
        let zero = f16_round_down(lo);
        let scale = f16_round_up((hi - zero) / levels);
        // The f32 subtraction and division may round the quotient down by an ulp; one f16
        // step up then restores the coverage of `hi`.
        let scale = if zero + scale * levels < hi {
            f16_next_up_nonneg(scale)
        } else {
            scale
        };
        let inv_scale = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        Grid {
            zero,
            scale,
            inv_scale,
        }
    }

    /// Whether zero-point and scale are finite f16 values (false for ranges beyond ±65504 or
    /// a step above 65504).
    #[inline(always)]
    pub fn fits_f16(&self) -> bool {
        self.zero >= -F16_MAX && self.zero <= F16_MAX && self.scale <= F16_MAX
    }

    /// Integer code of `x` (round to nearest, clamped to `0..=levels`).
    #[cfg(test)]
    pub fn code(&self, x: f32, levels: f32) -> u8 {
        code(x, self.zero, self.inv_scale, levels)
    }

    /// `value(code(x))` without leaving the float domain; identical bits.
    #[cfg(test)]
    pub fn fake(&self, x: f32, levels: f32) -> f32 {
        fake(x, self.zero, self.scale, self.inv_scale, levels)
    }
}

// The element operations as free functions of the grid's parts, so that kernels holding
// per-channel grids as separate arrays (structure of arrays) vectorise across channels.

/// Code of `x` plus `ROUND_MAGIC`: the low mantissa bits hold the integer code.
#[inline(always)]
fn code_magic(x: f32, zero: f32, inv_scale: f32, levels: f32) -> f32 {
    let t = (x - zero) * inv_scale;
    let t = if t < 0.0 { 0.0 } else { t };
    let t = if t > levels { levels } else { t };
    t + ROUND_MAGIC
}

/// Integer code of `x`: `round((x − zero)/scale)` clamped to `0..=levels`.
#[inline(always)]
pub(crate) fn code(x: f32, zero: f32, inv_scale: f32, levels: f32) -> u8 {
    code_magic(x, zero, inv_scale, levels).to_bits() as u8
}

/// Reconstruction `zero + scale·code`.
#[inline(always)]
pub(crate) fn value(code: u8, zero: f32, scale: f32) -> f32 {
    zero + scale * code as f32
}

/// `value(code(x))`, bit-identical, without the integer round trip.
#[inline(always)]
pub(crate) fn fake(x: f32, zero: f32, scale: f32, inv_scale: f32, levels: f32) -> f32 {
    zero + scale * (code_magic(x, zero, inv_scale, levels) - ROUND_MAGIC)
}

/// Grids of many groups from their ranges, one vectorised loop; false if any does not fit f16.
#[inline(always)]
pub(crate) fn grids_of_ranges(
    lo: &[f32],
    hi: &[f32],
    levels: f32,
    zero: &mut [f32],
    scale: &mut [f32],
    inv_scale: &mut [f32],
) -> bool {
    let n = lo.len();
    let (hi, zero, scale, inv_scale) = (
        &hi[..n],
        &mut zero[..n],
        &mut scale[..n],
        &mut inv_scale[..n],
    );
    let mut misfits = 0u32;
    for k in 0..n {
        let grid = Grid::covering(lo[k], hi[k], levels);
        zero[k] = grid.zero;
        scale[k] = grid.scale;
        inv_scale[k] = grid.inv_scale;
        misfits += !grid.fits_f16() as u32;
    }
    misfits == 0
}

/// The range `[lo, hi]` shrunk about its midpoint to `ratio` of its width.
#[inline(always)]
pub(crate) fn clip_range(lo: f32, hi: f32, ratio: f32) -> (f32, f32) {
    let mid = 0.5 * (lo + hi);
    let half = 0.5 * (hi - lo) * ratio;
    (mid - half, mid + half)
}

const LANES: usize = 16;

/// Minimum and maximum of a non-empty slice, and whether every element is finite; with
/// `AVX2` (only inside AVX2-enabled code) by the hand-written kernel.
#[inline(always)]
pub(crate) fn min_max<const AVX2: bool>(x: &[f32]) -> (f32, f32, bool) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: callers instantiate AVX2 = true only after detecting AVX2 at run time.
        return unsafe { avx2::min_max(x) };
    }
    min_max_scalar(x)
}

/// Minimum and maximum of each run of `group` consecutive values of `x` (the last run may
/// be shorter) into `lo` and `hi`, and whether every value is finite. With `AVX2`, whole
/// runs of a multiple of 8 values share transposing reductions, eight runs at a time.
#[inline(always)]
pub(crate) fn group_ranges<const AVX2: bool>(
    x: &[f32],
    group: usize,
    lo: &mut [f32],
    hi: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if AVX2 && group.is_multiple_of(8) && x.len().is_multiple_of(group) {
        // SAFETY: callers instantiate AVX2 = true only after detecting AVX2 at run time.
        return unsafe { avx2::group_min_max(x, group, lo, hi) };
    }
    let mut finite = true;
    for ((part, l), h) in x.chunks(group).zip(lo.iter_mut()).zip(hi.iter_mut()) {
        let (min, max, ok) = min_max::<AVX2>(part);
        (*l, *h) = (min, max);
        finite &= ok;
    }
    finite
}

/// Portable [`min_max`] (the reference the AVX2 kernel is tested against).
#[inline(always)]
pub(crate) fn min_max_scalar(x: &[f32]) -> (f32, f32, bool) {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    // `v·0` is ±0 for finite v and NaN for ±inf/NaN; NaN is sticky under addition.
    let mut poison = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for i in 0..LANES {
            let v = chunk[i];
            lo[i] = if v < lo[i] { v } else { lo[i] };
            hi[i] = if v > hi[i] { v } else { hi[i] };
            poison[i] += v * 0.0;
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        poison[i] += v * 0.0;
    }
    // halving tree: each step is one vector operation on the upper and lower halves
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lo[i] = if lo[i + width] < lo[i] {
                lo[i + width]
            } else {
                lo[i]
            };
            hi[i] = if hi[i + width] > hi[i] {
                hi[i + width]
            } else {
                hi[i]
            };
            poison[i] += poison[i + width];
        }
        width /= 2;
    }
    (lo[0], hi[0], poison[0] == 0.0)
}

/// Per-channel minimum and maximum of channels `c0..c0+W` over the rows (stride `head_dim`)
/// of `xs`, and whether they are all finite.
#[inline(always)]
pub(crate) fn column_min_max<const W: usize, const AVX2: bool>(
    xs: &[f32],
    head_dim: usize,
    c0: usize,
) -> ([f32; W], [f32; W], bool) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 && W == 16 {
        // SAFETY: callers instantiate AVX2 = true only after detecting AVX2 at run time.
        let (lo, hi, finite) = unsafe { avx2::column_min_max16(xs, head_dim, c0) };
        let mut lo_w = [0.0; W];
        let mut hi_w = [0.0; W];
        lo_w.copy_from_slice(&lo);
        hi_w.copy_from_slice(&hi);
        return (lo_w, hi_w, finite);
    }
    column_min_max_scalar::<W>(xs, head_dim, c0)
}

/// Portable [`column_min_max`].
#[inline(always)]
pub(crate) fn column_min_max_scalar<const W: usize>(
    xs: &[f32],
    head_dim: usize,
    c0: usize,
) -> ([f32; W], [f32; W], bool) {
    let mut lo = [f32::INFINITY; W];
    let mut hi = [f32::NEG_INFINITY; W];
    let mut poison = [0.0f32; W];
    for row in xs.chunks_exact(head_dim) {
        let v: &[f32; W] = row[c0..c0 + W].try_into().expect("W channels");
        for i in 0..W {
            lo[i] = if v[i] < lo[i] { v[i] } else { lo[i] };
            hi[i] = if v[i] > hi[i] { v[i] } else { hi[i] };
            poison[i] += v[i] * 0.0;
        }
    }
    let mut finite = true;
    for p in poison {
        finite &= p == 0.0;
    }
    (lo, hi, finite)
}

/// Hand-written AVX2 range kernels: LLVM does not vectorise the min/max reductions well.
/// Minima and maxima are exact whatever the instruction set, so results are identical to
/// the portable versions (tests compare them); only the sign of a zero extreme can differ,
/// which no reconstruction depends on.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal minimum, maximum and sum of the eight lanes.
    #[target_feature(enable = "avx2")]
    fn reduce(lo: __m256, hi: __m256, poison: __m256) -> (f32, f32, f32) {
        let lo = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps(lo, 1));
        let lo = _mm_min_ps(lo, _mm_movehl_ps(lo, lo));
        let lo = _mm_min_ss(lo, _mm_shuffle_ps(lo, lo, 1));
        let hi = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps(hi, 1));
        let hi = _mm_max_ps(hi, _mm_movehl_ps(hi, hi));
        let hi = _mm_max_ss(hi, _mm_shuffle_ps(hi, hi, 1));
        let p = _mm_add_ps(
            _mm256_castps256_ps128(poison),
            _mm256_extractf128_ps(poison, 1),
        );
        let p = _mm_add_ps(p, _mm_movehl_ps(p, p));
        let p = _mm_add_ss(p, _mm_shuffle_ps(p, p, 1));
        (_mm_cvtss_f32(lo), _mm_cvtss_f32(hi), _mm_cvtss_f32(p))
    }

    /// [`super::min_max`] with 8-lane AVX2 vectors.
    #[target_feature(enable = "avx2")]
    pub(crate) fn min_max(x: &[f32]) -> (f32, f32, bool) {
        let mut lo = _mm256_set1_ps(f32::INFINITY);
        let mut hi = _mm256_set1_ps(f32::NEG_INFINITY);
        // `v·0` is ±0 for finite v and NaN for ±inf/NaN; NaN is sticky under addition.
        let mut poison = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact(8);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds 8 floats.
            let v = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
            lo = _mm256_min_ps(v, lo);
            hi = _mm256_max_ps(v, hi);
            poison = _mm256_add_ps(poison, _mm256_mul_ps(v, _mm256_setzero_ps()));
        }
        let (mut min, mut max, mut poisoned) = reduce(lo, hi, poison);
        for &v in chunks.remainder() {
            min = if v < min { v } else { min };
            max = if v > max { v } else { max };
            poisoned += v * 0.0;
        }
        (min, max, poisoned == 0.0)
    }

    /// Minimum and maximum of each 8-lane vector in `v`, lane `i` of the results for `v[i]`:
    /// a transposing reduction (three levels of unpack/shuffle/permute) that costs about as
    /// much as one horizontal reduction for all eight.
    #[target_feature(enable = "avx2")]
    fn reduce8(v: [__m256; 8], op: impl Fn(__m256, __m256) -> __m256) -> __m256 {
        // (written out: closures handed to `array::map` would not be inlined here)
        // level 1: per 128-bit half, lanes 0/2 and 1/3 of vectors i and i + 1 combined
        let pair = |i: usize| {
            op(
                _mm256_unpacklo_ps(v[i], v[i + 1]),
                _mm256_unpackhi_ps(v[i], v[i + 1]),
            )
        };
        let pairs = [pair(0), pair(2), pair(4), pair(6)];
        // level 2: per 128-bit half, one lane for each of vectors i..i + 4
        let quad = |i: usize| {
            op(
                _mm256_shuffle_ps::<0b01_00_01_00>(pairs[i], pairs[i + 1]),
                _mm256_shuffle_ps::<0b11_10_11_10>(pairs[i], pairs[i + 1]),
            )
        };
        let quads = [quad(0), quad(2)];
        // level 3: the two halves of each
        op(
            _mm256_permute2f128_ps::<0x20>(quads[0], quads[1]),
            _mm256_permute2f128_ps::<0x31>(quads[0], quads[1]),
        )
    }

    /// Minimum and maximum of each run of `group` consecutive values of `x` (`group` a
    /// multiple of 8, `x.len()` a multiple of `group`) into `lo` and `hi`, and whether every
    /// value is finite; eight groups share one transposing reduction.
    #[target_feature(enable = "avx2")]
    pub(crate) fn group_min_max(x: &[f32], group: usize, lo: &mut [f32], hi: &mut [f32]) -> bool {
        debug_assert!(group.is_multiple_of(8) && x.len().is_multiple_of(group));
        let n = x.len() / group;
        let (lo, hi) = (&mut lo[..n], &mut hi[..n]);
        // Finiteness from a sum of the values: finite values keep it finite unless it
        // overflows, a NaN or infinity makes it non-finite; only then are the values checked
        // one by one. (Two partial sums per group halve its chain of dependent additions.)
        let mut sum = _mm256_setzero_ps();
        // partial extremes of one group, 8 lanes each
        let mut partial = |g: &[f32]| {
            let mut l = _mm256_set1_ps(f32::INFINITY);
            let mut h = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut s = [_mm256_setzero_ps(); 2];
            let mut pairs = g.chunks_exact(16);
            for pair in &mut pairs {
                // SAFETY: the pair holds 16 floats.
                let (v0, v1) = unsafe {
                    (
                        _mm256_loadu_ps(pair.as_ptr()),
                        _mm256_loadu_ps(pair.as_ptr().add(8)),
                    )
                };
                l = _mm256_min_ps(v0, _mm256_min_ps(v1, l));
                h = _mm256_max_ps(v0, _mm256_max_ps(v1, h));
                s = [_mm256_add_ps(s[0], v0), _mm256_add_ps(s[1], v1)];
            }
            if let Some(chunk) = pairs.remainder().get(..8) {
                // SAFETY: the chunk holds 8 floats.
                let v = unsafe { _mm256_loadu_ps(chunk.as_ptr()) };
                l = _mm256_min_ps(v, l);
                h = _mm256_max_ps(v, h);
                s[0] = _mm256_add_ps(s[0], v);
            }
            sum = _mm256_add_ps(sum, _mm256_add_ps(s[0], s[1]));
            (l, h)
        };
        let mut groups = x.chunks_exact(group);
        let mut k = 0;
        while k + 8 <= n {
            let mut l = [_mm256_setzero_ps(); 8];
            let mut h = [_mm256_setzero_ps(); 8];
            for i in 0..8 {
                (l[i], h[i]) = partial(groups.next().expect("8 more groups"));
            }
            let (l, h) = (
                reduce8(l, |a, b| _mm256_min_ps(a, b)),
                reduce8(h, |a, b| _mm256_max_ps(a, b)),
            );
            // SAFETY: `lo` and `hi` hold groups k..k + 8.
            unsafe {
                _mm256_storeu_ps(lo[k..k + 8].as_mut_ptr(), l);
                _mm256_storeu_ps(hi[k..k + 8].as_mut_ptr(), h);
            }
            k += 8;
        }
        let mut finite = true;
        for (g, (l, h)) in groups.zip(lo[k..].iter_mut().zip(&mut hi[k..])) {
            let (min, max, ok) = min_max(g);
            (*l, *h) = (min, max);
            finite &= ok;
        }
        let (_, _, total) = reduce(sum, sum, sum);
        finite && (total.is_finite() || x.iter().all(|v| v.is_finite()))
    }

    /// [`super::column_min_max`] of 16 channels: two vectors per row.
    #[target_feature(enable = "avx2")]
    pub(crate) fn column_min_max16(
        xs: &[f32],
        head_dim: usize,
        c0: usize,
    ) -> ([f32; 16], [f32; 16], bool) {
        let mut lo = [_mm256_set1_ps(f32::INFINITY); 2];
        let mut hi = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
        // Finiteness from sums of the values, as in `group_min_max`; even and odd rows sum
        // apart, halving the chains of dependent additions.
        let mut sum = [_mm256_setzero_ps(); 4];
        let mut step = |row: &[f32], sum: &mut [__m256]| {
            let v = &row[c0..c0 + 16];
            for h in 0..2 {
                // SAFETY: `v` holds 16 floats.
                let v = unsafe { _mm256_loadu_ps(v.as_ptr().add(8 * h)) };
                lo[h] = _mm256_min_ps(v, lo[h]);
                hi[h] = _mm256_max_ps(v, hi[h]);
                sum[h] = _mm256_add_ps(sum[h], v);
            }
        };
        let mut pairs = xs.chunks_exact(2 * head_dim);
        for pair in &mut pairs {
            let (even, odd) = pair.split_at(head_dim);
            let (sum_even, sum_odd) = sum.split_at_mut(2);
            step(even, sum_even);
            step(odd, sum_odd);
        }
        if let Some(row) = pairs.remainder().get(..head_dim) {
            step(row, &mut sum[..2]);
        }
        let mut lo_out = [0.0f32; 16];
        let mut hi_out = [0.0f32; 16];
        let mut sum_out = [0.0f32; 16];
        for h in 0..2 {
            // SAFETY: each destination half holds 8 floats.
            unsafe {
                _mm256_storeu_ps(lo_out.as_mut_ptr().add(8 * h), lo[h]);
                _mm256_storeu_ps(hi_out.as_mut_ptr().add(8 * h), hi[h]);
                _mm256_storeu_ps(
                    sum_out.as_mut_ptr().add(8 * h),
                    _mm256_add_ps(sum[h], sum[2 + h]),
                );
            }
        }
        let finite = sum_out.iter().all(|s| s.is_finite())
            || xs
                .chunks_exact(head_dim)
                .all(|row| row[c0..c0 + 16].iter().all(|v| v.is_finite()));
        (lo_out, hi_out, finite)
    }
}

/// `v` clamped into `[lo, hi]`.
#[inline(always)]
fn clamp(v: f32, lo: f32, hi: f32) -> f32 {
    let v = if v < lo { lo } else { v };
    if v > hi {
        hi
    } else {
        v
    }
}

/// The grid of every channel of one token row, structure-of-arrays: per-channel groups share
/// one row of grids over a token group; per-token groups repeat each group's grid over its
/// channels. With grids laid out like the row, every element kernel is one long loop over
/// the row that vectorises whatever the group size.
pub(crate) struct RowGrids {
    pub zero: Vec<f32>,
    pub scale: Vec<f32>,
    pub inv_scale: Vec<f32>,
    /// Clamp range (QuaRot's clipped range); only read by the `_clamped` kernels.
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
}

impl RowGrids {
    pub fn new(head_dim: usize) -> Self {
        let row = vec![0.0; head_dim];
        RowGrids {
            zero: row.clone(),
            scale: row.clone(),
            inv_scale: row.clone(),
            lo: row.clone(),
            hi: row,
        }
    }

    /// Gives channels `start..end` the grid `grid` and clamp range `[lo, hi]`.
    #[inline(always)]
    pub fn fill(&mut self, start: usize, end: usize, grid: Grid, lo: f32, hi: f32) {
        self.zero[start..end].fill(grid.zero);
        self.scale[start..end].fill(grid.scale);
        self.inv_scale[start..end].fill(grid.inv_scale);
        self.lo[start..end].fill(lo);
        self.hi[start..end].fill(hi);
    }
}

/// Integer codes of a row.
#[inline(always)]
pub(crate) fn code_row(src: &[f32], codes: &mut [u8], g: &RowGrids, levels: f32) {
    let n = src.len();
    let (codes, zero, inv) = (&mut codes[..n], &g.zero[..n], &g.inv_scale[..n]);
    for i in 0..n {
        codes[i] = code(src[i], zero[i], inv[i], levels);
    }
}

/// Integer codes of a row whose values are first clamped into the grids' clamp ranges.
#[inline(always)]
pub(crate) fn code_row_clamped(src: &[f32], codes: &mut [u8], g: &RowGrids, levels: f32) {
    let n = src.len();
    let (codes, zero, inv) = (&mut codes[..n], &g.zero[..n], &g.inv_scale[..n]);
    let (lo, hi) = (&g.lo[..n], &g.hi[..n]);
    for i in 0..n {
        codes[i] = code(clamp(src[i], lo[i], hi[i]), zero[i], inv[i], levels);
    }
}

/// `value(code(x))` of a row.
#[inline(always)]
pub(crate) fn fake_row(src: &[f32], dst: &mut [f32], g: &RowGrids, levels: f32) {
    let n = src.len();
    let (dst, zero, scale, inv) = (
        &mut dst[..n],
        &g.zero[..n],
        &g.scale[..n],
        &g.inv_scale[..n],
    );
    for i in 0..n {
        dst[i] = fake(src[i], zero[i], scale[i], inv[i], levels);
    }
}

/// `value(code(x))` of a row whose values are first clamped into the grids' clamp ranges.
#[inline(always)]
pub(crate) fn fake_row_clamped(src: &[f32], dst: &mut [f32], g: &RowGrids, levels: f32) {
    let n = src.len();
    let (dst, zero, scale, inv) = (
        &mut dst[..n],
        &g.zero[..n],
        &g.scale[..n],
        &g.inv_scale[..n],
    );
    let (lo, hi) = (&g.lo[..n], &g.hi[..n]);
    for i in 0..n {
        dst[i] = fake(
            clamp(src[i], lo[i], hi[i]),
            zero[i],
            scale[i],
            inv[i],
            levels,
        );
    }
}

/// Reconstructions of a row of codes.
#[inline(always)]
pub(crate) fn value_row(codes: &[u8], dst: &mut [f32], g: &RowGrids) {
    let n = codes.len();
    let (dst, zero, scale) = (&mut dst[..n], &g.zero[..n], &g.scale[..n]);
    for i in 0..n {
        dst[i] = value(codes[i], zero[i], scale[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// The next f16 value above the f16 value `h` (finite, not the largest).
    fn next_f16_above(h: f16) -> f32 {
        let bits = h.to_bits();
        let next = if bits == 0x8000 {
            1 // -0 → smallest positive subnormal
        } else if bits & 0x8000 == 0 {
            bits + 1
        } else {
            bits - 1
        };
        f16::from_bits(next).to_f32()
    }

    fn check_round_down(v: f32) {
        let down = f16_round_down(v);
        let down_h = f16::from_f32(down);
        assert_eq!(down_h.to_f32(), down, "{v}: {down} is not an f16 value");
        assert!(down <= v, "{v}: round-down {down} > v");
        assert!(
            down == v || next_f16_above(down_h) > v,
            "{v}: {down} is not the largest f16 ≤ v"
        );
        assert_eq!(
            f16_bits_exact(down),
            down_h.to_bits(),
            "{v}: bits of {down}"
        );
        let up = f16_round_up(v);
        assert!(
            up >= v && f16::from_f32(up).to_f32() == up,
            "{v}: round-up {up}"
        );
    }

    #[test]
    fn f16_rounding_directions_against_half() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for &v in &[
            0.0f32, -0.0, 1.0, -1.0, 1.0001, -1.0001, 65504.0, -65504.0, 6.1e-5, -6.1e-5, 3e-8,
            -3e-8, 1e-7, 0.1, -0.1, 1000.3, -1000.3,
        ] {
            check_round_down(v);
        }
        for _ in 0..100_000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let exponent = ((state >> 40) % 40) as i32 - 28; // 2^-28 .. 2^11
            let mantissa = (state >> 11) as f64 / (1u64 << 53) as f64;
            let sign = if state & 1 == 0 { 1.0 } else { -1.0 };
            let v = (sign * (1.0 + mantissa) * 2f64.powi(exponent)) as f32;
            check_round_down(v);
        }
    }

    #[test]
    fn all_finite_f16_values_convert_exactly() {
        for h in 0..=u16::MAX {
            let v = f16::from_bits(h);
            if !v.is_finite() {
                continue;
            }
            let f = f16_bits_to_f32(h);
            assert_eq!(f.to_bits(), v.to_f32().to_bits(), "bits {h:#06x}");
            assert_eq!(f16_bits_exact(f), h, "bits {h:#06x}");
        }
    }

    #[test]
    fn grid_covers_range_and_codes_round_to_nearest() {
        let grid = Grid::covering(0.0, 3.0, 3.0);
        assert_eq!((grid.zero, grid.scale), (0.0, 1.0));
        assert_eq!(grid.code(1.49, 3.0), 1);
        assert_eq!(grid.code(1.51, 3.0), 2);
        assert_eq!(grid.code(-5.0, 3.0), 0);
        assert_eq!(grid.code(7.0, 3.0), 3);
        assert_eq!(grid.fake(2.6, 3.0), 3.0);
        // constant group: no division by zero, exact
        let grid = Grid::covering(0.75, 0.75, 15.0);
        assert_eq!((grid.zero, grid.scale, grid.inv_scale), (0.75, 0.0, 0.0));
        assert_eq!(grid.fake(0.75, 15.0), 0.75);
        // a range that needs rounding: the grid top still covers hi
        let grid = Grid::covering(-0.1, 0.7, 3.0);
        assert!(grid.zero <= -0.1 && grid.zero + 3.0 * grid.scale >= 0.7);
    }

    #[test]
    fn min_max_detects_non_finite() {
        let mut x: Vec<f32> = (0..37).map(|i| i as f32 - 10.0).collect();
        assert_eq!(min_max_scalar(&x), (-10.0, 26.0, true));
        x[33] = f32::NAN;
        assert!(!min_max_scalar(&x).2);
        x[33] = f32::NEG_INFINITY;
        assert!(!min_max_scalar(&x).2);
    }

    /// The AVX2 range kernels against the portable ones, non-finite values included.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_ranges_match_scalar() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut state = 12345u64;
        for len in 1..200usize {
            let mut x: Vec<f32> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.3) * 7.0
                })
                .collect();
            // SAFETY: AVX2 detected above.
            let simd = unsafe { avx2::min_max(&x) };
            assert_eq!(simd, min_max_scalar(&x), "len {len}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let keep = x[len / 2];
                x[len / 2] = bad;
                // SAFETY: AVX2 detected above.
                assert!(!unsafe { avx2::min_max(&x) }.2, "len {len}: {bad} missed");
                x[len / 2] = keep;
            }
            if len % 16 == 0 {
                // SAFETY: AVX2 detected above.
                let simd = unsafe { avx2::column_min_max16(&x, 16, 0) };
                assert_eq!(simd, column_min_max_scalar::<16>(&x, 16, 0), "len {len}");
                x[len - 3] = f32::NAN;
                // SAFETY: AVX2 detected above.
                assert!(!unsafe { avx2::column_min_max16(&x, 16, 0) }.2);
            }
        }
    }

    /// The batched AVX2 group ranges against the portable range of each group: group sizes
    /// that are and are not multiples of 8, group counts around the batches of 8, a short
    /// last group, non-finite values in any batch or in the remainder.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_group_ranges_match_scalar() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut state = 777u64;
        for group in [1usize, 5, 8, 16, 24, 32, 40, 128] {
            for groups in [1usize, 7, 8, 9, 16, 17, 23] {
                for short in [0usize, 3] {
                    let len = groups * group - short.min(group - 1);
                    let mut x: Vec<f32> = (0..len)
                        .map(|i| {
                            state = state
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 9.0;
                            // constant stretches and signed zeros as well
                            if i % 11 < 3 {
                                0.0
                            } else if i % 11 == 3 {
                                -0.0
                            } else {
                                v
                            }
                        })
                        .collect();
                    let n = len.div_ceil(group);
                    let (mut lo, mut hi) = (vec![0.0; n], vec![0.0; n]);
                    assert!(group_ranges::<true>(&x, group, &mut lo, &mut hi));
                    for (k, part) in x.chunks(group).enumerate() {
                        let (min, max, ok) = min_max_scalar(part);
                        assert!(ok);
                        // equal as values: only the sign of a zero extreme may differ
                        assert!(lo[k] == min && hi[k] == max, "group {group} #{k}");
                    }
                    for at in [0, len / 2, len - 1] {
                        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                            let keep = x[at];
                            x[at] = bad;
                            let ok = group_ranges::<true>(&x, group, &mut lo, &mut hi);
                            assert!(!ok, "group {group} len {len}: {bad} at {at} missed");
                            x[at] = keep;
                        }
                    }
                }
            }
        }
    }

    /// The AVX2 range kernels read finiteness from sums of the values: finite values whose
    /// sums overflow are still finite, and a non-finite value among them is still found.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_ranges_finite_despite_overflowing_sums() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut x: Vec<f32> = (0..64 * 16)
            .map(|i| f32::MAX * if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        let (mut lo, mut hi) = ([0.0; 64], [0.0; 64]);
        assert!(group_ranges::<true>(&x, 16, &mut lo, &mut hi));
        assert_eq!((lo[5], hi[5]), (-f32::MAX, f32::MAX));
        // SAFETY: AVX2 detected above.
        let (clo, chi, ok) = unsafe { avx2::column_min_max16(&x, 16, 0) };
        assert!(ok);
        assert_eq!((clo, chi, ok), column_min_max_scalar::<16>(&x, 16, 0));
        x[700] = f32::NAN;
        assert!(!group_ranges::<true>(&x, 16, &mut lo, &mut hi));
        // SAFETY: AVX2 detected above.
        assert!(!unsafe { avx2::column_min_max16(&x, 16, 0) }.2);
    }
}

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
    let subnormal = (magnitude * TWO_POW_24) as u16;
    sign | if magnitude < F16_MIN_NORMAL {
        subnormal
    } else {
        normal
    }
}

/// Value of finite f16 bits (callers check [`f16_bits_finite`] first).
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

/// Whether f16 bits encode a finite value.
#[inline(always)]
pub(crate) fn f16_bits_finite(h: u16) -> bool {
    h & 0x7C00 != 0x7C00
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

    /// Grid from stored f16 parameters (decode side).
    #[inline(always)]
    pub fn from_f16_bits(zero: u16, scale: u16) -> Grid {
        let zero = f16_bits_to_f32(zero);
        let scale = f16_bits_to_f32(scale);
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
    #[inline(always)]
    pub fn code(&self, x: f32, levels: f32) -> u8 {
        code(x, self.zero, self.inv_scale, levels)
    }

    /// Reconstruction of an integer code.
    #[inline(always)]
    pub fn value(&self, code: u8) -> f32 {
        value(code, self.zero, self.scale)
    }

    /// `value(code(x))` without leaving the float domain; identical bits.
    #[inline(always)]
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

/// The range `[lo, hi]` shrunk about its midpoint to `ratio` of its width.
#[inline(always)]
pub(crate) fn clip_range(lo: f32, hi: f32, ratio: f32) -> (f32, f32) {
    let mid = 0.5 * (lo + hi);
    let half = 0.5 * (hi - lo) * ratio;
    (mid - half, mid + half)
}

const LANES: usize = 16;

/// Minimum and maximum of a non-empty slice, and whether every element is finite.
#[inline(always)]
pub(crate) fn min_max(x: &[f32]) -> (f32, f32, bool) {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    // `v − v` is 0 for finite v and NaN for ±inf/NaN; NaN is sticky under addition.
    let mut poison = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for i in 0..LANES {
            let v = chunk[i];
            lo[i] = if v < lo[i] { v } else { lo[i] };
            hi[i] = if v > hi[i] { v } else { hi[i] };
            poison[i] += v - v;
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        lo[i] = if v < lo[i] { v } else { lo[i] };
        hi[i] = if v > hi[i] { v } else { hi[i] };
        poison[i] += v - v;
    }
    let mut min = lo[0];
    let mut max = hi[0];
    let mut poisoned = poison[0];
    for i in 1..LANES {
        min = if lo[i] < min { lo[i] } else { min };
        max = if hi[i] > max { hi[i] } else { max };
        poisoned += poison[i];
    }
    (min, max, poisoned == 0.0)
}

/// Writes `value(code(x))` for each element.
#[inline(always)]
pub(crate) fn fake_slice(src: &[f32], dst: &mut [f32], grid: Grid, levels: f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = grid.fake(v, levels);
    }
}

/// Writes the integer code of each element.
#[inline(always)]
pub(crate) fn code_slice(src: &[f32], codes: &mut [u8], grid: Grid, levels: f32) {
    for (c, &v) in codes.iter_mut().zip(src) {
        *c = grid.code(v, levels);
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

/// [`fake_slice`] of the values clamped into `[lo, hi]` (a clipped range).
#[inline(always)]
pub(crate) fn fake_slice_clamped(
    src: &[f32],
    dst: &mut [f32],
    grid: Grid,
    lo: f32,
    hi: f32,
    levels: f32,
) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = grid.fake(clamp(v, lo, hi), levels);
    }
}

/// [`code_slice`] of the values clamped into `[lo, hi]` (a clipped range).
#[inline(always)]
pub(crate) fn code_slice_clamped(
    src: &[f32],
    codes: &mut [u8],
    grid: Grid,
    lo: f32,
    hi: f32,
    levels: f32,
) {
    for (c, &v) in codes.iter_mut().zip(src) {
        *c = grid.code(clamp(v, lo, hi), levels);
    }
}

/// Writes the reconstruction of each code.
#[inline(always)]
pub(crate) fn value_slice(codes: &[u8], dst: &mut [f32], grid: Grid) {
    for (d, &c) in dst.iter_mut().zip(codes) {
        *d = grid.value(c);
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
                assert!(!f16_bits_finite(h));
                continue;
            }
            assert!(f16_bits_finite(h));
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
        assert_eq!(min_max(&x), (-10.0, 26.0, true));
        x[33] = f32::NAN;
        assert!(!min_max(&x).2);
        x[33] = f32::NEG_INFINITY;
        assert!(!min_max(&x).2);
    }
}

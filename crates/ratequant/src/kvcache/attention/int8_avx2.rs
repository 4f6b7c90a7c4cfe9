//! AVX2 versions of the integer kernels in [`super::int8`] (same layout, same results bit for
//! bit), for CPUs without AVX-512: a 64-byte line is read as two 32-byte halves (output lanes
//! 0–7 and 8–15), one after the other, so that a half's accumulators fit the 16 registers.
//!
//! Two ways to multiply-add four `u8` codes by four `i8` weights into an `i32` lane:
//! * [`Vnni`]: AVX-VNNI's `vpdpbusd` on 256-bit vectors (Intel since Alder Lake, AMD Zen 5);
//! * [`Madd`]: plain AVX2, `vpmaddubsw` (pairs into `i16`, saturating) then `vpmaddwd` by ones
//!   and an add. Exact as long as no pair leaves `i16`: codes at most 127 (with weights down to
//!   −128, `2 · 127 · 128 < 2^15`). So the 4-bit sub-planes are shifted down rather than
//!   masked in place (that would give codes up to 240), and 8-bit codes are split into two
//!   4-bit halves.

// Indexing accumulator arrays by row keeps the register blocking readable.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::int8::{
    key_tile_bytes, planes, value_tile_bytes, KeyWeights, INV_127, KEY_TILE_TOKENS,
    VALUE_TILE_TOKENS,
};
use super::prefetch_ahead;

/// Query rows per kernel pass: a half line's accumulators (two per row) stay in registers.
pub(super) const ROWS: usize = 4;

/// How four code bytes meet four weights.
pub(super) trait Dot {
    /// `acc + Σ_{j<4} codes[4i + j] · w[4i + j]` per 32-bit lane `i`.
    unsafe fn dot(acc: __m256i, codes: __m256i, w: __m256i) -> __m256i;
    /// Whether codes may exceed 127 (see the module notes).
    const WIDE_CODES: bool;
}

pub(super) struct Vnni;
pub(super) struct Madd;

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, codes: __m256i, w: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, codes, w)
    }
    const WIDE_CODES: bool = true;
}

impl Dot for Madd {
    #[inline(always)]
    unsafe fn dot(acc: __m256i, codes: __m256i, w: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(codes, w);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
    const WIDE_CODES: bool = false;
}

macro_rules! by_rows {
    ($rows:expr, $f:ident, $d:ty, $($arg:expr),*) => {
        match $rows {
            1 => $f::<$d, 1>($($arg),*),
            2 => $f::<$d, 2>($($arg),*),
            3 => $f::<$d, 3>($($arg),*),
            4 => $f::<$d, 4>($($arg),*),
            _ => unreachable!("rows {} outside 1..={ROWS}", $rows),
        }
    };
}

/// Entry points: one per [`Dot`], each compiled for its features.
macro_rules! entry_points {
    ($d:ty, $features:literal, $key:ident, $value:ident) => {
        /// See [`super::int8::key_dot`]; `w.rows ≤ ROWS`, bounds checked by the caller.
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $key(
            codes: &[u8],
            tiles: usize,
            head_dim: usize,
            bits: u8,
            channels: Range<usize>,
            w: KeyWeights,
            out: &mut [i32],
            out_stride: usize,
        ) {
            let (codes, out) = (codes.as_ptr(), out.as_mut_ptr());
            let (c0, c1) = (channels.start, channels.end);
            by_rows!(
                w.rows,
                key_dot_rows,
                $d,
                codes,
                tiles,
                head_dim,
                bits,
                c0,
                c1,
                w,
                out,
                out_stride
            )
        }

        /// See [`super::int8::value_accumulate`]; `rows ≤ ROWS`, bounds checked by the caller.
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn $value(
            codes: &[u8],
            tiles: usize,
            head_dim: usize,
            bits: u8,
            channels: Range<usize>,
            w: &[i8],
            w_stride: usize,
            scale: &[f32],
            scale_stride: usize,
            rows: usize,
            acc: &mut [f32],
            acc_stride: usize,
        ) {
            let (codes, w, scale, acc) =
                (codes.as_ptr(), w.as_ptr(), scale.as_ptr(), acc.as_mut_ptr());
            let (c0, c1) = (channels.start, channels.end);
            by_rows!(
                rows,
                value_rows,
                $d,
                codes,
                tiles,
                head_dim,
                bits,
                c0,
                c1,
                w,
                w_stride,
                scale,
                scale_stride,
                acc,
                acc_stride
            )
        }
    };
}

entry_points!(
    Vnni,
    "avx2,fma,avxvnni",
    key_dot_vnni,
    value_accumulate_vnni
);
entry_points!(Madd, "avx2,fma", key_dot_madd, value_accumulate_madd);

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_dot_rows<D: Dot, const R: usize>(
    codes: *const u8,
    tiles: usize,
    d: usize,
    bits: u8,
    c0: usize,
    c1: usize,
    w: KeyWeights,
    out: *mut i32,
    out_stride: usize,
) {
    let tile_bytes = key_tile_bytes(d, bits);
    for tile in 0..tiles {
        let base = codes.add(tile * tile_bytes);
        prefetch_ahead(base, tile_bytes);
        let q = w.q.as_ptr().add(w.at(tile));
        for half in 0..2 {
            let total = if bits == 3 {
                let (p2, p1) = (base.add(32 * half), base.add(4 * d + 32 * half));
                plane_dot_3::<D, R>(p2, p1, c0, c1, q, w.stride)
            } else {
                let mut total = [_mm256_setzero_si256(); R];
                for (pw, off) in planes(bits) {
                    let panel = base.add(2 * d * off as usize + 32 * half);
                    let sums = plane_dot_any::<D, R>(pw, panel, c0, c1, q, w.stride);
                    add_shifted(&mut total, &sums, off);
                }
                total
            };
            for (r, t) in total.iter().enumerate() {
                let at = r * out_stride + tile * KEY_TILE_TOKENS + 8 * half;
                _mm256_storeu_si256(out.add(at) as *mut _, *t);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_rows<D: Dot, const R: usize>(
    codes: *const u8,
    tiles: usize,
    d: usize,
    bits: u8,
    c0: usize,
    c1: usize,
    w: *const i8,
    w_stride: usize,
    scale: *const f32,
    scale_stride: usize,
    acc: *mut f32,
    acc_stride: usize,
) {
    let tile_bytes = value_tile_bytes(d, bits);
    for tile in 0..tiles {
        let wt = w.add(tile * VALUE_TILE_TOKENS);
        let mut s = [_mm256_setzero_ps(); R];
        for (r, x) in s.iter_mut().enumerate() {
            *x = _mm256_set1_ps(*scale.add(r * scale_stride + tile));
        }
        let first = codes.add(tile * tile_bytes + 64 * (c0 / 16) * bits as usize);
        prefetch_ahead(first, 64 * (c1 / 16 - c0 / 16) * bits as usize);
        for lane_group in c0 / 16..c1 / 16 {
            let base = codes.add(tile * tile_bytes + 64 * lane_group * bits as usize);
            for half in 0..2 {
                let total = if bits == 3 {
                    let (p2, p1) = (base.add(32 * half), base.add(128 + 32 * half));
                    plane_dot_3::<D, R>(p2, p1, 0, VALUE_TILE_TOKENS, wt, w_stride)
                } else {
                    let mut total = [_mm256_setzero_si256(); R];
                    for (pw, off) in planes(bits) {
                        let panel = base.add(64 * off as usize + 32 * half);
                        let sums =
                            plane_dot_any::<D, R>(pw, panel, 0, VALUE_TILE_TOKENS, wt, w_stride);
                        add_shifted(&mut total, &sums, off);
                    }
                    total
                };
                for r in 0..R {
                    let dst = acc.add(r * acc_stride + lane_group * 16 + 8 * half);
                    let f =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(total[r]), s[r], _mm256_loadu_ps(dst));
                    _mm256_storeu_ps(dst, f);
                }
            }
        }
    }
}

/// `total += sums << off`; the first plane (`off` 0) needs no shift.
#[inline(always)]
unsafe fn add_shifted<const R: usize>(total: &mut [__m256i; R], sums: &[__m256i; R], off: u8) {
    let count = _mm_cvtsi32_si128(off as i32);
    for r in 0..R {
        let s = if off == 0 {
            sums[r]
        } else {
            _mm256_sll_epi32(sums[r], count)
        };
        total[r] = _mm256_add_epi32(total[r], s);
    }
}

#[inline(always)]
unsafe fn plane_dot_any<D: Dot, const R: usize>(
    w: u8,
    panel: *const u8,
    red0: usize,
    red1: usize,
    weights: *const i8,
    w_stride: usize,
) -> [__m256i; R] {
    match w {
        1 => plane_dot::<D, R, 1>(panel, red0, red1, weights, w_stride),
        2 => plane_dot::<D, R, 2>(panel, red0, red1, weights, w_stride),
        4 => plane_dot::<D, R, 4>(panel, red0, red1, weights, w_stride),
        _ => plane_dot::<D, R, 8>(panel, red0, red1, weights, w_stride),
    }
}

/// As the AVX-512 `plane_dot`, over one 32-byte half of each 64-byte line (the lines are
/// `64` bytes apart): per output lane, `Σ_{red ∈ red0..red1} weights[r·w_stride + red] ·
/// sub_code(lane, red)` for `r < R`. Sub-planes go in pairs under one shift, the second
/// masked in place (its codes times `2^W`) into accumulators of their own, divided by `2^W`
/// at the end, exactly; where codes must stay below 128 ([`Madd`]) the 4-bit pairs are
/// shifted down instead and 8-bit codes are taken as two 4-bit halves.
#[inline(always)]
unsafe fn plane_dot<D: Dot, const R: usize, const W: usize>(
    panel: *const u8,
    red0: usize,
    red1: usize,
    weights: *const i8,
    w_stride: usize,
) -> [__m256i; R] {
    let per_line = 32 / W;
    let m = 8 / W;
    let code = ((1u16 << W) - 1) as u8;
    let lo_mask = _mm256_set1_epi8(code as i8);
    let hi_mask = _mm256_set1_epi8((code << (W % 8)) as i8);
    let nibble = _mm256_set1_epi8(0x0F);
    // Whether the second sub-plane of a pair is masked in place (times 2^W).
    let in_place = W < 8 && (D::WIDE_CODES || W < 4);
    let mut acc = [[_mm256_setzero_si256(); R]; 2];
    let dot = |acc: &mut [__m256i; R], x: __m256i, red: usize| {
        for r in 0..R {
            let four = (weights.add(r * w_stride + red) as *const i32).read_unaligned();
            acc[r] = D::dot(acc[r], x, _mm256_set1_epi32(four));
        }
    };
    for line in red0 / per_line..red1 / per_line {
        let v = _mm256_loadu_si256(panel.add(line * 64) as *const _);
        let red = line * per_line;
        if W == 8 {
            if D::WIDE_CODES {
                dot(&mut acc[line & 1], v, red);
            } else {
                // Low and high nibbles against the same weights; the high ones count 16×.
                dot(&mut acc[0], _mm256_and_si256(v, nibble), red);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                dot(&mut acc[1], hi, red);
            }
            continue;
        }
        for j in 0..m / 2 {
            let y = if j == 0 {
                v
            } else {
                _mm256_srl_epi16(v, _mm_cvtsi32_si128((2 * j * W) as i32))
            };
            dot(&mut acc[0], _mm256_and_si256(y, lo_mask), red + 8 * j);
            let hi = if in_place {
                _mm256_and_si256(y, hi_mask)
            } else {
                _mm256_and_si256(_mm256_srl_epi16(y, _mm_cvtsi32_si128(W as i32)), lo_mask)
            };
            dot(&mut acc[1], hi, red + 8 * j + 4);
        }
    }
    let mut out = [_mm256_setzero_si256(); R];
    for r in 0..R {
        let hi = if W == 8 {
            if D::WIDE_CODES {
                acc[1][r]
            } else {
                _mm256_slli_epi32::<4>(acc[1][r])
            }
        } else if in_place {
            _mm256_sra_epi32(acc[1][r], _mm_cvtsi32_si128(W as i32))
        } else {
            acc[1][r]
        };
        out[r] = _mm256_add_epi32(acc[0][r], hi);
    }
    out
}

/// As the AVX-512 `plane_dot_3`, over one 32-byte half of each line: a 3-bit code's 2-bit
/// and 1-bit planes merged into whole codes (at most 7, or 28 in place, so [`Madd`] may take
/// them) before one dot product per 4 codes and row instead of two. Without `vpternlogd`
/// the merge is an `and` and an `or`.
#[inline(always)]
unsafe fn plane_dot_3<D: Dot, const R: usize>(
    panel2: *const u8,
    panel1: *const u8,
    red0: usize,
    red1: usize,
    weights: *const i8,
    w_stride: usize,
) -> [__m256i; R] {
    let (m_lo, m_hi) = (_mm256_set1_epi8(0x03), _mm256_set1_epi8(0x0C));
    let (b_lo, b_hi) = (_mm256_set1_epi8(0x04), _mm256_set1_epi8(0x10));
    let mut acc = [[_mm256_setzero_si256(); R]; 2];
    let dot = |acc: &mut [__m256i; R], x: __m256i, red: usize| {
        for r in 0..R {
            let four = (weights.add(r * w_stride + red) as *const i32).read_unaligned();
            acc[r] = D::dot(acc[r], x, _mm256_set1_epi32(four));
        }
    };
    // Bit `k` of a 1-bit byte moved to bit `to`, everything else cleared.
    let bit_to = |v: __m256i, k: i32, to: i32, mask: __m256i| {
        let moved = if k >= to {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(k - to))
        } else {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128(to - k))
        };
        _mm256_and_si256(moved, mask)
    };
    for line1 in red0 / 32..red1 / 32 {
        let v1 = _mm256_loadu_si256(panel1.add(line1 * 64) as *const _);
        for half in 0..2 {
            let line2 = 2 * line1 + half;
            let v2 = _mm256_loadu_si256(panel2.add(line2 * 64) as *const _);
            for j in 0..2 {
                let y = if j == 0 {
                    v2
                } else {
                    _mm256_srli_epi16::<4>(v2)
                };
                let k = (4 * half + 2 * j) as i32;
                let lo = _mm256_or_si256(_mm256_and_si256(y, m_lo), bit_to(v1, k, 2, b_lo));
                let hi = _mm256_or_si256(_mm256_and_si256(y, m_hi), bit_to(v1, k + 1, 4, b_hi));
                let red = line2 * 16 + 8 * j;
                dot(&mut acc[0], lo, red);
                dot(&mut acc[1], hi, red + 4);
            }
        }
    }
    let mut out = [_mm256_setzero_si256(); R];
    for r in 0..R {
        out[r] = _mm256_add_epi32(acc[0][r], _mm256_srai_epi32::<2>(acc[1][r]));
    }
    out
}

// Keep the tile constants referenced here in step with the layout's definition.
const _: () = assert!(KEY_TILE_TOKENS == 16 && VALUE_TILE_TOKENS == 32);

/// Stores the 8 `i32` lanes of `v` as saturated `i8` at `p` (as `as i8` casts).
#[inline(always)]
unsafe fn store8_i8(p: *mut i8, v: __m256i) {
    let y = _mm256_packs_epi16(_mm256_packs_epi32(v, v), _mm256_packs_epi32(v, v));
    (p as *mut i32).write_unaligned(_mm_cvtsi128_si32(_mm256_castsi256_si128(y)));
    (p.add(4) as *mut i32).write_unaligned(_mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(y)));
}

/// The largest lane of `v`.
#[inline(always)]
unsafe fn max8(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// The sum of the lanes of `v`.
#[inline(always)]
unsafe fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Rounds the `n` (a multiple of 8) weights at `w` as [`super::int8::quantize_i8`] does: the
/// same bytes and scale (`vcvtps2dq` rounds to nearest even, the packs saturate).
#[inline(always)]
unsafe fn round_i8(w: *const f32, n: usize, hi: *mut i8, lo: Option<*mut i8>) -> f32 {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut m = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(w.add(i)), abs));
    }
    let amax = max8(m);
    if amax == 0.0 {
        std::ptr::write_bytes(hi, 0, n);
        if let Some(lo) = lo {
            std::ptr::write_bytes(lo, 0, n);
        }
        return 0.0;
    }
    let k = _mm256_set1_ps(127.0 / amax);
    for i in (0..n).step_by(8) {
        let t = _mm256_mul_ps(_mm256_loadu_ps(w.add(i)), k);
        let h = _mm256_cvtps_epi32(t);
        store8_i8(hi.add(i), h);
        if let Some(lo) = lo {
            let r = _mm256_mul_ps(
                _mm256_sub_ps(t, _mm256_cvtepi32_ps(h)),
                _mm256_set1_ps(254.0),
            );
            store8_i8(lo.add(i), _mm256_cvtps_epi32(r));
        }
    }
    amax * INV_127
}

/// See [`super::int8::key_block_weights`]; `d` a multiple of 8 and at most 512: the same
/// bytes and `σ`, the bias summed in another order.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn key_block_weights(
    q: &[f32],
    rows: usize,
    s: &[half::f16],
    z: &[half::f16],
    blocks: usize,
    split: bool,
    w8: &mut [i8],
    sigma: &mut [f32],
    bias: &mut [f32],
) {
    const MAX_CHUNKS: usize = 64;
    let d = q.len() / rows;
    debug_assert!(d.is_multiple_of(8) && d <= 8 * MAX_CHUNKS);
    let q_rows = if split { 2 * rows } else { rows };
    let chunks = d / 8;
    let (mut sv, mut zv) = (
        [_mm256_setzero_ps(); MAX_CHUNKS],
        [_mm256_setzero_ps(); MAX_CHUNKS],
    );
    let mut w = [0.0f32; 8 * MAX_CHUNKS];
    let (sp, zp, wp) = (s.as_ptr(), z.as_ptr(), w.as_mut_ptr());
    for blk in 0..blocks {
        let (sb, zb) = (sp.add(blk * d), zp.add(blk * d));
        prefetch_ahead(sb as *const u8, 2 * d);
        prefetch_ahead(zb as *const u8, 2 * d);
        for j in 0..chunks {
            sv[j] = _mm256_cvtph_ps(_mm_loadu_si128(sb.add(8 * j) as *const _));
            zv[j] = _mm256_cvtph_ps(_mm_loadu_si128(zb.add(8 * j) as *const _));
        }
        for r in 0..rows {
            let qp = q.as_ptr().add(r * d);
            let (mut b0, mut b1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for j in 0..chunks {
                let qv = _mm256_loadu_ps(qp.add(8 * j));
                _mm256_storeu_ps(wp.add(8 * j), _mm256_mul_ps(qv, sv[j]));
                if j % 2 == 0 {
                    b0 = _mm256_fmadd_ps(qv, zv[j], b0);
                } else {
                    b1 = _mm256_fmadd_ps(qv, zv[j], b1);
                }
            }
            bias[blk * rows + r] = sum8(_mm256_add_ps(b0, b1));
            let hp = w8.as_mut_ptr().add((blk * q_rows + r) * d);
            let lp = split.then(|| w8.as_mut_ptr().add((blk * q_rows + rows + r) * d));
            sigma[blk * rows + r] = round_i8(wp, d, hp, lp);
        }
    }
}

/// See [`super::int8::value_weights`]: the same bytes and scales, the zero-point sums added
/// in another order.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_weights(
    p: &[f32],
    p_stride: usize,
    rows: usize,
    n: usize,
    s: &[half::f16],
    z: &[half::f16],
    first: usize,
    hi: &mut [i8],
    lo: Option<&mut [i8]>,
    sigma: &mut [f32],
    zero: &mut [f32],
) {
    const T: usize = VALUE_TILE_TOKENS;
    let nt = (first + n).div_ceil(T);
    let (sp, zp) = (s.as_ptr(), z.as_ptr());
    let (hp, lp) = (hi.as_mut_ptr(), lo.map(|l| l.as_mut_ptr()));
    let mut w = [0.0f32; T];
    for r in 0..rows {
        let pr = p.as_ptr().add(r * p_stride);
        let mut zs = _mm256_setzero_ps();
        for j in 0..nt {
            // Token index of the tile's position 0 (positions outside 0..n weigh 0).
            let base = (j * T) as isize - first as isize;
            if base >= 0 && base as usize + T <= n {
                let b = base as usize;
                prefetch_ahead(sp.add(b) as *const u8, 2 * T);
                prefetch_ahead(zp.add(b) as *const u8, 2 * T);
                for c in (0..T).step_by(8) {
                    let pv = _mm256_loadu_ps(pr.add(b + c));
                    let sv = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(b + c) as *const _));
                    let zv = _mm256_cvtph_ps(_mm_loadu_si128(zp.add(b + c) as *const _));
                    _mm256_storeu_ps(w.as_mut_ptr().add(c), _mm256_mul_ps(pv, sv));
                    zs = _mm256_fmadd_ps(pv, zv, zs);
                }
            } else {
                let mut zsum = 0.0f32;
                for (t, x) in w.iter_mut().enumerate() {
                    let i = base + t as isize;
                    *x = if i >= 0 && (i as usize) < n {
                        let i = i as usize;
                        zsum = (*pr.add(i)).mul_add(z[i].to_f32(), zsum);
                        *pr.add(i) * s[i].to_f32()
                    } else {
                        0.0
                    };
                }
                zs = _mm256_add_ps(zs, _mm256_setr_ps(zsum, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0));
            }
            let at = (r * nt + j) * T;
            sigma[r * nt + j] = round_i8(w.as_ptr(), T, hp.add(at), lp.map(|l| l.add(at)));
        }
        zero[r] = sum8(zs);
    }
}

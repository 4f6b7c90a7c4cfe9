//! AVX-512 VNNI versions of the integer kernels in [`super::int8`] (same layout, same results
//! bit for bit): per 64-byte line, each sub-plane is one shift and one mask (none for 8-bit
//! planes), then one `vpdpbusd` per query row against four weights broadcast from memory.
//! Two accumulators per row alternate between sub-planes, so the dependent `vpdpbusd` chains
//! are half as long (their latency, not their throughput, bounds a single chain).

// Indexing accumulator arrays by row keeps the register blocking readable.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::int8::{
    key_tile_bytes, planes, value_tile_bytes, KeyScoreScales, KeyWeights, INV_127, KEY_TILE_TOKENS,
    VALUE_TILE_TOKENS,
};
use super::prefetch_ahead;

macro_rules! by_rows {
    ($rows:expr, $f:ident, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            _ => unreachable!("rows {} outside 1..=8", $rows),
        }
    };
}

/// See [`super::int8::key_dot`]; `w.rows ≤ 8`, bounds checked by the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn key_dot(
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
        key_dot_rows_fit,
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

/// [`key_dot_rows`] storing its sums; all channels of a 64-wide head (KIVI keys) with
/// constant line counts, unrolled.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_dot_rows_fit<const R: usize>(
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
    let end = store_sums(out, out_stride);
    if (d, c0, c1) == (64, 0, 64) {
        key_dot_rows::<R, 64>(codes, tiles, d, bits, c0, c1, w, end)
    } else {
        key_dot_rows::<R, 0>(codes, tiles, d, bits, c0, c1, w, end)
    }
}

/// The plain key kernel's end of a tile: its sums to `out`.
#[inline(always)]
unsafe fn store_sums<const R: usize>(
    out: *mut i32,
    out_stride: usize,
) -> impl FnMut(usize, &[__m512i; R]) {
    move |tile, total| {
        for (r, t) in total.iter().enumerate() {
            _mm512_storeu_si512(
                out.add(r * out_stride + tile * KEY_TILE_TOKENS) as *mut _,
                *t,
            );
        }
    }
}

/// The integer sums of each tile over channels `c0..c1`, handed to `end(tile, sums)`.
/// `D` > 0: `d` is `D` and the channels are all of them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_dot_rows<const R: usize, const D: usize>(
    codes: *const u8,
    tiles: usize,
    d: usize,
    bits: u8,
    c0: usize,
    c1: usize,
    w: KeyWeights,
    mut end: impl FnMut(usize, &[__m512i; R]),
) {
    let (d, c0, c1) = if D > 0 { (D, 0, D) } else { (d, c0, c1) };
    let tile_bytes = key_tile_bytes(d, bits);
    for tile in 0..tiles {
        let base = codes.add(tile * tile_bytes);
        prefetch_ahead(base, tile_bytes);
        let q = w.q.as_ptr().add(w.at(tile));
        let total = if bits == 3 {
            plane_dot_3::<R>(base, base.add(4 * d), c0, c1, q, w.stride)
        } else {
            let mut total = [_mm512_setzero_si512(); R];
            for (pw, off) in planes(bits) {
                let panel = base.add(2 * d * off as usize);
                let sums = plane_dot_any::<R>(pw, panel, c0, c1, q, w.stride);
                add_shifted(&mut total, &sums, off);
            }
            total
        };
        end(tile, &total);
    }
}

/// See [`super::int8::key_scores`]; `w.rows ≤ 8`, bounds checked by the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn key_scores(
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    w: KeyWeights,
    scales: KeyScoreScales,
    out: &mut [f32],
    out_stride: usize,
    max: &mut [f32],
) {
    let (codes, out) = (codes.as_ptr(), out.as_mut_ptr());
    by_rows!(
        w.rows,
        key_scores_fit,
        codes,
        tiles,
        head_dim,
        bits,
        w,
        scales,
        out,
        out_stride,
        max
    )
}

/// [`key_scores_d`], unrolled for 64-wide heads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_scores_fit<const R: usize>(
    codes: *const u8,
    tiles: usize,
    d: usize,
    bits: u8,
    w: KeyWeights,
    scales: KeyScoreScales,
    out: *mut f32,
    out_stride: usize,
    max: &mut [f32],
) {
    match (d == 64, scales.lo_scale.is_some()) {
        (true, false) => {
            key_scores_d::<R, 64, false>(codes, tiles, d, bits, w, scales, out, out_stride, max)
        }
        (true, true) => {
            key_scores_d::<R, 64, true>(codes, tiles, d, bits, w, scales, out, out_stride, max)
        }
        (false, false) => {
            key_scores_d::<R, 0, false>(codes, tiles, d, bits, w, scales, out, out_stride, max)
        }
        (false, true) => {
            key_scores_d::<R, 0, true>(codes, tiles, d, bits, w, scales, out, out_stride, max)
        }
    }
}

/// [`key_scores`] with `R` weight rows: each tile's sums go through the float step in
/// registers, and the rows' maxima are kept 16 lanes wide until the end. `SPLIT`: the weights
/// are split (`R/2` score rows, the lo rows after the hi rows), else `R` score rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_scores_d<const R: usize, const D: usize, const SPLIT: bool>(
    codes: *const u8,
    tiles: usize,
    d: usize,
    bits: u8,
    w: KeyWeights,
    scales: KeyScoreScales,
    out: *mut f32,
    out_stride: usize,
    max: &mut [f32],
) {
    // A constant row count, so that the epilogue unrolls with the maxima in registers.
    let rows = if SPLIT { R / 2 } else { R };
    debug_assert_eq!(rows, scales.rows);
    let lo = scales.lo_scale.unwrap_or(0.0);
    let mut maxes = [_mm512_set1_ps(f32::NEG_INFINITY); R];
    let (sigma, bias) = (scales.sigma.as_ptr(), scales.bias.as_ptr());
    let block_tiles = w.block_tiles;
    let end = |tile: usize, total: &[__m512i; R]| {
        let j = tile / block_tiles;
        for r in 0..rows {
            let at = j * rows + r;
            let (sig, b) = (*sigma.add(at), _mm512_set1_ps(*bias.add(at)));
            let h = _mm512_cvtepi32_ps(total[r]);
            let x = if SPLIT {
                // The lo rows follow the hi rows.
                let l = _mm512_cvtepi32_ps(total[rows + r]);
                let inner = _mm512_fmadd_ps(l, _mm512_set1_ps(sig * lo), b);
                _mm512_fmadd_ps(h, _mm512_set1_ps(sig), inner)
            } else {
                _mm512_fmadd_ps(h, _mm512_set1_ps(sig), b)
            };
            _mm512_storeu_ps(out.add(r * out_stride + tile * KEY_TILE_TOKENS), x);
            maxes[r] = _mm512_max_ps(x, maxes[r]);
        }
    };
    key_dot_rows::<R, D>(codes, tiles, d, bits, 0, d, w, end);
    for r in 0..rows {
        max[r] = _mm512_reduce_max_ps(maxes[r]);
    }
}

/// See [`super::int8::value_accumulate`]; `rows ≤ 8`, bounds checked by the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_accumulate(
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
    let weights = ValueWeights {
        w: w.as_ptr(),
        w_stride,
        scale: scale.as_ptr(),
        scale_stride,
        group_lanes: usize::MAX,
        w_group_stride: 0,
        scale_group_stride: 0,
    };
    value_rows_any(
        codes, tiles, head_dim, bits, channels, weights, rows, acc, acc_stride,
    )
}

/// See [`super::int8::value_accumulate_groups`]: all channels in one pass over the tiles,
/// channel group `g` (of `group` channels, a multiple of 16) with its own weights and
/// scales; `rows ≤ 8`, bounds checked by the caller.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_accumulate_groups(
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    group: usize,
    w: &[i8],
    w_stride: usize,
    w_group_stride: usize,
    scale: &[f32],
    scale_stride: usize,
    scale_group_stride: usize,
    rows: usize,
    acc: &mut [f32],
    acc_stride: usize,
) {
    let weights = ValueWeights {
        w: w.as_ptr(),
        w_stride,
        scale: scale.as_ptr(),
        scale_stride,
        group_lanes: group / 16,
        w_group_stride,
        scale_group_stride,
    };
    value_rows_any(
        codes,
        tiles,
        head_dim,
        bits,
        0..head_dim,
        weights,
        rows,
        acc,
        acc_stride,
    )
}

/// [`value_rows_fit`] for a runtime row count (`rows ≤ 8`) over `channels`: the body of both
/// value entries, which differ only in how their weights are grouped.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_rows_any(
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    channels: Range<usize>,
    weights: ValueWeights,
    rows: usize,
    acc: &mut [f32],
    acc_stride: usize,
) {
    let (codes, acc) = (codes.as_ptr(), acc.as_mut_ptr());
    let (c0, c1) = (channels.start, channels.end);
    by_rows!(
        rows,
        value_rows_fit,
        codes,
        tiles,
        head_dim,
        bits,
        c0,
        c1,
        weights,
        acc,
        acc_stride
    )
}

/// The value kernel's weights (row `r`, token `t` of tile `j` at `w[r·w_stride + 32·j + t]`)
/// and their scales (`scale[r·scale_stride + j]`). Lane group `g` (counted from the first
/// one accumulated) takes those of weight group `g / group_lanes`, `w_group_stride` and
/// `scale_group_stride` further on.
#[derive(Clone, Copy)]
struct ValueWeights {
    w: *const i8,
    w_stride: usize,
    scale: *const f32,
    scale_stride: usize,
    group_lanes: usize,
    w_group_stride: usize,
    scale_group_stride: usize,
}

impl ValueWeights {
    /// Lane group `g`'s weights and scales.
    #[inline(always)]
    unsafe fn of_lane_group(&self, g: usize) -> (*const i8, *const f32) {
        let k = g / self.group_lanes;
        (
            self.w.add(k * self.w_group_stride),
            self.scale.add(k * self.scale_group_stride),
        )
    }
}

/// [`value_rows`] with up to 16 sums in registers where they fit: up to 4 rows of a
/// 64-wide head or of a 32-channel group.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_rows_fit<const R: usize>(
    codes: *const u8,
    tiles: usize,
    d: usize,
    bits: u8,
    c0: usize,
    c1: usize,
    weights: ValueWeights,
    acc: *mut f32,
    acc_stride: usize,
) {
    macro_rules! call {
        ($lg:literal) => {
            value_rows::<R, $lg>(codes, tiles, d, bits, c0, c1, weights, acc, acc_stride)
        };
    }
    match (R <= 4, c1 - c0) {
        (true, 64) => call!(4),
        (true, 32) => call!(2),
        _ => call!(0),
    }
}

/// `LG` > 0: the channels are `LG` lane groups, whose f32 sums stay in registers from the
/// first tile to the last (the same operations in the same order as through `acc`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_rows<const R: usize, const LG: usize>(
    codes: *const u8,
    tiles: usize,
    d: usize,
    bits: u8,
    c0: usize,
    c1: usize,
    weights: ValueWeights,
    acc: *mut f32,
    acc_stride: usize,
) {
    // Tile by tile, so the codes stream in order (lane groups inside a tile are adjacent);
    // the f32 sums live in registers (`LG` > 0) or in `acc`, which stays in L1.
    let tile_bytes = value_tile_bytes(d, bits);
    let lane_groups = c0 / 16..c1 / 16;
    let count = if LG > 0 { LG } else { lane_groups.len() };
    // Each lane group's weights and scales.
    let mut fixed = [(weights.w, weights.scale); 4];
    if LG > 0 {
        debug_assert!(lane_groups.len() == LG && LG <= 4);
        for g in 0..LG {
            fixed[g] = weights.of_lane_group(g);
        }
    }
    let mut sums = [[_mm512_setzero_ps(); 4]; R];
    if LG > 0 {
        for r in 0..R {
            for g in 0..LG {
                sums[r][g] = _mm512_loadu_ps(acc.add(r * acc_stride + c0 + 16 * g));
            }
        }
    }
    for tile in 0..tiles {
        let first = codes.add(tile * tile_bytes + 64 * (c0 / 16) * bits as usize);
        prefetch_ahead(first, 64 * lane_groups.len() * bits as usize);
        for g in 0..count {
            let (wg, sg) = if LG > 0 {
                fixed[g]
            } else {
                weights.of_lane_group(g)
            };
            let wt = wg.add(tile * VALUE_TILE_TOKENS);
            let lane_group = lane_groups.start + g;
            let base = codes.add(tile * tile_bytes + 64 * lane_group * bits as usize);
            let total = if bits == 3 {
                plane_dot_3::<R>(
                    base,
                    base.add(128),
                    0,
                    VALUE_TILE_TOKENS,
                    wt,
                    weights.w_stride,
                )
            } else {
                let mut total = [_mm512_setzero_si512(); R];
                for (pw, off) in planes(bits) {
                    let panel = base.add(64 * off as usize);
                    let sums =
                        plane_dot_any::<R>(pw, panel, 0, VALUE_TILE_TOKENS, wt, weights.w_stride);
                    add_shifted(&mut total, &sums, off);
                }
                total
            };
            for r in 0..R {
                let x = _mm512_cvtepi32_ps(total[r]);
                let s = _mm512_set1_ps(*sg.add(r * weights.scale_stride + tile));
                if LG > 0 {
                    sums[r][g] = _mm512_fmadd_ps(x, s, sums[r][g]);
                } else {
                    let dst = acc.add(r * acc_stride + lane_group * 16);
                    _mm512_storeu_ps(dst, _mm512_fmadd_ps(x, s, _mm512_loadu_ps(dst)));
                }
            }
        }
    }
    if LG > 0 {
        for r in 0..R {
            for g in 0..LG {
                _mm512_storeu_ps(acc.add(r * acc_stride + c0 + 16 * g), sums[r][g]);
            }
        }
    }
}

/// `total += sums << off`; the first plane (`off` 0) needs no shift.
#[inline(always)]
unsafe fn add_shifted<const R: usize>(total: &mut [__m512i; R], sums: &[__m512i; R], off: u8) {
    if off == 0 {
        for r in 0..R {
            total[r] = _mm512_add_epi32(total[r], sums[r]);
        }
        return;
    }
    let count = _mm_cvtsi32_si128(off as i32);
    for r in 0..R {
        total[r] = _mm512_add_epi32(total[r], _mm512_sll_epi32(sums[r], count));
    }
}

#[inline(always)]
unsafe fn plane_dot_any<const R: usize>(
    w: u8,
    panel: *const u8,
    red0: usize,
    red1: usize,
    weights: *const i8,
    w_stride: usize,
) -> [__m512i; R] {
    match w {
        1 => plane_dot::<R, 1>(panel, red0, red1, weights, w_stride),
        2 => plane_dot::<R, 2>(panel, red0, red1, weights, w_stride),
        4 => plane_dot::<R, 4>(panel, red0, red1, weights, w_stride),
        _ => plane_dot::<R, 8>(panel, red0, red1, weights, w_stride),
    }
}

/// For a plane of width `W` whose lines run along the reduction axis: per output lane,
/// `Σ_{red ∈ red0..red1} weights[r·w_stride + red] · sub_code(lane, red)` for `r < R`.
/// `red0`, `red1` are multiples of the line's `32/W` elements.
///
/// Sub-planes go in pairs: one shift brings sub-planes `2j` and `2j + 1` to the low `2W` bits
/// of each byte; the first is masked to its `W` bits, the second masked in place (its codes
/// times `2^W`, at most 240) into accumulators of their own, divided by `2^W` at the end,
/// exactly. That halves the shifts, which compete with `vpdpbusd` for the same port; the two
/// accumulator sets still halve the dependent chains.
#[inline(always)]
unsafe fn plane_dot<const R: usize, const W: usize>(
    panel: *const u8,
    red0: usize,
    red1: usize,
    weights: *const i8,
    w_stride: usize,
) -> [__m512i; R] {
    let per_line = 32 / W;
    let m = 8 / W;
    let code = ((1u16 << W) - 1) as u8;
    let lo_mask = _mm512_set1_epi8(code as i8);
    let hi_mask = _mm512_set1_epi8((code << (W % 8)) as i8);
    let mut acc = [[_mm512_setzero_si512(); R]; 2];
    let dot = |acc: &mut [__m512i; R], x: __m512i, red: usize| {
        for r in 0..R {
            let four = (weights.add(r * w_stride + red) as *const i32).read_unaligned();
            acc[r] = _mm512_dpbusd_epi32(acc[r], x, _mm512_set1_epi32(four));
        }
    };
    for line in red0 / per_line..red1 / per_line {
        let v = _mm512_loadu_si512(panel.add(line * 64) as *const _);
        let red = line * per_line;
        if W == 8 {
            dot(&mut acc[line & 1], v, red);
            continue;
        }
        for j in 0..m / 2 {
            let y = if j == 0 {
                v
            } else {
                _mm512_srl_epi16(v, _mm_cvtsi32_si128((2 * j * W) as i32))
            };
            dot(&mut acc[0], _mm512_and_si512(y, lo_mask), red + 8 * j);
            dot(&mut acc[1], _mm512_and_si512(y, hi_mask), red + 8 * j + 4);
        }
    }
    let mut out = [_mm512_setzero_si512(); R];
    for r in 0..R {
        let hi = if W == 8 {
            acc[1][r]
        } else {
            _mm512_sra_epi32(acc[1][r], _mm_cvtsi32_si128(W as i32))
        };
        out[r] = _mm512_add_epi32(acc[0][r], hi);
    }
    out
}

/// [`plane_dot`] of a 3-bit code, whose 2-bit plane (lines at `panel2`) and 1-bit plane
/// (lines at `panel1`) are merged into whole 3-bit codes before the `vpdpbusd`s: one per
/// 64 codes and row instead of two, for two extra operations per 64 codes (a shift and mask
/// of the 1-bit plane, one `vpternlogd` to merge). As in [`plane_dot`], sub-planes go in
/// pairs, the second kept in place (times 4, with its 1-bit part at bit 4) in accumulators
/// of its own. `red0`, `red1` are multiples of 32 (whole 1-bit lines).
#[inline(always)]
unsafe fn plane_dot_3<const R: usize>(
    panel2: *const u8,
    panel1: *const u8,
    red0: usize,
    red1: usize,
    weights: *const i8,
    w_stride: usize,
) -> [__m512i; R] {
    let (m_lo, m_hi) = (_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0C));
    let (b_lo, b_hi) = (_mm512_set1_epi8(0x04), _mm512_set1_epi8(0x10));
    let mut acc = [[_mm512_setzero_si512(); R]; 2];
    let dot = |acc: &mut [__m512i; R], x: __m512i, red: usize| {
        for r in 0..R {
            let four = (weights.add(r * w_stride + red) as *const i32).read_unaligned();
            acc[r] = _mm512_dpbusd_epi32(acc[r], x, _mm512_set1_epi32(four));
        }
    };
    // Bit `k` of a 1-bit byte moved to bit `to` (16-bit shifts: the bits that cross into
    // the other byte are masked off, the wanted one stays in its byte).
    let bit_to = |v: __m512i, k: i32, to: i32, mask: __m512i| {
        let moved = if k >= to {
            _mm512_srl_epi16(v, _mm_cvtsi32_si128(k - to))
        } else {
            _mm512_sll_epi16(v, _mm_cvtsi32_si128(to - k))
        };
        _mm512_and_si512(moved, mask)
    };
    // (a & c) | b: the 2-bit part under the mask, the placed 1-bit part beside it.
    const A_AND_C_OR_B: i32 = 0xEC;
    for line1 in red0 / 32..red1 / 32 {
        let v1 = _mm512_loadu_si512(panel1.add(line1 * 64) as *const _);
        for half in 0..2 {
            let line2 = 2 * line1 + half;
            let v2 = _mm512_loadu_si512(panel2.add(line2 * 64) as *const _);
            for j in 0..2 {
                let y = if j == 0 {
                    v2
                } else {
                    _mm512_srl_epi16(v2, _mm_cvtsi32_si128(4))
                };
                // Sub-planes 2j, 2j + 1 of the 2-bit line are 1-bit sub-planes k, k + 1.
                let k = (4 * half + 2 * j) as i32;
                let lo = _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(y, bit_to(v1, k, 2, b_lo), m_lo);
                let hi =
                    _mm512_ternarylogic_epi32::<A_AND_C_OR_B>(y, bit_to(v1, k + 1, 4, b_hi), m_hi);
                let red = line2 * 16 + 8 * j;
                dot(&mut acc[0], lo, red);
                dot(&mut acc[1], hi, red + 4);
            }
        }
    }
    let mut out = [_mm512_setzero_si512(); R];
    for r in 0..R {
        out[r] = _mm512_add_epi32(acc[0][r], _mm512_srai_epi32::<2>(acc[1][r]));
    }
    out
}

/// See [`super::int8::quantize_i8`]: the same bytes, 16 lanes at a time (`vcvtps2dq` rounds
/// to nearest even, as `round_ties_even` does; `vpmovsdb` saturates as `as i8` does).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quantize_i8(x: &[f32], hi: &mut [i8], lo: Option<&mut [i8]>) -> f32 {
    let n = x.len();
    let full = n / 16 * 16;
    let tail: __mmask16 = ((1u32 << (n - full)) - 1) as u16;
    let xp = x.as_ptr();
    let mut m = _mm512_setzero_ps();
    for i in (0..full).step_by(16) {
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(xp.add(i))));
    }
    if tail != 0 {
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, xp.add(full))));
    }
    let amax = _mm512_reduce_max_ps(m);
    if amax == 0.0 {
        hi[..n].fill(0);
        if let Some(lo) = lo {
            lo[..n].fill(0);
        }
        return 0.0;
    }
    let k = _mm512_set1_ps(127.0 / amax);
    let k254 = _mm512_set1_ps(254.0);
    let hp = hi.as_mut_ptr();
    let lp = lo.map(|l| l.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let mask = if i < full { 0xFFFF } else { tail };
        let t = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xp.add(i)), k);
        let h = _mm512_cvtps_epi32(t);
        _mm512_mask_cvtsepi32_storeu_epi8(hp.add(i) as *mut _, mask, h);
        if let Some(lp) = lp {
            let r = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(h)), k254);
            _mm512_mask_cvtsepi32_storeu_epi8(lp.add(i) as *mut _, mask, _mm512_cvtps_epi32(r));
        }
        i += 16;
    }
    amax * INV_127
}

/// See [`super::int8::key_block_weights`]; `d` a multiple of 32 (every tiled layout's), so
/// whole vectors and chunks in pairs. Sixteen (block, row) items at a time: their weights to
/// the stack, their maxima and zero-point sums reduced together by [`reduce16`], then
/// rounded. A block's scales and zero-points are widened once for all its rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
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
    // Common head sizes unroll, so that a block's widened scales stay in registers.
    match q.len() / rows {
        64 => key_block_weights_d::<4>(q, rows, s, z, blocks, split, w8, sigma, bias),
        128 => key_block_weights_d::<8>(q, rows, s, z, blocks, split, w8, sigma, bias),
        _ => key_block_weights_d::<0>(q, rows, s, z, blocks, split, w8, sigma, bias),
    }
}

/// [`key_block_weights`] for `C` 16-lane chunks per row (`C` 0: `head_dim / 16`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_block_weights_d<const C: usize>(
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
    const MAX_CHUNKS: usize = 32;
    let d = q.len() / rows;
    debug_assert!(d.is_multiple_of(32) && d <= 16 * MAX_CHUNKS);
    let q_rows = if split { 2 * rows } else { rows };
    let chunks = if C > 0 { C } else { d / 16 };
    let mut sv = [_mm512_setzero_ps(); MAX_CHUNKS];
    let mut zv = [_mm512_setzero_ps(); MAX_CHUNKS];
    let mut w = std::mem::MaybeUninit::<[[__m512; MAX_CHUNKS]; 16]>::uninit();
    let wp = w.as_mut_ptr() as *mut __m512;
    let (mut m, mut sums) = ([_mm512_setzero_ps(); 16], [_mm512_setzero_ps(); 16]);
    let mut ks = [0.0f32; 16];
    let items = blocks * rows;
    let mut widened = usize::MAX;
    for i0 in (0..items).step_by(16) {
        let count = 16.min(items - i0);
        // (block, row) of item `i0 + jj`, stepped rather than divided per item (a runtime
        // `div` per item cost more than the item's vector work).
        let first = (i0 / rows, i0 % rows);
        let (mut blk, mut r) = first;
        for jj in 0..count {
            if jj > 0 {
                r += 1;
                if r == rows {
                    (blk, r) = (blk + 1, 0);
                }
            }
            if blk != widened {
                let (sp, zp) = (s.as_ptr().add(blk * d), z.as_ptr().add(blk * d));
                prefetch_ahead(sp as *const u8, 2 * d);
                prefetch_ahead(zp as *const u8, 2 * d);
                for j in 0..chunks {
                    sv[j] = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(16 * j) as *const _));
                    zv[j] = _mm512_cvtph_ps(_mm256_loadu_si256(zp.add(16 * j) as *const _));
                }
                widened = blk;
            }
            let qp = q.as_ptr().add(r * d);
            let wj = wp.add(jj * MAX_CHUNKS);
            let (mut b0, mut b1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let (mut m0, mut m1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for j in (0..chunks).step_by(2) {
                let q0 = _mm512_loadu_ps(qp.add(16 * j));
                let q1 = _mm512_loadu_ps(qp.add(16 * j + 16));
                let w0 = _mm512_mul_ps(q0, sv[j]);
                let w1 = _mm512_mul_ps(q1, sv[j + 1]);
                wj.add(j).write(w0);
                wj.add(j + 1).write(w1);
                m0 = _mm512_max_ps(m0, _mm512_abs_ps(w0));
                m1 = _mm512_max_ps(m1, _mm512_abs_ps(w1));
                b0 = _mm512_fmadd_ps(q0, zv[j], b0);
                b1 = _mm512_fmadd_ps(q1, zv[j + 1], b1);
            }
            m[jj] = _mm512_max_ps(m0, m1);
            sums[jj] = _mm512_add_ps(b0, b1);
        }
        for jj in count..16 {
            (m[jj], sums[jj]) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        }
        let live = ((1u32 << count) - 1) as __mmask16;
        _mm512_mask_storeu_ps(bias.as_mut_ptr().add(i0), live, reduce16::<false>(&sums));
        let (k, sig) = i8_scales(reduce16::<true>(&m));
        _mm512_mask_storeu_ps(sigma.as_mut_ptr().add(i0), live, sig);
        _mm512_storeu_ps(ks.as_mut_ptr(), k);
        let (mut blk, mut r) = first;
        for (jj, &k) in ks.iter().enumerate().take(count) {
            if jj > 0 {
                r += 1;
                if r == rows {
                    (blk, r) = (blk + 1, 0);
                }
            }
            let hp = w8.as_mut_ptr().add((blk * q_rows + r) * d);
            let lp = split.then(|| w8.as_mut_ptr().add((blk * q_rows + rows + r) * d));
            let (kj, wj) = (_mm512_set1_ps(k), wp.add(jj * MAX_CHUNKS));
            if lp.is_none() && chunks.is_multiple_of(4) {
                for j in (0..chunks).step_by(4) {
                    let w = [0, 1, 2, 3].map(|i| wj.add(j + i).read());
                    let bytes = round4_i8(w, [kj; 4]);
                    _mm512_storeu_si512(hp.add(16 * j) as *mut _, bytes);
                }
                continue;
            }
            for j in 0..chunks {
                let at = 16 * j;
                round_i8(wj.add(j).read(), kj, hp.add(at), lp.map(|l| l.add(at)));
            }
        }
    }
}

/// Sixteen horizontal reductions at once: lane `j` of the result is the maximum (`MAX`) or
/// the sum of the lanes of `v[j]`. 15 shuffle pairs instead of 16 separate reductions' 64,
/// and no scalar dependency chain per vector. Sums add in a fixed tree order.
#[inline(always)]
pub(crate) unsafe fn reduce16<const MAX: bool>(v: &[__m512; 16]) -> __m512 {
    let op = |a: __m512, b: __m512| {
        if MAX {
            _mm512_max_ps(a, b)
        } else {
            _mm512_add_ps(a, b)
        }
    };
    // Halves of 256 bits: x[i] = [v[2i] folded to 8 lanes | v[2i+1] folded to 8 lanes].
    let mut x = [_mm512_setzero_ps(); 8];
    for i in 0..8 {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        x[i] = op(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        );
    }
    // Blocks of 128 bits: y[i] block b = v[4i + b] folded to 4 lanes.
    let mut y = [_mm512_setzero_ps(); 4];
    for i in 0..4 {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        y[i] = op(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        );
    }
    // Inside each block b: z[i] = [v[8i+b] in 2 lanes, v[8i+4+b] in 2 lanes].
    let mut z = [_mm512_setzero_ps(); 2];
    for i in 0..2 {
        let (a, b) = (y[2 * i], y[2 * i + 1]);
        z[i] = op(
            _mm512_shuffle_ps::<0b10_00_10_00>(a, b),
            _mm512_shuffle_ps::<0b11_01_11_01>(a, b),
        );
    }
    // Block b, lane k holds v[4k + b]; put v[j] in lane j.
    let w = op(
        _mm512_shuffle_ps::<0b10_00_10_00>(z[0], z[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(z[0], z[1]),
    );
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, w)
}

/// Per lane of `amax` (a maximum of absolute values): `(127 / amax, amax·(1/127))`, both 0
/// where `amax` is 0, as [`super::int8::quantize_i8`] divides.
#[inline(always)]
unsafe fn i8_scales(amax: __m512) -> (__m512, __m512) {
    let c127 = _mm512_set1_ps(127.0);
    let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(amax, _mm512_setzero_ps());
    (
        _mm512_maskz_div_ps(nonzero, c127, amax),
        _mm512_mul_ps(amax, _mm512_set1_ps(INV_127)),
    )
}

/// [`round_i8`] of four vectors, `w[i]·k[i]`, without `lo`: their 64 bytes in order (two
/// saturating packs and a dword permutation instead of four `vpmovsdb`, 2 µops each).
#[inline(always)]
unsafe fn round4_i8(w: [__m512; 4], k: [__m512; 4]) -> __m512i {
    let h: [__m512i; 4] = std::array::from_fn(|i| _mm512_cvtps_epi32(_mm512_mul_ps(w[i], k[i])));
    // Per 128-bit block `b`: dword `i` holds bytes `4b..4b + 4` of vector `i`.
    let packed = _mm512_packs_epi16(
        _mm512_packs_epi32(h[0], h[1]),
        _mm512_packs_epi32(h[2], h[3]),
    );
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_epi32(idx, packed)
}

/// Rounds `w · k` to `i8` into 16 bytes at `hp` (and the residual to 1/254 at `lp`), as
/// [`super::int8::quantize_i8`] does (`k` 0 gives zeros, as its all-zero case).
#[inline(always)]
unsafe fn round_i8(w: __m512, k: __m512, hp: *mut i8, lp: Option<*mut i8>) {
    let t = _mm512_mul_ps(w, k);
    let h = _mm512_cvtps_epi32(t);
    _mm_storeu_si128(hp as *mut _, _mm512_cvtsepi32_epi8(h));
    if let Some(lp) = lp {
        let r = _mm512_mul_ps(
            _mm512_sub_ps(t, _mm512_cvtepi32_ps(h)),
            _mm512_set1_ps(254.0),
        );
        _mm_storeu_si128(lp as *mut _, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
    }
}

/// See [`super::int8::value_weights`]; `rows ≤ 16`. Tile by tile, the scales and
/// zero-points are widened once for all rows; `16 / rows` tiles' (row, tile) items at a time
/// have their weights kept on the stack and their maxima reduced together by [`reduce16`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
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
    let (s, z) = ([s.as_ptr() as *const u16], [z.as_ptr() as *const u16]);
    let (hi, lo) = (hi.as_mut_ptr(), lo.map(|l| l.as_mut_ptr()));
    let (sigma, zero) = (sigma.as_mut_ptr(), zero.as_mut_ptr());
    // Known row counts unroll, so that the weights and zero-point sums are indexed by
    // constants and stay in registers (a runtime count kept them on the stack: 5–10% of a
    // decode step at 16K).
    macro_rules! rows {
        ($($r:literal)*) => {
            match rows {
                $($r => value_weights_rows::<$r, 1, false>(p, p_stride, rows, n, s, z, first, hi, lo, sigma, zero, NO_EXP),)*
                _ => value_weights_rows::<0, 1, false>(p, p_stride, rows, n, s, z, first, hi, lo, sigma, zero, NO_EXP),
            }
        };
    }
    rows!(1 2 3 4)
}

/// See [`super::int8::value_weights_groups`]: [`value_weights`] for `NG` channel groups at
/// once, `rows·NG ≤ 16` (checked by the caller), without `lo` weights. Each token's
/// probability is loaded once for all groups, and all groups' items share the reductions.
/// With `exp` (`(max, sums)`, a row each), `p` holds scores: the probabilities are
/// `exp(score − max[r])`, computed here as [`super::softmax_exp`] computes them, and their
/// sums are added to `sums[r]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn value_weights_groups<const NG: usize>(
    p: &[f32],
    p_stride: usize,
    rows: usize,
    n: usize,
    s: [&[half::f16]; NG],
    z: [&[half::f16]; NG],
    first: usize,
    hi: &mut [i8],
    sigma: &mut [f32],
    zero: &mut [f32],
    exp: Option<(&[f32], &mut [f32])>,
) {
    let (s, z) = (
        s.map(|x| x.as_ptr() as *const u16),
        z.map(|x| x.as_ptr() as *const u16),
    );
    let (hi, sigma, zero) = (hi.as_mut_ptr(), sigma.as_mut_ptr(), zero.as_mut_ptr());
    macro_rules! rows {
        ($e:literal, $x:expr) => {
            match rows {
                1 => value_weights_rows::<1, NG, $e>(p, p_stride, 1, n, s, z, first, hi, None, sigma, zero, $x),
                2 => value_weights_rows::<2, NG, $e>(p, p_stride, 2, n, s, z, first, hi, None, sigma, zero, $x),
                3 => value_weights_rows::<3, NG, $e>(p, p_stride, 3, n, s, z, first, hi, None, sigma, zero, $x),
                4 => value_weights_rows::<4, NG, $e>(p, p_stride, 4, n, s, z, first, hi, None, sigma, zero, $x),
                _ => value_weights_rows::<0, NG, $e>(p, p_stride, rows, n, s, z, first, hi, None, sigma, zero, $x),
            }
        };
    }
    match exp {
        Some((max, sums)) => rows!(true, (max.as_ptr(), sums.as_mut_ptr())),
        None => rows!(false, NO_EXP),
    }
}

/// The `exp` argument of [`value_weights_rows`] when it takes probabilities.
const NO_EXP: (*const f32, *mut f32) = (std::ptr::null(), std::ptr::null_mut());

/// [`value_weights`] for `R` rows (`R` 0: `rows` rows) and `NG` channel groups, `rows·NG ≤
/// 16`: group `g`'s weights at `hi[g·rows·nt·32..]`, scales at `sigma[g·rows·nt..]`,
/// zero-point sums at `zero[g·rows..]`. `EXP`: `p` holds scores, turned into probabilities
/// with the row maxima at `exp.0`, whose sums are added to `exp.1` (see
/// [`value_weights_groups`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_weights_rows<const R: usize, const NG: usize, const EXP: bool>(
    p: &[f32],
    p_stride: usize,
    rows: usize,
    n: usize,
    sp: [*const u16; NG],
    zp: [*const u16; NG],
    first: usize,
    hp: *mut i8,
    lp: Option<*mut i8>,
    sigma: *mut f32,
    zero: *mut f32,
    exp: (*const f32, *mut f32),
) {
    const T: usize = VALUE_TILE_TOKENS;
    let rows = if R > 0 { R } else { rows };
    let mut p_sums = [_mm512_setzero_ps(); 16];
    let mut p_max = [_mm512_setzero_ps(); 16];
    if EXP {
        for r in 0..rows {
            p_max[r] = _mm512_set1_ps(*exp.0.add(r));
        }
    }
    let per_tile = rows * NG;
    debug_assert!((1..=16).contains(&per_tile));
    let nt = (first + n).div_ceil(T);
    let per = 16 / per_tile;
    let pp = p.as_ptr();
    // Item `g·rows + r` of a tile: group `g`, row `r`.
    let mut zeros = [[_mm512_setzero_ps(); 2]; 16];
    // Two batches' weights: each batch is rounded after the next one is weighed, so that
    // the rounding, which waits for its batch's maxima to be reduced and divided, does not
    // hold up the weighing (measured: 2–11% faster where the weights take probabilities,
    // within 2% with the fused `exp`, which keeps the core busy enough without it).
    let mut w_both = [[[_mm512_setzero_ps(); 2]; 16]; 2];
    let mut m = [_mm512_setzero_ps(); 16];
    let mut pending: Option<Batch> = None;
    for (batch, j0) in (0..nt).step_by(per).enumerate() {
        let count = per.min(nt - j0);
        let (w_a, w_b) = w_both.split_at_mut(1);
        let (w, w_pending) = if batch % 2 == 0 {
            (&mut w_a[0], &w_b[0])
        } else {
            (&mut w_b[0], &w_a[0])
        };
        for jj in 0..count {
            let j = j0 + jj;
            let tile_at = (j * T) as isize - first as isize;
            for g in 0..NG {
                prefetch_ahead(sp[g].wrapping_offset(tile_at) as *const u8, 2 * T);
                prefetch_ahead(zp[g].wrapping_offset(tile_at) as *const u8, 2 * T);
            }
            for half in 0..2 {
                // Token index of lane 0 (may be "negative": lanes below `first` are masked
                // off); lane t is kept if 0 ≤ base + t < n.
                let base = (j * T + half * 16) as isize - first as isize;
                let mut mask: u32 = 0xFFFF;
                if base < 0 {
                    mask &= 0xFFFF << (-base) as u32;
                }
                let left = n as isize - base;
                if left < 16 {
                    mask &= if left <= 0 { 0 } else { (1u32 << left) - 1 };
                }
                let mask = mask as __mmask16;
                let mut sv = [_mm512_setzero_ps(); NG];
                let mut zv = [_mm512_setzero_ps(); NG];
                for g in 0..NG {
                    sv[g] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        mask,
                        sp[g].wrapping_offset(base) as *const _,
                    ));
                    zv[g] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                        mask,
                        zp[g].wrapping_offset(base) as *const _,
                    ));
                }
                for r in 0..rows {
                    let at = (r * p_stride) as isize + base;
                    let mut pv = _mm512_maskz_loadu_ps(mask, pp.wrapping_offset(at));
                    if EXP {
                        // Scores less their row's maximum: never above 0.
                        let e = super::avx512::exp_nonpositive(_mm512_sub_ps(pv, p_max[r]));
                        // The lanes outside the tokens weigh 0, as loaded without `EXP`.
                        pv = if mask == 0xFFFF {
                            e
                        } else {
                            _mm512_maskz_mov_ps(mask, e)
                        };
                        p_sums[r] = _mm512_add_ps(p_sums[r], pv);
                    }
                    for g in 0..NG {
                        let item = g * rows + r;
                        w[jj * per_tile + item][half] = _mm512_mul_ps(pv, sv[g]);
                        zeros[item][half] = _mm512_fmadd_ps(pv, zv[g], zeros[item][half]);
                    }
                }
            }
            // Probabilities and value scales are never negative (a min-max grid's step), so
            // neither are the weights: their maximum is their largest magnitude.
            for item in jj * per_tile..(jj + 1) * per_tile {
                let [w0, w1] = w[item];
                m[item] = _mm512_max_ps(w0, w1);
            }
        }
        for mi in &mut m[count * per_tile..] {
            *mi = _mm512_setzero_ps();
        }
        let (k, sig) = i8_scales(reduce16::<true>(&m));
        let mut next = Batch {
            j0,
            count,
            ks: [0.0; 16],
            sigs: [0.0; 16],
        };
        _mm512_storeu_ps(next.ks.as_mut_ptr(), k);
        _mm512_storeu_ps(next.sigs.as_mut_ptr(), sig);
        if let Some(batch) = pending.replace(next) {
            round_batch::<T>(&batch, w_pending, per_tile, nt, sigma, hp, lp);
        }
    }
    if let Some(last) = pending {
        let batches = nt.div_ceil(per);
        round_batch::<T>(
            &last,
            &w_both[(batches - 1) % 2],
            per_tile,
            nt,
            sigma,
            hp,
            lp,
        );
    }
    for item in 0..per_tile {
        *zero.add(item) = _mm512_reduce_add_ps(_mm512_add_ps(zeros[item][0], zeros[item][1]));
    }
    if EXP {
        for r in 0..rows {
            *exp.1.add(r) += _mm512_reduce_add_ps(p_sums[r]);
        }
    }
}

/// A batch of [`value_weights_rows`]'s tiles weighed and waiting to be rounded: its first
/// tile, its tile count, and each item's rounding factor (`127 / max`) and scale.
struct Batch {
    j0: usize,
    count: usize,
    ks: [f32; 16],
    sigs: [f32; 16],
}

/// Rounds a batch's weights `w` (item `jj·per_tile + out_row`, output row `g·rows + r`,
/// row `r` of group `g`, goes to tile `j0 + jj` of that row) and stores their scales. (A
/// function, not a closure: closures do not inherit the caller's target features.)
#[inline(always)]
unsafe fn round_batch<const T: usize>(
    &Batch {
        j0,
        count,
        ref ks,
        ref sigs,
    }: &Batch,
    w: &[[__m512; 2]; 16],
    per_tile: usize,
    nt: usize,
    sigma: *mut f32,
    hp: *mut i8,
    lp: Option<*mut i8>,
) {
    let out_at = |item: usize| {
        let (jj, out_row) = (item / per_tile, item % per_tile);
        (out_row * nt + j0 + jj, out_row)
    };
    let items = count * per_tile;
    for item in 0..items {
        *sigma.add(out_at(item).0) = sigs[item];
    }
    match lp {
        None => {
            // Two items' 64 weights rounded and packed together, stored as two runs.
            for item in (0..items).step_by(2) {
                let next = (item + 1).min(items - 1);
                let (ka, kb) = (_mm512_set1_ps(ks[item]), _mm512_set1_ps(ks[next]));
                let w4 = [w[item][0], w[item][1], w[next][0], w[next][1]];
                let bytes = round4_i8(w4, [ka, ka, kb, kb]);
                let at = out_at(item).0 * T;
                _mm256_storeu_si256(hp.add(at) as *mut _, _mm512_castsi512_si256(bytes));
                if next != item {
                    let at = out_at(next).0 * T;
                    let hi = _mm512_extracti64x4_epi64::<1>(bytes);
                    _mm256_storeu_si256(hp.add(at) as *mut _, hi);
                }
            }
        }
        Some(lp) => {
            for item in 0..items {
                let kj = _mm512_set1_ps(ks[item]);
                for half in 0..2 {
                    let at = out_at(item).0 * T + half * 16;
                    round_i8(w[item][half], kj, hp.add(at), Some(lp.add(at)));
                }
            }
        }
    }
}

// Keep the tile constants referenced here in step with the layout's definition.
const _: () = assert!(KEY_TILE_TOKENS == 16 && VALUE_TILE_TOKENS == 32);

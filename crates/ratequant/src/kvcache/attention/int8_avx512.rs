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
    key_tile_bytes, planes, value_tile_bytes, KeyWeights, KEY_TILE_TOKENS, VALUE_TILE_TOKENS,
};

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
        key_dot_rows,
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

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_dot_rows<const R: usize>(
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
        let q = w.q.as_ptr().add(w.at(tile));
        let mut total = [_mm512_setzero_si512(); R];
        for (pw, off) in planes(bits) {
            let panel = base.add(2 * d * off as usize);
            let sums = plane_dot_any::<R>(pw, panel, c0, c1, q, w.stride);
            add_shifted(&mut total, &sums, off);
        }
        for (r, t) in total.iter().enumerate() {
            _mm512_storeu_si512(
                out.add(r * out_stride + tile * KEY_TILE_TOKENS) as *mut _,
                *t,
            );
        }
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
    let (codes, w, scale, acc) = (codes.as_ptr(), w.as_ptr(), scale.as_ptr(), acc.as_mut_ptr());
    let (c0, c1) = (channels.start, channels.end);
    by_rows!(
        rows,
        value_rows,
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

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_rows<const R: usize>(
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
    // Tile by tile, so the codes stream in order (lane groups inside a tile are adjacent);
    // the f32 sums live in `acc`, which stays in L1.
    let tile_bytes = value_tile_bytes(d, bits);
    for tile in 0..tiles {
        let wt = w.add(tile * VALUE_TILE_TOKENS);
        let mut s = [_mm512_setzero_ps(); R];
        for (r, x) in s.iter_mut().enumerate() {
            *x = _mm512_set1_ps(*scale.add(r * scale_stride + tile));
        }
        for lane_group in c0 / 16..c1 / 16 {
            let base = codes.add(tile * tile_bytes + 64 * lane_group * bits as usize);
            let mut total = [_mm512_setzero_si512(); R];
            for (pw, off) in planes(bits) {
                let panel = base.add(64 * off as usize);
                let sums = plane_dot_any::<R>(pw, panel, 0, VALUE_TILE_TOKENS, wt, w_stride);
                add_shifted(&mut total, &sums, off);
            }
            for r in 0..R {
                let dst = acc.add(r * acc_stride + lane_group * 16);
                let f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[r]), s[r], _mm512_loadu_ps(dst));
                _mm512_storeu_ps(dst, f);
            }
        }
    }
}

#[inline(always)]
unsafe fn add_shifted<const R: usize>(total: &mut [__m512i; R], sums: &[__m512i; R], off: u8) {
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
    let mask = _mm512_set1_epi8(((1u16 << W) - 1) as u8 as i8);
    let mut acc = [[_mm512_setzero_si512(); R]; 2];
    for line in red0 / per_line..red1 / per_line {
        let v = _mm512_loadu_si512(panel.add(line * 64) as *const _);
        for k in 0..m {
            let x = if W == 8 {
                v
            } else if k == 0 {
                _mm512_and_si512(v, mask)
            } else {
                let count = _mm_cvtsi32_si128((k * W) as i32);
                _mm512_and_si512(_mm512_srl_epi16(v, count), mask)
            };
            let red = line * per_line + 4 * k;
            let a = &mut acc[(line * m + k) & 1];
            for r in 0..R {
                let four = (weights.add(r * w_stride + red) as *const i32).read_unaligned();
                a[r] = _mm512_dpbusd_epi32(a[r], x, _mm512_set1_epi32(four));
            }
        }
    }
    let mut out = [_mm512_setzero_si512(); R];
    for r in 0..R {
        out[r] = _mm512_add_epi32(acc[0][r], acc[1][r]);
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
    amax / 127.0
}

/// See [`super::int8::key_block_weights`]; `d` a multiple of 32 (every tiled layout's), so
/// whole vectors and chunks in pairs. Per block the scales and zero-points are widened once
/// for all rows; per row `w` is built and its maximum taken in one pass, then rounded from
/// the stack. One call covers many blocks, so the out-of-order core overlaps one row's
/// reductions with the next row's work.
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
    let d = q.len() / rows;
    debug_assert!(d.is_multiple_of(32) && d <= 512);
    let q_rows = if split { 2 * rows } else { rows };
    let chunks = d / 16;
    let mut sv = std::mem::MaybeUninit::<[__m512; 32]>::uninit();
    let mut zv = std::mem::MaybeUninit::<[__m512; 32]>::uninit();
    let mut w = std::mem::MaybeUninit::<[__m512; 32]>::uninit();
    let (svp, zvp, wp) = (
        sv.as_mut_ptr() as *mut __m512,
        zv.as_mut_ptr() as *mut __m512,
        w.as_mut_ptr() as *mut __m512,
    );
    let k254 = _mm512_set1_ps(254.0);
    for blk in 0..blocks {
        let (sp, zp) = (s.as_ptr().add(blk * d), z.as_ptr().add(blk * d));
        for j in 0..chunks {
            let at = 16 * j;
            svp.add(j)
                .write(_mm512_cvtph_ps(_mm256_loadu_si256(sp.add(at) as *const _)));
            zvp.add(j)
                .write(_mm512_cvtph_ps(_mm256_loadu_si256(zp.add(at) as *const _)));
        }
        for r in 0..rows {
            let qp = q.as_ptr().add(r * d);
            let (mut b0, mut b1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let (mut m0, mut m1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for j in (0..chunks).step_by(2) {
                let q0 = _mm512_loadu_ps(qp.add(16 * j));
                let q1 = _mm512_loadu_ps(qp.add(16 * j + 16));
                let w0 = _mm512_mul_ps(q0, svp.add(j).read());
                let w1 = _mm512_mul_ps(q1, svp.add(j + 1).read());
                wp.add(j).write(w0);
                wp.add(j + 1).write(w1);
                m0 = _mm512_max_ps(m0, _mm512_abs_ps(w0));
                m1 = _mm512_max_ps(m1, _mm512_abs_ps(w1));
                b0 = _mm512_fmadd_ps(q0, zvp.add(j).read(), b0);
                b1 = _mm512_fmadd_ps(q1, zvp.add(j + 1).read(), b1);
            }
            bias[blk * rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
            let hp = w8.as_mut_ptr().add((blk * q_rows + r) * d);
            let lp = split.then(|| w8.as_mut_ptr().add((blk * q_rows + rows + r) * d));
            if amax == 0.0 {
                std::ptr::write_bytes(hp, 0, d);
                if let Some(lp) = lp {
                    std::ptr::write_bytes(lp, 0, d);
                }
                sigma[blk * rows + r] = 0.0;
                continue;
            }
            let k = _mm512_set1_ps(127.0 / amax);
            for j in 0..chunks {
                let i = 16 * j;
                let t = _mm512_mul_ps(wp.add(j).read(), k);
                let h = _mm512_cvtps_epi32(t);
                _mm_storeu_si128(hp.add(i) as *mut _, _mm512_cvtsepi32_epi8(h));
                if let Some(lp) = lp {
                    let r = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(h)), k254);
                    let l = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r));
                    _mm_storeu_si128(lp.add(i) as *mut _, l);
                }
            }
            sigma[blk * rows + r] = amax / 127.0;
        }
    }
}

/// See [`super::int8::value_weights`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn value_weights(
    p: &[f32],
    s: &[half::f16],
    z: &[half::f16],
    first: usize,
    hi: &mut [i8],
    lo: Option<&mut [i8]>,
    sigma: &mut [f32],
) -> f32 {
    let n = p.len();
    let tiles = (first + n).div_ceil(VALUE_TILE_TOKENS);
    let (pp, sp, zp) = (
        p.as_ptr(),
        s.as_ptr() as *const u16,
        z.as_ptr() as *const u16,
    );
    let (hp, lp) = (hi.as_mut_ptr(), lo.map(|l| l.as_mut_ptr()));
    let mut zero = [_mm512_setzero_ps(); 2];
    let k254 = _mm512_set1_ps(254.0);
    for j in 0..tiles {
        // Lanes of the two halves: tile position t ↔ token i = 32j + t − first, kept if i < n.
        let mut w = [_mm512_setzero_ps(); 2];
        let mut masks = [0 as __mmask16; 2];
        for (half, (wv, m)) in w.iter_mut().zip(masks.iter_mut()).enumerate() {
            let pos = j * VALUE_TILE_TOKENS + half * 16;
            // Token index of lane 0 (may be "negative": lanes below `first` are masked off).
            let base = pos as isize - first as isize;
            let mut mask: u32 = 0xFFFF;
            if base < 0 {
                mask &= 0xFFFF << (-base) as u32;
            }
            let left = n as isize - base;
            if left < 16 {
                mask &= if left <= 0 { 0 } else { (1u32 << left) - 1 };
            }
            *m = mask as u16;
            let pv = _mm512_maskz_loadu_ps(*m, pp.wrapping_offset(base));
            let sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                *m,
                sp.wrapping_offset(base) as *const _,
            ));
            let zv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                *m,
                zp.wrapping_offset(base) as *const _,
            ));
            *wv = _mm512_mul_ps(pv, sv);
            zero[half] = _mm512_fmadd_ps(pv, zv, zero[half]);
        }
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(w[0]), _mm512_abs_ps(w[1])));
        let at = j * VALUE_TILE_TOKENS;
        if amax == 0.0 {
            sigma[j] = 0.0;
            _mm256_storeu_si256(hp.add(at) as *mut _, _mm256_setzero_si256());
            if let Some(lp) = lp {
                _mm256_storeu_si256(lp.add(at) as *mut _, _mm256_setzero_si256());
            }
            continue;
        }
        let k = _mm512_set1_ps(127.0 / amax);
        for (half, wv) in w.iter().enumerate() {
            let t = _mm512_mul_ps(*wv, k);
            let h = _mm512_cvtps_epi32(t);
            _mm_storeu_si128(hp.add(at + half * 16) as *mut _, _mm512_cvtsepi32_epi8(h));
            if let Some(lp) = lp {
                let r = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(h)), k254);
                let l = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r));
                _mm_storeu_si128(lp.add(at + half * 16) as *mut _, l);
            }
        }
        sigma[j] = amax / 127.0;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(zero[0], zero[1]))
}

// Keep the tile constants referenced here in step with the layout's definition.
const _: () = assert!(KEY_TILE_TOKENS == 16 && VALUE_TILE_TOKENS == 32);

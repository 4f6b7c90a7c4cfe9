//! AVX-512 (F + BW) kernels: 16 codes per vector, the same scheme as the AVX2 path.
//!
//! Sixteen `b`-bit codes fill exactly `2b ≤ 16` bytes: load 16 bytes, broadcast them to the
//! four 128-bit blocks, `vpshufb` gives each 32-bit lane the two bytes its code starts in,
//! `vpsrlvd` shifts each lane by its bit offset, mask, convert to f32.

// Indexing accumulator arrays by row and chunk keeps the register blocking readable.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

struct Unpack {
    ctrl: __m512i,
    shifts: __m512i,
    mask: __m512i,
}

impl Unpack {
    #[target_feature(enable = "avx512f,avx512bw")]
    fn new(bits: u8) -> Unpack {
        let b = bits as usize;
        let mut ctrl = [0x80u8; 64];
        let mut shifts = [0i32; 16];
        for lane in 0..16 {
            let bit = lane * b;
            let byte = (bit / 8) as u8;
            // Byte indices refer to the lane's own 128-bit block; every block holds the same
            // 16 loaded bytes. A second byte past them is never needed (only at 8 bits, where
            // the code is one whole byte), so it reads as zero.
            let at = (lane / 4) * 16 + (lane % 4) * 4;
            ctrl[at] = byte;
            ctrl[at + 1] = if byte < 15 { byte + 1 } else { 0x80 };
            shifts[lane] = (bit % 8) as i32;
        }
        // SAFETY: plain unaligned loads from local arrays of the right size.
        unsafe {
            Unpack {
                ctrl: _mm512_loadu_si512(ctrl.as_ptr() as *const __m512i),
                shifts: _mm512_loadu_si512(shifts.as_ptr() as *const __m512i),
                mask: _mm512_set1_epi32((1i32 << bits) - 1),
            }
        }
    }

    /// Sixteen codes starting at byte `p` (reads 16 bytes).
    #[inline(always)]
    unsafe fn load(&self, p: *const u8) -> __m512 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let all = _mm512_broadcast_i32x4(raw);
        let spread = _mm512_shuffle_epi8(all, self.ctrl);
        let codes = _mm512_and_si512(_mm512_srlv_epi32(spread, self.shifts), self.mask);
        _mm512_cvtepi32_ps(codes)
    }
}

/// Scores of `NC` chunks of 16 tokens starting at token `t0` into `acc`, for `R` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn key_pass<const R: usize, const NC: usize>(
    unpack: &Unpack,
    codes: *const u8,
    slot_bytes: usize,
    b: usize,
    c0: usize,
    c1: usize,
    t0: usize,
    w: *const f32,
    w_stride: usize,
) -> [[__m512; NC]; R] {
    let mut acc = [[_mm512_setzero_ps(); NC]; R];
    let mut p = codes.add(c0 * slot_bytes + t0 * b / 8);
    for c in c0..c1 {
        let mut wr = [_mm512_setzero_ps(); R];
        for (r, x) in wr.iter_mut().enumerate() {
            *x = _mm512_set1_ps(*w.add(r * w_stride + c));
        }
        for k in 0..NC {
            let v = unpack.load(p.add(k * 2 * b));
            for r in 0..R {
                acc[r][k] = _mm512_fmadd_ps(wr[r], v, acc[r][k]);
            }
        }
        p = p.add(slot_bytes);
    }
    acc
}

/// Stores the lanes of `acc` (chunks from token `t0`) that fall in `t_begin..t_end`.
#[inline(always)]
unsafe fn store_scores<const R: usize, const NC: usize>(
    acc: &[[__m512; NC]; R],
    t0: usize,
    t_begin: usize,
    t_end: usize,
    out: *mut f32,
    out_stride: usize,
) {
    for k in 0..NC {
        let base = t0 + 16 * k;
        let lo = t_begin.max(base);
        let hi = t_end.min(base + 16);
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = out.add(r * out_stride);
            if lo == base && hi == base + 16 {
                _mm512_storeu_ps(dst.add(base - t_begin), acc_r[k]);
            } else if lo < hi {
                let mut tmp = [0f32; 16];
                _mm512_storeu_ps(tmp.as_mut_ptr(), acc_r[k]);
                for t in lo..hi {
                    *dst.add(t - t_begin) = tmp[t - base];
                }
            }
        }
    }
}

/// See [`super::key_scores`]. `R` query rows, `NC` chunks of 16 tokens per pass (independent
/// accumulators hide the FMA latency).
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn key_scores_rows<const R: usize, const NC: usize>(
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
    let unpack = Unpack::new(bits);
    let b = bits as usize;
    let end16 = t_end.div_ceil(16) * 16;
    let mut t0 = t_begin / 16 * 16;
    // Full passes of NC chunks, then single chunks, never reading past the last chunk.
    while t0 + NC * 16 <= end16 {
        let acc = key_pass::<R, NC>(&unpack, codes, slot_bytes, b, c0, c1, t0, w, w_stride);
        store_scores::<R, NC>(&acc, t0, t_begin, t_end, out, out_stride);
        t0 += NC * 16;
    }
    while t0 < t_end {
        let acc = key_pass::<R, 1>(&unpack, codes, slot_bytes, b, c0, c1, t0, w, w_stride);
        store_scores::<R, 1>(&acc, t0, t_begin, t_end, out, out_stride);
        t0 += 16;
    }
}

/// `NC` chunks of 16 channels from channel `ch`, accumulated over `tokens` rows, for `R` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_pass<const R: usize, const NC: usize>(
    unpack: &Unpack,
    codes: *const u8,
    row_bytes: usize,
    b: usize,
    tokens: usize,
    ch: usize,
    w: *const f32,
    w_stride: usize,
) -> [[__m512; NC]; R] {
    let mut acc = [[_mm512_setzero_ps(); NC]; R];
    let mut p = codes.add(ch * b / 8);
    for t in 0..tokens {
        let mut v = [_mm512_setzero_ps(); NC];
        for (k, vk) in v.iter_mut().enumerate() {
            *vk = unpack.load(p.add(k * 2 * b));
        }
        for r in 0..R {
            let wr = _mm512_set1_ps(*w.add(r * w_stride + t));
            for k in 0..NC {
                acc[r][k] = _mm512_fmadd_ps(wr, v[k], acc[r][k]);
            }
        }
        p = p.add(row_bytes);
    }
    acc
}

/// Adds the lanes of `acc` (chunks from channel `ch`) below `c1` into the accumulator rows.
#[inline(always)]
unsafe fn add_values<const R: usize, const NC: usize>(
    acc: &[[__m512; NC]; R],
    ch: usize,
    c1: usize,
    acc_out: *mut f32,
    acc_stride: usize,
) {
    for k in 0..NC {
        let base = ch + 16 * k;
        let hi = c1.min(base + 16);
        for (r, acc_r) in acc.iter().enumerate() {
            let dst = acc_out.add(r * acc_stride + base);
            if hi == base + 16 {
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), acc_r[k]));
            } else if base < hi {
                let mut tmp = [0f32; 16];
                _mm512_storeu_ps(tmp.as_mut_ptr(), acc_r[k]);
                for (i, v) in tmp.iter().take(hi - base).enumerate() {
                    *dst.add(i) += v;
                }
            }
        }
    }
}

/// See [`super::value_accumulate`]. `R` rows, `NC` chunks of 16 channels per pass.
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn value_accumulate_rows<const R: usize, const NC: usize>(
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
    let unpack = Unpack::new(bits);
    let b = bits as usize;
    let end16 = c0 + (c1 - c0).div_ceil(16) * 16;
    let mut ch = c0;
    while ch + NC * 16 <= end16 {
        let acc = value_pass::<R, NC>(&unpack, codes, row_bytes, b, tokens, ch, w, w_stride);
        add_values::<R, NC>(&acc, ch, c1, acc_out, acc_stride);
        ch += NC * 16;
    }
    while ch < c1 {
        let acc = value_pass::<R, 1>(&unpack, codes, row_bytes, b, tokens, ch, w, w_stride);
        add_values::<R, 1>(&acc, ch, c1, acc_out, acc_stride);
        ch += 16;
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $rows:expr, ($($arg:expr),*)) => {
        match $rows {
            // R·NC accumulators plus the three unpack constants and temporaries stay
            // within the 32 zmm registers.
            1 => $f::<1, 4>($($arg),*),
            2 => $f::<2, 4>($($arg),*),
            3 => $f::<3, 4>($($arg),*),
            4 => $f::<4, 4>($($arg),*),
            5 => $f::<5, 3>($($arg),*),
            6 => $f::<6, 3>($($arg),*),
            7 => $f::<7, 2>($($arg),*),
            8 => $f::<8, 2>($($arg),*),
            n => unreachable!("row batches hold 1..=8 rows, got {n}"),
        }
    };
}

/// # Safety
/// AVX-512 F and BW must be available; the caller checked every index against the slices and
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

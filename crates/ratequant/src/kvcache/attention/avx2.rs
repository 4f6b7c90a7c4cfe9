//! AVX2 + FMA kernels: 8 codes per vector.
//!
//! Unpacking eight `b`-bit codes (which always fill exactly `b` bytes): load 8 bytes,
//! broadcast them to both 128-bit halves, let `vpshufb` give each 32-bit lane the two bytes
//! its code starts in, shift each lane right by its own bit offset (`vpsrlvd`), mask, convert
//! to f32. One constant set per bit-width serves every position, since eight codes always
//! start on a byte boundary.

use std::arch::x86_64::*;

struct Unpack {
    ctrl: __m256i,
    shifts: __m256i,
    mask: __m256i,
}

impl Unpack {
    #[target_feature(enable = "avx2")]
    fn new(bits: u8) -> Unpack {
        let b = bits as usize;
        let mut ctrl = [0x80u8; 32];
        let mut shifts = [0i32; 8];
        for lane in 0..8 {
            let bit = lane * b;
            let byte = (bit / 8) as u8;
            // Byte indices refer to the lane's own 128-bit half; both halves hold the same 8
            // loaded bytes (the upper 8 bytes of each half are zero).
            let at = (lane / 4) * 16 + (lane % 4) * 4;
            ctrl[at] = byte;
            ctrl[at + 1] = byte + 1;
            shifts[lane] = (bit % 8) as i32;
        }
        // SAFETY: plain unaligned loads from local arrays of the right size.
        unsafe {
            Unpack {
                ctrl: _mm256_loadu_si256(ctrl.as_ptr() as *const __m256i),
                shifts: _mm256_loadu_si256(shifts.as_ptr() as *const __m256i),
                mask: _mm256_set1_epi32((1i32 << bits) - 1),
            }
        }
    }

    /// Eight codes starting at byte `p` (reads 8 bytes).
    #[inline(always)]
    unsafe fn load(&self, p: *const u8) -> __m256 {
        let raw = _mm_loadl_epi64(p as *const __m128i);
        let both = _mm256_broadcastsi128_si256(raw);
        let spread = _mm256_shuffle_epi8(both, self.ctrl);
        let codes = _mm256_and_si256(_mm256_srlv_epi32(spread, self.shifts), self.mask);
        _mm256_cvtepi32_ps(codes)
    }
}

/// See [`super::key_scores`]. `R` query rows, `NC` chunks of 8 tokens per pass (independent
/// accumulators hide the FMA latency).
#[target_feature(enable = "avx2,fma")]
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
    let end8 = t_end.div_ceil(8) * 8;
    let mut t0 = t_begin / 8 * 8;
    // Full passes of NC chunks, then single chunks, never reading past the last chunk.
    while t0 < t_end {
        let nc = if t0 + NC * 8 <= end8 { NC } else { 1 };
        let mut acc = [[_mm256_setzero_ps(); NC]; R];
        let mut p = codes.add(c0 * slot_bytes + t0 * b / 8);
        for c in c0..c1 {
            if nc == NC {
                for k in 0..NC {
                    let v = unpack.load(p.add(k * b));
                    for r in 0..R {
                        let wr = _mm256_broadcast_ss(&*w.add(r * w_stride + c));
                        acc[r][k] = _mm256_fmadd_ps(wr, v, acc[r][k]);
                    }
                }
            } else {
                let v = unpack.load(p);
                for r in 0..R {
                    let wr = _mm256_broadcast_ss(&*w.add(r * w_stride + c));
                    acc[r][0] = _mm256_fmadd_ps(wr, v, acc[r][0]);
                }
            }
            p = p.add(slot_bytes);
        }
        for k in 0..nc {
            let base = t0 + 8 * k;
            let lo = t_begin.max(base);
            let hi = t_end.min(base + 8);
            for r in 0..R {
                let dst = out.add(r * out_stride);
                if lo == base && hi == base + 8 {
                    _mm256_storeu_ps(dst.add(base - t_begin), acc[r][k]);
                } else if lo < hi {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r][k]);
                    for t in lo..hi {
                        *dst.add(t - t_begin) = tmp[t - base];
                    }
                }
            }
        }
        t0 += nc * 8;
    }
}

/// See [`super::value_accumulate`]. `R` rows, `NC` chunks of 8 channels per pass.
#[target_feature(enable = "avx2,fma")]
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
    let end8 = c0 + (c1 - c0).div_ceil(8) * 8;
    let mut ch = c0;
    while ch < c1 {
        let nc = if ch + NC * 8 <= end8 { NC } else { 1 };
        let mut acc = [[_mm256_setzero_ps(); NC]; R];
        let mut p = codes.add(ch * b / 8);
        for t in 0..tokens {
            if nc == NC {
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
            } else {
                let v = unpack.load(p);
                for r in 0..R {
                    let wr = _mm256_broadcast_ss(&*w.add(r * w_stride + t));
                    acc[r][0] = _mm256_fmadd_ps(wr, v, acc[r][0]);
                }
            }
            p = p.add(row_bytes);
        }
        for k in 0..nc {
            let base = ch + 8 * k;
            let hi = c1.min(base + 8);
            for r in 0..R {
                let dst = acc_out.add(r * acc_stride + base);
                if hi == base + 8 {
                    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc[r][k]));
                } else {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), acc[r][k]);
                    for (i, v) in tmp.iter().take(hi - base).enumerate() {
                        *dst.add(i) += v;
                    }
                }
            }
        }
        ch += nc * 8;
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $rows:expr, ($($arg:expr),*)) => {
        match $rows {
            1 => $f::<1, 4>($($arg),*),
            2 => $f::<2, 4>($($arg),*),
            3 => $f::<3, 4>($($arg),*),
            4 => $f::<4, 3>($($arg),*),
            5 => $f::<5, 2>($($arg),*),
            6 => $f::<6, 2>($($arg),*),
            7 => $f::<7, 1>($($arg),*),
            8 => $f::<8, 1>($($arg),*),
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

//! Fused quantize-and-pack for AVX2: the codes of 32 elements are computed in vector
//! registers and packed straight into the output bytes, with no intermediate buffer of
//! one-byte codes and no second pass over it.
//!
//! The arithmetic is that of `minmax::code` (subtract, multiply, clamp, round to nearest with
//! ties to even; no FMA), with the min/max operands ordered so that every comparison, NaN
//! and signed zero included, picks what the scalar `if` picks (see `avx2::codes8` for the
//! rounding); the bit layout is that of `pack::pack`. The portable path (code a row into
//! bytes, then pack) is the reference the tests compare these kernels against.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Grid parameters of 8 consecutive elements, one per lane; `lo`/`hi` is the clamp range
    /// (read only by the clamping variant).
    #[derive(Clone, Copy)]
    pub(crate) struct Grid8 {
        pub zero: __m256,
        pub inv_scale: __m256,
        pub lo: __m256,
        pub hi: __m256,
    }

    impl Grid8 {
        /// One grid for all 8 elements (per-token groups of a multiple of 8 channels).
        #[target_feature(enable = "avx2")]
        #[inline]
        pub(crate) fn splat(zero: f32, inv_scale: f32, lo: f32, hi: f32) -> Grid8 {
            Grid8 {
                zero: _mm256_set1_ps(zero),
                inv_scale: _mm256_set1_ps(inv_scale),
                lo: _mm256_set1_ps(lo),
                hi: _mm256_set1_ps(hi),
            }
        }

        /// Elements `at..at + 8` of per-element grid arrays; `lo`/`hi` are left zero when
        /// `clamp` is empty.
        #[target_feature(enable = "avx2")]
        #[inline]
        pub(crate) fn load(
            zero: &[f32],
            inv_scale: &[f32],
            clamp: Option<(&[f32], &[f32])>,
            at: usize,
        ) -> Grid8 {
            let load = |v: &[f32]| load8(&v[at..at + 8], 0);
            let (lo, hi) = match clamp {
                Some((lo, hi)) => (load(lo), load(hi)),
                None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
            };
            Grid8 {
                zero: load(zero),
                inv_scale: load(inv_scale),
                lo,
                hi,
            }
        }
    }

    /// Codes of 8 values in the 32-bit lanes (`minmax::code`, or `code` of the value clamped
    /// into `[lo, hi]` with `CLAMP`), as signed integers whose negative values stand for 0
    /// (the packs of [`Packer::store`] saturate them to 0).
    ///
    /// The scalar code clamps `t = (x − zero)·inv_scale` into `[0, levels]` and rounds by
    /// adding 1.5·2^23 (nearest, ties to even). Here `t` is clamped from above only and
    /// rounded by `cvtps2dq` in the default rounding mode, also nearest with ties to even,
    /// which gives the same integer for every `t ≤ levels`: a negative `t` becomes an integer
    /// ≤ 0, a NaN `t` the integer minimum, both coded 0 as by the scalar code.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn codes8<const CLAMP: bool>(x: __m256, g: &Grid8, levels: __m256) -> __m256i {
        // `_mm256_max_ps(a, b)` is `a > b ? a : b` and `_mm256_min_ps(a, b)` is
        // `a < b ? a : b`: with the bound first they are exactly the scalar clamps
        // `if v < lo { lo } else { v }` and `if v > hi { hi } else { v }`.
        let x = if CLAMP {
            _mm256_min_ps(g.hi, _mm256_max_ps(g.lo, x))
        } else {
            x
        };
        let t = _mm256_mul_ps(_mm256_sub_ps(x, g.zero), g.inv_scale);
        _mm256_cvtps_epi32(_mm256_min_ps(levels, t))
    }

    /// Values `8j..8j + 8` of `v`.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn load8(v: &[f32], j: usize) -> __m256 {
        let v: &[f32; 8] = v[8 * j..8 * j + 8].try_into().expect("8 lanes");
        // SAFETY: `v` holds 8 floats.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// Packs runs of 32 codes into `4·bits` bytes. The codes become bytes (saturating packs),
    /// then each 64-bit lane's 8 codes are joined as by the scalar packer's `squeeze8`: pairs
    /// by a multiply-add of bytes (`c0 + c1·2^b`), pairs of pairs by a multiply-add of 16-bit
    /// lanes, and the two 32-bit halves by a shift; a shuffle then gathers each 128-bit
    /// half's `2·bits` bytes to its bottom.
    pub(crate) struct Packer {
        bits: usize,
        /// Byte weights `1, 2^b` (unsigned operand; the codes, < 2^7 below 8 bits, are the
        /// signed one).
        pairs: __m256i,
        /// 16-bit weights `1, 2^(2b)`.
        quads: __m256i,
        /// Shift of the high 32-bit half down onto bit `4b`, and the masks joining it.
        shift: __m128i,
        keep: __m256i,
        moved: __m256i,
        gather: __m256i,
    }

    impl Packer {
        #[target_feature(enable = "avx2")]
        #[inline]
        pub(crate) fn new(bits: u8) -> Packer {
            let b = bits as usize;
            let mut gather = [-1i8; 32];
            for half in 0..2 {
                for i in 0..2 * b {
                    // byte i of the half: byte i % b of the half's qword i / b
                    gather[16 * half + i] = (8 * (i / b) + i % b) as i8;
                }
            }
            // 8 bits: the bytes are the packed codes; the weights are then unused
            let b7 = b.min(7);
            let low4b = (1u64 << (4 * b7)) - 1;
            Packer {
                bits: b,
                pairs: _mm256_set1_epi16((1 | (1 << (8 + b7))) as i16),
                quads: _mm256_set1_epi32(1 | (1 << (16 + 2 * b7))),
                shift: _mm_cvtsi32_si128((32 - 4 * b7) as i32),
                keep: _mm256_set1_epi64x(low4b as i64),
                moved: _mm256_set1_epi64x((low4b << (4 * b7)) as i64),
                // SAFETY: `gather` holds 32 bytes.
                gather: unsafe { _mm256_loadu_si256(gather.as_ptr().cast()) },
            }
        }

        /// Packs the codes `c` (32 codes, element `8·j + i` in lane `i` of `c[j]`, see
        /// [`codes8`]) into `out[at..at + valid]`; bytes up to `at + 2·bits + 16` may be
        /// overwritten with garbage when `out` is that long (the caller's next chunk
        /// overwrites them).
        #[target_feature(enable = "avx2")]
        #[inline]
        fn store(&self, c: [__m256i; 4], out: &mut [u8], at: usize, valid: usize) {
            // 32-bit lanes → bytes, negative codes → 0; the packs work per 128-bit half, the
            // permute restores element order
            let words01 = _mm256_packus_epi32(c[0], c[1]);
            let words23 = _mm256_packus_epi32(c[2], c[3]);
            let bytes = _mm256_packus_epi16(words01, words23);
            let mut v =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            if self.bits < 8 {
                let v16 = _mm256_maddubs_epi16(self.pairs, v);
                let v32 = _mm256_madd_epi16(v16, self.quads);
                v = _mm256_or_si256(
                    _mm256_and_si256(v32, self.keep),
                    _mm256_and_si256(_mm256_srl_epi64(v32, self.shift), self.moved),
                );
            }
            let v = _mm256_shuffle_epi8(v, self.gather);
            let (low, high) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let half = 2 * self.bits;
            if at + half + 16 <= out.len() {
                // SAFETY: both 16-byte stores lie inside `out` (checked above).
                unsafe {
                    _mm_storeu_si128(out.as_mut_ptr().add(at).cast(), low);
                    _mm_storeu_si128(out.as_mut_ptr().add(at + half).cast(), high);
                }
            } else {
                let mut tmp = [0u8; 48];
                // SAFETY: `tmp` holds 48 ≥ half + 16 bytes.
                unsafe {
                    _mm_storeu_si128(tmp.as_mut_ptr().cast(), low);
                    _mm_storeu_si128(tmp.as_mut_ptr().add(half).cast(), high);
                }
                out[at..at + valid].copy_from_slice(&tmp[..valid]);
            }
        }
    }

    /// Codes of the rows of `src` (each `head_dim` values, `head_dim` a multiple of 8),
    /// packed LSB-first at the packer's width into `out` (exactly `src.len()·bits/8` bytes).
    /// `grid(r, q)` gives the grids of elements `8q..8q + 8` of row `r`; with `RUN32` it is
    /// the same for the four runs of 8 of each run of 32 (`q = 4k..4k + 4`) and is asked for
    /// once per run of 32. While coding value
    /// `i` the cache lines of `ahead[i..i + 32]` are prefetched (the caller's next rows, read
    /// next for their ranges), for as far as `ahead` goes.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(crate) fn code_pack_rows<const CLAMP: bool, const RUN32: bool>(
        packer: &Packer,
        src: &[f32],
        head_dim: usize,
        levels: f32,
        grid: impl Fn(usize, usize) -> Grid8,
        ahead: &[f32],
        out: &mut [u8],
    ) {
        debug_assert!(head_dim.is_multiple_of(8) && src.len().is_multiple_of(head_dim));
        let bits = packer.bits;
        debug_assert_eq!(out.len(), src.len() * bits / 8);
        let levels = _mm256_set1_ps(levels);
        let row_bytes = head_dim * bits / 8;
        for (r, row) in src.chunks_exact(head_dim).enumerate() {
            let mut at = r * row_bytes;
            let mut runs = row.chunks_exact(32);
            for (k, run) in (&mut runs).enumerate() {
                if let Some(next) = ahead.get(r * head_dim + 32 * k..r * head_dim + 32 * k + 32) {
                    // two cache lines of 16 values (a line-aligned run spans exactly these)
                    _mm_prefetch::<_MM_HINT_T0>(next.as_ptr().cast());
                    _mm_prefetch::<_MM_HINT_T0>(next[16..].as_ptr().cast());
                }
                // written out rather than mapped over 0..4: closures there are not inlined
                let q = 4 * k;
                let g0 = grid(r, q);
                let (g1, g2, g3) = if RUN32 {
                    (g0, g0, g0)
                } else {
                    (grid(r, q + 1), grid(r, q + 2), grid(r, q + 3))
                };
                let c = [
                    codes8::<CLAMP>(load8(run, 0), &g0, levels),
                    codes8::<CLAMP>(load8(run, 1), &g1, levels),
                    codes8::<CLAMP>(load8(run, 2), &g2, levels),
                    codes8::<CLAMP>(load8(run, 3), &g3, levels),
                ];
                packer.store(c, out, at, 4 * bits);
                at += 4 * bits;
            }
            // a row's last 8, 16 or 24 values: padded with zero codes, whose bytes the next
            // row (or the exact-length store at the end of `out`) leaves out
            let tail = runs.remainder();
            if !tail.is_empty() {
                let q0 = (row.len() - tail.len()) / 8;
                let mut c = [_mm256_setzero_si256(); 4];
                for (j, cj) in c.iter_mut().enumerate().take(tail.len() / 8) {
                    *cj = codes8::<CLAMP>(load8(tail, j), &grid(r, q0 + j), levels);
                }
                packer.store(c, out, at, tail.len() * bits / 8);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::avx2::{code_pack_rows, Grid8, Packer};
    use crate::pack::pack_reference;
    use crate::quant::minmax::{self, Grid, RowGrids};

    fn random(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    /// The fused kernel against coding each row into bytes and packing them bit by bit:
    /// every width, row lengths with and without a partial run of 32, constant and
    /// degenerate grids, values outside the grid and the clamp range, signed zeros.
    #[test]
    fn fused_code_pack_matches_code_row_then_pack() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut state = 99u64;
        for bits in 1..=8u8 {
            let levels = minmax::levels(bits);
            for head_dim in [8usize, 16, 24, 32, 40, 56, 64, 72, 128, 136] {
                for rows in [1usize, 2, 5] {
                    let n = rows * head_dim;
                    let mut src: Vec<f32> = (0..n).map(|_| random(&mut state) * 6.0).collect();
                    src[0] = -0.0;
                    src[n / 2] = 0.0;
                    // one grid per 8 channels of each row, some constant, some zero-based
                    let mut grids = Vec::new();
                    for q in 0..n / 8 {
                        let (a, b) = (random(&mut state) * 4.0, random(&mut state) * 4.0);
                        let (lo, hi) = match q % 5 {
                            0 => (a, a),
                            1 => (0.0, b.abs()),
                            _ => (a.min(b), a.max(b)),
                        };
                        grids.push((Grid::covering(lo, hi, levels), lo, hi));
                    }
                    // with `run32`, each run of 32 takes the grid of its first 8
                    let runs32: &[bool] = if head_dim % 32 == 0 {
                        &[false, true]
                    } else {
                        &[false]
                    };
                    for (clamp, &run32) in [false, true]
                        .into_iter()
                        .flat_map(|c| runs32.iter().map(move |r| (c, r)))
                    {
                        let at = |r: usize, q: usize| {
                            grids[r * head_dim / 8 + if run32 { q / 4 * 4 } else { q }]
                        };
                        let mut codes = vec![0u8; n];
                        let mut row = RowGrids::new(head_dim);
                        for (r, (s, c)) in src
                            .chunks(head_dim)
                            .zip(codes.chunks_mut(head_dim))
                            .enumerate()
                        {
                            for q in 0..head_dim / 8 {
                                let (g, lo, hi) = at(r, q);
                                row.fill(8 * q, 8 * q + 8, g, lo, hi);
                            }
                            if clamp {
                                minmax::code_row_clamped(s, c, &row, levels);
                            } else {
                                minmax::code_row(s, c, &row, levels);
                            }
                        }
                        let want = pack_reference(&codes, bits);
                        let grid = |r: usize, q: usize| {
                            let (g, lo, hi) = at(r, q);
                            // SAFETY: AVX2 detected above.
                            unsafe { Grid8::splat(g.zero, g.inv_scale, lo, hi) }
                        };
                        let mut out = vec![0xA5u8; want.len()];
                        // SAFETY: AVX2 detected above.
                        let packer = unsafe { Packer::new(bits) };
                        let (ahead, out_) = (&src[8..], &mut out);
                        // SAFETY: AVX2 detected above.
                        unsafe {
                            match (clamp, run32) {
                                (false, false) => code_pack_rows::<false, false>(
                                    &packer, &src, head_dim, levels, grid, ahead, out_,
                                ),
                                (false, true) => code_pack_rows::<false, true>(
                                    &packer, &src, head_dim, levels, grid, ahead, out_,
                                ),
                                (true, false) => code_pack_rows::<true, false>(
                                    &packer, &src, head_dim, levels, grid, ahead, out_,
                                ),
                                (true, true) => code_pack_rows::<true, true>(
                                    &packer, &src, head_dim, levels, grid, ahead, out_,
                                ),
                            }
                        }
                        assert_eq!(
                            out, want,
                            "bits {bits} head_dim {head_dim} rows {rows} clamp {clamp} run32 {run32}"
                        );
                    }
                }
            }
        }
    }
}

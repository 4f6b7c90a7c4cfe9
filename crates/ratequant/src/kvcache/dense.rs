//! Plain dot-product attention over an unquantized f32 or f16 cache: the baselines the packed
//! cache is benchmarked against, decomposed into the same tasks (KV head × block of tokens,
//! blockwise softmax) and threads. With AVX-512, head_dim 64 and up to 4 query rows per KV
//! head, a hand-written kernel: each row read once (f16 widened 16 lanes at a time), its dot
//! products with the rows of queries summed 16 tokens at a time, the value rows accumulated
//! in registers. Otherwise the inner loops are compiled for AVX2+FMA when available, f16
//! keys and values converted block by block with `half`'s F16C slice conversion.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::attention::{self, Isa, SoftmaxPart};
use crate::{Error, Result};

const TASK_TOKENS: usize = 1024;
/// The baseline's own look-ahead, tuned for it: its two streams read 4 bytes per element
/// (f32) or 2 (f16) against the packed cache's fraction of one, so less distance covers the
/// same time. At 16K tokens, cold: f16 652/632 µs at 1 KiB against 716–729 µs at the packed
/// cache's 2 KiB, 684–707 µs at 512 B and 880 µs with none (at 97–99% of its bandwidth
/// bound).
const PREFETCH_AHEAD: usize = 1024;
/// Tokens converted from f16 at a time (fits L1 with its f32 copy).
const F16_SUB_BLOCK: usize = 64;

/// Element type of a dense cache.
pub trait DenseElement: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    /// The rows as f32: `src` itself for f32, else converted into the front of `buf`.
    fn as_f32_rows<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// Scratch floats a block of `n` values needs for [`DenseElement::as_f32_rows`].
    fn scratch(n: usize) -> usize;
    /// Sixteen values from `p` as f32.
    ///
    /// # Safety
    /// AVX-512 F (and F16C for f16) must be available, and `p` must point to 16 readable
    /// values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl DenseElement for f32 {
    fn from_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn as_f32_rows<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
    fn scratch(_n: usize) -> usize {
        0
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl DenseElement for f16 {
    fn from_f32(x: f32) -> f16 {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn as_f32_rows<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        let dst = &mut buf[..src.len()];
        src.convert_to_f32_slice(dst);
        dst
    }
    fn scratch(n: usize) -> usize {
        n
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// One layer's keys and values, `[kv_heads, tokens, head_dim]` each, stored as `T`.
pub struct DenseLayerCache<T: DenseElement> {
    kv_heads: usize,
    head_dim: usize,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

impl<T: DenseElement> DenseLayerCache<T> {
    pub fn new(kv_heads: usize, head_dim: usize) -> Self {
        DenseLayerCache {
            kv_heads,
            head_dim,
            k: vec![Vec::new(); kv_heads],
            v: vec![Vec::new(); kv_heads],
        }
    }

    pub fn len(&self) -> usize {
        self.k[0].len() / self.head_dim
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        2 * self.kv_heads * self.len() * self.head_dim * std::mem::size_of::<T>()
    }

    /// Appends `[kv_heads, tokens, head_dim]` keys and values.
    pub fn append(&mut self, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        let per_head = tokens * self.head_dim;
        if k.len() != self.kv_heads * per_head || v.len() != k.len() {
            return Err(Error::invalid(format!(
                "dense cache: expected k and v of [{}, {tokens}, {}], got {} and {} values",
                self.kv_heads,
                self.head_dim,
                k.len(),
                v.len()
            )));
        }
        for h in 0..self.kv_heads {
            self.k[h].extend(
                k[h * per_head..(h + 1) * per_head]
                    .iter()
                    .map(|&x| T::from_f32(x)),
            );
            self.v[h].extend(
                v[h * per_head..(h + 1) * per_head]
                    .iter()
                    .map(|&x| T::from_f32(x)),
            );
        }
        Ok(())
    }

    /// Attention of one query per head (`[heads, head_dim]`) at the last position over every
    /// stored token, softmax scale `scale`.
    pub fn attend_last(&self, q: &[f32], heads: usize, scale: f32) -> Result<Vec<f32>> {
        let d = self.head_dim;
        if heads == 0 || !heads.is_multiple_of(self.kv_heads) || q.len() != heads * d {
            return Err(Error::invalid(format!(
                "dense cache: q must be [heads, {d}] with heads a multiple of {}, got {} values for {heads} heads",
                self.kv_heads,
                q.len()
            )));
        }
        let len = self.len();
        if len == 0 {
            return Err(Error::invalid("dense cache: attention over an empty cache"));
        }
        let rows = heads / self.kv_heads;
        let qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
        let tasks: Vec<(usize, usize)> = (0..self.kv_heads)
            .flat_map(|h| (0..len).step_by(TASK_TOKENS).map(move |a| (h, a)))
            .collect();
        let avx2 = Isa::Avx2.is_available();
        let avx512 = avx2 && Isa::Avx512.is_available() && d == 64 && rows <= 4;
        // The packed cache's executor, so that benchmarks compare the caches, not hand-offs.
        let parts: Vec<(Vec<SoftmaxPart>, Vec<f32>)> = super::run_tasks(tasks.len(), |i, _| {
            let (h, a) = tasks[i];
            let b = (a + TASK_TOKENS).min(len);
            let qh = &qs[h * rows * d..(h + 1) * rows * d];
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512 F/BW, AVX2, FMA and F16C were detected; d is 64, rows ≤ 4.
                return unsafe { self.task_avx512_64(h, qh, rows, a, b) };
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA were detected.
                return unsafe { self.task_avx2(h, qh, rows, a, b) };
            }
            let _ = avx2;
            self.task(Isa::Scalar, h, qh, rows, a, b)
        });
        let (mut out, mut factors) = (vec![0.0f32; heads * d], Vec::new());
        for h in 0..self.kv_heads {
            let mine: Vec<_> = tasks
                .iter()
                .zip(&parts)
                .filter(|(t, _)| t.0 == h)
                .map(|(_, p)| p)
                .collect();
            for r in 0..rows {
                let sum = attention::merge_factors(mine.iter().map(|p| &p.0[r]), &mut factors);
                let dst = &mut out[(h * rows + r) * d..(h * rows + r + 1) * d];
                for ((_, acc), &f) in mine.iter().zip(&factors) {
                    if f != 0.0 {
                        attention::axpy(f, &acc[r * d..(r + 1) * d], dst);
                    }
                }
                let inv = 1.0 / sum;
                dst.iter_mut().for_each(|o| *o *= inv);
            }
        }
        Ok(out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn task_avx2(
        &self,
        h: usize,
        q: &[f32],
        rows: usize,
        a: usize,
        b: usize,
    ) -> (Vec<SoftmaxPart>, Vec<f32>) {
        self.task(Isa::Avx2, h, q, rows, a, b)
    }

    /// [`Self::task`] for head_dim 64 and `rows ≤ 4`, by hand in AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    fn task_avx512_64(
        &self,
        h: usize,
        q: &[f32],
        rows: usize,
        a: usize,
        b: usize,
    ) -> (Vec<SoftmaxPart>, Vec<f32>) {
        match rows {
            1 => self.task_avx512_rows::<1>(h, q, a, b),
            2 => self.task_avx512_rows::<2>(h, q, a, b),
            3 => self.task_avx512_rows::<3>(h, q, a, b),
            _ => self.task_avx512_rows::<4>(h, q, a, b),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    // Indexing the register arrays by row and token keeps the blocking readable.
    #[allow(clippy::needless_range_loop)]
    fn task_avx512_rows<const R: usize>(
        &self,
        h: usize,
        q: &[f32],
        a: usize,
        b: usize,
    ) -> (Vec<SoftmaxPart>, Vec<f32>) {
        use std::arch::x86_64::*;
        const D: usize = 64;
        let len = b - a;
        let mut scores = vec![0.0f32; R * len];
        let (keys, values) = (self.k[h].as_ptr(), self.v[h].as_ptr());
        let row_bytes = D * std::mem::size_of::<T>();
        // SAFETY (whole block): AVX-512 F/BW, FMA and F16C are enabled by the caller; every
        // row read is `t·D .. (t+1)·D` for `t < b ≤ len()`, every score written is in
        // `scores`.
        unsafe {
            let mut qv = [[_mm512_setzero_ps(); 4]; R];
            for (r, row) in qv.iter_mut().enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(q.as_ptr().add(r * D + 16 * j));
                }
            }
            // Scores, 16 tokens at a time: per token and row one vector of partial sums,
            // then 16 horizontal sums at once.
            let mut t0 = a;
            while t0 < b {
                let n = 16.min(b - t0);
                let base = keys.add(t0 * D);
                attention::prefetch_ahead_by::<PREFETCH_AHEAD>(base as *const u8, 16 * row_bytes);
                let mut part = [[_mm512_setzero_ps(); 16]; R];
                for i in 0..n {
                    let k = base.add(i * D);
                    let kv = [
                        T::load16(k),
                        T::load16(k.add(16)),
                        T::load16(k.add(32)),
                        T::load16(k.add(48)),
                    ];
                    for r in 0..R {
                        let x = _mm512_mul_ps(qv[r][0], kv[0]);
                        let x = _mm512_fmadd_ps(qv[r][1], kv[1], x);
                        let y = _mm512_mul_ps(qv[r][2], kv[2]);
                        let y = _mm512_fmadd_ps(qv[r][3], kv[3], y);
                        part[r][i] = _mm512_add_ps(x, y);
                    }
                }
                let live = ((1u32 << n) - 1) as __mmask16;
                for r in 0..R {
                    let s = attention::reduce16::<false>(&part[r]);
                    _mm512_mask_storeu_ps(scores.as_mut_ptr().add(r * len + t0 - a), live, s);
                }
                t0 += n;
            }
            let softmax = attention::softmax_rows(Isa::Avx512, &mut scores, len);
            // Values: the rows' sums in registers, one widened value row per token.
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            for t in a..b {
                let v = values.add(t * D);
                if (t - a).is_multiple_of(16) {
                    attention::prefetch_ahead_by::<PREFETCH_AHEAD>(v as *const u8, 16 * row_bytes);
                }
                let vv = [
                    T::load16(v),
                    T::load16(v.add(16)),
                    T::load16(v.add(32)),
                    T::load16(v.add(48)),
                ];
                for r in 0..R {
                    let p = _mm512_set1_ps(*scores.get_unchecked(r * len + t - a));
                    for j in 0..4 {
                        acc[r][j] = _mm512_fmadd_ps(p, vv[j], acc[r][j]);
                    }
                }
            }
            let mut out = vec![0.0f32; R * D];
            for r in 0..R {
                for j in 0..4 {
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * D + 16 * j), acc[r][j]);
                }
            }
            (softmax, out)
        }
    }

    /// `isa`: the softmax's instruction set, the same as the packed cache runs, so that
    /// benchmarks compare the caches.
    #[inline(always)]
    fn task(
        &self,
        isa: Isa,
        h: usize,
        q: &[f32],
        rows: usize,
        a: usize,
        b: usize,
    ) -> (Vec<SoftmaxPart>, Vec<f32>) {
        let d = self.head_dim;
        let len = b - a;
        let mut scores = vec![0.0f32; rows * len];
        let mut buf = vec![0.0f32; T::scratch(F16_SUB_BLOCK * d)];
        let keys = &self.k[h];
        let values = &self.v[h];
        let mut t0 = a;
        while t0 < b {
            let t1 = (t0 + F16_SUB_BLOCK).min(b);
            let rows_bytes = (t1 - t0) * d * std::mem::size_of::<T>();
            attention::prefetch_ahead_by::<PREFETCH_AHEAD>(
                keys[t0 * d..].as_ptr() as *const u8,
                rows_bytes,
            );
            let block = T::as_f32_rows(&keys[t0 * d..t1 * d], &mut buf);
            for (t, k) in block.chunks_exact(d).enumerate() {
                for r in 0..rows {
                    scores[r * len + t0 - a + t] = attention::dot(&q[r * d..(r + 1) * d], k);
                }
            }
            t0 = t1;
        }
        let softmax = attention::softmax_rows(isa, &mut scores, len);
        let mut acc = vec![0.0f32; rows * d];
        let mut t0 = a;
        while t0 < b {
            let t1 = (t0 + F16_SUB_BLOCK).min(b);
            let rows_bytes = (t1 - t0) * d * std::mem::size_of::<T>();
            attention::prefetch_ahead_by::<PREFETCH_AHEAD>(
                values[t0 * d..].as_ptr() as *const u8,
                rows_bytes,
            );
            let block = T::as_f32_rows(&values[t0 * d..t1 * d], &mut buf);
            for (t, v) in block.chunks_exact(d).enumerate() {
                for r in 0..rows {
                    attention::axpy(
                        scores[r * len + t0 - a + t],
                        v,
                        &mut acc[r * d..(r + 1) * d],
                    );
                }
            }
            t0 = t1;
        }
        (softmax, acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention of one query row over `keys`/`values` (`[tokens, d]`), in f64.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f32) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .chunks_exact(d)
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        let mut out = vec![0.0f64; d];
        for (wt, v) in w.iter().zip(values.chunks_exact(d)) {
            for (o, &x) in out.iter_mut().zip(v) {
                *o += wt / sum * x as f64;
            }
        }
        out
    }

    fn check<T: DenseElement>(d: usize, kv_heads: usize, rows: usize, tokens: usize) {
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (d * 1000 + rows * 10 + tokens) as u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let k: Vec<f32> = (0..kv_heads * tokens * d).map(|_| 3.0 * next()).collect();
        let v: Vec<f32> = (0..kv_heads * tokens * d).map(|_| next()).collect();
        let heads = kv_heads * rows;
        let q: Vec<f32> = (0..heads * d).map(|_| next()).collect();
        let mut cache = DenseLayerCache::<T>::new(kv_heads, d);
        cache.append(&k, &v, tokens).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let got = cache.attend_last(&q, heads, scale).unwrap();
        // The reference reads what the cache stores (f16 rounding included).
        let stored = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .map(|&x| {
                    let mut out = [0.0f32; 1];
                    T::as_f32_rows(&[T::from_f32(x)], &mut out)[0]
                })
                .collect()
        };
        let (k, v) = (stored(&k), stored(&v));
        for head in 0..heads {
            let kh = head / rows;
            let span = kh * tokens * d..(kh + 1) * tokens * d;
            let want = reference(
                &q[head * d..(head + 1) * d],
                &k[span.clone()],
                &v[span],
                d,
                scale,
            );
            for (c, (&g, &w)) in got[head * d..(head + 1) * d].iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "d {d} rows {rows} tokens {tokens} head {head} channel {c}: {g} vs {w}"
                );
            }
        }
    }

    /// Every kernel (the AVX-512 one at head_dim 64 with up to 4 rows, the generic one
    /// otherwise) equals attention computed in f64, over task and 16-token block edges.
    #[test]
    fn dense_attention_equals_the_f64_reference() {
        for tokens in [1usize, 17, 1040, 2100] {
            for rows in [1usize, 3, 4, 5] {
                check::<f32>(64, 2, rows, tokens);
                check::<f16>(64, 2, rows, tokens);
            }
            check::<f16>(32, 1, 3, tokens);
        }
    }
}

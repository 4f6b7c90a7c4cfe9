//! Plain dot-product attention over an unquantized f32 or f16 cache: the baselines the packed
//! cache is benchmarked against, decomposed into the same tasks (KV head × block of tokens,
//! blockwise softmax) and threads, with the inner loops compiled for AVX2+FMA when available.
//! f16 keys and values are converted block by block with `half`'s F16C slice conversion.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::attention::{self, Isa, SoftmaxPart};
use crate::{Error, Result};

const TASK_TOKENS: usize = 1024;
/// Tokens converted from f16 at a time (fits L1 with its f32 copy).
const F16_SUB_BLOCK: usize = 64;

/// Element type of a dense cache.
pub trait DenseElement: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    /// The rows as f32: `src` itself for f32, else converted into the front of `buf`.
    fn as_f32_rows<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// Scratch floats a block of `n` values needs for [`DenseElement::as_f32_rows`].
    fn scratch(n: usize) -> usize;
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
        // The packed cache's executor, so that benchmarks compare the caches, not hand-offs.
        let parts: Vec<(Vec<SoftmaxPart>, Vec<f32>)> = super::run_tasks(tasks.len(), |i, _| {
            let (h, a) = tasks[i];
            let b = (a + TASK_TOKENS).min(len);
            let qh = &qs[h * rows * d..(h + 1) * rows * d];
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
            attention::prefetch_ahead(keys[t0 * d..].as_ptr() as *const u8, rows_bytes);
            let block = T::as_f32_rows(&keys[t0 * d..t1 * d], &mut buf);
            for (t, k) in block.chunks_exact(d).enumerate() {
                for r in 0..rows {
                    scores[r * len + t0 - a + t] = attention::dot(&q[r * d..(r + 1) * d], k);
                }
            }
            t0 = t1;
        }
        let softmax: Vec<SoftmaxPart> = scores
            .chunks_exact_mut(len)
            .map(|row| {
                let (max, sum) = attention::softmax_block(isa, row);
                SoftmaxPart { max, sum }
            })
            .collect();
        let mut acc = vec![0.0f32; rows * d];
        let mut t0 = a;
        while t0 < b {
            let t1 = (t0 + F16_SUB_BLOCK).min(b);
            let rows_bytes = (t1 - t0) * d * std::mem::size_of::<T>();
            attention::prefetch_ahead(values[t0 * d..].as_ptr() as *const u8, rows_bytes);
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

//! A real mixed-precision KV cache: every unit (layer, KV head, K or V) stored bit-packed at its
//! own bits and design, with attention computed directly on the codes.
//!
//! * Storage ([`store`]): codes and f16 scales/zero-points produced by the design's own
//!   `encode`, so attention over this cache equals attention over `fake_quantize`d keys and
//!   values (same residual semantics) up to float rounding.
//! * Residual semantics (KIVI as published, applied per unit): KIVI keys stay unquantized
//!   until a group of `G` tokens is complete, then the group is quantized per channel; every
//!   per-token unit (KIVI values, QuaRot and RTN keys and values) keeps its `residual` most
//!   recent tokens unquantized and quantizes a token when it leaves that window. The
//!   query at position `p` sees the cache exactly as it was after token `p` was appended, also
//!   inside a prefill block, so prefill in blocks equals appending token by token.
//! * Residual precision: unquantized tokens are held in f16, as real KV caches hold them
//!   (2 bytes per element instead of f32's 4, which matters for the compression at long
//!   contexts). Every appended K/V value is rounded to f16 once
//!   ([`round_to_residual_precision`]); attention over the residual reads the rounded values,
//!   and tokens are quantized from them when they leave, so the codes are the same whether a
//!   token leaves inside its prefill block or steps later. Values whose f16 rounding would be
//!   infinite (`|x| ≥` [`F16_OVERFLOW`]) are refused.
//! * QuaRot: the stored codes are of Hadamard-rotated tokens; queries are rotated instead of
//!   keys (scores are unchanged: the matrix is orthogonal) and the value output is rotated
//!   back once per head.
//! * Kernels ([`attention`]): per-channel keys fold their scales into the query, per-token
//!   values accumulate `p·scale` per code and `p·zero` per group; softmax in f32, blockwise,
//!   merged across blocks; threads over (KV head, query, block of tokens).
//! * Memory ([`memory`]): exact bytes of codes, metadata, residual buffers and padding.

mod aligned;
pub mod attention;
pub mod dense;
mod executor;
mod int8_glue;
pub mod memory;
pub(crate) mod store;
pub mod timing;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::quant::{Kind, QuantizerSpec};
use crate::{hadamard, Error, Result};
pub use attention::Isa;
use attention::{int8, SoftmaxPart};
pub use memory::MemoryReport;
pub use store::UnitLayout;
use store::{KeyStore, Store, UnitCore, ValueStore};

/// Default number of most recent tokens per-token units keep unquantized (in f16).
pub const DEFAULT_RESIDUAL: usize = 128;

/// The smallest magnitude that rounds to infinity in f16 (the largest finite f16 is 65504;
/// round to nearest even sends `[65504, 65520)` to it and `65520` up to infinity).
pub const F16_OVERFLOW: f32 = 65520.0;

/// Rounds `values` in place to the nearest f16 (ties to even), the precision in which the
/// cache holds tokens it has not quantized. Public so that a simulation of this cache
/// (`SimSemantics::Packed` in ratequant-llm) rounds exactly as the cache does.
pub fn round_to_residual_precision(values: &mut [f32]) {
    // Through a small stack buffer: half's slice conversions are vectorised (F16C at run time).
    let mut buf = [f16::ZERO; 256];
    for chunk in values.chunks_mut(buf.len()) {
        let halves = &mut buf[..chunk.len()];
        halves.convert_from_f32_slice(chunk);
        halves.convert_to_f32_slice(chunk);
    }
}

/// Tokens per attention task: the unit of work spread over threads and of the blockwise softmax.
const TASK_TOKENS: usize = 1024;

/// Tokens per task for the integer kernels once a query sees [`LONG_TASK_FROM`] tokens or
/// more. Each task pays a fixed cost (kernel calls and their reductions, its output, a part
/// of the merge) of about 0.4 µs. With these tasks the integer decode step over a layer in
/// SmolLM2's geometry on 2 threads, cold, is 8–9% faster at 64K tokens (KIVI G = 32 and 128)
/// and at 16K with G = 128, unchanged at 16K with G = 32. Below 8K tokens a step would have
/// too few tasks to share out evenly; the float kernels run 6% slower with them (their
/// per-task scratch outgrows L1).
const LONG_TASK_TOKENS: usize = 2048;
const LONG_TASK_FROM: usize = 8192;

/// The task size for a query that sees `keys` tokens. A function of the query alone, so that
/// a query's tasks, and with them its output's rounding, are the same in a prefill block and
/// in a decode step.
fn task_tokens(kernel: AttentionKernel, keys: usize) -> usize {
    if kernel == AttentionKernel::Int8 && keys >= LONG_TASK_FROM {
        LONG_TASK_TOKENS
    } else {
        TASK_TOKENS
    }
}

/// Shape of the cache: the model's attention geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CacheShape {
    /// Number of units, `layers × kv_heads × 2`.
    pub fn units(&self) -> usize {
        self.layers * self.kv_heads * 2
    }

    /// Index of a unit in the per-unit table: layer, then head, K before V.
    pub fn unit_index(&self, layer: usize, head: usize, kind: Kind) -> usize {
        (layer * self.kv_heads + head) * 2 + usize::from(kind == Kind::V)
    }
}

/// How attention computes on the codes; chosen when a cache is built (it fixes the code layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// f32 arithmetic on the codes: attention over the dequantized cache up to float
    /// rounding, which is what `eval`'s simulation of this cache computes.
    #[default]
    Float,
    /// Integer dot products on bit-plane tiles ([`attention::int8`]; AVX-512 VNNI where the CPU
    /// has it, else the scalar reference, which is slow): per key block the query folded with
    /// the key scales, and per 32-token tile the probabilities times the value scales, are
    /// rounded to 8 bits with one scale each. Faster; no longer equal to the simulation up to
    /// float rounding (the rounding adds a small error to each score and output, see
    /// `docs/generate.md`).
    Int8,
}

impl AttentionKernel {
    pub fn parse(s: &str) -> Result<AttentionKernel> {
        match s {
            "float" => Ok(AttentionKernel::Float),
            "int8" => Ok(AttentionKernel::Int8),
            other => Err(Error::invalid(format!(
                "attention kernel `{other}`: expected `float` or `int8`"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::Float => "float",
            AttentionKernel::Int8 => "int8",
        }
    }
}

/// Design and bits of one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitFormat {
    pub quantizer: QuantizerSpec,
    pub bits: u8,
}

/// Attention parameters of one call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionParams {
    /// Multiplier on `q·k` before the softmax (usually `head_dim^-0.5`).
    pub scale: f32,
    /// Only keys at positions `p − w < s ≤ p` are visible to the query at `p`, if set.
    pub window: Option<usize>,
}

/// Unquantized rows of one unit visible to an attention call, positions `base..`: the
/// residual's f16 rows as stored (a decode step widens the few it reads inside its tasks), or
/// a prefill block's rows, already widened when they were appended.
enum FpRows<'a> {
    F16 { base: usize, rows: &'a [f16] },
    F32 { base: usize, rows: Vec<f32> },
}

impl FpRows<'_> {
    /// Row `pos` in f32; f16 rows are widened into `buf`.
    #[inline(always)]
    fn row<'b, const F16C: bool>(
        &'b self,
        pos: usize,
        d: usize,
        buf: &'b mut Vec<f32>,
    ) -> &'b [f32] {
        match self {
            FpRows::F32 { base, rows } => &rows[(pos - base) * d..(pos - base + 1) * d],
            FpRows::F16 { base, rows } => {
                to_f32::<F16C>(&rows[(pos - base) * d..(pos - base + 1) * d], buf);
                buf
            }
        }
    }

    /// Prefetches row `pos` if there is one: the rows are read one by one, each through a
    /// few short loops, too slowly for the hardware prefetcher to run ahead of a cold cache.
    #[inline(always)]
    fn prefetch(&self, pos: usize, d: usize) {
        let (at, bytes) = match self {
            FpRows::F32 { base, rows } if (pos - base + 1) * d <= rows.len() => {
                (rows[(pos - base) * d..].as_ptr() as *const u8, 4 * d)
            }
            FpRows::F16 { base, rows } if (pos - base + 1) * d <= rows.len() => {
                (rows[(pos - base) * d..].as_ptr() as *const u8, 2 * d)
            }
            _ => return,
        };
        attention::prefetch_ahead_by::<0>(at, bytes);
    }
}

/// How many rows ahead the residual loops prefetch.
const FP_ROWS_AHEAD: usize = 8;

/// The packed cache of one model.
pub struct PackedKvCache {
    shape: CacheShape,
    residual: usize,
    kernel: AttentionKernel,
    isa: Isa,
    /// The integer kernels' implementation, within `isa`.
    int8_kernels: int8::Kernels,
    keys: Vec<KeyStore>,
    values: Vec<ValueStore>,
    lens: Vec<usize>,
}

impl PackedKvCache {
    /// A cache whose unit `i` ([`CacheShape::unit_index`]) uses `units[i]`; per-token units keep
    /// the `residual` most recent tokens in full precision. Float kernels.
    pub fn new(shape: CacheShape, units: &[UnitFormat], residual: usize) -> Result<PackedKvCache> {
        PackedKvCache::with_kernel(shape, units, residual, AttentionKernel::Float)
    }

    /// [`PackedKvCache::new`] with the given attention kernel. The integer kernels need tile
    /// layouts ([`attention::int8::check_layout`]); a unit that can't have one is an error
    /// naming it.
    pub fn with_kernel(
        shape: CacheShape,
        units: &[UnitFormat],
        residual: usize,
        kernel: AttentionKernel,
    ) -> Result<PackedKvCache> {
        let tiled = kernel == AttentionKernel::Int8;
        if shape.layers == 0 || shape.kv_heads == 0 || shape.head_dim == 0 {
            return Err(Error::invalid(format!(
                "packed KV cache: layers, kv_heads and head_dim must be positive, got {shape:?}"
            )));
        }
        if units.len() != shape.units() {
            return Err(Error::invalid(format!(
                "packed KV cache: {} layers × {} KV heads × (K, V) need {} unit formats, got {}",
                shape.layers,
                shape.kv_heads,
                shape.units(),
                units.len()
            )));
        }
        let mut keys = Vec::with_capacity(shape.layers * shape.kv_heads);
        let mut values = Vec::with_capacity(shape.layers * shape.kv_heads);
        for layer in 0..shape.layers {
            for head in 0..shape.kv_heads {
                let k = &units[shape.unit_index(layer, head, Kind::K)];
                let v = &units[shape.unit_index(layer, head, Kind::V)];
                keys.push(KeyStore::new(
                    &k.quantizer,
                    k.bits,
                    shape.head_dim,
                    &format!("unit layer {layer} head {head} k"),
                    tiled,
                )?);
                values.push(ValueStore::new(
                    &v.quantizer,
                    v.bits,
                    shape.head_dim,
                    &format!("unit layer {layer} head {head} v"),
                    tiled,
                )?);
            }
        }
        let isa = Isa::detect();
        Ok(PackedKvCache {
            shape,
            residual,
            kernel,
            isa,
            int8_kernels: int8::Kernels::best(isa),
            keys,
            values,
            lens: vec![0; shape.layers],
        })
    }

    /// Every unit with the same design and bits.
    pub fn uniform(
        shape: CacheShape,
        quantizer: &QuantizerSpec,
        bits: u8,
        residual: usize,
    ) -> Result<PackedKvCache> {
        let units = vec![
            UnitFormat {
                quantizer: quantizer.clone(),
                bits
            };
            shape.units()
        ];
        PackedKvCache::new(shape, &units, residual)
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    pub fn residual(&self) -> usize {
        self.residual
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn kernel(&self) -> AttentionKernel {
        self.kernel
    }

    /// What runs the kernels, for reports: `avx512`, `avx2`, `scalar`, and for the integer
    /// kernels `avx512-vnni`, `avx-vnni`, `avx2` or `scalar`.
    pub fn kernel_isa(&self) -> &'static str {
        match self.kernel {
            AttentionKernel::Float => self.isa.name(),
            AttentionKernel::Int8 => self.int8_kernels().name(),
        }
    }

    /// The integer kernels' implementation (by default the fastest within the cache's ISA).
    pub fn int8_kernels(&self) -> int8::Kernels {
        self.int8_kernels
    }

    /// Runs the integer kernels on `kernels` (tests and benchmarks compare them); they must
    /// run on this CPU and fit the cache's ISA (the AVX-512 glue runs only with AVX-512).
    pub fn set_int8_kernels(&mut self, kernels: int8::Kernels) -> Result<()> {
        if !kernels.is_available() || int8::Kernels::best(self.isa) < kernels {
            return Err(Error::invalid(format!(
                "integer kernels {} do not run under instruction set {} on this CPU",
                kernels.name(),
                self.isa.name()
            )));
        }
        self.int8_kernels = kernels;
        Ok(())
    }

    /// Runs the kernels on `isa` (tests and benchmarks compare instruction sets).
    pub fn set_isa(&mut self, isa: Isa) -> Result<()> {
        if !isa.is_available() {
            return Err(Error::invalid(format!(
                "instruction set {} is not available on this CPU",
                isa.name()
            )));
        }
        self.isa = isa;
        self.int8_kernels = int8::Kernels::best(isa);
        Ok(())
    }

    /// Tokens stored for `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&n| n == 0)
    }

    /// Forgets everything (new sequence); allocations are kept.
    pub fn reset(&mut self) {
        self.lens.fill(0);
        for k in &mut self.keys {
            k.core.reset();
        }
        for v in &mut self.values {
            v.core.reset();
        }
    }

    /// Exact memory held, against an f16 cache of the same shape and length.
    pub fn memory(&self) -> MemoryReport {
        let cores = self
            .keys
            .iter()
            .map(|k| &k.core)
            .chain(self.values.iter().map(|v| &v.core));
        memory::report(self.shape, &self.lens, cores)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.shape.layers {
            return Err(Error::invalid(format!(
                "layer {layer} out of range: the cache has {} layers",
                self.shape.layers
            )));
        }
        Ok(())
    }

    fn check_kv(&self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        let want = self.shape.kv_heads * tokens * self.shape.head_dim;
        for (name, x) in [("k", k), ("v", v)] {
            if x.len() != want {
                return Err(Error::invalid(format!(
                    "layer {layer} {name}: expected [kv_heads {}, tokens {tokens}, head_dim {}] = {want} values, got {}",
                    self.shape.kv_heads,
                    self.shape.head_dim,
                    x.len()
                )));
            }
            if let Some(i) = x
                .iter()
                .position(|x| !x.is_finite() || x.abs() >= F16_OVERFLOW)
            {
                let per_head = tokens * self.shape.head_dim;
                let what = if x[i].is_finite() {
                    "value beyond the f16 range (|x| ≥ 65520 rounds to infinity in the f16 residual)"
                } else {
                    "non-finite value"
                };
                return Err(Error::invalid(format!(
                    "layer {layer} {name}: {what} {} at kv head {}, new token {}, channel {}",
                    x[i],
                    i / per_head,
                    (i % per_head) / self.shape.head_dim,
                    i % self.shape.head_dim
                )));
            }
        }
        Ok(())
    }

    fn check_q(&self, q: &[f32], heads: usize, tokens: usize) -> Result<()> {
        if heads == 0 || !heads.is_multiple_of(self.shape.kv_heads) {
            return Err(Error::invalid(format!(
                "query heads ({heads}) must be a positive multiple of the cache's KV heads ({})",
                self.shape.kv_heads
            )));
        }
        if q.len() != heads * tokens * self.shape.head_dim {
            return Err(Error::invalid(format!(
                "q: expected [heads {heads}, tokens {tokens}, head_dim {}] = {} values, got {}",
                self.shape.head_dim,
                heads * tokens * self.shape.head_dim,
                q.len()
            )));
        }
        Ok(())
    }

    /// Stores `k`, `v` (`[kv_heads, tokens, head_dim]`) for `layer` without computing attention
    /// (building a cache from a known prefix).
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        self.check_layer(layer)?;
        self.check_kv(layer, k, v, tokens)?;
        self.append_unchecked(layer, k, v, tokens, false)?;
        Ok(())
    }

    /// Appends `k`, `v` (`[kv_heads, tokens, head_dim]`) for `layer` at positions
    /// `len(layer)..len(layer)+tokens` and returns causal attention of `q`
    /// (`[heads, tokens, head_dim]`, query head `h` reading KV head `h / (heads / kv_heads)`),
    /// shape `[heads, tokens, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        heads: usize,
        k: &[f32],
        v: &[f32],
        tokens: usize,
        params: &AttentionParams,
    ) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        self.check_q(q, heads, tokens)?;
        self.check_kv(layer, k, v, tokens)?;
        let first = self.lens[layer];
        let scratch = self.append_unchecked(layer, k, v, tokens, tokens > 1)?;
        let range = layer * self.shape.kv_heads..(layer + 1) * self.shape.kv_heads;
        let views: Vec<HeadView> = match scratch {
            Some(s) => self.keys[range.clone()]
                .iter()
                .zip(&self.values[range])
                .zip(s)
                .map(|((key, value), (k_fp, v_fp))| HeadView {
                    key,
                    value,
                    k_fp,
                    v_fp,
                })
                .collect(),
            None => self.views(layer),
        };
        Ok(self.attention(&views, q, heads, tokens, first, params))
    }

    /// Attention of one query per head (`q`: `[heads, head_dim]`) sitting at the last stored
    /// position of `layer`, over what is stored; nothing is appended. This is the decode step's
    /// attention after its token was appended.
    pub fn attend_last(
        &self,
        layer: usize,
        q: &[f32],
        heads: usize,
        params: &AttentionParams,
    ) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        self.check_q(q, heads, 1)?;
        let len = self.lens[layer];
        if len == 0 {
            return Err(Error::invalid(format!(
                "layer {layer}: attention over an empty cache"
            )));
        }
        let views = self.views(layer);
        Ok(self.attention(&views, q, heads, 1, len - 1, params))
    }

    /// Every KV head of `layer` as stored, residuals widened to f32.
    fn views(&self, layer: usize) -> Vec<HeadView<'_>> {
        let range = layer * self.shape.kv_heads..(layer + 1) * self.shape.kv_heads;
        self.keys[range.clone()]
            .iter()
            .zip(&self.values[range])
            .map(|(key, value)| HeadView {
                key,
                value,
                k_fp: FpRows::F16 {
                    base: key.core.quantized,
                    rows: key.core.residual.live(self.shape.head_dim),
                },
                v_fp: FpRows::F16 {
                    base: value.core.quantized,
                    rows: value.core.residual.live(self.shape.head_dim),
                },
            })
            .collect()
    }

    /// Appends to every KV head of `layer`, quantizing what leaves the residual windows. With
    /// `keep_scratch`, returns per head the unquantized rows (f16-rounded, as f32) from the
    /// oldest token that was unquantized before this call, `(key rows, value rows)`, which
    /// the block's earlier queries still see unquantized.
    fn append_unchecked(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        tokens: usize,
        keep_scratch: bool,
    ) -> Result<Option<Vec<(FpRows<'static>, FpRows<'static>)>>> {
        let d = self.shape.head_dim;
        let kv_heads = self.shape.kv_heads;
        let residual = self.residual;
        let old_len = self.lens[layer];
        let per_head = tokens * d;
        let range = layer * kv_heads..(layer + 1) * kv_heads;
        let results: Vec<Result<_>> = self.keys[range.clone()]
            .par_iter_mut()
            .zip(self.values[range].par_iter_mut())
            .enumerate()
            .map(|(h, (key, value))| {
                let kh = &k[h * per_head..(h + 1) * per_head];
                let vh = &v[h * per_head..(h + 1) * per_head];
                let ks = append_rows(key, kh, tokens, old_len, residual, keep_scratch)?;
                let vs = append_rows(value, vh, tokens, old_len, residual, keep_scratch)?;
                Ok((ks, vs))
            })
            .collect();
        // Keep the bookkeeping consistent even if some head failed (inputs were validated, so
        // a failure here is an internal error).
        let mut scratch = Vec::with_capacity(kv_heads);
        for r in results {
            scratch.push(r?);
        }
        self.lens[layer] = old_len + tokens;
        Ok(if keep_scratch {
            Some(
                scratch
                    .into_iter()
                    .map(|(k, v)| (k.unwrap(), v.unwrap()))
                    .collect(),
            )
        } else {
            None
        })
    }

    fn attention(
        &self,
        views: &[HeadView],
        q: &[f32],
        heads: usize,
        tokens: usize,
        first: usize,
        params: &AttentionParams,
    ) -> Vec<f32> {
        let mut clock = timing::start();
        let d = self.shape.head_dim;
        let kv_heads = self.shape.kv_heads;
        let rows = heads / kv_heads;
        let isa = self.isa;
        let residual = self.residual;
        // Per (KV head, query): the query rows, scaled, rotated for QuaRot keys.
        let prep = |hi: usize| {
            let (h, i) = (hi / tokens, hi % tokens);
            QueryPrep::new(
                &views[h].key.core,
                q,
                h * rows,
                rows,
                tokens,
                i,
                d,
                params.scale,
            )
        };
        // A decode step's few preps run here: handing them to the pool costs more than they do.
        let preps: Vec<QueryPrep> = if kv_heads * tokens < 64 {
            (0..kv_heads * tokens).map(prep).collect()
        } else {
            (0..kv_heads * tokens).into_par_iter().map(prep).collect()
        };
        let mut tasks = Vec::new();
        for h in 0..kv_heads {
            for i in 0..tokens {
                let p = first + i;
                let start = params.window.map_or(0, |w| (p + 1).saturating_sub(w));
                let size = task_tokens(self.kernel, p + 1 - start);
                let mut a = start;
                while a <= p {
                    let b = ((a / size + 1) * size).min(p + 1);
                    tasks.push((h, i, a, b));
                    a = b;
                }
            }
        }
        let glue_avx2 = isa != Isa::Scalar && Isa::Avx2.is_available();
        let kernels = self.int8_kernels();
        timing::lap(timing::Phase::Prepare, &mut clock);
        // Every task's softmax state and `rows × d` sums in two buffers of the call rather
        // than two allocations per task (each written on one core and freed on the other:
        // 0.17 µs per 768-byte output, measured).
        let n = tasks.len();
        let mut acc_all = vec![0.0f32; n * rows * d];
        let mut softmax_all = vec![SoftmaxPart { max: 0.0, sum: 0.0 }; n * rows];
        let outputs: Vec<Mutex<TaskOut>> = acc_all
            .chunks_mut(rows * d)
            .zip(softmax_all.chunks_mut(rows))
            .map(|(acc_q, softmax)| Mutex::new(TaskOut { softmax, acc_q }))
            .collect();
        let acc_fp: Vec<Vec<f32>> = run_tasks(n, |t, scratch| {
            let (h, i, a, b) = tasks[t];
            let (view, prep, p) = (&views[h], &preps[h * tokens + i], first + i);
            let mut out = outputs[t].lock().unwrap_or_else(|e| e.into_inner());
            let out = &mut *out;
            #[cfg(target_arch = "x86_64")]
            if kernels == int8::Kernels::Avx512Vnni && glue_avx2 {
                // SAFETY: AVX-512 F/BW/VNNI, AVX2, FMA and F16C were detected.
                return unsafe {
                    run_task_avx512(isa, kernels, view, prep, p, a, b, d, residual, scratch, out)
                };
            }
            #[cfg(target_arch = "x86_64")]
            if glue_avx2 {
                // SAFETY: AVX2, FMA and F16C were detected.
                return unsafe {
                    run_task_avx2(isa, kernels, view, prep, p, a, b, d, residual, scratch, out)
                };
            }
            run_task::<false>(isa, kernels, view, prep, p, a, b, d, residual, scratch, out)
        });
        drop(outputs);
        timing::lap(timing::Phase::Tasks, &mut clock);
        // Merge each (KV head, query)'s blocks (tasks are in (h, i) order): every block is
        // brought to their common max at once, one exponential per block and row.
        let mut out = vec![0.0f32; heads * tokens * d];
        let (mut acc_q, mut factors) = (vec![0.0f32; d], Vec::new());
        let mut at = 0;
        while at < n {
            let (h, i) = (tasks[at].0, tasks[at].1);
            let mut end = at + 1;
            while end < n && tasks[end].0 == h && tasks[end].1 == i {
                end += 1;
            }
            let rotated = views[h].value.core.layout.rotated;
            for r in 0..rows {
                let sum = attention::merge_factors(
                    (at..end).map(|t| &softmax_all[t * rows + r]),
                    &mut factors,
                );
                let head = h * rows + r;
                let dst = &mut out[(head * tokens + i) * d..(head * tokens + i + 1) * d];
                acc_q.fill(0.0);
                for (t, &f) in (at..end).zip(&factors) {
                    if f == 0.0 {
                        continue;
                    }
                    let part = &acc_all[(t * rows + r) * d..(t * rows + r + 1) * d];
                    attention::axpy(f, part, &mut acc_q);
                    if !acc_fp[t].is_empty() {
                        attention::axpy(f, &acc_fp[t][r * d..(r + 1) * d], dst);
                    }
                }
                if rotated {
                    hadamard::fwht_normalized(&mut acc_q)
                        .expect("quarot units have power-of-two head_dim");
                }
                let inv = 1.0 / sum;
                for (o, &x) in dst.iter_mut().zip(&acc_q) {
                    *o = (*o + x) * inv;
                }
            }
            at = end;
        }
        timing::lap(timing::Phase::Merge, &mut clock);
        out
    }
}

thread_local! {
    /// Each thread's attention buffers, kept from call to call.
    static SCRATCH: RefCell<TaskScratch> = RefCell::new(TaskScratch::default());
}

/// `f(0..n)` in task order, run by the calling thread together with the pool's other
/// threads. The tasks are cut into one lane of consecutive tasks per thread; each thread
/// claims its own lane's tasks in order, then helps finish the others' (from shared
/// counters, so a thread that loses its core holds up nobody).
///
/// Why lanes: consecutive tasks read consecutive bytes of the same streams (tasks are in
/// (head, position) order), so a thread's look-ahead prefetches at the end of one task
/// fetch the start of its next one. With one shared counter the threads alternated, and
/// every task began each of its streams with demand misses: lanes made cold steps 8–9%
/// faster (int8 and float kernels, 16K tokens).
///
/// Why not `par_iter`: a decode step is a few hundred microseconds, and handing all of it to
/// the pool costs two thread wake-ups on its critical path (the workers at the start, the
/// blocked caller at the end; measured at 11 and 34 µs of a 290 µs step on a 2-core VM).
/// Here a calling pool worker starts at once and, when the counter runs out, spins for the
/// last task instead of sleeping; the helpers of one call stay for the next one
/// ([`executor`]), so they join it without a wake-up.
///
/// Why a caller from outside the pool hands the step to the pool all the same: it is one
/// more thread than there are cores, and the OS now and then put the helper on the caller's
/// core and left it there for the whole step, so one core did all the work (10–19 of 41
/// cold steps at 16K tokens took 1.9× as long; none do from inside the pool). Commands and
/// benchmarks that take many steps run on a pool worker to save the two wake-ups.
fn run_tasks<T: Send + Sync>(n: usize, f: impl Fn(usize, &mut TaskScratch) -> T + Sync) -> Vec<T> {
    if n > 1 && rayon::current_thread_index().is_none() {
        return rayon::scope(|_| run_tasks_on_worker(n, &f));
    }
    run_tasks_on_worker(n, &f)
}

fn run_tasks_on_worker<T: Send + Sync>(
    n: usize,
    f: &(impl Fn(usize, &mut TaskScratch) -> T + Sync),
) -> Vec<T> {
    let slots: Vec<OnceLock<T>> = (0..n).map(|_| OnceLock::new()).collect();
    // The caller takes one of the pool's share of cores.
    let helpers = (rayon::current_num_threads() - 1).min(n.saturating_sub(1));
    // One lane of consecutive tasks per thread, claimed in order, then the others' leftovers.
    let lanes = helpers + 1;
    let lane_end = |k: usize| (k + 1) * n / lanes;
    let next: Vec<AtomicUsize> = (0..lanes)
        .map(|k| AtomicUsize::new(k * n / lanes))
        .collect();
    let lane_of_thread = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let work = || {
        let own = lane_of_thread.fetch_add(1, Ordering::Relaxed) % lanes;
        let run = |scratch: &mut TaskScratch| {
            for k in (0..lanes).map(|j| (own + j) % lanes) {
                loop {
                    let t = next[k].fetch_add(1, Ordering::Relaxed);
                    if t >= lane_end(k) {
                        break;
                    }
                    let _ = slots[t].set(f(t, scratch));
                    done.fetch_add(1, Ordering::Release);
                }
            }
        };
        // A fresh scratch if this thread's is in use (a nested call).
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => run(&mut scratch),
            Err(_) => run(&mut TaskScratch::default()),
        });
    };
    executor::run(helpers, &work, &|| done.load(Ordering::Acquire) >= n);
    slots
        .into_iter()
        .map(|slot| slot.into_inner().expect("every task ran"))
        .collect()
}

/// The stores of one KV head as one attention call sees them.
struct HeadView<'a> {
    key: &'a KeyStore,
    value: &'a ValueStore,
    k_fp: FpRows<'a>,
    v_fp: FpRows<'a>,
}

/// A unit's live residual rows widened to f32.
fn residual_f32(core: &UnitCore) -> Vec<f32> {
    let d = core.head_dim;
    core.residual.to_f32(0..core.residual.tokens(d), d)
}

/// Appends `tokens` rows to one unit and quantizes what its residual rule says. Returns the
/// scratch rows when `keep_scratch`.
fn append_rows<S: Store>(
    store: &mut S,
    new_rows: &[f32],
    tokens: usize,
    old_len: usize,
    residual: usize,
    keep_scratch: bool,
) -> Result<Option<FpRows<'static>>> {
    let d = store.core().head_dim;
    let old_q = store.core().quantized;
    let new_q = store
        .core()
        .layout
        .quantized_len(old_len + tokens, residual);
    let leaving = new_q - old_q;
    if keep_scratch {
        // The residual so far, then the new rows rounded as the residual would hold them: the
        // tokens that leave within this block are quantized from the same f16 values as if
        // they had entered the residual first.
        let mut scratch = residual_f32(store.core());
        let new_at = scratch.len();
        scratch.extend_from_slice(new_rows);
        round_to_residual_precision(&mut scratch[new_at..]);
        store.quantize(&scratch[..leaving * d], leaving)?;
        let core = store.core_mut();
        core.residual.clear();
        // Already f16 values: this push is exact.
        core.residual.push(&scratch[leaving * d..]);
        Ok(Some(FpRows::F32 {
            base: old_q,
            rows: scratch,
        }))
    } else {
        store.core_mut().residual.push(new_rows);
        if leaving > 0 {
            let leaving_rows = store.core().residual.to_f32(0..leaving, d);
            store.quantize(&leaving_rows, leaving)?;
            store.core_mut().residual.drop_front(leaving, d);
        }
        Ok(None)
    }
}

/// One (KV head, query)'s rows prepared for the kernels.
pub(crate) struct QueryPrep {
    pub rows: usize,
    /// `rows × head_dim`, scaled by the softmax scale.
    pub q: Vec<f32>,
    /// The same rows as the packed keys see them: rotated for QuaRot, else a copy.
    pub q_packed: Vec<f32>,
    /// Per-token keys: `rows × channel groups` sums of `q_packed` over each group.
    pub q_group_sums: Vec<f32>,
}

impl QueryPrep {
    #[allow(clippy::too_many_arguments)]
    fn new(
        key: &UnitCore,
        q: &[f32],
        first_head: usize,
        rows: usize,
        tokens: usize,
        i: usize,
        d: usize,
        scale: f32,
    ) -> QueryPrep {
        let mut qs = Vec::with_capacity(rows * d);
        for r in 0..rows {
            let at = ((first_head + r) * tokens + i) * d;
            qs.extend(q[at..at + d].iter().map(|x| x * scale));
        }
        let mut q_packed = qs.clone();
        if key.layout.rotated {
            for row in q_packed.chunks_exact_mut(d) {
                hadamard::fwht_normalized(row).expect("quarot units have power-of-two head_dim");
            }
        }
        let mut q_group_sums = Vec::new();
        if !key.layout.per_channel {
            let g = key.layout.group;
            for row in q_packed.chunks_exact(d) {
                q_group_sums.extend(row.chunks(g).map(|c| c.iter().sum::<f32>()));
            }
        }
        QueryPrep {
            rows,
            q: qs,
            q_packed,
            q_group_sums,
        }
    }
}

/// Buffers a thread reuses from task to task, so that a task allocates nothing.
#[derive(Default)]
struct TaskScratch {
    scores: Vec<f32>,
    /// A residual row widened to f32.
    row: Vec<f32>,
    glue: GlueScratch,
}

/// The glue's buffers, for the float and the integer kernels alike.
#[derive(Default)]
struct GlueScratch {
    /// Scales and zero-points widened to f32.
    s: Vec<f32>,
    z: Vec<f32>,
    /// Zero-point terms per (block, row), or per row.
    bias: Vec<f32>,
    /// Float kernels: the query folded with a block's scales.
    w: Vec<f32>,
    /// Float kernels: partial scores, or probabilities times scales; integer kernels: the
    /// accumulators of the split weights' two parts.
    tmp: Vec<f32>,
    /// Integer kernels: the kernels' sums, the 8-bit weights and their scales.
    sums: Vec<i32>,
    w8: Vec<i8>,
    sigma: Vec<f32>,
    /// Integer kernels: each row's largest key score.
    max: Vec<f32>,
}

struct TaskOut<'a> {
    /// Each row's softmax state.
    softmax: &'a mut [SoftmaxPart],
    /// `rows × head_dim` sums of probabilities times values, zeroed.
    acc_q: &'a mut [f32],
}

/// [`run_task`] with its glue loops (scale folding, per-token scales, softmax) compiled for
/// AVX2; the kernels it calls dispatch on `isa` themselves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn run_task_avx2(
    isa: Isa,
    kernels: int8::Kernels,
    view: &HeadView,
    prep: &QueryPrep,
    p: usize,
    a: usize,
    b: usize,
    d: usize,
    residual: usize,
    scratch: &mut TaskScratch,
    out: &mut TaskOut,
) -> Vec<f32> {
    run_task::<true>(isa, kernels, view, prep, p, a, b, d, residual, scratch, out)
}

/// [`run_task`] with its glue compiled for AVX-512 (the integer kernels' glue rounds whole
/// rows of weights to 8 bits, which vectorises 16 wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn run_task_avx512(
    isa: Isa,
    kernels: int8::Kernels,
    view: &HeadView,
    prep: &QueryPrep,
    p: usize,
    a: usize,
    b: usize,
    d: usize,
    residual: usize,
    scratch: &mut TaskScratch,
    out: &mut TaskOut,
) -> Vec<f32> {
    run_task::<true>(isa, kernels, view, prep, p, a, b, d, residual, scratch, out)
}

/// Attention of one (KV head, query at position `p`) over positions `a..b`: scores, the
/// block's softmax, and the value accumulation (in `acc_q`, except that for QuaRot values,
/// whose packed part is in the rotated domain, the unquantized rows go to `acc_fp`). `F16C`: the caller
/// runs with AVX2, FMA and F16C enabled, so the glue may use them. Tiled stores run the
/// integer kernels (as `kernels` says).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_task<const F16C: bool>(
    isa: Isa,
    kernels: int8::Kernels,
    view: &HeadView,
    prep: &QueryPrep,
    p: usize,
    a: usize,
    b: usize,
    d: usize,
    residual: usize,
    scratch: &mut TaskScratch,
    out: &mut TaskOut,
) -> Vec<f32> {
    let mut clock = timing::start();
    let rows = prep.rows;
    let len = b - a;
    let key = &view.key.core;
    // Tiled per-channel keys write every score; the other paths add into zeroed scores.
    let TaskScratch {
        scores,
        row: row_buf,
        glue,
    } = scratch;
    if !(view.key.tiled && key.layout.per_channel) {
        scores.clear();
    }
    scores.resize(rows * len, 0.0);
    let kq = key.layout.quantized_len(p + 1, residual);
    let packed_end = b.min(kq);
    // Each row's largest score, where the integer kernel found it for the packed positions.
    let mut known_max = None;
    if a < packed_end && view.key.tiled {
        known_max = int8_glue::key_scores::<F16C>(
            kernels, view.key, prep, a, packed_end, scores, len, glue,
        );
    } else if a < packed_end {
        packed_key_scores::<F16C>(isa, view.key, prep, a, packed_end, scores, len, glue);
    }
    timing::lap(timing::Phase::KeyScores, &mut clock);
    for pos in a.max(kq)..b {
        view.k_fp.prefetch(pos + FP_ROWS_AHEAD, d);
        let row = view.k_fp.row::<F16C>(pos, d, row_buf);
        for r in 0..rows {
            scores[r * len + pos - a] =
                attention::dot_with::<F16C>(&prep.q[r * d..(r + 1) * d], row);
        }
    }
    let value = &view.value.core;
    let vq = value.layout.quantized_len(p + 1, residual);
    let v_end = b.min(vq);
    // Where the value weights compute the packed positions' exponentials themselves, the
    // softmax takes only the positions after them: each row's max and, filled in below, sum.
    let mut fused: Option<([f32; 16], [f32; 16])> = None;
    let softmax = match known_max {
        Some(maxes) => {
            // The residual positions' scores join the packed ones' maxima.
            for (r, m) in maxes.iter_mut().enumerate() {
                let row = &scores[r * len..(r + 1) * len];
                *m = row[packed_end - a..]
                    .iter()
                    .fold(*m, |m, &x| if x > m { x } else { m });
            }
            if a < v_end
                && view.value.tiled
                && int8_glue::values_fuse_exp(kernels, view.value, rows)
            {
                let (mut max, mut sum) = ([0.0f32; 16], [0.0f32; 16]);
                for r in 0..rows {
                    let tail = &mut scores[r * len + v_end - a..(r + 1) * len];
                    (max[r], sum[r]) = (maxes[r], attention::softmax_exp(isa, tail, maxes[r]));
                }
                fused = Some((max, sum));
                Vec::new()
            } else {
                attention::softmax_rows_with_max(isa, scores, len, maxes)
            }
        }
        None => attention::softmax_rows(isa, scores, len),
    };
    if fused.is_none() {
        out.softmax.clone_from_slice(&softmax);
    }
    let acc_q = &mut *out.acc_q;
    // Unquantized rows add straight into `acc_q` unless it is in the rotated (QuaRot) domain.
    let mut acc_fp = if value.layout.rotated && a.max(vq) < b {
        vec![0.0f32; rows * d]
    } else {
        Vec::new()
    };
    let packed_end = v_end;
    timing::lap(timing::Phase::Residual, &mut clock);
    if a < packed_end && view.value.tiled {
        let exp = fused
            .as_mut()
            .map(|(max, sum)| (&max[..rows], &mut sum[..rows]));
        int8_glue::values::<F16C>(
            kernels, view.value, scores, len, a, packed_end, rows, acc_q, glue, exp,
        );
        if let Some((max, sum)) = fused {
            for (r, part) in out.softmax.iter_mut().enumerate() {
                *part = SoftmaxPart {
                    max: max[r],
                    sum: sum[r],
                };
            }
        }
    } else if a < packed_end {
        packed_values::<F16C>(
            isa, view.value, scores, len, a, packed_end, rows, acc_q, glue,
        );
    }
    timing::lap(timing::Phase::ValueAccumulate, &mut clock);
    let acc = if acc_fp.is_empty() {
        acc_q
    } else {
        &mut acc_fp
    };
    let mut from = a.max(vq);
    if let FpRows::F16 { base, rows: v } = &view.v_fp {
        // f16 residual rows: one pass with the sums held in registers where a kernel fits.
        if from < b {
            let (v, p) = (&v[(from - base) * d..(b - base) * d], &scores[from - a..]);
            if attention::try_axpy_f16_rows(isa, p, len, rows, v, d, acc) {
                from = b;
            }
        }
    }
    for pos in from..b {
        view.v_fp.prefetch(pos + FP_ROWS_AHEAD, d);
        let row = view.v_fp.row::<F16C>(pos, d, row_buf);
        for r in 0..rows {
            attention::axpy(scores[r * len + pos - a], row, &mut acc[r * d..(r + 1) * d]);
        }
    }
    timing::lap(timing::Phase::Residual, &mut clock);
    acc_fp
}

/// Widens `src` into `dst` (replacing its contents, without zero-filling it first); with F16C
/// when the caller enabled it (`half`'s slice conversion detects the CPU on every call, which
/// costs more than these short runs).
#[inline(always)]
pub(crate) fn to_f32<const F16C: bool>(src: &[f16], dst: &mut Vec<f32>) {
    dst.clear();
    dst.reserve(src.len());
    #[cfg(target_arch = "x86_64")]
    if F16C {
        // SAFETY: F16C is only true inside run_task_avx2, which enables it.
        unsafe { widen_f16c(src, dst) };
        return;
    }
    dst.extend(src.iter().map(|h| h.to_f32()));
}

/// Appends `src` widened to `dst`. Exact, like `f16::to_f32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], dst: &mut Vec<f32>) {
    use std::arch::x86_64::*;
    let (n, len) = (src.len(), dst.len());
    dst.reserve(n);
    // Straight into the reserved capacity (a stack buffer and `extend_from_slice` per eight
    // values cost more than the conversion).
    let out = dst.as_mut_ptr().add(len);
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(out.add(i), _mm256_cvtph_ps(h));
    }
    for (i, h) in src.iter().enumerate().skip(whole) {
        out.add(i).write(h.to_f32());
    }
    // SAFETY: the `n` values after `len` were written above, within the reserved capacity.
    dst.set_len(len + n);
}

/// Scores of positions `a..e` (all quantized) into `scores[r·len + pos − a0]`, where `a0 = a`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn packed_key_scores<const F16C: bool>(
    isa: Isa,
    key: &KeyStore,
    prep: &QueryPrep,
    a: usize,
    e: usize,
    scores: &mut [f32],
    len: usize,
    scratch: &mut GlueScratch,
) {
    let core = &key.core;
    let d = core.head_dim;
    let rows = prep.rows;
    let t_block = key.block_tokens;
    let block_bytes = key.block_bytes();
    let GlueScratch {
        s, z, w, bias, tmp, ..
    } = scratch;
    w.resize(rows * d, 0.0);
    bias.resize(rows, 0.0);
    let blocks = a / t_block..e.div_ceil(t_block);
    if core.layout.per_channel {
        // Every block's scales and zero-points at once: `[block][channel]`.
        let range = blocks.start * d..blocks.end * d;
        to_f32::<F16C>(&core.scales[0][range.clone()], s);
        to_f32::<F16C>(&core.zeros[0][range], z);
    }
    for blk in blocks.clone() {
        let blk_start = blk * t_block;
        let lo = a.max(blk_start) - blk_start;
        let hi = e.min(blk_start + t_block) - blk_start;
        let codes = &core.codes[blk * block_bytes..];
        let out_at = blk_start + lo - a;
        if core.layout.per_channel {
            // score = Σ_c (q_c·s_c)·code_c + Σ_c q_c·z_c: the block's scales fold into the query.
            let at = (blk - blocks.start) * d;
            let (sb, zb) = (&s[at..at + d], &z[at..at + d]);
            for ((qr, wr), b) in prep
                .q_packed
                .chunks_exact(d)
                .zip(w.chunks_exact_mut(d))
                .zip(bias.iter_mut())
            {
                for ((w, q), s) in wr.iter_mut().zip(qr).zip(sb) {
                    *w = q * s;
                }
                *b = attention::dot_with::<F16C>(qr, zb);
            }
            attention::key_scores(
                isa,
                codes,
                key.slot_bytes,
                core.bits,
                0..d,
                lo..hi,
                w,
                d,
                rows,
                &mut scores[out_at..],
                len,
            );
            for (r, &b) in bias.iter().enumerate() {
                for x in &mut scores[r * len + out_at..r * len + out_at + hi - lo] {
                    *x += b;
                }
            }
        } else {
            // score = Σ_g s_g·(Σ_{c∈g} q_c·code_c) + z_g·(Σ_{c∈g} q_c), per token.
            let g_size = core.layout.group;
            let n = hi - lo;
            tmp.clear();
            tmp.resize(rows * n, 0.0);
            for (g, c0) in (0..d).step_by(g_size).enumerate() {
                let c1 = (c0 + g_size).min(d);
                attention::key_scores(
                    isa,
                    codes,
                    key.slot_bytes,
                    core.bits,
                    c0..c1,
                    lo..hi,
                    &prep.q_packed,
                    d,
                    rows,
                    tmp,
                    n,
                );
                to_f32::<F16C>(&core.scales[g][blk_start + lo..blk_start + hi], s);
                to_f32::<F16C>(&core.zeros[g][blk_start + lo..blk_start + hi], z);
                let groups = core.layout.channel_groups(d);
                for (r, part) in tmp.chunks_exact(n).enumerate() {
                    let qsum = prep.q_group_sums[r * groups + g];
                    let dst = &mut scores[r * len + out_at..r * len + out_at + n];
                    for (((x, &sc), &zz), &dot) in
                        dst.iter_mut().zip(s.iter()).zip(z.iter()).zip(part)
                    {
                        *x += sc * dot + zz * qsum;
                    }
                }
            }
        }
    }
}

/// Accumulates `Σ_pos p[r][pos]·v[pos]` over quantized positions `a..e` into `acc`
/// (`rows × head_dim`), where `p[r][pos] = probs[r·len + pos − a]`.
///
/// Per channel group: `Σ_pos p·(s·code + z) = Σ_pos (p·s)·code + Σ_pos p·z`, the first by the
/// kernel over the whole range in one call, the second one dot product added to the group's
/// channels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn packed_values<const F16C: bool>(
    isa: Isa,
    value: &ValueStore,
    probs: &[f32],
    len: usize,
    a: usize,
    e: usize,
    rows: usize,
    acc: &mut [f32],
    scratch: &mut GlueScratch,
) {
    let core = &value.core;
    let d = core.head_dim;
    let n = e - a;
    let codes = &core.codes[a * value.row_bytes..];
    let GlueScratch { s, z, tmp: ps, .. } = scratch;
    for (g, c0) in (0..d).step_by(core.layout.group).enumerate() {
        let c1 = (c0 + core.layout.group).min(d);
        to_f32::<F16C>(&core.scales[g][a..e], s);
        to_f32::<F16C>(&core.zeros[g][a..e], z);
        ps.clear();
        for r in 0..rows {
            let p = &probs[r * len..r * len + n];
            ps.extend(p.iter().zip(s.iter()).map(|(&pp, &sc)| pp * sc));
            let zero_part = attention::dot_long::<F16C>(p, z);
            for x in &mut acc[r * d + c0..r * d + c1] {
                *x += zero_part;
            }
        }
        attention::value_accumulate(
            isa,
            codes,
            value.row_bytes,
            core.bits,
            n,
            c0..c1,
            ps,
            n,
            rows,
            acc,
            d,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs once and the results come back in task order, from a plain thread and
    /// from inside the pool, including nested calls (which take a fresh scratch).
    #[test]
    fn run_tasks_returns_every_result_in_order() {
        let square = |t: usize, scratch: &mut TaskScratch| {
            scratch.scores.push(t as f32);
            t * t
        };
        for n in [0, 1, 2, 3, 47, 1000] {
            let want: Vec<usize> = (0..n).map(|t| t * t).collect();
            assert_eq!(run_tasks(n, square), want, "n {n}");
            let nested = rayon::scope(|_| run_tasks(n, |t, _| run_tasks(3, square)[2] + t));
            assert_eq!(nested, (0..n).map(|t| 4 + t).collect::<Vec<_>>(), "n {n}");
            // Each task runs once, whichever lane it is claimed from.
            let calls = AtomicUsize::new(0);
            run_tasks(n, |_, _| calls.fetch_add(1, Ordering::Relaxed));
            assert_eq!(calls.into_inner(), n, "n {n}");
        }
    }

    /// A panicking task surfaces as a panic of the call, wherever it ran; the caller does not
    /// wait forever for the task that never finished.
    #[test]
    fn run_tasks_propagates_a_panic() {
        for bad in [0, 5, 63] {
            let result = std::panic::catch_unwind(|| {
                run_tasks(64, |t, _| {
                    if t == bad {
                        panic!("task {t} fails");
                    }
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    t
                })
            });
            assert!(result.is_err(), "task {bad}'s panic was lost");
        }
    }
}

//! Perplexity and KL-divergence evaluation over a tokenized text.
//!
//! Chunking follows llama.cpp's `llama-perplexity`: the whole text is tokenized once (BOS
//! first when the model adds it), cut into `n_tokens / ctx` non-overlapping chunks of `ctx`
//! tokens, and each chunk's first token is replaced by BOS when the model adds BOS. Every chunk
//! starts from an empty cache. Position `i` of a chunk predicts token `i + 1`.
//! * [`Protocol::Llama`] scores positions `ctx/2 .. ctx−1` (the second half, `ctx − ctx/2 − 1`
//!   predictions per chunk), so every prediction has at least `ctx/2` tokens of context;
//! * [`Protocol::Full`] scores positions `0 .. ctx−1` (every token but the first).
//!
//! Perplexity is `exp(mean NLL)` and its standard error `ppl · sqrt((E[nll²] − E[nll]²)/(n − 1))`,
//! llama.cpp's formula. When a quantized cache is evaluated, each chunk also runs through the
//! full-precision cache, and over the scored positions we report the mean KL divergence
//! `KL(p_fp ‖ p_quant)`, its 99th percentile and how often both argmaxes agree.

use std::ops::Range;
use std::time::Instant;

use candle_core::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::decoder::Decoder;
use crate::kv::KvCache;
use crate::kv_fp::FpCache;
use crate::kv_sim::{KvQuantPlan, SimQuantCache, SimSemantics};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("the text tokenizes to {tokens} tokens, fewer than one chunk of --ctx {ctx}; use a longer text or a smaller --ctx")]
    TextTooShort { tokens: usize, ctx: usize },
    #[error("--ctx must be at least 4 tokens (got {0}): the llama.cpp protocol scores the second half of each chunk")]
    ContextTooSmall(usize),
    #[error("--ctx {ctx} exceeds the model's maximum context of {max} tokens")]
    ContextTooLarge { ctx: usize, max: usize },
    #[error("--chunks must be at least 1")]
    NoChunks,
    #[error("the model adds BOS but its config names no BOS token id")]
    MissingBos,
    #[error("the KV plan covers {plan_layers} layers × {plan_heads} KV heads, the model has {model_layers} × {model_heads}")]
    PlanMismatch {
        plan_layers: usize,
        plan_heads: usize,
        model_layers: usize,
        model_heads: usize,
    },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

/// Which predictions of a chunk are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// llama.cpp's `llama-perplexity`: the second half of each chunk.
    Llama,
    /// Every token of the chunk but the first.
    Full,
}

impl Protocol {
    /// Positions of a `ctx`-token chunk whose logits are scored (position `i` predicts `i + 1`).
    pub fn scored_positions(self, ctx: usize) -> Range<usize> {
        match self {
            Protocol::Llama => ctx / 2..ctx - 1,
            Protocol::Full => 0..ctx - 1,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Protocol::Llama => "llama.cpp protocol: second half of each chunk scored",
            Protocol::Full => "full-chunk protocol: every token but the first scored",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "llama" => Ok(Protocol::Llama),
            "full" => Ok(Protocol::Full),
            other => Err(format!("unknown protocol `{other}` (known: llama, full)")),
        }
    }
}

/// Cuts `tokens` into llama.cpp's chunks: `min(n_tokens / ctx, max_chunks)` chunks of `ctx`
/// tokens, the first of each replaced by `bos` when given.
pub fn chunk_tokens(
    tokens: &[u32],
    ctx: usize,
    max_chunks: Option<usize>,
    bos: Option<u32>,
) -> Result<Vec<Vec<u32>>, EvalError> {
    if ctx < 4 {
        return Err(EvalError::ContextTooSmall(ctx));
    }
    if max_chunks == Some(0) {
        return Err(EvalError::NoChunks);
    }
    let available = tokens.len() / ctx;
    if available == 0 {
        return Err(EvalError::TextTooShort {
            tokens: tokens.len(),
            ctx,
        });
    }
    let n = max_chunks.map_or(available, |m| m.min(available));
    Ok((0..n)
        .map(|i| {
            let mut chunk = tokens[i * ctx..(i + 1) * ctx].to_vec();
            if let Some(b) = bos {
                chunk[0] = b;
            }
            chunk
        })
        .collect())
}

/// Running sums of per-token negative log-likelihoods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct NllStats {
    pub sum: f64,
    pub sum_sq: f64,
    pub count: usize,
}

impl NllStats {
    pub fn push(&mut self, nll: f64) {
        self.sum += nll;
        self.sum_sq += nll * nll;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &NllStats) {
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.count += other.count;
    }

    pub fn mean_nll(&self) -> f64 {
        self.sum / self.count as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// llama.cpp's standard error of the perplexity: `ppl · sqrt(var(nll) / (n − 1))` with
    /// `var = E[nll²] − E[nll]²` (0 when undefined).
    pub fn perplexity_stderr(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let mean = self.mean_nll();
        let var = self.sum_sq / self.count as f64 - mean * mean;
        if var > 0.0 {
            self.perplexity() * (var / (self.count - 1) as f64).sqrt()
        } else {
            0.0
        }
    }

    pub fn summary(&self) -> PerplexitySummary {
        PerplexitySummary {
            perplexity: self.perplexity(),
            stderr: self.perplexity_stderr(),
            mean_nll: self.mean_nll(),
            tokens: self.count,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerplexitySummary {
    pub perplexity: f64,
    pub stderr: f64,
    pub mean_nll: f64,
    pub tokens: usize,
}

/// Log-softmax bookkeeping of one logits row.
#[derive(Debug, Clone, Copy)]
struct RowStats {
    argmax: usize,
    /// `max + ln Σ exp(l − max)`.
    log_norm: f64,
}

fn row_stats(logits: &[f32]) -> RowStats {
    let (argmax, max) =
        logits
            .iter()
            .copied()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            });
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    RowStats {
        argmax,
        log_norm: max as f64 + sum.ln(),
    }
}

/// `KL(p ‖ q)` for two logits rows with their stats.
fn kl_divergence(p_logits: &[f32], p: &RowStats, q_logits: &[f32], q: &RowStats) -> f64 {
    let (p_norm, q_norm) = (p.log_norm, q.log_norm);
    let kl: f64 = p_logits
        .iter()
        .zip(q_logits)
        .map(|(&lp, &lq)| {
            let log_p = lp as f64 - p_norm;
            let log_q = lq as f64 - q_norm;
            log_p.exp() * (log_p - log_q)
        })
        .sum();
    kl.max(0.0)
}

/// Per-token results of one chunk.
#[derive(Debug, Clone, Default)]
pub struct ChunkScores {
    /// NLL of each prediction `i → i + 1`, `i` in `0..ctx−1`.
    pub nll: Vec<f64>,
    /// Against a reference run: KL and argmax agreement at each position (empty without one).
    pub kl: Vec<f64>,
    pub top1_agree: Vec<bool>,
}

/// Scores one chunk's logits (`[ctx, vocab]`) against its tokens, and against reference
/// logits when given.
pub fn score_chunk(
    tokens: &[u32],
    logits: &Tensor,
    reference: Option<&Tensor>,
) -> candle_core::Result<ChunkScores> {
    let (ctx, vocab) = logits.dims2()?;
    if ctx != tokens.len() {
        candle_core::bail!("{ctx} logits rows for a chunk of {} tokens", tokens.len());
    }
    let data = logits.flatten_all()?.to_vec1::<f32>()?;
    let ref_data = reference
        .map(|r| r.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    if let Some(r) = &ref_data {
        if r.len() != data.len() {
            candle_core::bail!("reference logits differ in shape from the evaluated logits");
        }
    }
    let per_position: Vec<(f64, Option<(f64, bool)>)> = (0..ctx - 1)
        .into_par_iter()
        .map(|i| {
            let row = &data[i * vocab..(i + 1) * vocab];
            let stats = row_stats(row);
            let nll = stats.log_norm - row[tokens[i + 1] as usize] as f64;
            let against = ref_data.as_ref().map(|r| {
                let ref_row = &r[i * vocab..(i + 1) * vocab];
                let ref_stats = row_stats(ref_row);
                (
                    kl_divergence(ref_row, &ref_stats, row, &stats),
                    ref_stats.argmax == stats.argmax,
                )
            });
            (nll, against)
        })
        .collect();
    let mut scores = ChunkScores::default();
    for (nll, against) in per_position {
        scores.nll.push(nll);
        if let Some((kl, agree)) = against {
            scores.kl.push(kl);
            scores.top1_agree.push(agree);
        }
    }
    Ok(scores)
}

/// Options of one evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub ctx: usize,
    pub max_chunks: Option<usize>,
    /// Headline protocol (both perplexities are always reported); KL statistics use its
    /// scored positions.
    pub protocol: Protocol,
}

/// Divergence of the evaluated cache from the full-precision cache.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DivergenceSummary {
    pub mean_kl: f64,
    pub p99_kl: f64,
    pub top1_agreement: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub protocol: Protocol,
    pub protocol_description: String,
    pub ctx: usize,
    pub chunks: usize,
    pub text_tokens: usize,
    /// Perplexity of the evaluated cache under the headline protocol.
    pub perplexity: PerplexitySummary,
    /// Under both protocols.
    pub perplexity_llama: PerplexitySummary,
    pub perplexity_full: PerplexitySummary,
    /// The full-precision cache's perplexity (headline protocol), when a quantized cache was
    /// evaluated.
    pub fp_perplexity: Option<PerplexitySummary>,
    pub divergence: Option<DivergenceSummary>,
    /// Forward throughput of the evaluated cache and of the full-precision reference run.
    pub tokens_per_second: f64,
    pub fp_tokens_per_second: Option<f64>,
    pub seconds: f64,
}

/// How the evaluated cache quantizes K/V: `None` evaluates the full-precision cache alone.
pub struct QuantSetting<'a> {
    pub plan: &'a KvQuantPlan,
    pub residual: usize,
    /// Tile (the historical default) or exactly the packed cache's storage rule.
    pub semantics: SimSemantics,
    /// Evaluate through the real packed cache (`generate`'s) with these units, in
    /// [`ratequant::kvcache::CacheShape::unit_index`] order, and this attention kernel, instead
    /// of the simulation (`semantics` is then moot: the packed cache is what `Packed` simulates).
    pub packed: Option<(
        Vec<ratequant::kvcache::UnitFormat>,
        ratequant::kvcache::AttentionKernel,
    )>,
}

/// Evaluates `decoder` on `tokens` (the whole text, tokenized with BOS as the model adds it).
/// `progress(done, total)` is called after every chunk.
pub fn evaluate(
    decoder: &Decoder,
    tokens: &[u32],
    options: &EvalOptions,
    quant: Option<QuantSetting<'_>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport, EvalError> {
    let config = decoder.config();
    if options.ctx > config.max_position {
        return Err(EvalError::ContextTooLarge {
            ctx: options.ctx,
            max: config.max_position,
        });
    }
    let bos = if config.add_bos {
        Some(config.bos_token_id.ok_or(EvalError::MissingBos)?)
    } else {
        None
    };
    if let Some(q) = &quant {
        if q.plan.num_layers() != config.num_layers || q.plan.kv_heads() != config.num_kv_heads {
            return Err(EvalError::PlanMismatch {
                plan_layers: q.plan.num_layers(),
                plan_heads: q.plan.kv_heads(),
                model_layers: config.num_layers,
                model_heads: config.num_kv_heads,
            });
        }
        q.plan.check_head_dim(config.head_dim)?;
    }
    let chunks = chunk_tokens(tokens, options.ctx, options.max_chunks, bos)?;
    let started = Instant::now();
    let (mut llama, mut full, mut fp_headline) = (
        NllStats::default(),
        NllStats::default(),
        NllStats::default(),
    );
    let mut kl_values = Vec::new();
    let mut agree = 0usize;
    let (mut fp_seconds, mut eval_seconds) = (0f64, 0f64);
    let llama_range = Protocol::Llama.scored_positions(options.ctx);
    let headline_range = options.protocol.scored_positions(options.ctx);
    let mut fp_cache = FpCache::new(config.num_layers);
    let mut quant_cache: Option<Box<dyn KvCache>> = match &quant {
        None => None,
        Some(q) => Some(match &q.packed {
            None => Box::new(SimQuantCache::with_semantics(
                q.plan.clone(),
                q.residual,
                q.semantics,
            )),
            Some((units, kernel)) => Box::new(crate::kv_packed::PackedCache::with_kernel(
                config.num_layers,
                config.num_kv_heads,
                config.head_dim,
                units,
                q.residual,
                *kernel,
            )?),
        }),
    };
    for (i, chunk) in chunks.iter().enumerate() {
        fp_cache.reset();
        let t0 = Instant::now();
        let fp_logits = decoder.forward(chunk, &mut fp_cache)?;
        fp_seconds += t0.elapsed().as_secs_f64();
        let scores = match quant_cache.as_mut() {
            None => score_chunk(chunk, &fp_logits, None)?,
            Some(cache) => {
                cache.reset();
                let t0 = Instant::now();
                let logits = decoder.forward(chunk, cache.as_mut())?;
                eval_seconds += t0.elapsed().as_secs_f64();
                let fp_scores = score_chunk(chunk, &fp_logits, None)?;
                fp_scores.nll[headline_range.clone()]
                    .iter()
                    .for_each(|&n| fp_headline.push(n));
                score_chunk(chunk, &logits, Some(&fp_logits))?
            }
        };
        scores.nll.iter().for_each(|&n| full.push(n));
        scores.nll[llama_range.clone()]
            .iter()
            .for_each(|&n| llama.push(n));
        if !scores.kl.is_empty() {
            kl_values.extend_from_slice(&scores.kl[headline_range.clone()]);
            agree += scores.top1_agree[headline_range.clone()]
                .iter()
                .filter(|&&a| a)
                .count();
        }
        progress(i + 1, chunks.len());
    }
    let forwarded = (chunks.len() * options.ctx) as f64;
    let fp_tps = forwarded / fp_seconds.max(f64::MIN_POSITIVE);
    let headline = match options.protocol {
        Protocol::Llama => llama,
        Protocol::Full => full,
    };
    let divergence = (!kl_values.is_empty()).then(|| DivergenceSummary {
        mean_kl: kl_values.iter().sum::<f64>() / kl_values.len() as f64,
        p99_kl: percentile(&mut kl_values.clone(), 0.99),
        top1_agreement: agree as f64 / kl_values.len() as f64,
        tokens: kl_values.len(),
    });
    Ok(EvalReport {
        protocol: options.protocol,
        protocol_description: options.protocol.describe().to_string(),
        ctx: options.ctx,
        chunks: chunks.len(),
        text_tokens: tokens.len(),
        perplexity: headline.summary(),
        perplexity_llama: llama.summary(),
        perplexity_full: full.summary(),
        fp_perplexity: quant.as_ref().map(|_| fp_headline.summary()),
        divergence,
        tokens_per_second: if quant.is_some() {
            forwarded / eval_seconds.max(f64::MIN_POSITIVE)
        } else {
            fp_tps
        },
        fp_tokens_per_second: quant.as_ref().map(|_| fp_tps),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `q`-quantile (nearest rank) of `values`, which it sorts.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Runs any cache over `chunk` and returns logits; a convenience for callers that bring their
/// own cache (packed caches, capture wrappers).
pub fn forward_chunk(
    decoder: &Decoder,
    chunk: &[u32],
    cache: &mut dyn KvCache,
) -> candle_core::Result<Tensor> {
    cache.reset();
    decoder.forward(chunk, cache)
}

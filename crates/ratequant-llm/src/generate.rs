//! Text generation over any KV cache: the prompt prefilled in blocks, then one token at a
//! time, greedy or sampled (temperature and top-p nucleus, seeded so a run can be repeated),
//! with incremental detokenization for streaming.

use std::time::Instant;

use candle_core::Result;

use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::kv::KvCache;
use crate::loader::LoadError;
use crate::synthetic::SplitMix64;
use crate::tokenizer::Tokenizer;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// `None`: greedy (the most likely token, lowest id on ties).
    sampling: Option<Nucleus>,
}

#[derive(Debug, Clone)]
struct Nucleus {
    temperature: f64,
    top_p: f64,
    rng: SplitMix64,
}

impl Sampler {
    pub fn greedy() -> Sampler {
        Sampler { sampling: None }
    }

    /// Samples from `softmax(logits / temperature)` restricted to the smallest set of most
    /// likely tokens whose probability reaches `top_p`; the same seed gives the same tokens.
    /// `temperature = 0` is greedy.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> std::result::Result<Sampler, String> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(format!(
                "temperature must be a finite number ≥ 0, got {temperature}"
            ));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {top_p}"));
        }
        if temperature == 0.0 {
            return Ok(Sampler::greedy());
        }
        Ok(Sampler {
            sampling: Some(Nucleus {
                temperature,
                top_p,
                rng: SplitMix64::new(seed),
            }),
        })
    }

    pub fn is_greedy(&self) -> bool {
        self.sampling.is_none()
    }

    /// The next token for `logits` (`[vocab]`).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            candle_core::bail!("sampling from empty logits");
        }
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            candle_core::bail!("the model produced NaN logits (token id {i})");
        }
        let Some(nucleus) = &mut self.sampling else {
            return Ok(argmax(logits));
        };
        // Probabilities in f64, most likely first (ties: lower id first, so the order and
        // hence the draw is deterministic).
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| (id as u32, ((l as f64 - max) / nucleus.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for (_, p) in &probs {
            kept += 1;
            mass += p / total;
            if mass >= nucleus.top_p {
                break;
            }
        }
        // Uniform in [0, mass): 53 random bits.
        let u = (nucleus.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * mass;
        let mut acc = 0.0;
        for &(id, p) in &probs[..kept] {
            acc += p / total;
            if u < acc {
                return Ok(id);
            }
        }
        // Rounding left `u` just above the last partial sum.
        Ok(probs[kept - 1].0)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Turns generated ids into text as they arrive. Decoding the ids one at a time is wrong for
/// characters split over several tokens (byte-level BPE, SentencePiece byte fallback) and for
/// tokenizers whose text depends on the previous token (SentencePiece's leading space); so each
/// step decodes a short window of ids and emits only what is new once it no longer ends in an
/// incomplete character (U+FFFD).
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the decoding window: the ids before it are emitted and no longer affect the
    /// text of later ones.
    prefix_offset: usize,
    /// Ids before this are emitted.
    read_offset: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> TextStream<'a> {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> std::result::Result<Option<String>, LoadError> {
        self.ids.push(id);
        let emitted = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() <= emitted.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new = suffix_after(&text, &emitted).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok((!new.is_empty()).then_some(new))
    }

    /// The text of ids not yet emitted (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> std::result::Result<Option<String>, LoadError> {
        let emitted = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        let new = suffix_after(&text, &emitted).to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok((!new.is_empty()).then_some(new))
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// `text` after its longest common prefix with `emitted` (normally `emitted` itself; a
/// decoder that rewrites earlier text cannot be undone in a stream, so only the part after
/// the first difference is new).
fn suffix_after<'t>(text: &'t str, emitted: &str) -> &'t str {
    let common = text
        .char_indices()
        .zip(emitted.chars())
        .find(|((_, a), b)| a != b)
        .map_or_else(|| emitted.len().min(text.len()), |((i, _), _)| i);
    &text[common..]
}

/// Texts of end-of-turn / end-of-text tokens that stop generation when the vocabulary has them
/// as single special tokens (chat models end a reply with these rather than with EOS).
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
];

/// Ids that end generation: the model's EOS and its end-of-turn tokens.
pub fn stop_ids(tokenizer: &Tokenizer, config: &ModelConfig) -> Vec<u32> {
    let mut ids: Vec<u32> = config.eos_token_id.into_iter().collect();
    for text in END_OF_TURN_TEXTS {
        if let Ok(enc) = tokenizer.encode_with(text, false, true) {
            if let [id] = enc[..] {
                if tokenizer.token_text(id).as_deref() == Some(*text) && !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
    }
    ids
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate (the stop token not counted).
    pub max_tokens: usize,
    /// Prompt tokens per prefill forward call (bounds the attention scores' memory).
    pub prefill_chunk: usize,
    /// Ids that end generation (not emitted).
    pub stop_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop id was produced.
    EndOfText,
    /// `max_tokens` were generated.
    MaxTokens,
}

/// What a generation did and how long it took.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Generated ids, the stop id excluded.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub stop_id: Option<u32>,
    /// Wall time of the prompt's forward passes.
    pub prefill_seconds: f64,
    /// Single-token forward passes after the prompt.
    pub decode_steps: usize,
    /// Wall time from the end of the prefill to the last token (forward passes, sampling and
    /// the caller's `on_token`).
    pub decode_seconds: f64,
}

impl Generation {
    /// Prompt tokens per second of prefill.
    pub fn prompt_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(f64::MIN_POSITIVE)
    }

    /// Decode steps per second, `None` when no step ran.
    pub fn decode_tokens_per_second(&self) -> Option<f64> {
        (self.decode_steps > 0)
            .then(|| self.decode_steps as f64 / self.decode_seconds.max(f64::MIN_POSITIVE))
    }
}

/// What the caller's per-token callback may fail with (say, writing the text out).
pub type CallbackError = Box<dyn std::error::Error + Send + Sync>;

/// Prefills `prompt` into `cache` (which must be empty) in blocks of `options.prefill_chunk`,
/// then generates up to `options.max_tokens` tokens, calling `on_token` with each as soon as
/// it is chosen; an error from `on_token` ends generation with that error.
pub fn generate(
    decoder: &Decoder,
    prompt: &[u32],
    cache: &mut dyn KvCache,
    options: &GenerateOptions,
    sampler: &mut Sampler,
    on_token: &mut dyn FnMut(u32) -> std::result::Result<(), CallbackError>,
) -> Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt has no tokens");
    }
    if !cache.is_empty() {
        candle_core::bail!(
            "generation needs an empty cache, this one holds {} tokens",
            cache.len()
        );
    }
    if options.prefill_chunk == 0 {
        candle_core::bail!("the prefill chunk must be at least 1 token");
    }
    let started = Instant::now();
    let mut logits = Vec::new();
    for block in prompt.chunks(options.prefill_chunk) {
        logits = decoder.forward_last(block, cache)?.to_vec1::<f32>()?;
    }
    let prefill_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut tokens = Vec::new();
    let mut decode_steps = 0;
    let (stop, stop_id) = loop {
        if tokens.len() >= options.max_tokens {
            break (StopReason::MaxTokens, None);
        }
        let next = sampler.sample(&logits)?;
        if options.stop_ids.contains(&next) {
            break (StopReason::EndOfText, Some(next));
        }
        tokens.push(next);
        on_token(next).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        if tokens.len() < options.max_tokens {
            logits = decoder.forward_last(&[next], cache)?.to_vec1::<f32>()?;
            decode_steps += 1;
        }
    };
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        stop,
        stop_id,
        prefill_seconds,
        decode_steps,
        decode_seconds: started.elapsed().as_secs_f64(),
    })
}

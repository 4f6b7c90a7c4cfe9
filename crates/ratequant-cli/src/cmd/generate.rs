//! `ratequant generate`: text generation over the packed mixed-precision KV cache (or the
//! full-precision one as a baseline), streamed to stdout; prompt and decode throughput, the
//! KV bytes held against an f16 cache, and the peak resident memory go to stderr and, with
//! `--json`, to a report file.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use ratequant::formats::Plan;
use ratequant::kvcache::memory::estimate;
use ratequant::kvcache::{AttentionKernel, CacheShape, MemoryReport, UnitFormat, DEFAULT_RESIDUAL};
use ratequant_llm::generate::{
    generate, stop_ids, GenerateOptions, Generation, Sampler, StopReason, TextStream,
};
use ratequant_llm::kv_packed::{plan_units, uniform_units, PackedCache};
use ratequant_llm::sysmem::{available_memory, peak_resident_memory};
use ratequant_llm::{load_model, AssetCache, Decoder, FpCache, KvCache, KvSpec, Tokenizer};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: an asset name (smollm2, qwen2.5-0.5b, gemma3-270m) or a path (.gguf file or
    /// Hugging Face directory).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// KV cache: `fp` (full precision, the baseline) or DESIGN[:PARAMS]:BITS for every unit,
    /// stored packed (`kivi:2`, `quarot:4`, `kivi:g=64:2`).
    #[arg(long, default_value = "fp", conflicts_with = "plan")]
    pub kv: String,
    /// Per-unit bit plan from `ratequant allocate`, stored packed at its bits.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Most recent tokens that per-token units (values, QuaRot, RTN) keep in full precision;
    /// KIVI keys stay in full precision until their group is complete.
    #[arg(long, default_value_t = DEFAULT_RESIDUAL)]
    pub residual: usize,
    /// Attention on the packed codes: `float` (f32 arithmetic; equals `eval --kv-semantics
    /// packed` up to float rounding) or `int8` (integer dot products on AVX-512 VNNI, AVX-VNNI
    /// or AVX2, faster; rounds the query and the probabilities to 8 bits, 16 from 4-bit units
    /// up).
    #[arg(long, default_value = "float", value_parser = parse_kernel)]
    pub attention: AttentionKernel,
    /// The prompt text (special tokens such as `<|im_start|>` are recognised).
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from this UTF-8 file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Most tokens to generate; generation also stops at the model's end-of-text tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy; above 0, sample from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only from the most likely tokens whose probability reaches this (with
    /// --temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampler: the same seed, prompt and cache give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompt tokens per prefill forward pass.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub(crate) fn parse_kernel(s: &str) -> std::result::Result<AttentionKernel, String> {
    AttentionKernel::parse(s).map_err(|e| e.to_string())
}

/// The cache a run uses, decided before anything is allocated.
enum CacheChoice {
    FullPrecision,
    Packed {
        units: Vec<UnitFormat>,
        /// The design as written in a spec (`kivi`, `kivi:g=64`).
        design: String,
        mean_bits: f64,
    },
}

/// KV bytes against an f16 cache of the same length.
#[derive(Debug, Clone, Serialize)]
struct KvMemory {
    tokens: usize,
    bytes: usize,
    f16_bytes: usize,
    /// How many times smaller than the f16 cache.
    times_smaller_than_f16: f64,
    bytes_per_token: f64,
    /// Codes, metadata, residual and padding (packed caches).
    breakdown: Option<MemoryReport>,
}

impl KvMemory {
    fn packed(r: MemoryReport) -> KvMemory {
        KvMemory {
            tokens: r.tokens,
            bytes: r.total_bytes(),
            f16_bytes: r.f16_bytes,
            times_smaller_than_f16: r.compression(),
            bytes_per_token: r.bytes_per_token(),
            breakdown: Some(r),
        }
    }

    /// The full-precision cache keeps f32 tensors.
    fn full_precision(shape: CacheShape, tokens: usize) -> KvMemory {
        let f16_bytes = tokens * shape.layers * shape.kv_heads * shape.head_dim * 2 * 2;
        let bytes = 2 * f16_bytes;
        KvMemory {
            tokens,
            bytes,
            f16_bytes,
            times_smaller_than_f16: f16_bytes as f64 / bytes.max(1) as f64,
            bytes_per_token: if tokens == 0 {
                0.0
            } else {
                bytes as f64 / tokens as f64
            },
            breakdown: None,
        }
    }
}

#[derive(Serialize)]
struct Sampling {
    greedy: bool,
    temperature: f64,
    top_p: f64,
    seed: u64,
}

#[derive(Serialize)]
struct GenerateReport<'a> {
    model: &'a str,
    model_source: &'a str,
    /// `fp`, the uniform spec, or `plan`.
    kv: String,
    design: Option<String>,
    plan: Option<String>,
    mean_bits: Option<f64>,
    /// `null` for the full-precision cache.
    residual: Option<usize>,
    /// `float` or `int8` (`null` for the full-precision cache).
    attention: Option<&'static str>,
    /// What runs those kernels: `avx512`, `avx2`, `scalar`; for `int8` `avx512-vnni`,
    /// `avx-vnni`, `avx2` or `scalar` (`null` for the full-precision cache).
    attention_isa: Option<&'static str>,
    sampling: Sampling,
    prefill_chunk: usize,
    prompt_tokens: usize,
    generated_tokens: usize,
    stop_reason: StopReason,
    text: String,
    prefill_seconds: f64,
    prompt_tokens_per_second: f64,
    decode_steps: usize,
    decode_seconds: f64,
    decode_tokens_per_second: Option<f64>,
    /// What the cache held at the end of the run.
    kv_cache: KvMemory,
    /// What it would hold at prompt + max tokens (checked against available memory).
    kv_cache_planned: KvMemory,
    peak_resident_bytes: Option<u64>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Everything that can be checked without the model first.
    let prompt = read_prompt(&args)?;
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if args.prefill_chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    let mut sampler =
        Sampler::new(args.temperature, args.top_p, args.seed).map_err(anyhow::Error::msg)?;
    if let Some(path) = &args.json {
        super::check_output_path(path, "--json")?;
    }
    let plan = match &args.plan {
        Some(path) => {
            Some(Plan::load(path).with_context(|| format!("reading plan {}", path.display()))?)
        }
        None => None,
    };
    let spec = KvSpec::parse(&args.kv).map_err(anyhow::Error::msg)?;
    if args.plan.is_none()
        && spec == KvSpec::FullPrecision
        && args.attention != AttentionKernel::Float
    {
        bail!(
            "--attention {} runs on packed codes, but --kv fp keeps the cache in full precision: \
             give --kv DESIGN:BITS or --plan, or drop --attention",
            args.attention.name()
        );
    }

    let model = load_model(&args.model, &AssetCache::from_env())
        .with_context(|| format!("loading model `{}`", args.model))?;
    let config = model.config.clone();
    let shape = CacheShape {
        layers: config.num_layers,
        kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let prompt_ids = model
        .tokenizer
        .encode(&prompt, config.add_bos)
        .context("tokenizing the prompt")?;
    if prompt_ids.is_empty() {
        bail!("the prompt is empty (no tokens)");
    }
    let context = prompt_ids.len() + args.max_tokens;
    if context > config.max_position {
        bail!(
            "the prompt's {} tokens + --max-tokens {} = {context} tokens exceed model `{}`'s maximum context of {} tokens",
            prompt_ids.len(),
            args.max_tokens,
            args.model,
            config.max_position
        );
    }

    let choice = cache_choice(&args, plan.as_ref(), &spec, shape)?;
    let label = match &args.plan {
        Some(path) => format!("plan {}", path.display()),
        None => spec.to_string(),
    };
    let cannot_serve = || format!("--kv {label} cannot serve model `{}`", args.model);
    // Refuse before allocating: the KV cache at the full context must fit in memory.
    let planned = match &choice {
        CacheChoice::FullPrecision => KvMemory::full_precision(shape, context),
        CacheChoice::Packed { units, .. } => KvMemory::packed(
            estimate(shape, units, args.residual, context, args.attention)
                .with_context(cannot_serve)?,
        ),
    };
    if let Some(available) = available_memory() {
        if planned.bytes as u64 > available {
            bail!(
                "the KV cache at {context} tokens ({} prompt + {} to generate) needs {} ({label}; an f16 cache would need {}), \
                 but only {} of memory is available: lower --max-tokens or use fewer bits",
                prompt_ids.len(),
                args.max_tokens,
                human_bytes(planned.bytes as u64),
                human_bytes(planned.f16_bytes as u64),
                human_bytes(available)
            );
        }
    }
    let mut cache = match &choice {
        CacheChoice::FullPrecision => RunCache::FullPrecision(FpCache::new(shape.layers)),
        CacheChoice::Packed { units, .. } => RunCache::Packed(
            PackedCache::with_kernel(
                shape.layers,
                shape.kv_heads,
                shape.head_dim,
                units,
                args.residual,
                args.attention,
            )
            .with_context(cannot_serve)?,
        ),
    };
    let attention_isa = match &cache {
        RunCache::Packed(c) => Some(c.inner().kernel_isa()),
        _ => None,
    };
    if args.attention == AttentionKernel::Int8 && attention_isa == Some("scalar") {
        eprintln!(
            "note: this CPU lacks AVX2, so --attention int8 runs its scalar reference (slow); use --attention float"
        );
    }

    let source = model.source.clone();
    let (decoder, tokenizer) = super::build_decoder(model)?;
    eprintln!(
        "model {} ({:?}: {} layers, {} heads / {} KV heads × {}), KV cache {label}{}; prompt {} tokens, up to {} new \
         ({}); KV at {context} tokens: {} (f16: {})",
        args.model,
        config.arch,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        match &choice {
            CacheChoice::FullPrecision => String::new(),
            CacheChoice::Packed { mean_bits, .. } => format!(
                ", mean {mean_bits:.3} bits, residual {}, {} attention ({})",
                args.residual,
                args.attention.name(),
                attention_isa.unwrap_or("?")
            ),
        },
        prompt_ids.len(),
        args.max_tokens,
        if sampler.is_greedy() {
            "greedy".to_string()
        } else {
            format!(
                "temperature {}, top-p {}, seed {}",
                args.temperature, args.top_p, args.seed
            )
        },
        human_bytes(planned.bytes as u64),
        human_bytes(planned.f16_bytes as u64),
    );

    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        prefill_chunk: args.prefill_chunk,
        stop_ids: stop_ids(&tokenizer, &config),
    };
    let started = Instant::now();
    let (generation, text) = stream_to_stdout(
        &decoder,
        &tokenizer,
        &prompt_ids,
        cache.as_kv_cache(),
        &options,
        &mut sampler,
    )?;
    let wall = started.elapsed().as_secs_f64();
    let held = cache.memory(shape);
    let peak = peak_resident_memory();
    print_summary(&generation, &held, &planned, peak, wall);

    let Some(path) = &args.json else {
        return Ok(());
    };
    let (design, mean_bits, residual) = match &choice {
        CacheChoice::FullPrecision => (None, None, None),
        CacheChoice::Packed {
            design, mean_bits, ..
        } => (Some(design.clone()), Some(*mean_bits), Some(args.residual)),
    };
    let report = GenerateReport {
        model: &args.model,
        model_source: &source,
        kv: if args.plan.is_some() {
            "plan".into()
        } else {
            spec.to_string()
        },
        design,
        plan: args.plan.as_ref().map(|p| p.display().to_string()),
        mean_bits,
        residual,
        attention: residual.map(|_| args.attention.name()),
        attention_isa,
        sampling: Sampling {
            greedy: sampler.is_greedy(),
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        prefill_chunk: args.prefill_chunk,
        prompt_tokens: generation.prompt_tokens,
        generated_tokens: generation.tokens.len(),
        stop_reason: generation.stop,
        text,
        prefill_seconds: generation.prefill_seconds,
        prompt_tokens_per_second: generation.prompt_tokens_per_second(),
        decode_steps: generation.decode_steps,
        decode_seconds: generation.decode_seconds,
        decode_tokens_per_second: generation.decode_tokens_per_second(),
        kv_cache: held,
        kv_cache_planned: planned,
        peak_resident_bytes: peak,
    };
    ratequant::atomic::write_json_atomic(path, &report)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn read_prompt(args: &GenerateArgs) -> Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(p), None) => Ok(p.clone()),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --prompt-file {}", path.display())),
        _ => bail!("give the prompt with --prompt TEXT or --prompt-file FILE"),
    }
}

/// The units of the cache `--plan` or `--kv` asks for, checked against the model's shape.
fn cache_choice(
    args: &GenerateArgs,
    plan: Option<&Plan>,
    spec: &KvSpec,
    shape: CacheShape,
) -> Result<CacheChoice> {
    if let (Some(plan), Some(path)) = (plan, &args.plan) {
        let units = plan_units(plan, shape.layers, shape.kv_heads).with_context(|| {
            format!(
                "plan {} does not fit model `{}`",
                path.display(),
                args.model
            )
        })?;
        let design = plan
            .quantizer
            .spec()
            .with_context(|| format!("plan {}: quantizer", path.display()))?;
        return Ok(CacheChoice::Packed {
            units,
            design: design.to_string(),
            mean_bits: plan.achieved_mean_bits,
        });
    }
    Ok(match spec {
        KvSpec::FullPrecision => CacheChoice::FullPrecision,
        KvSpec::Uniform { quantizer, bits } => CacheChoice::Packed {
            units: uniform_units(quantizer, *bits, shape.layers, shape.kv_heads),
            design: quantizer.to_string(),
            mean_bits: *bits as f64,
        },
    })
}

/// Generates, writing the text to stdout as it is produced (then a newline); returns the
/// generation and its text.
fn stream_to_stdout(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    cache: &mut dyn KvCache,
    options: &GenerateOptions,
    sampler: &mut Sampler,
) -> Result<(Generation, String)> {
    let mut stream = TextStream::new(tokenizer);
    let mut text = String::new();
    let mut stdout = std::io::stdout().lock();
    let generation = generate(decoder, prompt_ids, cache, options, sampler, &mut |id| {
        if let Some(piece) = stream.push(id)? {
            stdout.write_all(piece.as_bytes())?;
            stdout.flush()?;
            text.push_str(&piece);
        }
        Ok(())
    })
    .context("generating")?;
    if let Some(rest) = stream.finish()? {
        stdout.write_all(rest.as_bytes())?;
        text.push_str(&rest);
    }
    // End the text's line so that the report on stderr starts on its own.
    writeln!(stdout).context("writing to stdout")?;
    stdout.flush().context("writing to stdout")?;
    Ok((generation, text))
}

/// The cache of a run: the packed cache, or the full-precision baseline.
enum RunCache {
    FullPrecision(FpCache),
    Packed(PackedCache),
}

impl RunCache {
    fn as_kv_cache(&mut self) -> &mut dyn KvCache {
        match self {
            RunCache::FullPrecision(c) => c,
            RunCache::Packed(c) => c,
        }
    }

    /// The bytes it holds now: exact for the packed cache ([`PackedCache::memory`]).
    fn memory(&self, shape: CacheShape) -> KvMemory {
        match self {
            RunCache::FullPrecision(c) => KvMemory::full_precision(shape, c.len()),
            RunCache::Packed(c) => KvMemory::packed(c.memory()),
        }
    }
}

fn print_summary(
    g: &Generation,
    held: &KvMemory,
    planned: &KvMemory,
    peak: Option<u64>,
    wall: f64,
) {
    eprintln!(
        "prompt: {} tokens prefilled in {:.2} s ({:.1} tokens/s)",
        g.prompt_tokens,
        g.prefill_seconds,
        g.prompt_tokens_per_second()
    );
    let stopped = match g.stop {
        StopReason::EndOfText => "end-of-text token",
        StopReason::MaxTokens => "--max-tokens reached",
    };
    match g.decode_tokens_per_second() {
        Some(tps) => eprintln!(
            "generated: {} tokens ({stopped}); {} decode steps in {:.2} s ({tps:.1} tokens/s); {wall:.2} s in all",
            g.tokens.len(),
            g.decode_steps,
            g.decode_seconds
        ),
        None => eprintln!(
            "generated: {} tokens ({stopped}); no decode step; {wall:.2} s in all",
            g.tokens.len()
        ),
    }
    eprintln!(
        "KV cache: {} tokens held in {} ({:.1} bytes/token), f16 cache of the same length {}: {}{}",
        held.tokens,
        human_bytes(held.bytes as u64),
        held.bytes_per_token,
        human_bytes(held.f16_bytes as u64),
        versus_f16(held.times_smaller_than_f16),
        match &held.breakdown {
            Some(r) => format!(
                " (codes {}, scales/zero-points {}, f16 residual {}, padding {})",
                human_bytes(r.code_bytes as u64),
                human_bytes(r.metadata_bytes as u64),
                human_bytes(r.residual_bytes as u64),
                human_bytes(r.padding_bytes as u64)
            ),
            None => " (f32 tensors)".to_string(),
        }
    );
    eprintln!(
        "KV cache at the full {} tokens: {} vs f16 {} ({})",
        planned.tokens,
        human_bytes(planned.bytes as u64),
        human_bytes(planned.f16_bytes as u64),
        versus_f16(planned.times_smaller_than_f16)
    );
    match peak {
        Some(b) => eprintln!("peak resident memory: {}", human_bytes(b)),
        None => eprintln!("peak resident memory: unknown (no /proc/self/status)"),
    }
}

/// "3.70× smaller" or, for a cache bigger than f16 (f32, or short contexts held in the f16
/// residual plus the code buffers' padding), "2.00× larger".
fn versus_f16(times_smaller: f64) -> String {
    if times_smaller >= 1.0 {
        format!("{times_smaller:.2}× smaller")
    } else {
        format!("{:.2}× larger", 1.0 / times_smaller)
    }
}

fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KIB {
        format!("{bytes} B")
    } else if b < KIB * KIB {
        format!("{:.1} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_words() {
        assert_eq!(versus_f16(3.7), "3.70× smaller");
        assert_eq!(versus_f16(0.5), "2.00× larger");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(5 << 30), "5.00 GiB");
    }

    #[test]
    fn full_precision_memory_is_f32() {
        let shape = CacheShape {
            layers: 2,
            kv_heads: 3,
            head_dim: 4,
        };
        let m = KvMemory::full_precision(shape, 10);
        assert_eq!(m.f16_bytes, 10 * 2 * 3 * 4 * 2 * 2);
        assert_eq!(m.bytes, 2 * m.f16_bytes);
        assert_eq!(m.times_smaller_than_f16, 0.5);
    }
}

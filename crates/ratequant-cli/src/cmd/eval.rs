//! `ratequant eval`: perplexity, KL divergence and top-1 agreement of a KV cache setting
//! against the full-precision cache, on a model and a text.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use ratequant::formats::Plan;
use ratequant::kvcache::AttentionKernel;
use ratequant_llm::eval::{evaluate, EvalOptions, EvalReport, Protocol, QuantSetting};
use ratequant_llm::kv_packed::{plan_units, uniform_units};
use ratequant_llm::{KvQuantPlan, KvSpec, SimSemantics};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model: an asset name (smollm2, qwen2.5-0.5b, gemma3-270m) or a path (.gguf file or
    /// Hugging Face directory).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Text: an asset name (botchan, brown, brown:a-h) or a path to a UTF-8 text file.
    #[arg(long, default_value = "botchan")]
    pub data: String,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most this many chunks (default: all that fit in the text).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// KV cache: `fp`, or DESIGN[:PARAMS]:BITS for every unit (`kivi:2`, `quarot:4`, `kivi:g=64:2`).
    #[arg(long, default_value = "fp", conflicts_with = "plan")]
    pub kv: String,
    /// Per-unit bit plan from `ratequant allocate` (its design and bits for every unit).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Keep, for each query, this many most recent keys and values in full precision.
    #[arg(long, default_value_t = 0)]
    pub residual: usize,
    /// What the simulated cache quantizes: `tile` (each unit's whole stored tile; KIVI keys'
    /// trailing partial group re-fitted; the window applies to keys and values) or `packed`
    /// (exactly what `generate`'s packed cache stores: KIVI keys by completed groups only).
    #[arg(long, default_value = "tile")]
    pub kv_semantics: SimSemantics,
    /// Instead of simulating, run the real packed cache that `generate` uses, with this
    /// attention kernel: `float` (equals `--kv-semantics packed` up to float rounding) or
    /// `int8` (integer kernels: measures what their 8-bit rounding costs).
    #[arg(long, value_parser = super::generate::parse_kernel)]
    pub packed_kernel: Option<AttentionKernel>,
    /// Headline perplexity protocol: `llama` (llama.cpp's: second half of each chunk scored)
    /// or `full` (every token but the first). Both are reported.
    #[arg(long, default_value = "llama")]
    pub protocol: Protocol,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    model: &'a str,
    model_source: &'a str,
    data: &'a str,
    kv: String,
    plan: Option<String>,
    residual: usize,
    kv_semantics: &'static str,
    /// Mean nominal bits per quantized unit.
    mean_bits: Option<f64>,
    #[serde(flatten)]
    report: &'a EvalReport,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if let Some(path) = &args.json {
        super::check_output_path(path, "--json")?;
    }
    let super::ModelAndTexts {
        decoder,
        config,
        source,
        tokens,
    } = super::load_model_and_texts(&args.model, &[args.data.as_str()], |_| Ok(()))?;
    let tokens = &tokens[0];

    let (kv_label, quant_plan) = match &args.plan {
        Some(path) => {
            let plan =
                Plan::load(path).with_context(|| format!("reading plan {}", path.display()))?;
            let kv = KvQuantPlan::from_plan(
                &plan,
                config.num_layers,
                config.num_kv_heads,
                config.head_dim,
            )
            .with_context(|| {
                format!(
                    "plan {} does not fit model `{}`",
                    path.display(),
                    args.model
                )
            })?;
            (
                format!(
                    "plan {} ({}, {} policy)",
                    path.display(),
                    plan.quantizer,
                    plan.policy
                ),
                Some(kv),
            )
        }
        None => {
            let spec = KvSpec::parse(&args.kv).map_err(anyhow::Error::msg)?;
            let plan = spec
                .plan(config.num_layers, config.num_kv_heads, config.head_dim)
                .with_context(|| format!("--kv {spec} cannot serve model `{}`", args.model))?;
            (spec.to_string(), plan)
        }
    };
    if quant_plan.is_none() && args.residual > 0 {
        eprintln!("note: --residual has no effect on the full-precision cache");
    }

    let chunk_count = (tokens.len() / args.ctx.max(1)).min(args.chunks.unwrap_or(usize::MAX));
    eprintln!(
        "model {} ({:?}: {} layers, {} heads / {} KV heads × {}), text `{}`: {} tokens, {} chunk(s) of {}",
        args.model,
        config.arch,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        args.data,
        tokens.len(),
        chunk_count,
        args.ctx
    );
    let bar = progress_bar(chunk_count as u64);
    let options = EvalOptions {
        ctx: args.ctx,
        max_chunks: args.chunks,
        protocol: args.protocol,
    };
    let packed = match args.packed_kernel {
        None => None,
        Some(_) if quant_plan.is_none() => {
            bail!("--packed-kernel needs a quantized cache (--kv DESIGN:BITS or --plan)")
        }
        Some(kernel) => {
            let units = match &args.plan {
                Some(path) => {
                    let plan = Plan::load(path)
                        .with_context(|| format!("reading plan {}", path.display()))?;
                    plan_units(&plan, config.num_layers, config.num_kv_heads)?
                }
                None => match KvSpec::parse(&args.kv).map_err(anyhow::Error::msg)? {
                    KvSpec::Uniform { quantizer, bits } => {
                        uniform_units(&quantizer, bits, config.num_layers, config.num_kv_heads)
                    }
                    KvSpec::FullPrecision => unreachable!("checked above"),
                },
            };
            Some((units, kernel))
        }
    };
    let quant = quant_plan.as_ref().map(|plan| QuantSetting {
        plan,
        residual: args.residual,
        semantics: args.kv_semantics,
        packed: packed.clone(),
    });
    let report = evaluate(&decoder, tokens, &options, quant, &mut |done, _| {
        if let Some(b) = &bar {
            b.set_position(done as u64);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    let kv_label = match (&quant_plan, args.kv_semantics, args.packed_kernel) {
        (Some(_), _, Some(k)) => format!("{kv_label}, packed cache, {} attention", k.name()),
        (Some(_), SimSemantics::Packed, None) => format!("{kv_label}, packed-cache semantics"),
        _ => kv_label,
    };
    print_report(&report, &kv_label, args.residual, quant_plan.as_ref());
    if let Some(path) = &args.json {
        let json = JsonReport {
            model: &args.model,
            model_source: &source,
            data: &args.data,
            kv: if args.plan.is_some() {
                "plan".into()
            } else {
                args.kv.clone()
            },
            plan: args.plan.as_ref().map(|p| p.display().to_string()),
            residual: args.residual,
            kv_semantics: match args.packed_kernel {
                Some(AttentionKernel::Float) => "packed-cache-float",
                Some(AttentionKernel::Int8) => "packed-cache-int8",
                None => args.kv_semantics.as_str(),
            },
            mean_bits: quant_plan.as_ref().and_then(KvQuantPlan::mean_bits),
            report: &report,
        };
        ratequant::atomic::write_json_atomic(path, &json)
            .with_context(|| format!("writing --json {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} chunks, {elapsed} elapsed, ~{eta} left",
        )
        .expect("static template"),
    );
    Some(bar)
}

fn print_report(r: &EvalReport, kv_label: &str, residual: usize, plan: Option<&KvQuantPlan>) {
    let line = |name: &str, p: &ratequant_llm::eval::PerplexitySummary| {
        println!(
            "  {name:<28} {:>10.4} ± {:.4}  ({} tokens scored)",
            p.perplexity, p.stderr, p.tokens
        );
    };
    match plan.and_then(KvQuantPlan::mean_bits) {
        Some(bits) => {
            println!("KV cache: {kv_label}, mean {bits:.3} bits per unit, residual {residual}")
        }
        None => println!("KV cache: {kv_label}"),
    }
    println!(
        "perplexity ({}), {} chunks of {} tokens:",
        r.protocol_description, r.chunks, r.ctx
    );
    line("this cache", &r.perplexity);
    if let Some(fp) = &r.fp_perplexity {
        line("full-precision cache", fp);
    }
    println!("both protocols for this cache:");
    line("llama.cpp (second half)", &r.perplexity_llama);
    line("full chunk", &r.perplexity_full);
    if let Some(d) = &r.divergence {
        println!(
            "against the full-precision cache: mean KL {:.5}, p99 KL {:.5}, top-1 agreement {:.2}% ({} tokens)",
            d.mean_kl,
            d.p99_kl,
            100.0 * d.top1_agreement,
            d.tokens
        );
    }
    match r.fp_tokens_per_second {
        Some(fp) => println!(
            "throughput: {:.1} tokens/s (full-precision cache: {:.1} tokens/s)",
            r.tokens_per_second, fp
        ),
        None => println!("throughput: {:.1} tokens/s", r.tokens_per_second),
    }
}

//! `ratequant sweep`: calibrate (or reuse a calibration), then for every design × budget ×
//! policy allocate a plan and evaluate it against the full-precision cache; write the results,
//! the report and the figures. Completed cells are journaled, so an interrupted sweep resumes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use ratequant::bits::BitList;
use ratequant::formats::{Calib, Plan};
use ratequant::plan::{make_plan, PlanOptions, Policy};
use ratequant::quant::QuantizerSpec;
use ratequant_llm::eval::{chunk_tokens, percentile, score_chunk, NllStats, Protocol};
use ratequant_llm::sysmem::available_memory;
use ratequant_llm::text::TextSpec;
use ratequant_llm::{Decoder, FpCache, KvCache, KvQuantPlan, SimQuantCache};

use super::calibrate::{
    calibrate_designs, design_label, fit_options, parse_designs, progress_bar, CalibrationSettings,
};
use crate::sweep::journal::{write_atomic, Cell, CellResult, Journal, Opened};
use crate::sweep::report::{self, DesignFit, PlanBits, ReportInput, UnitFit};

/// Policies the sweep knows. `mismatched` plans with every other design's fitted model;
/// `weighted` is ours: the fitted model of the Fisher-importance-weighted distortion.
pub const SWEEP_POLICIES: &[&str] = &[
    "uniform",
    "textbook",
    "mismatched",
    "ratequant",
    "empirical",
    "weighted",
];

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// Model: an asset name (smollm2, qwen2.5-0.5b, gemma3-270m) or a path.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Calibration text (must not overlap the evaluation text).
    #[arg(long, default_value = "brown:a-h")]
    pub calib_data: String,
    /// Evaluation text.
    #[arg(long, default_value = "botchan")]
    pub eval_data: String,
    /// Quantizer designs, comma-separated.
    #[arg(long, default_value = "kivi,quarot,rtn-token")]
    pub quantizer: String,
    /// Average bits per element (codes only), comma-separated.
    #[arg(long, default_value = "2,2.5,3,4")]
    pub avg_bits: String,
    /// Policies, comma-separated: uniform, textbook, mismatched, ratequant, empirical, weighted.
    #[arg(
        long,
        default_value = "uniform,textbook,mismatched,ratequant,empirical"
    )]
    pub policy: String,
    /// Evaluation tokens per chunk.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Evaluate at most this many chunks (default: all that fit in the text).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 16)]
    pub sequences: usize,
    /// Tokens per calibration sequence (default: --ctx).
    #[arg(long)]
    pub calib_ctx: Option<usize>,
    /// Bit-widths a plan may use.
    #[arg(long, default_value = "1-8")]
    pub allowed: String,
    /// Bit-widths measured during calibration.
    #[arg(long, default_value = "1-8")]
    pub bits: String,
    /// Bit-widths the model is fitted on.
    #[arg(long, default_value = "1-4")]
    pub fit_bits: String,
    /// Keep, for each query, this many most recent keys and values in full precision.
    #[arg(long, default_value_t = 0)]
    pub residual: usize,
    /// Budget whose plans are drawn as layer × head heatmaps (default: 2.5 if swept, else the first).
    #[arg(long)]
    pub heatmap_bits: Option<f64>,
    /// Output directory (results, report, figures, journal, calibration).
    #[arg(long)]
    pub out: PathBuf,
}

/// Everything a sweep needs once the model and texts are loaded.
pub struct SweepSetup {
    pub specs: Vec<QuantizerSpec>,
    pub budgets: Vec<f64>,
    pub policies: Vec<String>,
    pub allowed: BitList,
    pub calibration: CalibrationSettings,
    pub ctx: usize,
    pub chunks: Option<usize>,
    pub residual: usize,
    pub heatmap_bits: Option<f64>,
    pub out: PathBuf,
    /// The arguments that determine every cell's result (the journal's key).
    pub key: serde_json::Value,
    /// The arguments that determine the calibration (the calibration's key).
    pub calib_key: serde_json::Value,
    /// Shown at the top of the report.
    pub command: String,
}

fn parse_list<T>(list: &str, what: &str, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let items: Vec<T> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).with_context(|| format!("{what} `{s}`")))
        .collect::<Result<_>>()?;
    if items.is_empty() {
        bail!("{what} is empty");
    }
    Ok(items)
}

impl SweepSetup {
    pub fn from_args(args: &SweepArgs) -> Result<SweepSetup> {
        let specs = parse_designs(&args.quantizer)?;
        let budgets = parse_list(&args.avg_bits, "--avg-bits", |s| {
            let b: f64 = s.parse().map_err(|_| anyhow::anyhow!("not a number"))?;
            if !b.is_finite() || b <= 0.0 {
                bail!("must be a positive number of bits");
            }
            Ok(b)
        })?;
        let policies = parse_list(&args.policy, "--policy", |s| {
            if SWEEP_POLICIES.contains(&s) {
                Ok(s.to_string())
            } else {
                bail!("unknown policy (known: {})", SWEEP_POLICIES.join(", "))
            }
        })?;
        let allowed = BitList::parse(&args.allowed).context("--allowed")?;
        if let Some(b) = budgets
            .iter()
            .find(|&&b| b < allowed.min() as f64 || b > allowed.max() as f64)
        {
            bail!("--avg-bits {b} is outside the allowed bits {allowed}");
        }
        let fit = fit_options(&args.bits, &args.fit_bits, "shared", "mse")?;
        let calib_ctx = args.calib_ctx.unwrap_or(args.ctx);
        let calib_key = serde_json::json!({
            "model": args.model,
            "calib_data": args.calib_data,
            "sequences": args.sequences,
            "calib_ctx": calib_ctx,
            "bits": fit.measured_bits.to_string(),
            "fit_bits": fit.fit_bits.to_string(),
        });
        let key = serde_json::json!({
            "sweep_version": 1,
            "calibration": calib_key,
            "eval_data": args.eval_data,
            "ctx": args.ctx,
            "chunks": args.chunks,
            "allowed": allowed.to_string(),
            "residual": args.residual,
            "protocol": "llama",
        });
        let command = std::iter::once("ratequant".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(SweepSetup {
            specs,
            budgets,
            policies,
            allowed,
            calibration: CalibrationSettings {
                sequences: args.sequences,
                ctx: calib_ctx,
                fit,
            },
            ctx: args.ctx,
            chunks: args.chunks,
            residual: args.residual,
            heatmap_bits: args.heatmap_bits,
            out: args.out.clone(),
            key,
            calib_key,
            command,
        })
    }

    /// Every requested cell, baseline first, in report order (design, budget, policy).
    pub fn cells(&self) -> Vec<Cell> {
        let labels: Vec<String> = self.specs.iter().map(design_label).collect();
        let mut cells = vec![Cell::baseline()];
        for design in &labels {
            for &budget in &self.budgets {
                for policy in &self.policies {
                    if policy == "mismatched" {
                        for other in labels.iter().filter(|o| *o != design) {
                            cells.push(Cell {
                                design: design.clone(),
                                budget,
                                policy: policy.clone(),
                                from: Some(other.clone()),
                            });
                        }
                    } else {
                        cells.push(Cell {
                            design: design.clone(),
                            budget,
                            policy: policy.clone(),
                            from: None,
                        });
                    }
                }
            }
        }
        cells
    }
}

/// The calibrations a sweep uses, per design label.
pub struct SweepCalibration {
    pub calibs: Vec<(String, Calib)>,
    pub weighted: Vec<(String, Calib)>,
    pub timings: Vec<(String, f64)>,
}

impl SweepCalibration {
    fn get(&self, label: &str) -> Result<&Calib> {
        self.calibs
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, c)| c)
            .with_context(|| format!("no calibration for `{label}`"))
    }
    fn get_weighted(&self, label: &str) -> Result<&Calib> {
        self.weighted
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, c)| c)
            .with_context(|| format!("no weighted calibration for `{label}`"))
    }
}

#[derive(Serialize, Deserialize)]
struct CalibManifest {
    key: serde_json::Value,
    designs: Vec<String>,
    weighted: bool,
    timings: Vec<(String, f64)>,
}

const CALIB_DIR: &str = "calib";
const MANIFEST: &str = "manifest.json";

/// Loads `out/calib` if it was made with the same calibration arguments and holds every
/// requested design; `None` otherwise.
fn load_calibration(
    dir: &Path,
    key: &serde_json::Value,
    labels: &[String],
    weighted: bool,
) -> Option<SweepCalibration> {
    let manifest: CalibManifest =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).ok()?).ok()?;
    if &manifest.key != key
        || (weighted && !manifest.weighted)
        || labels.iter().any(|l| !manifest.designs.contains(l))
    {
        return None;
    }
    let mut out = SweepCalibration {
        calibs: Vec::new(),
        weighted: Vec::new(),
        timings: manifest.timings,
    };
    for l in labels {
        out.calibs
            .push((l.clone(), Calib::load(dir.join(format!("{l}.json"))).ok()?));
        if weighted {
            out.weighted.push((
                l.clone(),
                Calib::load(dir.join(format!("{l}.weighted.json"))).ok()?,
            ));
        }
    }
    Some(out)
}

fn calibrate_or_reuse(
    decoder: &Decoder,
    calib_tokens: &[u32],
    setup: &SweepSetup,
) -> Result<SweepCalibration> {
    let dir = setup.out.join(CALIB_DIR);
    let labels: Vec<String> = setup.specs.iter().map(design_label).collect();
    let weighted = setup.policies.iter().any(|p| p == "weighted");
    if let Some(c) = load_calibration(&dir, &setup.calib_key, &labels, weighted) {
        eprintln!("reusing the calibration in {}", dir.display());
        return Ok(c);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let calibrated = calibrate_designs(
        decoder,
        calib_tokens,
        &setup.specs,
        &setup.calibration,
        weighted,
        false,
    )?;
    for (label, _, calib) in &calibrated.calibs {
        calib.save(dir.join(format!("{label}.json")))?;
    }
    for (label, calib) in &calibrated.weighted {
        calib.save(dir.join(format!("{label}.weighted.json")))?;
    }
    let manifest = CalibManifest {
        key: setup.calib_key.clone(),
        designs: labels,
        weighted,
        timings: calibrated.timings.clone(),
    };
    write_atomic(
        &dir.join(MANIFEST),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    for (label, _, c) in &calibrated.calibs {
        eprintln!(
            "{label}: β = {:.3}, R² = {}",
            c.beta,
            c.r2.map_or("undefined".into(), |r| format!("{r:.4}"))
        );
    }
    Ok(SweepCalibration {
        calibs: calibrated
            .calibs
            .into_iter()
            .map(|(l, _, c)| (l, c))
            .collect(),
        weighted: calibrated.weighted,
        timings: calibrated.timings,
    })
}

/// The plan of one cell.
fn plan_for(cell: &Cell, calibration: &SweepCalibration, allowed: &BitList) -> Result<Plan> {
    let calib = calibration.get(&cell.design)?;
    fn opts<'a>(
        cell: &Cell,
        allowed: &BitList,
        policy: Policy,
        from: Option<&'a Calib>,
    ) -> PlanOptions<'a> {
        PlanOptions {
            avg_bits: cell.budget,
            allowed: allowed.clone(),
            policy,
            distortion_from: from,
        }
    }
    let plan = match cell.policy.as_str() {
        "mismatched" => {
            let from = calibration.get(
                cell.from
                    .as_deref()
                    .context("a mismatched cell names its source design")?,
            )?;
            make_plan(calib, &opts(cell, allowed, Policy::Ratequant, Some(from)))?
        }
        "weighted" => make_plan(
            calibration.get_weighted(&cell.design)?,
            &opts(cell, allowed, Policy::Ratequant, None),
        )?,
        other => make_plan(calib, &opts(cell, allowed, other.parse::<Policy>()?, None))?,
    };
    Ok(plan)
}

/// Metrics of one cache setting over the evaluation chunks.
struct Measured {
    nll: NllStats,
    kl: Vec<f64>,
    agree: usize,
}

impl Measured {
    fn new() -> Self {
        Measured {
            nll: NllStats::default(),
            kl: Vec::new(),
            agree: 0,
        }
    }
    fn into_result(mut self, cell: Cell, seconds: f64) -> CellResult {
        let n = self.kl.len().max(1) as f64;
        CellResult {
            cell,
            achieved_bits: f64::NAN,
            effective_bits: f64::NAN,
            predicted_objective: None,
            perplexity: self.nll.perplexity(),
            perplexity_se: self.nll.perplexity_stderr(),
            kl_mean: self.kl.iter().sum::<f64>() / n,
            kl_p99: percentile(&mut self.kl, 0.99),
            top1: self.agree as f64 / n,
            seconds,
            error: None,
        }
    }
}

fn failed(cell: Cell, error: String) -> CellResult {
    CellResult {
        cell,
        achieved_bits: f64::NAN,
        effective_bits: f64::NAN,
        predicted_objective: None,
        perplexity: f64::NAN,
        perplexity_se: f64::NAN,
        kl_mean: f64::NAN,
        kl_p99: f64::NAN,
        top1: f64::NAN,
        seconds: 0.0,
        error: Some(error),
    }
}

pub fn run(args: SweepArgs) -> Result<()> {
    let setup = SweepSetup::from_args(&args)?;
    let (calib_spec, eval_spec) = (
        TextSpec::parse(&args.calib_data),
        TextSpec::parse(&args.eval_data),
    );
    if let (Ok(c), Ok(e)) = (&calib_spec, &eval_spec) {
        if !c.is_disjoint_from(e) {
            eprintln!(
                "warning: calibration text `{}` and evaluation text `{}` may overlap: the results would be optimistic",
                args.calib_data, args.eval_data
            );
        }
    }
    let loaded = super::load_model_and_texts(
        &args.model,
        &[args.calib_data.as_str(), args.eval_data.as_str()],
        |config| super::calibrate::build_designs(&setup.specs, config).map(drop),
    )?;
    let (calib_tokens, eval_tokens) = (&loaded.tokens[0], &loaded.tokens[1]);
    run_sweep(&loaded.decoder, calib_tokens, eval_tokens, &setup)
}

/// The sweep proper, on a loaded decoder and tokenized texts.
pub fn run_sweep(
    decoder: &Decoder,
    calib_tokens: &[u32],
    eval_tokens: &[u32],
    setup: &SweepSetup,
) -> Result<()> {
    let config = decoder.config();
    std::fs::create_dir_all(&setup.out)
        .with_context(|| format!("creating {}", setup.out.display()))?;
    let bos = if config.add_bos {
        config.bos_token_id
    } else {
        None
    };
    let chunks =
        chunk_tokens(eval_tokens, setup.ctx, setup.chunks, bos).context("evaluation text")?;
    let calibration = calibrate_or_reuse(decoder, calib_tokens, setup)?;

    let (mut journal, opened) = Journal::open(&setup.out, &setup.key)?;
    match &opened {
        Opened::New => {}
        Opened::Resumed { cells } => eprintln!("resuming: {cells} cell(s) already done"),
        Opened::Invalidated { moved_to } => {
            eprintln!(
                "the sweep's arguments changed: previous results moved to {}",
                moved_to.display()
            )
        }
    }
    let cells = setup.cells();
    let pending: Vec<&Cell> = cells.iter().filter(|c| journal.get(c).is_none()).collect();
    if !pending.is_empty() {
        // The full-precision logits of every chunk, computed once and reused by every cell.
        let logits_bytes = (chunks.len() * setup.ctx * config.vocab_size * 4) as u64;
        if let Some(avail) = available_memory() {
            if logits_bytes > avail / 2 {
                bail!(
                    "keeping the full-precision logits of {} chunks needs {:.1} GiB, more than half of the {:.1} GiB available; use fewer --chunks",
                    chunks.len(),
                    logits_bytes as f64 / (1u64 << 30) as f64,
                    avail as f64 / (1u64 << 30) as f64
                );
            }
        }
        let bar = progress_bar(((pending.len() + 1) * chunks.len()) as u64, "evaluating");
        bar.set_message("full-precision reference");
        let t0 = Instant::now();
        let mut fp_cache = FpCache::new(config.num_layers);
        let mut reference = Vec::with_capacity(chunks.len());
        let mut baseline = Measured::new();
        let scored = Protocol::Llama.scored_positions(setup.ctx);
        for chunk in &chunks {
            fp_cache.reset();
            let logits = decoder.forward(chunk, &mut fp_cache)?;
            let scores = score_chunk(chunk, &logits, None)?;
            scores.nll[scored.clone()]
                .iter()
                .for_each(|&n| baseline.nll.push(n));
            reference.push(logits);
            bar.inc(1);
        }
        let fp_seconds = t0.elapsed().as_secs_f64();
        if journal.get(&Cell::baseline()).is_none() {
            let mut r = baseline.into_result(Cell::baseline(), fp_seconds);
            (r.kl_mean, r.kl_p99, r.top1) = (0.0, 0.0, 1.0);
            journal.append(r)?;
        }
        for cell in pending.iter().filter(|c| !c.is_baseline()) {
            bar.set_message(cell.label());
            let t0 = Instant::now();
            let result = match plan_for(cell, &calibration, &setup.allowed) {
                Err(e) => {
                    bar.inc(chunks.len() as u64);
                    failed((*cell).clone(), format!("{e:#}"))
                }
                Ok(plan) => {
                    let kv = KvQuantPlan::from_plan(
                        &plan,
                        config.num_layers,
                        config.num_kv_heads,
                        config.head_dim,
                    )?;
                    let mut cache = SimQuantCache::new(kv, setup.residual);
                    let mut m = Measured::new();
                    for (chunk, fp_logits) in chunks.iter().zip(&reference) {
                        cache.reset();
                        let logits = decoder.forward(chunk, &mut cache)?;
                        let scores = score_chunk(chunk, &logits, Some(fp_logits))?;
                        scores.nll[scored.clone()]
                            .iter()
                            .for_each(|&n| m.nll.push(n));
                        m.kl.extend_from_slice(&scores.kl[scored.clone()]);
                        m.agree += scores.top1_agree[scored.clone()]
                            .iter()
                            .filter(|&&a| a)
                            .count();
                        bar.inc(1);
                    }
                    let mut r = m.into_result((*cell).clone(), t0.elapsed().as_secs_f64());
                    r.achieved_bits = plan.achieved_mean_bits;
                    r.effective_bits = plan.effective_bits_per_element;
                    r.predicted_objective = Some(plan.objective.plan);
                    r
                }
            };
            journal.append(result)?;
            write_outputs(setup, &calibration, &journal, &cells)?;
        }
        bar.finish_and_clear();
    }
    write_outputs(setup, &calibration, &journal, &cells)?;
    print_summary(&journal, &cells);
    println!("wrote {}", setup.out.join("report.md").display());
    Ok(())
}

/// The report's view of a calibration.
fn design_fit(label: &str, calib: &Calib) -> DesignFit {
    DesignFit {
        design: label.to_string(),
        beta: calib.beta,
        r2: calib.r2.unwrap_or(f64::NAN),
        measured_bits: calib.measured_bits.as_slice().to_vec(),
        fit_bits: calib.fit_bits.as_slice().to_vec(),
        units: calib
            .units
            .iter()
            .map(|u| UnitFit {
                layer: u.layer,
                head: u.head,
                kind: u.kind.as_str().to_string(),
                // The table the model was fitted to (MSE, or the weighted error).
                distortion: calib.target_table(u).to_vec(),
                alpha: u.alpha,
                r2: u.r2.unwrap_or(f64::NAN),
            })
            .collect(),
    }
}

fn write_outputs(
    setup: &SweepSetup,
    calibration: &SweepCalibration,
    journal: &Journal,
    cells: &[Cell],
) -> Result<()> {
    let mut fits: Vec<DesignFit> = calibration
        .calibs
        .iter()
        .map(|(l, c)| design_fit(l, c))
        .collect();
    fits.extend(
        calibration
            .weighted
            .iter()
            .map(|(l, c)| design_fit(&format!("{l}.weighted"), c)),
    );
    // Results in the requested order; cells of earlier sweeps in the same journal are kept out.
    let results: Vec<CellResult> = cells
        .iter()
        .filter_map(|c| journal.get(c).cloned())
        .collect();
    let heat_budget = setup
        .heatmap_bits
        .or_else(|| setup.budgets.iter().copied().find(|&b| b == 2.5))
        .unwrap_or(setup.budgets[0]);
    let heat_policy = ["ratequant", "empirical", "textbook", "uniform"]
        .into_iter()
        .find(|p| setup.policies.iter().any(|q| q == p))
        .unwrap_or("uniform");
    let mut heatmaps = Vec::new();
    for (label, _) in &calibration.calibs {
        let cell = Cell {
            design: label.clone(),
            budget: heat_budget,
            policy: heat_policy.into(),
            from: None,
        };
        if let Ok(plan) = plan_for(&cell, calibration, &setup.allowed) {
            heatmaps.push(PlanBits {
                design: label.clone(),
                budget: heat_budget,
                policy: heat_policy.into(),
                units: plan
                    .units
                    .iter()
                    .map(|u| (u.layer, u.head, u.kind.as_str().to_string(), u.bits))
                    .collect(),
            });
        }
    }
    let input = ReportInput {
        command: setup.command.clone(),
        args: &setup.key,
        fits: &fits,
        heatmaps: &heatmaps,
        results: &results,
        calibration_timings: &calibration.timings,
    };
    report::write_all(&setup.out, &input)
}

fn print_summary(journal: &Journal, cells: &[Cell]) {
    println!(
        "{:<12} {:>5} {:<24} {:>10} {:>9} {:>8}",
        "design", "bits", "policy", "ppl", "KL", "top-1"
    );
    for c in cells {
        if let Some(r) = journal.get(c) {
            if let Some(e) = &r.error {
                println!(
                    "{:<12} {:>5} {:<24} error: {e}",
                    c.design,
                    c.budget,
                    c.policy_label()
                );
            } else {
                println!(
                    "{:<12} {:>5} {:<24} {:>10.3} {:>9.4} {:>7.2}%",
                    c.design,
                    c.budget,
                    c.policy_label(),
                    r.perplexity,
                    r.kl_mean,
                    100.0 * r.top1
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
    use ratequant_llm::{Arch, RopeLayout};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SweepArgs,
    }

    fn args(extra: &[&str], out: &Path) -> SweepArgs {
        let mut argv = vec![
            "sweep",
            "--out",
            out.to_str().unwrap(),
            "--ctx",
            "16",
            "--sequences",
            "2",
            "--chunks",
            "2",
        ];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    fn tiny() -> (Decoder, Vec<u32>, Vec<u32>) {
        let config = tiny_config(Arch::Llama, RopeLayout::Halves);
        let weights = random_weights(&config, 21).unwrap();
        let decoder = Decoder::new(&config, &weights).unwrap();
        let mut rng = SplitMix64::new(9);
        let mut text = |n: usize| {
            (0..n)
                .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
                .collect::<Vec<_>>()
        };
        let calib = text(40);
        let eval = text(40);
        (decoder, calib, eval)
    }

    #[test]
    fn cells_expand_mismatched_to_every_other_design() {
        let dir = tempfile::tempdir().unwrap();
        let setup = SweepSetup::from_args(&args(
            &[
                "--quantizer",
                "kivi,quarot,rtn-token",
                "--avg-bits",
                "2,3",
                "--policy",
                "uniform,mismatched",
            ],
            dir.path(),
        ))
        .unwrap();
        let cells = setup.cells();
        // Baseline + 3 designs × 2 budgets × (uniform + 2 mismatched).
        assert_eq!(cells.len(), 1 + 3 * 2 * 3);
        assert!(cells[0].is_baseline());
        let kivi_mismatch: Vec<_> = cells
            .iter()
            .filter(|c| c.design == "kivi" && c.policy == "mismatched" && c.budget == 2.0)
            .map(|c| c.from.clone().unwrap())
            .collect();
        assert_eq!(kivi_mismatch, ["quarot", "rtn-token"]);
        let bad = SweepSetup::from_args(&args(&["--policy", "uniform,bogus"], dir.path()))
            .err()
            .unwrap();
        assert!(format!("{bad:#}").contains("unknown policy"));
        let bad = SweepSetup::from_args(&args(&["--avg-bits", "9"], dir.path()))
            .err()
            .unwrap();
        assert!(format!("{bad:#}").contains("outside the allowed bits"));
    }

    #[test]
    fn sweep_writes_results_and_resumes_without_recomputing() {
        let (decoder, calib, eval) = tiny();
        let dir = tempfile::tempdir().unwrap();
        let a = args(
            &[
                "--quantizer",
                "kivi:g=8,rtn-token",
                "--avg-bits",
                "2,3",
                "--policy",
                "uniform,ratequant,mismatched,weighted",
            ],
            dir.path(),
        );
        let setup = SweepSetup::from_args(&a).unwrap();
        run_sweep(&decoder, &calib, &eval, &setup).unwrap();

        let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
        // Header + baseline + 2 designs × 2 budgets × (uniform, ratequant, 1 mismatched, weighted).
        assert_eq!(csv.lines().count(), 1 + 1 + 2 * 2 * 4, "{csv}");
        assert!(csv.contains("kivi-g8,2,mismatched,rtn-token,"), "{csv}");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap())
                .unwrap();
        let results = json["results"].as_array().unwrap();
        for r in results {
            assert!(r["error"].is_null(), "{r}");
            let ppl = r["perplexity"].as_f64().unwrap();
            assert!(ppl.is_finite() && ppl > 1.0, "{r}");
            let budget = r["cell"]["budget"].as_f64().unwrap();
            if r["cell"]["policy"] != "fp" {
                assert_eq!(
                    r["achieved_bits"].as_f64().unwrap(),
                    budget,
                    "budgets are met exactly: {r}"
                );
            }
        }
        let fp = &results[0];
        assert_eq!(fp["cell"]["policy"], "fp");
        assert_eq!(fp["top1"].as_f64().unwrap(), 1.0);
        for f in [
            "report.md",
            "figures/distortion-kivi-g8.svg",
            "figures/ppl-rtn-token.svg",
            "figures/bits-kivi-g8-2-ratequant.svg",
        ] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let journal = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert_eq!(journal.lines().count(), 1 + 1 + 16);

        // Same arguments again: nothing is recomputed (the journal is unchanged) and the
        // calibration is reused.
        let calib_before = std::fs::read(dir.path().join("calib/kivi-g8.json")).unwrap();
        run_sweep(&decoder, &calib, &eval, &setup).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap(),
            journal
        );
        assert_eq!(
            std::fs::read(dir.path().join("calib/kivi-g8.json")).unwrap(),
            calib_before
        );

        // One more budget: only its cells run, the earlier ones are kept.
        let more = args(
            &[
                "--quantizer",
                "kivi:g=8,rtn-token",
                "--avg-bits",
                "2,3,4",
                "--policy",
                "uniform,ratequant,mismatched,weighted",
            ],
            dir.path(),
        );
        run_sweep(
            &decoder,
            &calib,
            &eval,
            &SweepSetup::from_args(&more).unwrap(),
        )
        .unwrap();
        let extended = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert!(extended.starts_with(&journal));
        assert_eq!(extended.lines().count(), journal.lines().count() + 2 * 4);

        // A changed result-determining argument (the residual window) invalidates everything.
        let changed = args(
            &[
                "--quantizer",
                "kivi:g=8,rtn-token",
                "--avg-bits",
                "2",
                "--policy",
                "uniform",
                "--residual",
                "4",
            ],
            dir.path(),
        );
        run_sweep(
            &decoder,
            &calib,
            &eval,
            &SweepSetup::from_args(&changed).unwrap(),
        )
        .unwrap();
        assert!(dir.path().join("journal.jsonl.stale-1").is_file());
        let fresh = std::fs::read_to_string(dir.path().join("journal.jsonl")).unwrap();
        assert_eq!(fresh.lines().count(), 1 + 1 + 2);
    }
}

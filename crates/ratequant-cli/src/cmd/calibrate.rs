//! `ratequant calibrate`: capture a model's K/V and Fisher importance on calibration text, then
//! measure and fit every requested design with the same code path as `ratequant fit`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use ratequant::bits::BitList;
use ratequant::distortion::UnitTiles;
use ratequant::fit::{calibrate_timed, FitOptions};
use ratequant::formats::{BetaMode, Calib, DistortionTarget};
use ratequant::kvfile::write_kv_file;
use ratequant::plan::{make_plan, PlanOptions, Policy};
use ratequant::quant::{self, Quantizer, QuantizerSpec};
use ratequant_llm::calibrate::{
    calibration_sequences, capture, check_memory, estimate_memory, CalibrateError,
};
use ratequant_llm::sysmem::available_memory;
use ratequant_llm::{Decoder, ModelConfig};

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Model: an asset name (smollm2, qwen2.5-0.5b, gemma3-270m) or a path (.gguf file or
    /// Hugging Face directory).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Calibration text: an asset (`brown:a-h` = Brown corpus genres a–h, `botchan`) or a path.
    #[arg(long, default_value = "brown:a-h")]
    pub data: String,
    /// Number of calibration sequences.
    #[arg(long, default_value_t = 16)]
    pub sequences: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Quantizer designs, comma-separated (`kivi,quarot,rtn-token`, `kivi:g=64`).
    #[arg(long, default_value = "kivi,quarot,rtn-token")]
    pub quantizer: String,
    /// Bit-widths to measure.
    #[arg(long, default_value = "1-8")]
    pub bits: String,
    /// Bit-widths the model is fitted on.
    #[arg(long, default_value = "1-4")]
    pub fit_bits: String,
    /// One β per design (`shared`, the paper's model) or one per unit (`per-unit`).
    #[arg(long, default_value = "shared", value_parser = ["shared", "per-unit"])]
    pub beta: String,
    /// Distortion to fit: `mse`, or `weighted` (Fisher-importance-weighted squared error).
    #[arg(long, default_value = "mse", value_parser = ["mse", "weighted"])]
    pub distortion: String,
    /// Output directory: one CALIB.json per design, `DIR/<design>.json`.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the captured K/V and importances as `DIR/kv.safetensors` (the layout
    /// `ratequant fit --kv` reads).
    #[arg(long)]
    pub dump_kv: bool,
}

/// Splits `kivi,quarot:g=32,rtn-token` into specs; a piece like `g=64` without a design
/// continues the previous spec's parameters.
pub fn parse_designs(list: &str) -> Result<Vec<QuantizerSpec>> {
    let mut pieces: Vec<String> = Vec::new();
    for piece in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pieces.last_mut() {
            Some(prev) if piece.contains('=') && !piece.contains(':') => {
                prev.push(',');
                prev.push_str(piece);
            }
            _ => pieces.push(piece.to_string()),
        }
    }
    if pieces.is_empty() {
        bail!("--quantizer names no design");
    }
    let specs = pieces
        .iter()
        .map(|p| QuantizerSpec::parse(p).with_context(|| format!("--quantizer `{p}`")))
        .collect::<Result<Vec<_>>>()?;
    for (i, s) in specs.iter().enumerate() {
        if specs[..i].contains(s) {
            bail!("--quantizer names `{s}` twice");
        }
    }
    Ok(specs)
}

/// File-name-safe label of a design: `kivi`, `kivi-g64`.
pub fn design_label(spec: &QuantizerSpec) -> String {
    match spec.group {
        Some(g) => format!("{}-g{g}", spec.name),
        None => spec.name.clone(),
    }
}

/// What a calibration run needs besides the model.
#[derive(Debug, Clone)]
pub struct CalibrationSettings {
    pub sequences: usize,
    pub ctx: usize,
    pub fit: FitOptions,
}

/// Every design's calibration, with the phase timings.
pub struct Calibrated {
    /// `(design label, spec, calib)` in the requested order.
    pub calibs: Vec<(String, QuantizerSpec, Calib)>,
    /// Importance-weighted fits (`DistortionTarget::Weighted`), when asked for.
    pub weighted: Vec<(String, Calib)>,
    pub timings: Vec<(String, f64)>,
    pub units: Option<Vec<UnitTiles>>,
}

/// Builds each design and checks it can serve the model's heads (before any expensive work).
pub fn build_designs(
    specs: &[QuantizerSpec],
    config: &ModelConfig,
) -> Result<Vec<Box<dyn Quantizer>>> {
    specs
        .iter()
        .map(|s| {
            let q = quant::build(s)?;
            q.check_head_dim(config.head_dim).with_context(|| {
                format!(
                    "quantizer `{s}` cannot serve this model (head_dim {})",
                    config.head_dim
                )
            })?;
            Ok(q)
        })
        .collect()
}

/// Captures K/V + importance from `text` and fits every design (MSE target, plus the weighted
/// target when `also_weighted`). Keeps the captured units when `keep_units` (for `--dump-kv`).
pub fn calibrate_designs(
    decoder: &Decoder,
    tokens: &[u32],
    specs: &[QuantizerSpec],
    settings: &CalibrationSettings,
    also_weighted: bool,
    keep_units: bool,
) -> Result<Calibrated> {
    let config = decoder.config();
    let designs = build_designs(specs, config)?;
    if settings.ctx > config.max_position {
        return Err(CalibrateError::ContextTooLarge {
            ctx: settings.ctx,
            max: config.max_position,
        }
        .into());
    }
    let bos = if config.add_bos {
        Some(config.bos_token_id.ok_or(CalibrateError::MissingBos)?)
    } else {
        None
    };
    let sequences = calibration_sequences(tokens, settings.ctx, settings.sequences, bos)?;
    let estimate = estimate_memory(config, settings.sequences, settings.ctx);
    check_memory(&estimate, available_memory())?;

    let bar = progress_bar(sequences.len() as u64, "capturing K/V and gradients");
    let cap = capture(decoder, &sequences, &mut |done, _| {
        bar.set_position(done as u64)
    })
    .context("calibration forward/backward")?;
    bar.finish_and_clear();
    let mut timings = vec![
        ("forward".to_string(), cap.timings.forward_s),
        ("backward".to_string(), cap.timings.backward_s),
    ];
    eprintln!(
        "captured {} sequences × {} tokens: forward {:.2} s, backward {:.2} s, mean next-token loss {:.3}",
        cap.sequences, cap.tokens, cap.timings.forward_s, cap.timings.backward_s, cap.mean_loss
    );
    let units = cap.into_units(true);

    let mut calibs = Vec::new();
    let mut weighted = Vec::new();
    let (mut distortion_s, mut fit_s) = (0.0, 0.0);
    for (spec, q) in specs.iter().zip(&designs) {
        let label = design_label(spec);
        let (calib, t) = calibrate_timed(&units, q.as_ref(), &settings.fit)
            .with_context(|| format!("fitting `{spec}`"))?;
        distortion_s += t.distortion_s;
        fit_s += t.fit_s;
        if also_weighted && settings.fit.target != DistortionTarget::Weighted {
            let opts = FitOptions {
                target: DistortionTarget::Weighted,
                ..settings.fit.clone()
            };
            let (w, t) = calibrate_timed(&units, q.as_ref(), &opts)
                .with_context(|| format!("fitting `{spec}` (weighted)"))?;
            distortion_s += t.distortion_s;
            fit_s += t.fit_s;
            weighted.push((label.clone(), w));
        }
        calibs.push((label, spec.clone(), calib));
    }
    timings.push(("distortion".into(), distortion_s));
    timings.push(("fit".into(), fit_s));
    Ok(Calibrated {
        calibs,
        weighted,
        timings,
        units: keep_units.then_some(units),
    })
}

pub fn progress_bar(len: u64, message: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed}, ETA {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

pub fn fit_options(bits: &str, fit_bits: &str, beta: &str, distortion: &str) -> Result<FitOptions> {
    let opts = FitOptions {
        measured_bits: BitList::parse(bits).context("--bits")?,
        fit_bits: BitList::parse(fit_bits).context("--fit-bits")?,
        beta_mode: if beta == "per-unit" {
            BetaMode::PerUnit
        } else {
            BetaMode::Shared
        },
        target: if distortion == "weighted" {
            DistortionTarget::Weighted
        } else {
            DistortionTarget::Mse
        },
    };
    opts.validate()?;
    Ok(opts)
}

/// Seconds to allocate one plan per design at a typical budget (2.5 bits, or the nearest the
/// measured bits allow): the cost of turning a calibration into a plan.
fn time_allocation(calibs: &[(String, QuantizerSpec, Calib)]) -> Result<f64> {
    let start = Instant::now();
    for (_, _, calib) in calibs {
        let allowed = calib.measured_bits.clone();
        let budget = 2.5f64.clamp(allowed.min() as f64, allowed.max() as f64);
        make_plan(
            calib,
            &PlanOptions {
                avg_bits: budget,
                allowed,
                policy: Policy::Ratequant,
                distortion_from: None,
            },
        )?;
    }
    Ok(start.elapsed().as_secs_f64())
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let started = Instant::now();
    let specs = parse_designs(&args.quantizer)?;
    let fit = fit_options(&args.bits, &args.fit_bits, &args.beta, &args.distortion)?;
    // Fail on a design that cannot serve the model before reading text or running anything.
    let loaded = super::load_model_and_texts(&args.model, &[args.data.as_str()], |config| {
        build_designs(&specs, config).map(drop)
    })?;
    let (decoder, tokens) = (loaded.decoder, &loaded.tokens[0]);
    let load_s = started.elapsed().as_secs_f64();

    let settings = CalibrationSettings {
        sequences: args.sequences,
        ctx: args.ctx,
        fit,
    };
    calibrate_to_dir(
        &decoder,
        tokens,
        &specs,
        &settings,
        &args.out,
        args.dump_kv,
        load_s,
        started,
    )
}

/// Calibrates every design and writes `out/<design>.json` (and `out/kv.safetensors` with
/// `dump_kv`), printing each fit and the phase timings.
#[allow(clippy::too_many_arguments)]
pub fn calibrate_to_dir(
    decoder: &Decoder,
    tokens: &[u32],
    specs: &[QuantizerSpec],
    settings: &CalibrationSettings,
    out: &Path,
    dump_kv: bool,
    load_s: f64,
    started: Instant,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let calibrated = calibrate_designs(decoder, tokens, specs, settings, false, dump_kv)?;
    let alloc_s = time_allocation(&calibrated.calibs)?;
    for (label, spec, calib) in &calibrated.calibs {
        let path = out.join(format!("{label}.json"));
        calib.save(&path)?;
        print_fit(spec, calib, &path);
    }
    if let Some(units) = &calibrated.units {
        let path = out.join("kv.safetensors");
        let t0 = Instant::now();
        write_kv_file(&path, units)?;
        println!(
            "wrote captured K/V and importance to {} ({:.2} s)",
            path.display(),
            t0.elapsed().as_secs_f64()
        );
    }
    print_timings(
        load_s,
        &calibrated.timings,
        alloc_s,
        calibrated.calibs.len(),
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

fn print_fit(spec: &QuantizerSpec, calib: &Calib, path: &Path) {
    let r2 = calib.r2.map_or("undefined".into(), |r| format!("{r:.4}"));
    let mut unit_r2: Vec<f64> = calib.units.iter().filter_map(|u| u.r2).collect();
    unit_r2.sort_by(f64::total_cmp);
    let median = unit_r2
        .get(unit_r2.len() / 2)
        .map_or("—".into(), |r| format!("{r:.4}"));
    println!(
        "{spec}: β = {:.3}, R² = {r2} (median unit {median}), {} units → {}",
        calib.beta,
        calib.units.len(),
        path.display()
    );
}

fn print_timings(
    load_s: f64,
    phases: &[(String, f64)],
    alloc_s: f64,
    designs: usize,
    total_s: f64,
) {
    let list: Vec<String> = phases
        .iter()
        .map(|(p, t)| format!("{p} {t:.2} s"))
        .collect();
    println!("time: load {load_s:.2} s, {}, allocate ({designs} plan(s)) {alloc_s:.3} s; total {total_s:.2} s", list.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::fit::{self, FitArgs};
    use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
    use ratequant_llm::{Arch, RopeLayout};

    fn tiny_decoder(head_dim: usize) -> Decoder {
        let mut config = tiny_config(Arch::Llama, RopeLayout::Halves);
        config.head_dim = head_dim;
        let weights = random_weights(&config, 11).unwrap();
        Decoder::new(&config, &weights).unwrap()
    }

    fn random_tokens(n: usize, vocab: usize) -> Vec<u32> {
        let mut rng = SplitMix64::new(5);
        (0..n)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect()
    }

    #[test]
    fn calibrate_and_fit_write_identical_calib_files() {
        let decoder = tiny_decoder(16);
        let tokens = random_tokens(3 * 20 + 7, decoder.config().vocab_size);
        let dir = tempfile::tempdir().unwrap();
        for distortion in ["mse", "weighted"] {
            let out = dir.path().join(distortion);
            let specs = parse_designs("kivi:g=8,quarot,rtn-token").unwrap();
            let settings = CalibrationSettings {
                sequences: 3,
                ctx: 20,
                fit: fit_options("1-8", "1-4", "shared", distortion).unwrap(),
            };
            calibrate_to_dir(
                &decoder,
                &tokens,
                &specs,
                &settings,
                &out,
                true,
                0.0,
                Instant::now(),
            )
            .unwrap();
            for spec in &specs {
                let label = design_label(spec);
                let fitted = out.join(format!("fit-{label}.json"));
                fit::run(FitArgs {
                    kv: out.join("kv.safetensors"),
                    quantizer: spec.to_string(),
                    group: None,
                    bits: "1-8".into(),
                    fit_bits: "1-4".into(),
                    beta: "shared".into(),
                    distortion: distortion.into(),
                    out: fitted.clone(),
                })
                .unwrap();
                let a = std::fs::read(out.join(format!("{label}.json"))).unwrap();
                let b = std::fs::read(&fitted).unwrap();
                assert!(a == b, "{distortion} {label}: calibrate and fit disagree");
                let calib = Calib::load(&fitted).unwrap();
                assert_eq!(calib.sequences, 3);
                assert_eq!(calib.units.len(), 2 * 2 * 2);
                assert!(
                    calib.units.iter().all(|u| u.importance > 0.0),
                    "Fisher importance reaches every unit"
                );
            }
        }
    }

    #[test]
    fn unservable_designs_and_short_text_are_clear_errors() {
        let decoder = tiny_decoder(12);
        let specs = parse_designs("kivi,quarot").unwrap();
        let err = format!(
            "{:#}",
            build_designs(&specs, decoder.config()).err().unwrap()
        );
        assert!(err.contains("quarot") && err.contains("12"), "{err}");

        let decoder = tiny_decoder(16);
        let tokens = random_tokens(50, decoder.config().vocab_size);
        let settings = CalibrationSettings {
            sequences: 3,
            ctx: 20,
            fit: FitOptions::default(),
        };
        let specs = parse_designs("kivi").unwrap();
        let err = format!(
            "{:#}",
            calibrate_designs(&decoder, &tokens, &specs, &settings, false, false)
                .err()
                .unwrap()
        );
        assert!(
            err.contains("50 tokens") && err.contains("3 requested"),
            "{err}"
        );
    }

    #[test]
    fn design_lists_split_on_commas_but_keep_parameters() {
        let specs = parse_designs("kivi, quarot:g=32,rtn-token").unwrap();
        let labels: Vec<String> = specs.iter().map(design_label).collect();
        assert_eq!(labels, ["kivi", "quarot-g32", "rtn-token"]);
        assert!(parse_designs("kivi,kivi")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(
            format!("{:#}", parse_designs("kivi,bogus").unwrap_err()).contains("unknown quantizer")
        );
        assert!(parse_designs(" , ").is_err());
    }
}

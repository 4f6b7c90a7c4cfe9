//! `ratequant fit`: measure a design's distortion on captured K/V and fit its model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use ratequant::bits::BitList;
use ratequant::fit::{calibrate_timed, FitOptions};
use ratequant::formats::{BetaMode, Calib, DistortionTarget, ImportanceSource};
use ratequant::kvfile::read_kv_file;
use ratequant::quant::{self, QuantizerSpec};

#[derive(Debug, Args)]
pub struct FitArgs {
    /// Captured keys and values: safetensors with layers.{l}.k / layers.{l}.v (see docs/formats.md).
    #[arg(long)]
    pub kv: PathBuf,
    /// Quantizer design: kivi, quarot or rtn-token (optionally with parameters, e.g. kivi:g=64).
    #[arg(long)]
    pub quantizer: String,
    /// Group size (the design's default when omitted).
    #[arg(long)]
    pub group: Option<usize>,
    /// Bit-widths to measure, e.g. 1-8 or 2,3,4.
    #[arg(long, default_value = "1-8")]
    pub bits: String,
    /// Bit-widths to fit the model on (at least two, all measured).
    #[arg(long, default_value = "1-4")]
    pub fit_bits: String,
    /// One β for the whole design (`shared`, the paper's model) or one per unit (`per-unit`).
    #[arg(long, default_value = "shared", value_parser = ["shared", "per-unit"])]
    pub beta: String,
    /// Distortion to fit: `mse`, or `weighted` (importance-weighted; needs per-element importance).
    #[arg(long, default_value = "mse", value_parser = ["mse", "weighted"])]
    pub distortion: String,
    /// Output CALIB.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: FitArgs) -> Result<()> {
    let mut spec = QuantizerSpec::parse(&args.quantizer)?;
    if let Some(g) = args.group {
        if spec.group.is_some_and(|sg| sg != g) {
            bail!(
                "--quantizer {} and --group {g} disagree on the group size",
                args.quantizer
            );
        }
        spec.group = Some(g);
    }
    let quantizer = quant::build(&spec)?;
    let opts = FitOptions {
        measured_bits: BitList::parse(&args.bits).context("--bits")?,
        fit_bits: BitList::parse(&args.fit_bits).context("--fit-bits")?,
        beta_mode: if args.beta == "per-unit" {
            BetaMode::PerUnit
        } else {
            BetaMode::Shared
        },
        target: if args.distortion == "weighted" {
            DistortionTarget::Weighted
        } else {
            DistortionTarget::Mse
        },
    };
    opts.validate()?;

    let start = Instant::now();
    let units = read_kv_file(&args.kv)?;
    let read_s = start.elapsed().as_secs_f64();
    let (calib, timings) = calibrate_timed(&units, quantizer.as_ref(), &opts)
        .with_context(|| format!("fitting {}", args.kv.display()))?;
    calib.save(&args.out)?;

    print_summary(&calib);
    println!(
        "read {read_s:.2} s, distortion {:.2} s, fit {:.3} s; wrote {}",
        timings.distortion_s,
        timings.fit_s,
        args.out.display()
    );
    Ok(())
}

fn print_summary(c: &Calib) {
    let layers = c.units.iter().map(|u| u.layer + 1).max().unwrap_or(0);
    let importance = match c.importance {
        ImportanceSource::None => "none (all weights 1)",
        ImportanceSource::PerUnit => "per unit",
        ImportanceSource::PerElement => "per element",
    };
    let target = match c.target {
        DistortionTarget::Mse => "MSE",
        DistortionTarget::Weighted => "importance-weighted error",
    };
    println!(
        "{}: {} units ({layers} layers, {} sequence(s)), importance {importance}, {target} fitted on bits {}",
        c.quantizer,
        c.units.len(),
        c.sequences,
        c.fit_bits,
    );
    let r2 = c.r2.map_or("undefined".to_string(), |r| format!("{r:.4}"));
    let mode = match c.beta_mode {
        BetaMode::Shared => "shared by all units",
        BetaMode::PerUnit => "pooled; each unit also has its own",
    };
    println!("β = {:.3} ({mode}), overall R² = {r2}", c.beta);
    let mut betas: Vec<f64> = c.units.iter().filter_map(|u| u.beta).collect();
    betas.sort_by(f64::total_cmp);
    if !betas.is_empty() {
        println!(
            "per-unit β: min {:.3}, median {:.3}, max {:.3}",
            betas[0],
            betas[betas.len() / 2],
            betas[betas.len() - 1]
        );
    }
    let mut unit_r2: Vec<f64> = c.units.iter().filter_map(|u| u.r2).collect();
    unit_r2.sort_by(f64::total_cmp);
    if !unit_r2.is_empty() {
        println!(
            "per-unit R²: min {:.4}, median {:.4}, max {:.4}",
            unit_r2[0],
            unit_r2[unit_r2.len() / 2],
            unit_r2[unit_r2.len() - 1]
        );
    }
    let zero_alpha = c.units.iter().filter(|u| u.alpha == 0.0).count();
    if zero_alpha > 0 {
        println!("{zero_alpha} unit(s) reproduced exactly at every fit bit-width: α = 0");
    }
    // Mean measured distortion per bit-width, with the model's prediction for the mean α.
    let n = c.units.len() as f64;
    let mean_alpha = c.units.iter().map(|u| u.alpha).sum::<f64>() / n;
    println!("bits  mean D (measured)  mean α·β^-b (model)");
    for (j, &b) in c.measured_bits.as_slice().iter().enumerate() {
        let measured = c.units.iter().map(|u| c.target_table(u)[j]).sum::<f64>() / n;
        let model = mean_alpha * c.beta.powi(-(b as i32));
        let mark = if c.fit_bits.contains(b) { "*" } else { " " };
        println!("{b:>3}{mark} {measured:>18.6e} {model:>20.6e}");
    }
}

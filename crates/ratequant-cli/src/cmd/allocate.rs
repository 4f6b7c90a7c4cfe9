//! `ratequant allocate`: a per-unit bit plan from a CALIB file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use ratequant::bits::BitList;
use ratequant::formats::{Calib, Plan};
use ratequant::plan::{make_plan, PlanOptions, Policy};
use ratequant::quant::Kind;

#[derive(Debug, Args)]
pub struct AllocateArgs {
    /// CALIB.json from `ratequant fit` or `ratequant calibrate`.
    #[arg(long)]
    pub calib: PathBuf,
    /// Budget: mean code bits per element (metadata not included).
    #[arg(long)]
    pub avg_bits: f64,
    /// Allowed bit-widths, e.g. 1-8 or 2,3,4.
    #[arg(long, default_value = "1-8")]
    pub allowed: String,
    /// ratequant (fitted model), empirical (measured table), textbook (variance·4^-b) or uniform.
    #[arg(long, default_value = "ratequant")]
    pub policy: String,
    /// Allocate with another design's calibration (its fitted model or measured table) instead
    /// of this one's: the mismatch experiment.
    #[arg(long)]
    pub distortion_from: Option<PathBuf>,
    /// Output PLAN.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: AllocateArgs) -> Result<()> {
    let policy: Policy = args.policy.parse()?;
    let allowed = BitList::parse(&args.allowed).context("--allowed")?;
    let calib = Calib::load(&args.calib)?;
    let other = args.distortion_from.as_ref().map(Calib::load).transpose()?;
    let opts = PlanOptions {
        avg_bits: args.avg_bits,
        allowed,
        policy,
        distortion_from: other.as_ref(),
    };
    let plan = make_plan(&calib, &opts)?;
    plan.save(&args.out)?;
    print_summary(&plan);
    println!("wrote {}", args.out.display());
    Ok(())
}

fn print_summary(p: &Plan) {
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    let from = p
        .distortion_from
        .as_ref()
        .map_or(String::new(), |d| format!(" with the model of {d}"));
    println!(
        "{}: policy {}{from}, allowed bits {}, {} method",
        p.quantizer, p.policy, p.allowed_bits, p.method
    );
    println!(
        "mean bits: requested {}, achieved {:.4}{}; with metadata {:.4} bits/element",
        p.requested_mean_bits,
        p.achieved_mean_bits,
        if p.budget_met {
            ""
        } else {
            " (budget not reachable exactly)"
        },
        p.effective_bits_per_element
    );
    let o = &p.objective;
    let vs = |plan: f64, uniform: Option<f64>| match uniform {
        Some(u) if u > 0.0 => format!(
            "{plan:.6e} vs uniform {u:.6e} ({:+.1}%)",
            100.0 * (plan / u - 1.0)
        ),
        Some(u) => format!("{plan:.6e} vs uniform {u:.6e}"),
        None => format!("{plan:.6e} (uniform impossible with these bits)"),
    };
    println!(
        "predicted objective ({} model): {}",
        o.model,
        vs(o.plan, o.uniform)
    );
    if let Some(m) = o.measured_plan {
        println!(
            "measured objective (this calibration's table): {}",
            vs(m, o.measured_uniform)
        );
    }
    if let Some(c) = &p.continuous {
        println!(
            "continuous optimum: objective {:.6e}, water level {:.4e}, {} units at min, {} at max, {} interior",
            c.objective, c.water_level, c.units_at_min, c.units_at_max, c.units_interior
        );
    }
    // Bits histogram per layer, K and V separately.
    let bits = p.allowed_bits.as_slice();
    let header: String = bits
        .iter()
        .map(|b| format!("{:>5}", format!("{b}b")))
        .collect();
    println!("layer kind{header}");
    for layer in 0..p.num_layers() {
        for kind in [Kind::K, Kind::V] {
            let counts: Vec<String> = bits
                .iter()
                .map(|&b| {
                    let n = p
                        .units
                        .iter()
                        .filter(|u| u.layer == layer && u.kind == kind && u.bits == b)
                        .count();
                    if n == 0 {
                        format!("{:>5}", ".")
                    } else {
                        format!("{n:>5}")
                    }
                })
                .collect();
            println!("{layer:>5} {:>4}{}", kind.as_str(), counts.join(""));
        }
    }
}

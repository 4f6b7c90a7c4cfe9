//! `ratequant`: thin commands over the ratequant libraries.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(name = "ratequant", version, about = "Per-head bit allocation for quantized LLM KV caches")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure a quantizer design's distortion on captured K/V and fit D(b) = α·β^(−b) (writes CALIB.json).
    Fit(cmd::fit::FitArgs),
    /// Allocate bits per unit from a CALIB.json at a mean-bits budget (writes PLAN.json).
    Allocate(cmd::allocate::AllocateArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Fit(args) => cmd::fit::run(args),
        Command::Allocate(args) => cmd::allocate::run(args),
    }
}

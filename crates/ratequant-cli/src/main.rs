//! `ratequant`: thin commands over the ratequant libraries.

use clap::{Parser, Subcommand};

mod cmd;
mod sweep;

#[derive(Parser)]
#[command(
    name = "ratequant",
    version,
    about = "Per-head bit allocation for quantized LLM KV caches"
)]
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
    /// Perplexity, KL divergence and top-1 agreement of a KV cache setting on a model and text.
    Eval(cmd::eval::EvalArgs),
    /// Capture a model's K/V and Fisher importance on calibration text and fit each design (writes DIR/<design>.json).
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// Calibrate, allocate and evaluate every design × budget × policy; write results, report and figures (resumable).
    Sweep(cmd::sweep::SweepArgs),
    /// Generate text over the packed mixed-precision KV cache (--kv kivi:2 or --plan PLAN.json); reports tokens/s and KV bytes vs f16.
    Generate(cmd::generate::GenerateArgs),
    /// Download, verify and cache models and texts (smollm2, qwen2.5-0.5b, gemma3-270m, botchan, brown); `--list` shows them.
    Fetch(cmd::fetch::FetchArgs),
}

/// The stack of the pool's threads, on one of which every command runs: at least what
/// the main thread gets on Linux (8 MiB), with room for deep autograd graphs.
const MAIN_STACK_BYTES: usize = 64 << 20;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let run = move || match cli.command {
        Command::Fit(args) => cmd::fit::run(args),
        Command::Allocate(args) => cmd::allocate::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Calibrate(args) => cmd::calibrate::run(args),
        Command::Sweep(args) => cmd::sweep::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Fetch(args) => cmd::fetch::run(args),
    };
    // The command runs on a thread of the pool that its parallel work uses (matrix products,
    // attention steps), so that each of those starts at once instead of waking the pool and
    // putting this thread to sleep until it ends, and so that there are never more busy
    // threads than cores (with one more, the OS now and then left two on one core for a
    // whole attention step). Prefill 1.2×, decode 1.04–1.1× faster (SmolLM2, 8K tokens, 2
    // cores). The pool's threads get main's stack size: gradient mode recurses through the
    // graph.
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(MAIN_STACK_BYTES)
        .build_global();
    let result = match pool {
        Ok(()) => rayon::scope(|_| run()),
        // Only if something built the global pool first; the command still runs, from here.
        Err(_) => run(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes on one line each; no backtrace even when RUST_BACKTRACE
            // is set, since these are input problems, not bugs (panics still show theirs).
            let mut shown = e.to_string();
            eprintln!("error: {shown}");
            for cause in e.chain().skip(1).map(|c| c.to_string()) {
                // Many messages already quote their cause; don't repeat it.
                if !shown.contains(&cause) {
                    eprintln!("  caused by: {cause}");
                }
                shown = cause;
            }
            std::process::ExitCode::FAILURE
        }
    }
}

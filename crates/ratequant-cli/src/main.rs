//! `ratequant`: thin commands over the ratequant libraries.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ratequant", version, about = "Per-head bit allocation for quantized LLM KV caches")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}

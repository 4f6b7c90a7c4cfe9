//! `ratequant fetch`: download, verify and install models and texts into the asset cache
//! (other commands do this on first use; this makes it explicit, e.g. before going offline).

use anyhow::{bail, Result};
use clap::Args;

use ratequant_llm::assets::{find_asset, AssetKind, Install, ASSETS};
use ratequant_llm::AssetCache;

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Assets to fetch: smollm2, qwen2.5-0.5b, gemma3-270m, botchan, brown.
    #[arg(required_unless_present_any = ["list", "all"])]
    pub names: Vec<String>,
    /// List the known assets, their pinned sources and whether they are cached.
    #[arg(long)]
    pub list: bool,
    /// Fetch every known asset.
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
}

pub fn run(args: FetchArgs) -> Result<()> {
    let cache = AssetCache::from_env();
    if args.list {
        print_list(&cache);
        if args.names.is_empty() && !args.all {
            return Ok(());
        }
    }
    let names: Vec<String> = if args.all {
        ASSETS.iter().map(|a| a.name.to_string()).collect()
    } else {
        args.names
    };
    let mut assets = Vec::with_capacity(names.len());
    for name in &names {
        match find_asset(name) {
            Some(a) => assets.push(a),
            None => bail!(
                "unknown asset `{name}` (known: {})",
                ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    for asset in assets {
        if cache.is_cached(asset) {
            println!(
                "{}: already cached at {}",
                asset.name,
                cache.path_of(asset).display()
            );
            continue;
        }
        let path = cache.ensure(asset)?;
        println!("{}: {}", asset.name, path.display());
    }
    Ok(())
}

fn print_list(cache: &AssetCache) {
    println!("cache: {}", cache.root().display());
    println!(
        "{:<14} {:<6} {:<10} {:<8} {:<58} description",
        "name", "kind", "size", "cached", "source"
    );
    for a in ASSETS {
        let kind = match a.kind {
            AssetKind::Model => "model",
            AssetKind::Text => "text",
        };
        let size = match &a.install {
            Install::File { bytes, .. } => format!("{:.1} MB", *bytes as f64 / 1e6),
            Install::BrownDir { files, .. } => format!("{files} files"),
        };
        let cached = if cache.is_cached(a) { "yes" } else { "no" };
        println!(
            "{:<14} {:<6} {:<10} {:<8} {:<58} {}",
            a.name,
            kind,
            size,
            cached,
            a.pinned_source(),
            a.description
        );
    }
}

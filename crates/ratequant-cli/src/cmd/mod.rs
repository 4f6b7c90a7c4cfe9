//! One module per command, each exposing `<Name>Args` and `run`.

pub mod allocate;
pub mod calibrate;
pub mod eval;
pub mod fetch;
pub mod fit;
pub mod generate;
pub mod sweep;

use std::path::Path;

/// Fails early (before a long run) when an output file's directory does not exist or the path
/// names no file; `flag` is the option that named it (`--json`).
pub fn check_output_path(path: &Path, flag: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write {flag} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.file_name().is_none() {
        anyhow::bail!("{flag} {} names no file", path.display());
    }
    Ok(())
}

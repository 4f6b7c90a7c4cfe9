//! The sweep's journal: one JSON line per completed cell, fsync'd as it is written, so an
//! interrupted sweep resumes where it stopped.
//!
//! Line 1 is a header holding the arguments that determine every cell's result (model, data,
//! context, chunks, …). Reopening with the same arguments loads the completed cells; with
//! different arguments the old journal is moved aside (never silently mixed in). Which cells
//! are requested (designs, budgets, policies) is not part of the key: asking for one more
//! budget reuses every cell already measured.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const JOURNAL_FILE: &str = "journal.jsonl";
const JOURNAL_MAGIC: &str = "ratequant-sweep-journal";
const JOURNAL_VERSION: u32 = 1;

/// One point of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Quantizer design (`kivi`, `quarot`, `rtn-token`), or `fp` for the full-precision baseline.
    pub design: String,
    /// Requested average bits per element (codes only, metadata excluded).
    pub budget: f64,
    /// `uniform`, `textbook`, `ratequant`, `empirical`, `mismatched`, or `fp`.
    pub policy: String,
    /// For `mismatched`: the design whose fitted model made the plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl Cell {
    pub fn baseline() -> Self {
        Cell {
            design: "fp".into(),
            budget: 32.0,
            policy: "fp".into(),
            from: None,
        }
    }
    pub fn is_baseline(&self) -> bool {
        self.policy == "fp"
    }
    /// Equality on the identifying fields, the budget compared exactly.
    pub fn same(&self, other: &Cell) -> bool {
        self.design == other.design
            && self.policy == other.policy
            && self.from == other.from
            && self.budget.to_bits() == other.budget.to_bits()
    }
    /// Short human label: `kivi 2.5 ratequant`, `kivi 2.5 mismatched(from quarot)`.
    pub fn label(&self) -> String {
        if self.is_baseline() {
            return "fp baseline".into();
        }
        match &self.from {
            Some(f) => format!("{} {} {}(from {f})", self.design, self.budget, self.policy),
            None => format!("{} {} {}", self.design, self.budget, self.policy),
        }
    }
    /// Policy column as shown in tables: `mismatched(quarot)`.
    pub fn policy_label(&self) -> String {
        match &self.from {
            Some(f) => format!("{}({f})", self.policy),
            None => self.policy.clone(),
        }
    }
}

/// What one cell measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    pub cell: Cell,
    /// Mean code bits per element the plan achieved.
    #[serde(deserialize_with = "nan_if_null")]
    pub achieved_bits: f64,
    /// Bits per element including the design's scales and zero-points.
    #[serde(deserialize_with = "nan_if_null")]
    pub effective_bits: f64,
    /// The allocation objective Σ w·D predicted by the cell's own design's fitted model.
    #[serde(default)]
    pub predicted_objective: Option<f64>,
    #[serde(deserialize_with = "nan_if_null")]
    pub perplexity: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub perplexity_se: f64,
    /// Mean KL(fp ‖ quantized) per scored token, in nats.
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_mean: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub kl_p99: f64,
    /// Fraction of scored tokens whose argmax equals the fp cache's argmax.
    #[serde(deserialize_with = "nan_if_null")]
    pub top1: f64,
    pub seconds: f64,
    /// Set when the cell could not be run (e.g. an unreachable budget); the metrics are NaN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// JSON has no NaN: serde_json writes it as `null`, and this reads `null` back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    journal: String,
    version: u32,
    args: serde_json::Value,
}

/// An open journal: completed results plus an append handle.
pub struct Journal {
    path: PathBuf,
    file: File,
    results: Vec<CellResult>,
}

/// What opening found, for the user.
#[derive(Debug, PartialEq)]
pub enum Opened {
    New,
    /// Same arguments: this many cells are already done.
    Resumed {
        cells: usize,
    },
    /// Different arguments: the old journal was moved to this path.
    Invalidated {
        moved_to: PathBuf,
    },
}

impl Journal {
    /// Opens (or creates) `dir/journal.jsonl` for a sweep with `args`.
    pub fn open(dir: &Path, args: &serde_json::Value) -> Result<(Journal, Opened)> {
        let path = dir.join(JOURNAL_FILE);
        if !path.exists() {
            return Ok((Self::create(&path, args)?, Opened::New));
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        let header: Option<Header> = serde_json::from_str(line.trim_end()).ok();
        let same = match &header {
            Some(h) if h.journal == JOURNAL_MAGIC && h.version == JOURNAL_VERSION => {
                &h.args == args
            }
            _ => false,
        };
        if !same {
            let moved_to = free_stale_name(&path);
            std::fs::rename(&path, &moved_to)
                .with_context(|| format!("moving the outdated journal {} aside", path.display()))?;
            return Ok((Self::create(&path, args)?, Opened::Invalidated { moved_to }));
        }
        // Cells, one per line; only the last line may be cut short (a crash mid-write), and
        // it is dropped so the next append starts on a clean line.
        let mut good_end = line.len() as u64;
        let mut results = Vec::new();
        let mut line_no = 1;
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            line_no += 1;
            if !line.ends_with('\n') {
                break; // cut short by a crash: only ever the last line
            }
            match serde_json::from_str::<CellResult>(line.trim_end()) {
                Ok(r) => {
                    results.push(r);
                    good_end += n as u64;
                }
                Err(e) => bail!("{}: line {line_no} is not a valid cell result ({e}); delete the file to start over", path.display()),
            }
        }
        let mut file = reader.into_inner();
        if file.metadata()?.len() != good_end {
            file.set_len(good_end)
                .with_context(|| format!("dropping the cut-off last line of {}", path.display()))?;
        }
        file.seek(SeekFrom::End(0))?;
        let cells = results.len();
        Ok((
            Journal {
                path,
                file,
                results,
            },
            Opened::Resumed { cells },
        ))
    }

    fn create(path: &Path, args: &serde_json::Value) -> Result<Journal> {
        let header = Header {
            journal: JOURNAL_MAGIC.into(),
            version: JOURNAL_VERSION,
            args: args.clone(),
        };
        let mut file =
            File::create(path).with_context(|| format!("creating {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(&header)?)?;
        file.sync_data()
            .with_context(|| format!("syncing {}", path.display()))?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            results: Vec::new(),
        })
    }

    /// The completed result for `cell`, if any.
    pub fn get(&self, cell: &Cell) -> Option<&CellResult> {
        self.results.iter().find(|r| r.cell.same(cell))
    }

    /// Records a completed cell durably (written and fsync'd before returning).
    pub fn append(&mut self, result: CellResult) -> Result<()> {
        let mut line = serde_json::to_string(&result)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        self.results.push(result);
        Ok(())
    }
}

fn free_stale_name(path: &Path) -> PathBuf {
    (1..)
        .map(|i| path.with_file_name(format!("{JOURNAL_FILE}.stale-{i}")))
        .find(|p| !p.exists())
        .expect("some stale name is free")
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync'd, then
/// renamed over the target, so readers never see a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(design: &str, budget: f64, policy: &str, ppl: f64) -> CellResult {
        CellResult {
            cell: Cell {
                design: design.into(),
                budget,
                policy: policy.into(),
                from: None,
            },
            achieved_bits: budget,
            effective_bits: budget + 1.0,
            predicted_objective: Some(0.5),
            perplexity: ppl,
            perplexity_se: 0.1,
            kl_mean: 0.01,
            kl_p99: 0.1,
            top1: 0.95,
            seconds: 1.0,
            error: None,
        }
    }

    #[test]
    fn resume_with_same_args_keeps_cells_and_changed_args_invalidate() {
        let dir = tempfile::tempdir().unwrap();
        let args = serde_json::json!({"model": "m", "ctx": 64});
        let (mut j, opened) = Journal::open(dir.path(), &args).unwrap();
        assert_eq!(opened, Opened::New);
        j.append(result("kivi", 2.5, "uniform", 12.0)).unwrap();
        j.append(result("kivi", 2.5, "ratequant", 9.0)).unwrap();
        drop(j);

        let (j, opened) = Journal::open(dir.path(), &args).unwrap();
        assert_eq!(opened, Opened::Resumed { cells: 2 });
        let cell = Cell {
            design: "kivi".into(),
            budget: 2.5,
            policy: "ratequant".into(),
            from: None,
        };
        assert_eq!(j.get(&cell).unwrap().perplexity, 9.0);
        let other = Cell {
            budget: 3.0,
            ..cell.clone()
        };
        assert!(j.get(&other).is_none());
        drop(j);

        let changed = serde_json::json!({"model": "m", "ctx": 128});
        let (j, opened) = Journal::open(dir.path(), &changed).unwrap();
        let Opened::Invalidated { moved_to } = opened else {
            panic!("expected invalidation, got {opened:?}")
        };
        assert!(moved_to.exists());
        assert!(j.results.is_empty());
        assert!(j.get(&cell).is_none());
    }

    #[test]
    fn a_cut_off_last_line_is_dropped_and_appending_continues_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let args = serde_json::json!({"a": 1});
        let (mut j, _) = Journal::open(dir.path(), &args).unwrap();
        j.append(result("quarot", 2.0, "uniform", 20.0)).unwrap();
        drop(j);
        // Simulate a crash in the middle of writing the second cell.
        let path = dir.path().join(JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"cell":{"design":"quarot","bud"#).unwrap();
        drop(f);

        let (mut j, opened) = Journal::open(dir.path(), &args).unwrap();
        assert_eq!(opened, Opened::Resumed { cells: 1 });
        j.append(result("quarot", 3.0, "uniform", 15.0)).unwrap();
        drop(j);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "header + two cells:\n{text}");
        let (j, _) = Journal::open(dir.path(), &args).unwrap();
        assert_eq!(j.results.len(), 2);
    }

    #[test]
    fn a_corrupt_middle_line_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let args = serde_json::json!({"a": 1});
        let (mut j, _) = Journal::open(dir.path(), &args).unwrap();
        j.append(result("kivi", 2.0, "uniform", 20.0)).unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("garbage\n");
        text.push_str(&serde_json::to_string(&result("kivi", 3.0, "uniform", 10.0)).unwrap());
        text.push('\n');
        std::fs::write(&path, text).unwrap();
        let err = Journal::open(dir.path(), &args).err().unwrap().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn results_round_trip_with_nan_metrics() {
        let mut r = result("kivi", 2.0, "mismatched", 30.0);
        r.cell.from = Some("quarot".into());
        r.error = Some("budget unreachable".into());
        r.perplexity = f64::NAN;
        r.achieved_bits = f64::NAN;
        let line = serde_json::to_string(&r).unwrap();
        let back: CellResult = serde_json::from_str(&line).unwrap();
        assert!(back.perplexity.is_nan() && back.achieved_bits.is_nan());
        r.perplexity = back.perplexity;
        assert_eq!(back.cell, r.cell);
        assert_eq!(back.error, r.error);
        assert_eq!(back.kl_mean, r.kl_mean);
        assert_eq!(back.cell.label(), "kivi 2 mismatched(from quarot)");
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.md");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(write_atomic(&dir.path().join("missing/x"), b"x").is_err());
    }
}

//! The sweep's outputs: `results.csv`, `results.json`, `report.md` and the SVG figures, all
//! written atomically from the journal's results and the calibration summaries.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::journal::{write_atomic, CellResult};
use super::svg::{palette, Heatmap, HeatmapPanel, LinePlot, Series, Style};

/// One unit's measured distortion and fitted model, as the report needs it.
#[derive(Debug, Clone, Serialize)]
pub struct UnitFit {
    pub layer: usize,
    pub head: usize,
    /// `"k"` or `"v"`.
    pub kind: String,
    /// Measured distortion at each of the design's measured bits.
    pub distortion: Vec<f64>,
    pub alpha: f64,
    pub r2: f64,
}

/// A design's calibration, as the report needs it.
#[derive(Debug, Clone, Serialize)]
pub struct DesignFit {
    pub design: String,
    pub beta: f64,
    /// R² of the whole design's fit (all units, in log space).
    pub r2: f64,
    pub measured_bits: Vec<u8>,
    pub fit_bits: Vec<u8>,
    pub units: Vec<UnitFit>,
}

/// Bits per unit of one plan, for the heatmaps.
#[derive(Debug, Clone, Serialize)]
pub struct PlanBits {
    pub design: String,
    pub budget: f64,
    pub policy: String,
    /// `(layer, head, kind, bits)`.
    pub units: Vec<(usize, usize, String, u8)>,
}

/// Everything the report shows besides the cells.
pub struct ReportInput<'a> {
    /// The command line that produced the sweep (shown verbatim).
    pub command: String,
    /// Sweep arguments as recorded in the journal header.
    pub args: &'a serde_json::Value,
    pub fits: &'a [DesignFit],
    /// Plans shown as heatmaps (typically each design's `ratequant` plan at one budget).
    pub heatmaps: &'a [PlanBits],
    /// Results of the requested cells, baseline included, in display order.
    pub results: &'a [CellResult],
    /// Calibration phase timings in seconds, for the record.
    pub calibration_timings: &'a [(String, f64)],
}

pub const CSV_COLUMNS: [&str; 14] = [
    "design",
    "budget",
    "policy",
    "from",
    "achieved_bits",
    "effective_bits",
    "predicted_objective",
    "perplexity",
    "perplexity_se",
    "kl_mean",
    "kl_p99",
    "top1",
    "seconds",
    "error",
];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn num(v: f64) -> String {
    if v.is_nan() {
        String::new()
    } else {
        format!("{v}")
    }
}

pub fn results_csv(results: &[CellResult]) -> String {
    let mut s = CSV_COLUMNS.join(",");
    s.push('\n');
    for r in results {
        let row = [
            csv_field(&r.cell.design),
            num(r.cell.budget),
            csv_field(&r.cell.policy),
            csv_field(r.cell.from.as_deref().unwrap_or("")),
            num(r.achieved_bits),
            num(r.effective_bits),
            r.predicted_objective.map(num).unwrap_or_default(),
            num(r.perplexity),
            num(r.perplexity_se),
            num(r.kl_mean),
            num(r.kl_p99),
            num(r.top1),
            num(r.seconds),
            csv_field(r.error.as_deref().unwrap_or("")),
        ];
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s
}

fn fmt_ppl(r: &CellResult) -> String {
    if r.error.is_some() {
        "error".into()
    } else if r.perplexity.is_finite() {
        format!("{:.3} ± {:.3}", r.perplexity, r.perplexity_se)
    } else {
        "∞".into()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Distinct values in first-seen order.
fn distinct<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for it in items {
        if !out.contains(&it) {
            out.push(it);
        }
    }
    out
}

/// `report.md`.
pub fn report_markdown(input: &ReportInput) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# ratequant sweep report\n");
    let _ = writeln!(s, "```\n{}\n```\n", input.command);
    let _ = writeln!(
        s,
        "Arguments that determine the results:\n\n```json\n{}\n```\n",
        serde_json::to_string_pretty(input.args).unwrap_or_default()
    );
    let baseline = input.results.iter().find(|r| r.cell.is_baseline());
    if let Some(b) = baseline {
        let _ = writeln!(s, "Full-precision cache: perplexity **{}**.\n", fmt_ppl(b));
    }
    if !input.calibration_timings.is_empty() {
        let phases: Vec<String> = input
            .calibration_timings
            .iter()
            .map(|(p, t)| format!("{p} {t:.2} s"))
            .collect();
        let _ = writeln!(s, "Calibration phases: {}.\n", phases.join(", "));
    }

    let _ = writeln!(s, "## Fitted distortion models `D_i(b) = α_i·β^(−b)`\n");
    let _ = writeln!(
        s,
        "| design | β | R² (all units) | median unit R² | min unit R² | fit bits | units |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for f in input.fits {
        let r2s: Vec<f64> = f.units.iter().map(|u| u.r2).collect();
        let min = r2s
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold(f64::INFINITY, f64::min);
        let fit_bits: Vec<String> = f.fit_bits.iter().map(|b| b.to_string()).collect();
        let _ = writeln!(
            s,
            "| {} | {:.3} | {:.4} | {:.4} | {:.4} | {} | {} |",
            f.design,
            f.beta,
            f.r2,
            median(r2s),
            min,
            fit_bits.join(","),
            f.units.len()
        );
    }
    let _ = writeln!(s);
    for f in input.fits {
        let _ = writeln!(
            s,
            "![distortion curves of {0}](figures/distortion-{0}.svg)\n",
            f.design
        );
    }

    let cells: Vec<&CellResult> = input
        .results
        .iter()
        .filter(|r| !r.cell.is_baseline())
        .collect();
    let designs = distinct(cells.iter().map(|r| r.cell.design.clone()));
    for design in &designs {
        let rows: Vec<&&CellResult> = cells.iter().filter(|r| &r.cell.design == design).collect();
        let budgets = distinct(rows.iter().map(|r| r.cell.budget.to_bits()));
        let policies = distinct(rows.iter().map(|r| r.cell.policy_label()));
        let _ = writeln!(s, "## {design}\n");
        for (title, metric) in [
            ("Perplexity (± standard error)", Metric::Ppl),
            (
                "Mean KL divergence to the full-precision cache (nats/token)",
                Metric::Kl,
            ),
            (
                "Top-1 agreement with the full-precision cache",
                Metric::Top1,
            ),
        ] {
            let _ = writeln!(s, "{title}:\n");
            let _ = writeln!(s, "| avg bits | {} |", policies.join(" | "));
            let _ = writeln!(s, "|---|{}", "---|".repeat(policies.len()));
            for &b in &budgets {
                let budget = f64::from_bits(b);
                let mut line = format!("| {budget} |");
                for p in &policies {
                    let cell = rows
                        .iter()
                        .find(|r| r.cell.budget.to_bits() == b && &r.cell.policy_label() == p);
                    let text = match cell {
                        None => String::new(),
                        Some(r) if r.error.is_some() => "error".into(),
                        Some(r) => match metric {
                            Metric::Ppl => fmt_ppl(r),
                            Metric::Kl => format!("{:.4}", r.kl_mean),
                            Metric::Top1 => format!("{:.2}%", 100.0 * r.top1),
                        },
                    };
                    let _ = write!(line, " {text} |");
                }
                let _ = writeln!(s, "{line}");
            }
            let _ = writeln!(s);
        }
        // Calibrated allocation against uniform, the paper's headline comparison.
        let fp = baseline.map(|b| b.perplexity).unwrap_or(f64::NAN);
        let mut wrote_header = false;
        for &b in &budgets {
            let find = |p: &str| {
                rows.iter().find(|r| {
                    r.cell.budget.to_bits() == b && r.cell.policy == p && r.error.is_none()
                })
            };
            let Some(uniform) = find("uniform") else {
                continue;
            };
            for p in ["ratequant", "empirical", "textbook"] {
                let Some(other) = find(p) else { continue };
                if !wrote_header {
                    let _ = writeln!(
                        s,
                        "Against `uniform` at the same budget (negative = better):\n"
                    );
                    let _ = writeln!(
                        s,
                        "| avg bits | policy | Δ perplexity | Δ (perplexity − fp) | Δ KL |"
                    );
                    let _ = writeln!(s, "|---|---|---|---|---|");
                    wrote_header = true;
                }
                let pct = |a: f64, b: f64| {
                    if b != 0.0 {
                        format!("{:+.1}%", 100.0 * (a - b) / b)
                    } else {
                        "—".into()
                    }
                };
                let _ = writeln!(
                    s,
                    "| {} | {p} | {} | {} | {} |",
                    f64::from_bits(b),
                    pct(other.perplexity, uniform.perplexity),
                    pct(other.perplexity - fp, uniform.perplexity - fp),
                    pct(other.kl_mean, uniform.kl_mean),
                );
            }
        }
        if wrote_header {
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "![perplexity against average bits for {design}](figures/ppl-{design}.svg)\n"
        );
    }

    if !input.heatmaps.is_empty() {
        let _ = writeln!(s, "## Bit allocations\n");
        for h in input.heatmaps {
            let _ = writeln!(
                s,
                "![{} bits at {} ({})](figures/{})\n",
                h.design,
                h.budget,
                h.policy,
                heatmap_file(h)
            );
        }
    }
    let _ = writeln!(s, "Raw numbers: `results.csv`, `results.json`.");
    s
}

#[derive(Clone, Copy)]
enum Metric {
    Ppl,
    Kl,
    Top1,
}

pub fn heatmap_file(h: &PlanBits) -> String {
    format!("bits-{}-{}-{}.svg", h.design, h.budget, h.policy)
}

/// Distortion curves of a few representative units (the α quantiles) with their fitted lines.
pub fn distortion_figure(fit: &DesignFit) -> String {
    let mut order: Vec<usize> = (0..fit.units.len()).collect();
    order.sort_by(|&a, &b| fit.units[a].alpha.total_cmp(&fit.units[b].alpha));
    let picks: Vec<usize> = if order.len() <= 6 {
        order.clone()
    } else {
        let n = order.len() - 1;
        let mut p: Vec<usize> = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
            .iter()
            .map(|q| order[(q * n as f64).round() as usize])
            .collect();
        p.dedup();
        p
    };
    let lo = *fit.measured_bits.iter().min().unwrap_or(&1) as f64;
    let hi = *fit.measured_bits.iter().max().unwrap_or(&8) as f64;
    let mut series = Vec::new();
    for (i, &u) in picks.iter().enumerate() {
        let unit = &fit.units[u];
        let name = format!(
            "L{} H{} {} (R² {:.3})",
            unit.layer,
            unit.head,
            unit.kind.to_uppercase(),
            unit.r2
        );
        let color = palette(i).to_string();
        let measured = fit
            .measured_bits
            .iter()
            .zip(&unit.distortion)
            .map(|(&b, &d)| (b as f64, d))
            .collect();
        series.push(Series {
            name: name.clone(),
            color: color.clone(),
            style: Style::Markers,
            points: measured,
            in_legend: true,
        });
        let fitted = (0..=20)
            .map(|k| lo + (hi - lo) * k as f64 / 20.0)
            .map(|b| (b, unit.alpha * fit.beta.powf(-b)))
            .collect();
        series.push(Series {
            name: format!("fit {name}"),
            color,
            style: Style::Dashed,
            points: fitted,
            in_legend: false,
        });
    }
    LinePlot {
        title: format!(
            "{}: measured distortion (solid) and fit α·β^−b (dashed), β = {:.2}",
            fit.design, fit.beta
        ),
        x_label: "bits".into(),
        y_label: "MSE".into(),
        log_y: true,
        series,
    }
    .render()
}

/// Perplexity against achieved average bits, one line per policy, the fp baseline as a flat line.
pub fn perplexity_figure(design: &str, results: &[CellResult]) -> String {
    let rows: Vec<&CellResult> = results
        .iter()
        .filter(|r| r.cell.design == design && r.error.is_none())
        .collect();
    let policies = distinct(rows.iter().map(|r| r.cell.policy_label()));
    let mut series: Vec<Series> = policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| &r.cell.policy_label() == p)
                .map(|r| (r.achieved_bits, r.perplexity))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                name: p.clone(),
                color: palette(i).into(),
                style: Style::LineMarkers,
                points,
                in_legend: true,
            }
        })
        .collect();
    if let Some(fp) = results
        .iter()
        .find(|r| r.cell.is_baseline() && r.error.is_none())
    {
        let xs: Vec<f64> = rows.iter().map(|r| r.achieved_bits).collect();
        let (lo, hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        if lo.is_finite() {
            series.push(Series {
                name: "full precision".into(),
                color: "#777".into(),
                style: Style::Dashed,
                points: vec![(lo, fp.perplexity), (hi, fp.perplexity)],
                in_legend: true,
            });
        }
    }
    LinePlot {
        title: format!("{design}: perplexity against average bits"),
        x_label: "average bits per element (codes)".into(),
        y_label: "perplexity".into(),
        log_y: true,
        series,
    }
    .render()
}

/// Layer × head heatmaps of a plan's bits, K and V side by side.
pub fn bits_figure(plan: &PlanBits) -> String {
    let layers = plan.units.iter().map(|u| u.0 + 1).max().unwrap_or(0);
    let heads = plan.units.iter().map(|u| u.1 + 1).max().unwrap_or(0);
    let panel = |kind: &str| {
        let mut values = vec![vec![f64::NAN; heads]; layers];
        for (l, h, k, b) in &plan.units {
            if k == kind {
                values[*l][*h] = *b as f64;
            }
        }
        HeatmapPanel {
            name: kind.to_uppercase(),
            values,
        }
    };
    let (lo, hi) = plan
        .units
        .iter()
        .fold((u8::MAX, 0u8), |(a, b), u| (a.min(u.3), b.max(u.3)));
    Heatmap {
        title: format!(
            "{} at {} bits ({}): bits per layer × KV head",
            plan.design, plan.budget, plan.policy
        ),
        row_label: "layer".into(),
        col_label: "KV head".into(),
        panels: vec![panel("k"), panel("v")],
        lo: lo.min(hi) as f64,
        hi: hi.max(lo.saturating_add(1)) as f64,
    }
    .render()
}

/// Writes every output into `dir` (figures under `dir/figures`), each atomically.
pub fn write_all(dir: &Path, input: &ReportInput) -> Result<()> {
    let figures = dir.join("figures");
    std::fs::create_dir_all(&figures)?;
    write_atomic(
        &dir.join("results.csv"),
        results_csv(input.results).as_bytes(),
    )?;
    let json = serde_json::json!({
        "format": "ratequant-sweep-results",
        "version": 1,
        "command": input.command,
        "args": input.args,
        "fits": input.fits.iter().map(|f| serde_json::json!({
            "design": f.design, "beta": f.beta, "r2": f.r2, "fit_bits": f.fit_bits,
        })).collect::<Vec<_>>(),
        "calibration_timings": input.calibration_timings.iter().map(|(p, t)| serde_json::json!({"phase": p, "seconds": t})).collect::<Vec<_>>(),
        "results": input.results,
    });
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    for f in input.fits {
        write_atomic(
            &figures.join(format!("distortion-{}.svg", f.design)),
            distortion_figure(f).as_bytes(),
        )?;
    }
    let designs = distinct(
        input
            .results
            .iter()
            .filter(|r| !r.cell.is_baseline())
            .map(|r| r.cell.design.clone()),
    );
    for d in &designs {
        write_atomic(
            &figures.join(format!("ppl-{d}.svg")),
            perplexity_figure(d, input.results).as_bytes(),
        )?;
    }
    for h in input.heatmaps {
        write_atomic(&figures.join(heatmap_file(h)), bits_figure(h).as_bytes())?;
    }
    write_atomic(&dir.join("report.md"), report_markdown(input).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::journal::Cell;
    use super::*;

    fn res(design: &str, budget: f64, policy: &str, from: Option<&str>, ppl: f64) -> CellResult {
        CellResult {
            cell: Cell {
                design: design.into(),
                budget,
                policy: policy.into(),
                from: from.map(Into::into),
            },
            achieved_bits: budget,
            effective_bits: budget + 1.0,
            predicted_objective: Some(1.0),
            perplexity: ppl,
            perplexity_se: 0.5,
            kl_mean: ppl / 100.0,
            kl_p99: ppl / 10.0,
            top1: 0.9,
            seconds: 2.0,
            error: None,
        }
    }

    fn fit() -> DesignFit {
        let units = (0..8)
            .map(|i| {
                let alpha = 0.1 * (i + 1) as f64;
                UnitFit {
                    layer: i / 4,
                    head: (i / 2) % 2,
                    kind: if i % 2 == 0 { "k" } else { "v" }.into(),
                    distortion: (1..=8).map(|b| alpha * 4f64.powi(-b)).collect(),
                    alpha,
                    r2: 0.99,
                }
            })
            .collect();
        DesignFit {
            design: "kivi".into(),
            beta: 4.0,
            r2: 0.98,
            measured_bits: (1..=8).collect(),
            fit_bits: vec![1, 2, 3, 4],
            units,
        }
    }

    fn results() -> Vec<CellResult> {
        let mut failed = res("kivi", 2.0, "empirical", None, f64::NAN);
        failed.error = Some("no plan".into());
        vec![
            CellResult {
                cell: Cell::baseline(),
                ..res("fp", 32.0, "fp", None, 10.0)
            },
            res("kivi", 2.0, "uniform", None, 40.0),
            res("kivi", 2.0, "ratequant", None, 20.0),
            res("kivi", 2.0, "mismatched", Some("quarot"), 50.0),
            failed,
            res("kivi", 3.0, "uniform", None, 12.0),
            res("kivi", 3.0, "ratequant", None, 11.0),
        ]
    }

    #[test]
    fn csv_has_a_header_and_one_row_per_result() {
        let r = results();
        let csv = results_csv(&r);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        assert_eq!(lines.len(), 1 + r.len());
        for l in &lines {
            assert_eq!(l.split(',').count(), CSV_COLUMNS.len(), "{l}");
        }
        assert!(
            lines[4].starts_with("kivi,2,mismatched,quarot,"),
            "{}",
            lines[4]
        );
        assert!(lines[5].ends_with(",no plan"), "{}", lines[5]);
        assert!(
            lines[5].contains(",,"),
            "NaN metrics are empty fields: {}",
            lines[5]
        );
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }

    #[test]
    fn report_tables_hold_every_cell_and_the_comparison_to_uniform() {
        let r = results();
        let fits = [fit()];
        let args = serde_json::json!({"model": "tiny"});
        let input = ReportInput {
            command: "ratequant sweep …".into(),
            args: &args,
            fits: &fits,
            heatmaps: &[],
            results: &r,
            calibration_timings: &[("forward".into(), 1.5)],
        };
        let md = report_markdown(&input);
        assert!(md.contains("| kivi | 4.000 | 0.9800 |"), "{md}");
        assert!(
            md.contains("| avg bits | uniform | ratequant | mismatched(quarot) | empirical |"),
            "{md}"
        );
        assert!(
            md.contains("| 2 | 40.000 ± 0.500 | 20.000 ± 0.500 | 50.000 ± 0.500 | error |"),
            "{md}"
        );
        // ratequant halves the perplexity at 2 bits; the excess over fp drops from 30 to 10.
        assert!(md.contains("| 2 | ratequant | -50.0% | -66.7% |"), "{md}");
        assert!(
            md.contains("Full-precision cache: perplexity **10.000 ± 0.500**"),
            "{md}"
        );
        assert!(md.contains("forward 1.50 s"));
    }

    #[test]
    fn figures_are_well_formed_and_hold_the_expected_series() {
        let r = results();
        let svg = perplexity_figure("kivi", &r);
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let names: Vec<&str> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("series"))
            .map(|n| n.attribute("data-name").unwrap())
            .collect();
        // The failed empirical cell has no point, so no series.
        assert_eq!(
            names,
            [
                "uniform",
                "ratequant",
                "mismatched(quarot)",
                "full precision"
            ]
        );

        let f = fit();
        let svg = distortion_figure(&f);
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let series: Vec<&str> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("series"))
            .map(|n| n.attribute("data-name").unwrap())
            .collect();
        assert_eq!(
            series.len(),
            12,
            "6 representative units, measured + fit each: {series:?}"
        );
        assert!(series.iter().filter(|s| s.starts_with("fit ")).count() == 6);

        let plan = PlanBits {
            design: "kivi".into(),
            budget: 2.5,
            policy: "ratequant".into(),
            units: vec![
                (0, 0, "k".into(), 3),
                (0, 0, "v".into(), 2),
                (1, 1, "k".into(), 4),
                (1, 1, "v".into(), 1),
            ],
        };
        let svg = bits_figure(&plan);
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let k_cells: Vec<String> = doc
            .descendants()
            .find(|n| n.attribute("data-name") == Some("K"))
            .unwrap()
            .descendants()
            .filter(|n| n.attribute("class") == Some("cell"))
            .map(|n| n.attribute("data-value").unwrap().to_string())
            .collect();
        assert_eq!(k_cells, ["3", "NaN", "NaN", "4"]);
    }

    #[test]
    fn write_all_writes_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let r = results();
        let fits = [fit()];
        let args = serde_json::json!({});
        let plan = PlanBits {
            design: "kivi".into(),
            budget: 2.0,
            policy: "ratequant".into(),
            units: vec![(0, 0, "k".into(), 2), (0, 0, "v".into(), 2)],
        };
        let heatmaps = [plan];
        let input = ReportInput {
            command: "x".into(),
            args: &args,
            fits: &fits,
            heatmaps: &heatmaps,
            results: &r,
            calibration_timings: &[],
        };
        write_all(dir.path(), &input).unwrap();
        for f in [
            "results.csv",
            "results.json",
            "report.md",
            "figures/distortion-kivi.svg",
            "figures/ppl-kivi.svg",
            "figures/bits-kivi-2-ratequant.svg",
        ] {
            assert!(dir.path().join(f).is_file(), "{f} missing");
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["results"].as_array().unwrap().len(), r.len());
        assert!(json["results"][4]["perplexity"].is_null());
    }
}

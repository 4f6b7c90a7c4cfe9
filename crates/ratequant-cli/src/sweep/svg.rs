//! Hand-written SVG figures: line plots (linear or log-scale y) and bit-allocation heatmaps.
//!
//! The figures are deliberately plain (axes, ticks, labels, legend) so they render the same in
//! a browser, on GitHub and in an image viewer, and need no plotting dependency.

use std::fmt::Write as _;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 420.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 170.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 55.0;

/// A colour-blind-friendly palette (Okabe–Ito), cycled by series index.
const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
];

pub fn palette(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Solid line with a marker at each point.
    LineMarkers,
    /// Markers only (measurements).
    Markers,
    /// Dashed line without markers (fitted models).
    Dashed,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: String,
    pub style: Style,
    pub points: Vec<(f64, f64)>,
    /// Whether the series gets a legend entry (fits drawn beside their measurements share one).
    pub in_legend: bool,
}

#[derive(Debug, Clone)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

/// Escapes text for use in SVG character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

/// Tick values spanning `[lo, hi]`: "nice" steps (1, 2, 5 × 10^k), about `target` of them.
fn linear_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= target as f64)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut ticks = Vec::new();
    let mut t = first;
    while t <= hi + step * 1e-9 {
        ticks.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    ticks
}

fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 || (v.fract()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let digits = (-a.log10()).ceil() as usize + 1;
        format!("{v:.digits$}")
    }
}

struct Frame {
    x_lo: f64,
    x_hi: f64,
    y_lo: f64,
    y_hi: f64,
    log_y: bool,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        let w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
        MARGIN_LEFT + (x - self.x_lo) / (self.x_hi - self.x_lo) * w
    }
    fn py(&self, y: f64) -> f64 {
        let h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
        let (y, lo, hi) = if self.log_y {
            (y.log10(), self.y_lo.log10(), self.y_hi.log10())
        } else {
            (y, self.y_lo, self.y_hi)
        };
        MARGIN_TOP + h - (y - lo) / (hi - lo) * h
    }
}

impl LinePlot {
    /// Renders the plot. Points that cannot be drawn (non-finite, or ≤ 0 on a log axis) are
    /// skipped; a plot with no drawable point still renders its axes and a note.
    pub fn render(&self) -> String {
        let drawable =
            |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!self.log_y || y > 0.0);
        let all: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied().filter(drawable))
            .collect();
        let (mut x_lo, mut x_hi, mut y_lo, mut y_hi) = all.iter().fold(
            (
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ),
            |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
        );
        if all.is_empty() {
            (x_lo, x_hi, y_lo, y_hi) = (0.0, 1.0, 1.0, 10.0);
        }
        if x_hi - x_lo < 1e-12 {
            x_lo -= 0.5;
            x_hi += 0.5;
        }
        if self.log_y {
            // Whole decades keep the ticks readable.
            y_lo = 10f64.powf(y_lo.log10().floor());
            y_hi = 10f64.powf(y_hi.log10().ceil());
            if y_hi <= y_lo {
                y_hi = y_lo * 10.0;
            }
        } else {
            let pad = ((y_hi - y_lo) * 0.05).max(1e-9);
            y_lo -= pad;
            y_hi += pad;
        }
        let frame = Frame {
            x_lo,
            x_hi,
            y_lo,
            y_hi,
            log_y: self.log_y,
        };

        let mut s = String::new();
        header(&mut s, WIDTH, HEIGHT, &self.title);
        // Axes box.
        let (l, r, t, b) = (
            MARGIN_LEFT,
            WIDTH - MARGIN_RIGHT,
            MARGIN_TOP,
            HEIGHT - MARGIN_BOTTOM,
        );
        let _ = writeln!(
            s,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            r - l,
            b - t
        );
        // X ticks.
        for x in linear_ticks(x_lo, x_hi, 8) {
            let px = frame.px(x);
            let _ = writeln!(
                s,
                r##"<line x1="{px:.1}" y1="{b}" x2="{px:.1}" y2="{:.1}" stroke="#333"/>"##,
                b + 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"#,
                b + 18.0,
                format_tick(x)
            );
        }
        // Y ticks and light grid lines.
        let y_ticks: Vec<f64> = if self.log_y {
            let (d0, d1) = (y_lo.log10().round() as i32, y_hi.log10().round() as i32);
            let every = ((d1 - d0) as usize).div_ceil(8).max(1);
            (d0..=d1).step_by(every).map(|d| 10f64.powi(d)).collect()
        } else {
            linear_ticks(y_lo, y_hi, 6)
        };
        for y in y_ticks {
            let py = frame.py(y);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{py:.1}" x2="{r}" y2="{py:.1}" stroke="#ddd"/>"##
            );
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{py:.1}" x2="{l}" y2="{py:.1}" stroke="#333"/>"##,
                l - 5.0
            );
            let label = if self.log_y {
                format!("1e{}", y.log10().round() as i32)
            } else {
                format_tick(y)
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{label}</text>"#,
                l - 8.0,
                py + 4.0
            );
        }
        // Axis labels.
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            (l + r) / 2.0,
            HEIGHT - 15.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {:.1})">{}</text>"#,
            (t + b) / 2.0,
            (t + b) / 2.0,
            escape(&self.y_label)
        );
        if all.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" fill="#888">no data</text>"##,
                (l + r) / 2.0,
                (t + b) / 2.0
            );
        }
        // Series, each in a group carrying its name so tests and readers can find it.
        for series in &self.series {
            let pts: Vec<(f64, f64)> = series
                .points
                .iter()
                .copied()
                .filter(drawable)
                .map(|(x, y)| (frame.px(x), frame.py(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<g class="series" data-name="{}">"#,
                escape(&series.name)
            );
            if matches!(series.style, Style::LineMarkers | Style::Dashed) && pts.len() > 1 {
                let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
                let dash = if series.style == Style::Dashed {
                    r#" stroke-dasharray="5,4""#
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.6"{dash}/>"#,
                    path.join(" "),
                    series.color
                );
            }
            if matches!(series.style, Style::LineMarkers | Style::Markers) {
                for (x, y) in &pts {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{}"/>"#,
                        series.color
                    );
                }
            }
            let _ = writeln!(s, "</g>");
        }
        // Legend.
        let mut ly = t + 8.0;
        let lx = r + 12.0;
        for series in self.series.iter().filter(|s| s.in_legend) {
            let dash = if series.style == Style::Dashed {
                r#" stroke-dasharray="5,4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/>"#,
                lx + 22.0,
                series.color
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                lx + 28.0,
                ly + 4.0,
                escape(&series.name)
            );
            ly += 17.0;
        }
        s.push_str("</svg>\n");
        s
    }
}

fn header(s: &mut String, width: f64, height: f64, title: &str) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, "<title>{}</title>", escape(title));
    let _ = writeln!(
        s,
        r#"<rect width="{width}" height="{height}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
}

/// One panel of a heatmap: `values[row][col]` (rows = layers, cols = heads).
#[derive(Debug, Clone)]
pub struct HeatmapPanel {
    pub name: String,
    pub values: Vec<Vec<f64>>,
}

/// Side-by-side heatmap panels sharing one colour scale (for example K and V bits per
/// layer × head), each cell labelled with its value.
#[derive(Debug, Clone)]
pub struct Heatmap {
    pub title: String,
    pub row_label: String,
    pub col_label: String,
    pub panels: Vec<HeatmapPanel>,
    /// Colour scale range; values are clamped into it.
    pub lo: f64,
    pub hi: f64,
}

/// White → dark blue ramp for `t` in [0, 1].
fn ramp(t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        lerp(247.0, 8.0),
        lerp(251.0, 48.0),
        lerp(255.0, 107.0)
    )
}

impl Heatmap {
    pub fn render(&self) -> String {
        let rows = self
            .panels
            .iter()
            .map(|p| p.values.len())
            .max()
            .unwrap_or(0);
        let cols = self
            .panels
            .iter()
            .map(|p| p.values.iter().map(Vec::len).max().unwrap_or(0))
            .max()
            .unwrap_or(0);
        // Cells shrink with the model so a 30-layer model stays on one screen.
        let cell_h = (560.0 / rows.max(1) as f64).clamp(8.0, 22.0);
        let cell_w = (220.0 / cols.max(1) as f64).clamp(14.0, 40.0);
        let panel_w = cell_w * cols as f64;
        let (top, left, gap) = (60.0, 60.0, 50.0);
        let width = left + self.panels.len() as f64 * (panel_w + gap) + 120.0;
        let height = top + cell_h * rows as f64 + 50.0;
        let mut s = String::new();
        header(&mut s, width, height, &self.title);
        let span = (self.hi - self.lo).max(1e-12);
        let text_size = (cell_h * 0.6).min(11.0);
        for (pi, panel) in self.panels.iter().enumerate() {
            let x0 = left + pi as f64 * (panel_w + gap);
            let _ = writeln!(
                s,
                r#"<g class="panel" data-name="{}">"#,
                escape(&panel.name)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
                x0 + panel_w / 2.0,
                top - 22.0,
                escape(&panel.name)
            );
            for c in 0..cols {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{c}</text>"#,
                    x0 + (c as f64 + 0.5) * cell_w,
                    top - 6.0
                );
            }
            for (r, row) in panel.values.iter().enumerate() {
                let y = top + r as f64 * cell_h;
                if pi == 0 || r % 5 == 0 {
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="10">{r}</text>"#,
                        x0 - 4.0,
                        y + cell_h * 0.5 + 3.5
                    );
                }
                for (c, &v) in row.iter().enumerate() {
                    let x = x0 + c as f64 * cell_w;
                    if !v.is_finite() {
                        // A unit the plan does not cover: grey, unlabelled.
                        let _ = writeln!(
                            s,
                            r##"<rect class="cell" x="{x:.1}" y="{y:.1}" width="{cell_w:.1}" height="{cell_h:.1}" fill="#e0e0e0" stroke="#fff" stroke-width="0.5" data-value="{v}"/>"##
                        );
                        continue;
                    }
                    let t = (v - self.lo) / span;
                    let _ = writeln!(
                        s,
                        r##"<rect class="cell" x="{x:.1}" y="{y:.1}" width="{cell_w:.1}" height="{cell_h:.1}" fill="{}" stroke="#fff" stroke-width="0.5" data-value="{v}"/>"##,
                        ramp(t)
                    );
                    let fg = if t > 0.55 { "#fff" } else { "#000" };
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="{text_size:.1}" fill="{fg}">{}</text>"#,
                        x + cell_w / 2.0,
                        y + cell_h * 0.5 + text_size * 0.35,
                        format_tick(v)
                    );
                }
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">{}</text>"#,
                x0 + panel_w / 2.0,
                top + cell_h * rows as f64 + 20.0,
                escape(&self.col_label)
            );
            let _ = writeln!(s, "</g>");
        }
        let _ = writeln!(
            s,
            r#"<text x="14" y="{:.1}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {:.1})">{}</text>"#,
            top + cell_h * rows as f64 / 2.0,
            top + cell_h * rows as f64 / 2.0,
            escape(&self.row_label)
        );
        // Colour bar.
        let bx = left + self.panels.len() as f64 * (panel_w + gap) + 10.0;
        let steps = 8;
        for i in 0..steps {
            let t = i as f64 / (steps - 1) as f64;
            let _ = writeln!(
                s,
                r##"<rect x="{bx:.1}" y="{:.1}" width="16" height="16" fill="{}" stroke="#ccc"/>"##,
                top + i as f64 * 18.0,
                ramp(t)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"#,
                bx + 22.0,
                top + i as f64 * 18.0 + 12.0,
                format_tick(self.lo + t * span)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg)
            .unwrap_or_else(|e| panic!("SVG is not well-formed XML: {e}\n{svg}"))
    }

    fn series_names(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.attribute("class") == Some("series"))
            .map(|n| n.attribute("data-name").unwrap().to_string())
            .collect()
    }

    #[test]
    fn line_plot_is_well_formed_and_names_every_series() {
        let plot = LinePlot {
            title: "D <vs> bits & \"fits\"".into(),
            x_label: "bits".into(),
            y_label: "MSE".into(),
            log_y: true,
            series: vec![
                Series {
                    name: "L0 H1 k".into(),
                    color: palette(0).into(),
                    style: Style::Markers,
                    points: vec![(1.0, 0.5), (2.0, 0.1), (3.0, 0.02), (4.0, 0.0)],
                    in_legend: true,
                },
                Series {
                    name: "fit L0 H1 k".into(),
                    color: palette(0).into(),
                    style: Style::Dashed,
                    points: vec![(1.0, 0.4), (4.0, 0.004)],
                    in_legend: false,
                },
            ],
        };
        let svg = plot.render();
        let doc = parse(&svg);
        assert_eq!(series_names(&doc), ["L0 H1 k", "fit L0 H1 k"]);
        // The zero distortion cannot sit on a log axis: 3 markers, not 4.
        let markers = doc
            .descendants()
            .find(|n| n.attribute("data-name") == Some("L0 H1 k"))
            .unwrap()
            .children()
            .filter(|n| n.has_tag_name("circle"))
            .count();
        assert_eq!(markers, 3);
        let dashed = doc
            .descendants()
            .filter(|n| n.attribute("stroke-dasharray").is_some())
            .count();
        assert_eq!(dashed, 1, "only the fit is dashed (legend skips it)");
        assert!(
            doc.descendants().any(|n| n.text() == Some("1e-3")),
            "log ticks label decades"
        );
        assert_eq!(
            doc.root_element()
                .children()
                .find(|n| n.has_tag_name("title"))
                .unwrap()
                .text(),
            Some("D <vs> bits & \"fits\"")
        );
        // Every drawn point lies inside the plotting box.
        for c in doc.descendants().filter(|n| n.has_tag_name("circle")) {
            let cx: f64 = c.attribute("cx").unwrap().parse().unwrap();
            let cy: f64 = c.attribute("cy").unwrap().parse().unwrap();
            assert!((MARGIN_LEFT - 0.01..=WIDTH - MARGIN_RIGHT + 0.01).contains(&cx));
            assert!((MARGIN_TOP - 0.01..=HEIGHT - MARGIN_BOTTOM + 0.01).contains(&cy));
        }
    }

    #[test]
    fn empty_plot_still_renders() {
        let plot = LinePlot {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_y: true,
            series: vec![],
        };
        let svg = plot.render();
        let doc = parse(&svg);
        assert!(doc.descendants().any(|n| n.text() == Some("no data")));
    }

    #[test]
    fn heatmap_has_one_cell_per_value() {
        let k = HeatmapPanel {
            name: "K".into(),
            values: vec![vec![2.0, 3.0, 4.0], vec![1.0, 2.0, 8.0]],
        };
        let v = HeatmapPanel {
            name: "V".into(),
            values: vec![vec![2.0, 2.0, 2.0], vec![3.0, 3.0, 3.0]],
        };
        let map = Heatmap {
            title: "bits".into(),
            row_label: "layer".into(),
            col_label: "KV head".into(),
            panels: vec![k, v],
            lo: 1.0,
            hi: 8.0,
        };
        let svg = map.render();
        let doc = parse(&svg);
        let panels: Vec<_> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some("panel"))
            .collect();
        assert_eq!(panels.len(), 2);
        let values: Vec<f64> = panels[0]
            .descendants()
            .filter(|n| n.attribute("class") == Some("cell"))
            .map(|n| n.attribute("data-value").unwrap().parse().unwrap())
            .collect();
        assert_eq!(values, [2.0, 3.0, 4.0, 1.0, 2.0, 8.0]);
        // Extremes of the scale get the ramp's ends.
        let fills: Vec<&str> = panels[0]
            .descendants()
            .filter(|n| n.attribute("class") == Some("cell"))
            .map(|n| n.attribute("fill").unwrap())
            .collect();
        assert_eq!(fills[3], "#f7fbff");
        assert_eq!(fills[5], "#08306b");
    }

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        let t = linear_ticks(1.0, 8.0, 8);
        assert_eq!(t, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let t = linear_ticks(0.0, 1.0, 6);
        assert_eq!(t.first(), Some(&0.0));
        assert!((t.last().unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(format_tick(2.5), "2.5");
        assert_eq!(format_tick(0.02), "0.020");
    }
}

//! Fitting the distortion model `D_i(b) = α_i·β^(−b)` and the calibration entry point.
//!
//! The fit is least squares on `ln D_i(b) = ln α_i − b·ln β` over the fit bits:
//! * `shared` β (the paper's model): one slope for all units with a free intercept per unit
//!   (pooled within-unit regression), `ln β = −Σ_i Σ_b (b − b̄_i)(y_ib − ȳ_i) / Σ_i Σ_b (b − b̄_i)²`;
//! * `per-unit` β: an ordinary regression per unit.
//!
//! Zero distortion: a point whose distortion is at most `ZERO_FLOOR × mean(x²)` of its unit
//! (the tile is reproduced exactly, up to float rounding) has no finite logarithm and carries
//! no information about the slope; it is left out of the fit. A unit keeps its other points;
//! with one point left its α follows from that point and the shared β; with none left
//! `α = 0` (the model says: no distortion at any bit-width). In per-unit mode a unit with fewer
//! than two points uses the pooled β. If no unit has two points at all, β cannot be fitted and
//! that is an error.

use std::collections::HashSet;

use crate::bits::BitList;
use crate::distortion::{self, UnitDistortion, UnitImportance, UnitTiles};
use crate::formats::{
    BetaMode, Calib, CalibUnit, DistortionTarget, ImportanceSource, QuantizerInfo, CALIB_FORMAT,
    FORMAT_VERSION,
};
use crate::quant::Quantizer;
use crate::{Error, Result};

/// Distortion at or below this fraction of the unit's mean square counts as zero.
pub const ZERO_FLOOR: f64 = 1e-12;

/// What to measure and how to fit.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOptions {
    /// Bit-widths whose distortion is measured and stored (default 1..=8).
    pub measured_bits: BitList,
    /// Bit-widths the model is fitted on (default 1..=4); a subset of `measured_bits`.
    pub fit_bits: BitList,
    pub beta_mode: BetaMode,
    pub target: DistortionTarget,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            measured_bits: BitList::range(1, 8).expect("1..=8 is a valid bit range"),
            fit_bits: BitList::range(1, 4).expect("1..=4 is a valid bit range"),
            beta_mode: BetaMode::Shared,
            target: DistortionTarget::Mse,
        }
    }
}

impl FitOptions {
    pub fn validate(&self) -> Result<()> {
        if self.fit_bits.len() < 2 {
            return Err(Error::invalid(format!(
                "fit bits {} must contain at least two bit-widths to fit a slope",
                self.fit_bits
            )));
        }
        if !self.fit_bits.is_subset_of(&self.measured_bits) {
            return Err(Error::invalid(format!(
                "fit bits {} must all be measured (measured bits {})",
                self.fit_bits, self.measured_bits
            )));
        }
        Ok(())
    }
}

/// One unit's fitted parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitFit {
    pub alpha: f64,
    /// The unit's own β (per-unit mode only).
    pub beta: Option<f64>,
    pub r2: Option<f64>,
    /// Fit bit-widths that entered the fit (distortion above the floor).
    pub points: Vec<u8>,
}

/// The fitted model of one design.
#[derive(Debug, Clone, PartialEq)]
pub struct FitResult {
    /// Pooled β over all units.
    pub beta: f64,
    /// Share of the within-unit variation of ln D explained (null if there is none).
    pub r2: Option<f64>,
    pub units: Vec<UnitFit>,
}

/// Usable points of one unit: (bit-width, ln D).
fn usable_points(table: &[f64], fit_bits: &[u8], mean_square: f64) -> Vec<(f64, f64)> {
    let floor = ZERO_FLOOR * mean_square;
    fit_bits
        .iter()
        .zip(table)
        .filter(|&(_, &d)| d > floor && d > 0.0)
        .map(|(&b, &d)| (b as f64, d.ln()))
        .collect()
}

/// Centred sums of one unit's points: (Σ(b−b̄)(y−ȳ), Σ(b−b̄)², Σ(y−ȳ)², b̄, ȳ).
fn centred_sums(points: &[(f64, f64)]) -> (f64, f64, f64, f64, f64) {
    let n = points.len() as f64;
    let b_mean = points.iter().map(|p| p.0).sum::<f64>() / n;
    let y_mean = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for &(b, y) in points {
        sxy += (b - b_mean) * (y - y_mean);
        sxx += (b - b_mean) * (b - b_mean);
        syy += (y - y_mean) * (y - y_mean);
    }
    (sxy, sxx, syy, b_mean, y_mean)
}

/// Residual and total sums of squares of `points` under slope `−ln β` and the best intercept;
/// returns (ln α, SS_res, SS_tot).
fn intercept_and_residuals(points: &[(f64, f64)], ln_beta: f64) -> (f64, f64, f64) {
    let (_, _, syy, b_mean, y_mean) = centred_sums(points);
    let ln_alpha = y_mean + ln_beta * b_mean;
    let ss_res = points
        .iter()
        .map(|&(b, y)| (y - (ln_alpha - ln_beta * b)).powi(2))
        .sum();
    (ln_alpha, ss_res, syy)
}

/// Fits the model to distortion tables. `tables[i][j]` is unit `i`'s distortion at
/// `fit_bits[j]`; `mean_squares[i]` is the unit's mean square (for the zero floor).
pub fn fit_tables(
    tables: &[Vec<f64>],
    fit_bits: &[u8],
    mean_squares: &[f64],
    mode: BetaMode,
) -> Result<FitResult> {
    assert_eq!(
        tables.len(),
        mean_squares.len(),
        "one mean square per table"
    );
    if fit_bits.len() < 2 {
        return Err(Error::invalid("at least two fit bit-widths are needed"));
    }
    if let Some((i, t)) = tables
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() != fit_bits.len())
    {
        return Err(Error::invalid(format!(
            "table {i} has {} values for {} fit bits",
            t.len(),
            fit_bits.len()
        )));
    }
    if let Some((i, d)) = tables
        .iter()
        .enumerate()
        .flat_map(|(i, t)| t.iter().map(move |d| (i, *d)))
        .find(|(_, d)| !(d.is_finite() && *d >= 0.0))
    {
        return Err(Error::invalid(format!(
            "table {i}: distortion {d} must be finite and non-negative"
        )));
    }
    let points: Vec<Vec<(f64, f64)>> = tables
        .iter()
        .zip(mean_squares)
        .map(|(t, &ms)| usable_points(t, fit_bits, ms))
        .collect();

    // Pooled slope over the units with at least two points.
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for p in points.iter().filter(|p| p.len() >= 2) {
        let (uxy, uxx, ..) = centred_sums(p);
        sxy += uxy;
        sxx += uxx;
    }
    if sxx == 0.0 {
        return Err(Error::invalid(format!(
            "cannot fit β: no unit has non-zero distortion at two or more of the fit bits {fit_bits:?} \
             (the tiles are reproduced exactly there); choose lower fit bits"
        )));
    }
    let pooled_ln_beta = -sxy / sxx;

    let (mut ss_res_all, mut ss_tot_all) = (0.0, 0.0);
    let mut units = Vec::with_capacity(tables.len());
    for (p, _) in points.iter().zip(tables) {
        let own_ln_beta = match mode {
            BetaMode::PerUnit if p.len() >= 2 => {
                let (uxy, uxx, ..) = centred_sums(p);
                -uxy / uxx
            }
            _ => pooled_ln_beta,
        };
        let used: Vec<u8> = p.iter().map(|&(b, _)| b as u8).collect();
        if p.is_empty() {
            units.push(UnitFit {
                alpha: 0.0,
                beta: (mode == BetaMode::PerUnit).then(|| pooled_ln_beta.exp()),
                r2: None,
                points: used,
            });
            continue;
        }
        let (ln_alpha, ss_res, ss_tot) = intercept_and_residuals(p, own_ln_beta);
        let r2 = if p.len() >= 2 && ss_tot > 0.0 {
            ss_res_all += ss_res;
            ss_tot_all += ss_tot;
            Some(1.0 - ss_res / ss_tot)
        } else {
            None
        };
        let alpha = ln_alpha.exp();
        if !alpha.is_finite() {
            return Err(Error::invalid(format!(
                "fitted α overflows (ln α = {ln_alpha}); distortions are out of range"
            )));
        }
        units.push(UnitFit {
            alpha,
            beta: (mode == BetaMode::PerUnit).then(|| own_ln_beta.exp()),
            r2,
            points: used,
        });
    }
    let r2 = (ss_tot_all > 0.0).then(|| 1.0 - ss_res_all / ss_tot_all);
    Ok(FitResult {
        beta: pooled_ln_beta.exp(),
        r2,
        units,
    })
}

/// Measures every unit's distortion with `quantizer` and fits the model: the single code path
/// behind both `ratequant fit` (tiles from a file) and `ratequant calibrate` (tiles captured
/// from a model). Units are written sorted by (layer, head, K before V).
pub fn calibrate(
    units: &[UnitTiles],
    quantizer: &dyn Quantizer,
    opts: &FitOptions,
) -> Result<Calib> {
    calibrate_timed(units, quantizer, opts).map(|(calib, _)| calib)
}

/// Seconds spent in each phase of [`calibrate_timed`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CalibrateTimings {
    /// Fake-quantizing every unit at every measured bit-width.
    pub distortion_s: f64,
    /// The regression and the assembly of the CALIB.
    pub fit_s: f64,
}

/// [`calibrate`], also reporting how long measuring and fitting took.
pub fn calibrate_timed(
    units: &[UnitTiles],
    quantizer: &dyn Quantizer,
    opts: &FitOptions,
) -> Result<(Calib, CalibrateTimings)> {
    opts.validate()?;
    if units.is_empty() {
        return Err(Error::invalid("no units to calibrate"));
    }
    let mut seen = HashSet::new();
    for u in units {
        u.validate()?;
        if !seen.insert((u.layer, u.head, u.kind)) {
            return Err(Error::invalid(format!("{} appears twice", u.label())));
        }
    }
    let importance = importance_source(units)?;
    if opts.target == DistortionTarget::Weighted && importance != ImportanceSource::PerElement {
        return Err(Error::invalid(
            "the weighted distortion target needs per-element importance for every unit (layers.{l}.k_importance / v_importance of the data's shape)",
        ));
    }
    let sequences = units[0].tiles.len();
    if let Some(u) = units.iter().find(|u| u.tiles.len() != sequences) {
        return Err(Error::invalid(format!(
            "{} has {} sequences, {} has {sequences}: all units need the same sequences",
            u.label(),
            u.tiles.len(),
            units[0].label()
        )));
    }

    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&i| (units[i].layer, units[i].head, units[i].kind));
    let sorted: Vec<&UnitTiles> = order.iter().map(|&i| &units[i]).collect();

    let measured_bits = opts.measured_bits.as_slice();
    let start = std::time::Instant::now();
    let measured: Vec<UnitDistortion> = {
        use rayon::prelude::*;
        sorted
            .par_iter()
            .map(|u| distortion::measure_unit(u, quantizer, measured_bits))
            .collect::<Result<_>>()?
    };

    let distortion_s = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let fit_index: Vec<usize> = opts
        .fit_bits
        .as_slice()
        .iter()
        .map(|&b| opts.measured_bits.index_of(b).expect("validated subset"))
        .collect();
    let tables: Vec<Vec<f64>> = measured
        .iter()
        .map(|m| {
            let table = match opts.target {
                DistortionTarget::Weighted => {
                    m.weighted.as_ref().expect("checked per-element importance")
                }
                DistortionTarget::Mse => &m.mse,
            };
            fit_index.iter().map(|&j| table[j]).collect()
        })
        .collect();
    let mean_squares: Vec<f64> = measured.iter().map(|m| m.mean_square).collect();
    let fit = fit_tables(
        &tables,
        opts.fit_bits.as_slice(),
        &mean_squares,
        opts.beta_mode,
    )?;

    let calib_units = sorted
        .iter()
        .zip(measured)
        .zip(fit.units)
        .map(|((u, m), f)| CalibUnit {
            layer: u.layer,
            head: u.head,
            kind: u.kind,
            tokens: u.shape.tokens,
            head_dim: u.shape.head_dim,
            elements: m.elements,
            importance: m.weight,
            variance: m.variance,
            mean_square: m.mean_square,
            metadata_bits: quantizer.metadata_bits_per_element(u.shape, u.kind),
            distortion: m.mse,
            weighted_distortion: m.weighted,
            alpha: f.alpha,
            beta: f.beta,
            r2: f.r2,
            fit_points: f.points,
        })
        .collect();
    let calib = Calib {
        format: CALIB_FORMAT.to_string(),
        version: FORMAT_VERSION,
        quantizer: QuantizerInfo::of(quantizer),
        measured_bits: opts.measured_bits.clone(),
        fit_bits: opts.fit_bits.clone(),
        target: opts.target,
        importance,
        beta_mode: opts.beta_mode,
        beta: fit.beta,
        r2: fit.r2,
        zero_floor: ZERO_FLOOR,
        sequences,
        units: calib_units,
    };
    calib
        .validate()
        .map_err(|msg| Error::invalid(format!("internal error, invalid calibration: {msg}")))?;
    Ok((
        calib,
        CalibrateTimings {
            distortion_s,
            fit_s: start.elapsed().as_secs_f64(),
        },
    ))
}

/// All units must agree on whether importance is given; per-element wins only if every unit
/// has it.
fn importance_source(units: &[UnitTiles]) -> Result<ImportanceSource> {
    let with = units.iter().filter(|u| u.importance.is_some()).count();
    if with == 0 {
        return Ok(ImportanceSource::None);
    }
    if with != units.len() {
        let missing = units
            .iter()
            .find(|u| u.importance.is_none())
            .expect("some unit lacks importance");
        return Err(Error::invalid(format!(
            "{} has no importance while other units do: give importance for every unit or none",
            missing.label()
        )));
    }
    let all_elementwise = units
        .iter()
        .all(|u| matches!(u.importance, Some(UnitImportance::PerElement(_))));
    Ok(if all_elementwise {
        ImportanceSource::PerElement
    } else {
        ImportanceSource::PerUnit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_tables(alphas: &[f64], beta: f64, bits: &[u8]) -> Vec<Vec<f64>> {
        alphas
            .iter()
            .map(|&a| bits.iter().map(|&b| a * beta.powi(-(b as i32))).collect())
            .collect()
    }

    #[test]
    fn recovers_exact_curves() {
        let bits = [1, 2, 3, 4];
        let alphas = [0.5, 3.0, 1e-3];
        let t = exact_tables(&alphas, 4.5, &bits);
        let fit = fit_tables(&t, &bits, &[1.0; 3], BetaMode::Shared).unwrap();
        assert!((fit.beta - 4.5).abs() < 1e-10, "{}", fit.beta);
        for (u, a) in fit.units.iter().zip(alphas) {
            assert!((u.alpha / a - 1.0).abs() < 1e-10);
            assert!((u.r2.unwrap() - 1.0).abs() < 1e-12);
        }
        assert!((fit.r2.unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn zero_distortion_points_are_left_out_and_alpha_stays_finite() {
        let bits = [1, 2, 3, 4];
        let mut t = exact_tables(&[1.0, 2.0], 4.0, &bits);
        t[1][2] = 0.0;
        t[1][3] = 0.0;
        let t2 = vec![vec![0.0; 4]];
        let fit = fit_tables(
            &[t.clone(), t2].concat(),
            &bits,
            &[1.0, 1.0, 0.0],
            BetaMode::Shared,
        )
        .unwrap();
        assert!((fit.beta - 4.0).abs() < 1e-10);
        assert!((fit.units[1].alpha - 2.0).abs() < 1e-10);
        assert_eq!(fit.units[1].points, vec![1, 2]);
        assert_eq!(fit.units[2].alpha, 0.0);
        assert_eq!(fit.units[2].r2, None);
    }

    #[test]
    fn all_zero_is_an_error_not_nan() {
        let err = fit_tables(&[vec![0.0; 4]], &[1, 2, 3, 4], &[1.0], BetaMode::Shared).unwrap_err();
        assert!(err.to_string().contains("cannot fit β"), "{err}");
    }
}

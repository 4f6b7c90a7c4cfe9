//! Turning a CALIB into a PLAN: the allocation policies.
//!
//! Every policy minimises the same objective `Σ_i w_i·D_i(b_i)` (element-weighted mean bits =
//! budget, bits from the allowed set, `w_i` the unit's importance); they differ only in `D_i`:
//! * `ratequant` — the fitted model `α_i·β^(−b)` (with `--distortion-from`, another design's);
//! * `empirical` — the measured table itself, no parametric model;
//! * `textbook` — `variance_i·4^(−b)`, the classic Gaussian model;
//! * `uniform` — no optimisation: every unit gets `⌊B⌋` bits and the remaining element-bits go
//!   one extra bit per unit in unit order (layer, head, K before V) while they last.

use std::fmt;
use std::str::FromStr;

use crate::allocate::{self, ModelUnit};
use crate::bits::BitList;
use crate::formats::{
    Calib, ContinuousSummary, Plan, PlanObjective, PlanUnit, FORMAT_VERSION, PLAN_FORMAT,
};
use crate::{Error, Result};

/// An allocation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Ratequant,
    Empirical,
    Textbook,
    Uniform,
}

pub const POLICIES: &[&str] = &["ratequant", "empirical", "textbook", "uniform"];

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Ratequant => "ratequant",
            Policy::Empirical => "empirical",
            Policy::Textbook => "textbook",
            Policy::Uniform => "uniform",
        }
    }
}

impl FromStr for Policy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Policy> {
        match s {
            "ratequant" => Ok(Policy::Ratequant),
            "empirical" => Ok(Policy::Empirical),
            "textbook" => Ok(Policy::Textbook),
            "uniform" => Ok(Policy::Uniform),
            other => Err(Error::invalid(format!(
                "unknown policy `{other}` (known: {})",
                POLICIES.join(", ")
            ))),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to allocate.
#[derive(Debug, Clone)]
pub struct PlanOptions<'a> {
    /// Requested mean code bits per element.
    pub avg_bits: f64,
    pub allowed: BitList,
    pub policy: Policy,
    /// Another design's calibration whose model (`ratequant`) or table (`empirical`) to use.
    pub distortion_from: Option<&'a Calib>,
}

/// The element-bit budget `⌊B·N⌋`, treating a product within float rounding of an integer as
/// that integer (2.3 × 1000 is 2300, not 2299).
pub fn element_bit_budget(avg_bits: f64, total_elements: u64) -> u64 {
    let exact = avg_bits * total_elements as f64;
    let rounded = exact.round();
    if (exact - rounded).abs() <= 1e-9 * exact.max(1.0) {
        rounded as u64
    } else {
        exact.floor() as u64
    }
}

/// `B·N` is exactly an integer (within float rounding) — otherwise no plan can meet it exactly.
fn budget_is_integral(avg_bits: f64, total_elements: u64) -> bool {
    let exact = avg_bits * total_elements as f64;
    (exact - exact.round()).abs() <= 1e-9 * exact.max(1.0)
}

/// The uniform allocation, or why it is impossible with these allowed bits.
pub fn uniform_bits(
    elements: &[u64],
    allowed: &BitList,
    target: u64,
) -> std::result::Result<Vec<u8>, String> {
    let total: u64 = elements.iter().sum();
    let floor = (target / total).min(allowed.max() as u64) as u8;
    if !allowed.contains(floor) {
        return Err(format!(
            "uniform needs ⌊B⌋ = {floor} bits, which allowed bits {allowed} exclude"
        ));
    }
    let mut bits = vec![floor; elements.len()];
    let mut remaining = target - total * floor as u64;
    if remaining > 0 {
        if !allowed.contains(floor + 1) {
            return Err(format!(
                "uniform needs {} bits for the remainder, which allowed bits {allowed} exclude",
                floor + 1
            ));
        }
        for (b, &n) in bits.iter_mut().zip(elements) {
            if n <= remaining {
                *b += 1;
                remaining -= n;
            }
        }
    }
    Ok(bits)
}

/// Makes a plan from `calib` (this design's calibration) under `opts`.
pub fn make_plan(calib: &Calib, opts: &PlanOptions) -> Result<Plan> {
    calib
        .validate()
        .map_err(|m| Error::invalid(format!("invalid calibration: {m}")))?;
    let allowed = &opts.allowed;
    let (lo, hi) = (allowed.min(), allowed.max());
    if !(opts.avg_bits.is_finite() && opts.avg_bits >= lo as f64 && opts.avg_bits <= hi as f64) {
        return Err(Error::invalid(format!(
            "budget {} bits per element is outside the allowed bits {allowed} (between {lo} and {hi})",
            opts.avg_bits
        )));
    }
    let source = match (opts.distortion_from, opts.policy) {
        (Some(other), Policy::Ratequant | Policy::Empirical) => {
            check_same_units(calib, other)?;
            other
        }
        (Some(_), p) => {
            return Err(Error::invalid(format!(
                "--distortion-from applies to the ratequant and empirical policies, not `{p}`"
            )))
        }
        (None, _) => calib,
    };

    let elements: Vec<u64> = calib.units.iter().map(|u| u.elements).collect();
    let total_elements: u64 = elements.iter().sum();
    let target = element_bit_budget(opts.avg_bits, total_elements);
    let mut warnings = Vec::new();

    let fitted = |c: &Calib| -> Vec<ModelUnit> {
        c.units
            .iter()
            .zip(&calib.units)
            .map(|(u, own)| ModelUnit {
                elements: own.elements,
                weight: own.importance,
                alpha: u.alpha,
                beta: c.unit_beta(u),
            })
            .collect()
    };
    // The policy's distortion model: a parametric one, or a table.
    let (model_name, model, table): (String, Option<Vec<ModelUnit>>, Option<Vec<f64>>) =
        match opts.policy {
            Policy::Ratequant | Policy::Uniform => {
                let name = match opts.distortion_from {
                    Some(o) => format!("fitted:{}", o.quantizer),
                    None => "fitted".to_string(),
                };
                (name, Some(fitted(source)), None)
            }
            Policy::Textbook => {
                let m = calib
                    .units
                    .iter()
                    .map(|u| ModelUnit {
                        elements: u.elements,
                        weight: u.importance,
                        alpha: u.variance,
                        beta: 4.0,
                    })
                    .collect();
                ("textbook".to_string(), Some(m), None)
            }
            Policy::Empirical => {
                let name = match opts.distortion_from {
                    Some(o) => format!("empirical:{}", o.quantizer),
                    None => "empirical".to_string(),
                };
                (name, None, Some(measured_costs(source, calib, allowed)?))
            }
        };
    let costs: Vec<f64> = match (&model, &table) {
        (_, Some(t)) => t.clone(),
        (Some(m), None) => m
            .iter()
            .flat_map(|u| allowed.as_slice().iter().map(move |&b| u.cost_at(b)))
            .collect(),
        (None, None) => unreachable!("every policy has a model or a table"),
    };

    if matches!(opts.policy, Policy::Ratequant) {
        let outside: Vec<u8> = allowed
            .as_slice()
            .iter()
            .copied()
            .filter(|&b| !source.fit_bits.contains(b))
            .collect();
        if !outside.is_empty() {
            warnings.push(format!(
                "allowed bits {:?} lie outside the fit bits {}: the model is extrapolated there",
                outside, source.fit_bits
            ));
        }
    }

    let uniform = uniform_bits(&elements, allowed, target);
    let (bits, method) = match opts.policy {
        Policy::Uniform => (
            uniform.clone().map_err(Error::invalid)?,
            "uniform".to_string(),
        ),
        _ => {
            let a = allocate::allocate_integer(&elements, &costs, allowed, target)?;
            (a.bits, a.method.as_str().to_string())
        }
    };
    let achieved: u64 = elements
        .iter()
        .zip(&bits)
        .map(|(&n, &b)| n * b as u64)
        .sum();
    let budget_met = budget_is_integral(opts.avg_bits, total_elements) && achieved == target;
    if !budget_met {
        warnings.push(format!(
            "the budget {} bits × {total_elements} elements is not reachable exactly with allowed bits {allowed}{}: \
             the plan uses {achieved} element-bits (mean {:.6} bits), the largest reachable total not above it",
            opts.avg_bits,
            if opts.policy == Policy::Uniform { " and the uniform rule" } else { "" },
            achieved as f64 / total_elements as f64
        ));
    }

    // Continuous optimum of the policy's parametric model.
    let continuous = match (&model, opts.policy) {
        (Some(m), Policy::Ratequant | Policy::Textbook) => {
            match allocate::water_fill(
                m,
                lo as f64,
                hi as f64,
                opts.avg_bits * total_elements as f64,
            ) {
                Ok(c) => Some(c),
                Err(e) => {
                    warnings.push(format!("no continuous optimum: {e}"));
                    None
                }
            }
        }
        _ => None,
    };

    let eval_costs = |bits: &[u8]| allocate::objective(&costs, allowed, bits);
    let measured_here = measured_costs(calib, calib, allowed).ok();
    let measured_eval = |bits: &[u8]| {
        measured_here
            .as_ref()
            .map(|t| allocate::objective(t, allowed, bits))
    };
    let uniform_ok = uniform.as_ref().ok();
    let objective = PlanObjective {
        model: model_name,
        plan: eval_costs(&bits),
        uniform: uniform_ok.map(|u| eval_costs(u)),
        measured_plan: measured_eval(&bits),
        measured_uniform: uniform_ok.and_then(|u| measured_eval(u)),
    };

    let effective: f64 = calib
        .units
        .iter()
        .zip(&bits)
        .map(|(u, &b)| u.elements as f64 * (b as f64 + u.metadata_bits))
        .sum::<f64>()
        / total_elements as f64;

    let summary = continuous.as_ref().map(|c| {
        let at = |x: f64| c.bits.iter().filter(|&&b| (b - x).abs() < 1e-9).count();
        let (units_at_min, units_at_max) = (at(lo as f64), at(hi as f64));
        ContinuousSummary {
            water_level: c.water_level,
            objective: c.objective,
            mean_bits: c
                .bits
                .iter()
                .zip(&elements)
                .map(|(b, &n)| b * n as f64)
                .sum::<f64>()
                / total_elements as f64,
            units_at_min,
            units_at_max,
            units_interior: bits.len() - units_at_min - units_at_max,
        }
    });
    let units = calib
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| PlanUnit {
            layer: u.layer,
            head: u.head,
            kind: u.kind,
            elements: u.elements,
            bits: bits[i],
            continuous_bits: continuous.as_ref().map(|c| c.bits[i]),
        })
        .collect();
    let plan = Plan {
        format: PLAN_FORMAT.to_string(),
        version: FORMAT_VERSION,
        quantizer: calib.quantizer.clone(),
        policy: opts.policy.as_str().to_string(),
        distortion_from: opts.distortion_from.map(|o| o.quantizer.clone()),
        allowed_bits: allowed.clone(),
        requested_mean_bits: opts.avg_bits,
        achieved_mean_bits: achieved as f64 / total_elements as f64,
        total_elements,
        requested_element_bits: target,
        achieved_element_bits: achieved,
        budget_met,
        effective_bits_per_element: effective,
        method,
        objective,
        continuous: summary,
        warnings,
        units,
    };
    plan.validate()
        .map_err(|m| Error::invalid(format!("internal error, invalid plan: {m}")))?;
    Ok(plan)
}

/// `w_i·D_i(b)` from `source`'s measured (target) table, weights from `calib`; every allowed
/// bit must have been measured.
fn measured_costs(source: &Calib, calib: &Calib, allowed: &BitList) -> Result<Vec<f64>> {
    let idx: Vec<usize> = allowed
        .as_slice()
        .iter()
        .map(|&b| {
            source.measured_bits.index_of(b).ok_or_else(|| {
                Error::invalid(format!(
                    "allowed bit-width {b} was not measured by the {} calibration (measured bits {})",
                    source.quantizer, source.measured_bits
                ))
            })
        })
        .collect::<Result<_>>()?;
    Ok(source
        .units
        .iter()
        .zip(&calib.units)
        .flat_map(|(u, own)| {
            let table = source.target_table(u);
            idx.iter().map(move |&j| own.importance * table[j])
        })
        .collect())
}

/// `other` must describe the same units (same keys and element counts, same order).
fn check_same_units(calib: &Calib, other: &Calib) -> Result<()> {
    if calib.units.len() != other.units.len() {
        return Err(Error::invalid(format!(
            "--distortion-from: the {} calibration has {} units, this one ({}) has {}",
            other.quantizer,
            other.units.len(),
            calib.quantizer,
            calib.units.len()
        )));
    }
    for (a, b) in calib.units.iter().zip(&other.units) {
        if a.key() != b.key() || a.elements != b.elements {
            return Err(Error::invalid(format!(
                "--distortion-from: {} ({} elements) does not match {} ({} elements) of the other calibration",
                a.label(),
                a.elements,
                b.label(),
                b.elements
            )));
        }
    }
    Ok(())
}

//! Bit allocation: minimise `Σ_i c_i(b_i)` subject to `Σ_i n_i·b_i = T` (element-bits) with each
//! `b_i` in the allowed set, where `c_i(b)` is unit `i`'s weighted distortion at `b` bits and
//! `n_i` its element count.
//!
//! * [`water_fill`]: the continuous optimum of the parametric model `c_i(b) = w_i·α_i·β_i^(−b)`
//!   with `b_i ∈ [lo, hi]` (reverse water-filling).
//! * [`allocate_integer`]: the exact integer optimum for arbitrary cost tables. When `T` is not
//!   reachable it uses the largest reachable total not above it.
//!
//! Integer method. With consecutive allowed bits, equal element counts and costs convex in the
//! bits (every parametric model with β > 1), the optimum takes the `K` largest marginal gains
//! `c_i(b) − c_i(b+1)` over all units and steps (`K = (T − Σ n_i·min)/n`): convexity makes each
//! unit's gains non-increasing, so the best `K` gains form a per-unit prefix, i.e. a feasible
//! allocation, and no allocation can collect more gain ("greedy"). When element counts differ a
//! one-bit step costs different amounts of budget and this exchange argument fails (it becomes a
//! knapsack); so do non-consecutive sets (steps of unequal size) and non-convex tables (measured
//! distortion). Then the exact method is a dynamic programme over the total in units of
//! `g·h` element-bits (`g` = gcd of element counts, `h` = gcd of the allowed bits' distances to
//! the minimum), which is exact for any costs ("dp"). Real models have equal element counts and
//! at most a few thousand units, so the DP stays small there; its table size is checked before it
//! is allocated.

use std::cmp::Ordering;

use crate::bits::BitList;
use crate::{Error, Result};

/// The largest DP table (units × states) the exact method will allocate, in cells (one byte
/// each).
pub const MAX_DP_CELLS: u64 = 1 << 30;

/// How the integer optimum was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegerMethod {
    Greedy,
    Dp,
}

impl IntegerMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            IntegerMethod::Greedy => "greedy",
            IntegerMethod::Dp => "dp",
        }
    }
}

/// An integer allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct IntegerAllocation {
    pub bits: Vec<u8>,
    /// `Σ n_i·b_i`.
    pub total: u64,
    pub objective: f64,
    pub method: IntegerMethod,
}

/// Exact integer allocation. `costs` is row-major `units × allowed.len()`: `costs[i·A + j]` is
/// unit `i`'s cost at `allowed[j]` bits. `target` is the element-bit budget.
pub fn allocate_integer(
    elements: &[u64],
    costs: &[f64],
    allowed: &BitList,
    target: u64,
) -> Result<IntegerAllocation> {
    let a = allowed.len();
    let units = elements.len();
    if units == 0 {
        return Err(Error::invalid("no units to allocate"));
    }
    if costs.len() != units * a {
        return Err(Error::invalid(format!(
            "{} costs for {units} units × {a} allowed bits",
            costs.len()
        )));
    }
    if let Some(i) = elements.iter().position(|&n| n == 0) {
        return Err(Error::invalid(format!("unit {i} has no elements")));
    }
    if let Some(k) = costs.iter().position(|c| !c.is_finite()) {
        return Err(Error::invalid(format!(
            "unit {}: cost {} at {} bits is not finite",
            k / a,
            costs[k],
            allowed.as_slice()[k % a]
        )));
    }
    let lo_total: u64 = elements.iter().map(|&n| n * allowed.min() as u64).sum();
    let hi_total: u64 = elements.iter().map(|&n| n * allowed.max() as u64).sum();
    if target < lo_total || target > hi_total {
        return Err(Error::invalid(format!(
            "budget of {target} element-bits is outside [{lo_total}, {hi_total}], what the allowed bits {allowed} can use"
        )));
    }
    let equal_sizes = elements.iter().all(|&n| n == elements[0]);
    let convex = (0..units).all(|i| is_convex(&costs[i * a..(i + 1) * a]));
    let mut alloc = if allowed.is_consecutive() && equal_sizes && convex {
        greedy(elements[0], costs, allowed, target - lo_total)
    } else {
        dp(elements, costs, allowed, target - lo_total)?
    };
    alloc.total = elements
        .iter()
        .zip(&alloc.bits)
        .map(|(&n, &b)| n * b as u64)
        .sum();
    alloc.objective = objective(costs, allowed, &alloc.bits);
    Ok(alloc)
}

/// `Σ_i c_i(b_i)` for a table laid out as in [`allocate_integer`].
pub fn objective(costs: &[f64], allowed: &BitList, bits: &[u8]) -> f64 {
    let a = allowed.len();
    bits.iter()
        .enumerate()
        .map(|(i, &b)| costs[i * a + allowed.index_of(b).expect("bits from the allowed set")])
        .sum()
}

/// Gains non-increasing along the table (exact comparison; noise just sends us to the DP).
fn is_convex(row: &[f64]) -> bool {
    row.windows(3).all(|w| w[0] - w[1] >= w[1] - w[2])
}

/// Greedy over marginal gains; `extra` is the budget above everyone-at-minimum.
fn greedy(n: u64, costs: &[f64], allowed: &BitList, extra: u64) -> IntegerAllocation {
    let a = allowed.len();
    let units = costs.len() / a;
    let steps_per_unit = a - 1;
    let k = ((extra / n) as usize).min(units * steps_per_unit);
    let mut counts = vec![0u8; units];
    if k > 0 {
        // (gain, step, unit); the order ranks higher gains first, then lower steps, then lower
        // units, so ties keep each unit's selection a prefix (and the result deterministic).
        let mut steps: Vec<(f64, u8, u32)> = Vec::with_capacity(units * steps_per_unit);
        for i in 0..units {
            let row = &costs[i * a..(i + 1) * a];
            for s in 0..steps_per_unit {
                steps.push((row[s] - row[s + 1], s as u8, i as u32));
            }
        }
        let rank = |x: &(f64, u8, u32), y: &(f64, u8, u32)| -> Ordering {
            y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2))
        };
        if k < steps.len() {
            steps.select_nth_unstable_by(k - 1, rank);
        }
        for &(_, _, i) in &steps[..k] {
            counts[i as usize] += 1;
        }
    }
    let bits = counts
        .iter()
        .map(|&c| allowed.as_slice()[c as usize])
        .collect();
    IntegerAllocation {
        bits,
        total: 0,
        objective: 0.0,
        method: IntegerMethod::Greedy,
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Exact DP over the reduced total; `extra` is the budget above everyone-at-minimum.
fn dp(elements: &[u64], costs: &[f64], allowed: &BitList, extra: u64) -> Result<IntegerAllocation> {
    let a = allowed.len();
    let units = elements.len();
    let min = allowed.min();
    let g = elements.iter().fold(0, |acc, &n| gcd(acc, n));
    let h = allowed
        .as_slice()
        .iter()
        .fold(0, |acc, &b| gcd(acc, (b - min) as u64))
        .max(1);
    // Choice j moves the reduced total by m_i·d_j.
    let d: Vec<u64> = allowed
        .as_slice()
        .iter()
        .map(|&b| (b - min) as u64 / h)
        .collect();
    let m: Vec<u64> = elements.iter().map(|&n| n / g).collect();
    let d_max = *d.last().expect("non-empty");
    let reachable_max: u64 = m.iter().map(|&mi| mi * d_max).sum();
    let limit = (extra / (g * h)).min(reachable_max);
    let states = limit + 1;
    let cells = states.saturating_mul(units as u64);
    if cells > MAX_DP_CELLS {
        return Err(Error::invalid(format!(
            "the exact allocation for {units} units with these element counts and allowed bits {allowed} \
             needs a {cells}-cell table (limit {MAX_DP_CELLS}); use consecutive allowed bits with equal-size units"
        )));
    }
    let states = states as usize;
    let mut best = vec![f64::INFINITY; states];
    best[0] = 0.0;
    let mut next = vec![f64::INFINITY; states];
    let mut choice = vec![0u8; units * states];
    let mut reach = 0usize; // highest state reachable so far
    for i in 0..units {
        let row = &costs[i * a..(i + 1) * a];
        let new_reach = (reach as u64 + m[i] * d_max).min(limit) as usize;
        next[..=new_reach].fill(f64::INFINITY);
        let choice_row = &mut choice[i * states..(i + 1) * states];
        for (s, &base) in best[..=reach].iter().enumerate() {
            if base == f64::INFINITY {
                continue;
            }
            for j in 0..a {
                let t = s as u64 + m[i] * d[j];
                if t > limit {
                    break;
                }
                let t = t as usize;
                let c = base + row[j];
                // Strict `<` keeps the first (lowest-bit, lowest-state) choice on ties.
                if c < next[t] {
                    next[t] = c;
                    choice_row[t] = j as u8;
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
        reach = new_reach;
    }
    let mut s = (0..=reach)
        .rev()
        .find(|&s| best[s] < f64::INFINITY)
        .expect("state 0 is always reachable");
    let mut bits = vec![0u8; units];
    for i in (0..units).rev() {
        let j = choice[i * states + s] as usize;
        bits[i] = allowed.as_slice()[j];
        s -= (m[i] * d[j]) as usize;
    }
    debug_assert_eq!(s, 0);
    Ok(IntegerAllocation {
        bits,
        total: 0,
        objective: 0.0,
        method: IntegerMethod::Dp,
    })
}

/// One unit of the parametric model `c(b) = weight·alpha·beta^(−b)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelUnit {
    pub elements: u64,
    pub weight: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl ModelUnit {
    pub fn cost(&self, bits: f64) -> f64 {
        self.weight * self.alpha * self.beta.powf(-bits)
    }
    /// [`cost`](Self::cost) at an integer bit-width (`powi`: much cheaper than `powf`).
    pub fn cost_at(&self, bits: u8) -> f64 {
        self.weight * self.alpha * self.beta.powi(-(bits as i32))
    }
    /// `−dc/db / elements`: the objective decrease per element-bit at `bits`.
    pub fn marginal(&self, bits: f64) -> f64 {
        self.weight * self.alpha * self.beta.ln() * self.beta.powf(-bits) / self.elements as f64
    }
}

/// The continuous optimum.
#[derive(Debug, Clone, PartialEq)]
pub struct ContinuousAllocation {
    pub bits: Vec<f64>,
    /// The Lagrange multiplier μ: interior units have `marginal(b_i) = μ`, units at `lo` have
    /// `marginal(lo) ≤ μ`, units at `hi` have `marginal(hi) ≥ μ`. Zero when the budget leaves
    /// every unit that has any distortion at `hi`.
    pub water_level: f64,
    pub objective: f64,
}

/// Reverse water-filling: minimises `Σ c_i(b_i)` s.t. `Σ n_i·b_i = target`, `lo ≤ b_i ≤ hi`.
/// Inside the active set `b_i = (ln(w_i·α_i·ln β_i / n_i) − ln μ) / ln β_i` in closed form; the
/// active set and the water level are found by bisection on `ln μ`, then `ln μ` is solved exactly
/// for that set. Needs `β_i > 1` for every unit with `w_i·α_i > 0`.
pub fn water_fill(
    units: &[ModelUnit],
    lo: f64,
    hi: f64,
    target: f64,
) -> Result<ContinuousAllocation> {
    if units.is_empty() {
        return Err(Error::invalid("no units to allocate"));
    }
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(Error::invalid(format!("empty bit range [{lo}, {hi}]")));
    }
    let n: Vec<f64> = units.iter().map(|u| u.elements as f64).collect();
    let total_n: f64 = n.iter().sum();
    let (lo_total, hi_total) = (lo * total_n, hi * total_n);
    let tol = 1e-12 * hi_total.max(1.0);
    if target < lo_total - tol || target > hi_total + tol {
        return Err(Error::invalid(format!(
            "budget {target} element-bits outside [{lo_total}, {hi_total}]"
        )));
    }
    for (i, u) in units.iter().enumerate() {
        let ok = u.elements > 0
            && u.weight.is_finite()
            && u.weight >= 0.0
            && u.alpha.is_finite()
            && u.alpha >= 0.0;
        if !ok || !u.beta.is_finite() {
            return Err(Error::invalid(format!("unit {i}: invalid model {u:?}")));
        }
        if u.weight * u.alpha > 0.0 && u.beta <= 1.0 {
            return Err(Error::invalid(format!(
                "unit {i}: β = {} ≤ 1 (distortion does not fall with bits), reverse water-filling is undefined",
                u.beta
            )));
        }
    }
    // Units without distortion (w·α = 0) gain nothing from bits; they stay at `lo` and only
    // take bits the others cannot use.
    let active: Vec<bool> = units.iter().map(|u| u.weight * u.alpha > 0.0).collect();
    // ln(w·α·ln β / n) and ln β of each active unit.
    let log_c: Vec<f64> = units
        .iter()
        .zip(&n)
        .map(|(u, &ni)| u.weight.ln() + u.alpha.ln() + u.beta.ln().ln() - ni.ln())
        .collect();
    let ln_beta: Vec<f64> = units.iter().map(|u| u.beta.ln()).collect();
    let inv_ln_beta: Vec<f64> = ln_beta.iter().map(|l| 1.0 / l).collect();
    let bits_at = |theta: f64, i: usize| -> f64 {
        if active[i] {
            ((log_c[i] - theta) * inv_ln_beta[i]).clamp(lo, hi)
        } else {
            lo
        }
    };
    let total_at = |theta: f64| -> f64 { (0..units.len()).map(|i| n[i] * bits_at(theta, i)).sum() };

    let finish = |bits: Vec<f64>, water_level: f64| {
        let objective = units.iter().zip(&bits).map(|(u, &b)| u.cost(b)).sum();
        ContinuousAllocation {
            bits,
            water_level,
            objective,
        }
    };

    let idx_active: Vec<usize> = (0..units.len()).filter(|&i| active[i]).collect();
    let saturated: f64 = (0..units.len())
        .map(|i| n[i] * if active[i] { hi } else { lo })
        .sum();
    if target >= saturated - tol {
        // Every unit with distortion sits at `hi`; spread what is left evenly over the rest.
        let rest_n: f64 = (0..units.len()).filter(|&i| !active[i]).map(|i| n[i]).sum();
        let rest_bits = if rest_n > 0.0 {
            (lo + (target - saturated).max(0.0) / rest_n).min(hi)
        } else {
            lo
        };
        let bits = (0..units.len())
            .map(|i| if active[i] { hi } else { rest_bits })
            .collect();
        return Ok(finish(bits, 0.0));
    }
    // Bracket ln μ: at `theta_hi` every active unit is at lo, at `theta_lo` at hi.
    let theta_hi = idx_active
        .iter()
        .map(|&i| log_c[i] - lo * ln_beta[i])
        .fold(f64::NEG_INFINITY, f64::max);
    let theta_lo = idx_active
        .iter()
        .map(|&i| log_c[i] - hi * ln_beta[i])
        .fold(f64::INFINITY, f64::min);
    let (mut a, mut b) = (theta_lo, theta_hi);
    for _ in 0..200 {
        let mid = 0.5 * (a + b);
        if mid <= a || mid >= b {
            break;
        }
        if total_at(mid) > target {
            a = mid;
        } else {
            b = mid;
        }
    }
    let mut theta = 0.5 * (a + b);
    // Closed form inside the active set at this water level.
    let interior: Vec<usize> = idx_active
        .iter()
        .copied()
        .filter(|&i| {
            let x = (log_c[i] - theta) / ln_beta[i];
            x > lo && x < hi
        })
        .collect();
    if !interior.is_empty() {
        let mut is_interior = vec![false; units.len()];
        for &i in &interior {
            is_interior[i] = true;
        }
        let fixed: f64 = (0..units.len())
            .filter(|&i| !is_interior[i])
            .map(|i| n[i] * bits_at(theta, i))
            .sum();
        let num: f64 = interior
            .iter()
            .map(|&i| n[i] * log_c[i] / ln_beta[i])
            .sum::<f64>()
            - (target - fixed);
        let den: f64 = interior.iter().map(|&i| n[i] / ln_beta[i]).sum();
        let exact = num / den;
        // Keep it only if it leaves the active set unchanged (it should, up to rounding).
        let same_set = idx_active.iter().all(|&i| {
            let before = (log_c[i] - theta) / ln_beta[i];
            let after = (log_c[i] - exact) / ln_beta[i];
            let inside = |x: f64| x > lo && x < hi;
            inside(before) == inside(after) || (after - before).abs() < 1e-9
        });
        if exact.is_finite() && same_set {
            theta = exact;
        }
    }
    let bits: Vec<f64> = (0..units.len()).map(|i| bits_at(theta, i)).collect();
    Ok(finish(bits, theta.exp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_dp_agree_on_a_convex_instance() {
        let allowed = BitList::range(1, 4).unwrap();
        let alphas = [1.0, 5.0, 0.2, 3.0];
        let costs: Vec<f64> = alphas
            .iter()
            .flat_map(|&a| (1..=4).map(move |b| a * 4f64.powi(-b)))
            .collect();
        let n = [10u64; 4];
        for target in (40..=160).step_by(10) {
            let g = allocate_integer(&n, &costs, &allowed, target).unwrap();
            assert_eq!(g.method, IntegerMethod::Greedy);
            let d = dp(&n, &costs, &allowed, target - 40).unwrap();
            let d_obj = objective(&costs, &allowed, &d.bits);
            assert!(
                (g.objective - d_obj).abs() <= 1e-12 * d_obj.max(1.0),
                "{target}: {} vs {d_obj}",
                g.objective
            );
            assert_eq!(g.total, target);
        }
    }

    #[test]
    fn unreachable_budget_uses_the_largest_total_below() {
        // Allowed {2, 4}, three units of 10 elements: totals are multiples of 20 from 60.
        let allowed = BitList::new([2, 4]).unwrap();
        let costs = vec![1.0, 0.1, 2.0, 0.2, 3.0, 0.3];
        let a = allocate_integer(&[10, 10, 10], &costs, &allowed, 95).unwrap();
        assert_eq!(a.total, 80);
        assert_eq!(a.bits, vec![2, 2, 4]);
    }

    #[test]
    fn water_fill_hits_the_budget() {
        let units: Vec<ModelUnit> = [1.0, 10.0, 0.1]
            .iter()
            .map(|&alpha| ModelUnit {
                elements: 100,
                weight: 1.0,
                alpha,
                beta: 4.0,
            })
            .collect();
        let c = water_fill(&units, 1.0, 8.0, 750.0).unwrap();
        let total: f64 = c.bits.iter().map(|b| b * 100.0).sum();
        assert!((total - 750.0).abs() < 1e-9);
        // α ratios of 10 at β = 4: one unit's bits differ by log_4(10) between neighbours.
        assert!((c.bits[1] - c.bits[0] - 10f64.ln() / 4f64.ln()).abs() < 1e-9);
    }
}

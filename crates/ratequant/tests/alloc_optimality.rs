//! The allocator against brute force, the continuous optimum against its KKT conditions, and
//! the uniform policy's fixed order.

use proptest::prelude::*;
use ratequant::allocate::{allocate_integer, objective, water_fill, IntegerMethod, ModelUnit};
use ratequant::bits::BitList;
use ratequant::plan::{element_bit_budget, uniform_bits};

/// Every assignment, the best one with the largest reachable total not above `target`.
fn brute_force(elements: &[u64], costs: &[f64], allowed: &BitList, target: u64) -> (u64, f64) {
    let a = allowed.len();
    let units = elements.len();
    let mut best_total = 0u64;
    let mut best_cost = f64::INFINITY;
    let mut idx = vec![0usize; units];
    loop {
        let total: u64 = (0..units)
            .map(|i| elements[i] * allowed.as_slice()[idx[i]] as u64)
            .sum();
        if total <= target {
            let cost: f64 = (0..units).map(|i| costs[i * a + idx[i]]).sum();
            if total > best_total || (total == best_total && cost < best_cost) {
                best_total = total;
                best_cost = cost;
            }
        }
        // Next assignment (odometer).
        let mut k = 0;
        loop {
            if k == units {
                return (best_total, best_cost);
            }
            idx[k] += 1;
            if idx[k] < a {
                break;
            }
            idx[k] = 0;
            k += 1;
        }
    }
}

fn allowed_sets() -> impl Strategy<Value = BitList> {
    prop_oneof![
        (1u8..=8, 0u8..4).prop_map(|(lo, extra)| BitList::range(lo, (lo + extra).min(8)).unwrap()),
        proptest::collection::vec(1u8..=8, 1..5).prop_map(|v| BitList::new(v).unwrap()),
    ]
}

/// Cost tables: parametric (convex), or arbitrary non-negative tables (like measured ones).
fn instance() -> impl Strategy<Value = (Vec<u64>, Vec<f64>, BitList, f64, bool)> {
    (
        1usize..=5,
        allowed_sets(),
        any::<bool>(),
        any::<bool>(),
        0.0f64..=1.0,
    )
        .prop_flat_map(|(units, allowed, equal_sizes, parametric, budget_frac)| {
            let a = allowed.len();
            let sizes = if equal_sizes {
                (1u64..6).prop_map(move |n| vec![n * 4; units]).boxed()
            } else {
                proptest::collection::vec(1u64..13, units).boxed()
            };
            let costs = if parametric {
                let bits = allowed.as_slice().to_vec();
                (
                    proptest::collection::vec((1e-3f64..10.0, 0.0f64..5.0), units),
                    1.5f64..6.0,
                )
                    .prop_map(move |(aw, beta)| {
                        aw.iter()
                            .flat_map(|&(alpha, w)| {
                                bits.iter()
                                    .map(move |&b| w * alpha * beta.powi(-(b as i32)))
                            })
                            .collect::<Vec<f64>>()
                    })
                    .boxed()
            } else {
                proptest::collection::vec(0.0f64..10.0, units * a).boxed()
            };
            (
                sizes,
                costs,
                Just(allowed),
                Just(budget_frac),
                Just(parametric),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn integer_allocation_equals_brute_force((elements, costs, allowed, frac, _parametric) in instance()) {
        let n: u64 = elements.iter().sum();
        let lo = allowed.min() as f64;
        let hi = allowed.max() as f64;
        let avg = lo + frac * (hi - lo);
        let target = element_bit_budget(avg, n);
        let got = allocate_integer(&elements, &costs, &allowed, target).unwrap();
        let (bf_total, bf_cost) = brute_force(&elements, &costs, &allowed, target);
        // Same total (budget hit whenever reachable), same optimal cost.
        prop_assert_eq!(got.total, bf_total);
        prop_assert!(got.total <= target);
        prop_assert!((got.objective - bf_cost).abs() <= 1e-9 * bf_cost.abs().max(1.0),
            "allocator {} ({:?}, {:?}) vs brute force {}", got.objective, got.bits, got.method, bf_cost);
        prop_assert!((objective(&costs, &allowed, &got.bits) - got.objective).abs() <= 1e-12 * got.objective.max(1.0));
        prop_assert!(got.bits.iter().all(|&b| allowed.contains(b)));
    }

    #[test]
    fn water_filling_satisfies_kkt(
        models in proptest::collection::vec((1e-4f64..100.0, 0.0f64..3.0, 1u64..2000), 1..40),
        shared_beta in 1.2f64..8.0,
        per_unit in any::<bool>(),
        betas in proptest::collection::vec(1.2f64..8.0, 40),
        lo in 1u8..=4, span in 0u8..=4, frac in 0.0f64..=1.0,
    ) {
        let hi = (lo + span).min(8);
        let units: Vec<ModelUnit> = models.iter().enumerate().map(|(i, &(alpha, weight, elements))| ModelUnit {
            elements, weight, alpha, beta: if per_unit { betas[i] } else { shared_beta },
        }).collect();
        let n: f64 = units.iter().map(|u| u.elements as f64).sum();
        let target = (lo as f64 + frac * (hi - lo) as f64) * n;
        let c = water_fill(&units, lo as f64, hi as f64, target).unwrap();
        let total: f64 = units.iter().zip(&c.bits).map(|(u, b)| u.elements as f64 * b).sum();
        prop_assert!((total - target).abs() <= 1e-9 * target, "total {} target {}", total, target);
        let mu = c.water_level;
        let eps = 1e-7;
        for (u, &b) in units.iter().zip(&c.bits) {
            prop_assert!(b >= lo as f64 - 1e-12 && b <= hi as f64 + 1e-12);
            let g = u.marginal(b);
            if u.weight * u.alpha == 0.0 || lo == hi {
                continue; // no choice, or gains nothing from bits (only fills what the others cannot take)
            }
            if b > lo as f64 + 1e-9 && b < hi as f64 - 1e-9 {
                prop_assert!((g - mu).abs() <= eps * mu, "interior marginal {} vs μ {}", g, mu);
            } else if b <= lo as f64 + 1e-9 {
                prop_assert!(g <= mu * (1.0 + eps), "at lo: marginal {} > μ {}", g, mu);
            } else {
                prop_assert!(g >= mu * (1.0 - eps), "at hi: marginal {} < μ {}", g, mu);
            }
        }
    }

    /// The continuous optimum is a lower bound for every integer plan at the same budget.
    #[test]
    fn continuous_bounds_integer(alphas in proptest::collection::vec(1e-3f64..10.0, 1..30), beta in 1.5f64..6.0, frac in 0.0f64..=1.0) {
        let allowed = BitList::range(1, 8).unwrap();
        let units: Vec<ModelUnit> = alphas.iter().map(|&alpha| ModelUnit { elements: 64, weight: 1.0, alpha, beta }).collect();
        let costs: Vec<f64> = units.iter().flat_map(|u| (1..=8).map(move |b| u.cost(b as f64))).collect();
        let n = 64 * units.len() as u64;
        let target = element_bit_budget(1.0 + 7.0 * frac, n);
        let int = allocate_integer(&vec![64; units.len()], &costs, &allowed, target).unwrap();
        prop_assert_eq!(int.method, IntegerMethod::Greedy);
        let c = water_fill(&units, 1.0, 8.0, int.total as f64).unwrap();
        prop_assert!(c.objective <= int.objective * (1.0 + 1e-9));
    }
}

#[test]
fn greedy_is_used_for_the_common_case_and_dp_otherwise() {
    let allowed = BitList::range(1, 8).unwrap();
    let costs: Vec<f64> = (0..3)
        .flat_map(|i| (1..=8).map(move |b| (i + 1) as f64 * 4f64.powi(-b)))
        .collect();
    assert_eq!(
        allocate_integer(&[8, 8, 8], &costs, &allowed, 60)
            .unwrap()
            .method,
        IntegerMethod::Greedy
    );
    assert_eq!(
        allocate_integer(&[8, 8, 16], &costs, &allowed, 80)
            .unwrap()
            .method,
        IntegerMethod::Dp
    );
    let sparse = BitList::new([2, 4, 8]).unwrap();
    let costs3: Vec<f64> = (0..3)
        .flat_map(|i| [2, 4, 8].map(|b| (i + 1) as f64 * 4f64.powi(-b)))
        .collect();
    assert_eq!(
        allocate_integer(&[8, 8, 8], &costs3, &sparse, 96)
            .unwrap()
            .method,
        IntegerMethod::Dp
    );
}

/// Different element counts: a bit for a big unit costs more budget than for a small one; the
/// greedy gain-per-element-bit rule picks the big unit first and then cannot spend the rest.
#[test]
fn unequal_sizes_are_solved_exactly() {
    let allowed = BitList::range(1, 2).unwrap();
    // Unit 0: 3 elements, gain 3.3 for its step (1.1 per element-bit).
    // Units 1, 2: 2 elements each, gain 2.0 each (1.0 per element-bit).
    let costs = vec![3.3, 0.0, 2.0, 0.0, 2.0, 0.0];
    let target = 7 + 4; // everyone at 1 bit uses 7; 4 more element-bits
    let a = allocate_integer(&[3, 2, 2], &costs, &allowed, target).unwrap();
    assert_eq!(a.bits, vec![1, 2, 2]);
    assert_eq!(a.total, 11);
    assert!((a.objective - 3.3).abs() < 1e-12);
}

#[test]
fn budget_outside_the_allowed_range_is_an_error() {
    let allowed = BitList::range(2, 4).unwrap();
    let costs = vec![1.0, 0.5, 0.25];
    let err = allocate_integer(&[10], &costs, &allowed, 19)
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside"), "{err}");
    assert!(allocate_integer(&[10], &costs, &allowed, 41).is_err());
}

/// Golden: uniform hands the remainder out one bit per unit in unit order.
#[test]
fn uniform_policy_order() {
    let allowed = BitList::range(1, 8).unwrap();
    // 6 units of 10 elements (layer 0: h0k h0v h1k h1v; layer 1: h0k h0v) at 2.5 bits = 150.
    assert_eq!(
        uniform_bits(&[10; 6], &allowed, 150).unwrap(),
        vec![3, 3, 3, 2, 2, 2]
    );
    assert_eq!(uniform_bits(&[10; 6], &allowed, 120).unwrap(), vec![2; 6]);
    assert_eq!(
        uniform_bits(&[10; 6], &allowed, 175).unwrap(),
        vec![3, 3, 3, 3, 3, 2]
    );
    // Unequal sizes: a unit whose extra bit no longer fits is skipped, later ones still served.
    assert_eq!(
        uniform_bits(&[10, 30, 10], &allowed, 50 * 2 + 25).unwrap(),
        vec![3, 2, 3]
    );
    // At the top of the range every unit has the maximum.
    assert_eq!(uniform_bits(&[10; 2], &allowed, 160).unwrap(), vec![8, 8]);
    // Impossible with a gap at ⌊B⌋ + 1.
    let gap = BitList::new([2, 4]).unwrap();
    assert!(uniform_bits(&[10; 2], &gap, 60)
        .unwrap_err()
        .contains("3 bits"));
}

#[test]
fn budget_rounding_is_exact_for_decimal_budgets() {
    assert_eq!(element_bit_budget(2.3, 1000), 2300);
    assert_eq!(element_bit_budget(2.5, 3), 7);
    assert_eq!(element_bit_budget(2.0, 7), 14);
}

#[test]
fn oversized_exact_problem_is_refused_before_allocating() {
    // Coprime, large element counts: the DP would need billions of states.
    let allowed = BitList::new([1, 3]).unwrap();
    let elements = [1_000_000_007u64, 1_000_000_009, 999_999_937];
    let costs = vec![1.0, 0.1, 1.0, 0.1, 1.0, 0.1];
    let n: u64 = elements.iter().sum();
    let err = allocate_integer(&elements, &costs, &allowed, 2 * n)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cell table"), "{err}");
}

#[test]
fn units_without_distortion_only_take_leftover_bits() {
    let unit = |alpha: f64| ModelUnit {
        elements: 10,
        weight: 1.0,
        alpha,
        beta: 4.0,
    };
    let units = [unit(1.0), unit(0.0), unit(3.0)];
    // Budget below saturation: the α = 0 unit stays at the minimum.
    let c = water_fill(&units, 1.0, 8.0, 3.0 * 30.0).unwrap();
    assert_eq!(c.bits[1], 1.0);
    assert!(c.water_level > 0.0);
    // Budget beyond what the others can take: they sit at the maximum, it takes the rest.
    let c = water_fill(&units, 1.0, 8.0, 7.0 * 30.0).unwrap();
    assert_eq!((c.bits[0], c.bits[2]), (8.0, 8.0));
    assert!((c.bits[1] - 5.0).abs() < 1e-12);
    assert_eq!(c.water_level, 0.0);
    // β ≤ 1 has no water-filling solution: an error, not NaN.
    let bad = [ModelUnit {
        elements: 10,
        weight: 1.0,
        alpha: 1.0,
        beta: 0.9,
    }];
    assert!(water_fill(&bad, 1.0, 8.0, 30.0)
        .unwrap_err()
        .to_string()
        .contains("β"));
}

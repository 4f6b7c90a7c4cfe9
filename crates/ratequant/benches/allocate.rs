//! Allocation for 10,000 units (target: under 10 ms for the whole plan).
//!
//! `cargo bench -p ratequant --bench allocate`. Baseline in the same run: sorting the 70,000
//! marginal gains the greedy considers, the least an exact greedy over them could cost.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ratequant::allocate::{allocate_integer, water_fill, ModelUnit};
use ratequant::bits::BitList;
use ratequant::formats::{
    BetaMode, Calib, CalibUnit, DistortionTarget, ImportanceSource, QuantizerInfo, CALIB_FORMAT,
    FORMAT_VERSION,
};
use ratequant::plan::{make_plan, PlanOptions, Policy};
use ratequant::quant::Kind;

const UNITS: usize = 10_000;
const ELEMENTS: u64 = 16 * 512 * 64;

fn pseudo_random(i: usize) -> f64 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    x as f64 / (1u64 << 53) as f64
}

fn calib() -> Calib {
    let units = (0..UNITS)
        .map(|i| {
            let alpha = 10f64.powf(4.0 * pseudo_random(i) - 2.0);
            CalibUnit {
                layer: i / 16,
                head: (i / 2) % 8,
                kind: if i % 2 == 0 { Kind::K } else { Kind::V },
                tokens: 16 * 512,
                head_dim: 64,
                elements: ELEMENTS,
                importance: 0.5 + pseudo_random(i + UNITS),
                variance: alpha * 3.0,
                mean_square: alpha * 4.0,
                metadata_bits: 1.0,
                distortion: (1..=8).map(|b| alpha * 4.2f64.powi(-b)).collect(),
                weighted_distortion: None,
                alpha,
                beta: None,
                r2: Some(1.0),
                fit_points: vec![1, 2, 3, 4],
            }
        })
        .collect();
    Calib {
        format: CALIB_FORMAT.into(),
        version: FORMAT_VERSION,
        quantizer: QuantizerInfo {
            name: "kivi".into(),
            params: serde_json::json!({ "group": 32 }),
        },
        measured_bits: BitList::range(1, 8).unwrap(),
        fit_bits: BitList::range(1, 4).unwrap(),
        target: DistortionTarget::Mse,
        importance: ImportanceSource::PerUnit,
        beta_mode: BetaMode::Shared,
        beta: 4.2,
        r2: Some(1.0),
        zero_floor: 1e-12,
        sequences: 16,
        units,
    }
}

fn bench(c: &mut Criterion) {
    let calib = calib();
    let allowed = BitList::range(1, 8).unwrap();
    let models: Vec<ModelUnit> = calib
        .units
        .iter()
        .map(|u| ModelUnit {
            elements: u.elements,
            weight: u.importance,
            alpha: u.alpha,
            beta: calib.beta,
        })
        .collect();
    let costs: Vec<f64> = models
        .iter()
        .flat_map(|m| (1..=8).map(move |b| m.cost(b as f64)))
        .collect();
    let elements = vec![ELEMENTS; UNITS];
    let target = (2.5 * (ELEMENTS * UNITS as u64) as f64) as u64;

    let mut g = c.benchmark_group("allocate_10k_units");
    let gains: Vec<f64> = costs
        .chunks_exact(8)
        .flat_map(|row| row.windows(2).map(|w| w[0] - w[1]))
        .collect();
    g.bench_function("baseline_sort_70k_gains", |b| {
        b.iter(|| {
            let mut v = gains.clone();
            v.sort_unstable_by(|a, b| b.total_cmp(a));
            v
        })
    });
    g.bench_function("integer_greedy", |b| {
        b.iter(|| allocate_integer(&elements, &costs, &allowed, target).unwrap())
    });
    g.bench_function("water_fill", |b| {
        b.iter(|| water_fill(&models, 1.0, 8.0, 2.5 * (ELEMENTS * UNITS as u64) as f64).unwrap())
    });
    for policy in [Policy::Ratequant, Policy::Uniform] {
        let opts = PlanOptions {
            avg_bits: 2.5,
            allowed: allowed.clone(),
            policy,
            distortion_from: None,
        };
        g.bench_with_input(
            BenchmarkId::new("make_plan", policy.as_str()),
            &opts,
            |b, o| b.iter(|| make_plan(&calib, o).unwrap()),
        );
    }
    // Non-consecutive bits force the exact DP.
    let sparse = BitList::new([2, 4, 8]).unwrap();
    let sparse_costs: Vec<f64> = models
        .iter()
        .flat_map(|m| [2, 4, 8].map(|b| m.cost(b as f64)))
        .collect();
    let sparse_target = 3 * ELEMENTS * UNITS as u64;
    g.sample_size(10);
    g.bench_function("integer_dp_bits_2_4_8", |b| {
        b.iter(|| allocate_integer(&elements, &sparse_costs, &sparse, sparse_target).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

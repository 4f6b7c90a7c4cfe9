//! Distortion measurement, model fitting and the calibrate entry point, with a test-only
//! quantizer whose distortion is known in closed form.

use proptest::prelude::*;
use ratequant::distortion::{measure_unit, UnitImportance, UnitTiles};
use ratequant::fit::{calibrate, fit_tables, FitOptions};
use ratequant::formats::{BetaMode, DistortionTarget, ImportanceSource};
use ratequant::kvfile::{read_kv_file, write_kv_file};
use ratequant::quant::{EncodedTile, Kind, Quantizer, TileShape};
use ratequant::{Error, Result};

/// Adds `±sqrt(scale·β^(−b))` (alternating signs, relative to the tile's RMS) to each element, so
/// the MSE is `scale·β^(−b)·rms²` up to f32 rounding; from `exact_from` bits on it returns the
/// input unchanged (zero distortion).
struct NoiseQuantizer {
    beta: f64,
    exact_from: u8,
}

impl Quantizer for NoiseQuantizer {
    fn name(&self) -> &'static str {
        "rtn-token"
    }
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "group": 4 })
    }
    fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        if head_dim == 3 {
            return Err(Error::invalid(
                "head_dim 3 is not supported by the test quantizer",
            ));
        }
        Ok(())
    }
    fn fake_quantize(
        &self,
        x: &[f32],
        _shape: TileShape,
        kind: Kind,
        bits: u8,
        out: &mut [f32],
    ) -> Result<()> {
        if bits >= self.exact_from {
            out.copy_from_slice(x);
            return Ok(());
        }
        // V tiles get twice the error of K tiles, so units differ in α.
        let scale = if kind == Kind::V { 2.0 } else { 1.0 };
        let amp = (scale * self.beta.powi(-(bits as i32))).sqrt() as f32;
        for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            *o = if i % 2 == 0 { v + amp } else { v - amp };
        }
        Ok(())
    }
    fn encode(&self, _x: &[f32], _shape: TileShape, _kind: Kind, _bits: u8) -> Result<EncodedTile> {
        Err(Error::invalid("the test quantizer has no packed encoding"))
    }
    fn decode(&self, _enc: &EncodedTile, _out: &mut [f32]) -> Result<()> {
        Err(Error::invalid("the test quantizer has no packed encoding"))
    }
    fn metadata_bits_per_element(&self, _shape: TileShape, _kind: Kind) -> f64 {
        0.5
    }
}

fn tile(seed: u64, len: usize) -> Vec<f32> {
    // Small deterministic pseudo-random values.
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn units(
    layers: usize,
    heads: usize,
    sequences: usize,
    shape: TileShape,
    importance: bool,
) -> Vec<UnitTiles> {
    let mut out = Vec::new();
    for layer in 0..layers {
        for head in 0..heads {
            for kind in [Kind::K, Kind::V] {
                let seed = (layer * 100 + head * 10 + kind as usize) as u64;
                let tiles: Vec<Vec<f32>> = (0..sequences)
                    .map(|s| tile(seed * 7 + s as u64, shape.len()))
                    .collect();
                let imp = importance.then(|| {
                    UnitImportance::PerElement(
                        tiles
                            .iter()
                            .map(|t| t.iter().map(|x| x.abs() * (layer + 1) as f32).collect())
                            .collect(),
                    )
                });
                out.push(UnitTiles {
                    layer,
                    head,
                    kind,
                    shape,
                    tiles,
                    importance: imp,
                });
            }
        }
    }
    out
}

#[test]
fn calibrate_recovers_the_known_model() {
    let q = NoiseQuantizer {
        beta: 3.0,
        exact_from: 9,
    };
    let shape = TileShape {
        tokens: 8,
        head_dim: 4,
    };
    let us = units(2, 2, 3, shape, false);
    let calib = calibrate(&us, &q, &FitOptions::default()).unwrap();
    assert_eq!(calib.units.len(), 8);
    assert!((calib.beta - 3.0).abs() < 1e-4, "β = {}", calib.beta);
    assert!(calib.r2.unwrap() > 0.999_999);
    assert_eq!(calib.importance, ImportanceSource::None);
    for u in &calib.units {
        let scale = if u.kind == Kind::V { 2.0 } else { 1.0 };
        assert!(
            (u.alpha / scale - 1.0).abs() < 1e-4,
            "{}: α = {}",
            u.label(),
            u.alpha
        );
        assert_eq!(u.elements, 3 * 32);
        assert_eq!(u.importance, 1.0);
        assert_eq!(u.metadata_bits, 0.5);
        assert_eq!(u.distortion.len(), 8);
        assert!(u.variance > 0.5 && u.variance < 2.5, "{}", u.variance);
    }
    // Units come out sorted: layer, head, K before V.
    let keys: Vec<_> = calib.units.iter().map(|u| u.key()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[test]
fn zero_distortion_gives_finite_alpha_and_stays_out_of_the_fit() {
    let q = NoiseQuantizer {
        beta: 4.0,
        exact_from: 3,
    };
    let shape = TileShape {
        tokens: 4,
        head_dim: 4,
    };
    let calib = calibrate(&units(1, 1, 1, shape, false), &q, &FitOptions::default()).unwrap();
    assert!((calib.beta - 4.0).abs() < 1e-4, "{}", calib.beta);
    for u in &calib.units {
        assert!(u.alpha.is_finite() && u.alpha > 0.0);
        assert_eq!(u.fit_points, vec![1, 2]);
        assert_eq!(u.distortion[2..], [0.0; 6]);
    }
    // Serialises without nulls where numbers belong, and loads back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    calib.save(&path).unwrap();
    assert_eq!(ratequant::formats::Calib::load(&path).unwrap(), calib);

    // Exact from one bit on: β cannot be fitted — a clear error, not NaN.
    let q = NoiseQuantizer {
        beta: 4.0,
        exact_from: 1,
    };
    let err = calibrate(&units(1, 1, 1, shape, false), &q, &FitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot fit β"), "{err}");
}

#[test]
fn all_zero_unit_gets_alpha_zero() {
    // Per-unit mode: a unit with no usable point gets α = 0 and the pooled β.
    let fit = fit_tables(
        &[vec![1.0, 0.25, 0.0625], vec![0.0, 0.0, 0.0]],
        &[1, 2, 3],
        &[1.0, 1.0],
        BetaMode::PerUnit,
    )
    .unwrap();
    assert_eq!(fit.units[1].alpha, 0.0);
    assert!(
        (fit.units[1].beta.unwrap() - 4.0).abs() < 1e-12,
        "falls back to the pooled β"
    );
}

#[test]
fn weighted_distortion_and_importance() {
    let q = NoiseQuantizer {
        beta: 2.0,
        exact_from: 9,
    };
    let shape = TileShape {
        tokens: 4,
        head_dim: 2,
    };
    let us = units(2, 1, 2, shape, true);
    let opts = FitOptions {
        target: DistortionTarget::Weighted,
        ..FitOptions::default()
    };
    let calib = calibrate(&us, &q, &opts).unwrap();
    assert_eq!(calib.importance, ImportanceSource::PerElement);
    for (u, src) in calib.units.iter().zip(&us) {
        let Some(UnitImportance::PerElement(imp)) = &src.importance else {
            panic!()
        };
        let sum: f64 = imp.iter().flatten().map(|&f| f as f64).sum();
        // w = Σ importance / sequences.
        assert!((u.importance - sum / 2.0).abs() < 1e-9 * sum);
        // The noise has the same magnitude everywhere, so weighted error = MSE here.
        let w = u.weighted_distortion.as_ref().unwrap();
        for (a, b) in w.iter().zip(&u.distortion) {
            assert!((a / b - 1.0).abs() < 1e-3, "{a} vs {b}");
        }
    }
    // Weighted target without per-element importance: clear error.
    let err = calibrate(&units(1, 1, 1, shape, false), &q, &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("per-element importance"), "{err}");
}

#[test]
fn weighted_distortion_weighs_errors_by_importance() {
    // Importance only on the first element: the weighted error is that element's error.
    struct FirstOnly;
    impl Quantizer for FirstOnly {
        fn name(&self) -> &'static str {
            "kivi"
        }
        fn params(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn check_head_dim(&self, _: usize) -> Result<()> {
            Ok(())
        }
        fn fake_quantize(
            &self,
            x: &[f32],
            _: TileShape,
            _: Kind,
            bits: u8,
            out: &mut [f32],
        ) -> Result<()> {
            out.copy_from_slice(x);
            out[0] += 1.0 / bits as f32; // error only on element 0
            out[1] += 10.0;
            Ok(())
        }
        fn encode(&self, _: &[f32], _: TileShape, _: Kind, _: u8) -> Result<EncodedTile> {
            Err(Error::invalid("none"))
        }
        fn decode(&self, _: &EncodedTile, _: &mut [f32]) -> Result<()> {
            Err(Error::invalid("none"))
        }
        fn metadata_bits_per_element(&self, _: TileShape, _: Kind) -> f64 {
            0.0
        }
    }
    let shape = TileShape {
        tokens: 2,
        head_dim: 2,
    };
    let unit = UnitTiles {
        layer: 0,
        head: 0,
        kind: Kind::K,
        shape,
        tiles: vec![vec![0.0; 4]],
        importance: Some(UnitImportance::PerElement(vec![vec![3.0, 0.0, 0.0, 0.0]])),
    };
    let m = measure_unit(&unit, &FirstOnly, &[1, 2]).unwrap();
    assert_eq!(m.weighted.as_ref().unwrap(), &vec![1.0, 0.25]);
    assert_eq!(m.mse, vec![(1.0 + 100.0) / 4.0, (0.25 + 100.0) / 4.0]);
    assert_eq!(m.weight, 3.0);
}

#[test]
fn bad_units_are_named() {
    let q = NoiseQuantizer {
        beta: 2.0,
        exact_from: 9,
    };
    let shape = TileShape {
        tokens: 2,
        head_dim: 2,
    };
    let mut us = units(1, 1, 1, shape, false);
    us[1].tiles[0][3] = f32::NAN;
    let err = calibrate(&us, &q, &FitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 0, head 0, v")
            && err.contains("token 1, channel 1")
            && err.contains("NaN"),
        "{err}"
    );

    let us = units(
        1,
        1,
        1,
        TileShape {
            tokens: 2,
            head_dim: 3,
        },
        false,
    );
    let err = calibrate(&us, &q, &FitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("head_dim 3"), "{err}");

    let mut us = units(1, 1, 1, shape, false);
    us[0].tiles.clear();
    assert!(calibrate(&us, &q, &FitOptions::default())
        .unwrap_err()
        .to_string()
        .contains("no sequences"));

    let us = units(
        1,
        1,
        1,
        TileShape {
            tokens: 0,
            head_dim: 2,
        },
        false,
    );
    assert!(calibrate(&us, &q, &FitOptions::default())
        .unwrap_err()
        .to_string()
        .contains("empty"));

    let mut us = units(1, 1, 1, shape, false);
    us[1].kind = Kind::K;
    assert!(calibrate(&us, &q, &FitOptions::default())
        .unwrap_err()
        .to_string()
        .contains("twice"));
}

/// The file path and the in-memory path are one code path: same CALIB from the same data.
#[test]
fn file_and_memory_calibration_are_identical() {
    let q = NoiseQuantizer {
        beta: 3.5,
        exact_from: 7,
    };
    let shape = TileShape {
        tokens: 5,
        head_dim: 4,
    };
    let dir = tempfile::tempdir().unwrap();
    for importance in [false, true] {
        let us = units(3, 2, 2, shape, importance);
        let path = dir.path().join("kv.safetensors");
        write_kv_file(&path, &us).unwrap();
        let read = read_kv_file(&path).unwrap();
        assert_eq!(read, us);
        let opts = FitOptions::default();
        let a = calibrate(&us, &q, &opts).unwrap();
        // Shuffled input order gives the same result.
        let mut rev = read.clone();
        rev.reverse();
        let b = calibrate(&rev, &q, &opts).unwrap();
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Exact curves give back their α and β, shared or per unit.
    #[test]
    fn fit_recovers_synthetic_curves(
        alphas in proptest::collection::vec(1e-6f64..1e3, 1..20),
        betas in proptest::collection::vec(1.1f64..8.0, 20),
        shared in any::<bool>(),
        lo in 1u8..=5, span in 1u8..=3,
    ) {
        let bits: Vec<u8> = (lo..=(lo + span).min(8)).collect();
        prop_assume!(bits.len() >= 2);
        let beta_of = |i: usize| if shared { betas[0] } else { betas[i] };
        let tables: Vec<Vec<f64>> = alphas.iter().enumerate()
            .map(|(i, &a)| bits.iter().map(|&b| a * beta_of(i).powi(-(b as i32))).collect())
            .collect();
        let mode = if shared { BetaMode::Shared } else { BetaMode::PerUnit };
        // Mean squares small enough that every point (down to 1e-6 · 8^-8 ≈ 6e-14) lies far
        // above the fit's zero floor (`ZERO_FLOOR` × mean square = 1e-15): with 1e6 here the
        // floor was 1e-6, and the smallest curves counted as reproduced exactly.
        let fit = fit_tables(&tables, &bits, &vec![1e-3; alphas.len()], mode).unwrap();
        for (i, (u, &a)) in fit.units.iter().zip(&alphas).enumerate() {
            prop_assert!((u.alpha / a - 1.0).abs() < 1e-8, "α {} vs {}", u.alpha, a);
            let b = if shared { fit.beta } else { u.beta.unwrap() };
            prop_assert!((b / beta_of(i) - 1.0).abs() < 1e-10);
            prop_assert!((u.r2.unwrap() - 1.0).abs() < 1e-9);
        }
    }

    /// Noisy curves: the pooled β is the least-squares slope (residuals orthogonal to bits).
    #[test]
    fn pooled_slope_is_least_squares(
        noise in proptest::collection::vec(-0.3f64..0.3, 12),
        alphas in proptest::collection::vec(0.01f64..10.0, 3),
    ) {
        let bits = [1u8, 2, 3, 4];
        let tables: Vec<Vec<f64>> = (0..3).map(|i| (0..4).map(|j| alphas[i] * 4f64.powi(-(bits[j] as i32)) * noise[i * 4 + j].exp()).collect()).collect();
        let fit = fit_tables(&tables, &bits, &[1.0; 3], BetaMode::Shared).unwrap();
        let mut dot = 0.0;
        for (i, t) in tables.iter().enumerate() {
            for (j, d) in t.iter().enumerate() {
                let pred = fit.units[i].alpha.ln() - bits[j] as f64 * fit.beta.ln();
                let resid = d.ln() - pred;
                dot += resid * bits[j] as f64;
            }
        }
        prop_assert!(dot.abs() < 1e-9, "normal equation residual {}", dot);
        prop_assert!(fit.r2.unwrap() <= 1.0);
    }
}

//! CALIB/PLAN round trips, error messages for bad files, and plans made from a CALIB.

use std::path::Path;

use ratequant::bits::BitList;
use ratequant::formats::{
    BetaMode, Calib, CalibUnit, DistortionTarget, ImportanceSource, Plan, QuantizerInfo,
    CALIB_FORMAT, FORMAT_VERSION,
};
use ratequant::plan::{make_plan, PlanOptions, Policy};
use ratequant::quant::Kind;

/// A calibration with exact curves: unit i has α = alphas[i], β = 4, one head per layer.
fn calib(alphas: &[f64]) -> Calib {
    let measured = BitList::range(1, 8).unwrap();
    let units = alphas
        .iter()
        .enumerate()
        .map(|(i, &alpha)| CalibUnit {
            layer: i / 2,
            head: 0,
            kind: if i % 2 == 0 { Kind::K } else { Kind::V },
            tokens: 4,
            head_dim: 8,
            elements: 32,
            importance: 1.0,
            variance: 1.0 + i as f64,
            mean_square: 2.0 + i as f64,
            metadata_bits: 1.0,
            distortion: (1..=8).map(|b| alpha * 4f64.powi(-b)).collect(),
            weighted_distortion: None,
            alpha,
            beta: None,
            r2: Some(1.0),
            fit_points: vec![1, 2, 3, 4],
        })
        .collect();
    Calib {
        format: CALIB_FORMAT.into(),
        version: FORMAT_VERSION,
        quantizer: QuantizerInfo {
            name: "kivi".into(),
            params: serde_json::json!({ "group": 32 }),
        },
        measured_bits: measured,
        fit_bits: BitList::range(1, 4).unwrap(),
        target: DistortionTarget::Mse,
        importance: ImportanceSource::None,
        beta_mode: BetaMode::Shared,
        beta: 4.0,
        r2: Some(1.0),
        zero_floor: 1e-12,
        sequences: 1,
        units,
    }
}

fn opts(avg_bits: f64, policy: Policy) -> PlanOptions<'static> {
    PlanOptions {
        avg_bits,
        allowed: BitList::range(1, 8).unwrap(),
        policy,
        distortion_from: None,
    }
}

fn load_err_calib(dir: &Path, text: &str) -> String {
    let p = dir.join("bad.json");
    std::fs::write(&p, text).unwrap();
    Calib::load(&p).unwrap_err().to_string()
}

#[test]
fn calib_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let c = calib(&[1.0, 0.3, 7.25, 1e-7]);
    let p = dir.path().join("calib.json");
    c.save(&p).unwrap();
    let loaded = Calib::load(&p).unwrap();
    assert_eq!(loaded, c);
    let p2 = dir.path().join("calib2.json");
    loaded.save(&p2).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&p2).unwrap());
    assert_eq!(loaded.quantizer.spec().unwrap().group, Some(32));
}

#[test]
fn calib_errors_name_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::to_value(calib(&[1.0, 2.0])).unwrap();

    let err = load_err_calib(dir.path(), "{ not json");
    assert!(
        err.contains("bad.json") && err.contains("malformed JSON"),
        "{err}"
    );

    let mut v = good.clone();
    v["version"] = 2.into();
    let err = load_err_calib(dir.path(), &v.to_string());
    assert!(
        err.contains("bad.json") && err.contains("unsupported ratequant-calib version 2"),
        "{err}"
    );

    let mut v = good.clone();
    v["format"] = "ratequant-plan".into();
    let err = load_err_calib(dir.path(), &v.to_string());
    assert!(
        err.contains("field `format`") && err.contains("ratequant-calib"),
        "{err}"
    );

    let mut v = good.clone();
    v["units"][1].as_object_mut().unwrap().remove("alpha");
    let err = load_err_calib(dir.path(), &v.to_string());
    assert!(err.contains("missing field `alpha`"), "{err}");

    let mut v = good.clone();
    v["units"][0]["distortion"] = serde_json::json!([1.0, 2.0]);
    let err = load_err_calib(dir.path(), &v.to_string());
    assert!(
        err.contains("units[0].distortion") && err.contains("2 values"),
        "{err}"
    );

    let mut v = good.clone();
    v["units"][0]["kind"] = "q".into();
    let err = load_err_calib(dir.path(), &v.to_string());
    assert!(err.contains("unknown variant `q`"), "{err}");

    let mut v = good.clone();
    v["units"][1]["kind"] = "k".into();
    let err = load_err_calib(dir.path(), &v.to_string());
    assert!(
        err.contains("units[1]") && err.contains("repeated"),
        "{err}"
    );

    let mut v = good.clone();
    v["fit_bits"] = serde_json::json!([3]);
    let err = load_err_calib(dir.path(), &v.to_string());
    assert!(err.contains("fit_bits") && err.contains("two"), "{err}");

    let err = Calib::load(dir.path().join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn plan_round_trip_and_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let c = calib(&[1.0, 16.0, 0.25, 4.0]);
    let plan = make_plan(&c, &opts(3.0, Policy::Ratequant)).unwrap();
    let p = dir.path().join("plan.json");
    plan.save(&p).unwrap();
    let loaded = Plan::load(&p).unwrap();
    assert_eq!(loaded, plan);
    // β = 4: a factor 4 in α is worth exactly one bit. α = 1, 16, 0.25, 4 → 3, 5, 2, 4 at a mean of 3.5;
    // at 3 bits the water level puts them at 2.5, 4.5, 1.5, 3.5 and ties round by unit order.
    let bits: Vec<u8> = loaded.units.iter().map(|u| u.bits).collect();
    assert_eq!(bits.iter().map(|&b| b as u32).sum::<u32>(), 12);
    assert_eq!(loaded.bits(0, 0, Kind::V), Some(bits[1]));
    assert_eq!(loaded.bits(1, 0, Kind::K), Some(bits[2]));
    assert_eq!(loaded.bits(2, 0, Kind::K), None);
    let cont = plan.continuous.as_ref().unwrap();
    let cb: Vec<f64> = plan
        .units
        .iter()
        .map(|u| u.continuous_bits.unwrap())
        .collect();
    for (x, want) in cb.iter().zip([2.5, 4.5, 1.5, 3.5]) {
        assert!((x - want).abs() < 1e-9, "{cb:?}");
    }
    assert!((cont.mean_bits - 3.0).abs() < 1e-12);
    assert!(plan.budget_met);
    assert_eq!(plan.achieved_mean_bits, 3.0);
    assert!((plan.effective_bits_per_element - 4.0).abs() < 1e-12);
    assert!(plan.objective.plan < plan.objective.uniform.unwrap());
}

#[test]
fn plan_errors() {
    let dir = tempfile::tempdir().unwrap();
    let c = calib(&[1.0, 2.0]);
    let plan = make_plan(&c, &opts(2.0, Policy::Uniform)).unwrap();
    let good = serde_json::to_value(&plan).unwrap();
    let p = dir.path().join("plan.json");

    let mut v = good.clone();
    v["units"][0]["bits"] = 9.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let err = Plan::load(&p).unwrap_err().to_string();
    assert!(
        err.contains("plan.json") && err.contains("units[0].bits"),
        "{err}"
    );

    let mut v = good.clone();
    v["version"] = 0.into();
    std::fs::write(&p, v.to_string()).unwrap();
    assert!(Plan::load(&p)
        .unwrap_err()
        .to_string()
        .contains("version 0"));

    let mut v = good;
    v.as_object_mut().unwrap().remove("units");
    std::fs::write(&p, v.to_string()).unwrap();
    assert!(Plan::load(&p)
        .unwrap_err()
        .to_string()
        .contains("missing field `units`"));
}

#[test]
fn policies_and_budget_errors() {
    let c = calib(&[1.0, 16.0, 0.25, 4.0]);
    // Budget outside the allowed range.
    let mut o = opts(2.5, Policy::Ratequant);
    o.allowed = BitList::range(3, 4).unwrap();
    let err = make_plan(&c, &o).unwrap_err().to_string();
    assert!(err.contains("budget 2.5") && err.contains("3-4"), "{err}");
    assert!(make_plan(&c, &opts(f64::NAN, Policy::Ratequant)).is_err());
    assert!("optimal"
        .parse::<Policy>()
        .unwrap_err()
        .to_string()
        .contains("unknown policy `optimal`"));

    // Uniform at 2.5 bits: first half of the units in unit order get 3.
    let u = make_plan(&c, &opts(2.5, Policy::Uniform)).unwrap();
    assert_eq!(
        u.units.iter().map(|u| u.bits).collect::<Vec<_>>(),
        vec![3, 3, 2, 2]
    );
    assert_eq!(u.objective.uniform, Some(u.objective.plan));

    // Empirical on exact curves equals the fitted model's plan.
    let r = make_plan(&c, &opts(2.5, Policy::Ratequant)).unwrap();
    let e = make_plan(&c, &opts(2.5, Policy::Empirical)).unwrap();
    assert!((r.objective.plan - e.objective.plan).abs() < 1e-12);
    assert!(e.continuous.is_none());

    // Textbook: α = variance, β = 4 — the unit with the largest variance gets the most bits.
    let t = make_plan(&c, &opts(2.5, Policy::Textbook)).unwrap();
    assert_eq!(t.objective.model, "textbook");
    assert!(t.units[3].bits >= t.units[0].bits);

    // Allowed bits outside the fit bits: a warning.
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("outside the fit bits")),
        "{:?}",
        r.warnings
    );
    let mut o = opts(2.5, Policy::Ratequant);
    o.allowed = BitList::range(1, 4).unwrap();
    assert!(make_plan(&c, &o).unwrap().warnings.is_empty());

    // Unreachable budget: said plainly, and the total is the largest reachable below.
    let mut o = opts(3.0, Policy::Ratequant);
    o.allowed = BitList::new([2, 8]).unwrap();
    let p = make_plan(&c, &o).unwrap();
    assert!(!p.budget_met);
    // Totals are 32·(sum of four bits from {2, 8}): 256, 448, …; the budget is 3·128 = 384.
    assert_eq!(p.achieved_element_bits, 256);
    assert!(
        p.warnings.iter().any(|w| w.contains("not reachable")),
        "{:?}",
        p.warnings
    );
}

#[test]
fn distortion_from_uses_the_other_model() {
    let ours = calib(&[1.0, 16.0, 0.25, 4.0]);
    // The other design ranks the units the other way round.
    let mut other = calib(&[4.0, 0.25, 16.0, 1.0]);
    other.quantizer = QuantizerInfo {
        name: "quarot".into(),
        params: serde_json::json!({ "group": null }),
    };
    let mut o = opts(3.0, Policy::Ratequant);
    o.distortion_from = Some(&other);
    let mismatched = make_plan(&ours, &o).unwrap();
    let own = make_plan(&ours, &opts(3.0, Policy::Ratequant)).unwrap();
    assert_eq!(mismatched.objective.model, "fitted:quarot");
    assert_eq!(mismatched.distortion_from.as_ref().unwrap().name, "quarot");
    // Judged by our own measured distortion, the mismatched plan is worse.
    assert!(mismatched.objective.measured_plan.unwrap() > own.objective.measured_plan.unwrap());
    let mb: Vec<u8> = mismatched.units.iter().map(|u| u.bits).collect();
    let ob: Vec<u8> = own.units.iter().map(|u| u.bits).collect();
    assert_ne!(mb, ob);

    // Units must match.
    let fewer = calib(&[1.0, 2.0]);
    o.distortion_from = Some(&fewer);
    assert!(make_plan(&ours, &o)
        .unwrap_err()
        .to_string()
        .contains("units"));
    let mut o = opts(3.0, Policy::Textbook);
    o.distortion_from = Some(&other);
    assert!(make_plan(&ours, &o)
        .unwrap_err()
        .to_string()
        .contains("--distortion-from"));
}

//! `ratequant fit` and `ratequant allocate` end to end on a small synthetic KV file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

const LAYERS: usize = 2;
const HEADS: usize = 2;
const SEQUENCES: usize = 2;
const TOKENS: usize = 32;
const HEAD_DIM: usize = 16;

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ratequant"));
    for a in args {
        cmd.arg(a);
    }
    cmd.output().expect("run ratequant")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Deterministic values; head h of layer l is scaled by (1 + l + 2h) so units differ, and keys
/// get a large outlier channel as real keys do.
fn values(layer: usize, kind: usize, poison: bool) -> Vec<f32> {
    let mut s: u64 = 0x1234_5678 + (layer * 31 + kind * 7) as u64;
    let mut out = Vec::with_capacity(SEQUENCES * HEADS * TOKENS * HEAD_DIM);
    for _seq in 0..SEQUENCES {
        for h in 0..HEADS {
            for _t in 0..TOKENS {
                for c in 0..HEAD_DIM {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    let outlier = if kind == 0 && c == 3 { 8.0 } else { 1.0 };
                    out.push(u * (1 + layer + 2 * h) as f32 * outlier);
                }
            }
        }
    }
    if poison {
        out[5] = f32::NAN;
    }
    out
}

fn write_kv(dir: &Path, name: &str, poison: bool, importance: bool) -> PathBuf {
    let shape = vec![SEQUENCES, HEADS, TOKENS, HEAD_DIM];
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for l in 0..LAYERS {
        for (kind, suffix) in [(0, "k"), (1, "v")] {
            let data = values(l, kind, poison && l == 1 && kind == 1);
            tensors.push((
                format!("layers.{l}.{suffix}"),
                shape.clone(),
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ));
            if importance {
                let imp: Vec<f32> = (0..HEADS).map(|h| (1 + h + l) as f32).collect();
                tensors.push((
                    format!("layers.{l}.{suffix}_importance"),
                    vec![HEADS],
                    imp.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ));
            }
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let path = dir.join(name);
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn fit_then_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kv = write_kv(d, "kv.safetensors", false, true);

    let calib = d.join("kivi.json");
    let o = run(&[
        &"fit",
        &"--kv",
        &kv,
        &"--quantizer",
        &"kivi",
        &"--group",
        &"16",
        &"--out",
        &calib,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("β ="), "{}", text(&o));
    let c = json(&calib);
    assert_eq!(c["format"], "ratequant-calib");
    assert_eq!(c["version"], 1);
    assert_eq!(c["quantizer"]["name"], "kivi");
    assert_eq!(c["quantizer"]["params"]["group"], 16);
    assert_eq!(c["units"].as_array().unwrap().len(), LAYERS * HEADS * 2);
    let beta = c["beta"].as_f64().unwrap();
    assert!(beta > 2.0 && beta < 10.0, "β = {beta}");
    let u0 = &c["units"][0];
    assert_eq!(u0["elements"], (SEQUENCES * TOKENS * HEAD_DIM) as u64);
    assert_eq!(u0["distortion"].as_array().unwrap().len(), 8);
    assert_eq!(c["units"][2]["importance"], 2.0); // layer 0, head 1, k

    // A second design for the mismatch experiment.
    let calib2 = d.join("rtn.json");
    let o = run(&[
        &"fit",
        &"--kv",
        &kv,
        &"--quantizer",
        &"rtn-token",
        &"--beta",
        &"per-unit",
        &"--out",
        &calib2,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&calib2)["beta_mode"], "per-unit");

    for (policy, allowed) in [
        ("ratequant", "1-8"),
        ("uniform", "1-8"),
        ("textbook", "1-8"),
        ("empirical", "2,3,4"),
    ] {
        let plan = d.join(format!("plan-{policy}.json"));
        let o = run(&[
            &"allocate",
            &"--calib",
            &calib,
            &"--avg-bits",
            &"2.5",
            &"--policy",
            &policy,
            &"--allowed",
            &allowed,
            &"--out",
            &plan,
        ]);
        assert!(o.status.success(), "{policy}: {}", text(&o));
        let out = text(&o);
        assert!(
            out.contains("predicted objective") && out.contains("layer kind"),
            "{out}"
        );
        let p = json(&plan);
        assert_eq!(p["format"], "ratequant-plan");
        assert_eq!(p["policy"], policy);
        assert_eq!(p["achieved_mean_bits"], 2.5);
        assert_eq!(p["budget_met"], true);
        let bits: Vec<u64> = p["units"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["bits"].as_u64().unwrap())
            .collect();
        assert_eq!(bits.iter().sum::<u64>() * 2, 5 * bits.len() as u64);
        if policy == "uniform" {
            assert_eq!(bits, vec![3, 3, 3, 3, 2, 2, 2, 2]);
        }
        if policy == "ratequant" {
            // Allowed 1-8 reaches beyond the fit bits 1-4.
            assert!(
                out.contains("warning:") && out.contains("outside the fit bits"),
                "{out}"
            );
            assert!(p["continuous"]["water_level"].as_f64().unwrap() > 0.0);
            let predicted = p["objective"]["plan"].as_f64().unwrap();
            let uniform = p["objective"]["uniform"].as_f64().unwrap();
            assert!(predicted <= uniform);
        }
    }

    let plan = d.join("mismatch.json");
    let o = run(&[
        &"allocate",
        &"--calib",
        &calib,
        &"--avg-bits",
        &"3",
        &"--distortion-from",
        &calib2,
        &"--out",
        &plan,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(json(&plan)["distortion_from"]["name"], "rtn-token");
    assert!(
        text(&o).contains("with the model of rtn-token"),
        "{}",
        text(&o)
    );
}

#[test]
fn bad_input_fails_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.json");
    let check = |o: Output, needle: &str| {
        assert!(!o.status.success(), "expected failure: {}", text(&o));
        assert!(
            text(&o).contains(needle),
            "expected `{needle}` in: {}",
            text(&o)
        );
        assert!(!out.exists(), "no output file after an error");
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    };

    let bad = write_kv(d, "nan.safetensors", true, false);
    check(
        run(&[
            &"fit",
            &"--kv",
            &bad,
            &"--quantizer",
            &"kivi",
            &"--out",
            &out,
        ]),
        "`layers.1.v` at index [0, 0, 0, 5] is NaN",
    );

    let kv = write_kv(d, "kv.safetensors", false, false);
    check(
        run(&[
            &"fit",
            &"--kv",
            &kv,
            &"--quantizer",
            &"kiwi",
            &"--out",
            &out,
        ]),
        "unknown quantizer `kiwi`",
    );
    check(
        run(&[
            &"fit",
            &"--kv",
            &kv,
            &"--quantizer",
            &"kivi",
            &"--fit-bits",
            &"3",
            &"--out",
            &out,
        ]),
        "at least two",
    );
    let missing = d.join("missing.safetensors");
    check(
        run(&[
            &"fit",
            &"--kv",
            &missing,
            &"--quantizer",
            &"kivi",
            &"--out",
            &out,
        ]),
        "missing.safetensors",
    );

    let calib = d.join("calib.json");
    let o = run(&[
        &"fit",
        &"--kv",
        &kv,
        &"--quantizer",
        &"quarot",
        &"--out",
        &calib,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    check(
        run(&[
            &"allocate",
            &"--calib",
            &calib,
            &"--avg-bits",
            &"9",
            &"--out",
            &out,
        ]),
        "outside the allowed bits",
    );
    check(
        run(&[
            &"allocate",
            &"--calib",
            &calib,
            &"--avg-bits",
            &"2.5",
            &"--allowed",
            &"3-4",
            &"--out",
            &out,
        ]),
        "budget 2.5",
    );
    check(
        run(&[
            &"allocate",
            &"--calib",
            &calib,
            &"--avg-bits",
            &"2",
            &"--policy",
            &"best",
            &"--out",
            &out,
        ]),
        "unknown policy `best`",
    );
    let broken = d.join("broken.json");
    std::fs::write(&broken, "{\"format\": \"ratequant-calib\", \"version\": 7}").unwrap();
    check(
        run(&[
            &"allocate",
            &"--calib",
            &broken,
            &"--avg-bits",
            &"2",
            &"--out",
            &out,
        ]),
        "version 7",
    );
}

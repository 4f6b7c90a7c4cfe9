//! The KV input file: layouts, dtypes, importance forms, and errors that name the tensor.

use std::path::{Path, PathBuf};

use ratequant::distortion::UnitImportance;
use ratequant::kvfile::read_kv_file;
use ratequant::quant::Kind;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

enum Data {
    F32(Vec<f32>),
    F16(Vec<f32>),
    Bf16(Vec<f32>),
    I32(Vec<i32>),
}

fn write(dir: &Path, tensors: Vec<(&str, Vec<usize>, Data)>) -> PathBuf {
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, shape, data)| {
            let (dtype, bytes) = match data {
                Data::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                Data::F16(v) => (
                    Dtype::F16,
                    v.iter()
                        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                        .collect(),
                ),
                Data::Bf16(v) => (
                    Dtype::BF16,
                    v.iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                        .collect(),
                ),
                Data::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            (name.to_string(), dtype, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join("kv.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    path
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| i as f32 * 0.25 - 1.0).collect()
}

fn err(dir: &Path, tensors: Vec<(&str, Vec<usize>, Data)>) -> String {
    read_kv_file(write(dir, tensors)).unwrap_err().to_string()
}

#[test]
fn reads_both_layouts_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    // Rank 3, f16 and bf16, per-unit importance.
    let p = write(
        dir.path(),
        vec![
            ("layers.0.k", vec![2, 3, 4], Data::F16(ramp(24))),
            ("layers.0.v", vec![2, 3, 4], Data::Bf16(ramp(24))),
            ("layers.0.k_importance", vec![2], Data::F32(vec![0.5, 2.0])),
            ("layers.0.v_importance", vec![2], Data::F32(vec![1.0, 0.0])),
        ],
    );
    let units = read_kv_file(&p).unwrap();
    assert_eq!(units.len(), 4);
    let keys: Vec<_> = units.iter().map(|u| (u.layer, u.head, u.kind)).collect();
    assert_eq!(
        keys,
        vec![
            (0, 0, Kind::K),
            (0, 0, Kind::V),
            (0, 1, Kind::K),
            (0, 1, Kind::V)
        ]
    );
    assert_eq!(units[2].tiles, vec![ramp(24)[12..].to_vec()]);
    assert_eq!(units[2].importance, Some(UnitImportance::PerUnit(2.0)));
    assert_eq!(units[2].shape.tokens, 3);
    assert_eq!(units[2].shape.head_dim, 4);

    // Rank 4: sequence s, head h is the tile at [s, h].
    let p = write(
        dir.path(),
        vec![
            ("layers.0.k", vec![2, 2, 1, 2], Data::F32(ramp(8))),
            ("layers.0.v", vec![2, 2, 1, 2], Data::F32(ramp(8))),
            ("layers.1.k", vec![2, 2, 1, 2], Data::F32(ramp(8))),
            ("layers.1.v", vec![2, 2, 1, 2], Data::F32(ramp(8))),
        ],
    );
    let units = read_kv_file(&p).unwrap();
    assert_eq!(units.len(), 8);
    let r = ramp(8);
    assert_eq!(units[2].tiles, vec![r[2..4].to_vec(), r[6..8].to_vec()]);
    assert!(units.iter().all(|u| u.importance.is_none()));
}

#[test]
fn errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let mut data = ramp(24);
    data[13] = f32::NAN;
    let e = err(
        d,
        vec![
            ("layers.0.k", vec![2, 3, 4], Data::F32(data)),
            ("layers.0.v", vec![2, 3, 4], Data::F32(ramp(24))),
        ],
    );
    assert!(e.contains("`layers.0.k` at index [1, 0, 1] is NaN"), "{e}");

    let mut data = ramp(24);
    data[0] = f32::INFINITY;
    let e = err(
        d,
        vec![
            ("layers.0.k", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.v", vec![2, 3, 4], Data::F32(data)),
        ],
    );
    assert!(e.contains("`layers.0.v` at index [0, 0, 0] is inf"), "{e}");

    let e = err(d, vec![("layers.0.k", vec![2, 3, 4], Data::F32(ramp(24)))]);
    assert!(e.contains("`layers.0.v` is missing"), "{e}");

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![1, 1, 1], Data::F32(ramp(1))),
            ("layers.0.v", vec![1, 1, 1], Data::F32(ramp(1))),
            ("layers.2.k", vec![1, 1, 1], Data::F32(ramp(1))),
            ("layers.2.v", vec![1, 1, 1], Data::F32(ramp(1))),
        ],
    );
    assert!(e.contains("layer 1 is missing"), "{e}");

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.v", vec![2, 4, 3], Data::F32(ramp(24))),
        ],
    );
    assert!(e.contains("K and V of a layer must agree"), "{e}");

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![24], Data::F32(ramp(24))),
            ("layers.0.v", vec![24], Data::F32(ramp(24))),
        ],
    );
    assert!(e.contains("expected [kv_heads, tokens, head_dim]"), "{e}");

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![2, 0, 4], Data::F32(vec![])),
            ("layers.0.v", vec![2, 0, 4], Data::F32(vec![])),
        ],
    );
    assert!(e.contains("empty tiles"), "{e}");

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![1, 1, 2], Data::I32(vec![1, 2])),
            ("layers.0.v", vec![1, 1, 2], Data::F32(ramp(2))),
        ],
    );
    assert!(e.contains("`layers.0.k` has dtype I32"), "{e}");

    let e = err(d, vec![("layers.0.key", vec![1, 1, 2], Data::F32(ramp(2)))]);
    assert!(e.contains("unexpected tensor `layers.0.key`"), "{e}");

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.v", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.k_importance", vec![3], Data::F32(vec![1.0; 3])),
            ("layers.0.v_importance", vec![2], Data::F32(vec![1.0; 2])),
        ],
    );
    assert!(
        e.contains("`layers.0.k_importance` has shape [3]") && e.contains("[2] (per unit)"),
        "{e}"
    );

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.v", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.k_importance", vec![2], Data::F32(vec![1.0, -1.0])),
            ("layers.0.v_importance", vec![2], Data::F32(vec![1.0; 2])),
        ],
    );
    assert!(
        e.contains("`layers.0.k_importance` at index [1] is -1"),
        "{e}"
    );

    let e = err(
        d,
        vec![
            ("layers.0.k", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.v", vec![2, 3, 4], Data::F32(ramp(24))),
            ("layers.0.k_importance", vec![2], Data::F32(vec![1.0; 2])),
        ],
    );
    assert!(e.contains("`layers.0.v_importance` is missing"), "{e}");

    let p = d.join("garbage.safetensors");
    std::fs::write(&p, b"definitely not safetensors").unwrap();
    let e = read_kv_file(&p).unwrap_err().to_string();
    assert!(
        e.contains("garbage.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );
}

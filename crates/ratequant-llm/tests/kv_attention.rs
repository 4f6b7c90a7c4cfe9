//! The caches' attention against the plain-loop reference attention: grouped-query heads,
//! causal masking from a non-zero start position, sliding windows, the residual window, and
//! both the fast and the differentiable kernels.

use candle_core::{Device, Tensor};
use ratequant_llm::attention::{attention, attention_with_residual};
use ratequant_llm::reference::{attention_head, HeadTiles};
use ratequant_llm::synthetic::SplitMix64;
use ratequant_llm::AttnParams;

struct Case {
    heads: usize,
    kv_heads: usize,
    d: usize,
    q_start: usize,
    t: usize,
    window: Option<usize>,
    residual: usize,
}

fn random(rng: &mut SplitMix64, shape: (usize, usize, usize)) -> (Tensor, Vec<f32>) {
    let v = rng.uniform(shape.0 * shape.1 * shape.2, 1.5);
    (Tensor::from_vec(v.clone(), shape, &Device::Cpu).unwrap(), v)
}

fn check(case: &Case, seed: u64) {
    let mut rng = SplitMix64::new(seed);
    let s = case.q_start + case.t;
    let (q, qv) = random(&mut rng, (case.heads, case.t, case.d));
    let (k, kv) = random(&mut rng, (case.kv_heads, s, case.d));
    let (v, vv) = random(&mut rng, (case.kv_heads, s, case.d));
    // "Quantized" copies: any different values will do for checking which one is read where.
    let (kq, kqv) = random(&mut rng, (case.kv_heads, s, case.d));
    let (vq, vqv) = random(&mut rng, (case.kv_heads, s, case.d));
    let scale = 0.37;
    let group = case.heads / case.kv_heads;
    let (td, sd) = (case.t * case.d, s * case.d);
    let mut want = Vec::new();
    for h in 0..case.heads {
        let j = h / group;
        let tiles = HeadTiles {
            q: &qv[h * td..(h + 1) * td],
            k_fp: &kv[j * sd..(j + 1) * sd],
            v_fp: &vv[j * sd..(j + 1) * sd],
            k_q: &kqv[j * sd..(j + 1) * sd],
            v_q: &vqv[j * sd..(j + 1) * sd],
        };
        want.extend(attention_head(
            &tiles,
            case.d,
            case.q_start,
            scale,
            case.window,
            case.residual,
        ));
    }
    for differentiable in [false, true] {
        let params = AttnParams {
            scale,
            sliding_window: case.window,
            differentiable,
        };
        let got =
            attention_with_residual(&q, &k, &v, &kq, &vq, case.q_start, case.residual, &params)
                .unwrap();
        assert_eq!(got.dims(), &[case.heads, case.t, case.d]);
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-5,
            "heads {} kv {} start {} t {} window {:?} residual {} differentiable {differentiable}: max diff {diff}",
            case.heads,
            case.kv_heads,
            case.q_start,
            case.t,
            case.window,
            case.residual
        );
    }
}

#[test]
fn attention_matches_reference() {
    let mut seed = 1;
    for (heads, kv_heads) in [(4, 2), (6, 3), (3, 1), (2, 2)] {
        for (q_start, t) in [(0, 9), (5, 1), (3, 6)] {
            for window in [None, Some(1), Some(4), Some(100)] {
                for residual in [0, 1, 3, 5, usize::MAX] {
                    seed += 1;
                    check(
                        &Case {
                            heads,
                            kv_heads,
                            d: 8,
                            q_start,
                            t,
                            window,
                            residual,
                        },
                        seed,
                    );
                }
            }
        }
    }
}

#[test]
fn plain_attention_is_full_precision_residual() {
    // `attention` equals the reference with every key read from the full-precision tiles.
    let mut rng = SplitMix64::new(99);
    let (q, _) = random(&mut rng, (4, 5, 8));
    let (k, _) = random(&mut rng, (2, 7, 8));
    let (v, _) = random(&mut rng, (2, 7, 8));
    let params = AttnParams {
        scale: 0.3,
        sliding_window: Some(3),
        differentiable: false,
    };
    let a = attention(&q, &k, &v, 2, &params)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let zeros = k.zeros_like().unwrap();
    let b = attention_with_residual(&q, &k, &v, &zeros, &zeros, 2, usize::MAX, &params)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn shape_errors_are_reported() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((3, 2, 8), candle_core::DType::F32, &dev).unwrap();
    let k = Tensor::zeros((2, 2, 8), candle_core::DType::F32, &dev).unwrap();
    let params = AttnParams {
        scale: 1.0,
        sliding_window: None,
        differentiable: false,
    };
    let err = attention(&q, &k, &k, 0, &params).unwrap_err().to_string();
    assert!(err.contains("multiple"), "{err}");
    let q = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &dev).unwrap();
    let err = attention(&q, &k, &k, 0, &params).unwrap_err().to_string();
    assert!(err.contains("stored keys"), "{err}");
}

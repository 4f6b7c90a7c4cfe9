//! Golden tests: small tiles whose codes, f16 parameters and reconstructions were computed by
//! hand (the derivations are in the comments).

// The expected values are exact f16/f32 numbers written out in full.
#![allow(clippy::excessive_precision)]

use half::f16;
use ratequant::quant::{self, Kind, QuantizerSpec, TileShape};

fn build(spec: &str) -> Box<dyn ratequant::Quantizer> {
    quant::build(&QuantizerSpec::parse(spec).unwrap()).unwrap()
}

fn f16s(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

fn fake(
    q: &dyn ratequant::Quantizer,
    x: &[f32],
    shape: TileShape,
    kind: Kind,
    bits: u8,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len()];
    q.fake_quantize(x, shape, kind, bits, &mut out).unwrap();
    let enc = q.encode(x, shape, kind, bits).unwrap();
    let mut decoded = vec![f32::NAN; x.len()];
    q.decode(&enc, &mut decoded).unwrap();
    assert_eq!(
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        decoded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "decode(encode(x)) must equal fake_quantize(x) bit for bit"
    );
    out
}

/// KIVI keys, 4 tokens × 2 channels, one token group (G = 4), 2 bits (3 levels):
/// channel 0 = [0, 0.9, 2.2, 3]: zero 0, scale 3/3 = 1 → codes 0,1,2,3 → 0,1,2,3;
/// channel 1 = [−1, 0.4, 1, 5]: zero −1, scale 6/3 = 2 → (x+1)/2 = 0, 0.7, 1, 3 → codes
/// 0,1,1,3 → −1, 1, 1, 5.
#[test]
fn kivi_keys_per_channel() {
    let q = build("kivi:g=4");
    let x = [0.0, -1.0, 0.9, 0.4, 2.2, 1.0, 3.0, 5.0];
    let shape = TileShape::new(4, 2);
    assert_eq!(
        fake(&*q, &x, shape, Kind::K, 2),
        [0.0, -1.0, 1.0, 1.0, 2.0, 1.0, 3.0, 5.0]
    );
    let enc = q.encode(&x, shape, Kind::K, 2).unwrap();
    // group order: token group j, then channel
    assert_eq!(enc.scales, f16s(&[1.0, 2.0]));
    assert_eq!(enc.zeros, f16s(&[0.0, -1.0]));
    // row-major codes 0,0 | 1,1 | 2,1 | 3,3, two bits each, LSB first:
    // byte 0 = 0 | 0<<2 | 1<<4 | 1<<6 = 0x50, byte 1 = 2 | 1<<2 | 3<<4 | 3<<6 = 0xF6
    assert_eq!(enc.codes, [0x50, 0xF6]);
    assert_eq!(enc.bytes(), 2 + 2 * 2 + 2 * 2);
}

/// KIVI values with G = 2 channels, 2 tokens × 3 channels, 2 bits. Groups per token:
/// channels {0,1} and the partial group {2}, which is constant and therefore exact.
/// Token 0: {1, 4}: zero 1, scale 1 → codes 0, 3. {7.5}: zero 7.5, scale 0.
/// Token 1: {−2, 0.5}: zero −2, scale 2.5/3 = 0.8333… rounded *up* to f16:
/// 0.8333 = 1.6667·2⁻¹, mantissa 0.6667·1024 = 682.67 → 683 → scale 1707/2048 = 0.83349609375;
/// 0.5 → (0.5+2)/0.8335 = 2.9994 → code 3 → −2 + 3·0.83349609375 = 0.50048828125.
/// {−0.25}: constant, exact.
#[test]
fn kivi_values_per_token_with_partial_group_and_f16_scale() {
    let q = build("kivi:g=2");
    let x = [1.0, 4.0, 7.5, -2.0, 0.5, -0.25];
    let shape = TileShape::new(2, 3);
    assert_eq!(
        fake(&*q, &x, shape, Kind::V, 2),
        [1.0, 4.0, 7.5, -2.0, 0.50048828125, -0.25]
    );
    let enc = q.encode(&x, shape, Kind::V, 2).unwrap();
    assert_eq!(enc.scales, f16s(&[1.0, 0.0, 0.83349609375, 0.0]));
    assert_eq!(enc.zeros, f16s(&[1.0, 7.5, -2.0, -0.25]));
    // codes 0,3,0, 0,3,0 → byte 0 = 3<<2 = 12, byte 1 = 3
    assert_eq!(enc.codes, [12, 3]);
}

/// The default KIVI group (32) is wider than this head, so each token is one partial group.
/// Token [0, −1], 2 bits: zero −1, scale 1/3 → f16 rounded up: 1/3 = 1.0101…b·2⁻²,
/// mantissa 341.33 → 342 → 1366/4096 = 0.33349609375; 0 → (0+1)/0.3335 = 2.9985 → code 3 →
/// −1 + 3·0.33349609375 = 0.00048828125 (the grid top lies just above the maximum).
#[test]
fn kivi_default_group_partial_and_scale_rounded_up() {
    let q = build("kivi");
    let out = fake(&*q, &[0.0, -1.0], TileShape::new(1, 2), Kind::V, 2);
    assert_eq!(out, [0.00048828125, -1.0]);
}

/// RTN per token, G = head_dim = 4, 3 bits (7 levels).
/// Token 0 = [0, 7, 3.4, 5.6]: zero 0, scale 1 → codes 0, 7, 3, 6.
/// Token 1 = [−1.5; 4]: constant → exact. 1 bit on [0, 0.4, 0.6, 1]: scale 1 → 0, 0, 1, 1.
#[test]
fn rtn_token() {
    let q = build("rtn-token");
    let x = [0.0, 7.0, 3.4, 5.6, -1.5, -1.5, -1.5, -1.5];
    let shape = TileShape::new(2, 4);
    assert_eq!(
        fake(&*q, &x, shape, Kind::K, 3),
        [0.0, 7.0, 3.0, 6.0, -1.5, -1.5, -1.5, -1.5]
    );
    let enc = q.encode(&x, shape, Kind::K, 3).unwrap();
    assert_eq!(enc.scales, f16s(&[1.0, 0.0]));
    assert_eq!(enc.zeros, f16s(&[0.0, -1.5]));
    // codes 0,7,3,6,0,0,0,0 at 3 bits: 0 | 7<<3 | 3<<6 | 6<<9 = 56+192+3072 = 0x0CF8
    assert_eq!(enc.codes, [0xF8, 0x0C, 0x00]);
    let out = fake(&*q, &[0.0, 0.4, 0.6, 1.0], TileShape::new(1, 4), Kind::V, 1);
    assert_eq!(out, [0.0, 0.0, 1.0, 1.0]);
}

/// QuaRot, head_dim 2, 2 bits. Token [3, 1] rotates to [4, 2]/√2 = [2.828427, 1.414214].
/// Clip 0.95: mid 2.121320, half-width 0.707107·0.95 = 0.671751 → [1.449569, 2.793071].
/// zero = f16 below 1.449569: mantissa 0.449569·1024 = 460.4 → 460 → 1.44921875.
/// scale = f16 above (2.793071 − 1.44921875)/3 = 0.447951 = 1.791804·2⁻²: mantissa 810.8 → 811
/// → 1835/4096 = 0.447998046875. Codes: 2.828427 → 3.08 → clamped to 3 → 2.793212890625;
/// 1.414214 → below the zero → 0 → 1.44921875. Rotated back: [(a+b)/√2, (a−b)/√2].
/// Token [0, 0] is constant and exact.
#[test]
fn quarot_head_dim_two() {
    let q = build("quarot");
    let x = [3.0, 1.0, 0.0, 0.0];
    let shape = TileShape::new(2, 2);
    let out = fake(&*q, &x, shape, Kind::K, 2);
    let (a, b) = (2.793212890625f32, 1.44921875f32);
    let r = std::f32::consts::FRAC_1_SQRT_2;
    let want = [(a + b) * r, (a - b) * r, 0.0, 0.0];
    for (o, w) in out.iter().zip(want) {
        assert!((o - w).abs() < 1e-6, "{out:?} vs {want:?}");
    }
    let enc = q.encode(&x, shape, Kind::K, 2).unwrap();
    assert_eq!(enc.scales, f16s(&[0.447998046875, 0.0]));
    assert_eq!(enc.zeros, f16s(&[1.44921875, 0.0]));
    // rotated codes 3, 0 | 0, 0
    assert_eq!(enc.codes, [0x03]);
}

#[test]
fn metadata_bits_per_element() {
    let kivi = build("kivi");
    // G = 32: one scale + one zero (32 bits) per 32 elements
    assert_eq!(
        kivi.metadata_bits_per_element(TileShape::new(64, 128), Kind::K),
        1.0
    );
    assert_eq!(
        kivi.metadata_bits_per_element(TileShape::new(64, 128), Kind::V),
        1.0
    );
    // 33 tokens × 4 channels: keys have 2 token groups × 4 channels = 8 groups,
    // values 33 tokens × 1 partial group = 33 groups
    assert_eq!(
        kivi.metadata_bits_per_element(TileShape::new(33, 4), Kind::K),
        8.0 * 32.0 / 132.0
    );
    assert_eq!(
        kivi.metadata_bits_per_element(TileShape::new(33, 4), Kind::V),
        33.0 * 32.0 / 132.0
    );
    // one group per token of 128 channels: 32/128
    for name in ["quarot", "rtn-token"] {
        let q = build(name);
        assert_eq!(
            q.metadata_bits_per_element(TileShape::new(10, 128), Kind::K),
            0.25
        );
    }
    assert_eq!(
        build("rtn-token:g=48").metadata_bits_per_element(TileShape::new(1, 128), Kind::V),
        3.0 * 32.0 / 128.0
    );
}

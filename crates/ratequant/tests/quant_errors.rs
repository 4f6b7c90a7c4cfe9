//! Spec parsing and every bad-input path of the designs: clear errors, never a panic.

use half::f16;
use ratequant::quant::{self, Kind, QuantizerSpec, TileShape, DESIGNS};

fn err_of<T>(r: ratequant::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn spec_parse_and_display_round_trip() {
    for s in [
        "kivi",
        "quarot",
        "rtn-token",
        "kivi:g=64",
        "quarot:g=32",
        "rtn-token:g=1",
    ] {
        let spec = QuantizerSpec::parse(s).unwrap();
        assert_eq!(spec.to_string(), s);
        assert_eq!(s.parse::<QuantizerSpec>().unwrap(), spec);
        let q = quant::build(&spec).unwrap();
        assert_eq!(q.name(), spec.name);
    }
    assert_eq!(QuantizerSpec::parse("kivi:g=64").unwrap().group, Some(64));
    assert_eq!(QuantizerSpec::parse("kivi").unwrap().group, None);
    assert_eq!(DESIGNS, ["kivi", "quarot", "rtn-token"]);
    assert_eq!(
        quant::build(&QuantizerSpec::parse("kivi").unwrap())
            .unwrap()
            .params()["group"],
        32
    );
}

#[test]
fn spec_errors_name_the_problem() {
    let e = err_of(QuantizerSpec::parse("kiwi"));
    assert!(
        e.contains("unknown quantizer `kiwi`") && e.contains("kivi, quarot, rtn-token"),
        "{e}"
    );
    for bad in [
        "kivi:g=0",
        "kivi:g=-3",
        "kivi:g=abc",
        "kivi:g=",
        "kivi:64",
        "kivi:x=3",
        "kivi:g=4,g=8",
    ] {
        let e = err_of(QuantizerSpec::parse(bad));
        assert!(e.contains(bad), "{bad}: {e}");
    }
    let e = err_of(QuantizerSpec::parse("kivi:g=0"));
    assert!(e.contains("at least 1"), "{e}");
    let e = err_of(quant::build(&QuantizerSpec {
        name: "kivi".into(),
        group: Some(0),
    }));
    assert!(e.contains("at least 1"), "{e}");
    let e = err_of(quant::build(&QuantizerSpec {
        name: "nope".into(),
        group: None,
    }));
    assert!(e.contains("unknown quantizer"), "{e}");
}

#[test]
fn tile_errors() {
    for name in DESIGNS {
        let q = quant::build(&QuantizerSpec::parse(name).unwrap()).unwrap();
        let shape = TileShape::new(3, 4);
        let x = vec![0.5f32; 12];
        let mut out = vec![0.0f32; 12];
        for bits in [0u8, 9, 255] {
            let e = err_of(q.fake_quantize(&x, shape, Kind::K, bits, &mut out));
            assert!(e.contains("bits must be in 1..=8"), "{name}: {e}");
            let e = err_of(q.encode(&x, shape, Kind::K, bits));
            assert!(e.contains("bits must be in 1..=8"), "{name}: {e}");
        }
        let e = err_of(q.fake_quantize(&[], TileShape::new(0, 4), Kind::V, 2, &mut []));
        assert!(e.contains("empty tile"), "{name}: {e}");
        let e = err_of(q.encode(&[], TileShape::new(4, 0), Kind::V, 2));
        assert!(e.contains("empty tile"), "{name}: {e}");
        let e = err_of(q.fake_quantize(&x[..11], shape, Kind::V, 2, &mut out));
        assert!(
            e.contains("input has 11 values") && e.contains("12"),
            "{name}: {e}"
        );
        let e = err_of(q.fake_quantize(&x, shape, Kind::V, 2, &mut out[..5]));
        assert!(e.contains("output has 5 values"), "{name}: {e}");
        let e = err_of(q.encode(&x[..11], shape, Kind::K, 2));
        assert!(e.contains("input has 11 values"), "{name}: {e}");

        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut y = x.clone();
            y[6] = bad;
            for kind in [Kind::K, Kind::V] {
                let e = err_of(q.fake_quantize(&y, shape, kind, 3, &mut out));
                assert!(
                    e.contains("non-finite") && e.contains("element 6 (token 1, channel 2)"),
                    "{name} {kind:?}: {e}"
                );
                let e = err_of(q.encode(&y, shape, kind, 3));
                assert!(e.contains("element 6"), "{name} {kind:?}: {e}");
            }
        }

        let mut enc = q.encode(&x, shape, Kind::V, 3).unwrap();
        let e = err_of(q.decode(&enc, &mut out[..11]));
        assert!(e.contains("output has 11 values"), "{name}: {e}");
        enc.codes.pop();
        let e = err_of(q.decode(&enc, &mut out));
        assert!(e.contains("code bytes"), "{name}: {e}");
        let mut enc = q.encode(&x, shape, Kind::V, 3).unwrap();
        enc.scales.pop();
        let e = err_of(q.decode(&enc, &mut out));
        assert!(e.contains("scales and zero-points"), "{name}: {e}");
        let mut enc = q.encode(&x, shape, Kind::V, 3).unwrap();
        enc.scales[0] = f16::NAN;
        assert!(
            err_of(q.decode(&enc, &mut out)).contains("scale 0"),
            "{name}"
        );
        let mut enc = q.encode(&x, shape, Kind::V, 3).unwrap();
        enc.zeros[0] = f16::INFINITY;
        assert!(
            err_of(q.decode(&enc, &mut out)).contains("zero-point 0"),
            "{name}"
        );
        let mut enc = q.encode(&x, shape, Kind::V, 3).unwrap();
        enc.bits = 9;
        assert!(
            err_of(q.decode(&enc, &mut out)).contains("bits must be"),
            "{name}"
        );
    }
}

#[test]
fn values_beyond_f16_metadata_are_rejected() {
    for name in DESIGNS {
        let q = quant::build(&QuantizerSpec::parse(name).unwrap()).unwrap();
        let shape = TileShape::new(2, 4);
        // a zero-point below −65504 cannot be stored (QuaRot: every rotated value is −1e5)
        let x = [-2.0e5f32, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0];
        let e = err_of(q.encode(&x, shape, Kind::V, 4));
        assert!(e.contains("f16") && e.contains("token 0"), "{name}: {e}");
        // every token and every channel spans 1.2e5: at 1 bit a scale above 65504
        let x = [-60000.0f32, 60000.0, 60000.0, -60000.0];
        let mut out = [0.0; 4];
        for kind in [Kind::K, Kind::V] {
            let e = err_of(q.fake_quantize(&x, TileShape::new(2, 2), kind, 1, &mut out));
            assert!(e.contains("f16"), "{name}: {e}");
        }
    }
}

#[test]
fn quarot_needs_power_of_two_head_dim() {
    let q = quant::build(&QuantizerSpec::parse("quarot").unwrap()).unwrap();
    for d in [3usize, 6, 96, 80] {
        let e = err_of(q.check_head_dim(d));
        assert!(
            e.contains("power-of-two head_dim") && e.contains(&d.to_string()),
            "{e}"
        );
        let shape = TileShape::new(2, d);
        let x = vec![1.0f32; 2 * d];
        let mut out = vec![0.0f32; 2 * d];
        assert!(err_of(q.fake_quantize(&x, shape, Kind::K, 2, &mut out)).contains("power-of-two"));
        assert!(err_of(q.encode(&x, shape, Kind::K, 2)).contains("power-of-two"));
    }
    for d in [1usize, 2, 64, 128, 256] {
        q.check_head_dim(d).unwrap();
    }
    // an encoded tile of another design's shape cannot be decoded by quarot
    let rtn = quant::build(&QuantizerSpec::parse("rtn-token").unwrap()).unwrap();
    let enc = rtn
        .encode(&[1.0; 6], TileShape::new(2, 3), Kind::K, 2)
        .unwrap();
    assert!(err_of(q.decode(&enc, &mut [0.0; 6])).contains("power-of-two"));
}

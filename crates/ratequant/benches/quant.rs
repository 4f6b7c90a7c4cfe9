//! Quantize+pack (`encode`), unpack+dequantize (`decode`) and `fake_quantize` of each design at
//! 2, 3 and 4 bits, in bytes of f32 tile per second, beside a plain copy of the same bytes
//! measured in the same run (single-threaded `copy_from_slice`, and the same copy split over
//! the 2 threads the quantizers use).
//!
//! `cargo bench -p ratequant --bench quant` (add `-- --quick` on a busy machine). The tile is a
//! calibration-sized K or V tile: 8192 tokens × 128 channels of KV-like data (4 MiB).
//! Target (issue 2): `kivi` and `rtn-token` at least half the copy bandwidth on 2 threads.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ratequant::quant::{self, Kind, QuantizerSpec, TileShape};
use rayon::prelude::*;

const TOKENS: usize = 8192;
const HEAD_DIM: usize = 128;
const THREADS: usize = 2;

fn tile() -> Vec<f32> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..TOKENS * HEAD_DIM)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // per-channel spread with a few outlier channels, like real keys
            let channel = i % HEAD_DIM;
            u * if channel.is_multiple_of(31) {
                30.0
            } else {
                1.0 + (channel % 5) as f32
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    // One pool of the size the target is stated for; rayon's global pool is used inside.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build_global();
    let shape = TileShape::new(TOKENS, HEAD_DIM);
    let x = tile();
    let bytes = (x.len() * std::mem::size_of::<f32>()) as u64;
    let mut out = vec![0.0f32; x.len()];

    let mut group = c.benchmark_group("quant");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(20);
    group.bench_function("copy/1-thread", |b| {
        b.iter(|| out.copy_from_slice(black_box(&x)));
    });
    group.bench_function("copy/2-threads", |b| {
        let chunk = x.len().div_ceil(THREADS);
        b.iter(|| {
            out.par_chunks_mut(chunk)
                .zip(black_box(&x).par_chunks(chunk))
                .for_each(|(o, i)| o.copy_from_slice(i))
        });
    });
    for name in quant::DESIGNS {
        let q = quant::build(&QuantizerSpec::parse(name).unwrap()).unwrap();
        // kivi: keys (per-channel) and values (per-token) differ; the others treat both alike
        let kinds: &[Kind] = if *name == "kivi" {
            &[Kind::K, Kind::V]
        } else {
            &[Kind::K]
        };
        for &kind in kinds {
            let label = if *name == "kivi" {
                format!("{name}-{}", kind.as_str())
            } else {
                name.to_string()
            };
            for bits in [2u8, 3, 4] {
                group.bench_with_input(
                    BenchmarkId::new(format!("encode/{label}"), bits),
                    &bits,
                    |b, &bits| {
                        b.iter(|| q.encode(black_box(&x), shape, kind, bits).unwrap());
                    },
                );
                let enc = q.encode(&x, shape, kind, bits).unwrap();
                group.bench_with_input(
                    BenchmarkId::new(format!("decode/{label}"), bits),
                    &bits,
                    |b, _| {
                        b.iter(|| q.decode(black_box(&enc), &mut out).unwrap());
                    },
                );
                group.bench_with_input(
                    BenchmarkId::new(format!("fake/{label}"), bits),
                    &bits,
                    |b, &bits| {
                        b.iter(|| {
                            q.fake_quantize(black_box(&x), shape, kind, bits, &mut out)
                                .unwrap()
                        });
                    },
                );
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

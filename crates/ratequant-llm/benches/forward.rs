//! Forward throughput of the decoder on a synthetic model with SmolLM2-135M's shapes at 512
//! tokens (one prefill through the full-precision cache), reported in tokens/s.
//!
//! Run with `RAYON_NUM_THREADS=2 cargo bench -p ratequant-llm --bench forward` to match the
//! issue's 2-thread setting; llama.cpp's `llama-bench -p 512 -n 0 -t 2` is the reference.
//! Also measured in the same run: the same model's big matmuls alone (the roofline share of
//! the forward pass that `gemm` sets), so the ratio forward/matmuls shows the overhead.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ratequant_llm::synthetic::{random_weights, smollm2_shapes, SplitMix64};
use ratequant_llm::{Decoder, FpCache, KvQuantPlan, SimQuantCache};

const TOKENS: usize = 512;

fn forward(c: &mut Criterion) {
    let config = smollm2_shapes();
    let weights = random_weights(&config, 1).expect("synthetic weights");
    let decoder = Decoder::new(&config, &weights).expect("decoder");
    drop(weights);
    let mut rng = SplitMix64::new(2);
    let tokens: Vec<u32> = (0..TOKENS)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();

    let mut group = c.benchmark_group("smollm2_shapes");
    group.throughput(Throughput::Elements(TOKENS as u64));
    group.sample_size(10);
    group.bench_function("forward_fp_512", |b| {
        b.iter(|| {
            let mut cache = FpCache::new(config.num_layers);
            decoder.forward(&tokens, &mut cache).expect("forward")
        })
    });
    let kivi = std::sync::Arc::from(
        ratequant::quant::build(&ratequant::quant::QuantizerSpec::parse("kivi").unwrap())
            .expect("kivi"),
    );
    let plan = KvQuantPlan::uniform(kivi, 2, config.num_layers, config.num_kv_heads).expect("plan");
    group.bench_function("forward_sim_kivi2_512", |b| {
        b.iter(|| {
            let mut cache = SimQuantCache::new(plan.clone(), 0);
            decoder.forward(&tokens, &mut cache).expect("forward")
        })
    });

    // The dense matmuls of one forward pass alone, same shapes, same gemm.
    let h = config.hidden_size;
    let mats: Vec<(Tensor, Tensor)> = [
        (
            h,
            (config.num_heads + 2 * config.num_kv_heads) * config.head_dim,
        ),
        (config.num_heads * config.head_dim, h),
        (h, 2 * config.intermediate_size),
        (config.intermediate_size, h),
    ]
    .iter()
    .map(|&(k, n)| {
        let x = Tensor::from_vec(rng.uniform(TOKENS * k, 1.0), (TOKENS, k), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(rng.uniform(k * n, 0.1), (k, n), &Device::Cpu).unwrap();
        (x, w)
    })
    .collect();
    let head_x = Tensor::from_vec(rng.uniform(TOKENS * h, 1.0), (TOKENS, h), &Device::Cpu).unwrap();
    let head_w = Tensor::from_vec(
        rng.uniform(h * config.vocab_size, 0.1),
        (h, config.vocab_size),
        &Device::Cpu,
    )
    .unwrap();
    group.bench_function("dense_matmuls_only_512", |b| {
        b.iter(|| {
            for _ in 0..config.num_layers {
                for (x, w) in &mats {
                    std::hint::black_box(x.matmul(w).unwrap());
                }
            }
            head_x.matmul(&head_w).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);

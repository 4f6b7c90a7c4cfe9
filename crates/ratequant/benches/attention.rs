//! Decode-step attention for one layer's heads: f32 and f16 caches (plain dot-product
//! attention) against the packed cache at 2, 2.5 (half the units at 2 bits, half at 3) and 4
//! bits, at 1K, 4K, 16K and 64K tokens, SmolLM2's geometry (9 query heads, 3 KV heads,
//! head_dim 64), KIVI (G = 32, residual 128).
//!
//! A real decode visits a layer's cache once per token, after the 29 other layers' caches and
//! the weights (hundreds of MB) streamed through: the step's bytes come from memory. The
//! summary's "cold" steps are timed that way, each after an untimed read of 1.5× the
//! last-level cache on the pool's threads; its "warm" steps run back to back over the same
//! cache, which flatters small caches (a 16K packed layer of 2-3 MB fits the two cores' L2).
//! Criterion's own report times steps that start out of L2 only (a 32 MiB read per
//! iteration: cheap enough for its many iterations; `RATEQUANT_BENCH_WARM=1` for back-to-back
//! steps), for comparing builds.
//!
//! The summary, measured in the same run: median cold and warm time per step, speed-ups over
//! the f16 cache, CPU time, the bytes each cache must read, this machine's read bandwidth
//! (summing a 256 MiB buffer on the same threads) and the time those bytes take at that
//! bandwidth (the bound), as a fraction of the measured time (the cold step is the fair
//! comparison). Beside it the compute bound: the step's multiply-adds
//! (`2 · heads · tokens · head_dim`, the same for every cache) at this machine's measured peak
//! rate of f32 FMAs on the same threads, at the vector width the kernels use (16 lanes with
//! AVX-512).
//!
//! Beside each cache's "vs f16" (the ratio of two medians, measured a few seconds apart) the
//! summary prints a paired ratio: f16 and the cache's cold steps taken back to back, 41
//! pairs, median and quartiles of the per-pair ratio, so that slow drifts of a shared machine
//! fall on both sides of each ratio.
//!
//! `RATEQUANT_BENCH_CONTEXTS=1024,16384` limits the contexts;
//! `RATEQUANT_BENCH_QUANTIZER=kivi:g=128` changes the design;
//! `RATEQUANT_BENCH_CACHES=f16,packed-2.5` limits the summary's caches (profiling);
//! `RATEQUANT_BENCH_PHASES=1` adds, for every packed cache, where a cold and a warm step's
//! time goes (`kvcache::timing`: 41 steps each, per step, the phases inside tasks summed over
//! threads).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use half::f16;
use rayon::prelude::*;

use ratequant::kvcache::attention::int8::{self, Kernels};
use ratequant::kvcache::dense::DenseLayerCache;
use ratequant::kvcache::timing::{self, Phase};
use ratequant::kvcache::{
    AttentionKernel, AttentionParams, CacheShape, Isa, PackedKvCache, UnitFormat, DEFAULT_RESIDUAL,
};
use ratequant::quant::QuantizerSpec;

const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn contexts() -> Vec<usize> {
    match std::env::var("RATEQUANT_BENCH_CONTEXTS") {
        Ok(s) => s
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .expect("RATEQUANT_BENCH_CONTEXTS: comma-separated token counts")
            })
            .collect(),
        Err(_) => vec![1024, 4096, 16384, 65536],
    }
}

fn quantizer() -> QuantizerSpec {
    let s = std::env::var("RATEQUANT_BENCH_QUANTIZER").unwrap_or_else(|_| "kivi".to_string());
    QuantizerSpec::parse(&s).expect("RATEQUANT_BENCH_QUANTIZER")
}

/// Deterministic activations with a few outlier channels, `[kv_heads, tokens, head_dim]`.
fn activations(tokens: usize, heads: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..heads * tokens * HEAD_DIM)
        .map(|i| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let u = (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            let gain = if i % HEAD_DIM % 13 == 5 { 6.0 } else { 1.0 };
            (u * 2.0 - 1.0) * gain
        })
        .collect()
}

enum Cache {
    F32(DenseLayerCache<f32>),
    F16(DenseLayerCache<f16>),
    Packed(PackedKvCache),
}

impl Cache {
    fn step(&self, q: &[f32], params: &AttentionParams) -> Vec<f32> {
        match self {
            Cache::F32(c) => c.attend_last(q, HEADS, params.scale).unwrap(),
            Cache::F16(c) => c.attend_last(q, HEADS, params.scale).unwrap(),
            Cache::Packed(c) => c.attend_last(0, q, HEADS, params).unwrap(),
        }
    }

    /// Bytes one decode step must read: every stored byte of the layer.
    fn bytes(&self) -> usize {
        match self {
            Cache::F32(c) => c.bytes(),
            Cache::F16(c) => c.bytes(),
            Cache::Packed(c) => c.memory().total_bytes(),
        }
    }
}

fn build(tokens: usize) -> Vec<(String, Cache)> {
    let k = activations(tokens, KV_HEADS, 1);
    let v = activations(tokens, KV_HEADS, 2);
    let mut f32_cache = DenseLayerCache::<f32>::new(KV_HEADS, HEAD_DIM);
    f32_cache.append(&k, &v, tokens).unwrap();
    let mut f16_cache = DenseLayerCache::<f16>::new(KV_HEADS, HEAD_DIM);
    f16_cache.append(&k, &v, tokens).unwrap();
    let shape = CacheShape {
        layers: 1,
        kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let spec = quantizer();
    let mut caches = vec![
        ("f32".to_string(), Cache::F32(f32_cache)),
        ("f16".to_string(), Cache::F16(f16_cache)),
    ];
    for (name, bits) in [
        ("packed-2", [2u8, 2]),
        ("packed-2.5", [2, 3]),
        ("packed-4", [4, 4]),
    ] {
        // Unit i = 2·head + (K, V): the pattern shifts by head, so for 2.5 bits the keys get
        // 2, 3, 2 bits and the values 3, 2, 3 (mean exactly 2.5).
        let units: Vec<UnitFormat> = (0..shape.units())
            .map(|i| UnitFormat {
                quantizer: spec.clone(),
                bits: bits[(i + i / 2) % 2],
            })
            .collect();
        let mut cache = PackedKvCache::new(shape, &units, DEFAULT_RESIDUAL).unwrap();
        cache.append(0, &k, &v, tokens).unwrap();
        caches.push((name.to_string(), Cache::Packed(cache)));
        // The opt-in integer kernels, where they run natively (their scalar reference is slow).
        if int8::vnni_available() {
            let kernel = AttentionKernel::Int8;
            let mut cache =
                PackedKvCache::with_kernel(shape, &units, DEFAULT_RESIDUAL, kernel).unwrap();
            cache.append(0, &k, &v, tokens).unwrap();
            caches.push((format!("{name}-int8"), Cache::Packed(cache)));
        }
        // What an AVX2-only CPU runs: the float kernels, and the integer kernels with and
        // without AVX-VNNI.
        if name == "packed-2.5" && Isa::Avx2.is_available() {
            let mut cache = PackedKvCache::new(shape, &units, DEFAULT_RESIDUAL).unwrap();
            cache.set_isa(Isa::Avx2).unwrap();
            cache.append(0, &k, &v, tokens).unwrap();
            caches.push((format!("{name}@avx2"), Cache::Packed(cache)));
            for kernels in [Kernels::Avx2, Kernels::AvxVnni] {
                if !kernels.is_available() {
                    continue;
                }
                let kernel = AttentionKernel::Int8;
                let mut cache =
                    PackedKvCache::with_kernel(shape, &units, DEFAULT_RESIDUAL, kernel).unwrap();
                cache.set_isa(Isa::Avx2).unwrap();
                cache.set_int8_kernels(kernels).unwrap();
                cache.append(0, &k, &v, tokens).unwrap();
                caches.push((
                    format!("{name}-int8@{}", kernels.name()),
                    Cache::Packed(cache),
                ));
            }
        }
    }
    caches
}

/// The buffer [`read_bandwidth`] sums: 256 MiB.
fn bandwidth_buffer() -> Vec<f32> {
    (0..64usize << 20).map(|i| (i % 7) as f32).collect()
}

/// Read bandwidth in bytes/s: the best of several parallel sums over `buf`.
fn read_bandwidth(buf: &[f32]) -> f64 {
    let threads = rayon::current_num_threads();
    let chunk = buf.len().div_ceil(threads * 8);
    let mut best = f64::INFINITY;
    for _ in 0..7 {
        let start = Instant::now();
        let total: f32 = buf.par_chunks(chunk).map(sum8).sum();
        black_box(total);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (buf.len() * 4) as f64 / best
}

/// Peak multiply-adds per second on the pool's threads: ten independent chains of FMAs per
/// thread at the widest vector the kernels run on (16 lanes with AVX-512, else 8), the best of
/// several runs. NaN where the CPU lacks AVX2/FMA.
fn fma_rate() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        const ITERS: usize = 20_000_000;
        let wide = Isa::detect() == Isa::Avx512;
        let lanes = if wide { 16 } else { 8 };
        let threads = rayon::current_num_threads();
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = Instant::now();
            let total: f32 = (0..threads)
                .into_par_iter()
                // SAFETY: AVX2 and FMA detected above, AVX-512 F where `wide`.
                .map(|_| unsafe {
                    if wide {
                        fma_chains_16(ITERS)
                    } else {
                        fma_chains_8(ITERS)
                    }
                })
                .sum();
            black_box(total);
            best = best.min(start.elapsed().as_secs_f64());
        }
        return (threads * ITERS * 10 * lanes) as f64 / best;
    }
    f64::NAN
}

/// Ten independent FMA chains of one vector width, `iters` steps each.
macro_rules! fma_chains {
    ($name:ident, $features:literal, $zero:ident, $set1:ident, $fmadd:ident, $add:ident, $first:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(iters: usize) -> f32 {
            use std::arch::x86_64::*;
            let mut acc = [$zero(); 10];
            let x = $set1(0.999_9);
            let y = $set1(1e-3);
            for _ in 0..iters {
                for a in &mut acc {
                    *a = $fmadd(*a, x, y);
                }
            }
            let mut sum = $zero();
            for a in acc {
                sum = $add(sum, a);
            }
            $first(black_box(sum))
        }
    };
}

fma_chains!(
    fma_chains_8,
    "avx2,fma",
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_add_ps,
    _mm256_cvtss_f32
);
fma_chains!(
    fma_chains_16,
    "avx512f",
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_add_ps,
    _mm512_cvtss_f32
);

fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// CPU time consumed so far by all threads of this process (nanoseconds, from
/// `/proc/self/task/*/schedstat`); unlike wall time it barely depends on other load.
fn process_cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// CPU time per call, averaged over calls filling about half a second of wall time.
fn cpu_time_per_call(f: impl Fn()) -> Option<Duration> {
    f();
    let start = Instant::now();
    let cpu0 = process_cpu_ns()?;
    let mut calls = 0u64;
    while start.elapsed() < Duration::from_millis(500) || calls < 3 {
        f();
        calls += 1;
    }
    let cpu1 = process_cpu_ns()?;
    Some(Duration::from_nanos((cpu1 - cpu0) / calls))
}

/// Wall time of `f` after an untimed `before`.
fn timed(before: &dyn Fn(), f: &dyn Fn()) -> Duration {
    before();
    let start = Instant::now();
    f();
    start.elapsed()
}

/// Seconds per step in each phase ([`Phase::ALL`] order), over 41 steps each after `before`
/// (untimed: timing is on for the step only).
fn phase_times(before: &dyn Fn(), step: &dyn Fn()) -> [f64; Phase::ALL.len()] {
    for _ in 0..3 {
        before();
        step();
    }
    timing::take();
    const STEPS: usize = 41;
    for _ in 0..STEPS {
        before();
        timing::enable(true);
        step();
        timing::enable(false);
    }
    timing::take().map(|t| t / STEPS as f64)
}

/// Median wall time of `f` over 41 calls, each after an untimed `before`.
fn median_time(before: impl Fn(), f: impl Fn()) -> Duration {
    for _ in 0..3 {
        before();
        f();
    }
    let mut times: Vec<Duration> = (0..41).map(|_| timed(&before, &f)).collect();
    times.sort();
    times[times.len() / 2]
}

/// Median and quartiles of `t(base) / t(other)` over 41 pairs of cold steps, the two steps of
/// a pair back to back (each after its own `before`) and their order alternating: both see the
/// machine in the same state, so the ratio does not move with the minutes-long drifts that
/// separate two medians measured apart (the f16 cold step moved by 20% between runs on the
/// shared VMs measured here).
fn paired_ratio(
    before_base: impl Fn(),
    base: impl Fn(),
    before_other: impl Fn(),
    other: impl Fn(),
) -> (f64, f64, f64) {
    let mut ratios: Vec<f64> = (0..44)
        .map(|i| {
            let (b, o) = if i % 2 == 0 {
                let b = timed(&before_base, &base);
                (b, timed(&before_other, &other))
            } else {
                let o = timed(&before_other, &other);
                (timed(&before_base, &base), o)
            };
            b.as_secs_f64() / o.as_secs_f64()
        })
        .skip(3)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    (ratios[n / 2], ratios[n / 4], ratios[3 * n / 4])
}

/// Reads `buf` on the pool's threads (read-only, as a decode step's other traffic mostly
/// is: no dirty lines to write back), pushing what was cached before out of the caches that
/// `buf` outsizes.
fn evict(buf: &[u8]) -> u64 {
    buf.par_chunks(1 << 20)
        .map(|c| c.iter().step_by(64).map(|&x| x as u64).sum::<u64>())
        .sum()
}

/// Bytes to read to push a layer out of every cache level: 1.5× the last-level cache as
/// sysfs reports it (256 MiB where it doesn't), at most 2 GiB.
fn dram_evict_bytes() -> usize {
    let llc = (0..8)
        .filter_map(|i| {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            let size = size.trim();
            let (num, mul) = match size.strip_suffix('K') {
                Some(n) => (n, 1 << 10),
                None => match size.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (size, 1),
                },
            };
            num.parse::<usize>().ok().map(|n| n * mul)
        })
        .max()
        .unwrap_or(256 << 20);
    (llc + llc / 2).clamp(64 << 20, 2 << 30)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn decode_attention(c: &mut Criterion) {
    let params = AttentionParams {
        scale: 1.0 / (HEAD_DIM as f32).sqrt(),
        window: None,
    };
    let q = activations(1, HEADS, 3);
    let bandwidth_buf = bandwidth_buffer();
    let bandwidth = read_bandwidth(&bandwidth_buf);
    let macs_per_second = fma_rate();
    let mut summary = Vec::new();
    // Criterion's steps start out of L2 (cheap enough per iteration); the summary's cold
    // steps find their layer's bytes in memory only, as in a real decode, where the other
    // layers' caches and the weights (hundreds of MB) stream through between two visits of a
    // layer, but the attention code, its scratch and the threads are warm from the previous
    // layer's step.
    let l2_evictor: Vec<u8> = (0..32usize << 20).map(|i| i as u8).collect();
    let dram_evictor: Vec<u8> = (0..dram_evict_bytes()).map(|i| i as u8).collect();
    let warm_only = std::env::var("RATEQUANT_BENCH_WARM").is_ok();
    let phases_wanted = std::env::var("RATEQUANT_BENCH_PHASES").is_ok();
    let mut phase_tables = Vec::new();
    let mut group = c.benchmark_group("decode_attention");
    for tokens in contexts() {
        let caches = build(tokens);
        // The "previous layer": same kinds, few tokens (one task per head, some of them
        // quantized, some in the residual), so that it warms the code, the threads' scratch
        // and the pool without bringing much data back into the caches.
        let previous = build(256);
        for (name, cache) in &caches {
            // On a pool worker, as `ratequant` runs its commands (see the summary below).
            group.bench_with_input(BenchmarkId::new(name, tokens), cache, |b, cache| {
                rayon::scope(|_| {
                    if warm_only {
                        b.iter(|| black_box(cache.step(&q, &params)))
                    } else {
                        b.iter_batched(
                            || black_box(evict(&l2_evictor)),
                            |_| black_box(cache.step(&q, &params)),
                            criterion::BatchSize::PerIteration,
                        )
                    }
                })
            });
        }
        let only = std::env::var("RATEQUANT_BENCH_CACHES").ok();
        let f16 = caches
            .iter()
            .zip(&previous)
            .find(|((name, _), _)| name == "f16")
            .map(|((_, cache), (_, previous))| (cache, previous));
        for ((name, cache), (_, previous)) in caches.iter().zip(&previous) {
            if only
                .as_ref()
                .is_some_and(|o| !o.split(',').any(|x| x == name))
            {
                continue;
            }
            // On a pool worker, as `ratequant` runs its commands: each step starts at once.
            let (cold, all_cold, warm, cpu, paired, phases, bandwidth_now) = rayon::scope(|_| {
                let step = || {
                    black_box(cache.step(&q, &params));
                };
                // Out of every cache level, then the previous layer's step.
                let cold_before = || {
                    black_box(evict(&dram_evictor));
                    black_box(previous.step(&q, &params));
                };
                // The machine's read bandwidth drifts by a quarter over minutes on the shared
                // VMs measured here: each cache's bound takes it just before and after its
                // cold steps.
                let bandwidth_before = read_bandwidth(&bandwidth_buf);
                let cold = median_time(cold_before, step);
                let bandwidth_now = (bandwidth_before + read_bandwidth(&bandwidth_buf)) / 2.0;
                // Stop 14's cold: nothing warm, not even the code.
                let all_cold = median_time(
                    || {
                        black_box(evict(&dram_evictor));
                    },
                    step,
                );
                let warm = median_time(|| {}, step);
                let cpu = cpu_time_per_call(step);
                let paired = f16.filter(|_| name != "f16").map(|(f16, f16_previous)| {
                    paired_ratio(
                        || {
                            black_box(evict(&dram_evictor));
                            black_box(f16_previous.step(&q, &params));
                        },
                        || {
                            black_box(f16.step(&q, &params));
                        },
                        cold_before,
                        step,
                    )
                });
                let phases = (phases_wanted && matches!(cache, Cache::Packed(_))).then(|| {
                    [&cold_before as &dyn Fn(), &|| {}].map(|before| phase_times(before, &step))
                });
                (cold, all_cold, warm, cpu, paired, phases, bandwidth_now)
            });
            if let Some(phases) = phases {
                phase_tables.push((tokens, name.clone(), phases));
            }
            summary.push((
                tokens,
                name.clone(),
                cold,
                warm,
                cpu,
                cache.bytes(),
                all_cold,
                paired,
                bandwidth_now,
            ));
        }
    }
    group.finish();

    println!();
    println!(
        "decode-step attention, one layer: {HEADS} query heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}; packed = {} residual {DEFAULT_RESIDUAL}",
        quantizer()
    );
    println!(
        "threads {}, load average {}, read bandwidth at the start {:.2} GB/s, peak f32 multiply-adds {:.1} G/s",
        rayon::current_num_threads(),
        load_average(),
        bandwidth / 1e9,
        macs_per_second / 1e9
    );
    println!("(cold: median wall time of a step whose layer was pushed out of every cache level first, then");
    println!(" a step over another, 256-token layer of the same kind: as in a real decode, the layer's bytes");
    println!(" come from memory, the code, scratch and threads are warm; warm: back-to-back steps over the");
    println!(" same cache; cpu: CPU time of all threads per warm step, less sensitive to other load; bound:");
    println!(" bytes read / read bandwidth, measured just before and after the cache's cold steps (GB/s);");
    println!(" bound/time: how close a step is to that bound (the cold one");
    println!(" is the fair comparison); fma bound: the step's 2·heads·tokens·head_dim multiply-adds at the");
    println!(
        " peak rate, against the cold step; all-cold: cold without the previous layer's step, code"
    );
    println!(
        " and scratch out of cache too, as stop 14 measured cold; paired: the median and quartiles"
    );
    println!(
        " of f16 / this cache over 41 pairs of cold steps taken back to back, steadier than the"
    );
    println!(" ratio of two medians measured apart)");
    println!(
        "{:>7} {:>15} {:>8} {:>7} {:>8} {:>7} {:>8} {:>7} {:>10} {:>6} {:>8} {:>10} {:>10} {:>7} {:>8} {:>12} {:>22}",
        "tokens",
        "cache",
        "cold µs",
        "vs f16",
        "warm µs",
        "vs f16",
        "cpu µs",
        "vs f16",
        "bytes read",
        "GB/s",
        "bound µs",
        "bound/cold",
        "bound/warm",
        "fma µs",
        "fma/cold",
        "all-cold µs",
        "paired vs f16 (q1–q3)"
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for &(tokens, ref name, cold, warm, cpu, bytes, all_cold, paired, bandwidth) in &summary {
        let Some(f16) = summary.iter().find(|s| s.0 == tokens && s.1 == "f16") else {
            continue;
        };
        let bound = bytes as f64 / bandwidth * 1e6;
        let fma_bound = (2 * HEADS * tokens * HEAD_DIM) as f64 / macs_per_second * 1e6;
        let cpu_us = cpu.map_or(f64::NAN, us);
        let f16_cpu_us = f16.4.map_or(f64::NAN, us);
        println!(
            "{:>7} {:>15} {:>8.1} {:>6.2}× {:>8.1} {:>6.2}× {:>8.1} {:>6.2}× {:>10} {:>6.1} {:>8.1} {:>9.0}% {:>9.0}% {:>7.1} {:>7.0}% {:>12.1} {:>22}",
            tokens,
            name,
            us(cold),
            us(f16.2) / us(cold),
            us(warm),
            us(f16.3) / us(warm),
            cpu_us,
            f16_cpu_us / cpu_us,
            bytes,
            bandwidth / 1e9,
            bound,
            100.0 * bound / us(cold),
            100.0 * bound / us(warm),
            fma_bound,
            100.0 * fma_bound / us(cold),
            us(all_cold),
            paired.map_or(String::new(), |(m, lo, hi)| format!(
                "{m:.2}× ({lo:.2}–{hi:.2})"
            ))
        );
    }
    for (tokens, name, [cold, warm]) in &phase_tables {
        println!();
        println!("{tokens} tokens, {name}: mean µs per step by phase (inside tasks: thread time summed over threads; otherwise the caller's wall time)");
        println!(
            "{:>18} {:>9} {:>9} {:>11}",
            "phase", "cold", "warm", "cold−warm"
        );
        for (i, phase) in Phase::ALL.iter().enumerate() {
            let (c, w) = (cold[i] * 1e6, warm[i] * 1e6);
            println!("{:>18} {c:>9.1} {w:>9.1} {:>11.1}", phase.name(), c - w);
        }
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = decode_attention
}
criterion_main!(benches);

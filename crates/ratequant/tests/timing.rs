//! The opt-in phase timing of packed attention (`kvcache::timing`). A test binary of its own:
//! the totals are global, and no other test's steps may add to them here.

use ratequant::kvcache::attention::int8;
use ratequant::kvcache::timing::{self, Phase};
use ratequant::kvcache::{AttentionKernel, AttentionParams, CacheShape, PackedKvCache, UnitFormat};
use ratequant::quant::QuantizerSpec;

fn cache(kernel: AttentionKernel) -> PackedKvCache {
    let shape = CacheShape {
        layers: 1,
        kv_heads: 2,
        head_dim: 64,
    };
    let units = vec![
        UnitFormat {
            quantizer: QuantizerSpec::parse("kivi").unwrap(),
            bits: 2
        };
        shape.units()
    ];
    let mut cache = PackedKvCache::with_kernel(shape, &units, 32, kernel).unwrap();
    let tokens = 6000;
    let kv: Vec<f32> = (0..2 * tokens * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    cache.append(0, &kv, &kv, tokens).unwrap();
    cache
}

/// Three steps with timing on, on a one-thread pool, in seconds per phase.
fn timed_steps(cache: &PackedKvCache) -> [f64; Phase::ALL.len()] {
    let q: Vec<f32> = (0..4 * 64).map(|i| (i % 7) as f32 / 7.0).collect();
    let params = AttentionParams {
        scale: 0.125,
        window: None,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        timing::enable(true);
        timing::take();
        for _ in 0..3 {
            cache.attend_last(0, &q, 4, &params).unwrap();
        }
        let totals = timing::take();
        timing::enable(false);
        totals
    })
}

/// Every phase a step runs is recorded, each once: on one thread the phases inside tasks
/// add up to no more than the task stage's wall time (a phase counted twice, or a nested
/// phase not taken out of the one around it, breaks this), and the phases a kernel does not
/// have stay at zero. With timing off nothing is recorded.
#[test]
fn each_phase_is_recorded_once() {
    let mut kernels = vec![AttentionKernel::Float];
    if int8::vnni_available() {
        kernels.push(AttentionKernel::Int8);
    }
    for kernel in kernels {
        let cache = cache(kernel);
        let totals = timed_steps(&cache);
        let t = |p: Phase| totals[p as usize];
        for p in Phase::ALL {
            assert!(
                t(p).is_finite() && t(p) >= 0.0 && t(p) < 100.0,
                "{kernel:?} {}: {} s",
                p.name(),
                t(p)
            );
        }
        let mut ran = vec![Phase::Prepare, Phase::KeyScores, Phase::Residual];
        ran.extend([Phase::ValueAccumulate, Phase::Tasks, Phase::Merge]);
        let weights = [Phase::KeyWeights, Phase::ValueWeights];
        if kernel == AttentionKernel::Int8 {
            ran.extend(weights);
        } else {
            for p in weights {
                assert_eq!(t(p), 0.0, "{kernel:?} has no {}", p.name());
            }
        }
        for p in ran {
            assert!(t(p) > 0.0, "{kernel:?}: {} not recorded", p.name());
        }
        let in_tasks: f64 = Phase::ALL
            .iter()
            .filter(|p| p.is_thread_time())
            .map(|&p| t(p))
            .sum();
        assert!(
            in_tasks <= t(Phase::Tasks),
            "{kernel:?}: {in_tasks} s inside tasks, {} s for the stage",
            t(Phase::Tasks)
        );
        // Off: nothing more is recorded.
        let q = vec![0.5f32; 4 * 64];
        let params = AttentionParams {
            scale: 0.125,
            window: None,
        };
        cache.attend_last(0, &q, 4, &params).unwrap();
        timing::enable(true);
        assert!(
            timing::take().iter().all(|&x| x == 0.0),
            "recorded while off"
        );
        timing::enable(false);
    }
}

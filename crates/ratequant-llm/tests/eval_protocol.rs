//! Perplexity bookkeeping: chunking as llama.cpp does it, which predictions each protocol
//! scores, the standard error, and the KL statistics, checked on a tiny model against
//! log-probabilities computed from the reference forward.

use std::sync::Arc;

use ratequant::quant::{self, QuantizerSpec};
use ratequant_llm::eval::{
    chunk_tokens, evaluate, percentile, EvalError, EvalOptions, NllStats, Protocol, QuantSetting,
};
use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
use ratequant_llm::{reference, Arch, Decoder, KvQuantPlan, RopeLayout, SimSemantics};

#[test]
fn chunks_follow_llama_cpp() {
    let tokens: Vec<u32> = (100..111).collect(); // 11 tokens
    let chunks = chunk_tokens(&tokens, 4, None, Some(1)).unwrap();
    assert_eq!(chunks, vec![vec![1, 101, 102, 103], vec![1, 105, 106, 107]]);
    let chunks = chunk_tokens(&tokens, 4, None, None).unwrap();
    assert_eq!(
        chunks,
        vec![vec![100, 101, 102, 103], vec![104, 105, 106, 107]]
    );
    assert_eq!(chunk_tokens(&tokens, 4, Some(1), None).unwrap().len(), 1);
    assert_eq!(chunk_tokens(&tokens, 4, Some(9), None).unwrap().len(), 2);
    assert!(matches!(
        chunk_tokens(&tokens, 12, None, None),
        Err(EvalError::TextTooShort {
            tokens: 11,
            ctx: 12
        })
    ));
    assert!(matches!(
        chunk_tokens(&tokens, 2, None, None),
        Err(EvalError::ContextTooSmall(2))
    ));
    assert!(matches!(
        chunk_tokens(&tokens, 4, Some(0), None),
        Err(EvalError::NoChunks)
    ));
}

#[test]
fn scored_positions_per_protocol() {
    // llama.cpp: first = ctx/2, scores logits first..ctx-2, i.e. ctx - first - 1 predictions.
    assert_eq!(Protocol::Llama.scored_positions(512), 256..511);
    assert_eq!(Protocol::Llama.scored_positions(512).len(), 255);
    assert_eq!(Protocol::Llama.scored_positions(7), 3..6);
    assert_eq!(Protocol::Full.scored_positions(512), 0..511);
}

#[test]
fn standard_error_is_llama_cpps() {
    let mut s = NllStats::default();
    for v in [1.0, 2.0, 4.0] {
        s.push(v);
    }
    let mean = 7.0f64 / 3.0;
    let var = (1.0 + 4.0 + 16.0) / 3.0 - mean * mean;
    let ppl = mean.exp();
    assert!((s.perplexity() - ppl).abs() < 1e-12);
    assert!((s.perplexity_stderr() - ppl * (var / 2.0).sqrt()).abs() < 1e-12);
    let mut one = NllStats::default();
    one.push(3.0);
    assert_eq!(one.perplexity_stderr(), 0.0);
}

#[test]
fn percentile_is_nearest_rank() {
    let mut v: Vec<f64> = (1..=200).map(|x| x as f64).collect();
    assert_eq!(percentile(&mut v, 0.99), 198.0);
    let mut v = vec![5.0, 1.0, 3.0];
    assert_eq!(percentile(&mut v, 0.99), 5.0);
    assert_eq!(percentile(&mut v, 0.5), 3.0);
}

/// Negative log-likelihood of `target` under `logits`, in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    lse - logits[target as usize] as f64
}

#[test]
fn perplexity_scores_the_right_tokens() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 2).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let mut rng = SplitMix64::new(6);
    let text: Vec<u32> = (0..37)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();
    let ctx = 12;
    let bos = config.bos_token_id.unwrap();

    // Expected, from the reference forward of each chunk (first token replaced by BOS).
    let (mut llama, mut full) = (NllStats::default(), NllStats::default());
    for c in 0..text.len() / ctx {
        let mut chunk = text[c * ctx..(c + 1) * ctx].to_vec();
        chunk[0] = bos;
        let logits = reference::forward(&config, &weights, &chunk, None, 0).unwrap();
        for i in 0..ctx - 1 {
            let v = nll(&logits[i], chunk[i + 1]);
            full.push(v);
            if i >= ctx / 2 {
                llama.push(v);
            }
        }
    }
    assert_eq!(
        (llama.count, full.count),
        (3 * (ctx - ctx / 2 - 1), 3 * (ctx - 1))
    );

    for protocol in [Protocol::Llama, Protocol::Full] {
        let options = EvalOptions {
            ctx,
            max_chunks: None,
            protocol,
        };
        let report = evaluate(&decoder, &text, &options, None, &mut |_, _| {}).unwrap();
        assert_eq!(report.chunks, 3);
        assert_eq!(report.perplexity_llama.tokens, llama.count);
        assert_eq!(report.perplexity_full.tokens, full.count);
        let rel = |a: f64, b: f64| ((a - b) / b).abs();
        assert!(rel(report.perplexity_llama.perplexity, llama.perplexity()) < 1e-4);
        assert!(rel(report.perplexity_full.perplexity, full.perplexity()) < 1e-4);
        assert!(rel(report.perplexity_llama.stderr, llama.perplexity_stderr()) < 1e-3);
        let headline = if protocol == Protocol::Llama {
            &report.perplexity_llama
        } else {
            &report.perplexity_full
        };
        assert_eq!(&report.perplexity, headline);
        assert!(report.divergence.is_none() && report.fp_perplexity.is_none());
        assert!(report.tokens_per_second > 0.0);
    }
}

#[test]
fn divergence_against_full_precision() {
    let config = tiny_config(Arch::Qwen2, RopeLayout::Halves);
    let weights = random_weights(&config, 2).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let mut rng = SplitMix64::new(9);
    let text: Vec<u32> = (0..64)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();
    let options = EvalOptions {
        ctx: 32,
        max_chunks: None,
        protocol: Protocol::Full,
    };
    let fp = evaluate(&decoder, &text, &options, None, &mut |_, _| {}).unwrap();

    // A plan that quantizes nothing: identical to fp, zero divergence.
    let plan = KvQuantPlan::full_precision(config.num_layers, config.num_kv_heads);
    let same = evaluate(
        &decoder,
        &text,
        &options,
        Some(QuantSetting {
            plan: &plan,
            residual: 0,
            semantics: SimSemantics::Tile,
            packed: None,
        }),
        &mut |_, _| {},
    )
    .unwrap();
    let div = same.divergence.unwrap();
    assert_eq!(div.tokens, 2 * 31);
    assert!(div.mean_kl.abs() < 1e-9 && div.p99_kl.abs() < 1e-9);
    assert_eq!(div.top1_agreement, 1.0);
    assert_eq!(same.perplexity, fp.perplexity);
    assert_eq!(same.fp_perplexity.unwrap(), fp.perplexity);

    // 2-bit KIVI diverges.
    let kivi = Arc::from(quant::build(&QuantizerSpec::parse("kivi:g=8").unwrap()).unwrap());
    let plan = KvQuantPlan::uniform(kivi, 2, config.num_layers, config.num_kv_heads).unwrap();
    let mut calls = Vec::new();
    let q = evaluate(
        &decoder,
        &text,
        &options,
        Some(QuantSetting {
            plan: &plan,
            residual: 0,
            semantics: SimSemantics::Tile,
            packed: None,
        }),
        &mut |d, t| calls.push((d, t)),
    )
    .unwrap();
    assert_eq!(calls, vec![(1, 2), (2, 2)]);
    let div = q.divergence.unwrap();
    assert!(div.mean_kl > 1e-6, "2-bit KIVI gave KL {}", div.mean_kl);
    assert!(div.p99_kl >= div.mean_kl);
    assert!(div.top1_agreement < 1.0 + 1e-12);
    assert_eq!(q.fp_perplexity.unwrap(), fp.perplexity);
    assert_ne!(q.perplexity, fp.perplexity);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 2).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let text: Vec<u32> = (0..20).collect();
    let options = EvalOptions {
        ctx: 32,
        max_chunks: None,
        protocol: Protocol::Llama,
    };
    let err = evaluate(&decoder, &text, &options, None, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("20 tokens") && err.contains("32"), "{err}");

    let options = EvalOptions {
        ctx: 8,
        max_chunks: None,
        protocol: Protocol::Llama,
    };
    let plan = KvQuantPlan::full_precision(config.num_layers + 1, config.num_kv_heads);
    let err = evaluate(
        &decoder,
        &text,
        &options,
        Some(QuantSetting {
            plan: &plan,
            residual: 0,
            semantics: SimSemantics::Tile,
            packed: None,
        }),
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 layers") && err.contains("2 ×"), "{err}");

    let options = EvalOptions {
        ctx: 1000,
        max_chunks: None,
        protocol: Protocol::Llama,
    };
    let err = evaluate(&decoder, &text, &options, None, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("maximum context"), "{err}");
}

#[test]
fn the_real_packed_cache_evaluates_like_its_simulation() {
    // `eval --packed-kernel`: the packed cache behind the decoder. Its float kernels equal the
    // packed-semantics simulation up to float rounding; the int8 kernels stay close to both
    // but are not the same numbers.
    use ratequant::kvcache::{AttentionKernel, UnitFormat};
    let mut config = tiny_config(Arch::Llama, RopeLayout::Halves);
    config.head_dim = 32; // the int8 tiles need a multiple of 32
    let weights = random_weights(&config, 3).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let mut rng = SplitMix64::new(4);
    let text: Vec<u32> = (0..129)
        .map(|_| (rng.next_u64() % config.vocab_size as u64) as u32)
        .collect();
    let options = EvalOptions {
        ctx: 64,
        max_chunks: None,
        protocol: Protocol::Full,
    };
    let spec = QuantizerSpec::parse("kivi:g=16").unwrap();
    let kivi = Arc::from(quant::build(&spec).unwrap());
    let plan = KvQuantPlan::uniform(kivi, 2, config.num_layers, config.num_kv_heads).unwrap();
    let units = vec![
        UnitFormat {
            quantizer: spec,
            bits: 2
        };
        config.num_layers * config.num_kv_heads * 2
    ];
    let run = |packed| {
        let q = QuantSetting {
            plan: &plan,
            residual: 8,
            semantics: SimSemantics::Packed,
            packed,
        };
        evaluate(&decoder, &text, &options, Some(q), &mut |_, _| {}).unwrap()
    };
    let sim = run(None);
    let float = run(Some((units.clone(), AttentionKernel::Float)));
    let int8 = run(Some((units, AttentionKernel::Int8)));
    let kl = |r: &ratequant_llm::eval::EvalReport| r.divergence.as_ref().unwrap().mean_kl;
    let rel = |a: f64, b: f64| ((a - b) / b).abs();
    assert!(
        kl(&sim) > 1e-4,
        "2-bit quantization must show: KL {}",
        kl(&sim)
    );
    let ppl = |r: &ratequant_llm::eval::EvalReport| r.perplexity.perplexity;
    assert!(
        rel(ppl(&float), ppl(&sim)) < 1e-5,
        "{} vs {}",
        ppl(&float),
        ppl(&sim)
    );
    assert!(rel(kl(&float), kl(&sim)) < 1e-3);
    assert_ne!(ppl(&int8), ppl(&float));
    assert!(
        rel(kl(&int8), kl(&float)) < 0.25,
        "KL int8 {} vs float {}",
        kl(&int8),
        kl(&float)
    );
}

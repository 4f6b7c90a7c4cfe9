//! The candle decoder against the plain-loop reference on tiny random models of every
//! architecture and both RoPE layouts; fast vs differentiable paths; incremental decoding vs
//! one-shot prefill.

use ratequant_llm::synthetic::{random_weights, tiny_config};
use ratequant_llm::{reference, Arch, Decoder, FpCache, KvCache, ModelConfig, RopeLayout};

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ratequant_llm::synthetic::SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn all_configs() -> Vec<(String, ModelConfig)> {
    let mut out = Vec::new();
    for arch in [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Mistral,
        Arch::Gemma3,
    ] {
        for layout in [RopeLayout::Adjacent, RopeLayout::Halves] {
            out.push((format!("{arch:?}/{layout:?}"), tiny_config(arch, layout)));
        }
    }
    // Multi-query attention (one KV head) and plain multi-head attention.
    let mut mqa = tiny_config(Arch::Llama, RopeLayout::Halves);
    mqa.num_kv_heads = 1;
    out.push(("llama/mqa".into(), mqa));
    let mut mha = tiny_config(Arch::Llama, RopeLayout::Adjacent);
    mha.num_kv_heads = 4;
    out.push(("llama/mha".into(), mha));
    out
}

#[test]
fn decoder_matches_reference_for_every_architecture() {
    for (name, config) in all_configs() {
        let weights = random_weights(&config, 7).unwrap();
        let decoder = Decoder::new(&config, &weights).unwrap();
        let toks = tokens(19, config.vocab_size, 3);
        let mut cache = FpCache::new(config.num_layers);
        let logits = decoder.forward(&toks, &mut cache).unwrap();
        assert_eq!(logits.dims(), &[toks.len(), config.vocab_size], "{name}");
        let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want: Vec<f32> = reference::forward(&config, &weights, &toks, None, 0)
            .unwrap()
            .concat();
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < 2e-4,
            "{name}: decoder vs reference max |Δlogit| = {diff}"
        );
        assert_eq!(cache.len(), toks.len());
    }
}

#[test]
fn fast_and_differentiable_paths_agree() {
    for (name, config) in all_configs() {
        let weights = random_weights(&config, 11).unwrap();
        let decoder = Decoder::new(&config, &weights).unwrap();
        let toks = tokens(13, config.vocab_size, 5);
        let fast = decoder
            .forward(&toks, &mut FpCache::new(config.num_layers))
            .unwrap();
        let diff = decoder
            .forward_differentiable(&toks, &mut FpCache::new(config.num_layers))
            .unwrap();
        let d = max_abs_diff(
            &fast.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &diff.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            d < 1e-4,
            "{name}: fast vs differentiable max |Δlogit| = {d}"
        );
    }
}

#[test]
fn incremental_decoding_equals_prefill() {
    for (name, config) in all_configs() {
        let weights = random_weights(&config, 13).unwrap();
        let decoder = Decoder::new(&config, &weights).unwrap();
        let toks = tokens(17, config.vocab_size, 9);
        let prefill = decoder
            .forward(&toks, &mut FpCache::new(config.num_layers))
            .unwrap();
        let prefill = prefill.to_vec2::<f32>().unwrap();
        // Token by token, then in uneven blocks.
        for block in [1usize, 3, 7] {
            let mut cache = FpCache::new(config.num_layers);
            let mut rows = Vec::new();
            for piece in toks.chunks(block) {
                let logits = decoder.forward(piece, &mut cache).unwrap();
                rows.extend(logits.to_vec2::<f32>().unwrap());
            }
            assert_eq!(cache.len(), toks.len());
            let d = max_abs_diff(&rows.concat(), &prefill.concat());
            assert!(
                d < 1e-4,
                "{name}, blocks of {block}: incremental vs prefill max |Δlogit| = {d}"
            );
        }
        // forward_last returns the last row.
        let mut cache = FpCache::new(config.num_layers);
        let last = decoder
            .forward_last(&toks, &mut cache)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let d = max_abs_diff(&last, prefill.last().unwrap());
        assert!(
            d < 1e-5,
            "{name}: forward_last differs from the last prefill row by {d}"
        );
    }
}

#[test]
fn features_change_the_output() {
    // Guards against a config flag being silently ignored: flipping it must move the logits.
    let base = tiny_config(Arch::Gemma3, RopeLayout::Halves);
    let weights = random_weights(&base, 21).unwrap();
    let toks = tokens(12, base.vocab_size, 1);
    let run = |c: &ModelConfig| -> Vec<f32> {
        let d = Decoder::new(c, &weights).unwrap();
        d.forward(&toks, &mut FpCache::new(c.num_layers))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let reference = run(&base);
    type Variant = (&'static str, Box<dyn Fn(&mut ModelConfig)>);
    let variants: Vec<Variant> = vec![
        (
            "rope layout",
            Box::new(|c: &mut ModelConfig| c.rope_layout = RopeLayout::Adjacent),
        ),
        (
            "sliding window",
            Box::new(|c: &mut ModelConfig| c.sliding_window = None),
        ),
        (
            "local rope base",
            Box::new(|c: &mut ModelConfig| c.rope_local_theta = None),
        ),
        (
            "query_pre_attn_scalar",
            Box::new(|c: &mut ModelConfig| c.query_pre_attn_scalar = None),
        ),
        (
            "embedding scale",
            Box::new(|c: &mut ModelConfig| c.scale_embeddings = false),
        ),
        (
            "softcap",
            Box::new(|c: &mut ModelConfig| c.final_logit_softcapping = None),
        ),
        (
            "activation",
            Box::new(|c: &mut ModelConfig| c.activation = ratequant_llm::config::Activation::Silu),
        ),
    ];
    for (what, change) in variants {
        let mut c = base.clone();
        change(&mut c);
        let d = max_abs_diff(&run(&c), &reference);
        assert!(
            d > 1e-3,
            "changing {what} did not change the logits (max diff {d})"
        );
    }
    // Soft-capping bounds the logits.
    let cap = base.final_logit_softcapping.unwrap() as f32;
    assert!(reference.iter().all(|v| v.abs() <= cap));
}

#[test]
fn bad_weights_and_tokens_are_clear_errors() {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let mut weights = random_weights(&config, 1).unwrap();
    weights.tensors.remove("blk.1.ffn_up.weight");
    let err = Decoder::new(&config, &weights).unwrap_err().to_string();
    assert!(err.contains("blk.1.ffn_up.weight"), "{err}");

    let mut weights = random_weights(&config, 1).unwrap();
    let wrong =
        candle_core::Tensor::zeros((3, 5), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    weights.tensors.insert("blk.0.attn_k.weight".into(), wrong);
    let err = Decoder::new(&config, &weights).unwrap_err().to_string();
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("[3, 5]"),
        "{err}"
    );

    let weights = random_weights(&config, 1).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    let err = decoder
        .forward(&[1, 999], &mut FpCache::new(config.num_layers))
        .unwrap_err()
        .to_string();
    assert!(err.contains("999"), "{err}");
    let too_long = vec![1u32; config.max_position + 1];
    let err = decoder
        .forward(&too_long, &mut FpCache::new(config.num_layers))
        .unwrap_err()
        .to_string();
    assert!(err.contains("maximum context"), "{err}");

    let mut bad = config.clone();
    bad.num_kv_heads = 3;
    let err = Decoder::new(&bad, &weights).unwrap_err().to_string();
    assert!(err.contains("multiple"), "{err}");
}

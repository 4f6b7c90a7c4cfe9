//! Generation: streamed text equals the decoded ids (characters split over byte tokens held
//! back until complete), greedy and seeded sampling, top-p, stop ids, max tokens, and prefill
//! in blocks equal to one block.

mod load_support;

use std::path::Path;

use load_support::byte_chars;
use ratequant_llm::generate::{
    generate, stop_ids, GenerateOptions, Sampler, StopReason, TextStream,
};
use ratequant_llm::kv_packed::PackedCache;
use ratequant_llm::synthetic::{random_weights, tiny_config, SplitMix64};
use ratequant_llm::{Arch, Decoder, FpCache, KvCache, RopeLayout, Tokenizer};
use serde_json::json;

/// A byte-level BPE tokenizer.json: `<s>` (0), `<|im_end|>` (1) as special tokens, the 256
/// byte characters (2..258), and "Ġt" (258).
fn write_tokenizer(dir: &Path) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), json!(0));
    vocab.insert("<|im_end|>".into(), json!(1));
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 2));
    }
    vocab.insert("Ġt".into(), json!(258));
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["Ġ t"]}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&tok).unwrap()).unwrap();
    Tokenizer::from_hf_json(&path, Some(0), Some(0), Some(false)).unwrap()
}

/// The id of byte `b` in [`write_tokenizer`]'s vocabulary.
fn byte_id(b: u8) -> u32 {
    b as u32 + 2
}

fn stream_all(tokenizer: &Tokenizer, ids: &[u32]) -> (Vec<Option<String>>, String) {
    let mut stream = TextStream::new(tokenizer);
    let pieces: Vec<Option<String>> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    let mut all: String = pieces.iter().flatten().cloned().collect();
    all.extend(stream.finish().unwrap());
    (pieces, all)
}

#[test]
fn stream_holds_back_incomplete_characters() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(dir.path());
    // "é€ t!" as single bytes: é is 2 bytes, € is 3, then " t" is one merged token.
    let mut ids: Vec<u32> = "é€".bytes().map(byte_id).collect();
    ids.push(258);
    ids.push(byte_id(b'!'));
    let (pieces, all) = stream_all(&tok, &ids);
    assert_eq!(
        pieces,
        vec![
            None,
            Some("é".to_string()),
            None,
            None,
            Some("€".to_string()),
            Some(" t".to_string()),
            Some("!".to_string()),
        ]
    );
    assert_eq!(all, "é€ t!");
    // An incomplete character at the end is flushed by `finish`, as decode writes it.
    let ids = [byte_id(b'a'), byte_id(0xE2), byte_id(0x82)];
    let (pieces, all) = stream_all(&tok, &ids);
    assert_eq!(pieces, vec![Some("a".to_string()), None, None]);
    assert_eq!(all, tok.decode(&ids).unwrap());
}

#[test]
fn streamed_text_equals_decoding_all_ids() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(dir.path());
    let mut rng = SplitMix64::new(5);
    // Mostly valid multi-byte text, with some random (possibly invalid) bytes and specials.
    let text = "naïve café — 東京 🚀 t t";
    for trial in 0..200 {
        let mut ids = Vec::new();
        while ids.len() < 40 {
            match rng.next_u64() % 10 {
                0 => ids.push((rng.next_u64() % 259) as u32),
                1 => ids.push(258),
                _ => {
                    let start = (rng.next_u64() % text.len() as u64) as usize;
                    let n = 1 + (rng.next_u64() % 6) as usize;
                    let bytes = &text.as_bytes()[start..(start + n).min(text.len())];
                    ids.extend(bytes.iter().map(|&b| byte_id(b)));
                }
            }
        }
        let (_, all) = stream_all(&tok, &ids);
        assert_eq!(all, tok.decode(&ids).unwrap(), "trial {trial}: {ids:?}");
    }
}

#[test]
fn stop_ids_include_eos_and_end_of_turn() {
    let dir = tempfile::tempdir().unwrap();
    let tok = write_tokenizer(dir.path());
    let mut config = tiny_config(Arch::Llama, RopeLayout::Halves);
    config.eos_token_id = Some(0);
    assert_eq!(stop_ids(&tok, &config), vec![0, 1]);
    config.eos_token_id = None;
    assert_eq!(stop_ids(&tok, &config), vec![1]);
}

#[test]
fn greedy_takes_the_first_maximum() {
    let mut s = Sampler::greedy();
    assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    assert_eq!(
        Sampler::new(0.0, 0.5, 1)
            .unwrap()
            .sample(&[0.0, 2.0])
            .unwrap(),
        1
    );
    assert!(s.sample(&[0.0, f32::NAN]).is_err());
    assert!(s.sample(&[]).is_err());
}

#[test]
fn sampling_is_seeded_and_follows_the_distribution() {
    let logits = [2.0f32.ln(), 5.0f32.ln(), 3.0f32.ln(), -30.0];
    let draw = |seed: u64, temperature: f64, top_p: f64, n: usize| {
        let mut s = Sampler::new(temperature, top_p, seed).unwrap();
        (0..n)
            .map(|_| s.sample(&logits).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(7, 1.0, 1.0, 500), draw(7, 1.0, 1.0, 500));
    assert_ne!(draw(7, 1.0, 1.0, 500), draw(8, 1.0, 1.0, 500));
    // p = 0.2, 0.5, 0.3 (and ~0): frequencies within 0.015 of them over 20000 draws
    // (binomial σ ≤ 0.0036, so this fails only for a wrong distribution).
    let n = 20_000;
    let counts = draw(1, 1.0, 1.0, n)
        .into_iter()
        .fold([0usize; 4], |mut c, id| {
            c[id as usize] += 1;
            c
        });
    for (id, p) in [(0, 0.2), (1, 0.5), (2, 0.3), (3, 0.0)] {
        let f = counts[id] as f64 / n as f64;
        assert!((f - p).abs() < 0.015, "token {id}: {f} vs {p} ({counts:?})");
    }
    // top-p 0.75: the nucleus is {1, 2} (0.5 + 0.3 ≥ 0.75), renormalised to 0.625 / 0.375.
    let counts = draw(2, 1.0, 0.75, n)
        .into_iter()
        .fold([0usize; 4], |mut c, id| {
            c[id as usize] += 1;
            c
        });
    assert_eq!(counts[0] + counts[3], 0, "{counts:?}");
    let f = counts[1] as f64 / n as f64;
    assert!((f - 0.625).abs() < 0.015, "{counts:?}");
    // top-p below the largest probability: always the most likely token.
    assert!(draw(3, 1.0, 0.1, 200).iter().all(|&id| id == 1));
    // A low temperature sharpens towards the maximum.
    let cold = draw(4, 0.05, 1.0, 200);
    assert!(cold.iter().all(|&id| id == 1));
    assert!(Sampler::new(-1.0, 1.0, 0).is_err());
    assert!(Sampler::new(f64::NAN, 1.0, 0).is_err());
    assert!(Sampler::new(1.0, 0.0, 0).is_err());
    assert!(Sampler::new(1.0, 1.5, 0).is_err());
}

fn tiny_decoder() -> (ratequant_llm::ModelConfig, Decoder) {
    let config = tiny_config(Arch::Llama, RopeLayout::Halves);
    let weights = random_weights(&config, 8).unwrap();
    let decoder = Decoder::new(&config, &weights).unwrap();
    (config, decoder)
}

fn run(
    decoder: &Decoder,
    prompt: &[u32],
    cache: &mut dyn KvCache,
    max_tokens: usize,
    prefill_chunk: usize,
    stop: Vec<u32>,
    sampler: &mut Sampler,
) -> ratequant_llm::generate::Generation {
    let mut streamed = Vec::new();
    let options = GenerateOptions {
        max_tokens,
        prefill_chunk,
        stop_ids: stop,
    };
    let g = generate(decoder, prompt, cache, &options, sampler, &mut |id| {
        streamed.push(id);
        Ok(())
    })
    .unwrap();
    assert_eq!(streamed, g.tokens, "on_token sees every generated token");
    g
}

#[test]
fn greedy_generation_equals_argmax_of_full_forward_passes() {
    let (config, decoder) = tiny_decoder();
    let prompt: Vec<u32> = vec![1, 7, 30, 12, 55, 3, 9];
    // Reference: re-run the whole sequence every step, take the last position's argmax.
    let mut seq = prompt.clone();
    for _ in 0..10 {
        let mut cache = FpCache::new(config.num_layers);
        let logits = decoder.forward(&seq, &mut cache).unwrap();
        let last: Vec<f32> = logits.get(seq.len() - 1).unwrap().to_vec1().unwrap();
        let best = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        seq.push(best);
    }
    let want = &seq[prompt.len()..];
    for chunk in [1, 3, 512] {
        let mut cache = FpCache::new(config.num_layers);
        let g = run(
            &decoder,
            &prompt,
            &mut cache,
            10,
            chunk,
            vec![],
            &mut Sampler::greedy(),
        );
        assert_eq!(g.tokens, want, "prefill chunk {chunk}");
        assert_eq!(g.stop, StopReason::MaxTokens);
        assert_eq!(g.prompt_tokens, prompt.len());
        // The last token is not fed back: 9 decode steps, cache at prompt + 9.
        assert_eq!(g.decode_steps, 9);
        assert_eq!(cache.len(), prompt.len() + 9);
    }
    // A stop id ends generation without being emitted.
    let mut cache = FpCache::new(config.num_layers);
    let g = run(
        &decoder,
        &prompt,
        &mut cache,
        10,
        4,
        vec![want[3]],
        &mut Sampler::greedy(),
    );
    let first_stop = want.iter().position(|&t| t == want[3]).unwrap();
    assert_eq!(g.tokens, &want[..first_stop]);
    assert_eq!(g.stop, StopReason::EndOfText);
    assert_eq!(g.stop_id, Some(want[3]));
}

#[test]
fn seeded_sampling_over_the_packed_cache_repeats() {
    let (config, decoder) = tiny_decoder();
    let prompt: Vec<u32> = (0..20).map(|i| (i * 7 % 61) as u32).collect();
    let sample = |seed: u64| {
        let mut cache = PackedCache::uniform(
            &ratequant::quant::QuantizerSpec::parse("kivi:g=8").unwrap(),
            2,
            config.num_layers,
            config.num_kv_heads,
            config.head_dim,
            4,
        )
        .unwrap();
        // The random tiny model is sharply peaked: a high temperature makes seeds matter.
        let mut sampler = Sampler::new(4.0, 0.95, seed).unwrap();
        let g = run(&decoder, &prompt, &mut cache, 24, 8, vec![], &mut sampler);
        assert!(cache.memory().compression() > 1.0);
        g.tokens
    };
    let a = sample(42);
    assert_eq!(a.len(), 24);
    assert_eq!(a, sample(42));
    assert_ne!(a, sample(43));
    // Errors: empty prompt, non-empty cache, zero prefill chunk.
    let options = GenerateOptions {
        max_tokens: 1,
        prefill_chunk: 0,
        stop_ids: vec![],
    };
    let mut cache = FpCache::new(config.num_layers);
    let err = |prompt: &[u32], cache: &mut dyn KvCache, options: &GenerateOptions| {
        generate(
            &decoder,
            prompt,
            cache,
            options,
            &mut Sampler::greedy(),
            &mut |_| Ok(()),
        )
        .unwrap_err()
        .to_string()
    };
    assert!(err(&prompt, &mut cache, &options).contains("prefill chunk"));
    let options = GenerateOptions {
        prefill_chunk: 4,
        ..options
    };
    assert!(err(&[], &mut cache, &options).contains("no tokens"));
    decoder.forward(&prompt[..2], &mut cache).unwrap();
    assert!(err(&prompt, &mut cache, &options).contains("empty cache"));
}

//! Tokenizers rebuilt from GGUF metadata on tiny vocabularies: byte-level BPE with llama.cpp's
//! pre-tokenizer cascades, the special-token partition, and the SentencePiece merge order.

mod load_support;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use load_support::*;
use ratequant_llm::Tokenizer;

fn to_value(m: &Meta) -> Value {
    match m {
        Meta::U32(x) => Value::U32(*x),
        Meta::I32(x) => Value::I32(*x),
        Meta::F32(x) => Value::F32(*x),
        Meta::Bool(x) => Value::Bool(*x),
        Meta::Str(x) => Value::String(x.clone()),
        Meta::Strs(xs) => Value::Array(xs.iter().map(|x| Value::String(x.clone())).collect()),
        Meta::I32s(xs) => Value::Array(xs.iter().map(|x| Value::I32(*x)).collect()),
        Meta::F32s(xs) => Value::Array(xs.iter().map(|x| Value::F32(*x)).collect()),
    }
}

fn tokenizer(meta: Vec<(&'static str, Meta)>) -> Tokenizer {
    let md: HashMap<String, Value> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), to_value(v)))
        .collect();
    Tokenizer::from_gguf_metadata(&md, Path::new("test.gguf")).unwrap()
}

fn ids(texts: &[&str]) -> Vec<u32> {
    texts.iter().map(|t| bpe_id(t)).collect()
}

#[test]
fn bpe_merges_by_rank_within_pre_tokenized_words() {
    let tok = tokenizer(bpe_tokenizer_meta("gpt-2", false));
    assert_eq!(tok.encode("the", false).unwrap(), ids(&["t", "he"]));
    assert_eq!(tok.encode(" the", false).unwrap(), ids(&["Ġthe"]));
    assert_eq!(
        tok.encode("the the", false).unwrap(),
        ids(&["t", "he", "Ġthe"])
    );
    // `\s+(?!\S)` leaves the last space of a run to the next word.
    assert_eq!(
        tok.encode("a   the", false).unwrap(),
        ids(&["a", "ĠĠ", "Ġthe"])
    );
    assert_eq!(
        tok.encode("x\nthe", false).unwrap(),
        ids(&["x", "Ċ", "t", "he"])
    );
    assert_eq!(tok.vocab_size(), bpe_vocab().0.len());
}

#[test]
fn pre_tokenizer_choice_matters_for_digits() {
    // gpt-2 keeps `12` together so the merge applies; smollm splits digits first.
    let gpt2 = tokenizer(bpe_tokenizer_meta("gpt-2", false));
    let smollm = tokenizer(bpe_tokenizer_meta("smollm", false));
    assert_eq!(gpt2.encode("x12", false).unwrap(), ids(&["x", "12"]));
    assert_eq!(smollm.encode("x12", false).unwrap(), ids(&["x", "1", "2"]));
    // qwen2 also isolates single digits.
    let qwen = tokenizer(bpe_tokenizer_meta("qwen2", false));
    assert_eq!(qwen.encode("12", false).unwrap(), ids(&["1", "2"]));
}

#[test]
fn unknown_pre_tokenizer_is_an_error() {
    let md: HashMap<String, Value> = bpe_tokenizer_meta("no-such-pre", false)
        .iter()
        .map(|(k, v)| (k.to_string(), to_value(v)))
        .collect();
    let msg = Tokenizer::from_gguf_metadata(&md, Path::new("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no-such-pre") && msg.contains("smollm"),
        "{msg}"
    );
}

#[test]
fn special_tokens_are_single_ids_unless_parsing_is_off() {
    let tok = tokenizer(bpe_tokenizer_meta("smollm", false));
    assert_eq!(
        tok.encode("<|im_start|>the", false).unwrap(),
        [vec![1], ids(&["t", "he"])].concat()
    );
    let plain = tok.encode_with("<|im_start|>", false, false).unwrap();
    assert_eq!(
        plain.len(),
        "<|im_start|>".len(),
        "each byte its own token without merges"
    );
    assert!(!plain.contains(&1));
}

#[test]
fn bos_is_prepended_on_request() {
    let tok = tokenizer(bpe_tokenizer_meta("smollm", true));
    assert!(tok.add_bos_default());
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(0));
    assert_eq!(
        tok.encode("the", true).unwrap(),
        [vec![1], ids(&["t", "he"])].concat()
    );
}

#[test]
fn bpe_decode_round_trips_bytes() {
    let tok = tokenizer(bpe_tokenizer_meta("smollm", false));
    for text in [
        "héllo wörld",
        "tabs\tand\n\nnewlines  ",
        "数字 123 ☃ 🎉",
        "<|im_start|>user",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    assert!(tok.decode(&[999_999]).is_err());
}

fn spm(texts: &[&str]) -> Vec<u32> {
    texts.iter().map(|t| spm_id(t)).collect()
}

#[test]
fn sentencepiece_merges_highest_score_first() {
    let tok = tokenizer(spm_tokenizer_meta(false));
    // bc (-0.1) beats ab (-1.5); abc is not a token.
    assert_eq!(tok.encode("abc", false).unwrap(), spm(&["a", "bc"]));
    // ▁a (-1.0) beats ab (-1.5), then ▁ab (-0.5).
    assert_eq!(tok.encode(" ab", false).unwrap(), spm(&["▁ab"]));
    // Equal scores: the leftmost pair merges first.
    assert_eq!(tok.encode("aaa", false).unwrap(), spm(&["aa", "a"]));
}

#[test]
fn sentencepiece_byte_fallback_and_bos() {
    let tok = tokenizer(spm_tokenizer_meta(false));
    assert_eq!(
        tok.encode("é", true).unwrap(),
        vec![1, spm_id("<0xC3>"), spm_id("<0xA9>")]
    );
    assert!(tok.add_bos_default());
    let ids = tok.encode("ab é c", false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "ab é c");
}

#[test]
fn sentencepiece_space_prefix_and_user_defined_tokens() {
    let tok = tokenizer(spm_tokenizer_meta(true));
    assert_eq!(tok.encode("ab", false).unwrap(), spm(&["▁ab"]));
    // The user-defined "\n\n" is its own token and the text after it gets a fresh prefix.
    assert_eq!(
        tok.encode("a\n\nb", false).unwrap(),
        spm(&["▁a", "\n\n", "▁", "b"])
    );
    let no_prefix = tokenizer(spm_tokenizer_meta(false));
    assert_eq!(
        no_prefix.encode("a\n\nb", false).unwrap(),
        spm(&["a", "\n\n", "b"])
    );
    // User-defined tokens are matched even when control tokens are not parsed.
    assert_eq!(
        no_prefix.encode_with("a\n\n<bos>", false, false).unwrap()[..2],
        spm(&["a", "\n\n"])[..]
    );
    assert_eq!(
        no_prefix.encode("a<bos>", false).unwrap(),
        vec![spm_id("a"), 1]
    );
}

#[test]
fn missing_byte_tokens_are_an_error_for_sentencepiece() {
    let mut meta = spm_tokenizer_meta(false);
    for (k, v) in meta.iter_mut() {
        if *k == "tokenizer.ggml.tokens" {
            if let Meta::Strs(t) = v {
                t[3 + 0x41] = "A-not-a-byte".into();
            }
        }
    }
    let md: HashMap<String, Value> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), to_value(v)))
        .collect();
    let msg = Tokenizer::from_gguf_metadata(&md, Path::new("x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("<0x41>"), "{msg}");
}

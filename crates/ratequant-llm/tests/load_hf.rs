//! Hugging Face directories written by the test: name mapping, dtype conversion, halves RoPE,
//! GQA, tied embeddings, Gemma's `+1` norms, sharding, tokenizer.json, and clear errors.

mod load_support;

use std::collections::HashMap;
use std::path::Path;

use load_support::{byte_chars, values};
use ratequant_llm::config::{Activation, Arch, RopeLayout};
use ratequant_llm::hf::load_hf_dir;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

const H: usize = 16;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 4;
const FFN: usize = 24;
const LAYERS: usize = 2;

/// A byte-level BPE tokenizer.json with `<s>` (0) as a special added token.
fn write_tokenizer_json(dir: &Path, post_processor_adds_bos: bool) -> usize {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<s>".into(), json!(0));
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i + 1));
    }
    vocab.insert("Ġt".into(), json!(257));
    let post = if post_processor_adds_bos {
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}})
    } else {
        serde_json::Value::Null
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["Ġ t"]}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string(&tok).unwrap(),
    )
    .unwrap();
    258
}

/// HF tensors of a tiny model as `(name, shape, values)`.
fn hf_tensors(
    model_type: &str,
    vocab: usize,
    with_lm_head: bool,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (q, kv) = (HEADS * HD, KV * HD);
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![vocab, H]),
        ("model.norm.weight".to_string(), vec![H]),
    ];
    if with_lm_head {
        out.push(("lm_head.weight".to_string(), vec![vocab, H]));
    }
    for l in 0..LAYERS {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        out.push((p("input_layernorm.weight"), vec![H]));
        out.push((p("self_attn.q_proj.weight"), vec![q, H]));
        out.push((p("self_attn.k_proj.weight"), vec![kv, H]));
        out.push((p("self_attn.v_proj.weight"), vec![kv, H]));
        out.push((p("self_attn.o_proj.weight"), vec![H, q]));
        out.push((p("post_attention_layernorm.weight"), vec![H]));
        out.push((p("mlp.gate_proj.weight"), vec![FFN, H]));
        out.push((p("mlp.up_proj.weight"), vec![FFN, H]));
        out.push((p("mlp.down_proj.weight"), vec![H, FFN]));
        if model_type == "qwen2" {
            out.push((p("self_attn.q_proj.bias"), vec![q]));
            out.push((p("self_attn.k_proj.bias"), vec![kv]));
            out.push((p("self_attn.v_proj.bias"), vec![kv]));
        }
        if model_type == "gemma3_text" {
            out.push((p("self_attn.q_norm.weight"), vec![HD]));
            out.push((p("self_attn.k_norm.weight"), vec![HD]));
            out.push((p("pre_feedforward_layernorm.weight"), vec![H]));
            out.push((p("post_feedforward_layernorm.weight"), vec![H]));
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let len = s.iter().product();
            (n, s, values(100 + i as u64, len))
        })
        .collect()
}

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

fn decode_like(dtype: Dtype, v: &[f32]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => v.to_vec(),
        Dtype::F16 => v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect(),
        Dtype::BF16 => v
            .iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect(),
        _ => unreachable!(),
    }
}

fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype_of: impl Fn(&str) -> Dtype,
) {
    let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), dtype_of(n), s.clone(), encode(dtype_of(n), v)))
        .collect();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn config(model_type: &str, vocab: usize, tie: bool) -> serde_json::Value {
    let mut c = json!({
        "model_type": model_type, "hidden_size": H, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "max_position_embeddings": 128, "vocab_size": vocab, "tie_word_embeddings": tie,
        "bos_token_id": 0, "eos_token_id": [0, 5], "hidden_act": "silu"
    });
    if model_type == "gemma3_text" {
        let o = c.as_object_mut().unwrap();
        o.insert("head_dim".into(), json!(HD));
        o.insert("sliding_window".into(), json!(8));
        o.insert("sliding_window_pattern".into(), json!(2));
        o.insert("rope_local_base_freq".into(), json!(10000.0));
        o.insert("query_pre_attn_scalar".into(), json!(HD));
        o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
    }
    c
}

struct Fixture {
    dir: tempfile::TempDir,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn fixture(model_type: &str, tie: bool, dtype_of: impl Fn(&str) -> Dtype) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_tokenizer_json(dir.path(), false);
    let tensors = hf_tensors(model_type, vocab, !tie);
    write_safetensors(&dir.path().join("model.safetensors"), &tensors, dtype_of);
    std::fs::write(
        dir.path().join("config.json"),
        config(model_type, vocab, tie).to_string(),
    )
    .unwrap();
    Fixture { dir, tensors }
}

fn loaded(m: &ratequant_llm::LoadedModel, name: &str) -> Vec<f32> {
    m.weights
        .get(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn llama_dir_maps_names_converts_dtypes_and_ties() {
    let dtype_of = |n: &str| {
        if n.contains("q_proj") {
            Dtype::BF16
        } else if n.contains("mlp") {
            Dtype::F16
        } else {
            Dtype::F32
        }
    };
    let f = fixture("llama", true, dtype_of);
    let m = load_hf_dir(f.dir.path()).unwrap();
    let c = &m.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(
        c.rope_layout,
        RopeLayout::Halves,
        "HF checkpoints keep the halves layout"
    );
    assert_eq!(
        (c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers),
        (HEADS, KV, HD, LAYERS)
    );
    assert!(c.tie_embeddings && !c.qkv_bias);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        (c.bos_token_id, c.eos_token_id, c.add_bos),
        (Some(0), Some(0), false)
    );
    let by_name: HashMap<&str, &Vec<f32>> =
        f.tensors.iter().map(|(n, _, v)| (n.as_str(), v)).collect();
    let cases = [
        ("model.embed_tokens.weight", "token_embd.weight", Dtype::F32),
        (
            "model.layers.1.self_attn.q_proj.weight",
            "blk.1.attn_q.weight",
            Dtype::BF16,
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_k.weight",
            Dtype::F32,
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.ffn_norm.weight",
            Dtype::F32,
        ),
        (
            "model.layers.1.mlp.down_proj.weight",
            "blk.1.ffn_down.weight",
            Dtype::F16,
        ),
        ("model.norm.weight", "output_norm.weight", Dtype::F32),
    ];
    for (hf, canonical, dtype) in cases {
        assert_eq!(
            loaded(&m, canonical),
            decode_like(dtype, by_name[hf]),
            "{hf} -> {canonical}"
        );
    }
    assert_eq!(
        m.weights.get("blk.0.attn_k.weight").unwrap().dims(),
        &[KV * HD, H]
    );
    assert!(!m.weights.contains("output.weight"));
    assert_eq!(m.tokenizer.encode(" t", false).unwrap(), vec![257]);
}

#[test]
fn qwen2_bias_and_untied_head() {
    let f = fixture("qwen2", false, |_| Dtype::F32);
    let m = load_hf_dir(f.dir.path()).unwrap();
    assert!(m.config.qkv_bias && !m.config.tie_embeddings);
    assert_eq!(m.weights.get("output.weight").unwrap().dims(), &[258, H]);
    assert_eq!(
        m.weights.get("blk.1.attn_k.bias").unwrap().dims(),
        &[KV * HD]
    );
}

#[test]
fn gemma3_norms_gain_one_and_post_norms_map() {
    let f = fixture("gemma3_text", true, |_| Dtype::F32);
    let m = load_hf_dir(f.dir.path()).unwrap();
    let c = &m.config;
    assert_eq!(c.arch, Arch::Gemma3);
    assert!(c.qk_norm && c.post_norms && c.scale_embeddings && c.norm_weight_offset);
    assert_eq!(c.activation, Activation::GeluTanh);
    assert_eq!(
        (
            c.sliding_window,
            c.sliding_window_pattern,
            c.rope_local_theta
        ),
        (Some(8), Some(2), Some(10000.0))
    );
    let by_name: HashMap<&str, &Vec<f32>> =
        f.tensors.iter().map(|(n, _, v)| (n.as_str(), v)).collect();
    let plus_one = |v: &Vec<f32>| v.iter().map(|x| x + 1.0).collect::<Vec<f32>>();
    for (hf, canonical) in [
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.post_attention_norm.weight",
        ),
        (
            "model.layers.1.pre_feedforward_layernorm.weight",
            "blk.1.ffn_norm.weight",
        ),
        (
            "model.layers.1.post_feedforward_layernorm.weight",
            "blk.1.post_ffw_norm.weight",
        ),
        (
            "model.layers.1.self_attn.k_norm.weight",
            "blk.1.attn_k_norm.weight",
        ),
        ("model.norm.weight", "output_norm.weight"),
    ] {
        assert_eq!(loaded(&m, canonical), plus_one(by_name[hf]), "{hf}");
    }
    // Linear weights are untouched.
    assert_eq!(
        loaded(&m, "blk.0.attn_q.weight"),
        *by_name["model.layers.0.self_attn.q_proj.weight"]
    );
}

#[test]
fn sharded_checkpoint_with_index() {
    let f = fixture("llama", true, |_| Dtype::F32);
    let dir = f.dir.path();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = f
        .tensors
        .iter()
        .cloned()
        .partition(|(n, _, _)| n.contains("layers.0") || n.contains("embed"));
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), &a, |_| {
        Dtype::F32
    });
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &b, |_| {
        Dtype::F32
    });
    let mut map = serde_json::Map::new();
    for (n, _, _) in &a {
        map.insert(n.clone(), json!("model-00001-of-00002.safetensors"));
    }
    for (n, _, _) in &b {
        map.insert(n.clone(), json!("model-00002-of-00002.safetensors"));
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let m = load_hf_dir(dir).unwrap();
    assert_eq!(m.weights.tensors.len(), f.tensors.len());
}

#[test]
fn add_bos_follows_post_processor_when_config_is_silent() {
    let f = fixture("llama", true, |_| Dtype::F32);
    write_tokenizer_json(f.dir.path(), true);
    let m = load_hf_dir(f.dir.path()).unwrap();
    assert!(m.config.add_bos && m.tokenizer.add_bos_default());
    assert_eq!(m.tokenizer.encode(" t", true).unwrap(), vec![0, 257]);
    // tokenizer_config.json overrides.
    std::fs::write(
        f.dir.path().join("tokenizer_config.json"),
        r#"{"add_bos_token": false}"#,
    )
    .unwrap();
    assert!(!load_hf_dir(f.dir.path()).unwrap().config.add_bos);
}

fn err_of(f: &Fixture) -> String {
    load_hf_dir(f.dir.path()).unwrap_err().to_string()
}

#[test]
fn errors_name_what_is_wrong() {
    // Unknown tensor.
    let f = fixture("llama", true, |_| Dtype::F32);
    let mut t = f.tensors.clone();
    t.push((
        "model.layers.0.mlp.experts.0.weight".into(),
        vec![2],
        vec![0.0, 1.0],
    ));
    write_safetensors(&f.dir.path().join("model.safetensors"), &t, |_| Dtype::F32);
    assert!(err_of(&f).contains("model.layers.0.mlp.experts.0.weight"));

    // Shape mismatch against the config.
    let f = fixture("llama", true, |_| Dtype::F32);
    let mut cfg = config("llama", 258, true);
    cfg["num_key_value_heads"] = json!(4);
    std::fs::write(f.dir.path().join("config.json"), cfg.to_string()).unwrap();
    let msg = err_of(&f);
    assert!(
        msg.contains("blk.0.attn_k.weight") && msg.contains("[16, 16]"),
        "{msg}"
    );

    // Unsupported dtype.
    let f = fixture("llama", true, |n| {
        if n.contains("v_proj") {
            Dtype::I32
        } else {
            Dtype::F32
        }
    });
    let msg = err_of(&f);
    assert!(msg.contains("v_proj") && msg.contains("I32"), "{msg}");

    // Unsupported model type, missing tokenizer, missing config key, bad JSON.
    let f = fixture("llama", true, |_| Dtype::F32);
    let mut cfg = config("llama", 258, true);
    cfg["model_type"] = json!("mamba");
    std::fs::write(f.dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert!(err_of(&f).contains("mamba"));
    let f = fixture("llama", true, |_| Dtype::F32);
    std::fs::remove_file(f.dir.path().join("tokenizer.json")).unwrap();
    assert!(err_of(&f).contains("tokenizer.json"));
    let f = fixture("llama", true, |_| Dtype::F32);
    let mut cfg = config("llama", 258, true);
    cfg.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(f.dir.path().join("config.json"), cfg.to_string()).unwrap();
    assert!(err_of(&f).contains("intermediate_size"));
    let f = fixture("llama", true, |_| Dtype::F32);
    std::fs::write(f.dir.path().join("config.json"), "{ not json").unwrap();
    assert!(err_of(&f).contains("config.json"));

    // Truncated safetensors.
    let f = fixture("llama", true, |_| Dtype::F32);
    let p = f.dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(err_of(&f).contains("model.safetensors"));
}

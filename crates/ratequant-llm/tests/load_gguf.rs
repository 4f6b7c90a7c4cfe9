//! GGUF loading on tiny files written by the test: config from metadata, dequantized weights
//! in `[out, in]` layout, RoPE layout per architecture, tied embeddings, and clear errors.

mod load_support;

use load_support::*;
use ratequant_llm::config::{Activation, Arch, RopeLayout};
use ratequant_llm::gguf::load_gguf;
use ratequant_llm::{load_model, AssetCache, LoadError};

fn tensor_values(m: &ratequant_llm::LoadedModel, name: &str) -> Vec<f32> {
    m.weights
        .get(name)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn tiny_llama_loads_with_exact_values_and_adjacent_rope() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let expected = write_tiny_gguf(&path, "llama", TINY, true, |_, _| {});
    let m = load_model(
        path.to_str().unwrap(),
        &AssetCache::new(dir.path().join("cache")),
    )
    .unwrap();
    let c = &m.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.rope_layout, RopeLayout::Adjacent);
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (2, 32, 4, 2, 8)
    );
    assert_eq!(c.intermediate_size, 64);
    assert_eq!(c.vocab_size, bpe_vocab().0.len());
    assert_eq!(c.max_position, 256);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.rope_theta, 10000.0);
    assert!(c.tie_embeddings && !c.qkv_bias && !c.qk_norm && !c.post_norms);
    assert_eq!(c.activation, Activation::Silu);
    assert_eq!(
        (c.bos_token_id, c.eos_token_id, c.add_bos),
        (Some(1), Some(0), false)
    );
    assert!(!m.weights.contains("output.weight"));
    // [out, in] layout.
    assert_eq!(
        m.weights.get("blk.0.attn_k.weight").unwrap().dims(),
        &[16, 32]
    );
    assert_eq!(
        m.weights.get("blk.1.ffn_down.weight").unwrap().dims(),
        &[32, 64]
    );
    assert_eq!(
        m.weights.get("token_embd.weight").unwrap().dims(),
        &[bpe_vocab().0.len(), 32]
    );
    // F32 exact, F16 exactly the f16 rounding, Q8_0 exactly ggml's dequantization.
    assert_eq!(expected.len(), m.weights.tensors.len());
    for (name, want) in &expected {
        assert_eq!(&tensor_values(&m, name), want, "{name}");
    }
    // Q8_0 is lossy but within half a quantization step (plus the f16 scale's rounding) of
    // what was written: blk.0.attn_q.weight is tensor #4 (token_embd, output_norm, attn_norm).
    let raw = values(4, 32 * 32);
    let q = tensor_values(&m, "blk.0.attn_q.weight");
    assert_ne!(q, raw);
    for (block_q, block_raw) in q.chunks(32).zip(raw.chunks(32)) {
        let step = block_raw.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
        for (a, b) in block_q.iter().zip(block_raw) {
            assert!(
                (a - b).abs() <= 0.5 * step * 1.01 + 1e-3 * b.abs(),
                "{a} vs {b}"
            );
        }
    }
}

#[test]
fn qwen2_uses_halves_bias_and_separate_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    write_tiny_gguf(&path, "qwen2", TINY, false, |_, _| {});
    let m = load_gguf(&path).unwrap();
    assert_eq!(m.config.arch, Arch::Qwen2);
    assert_eq!(m.config.rope_layout, RopeLayout::Halves);
    assert!(m.config.qkv_bias && !m.config.tie_embeddings);
    assert_eq!(m.weights.get("blk.1.attn_v.bias").unwrap().dims(), &[16]);
    assert_eq!(
        m.weights.get("output.weight").unwrap().dims(),
        &[bpe_vocab().0.len(), 32]
    );
}

#[test]
fn gemma3_config_and_norms_used_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.gguf");
    let t = Tiny {
        layers: 7,
        hidden: 32,
        heads: 2,
        kv_heads: 1,
        head_dim: 32,
        ffn: 64,
    };
    let expected = write_tiny_gguf(&path, "gemma3", t, true, |_, _| {});
    let m = load_gguf(&path).unwrap();
    let c = &m.config;
    assert_eq!(c.arch, Arch::Gemma3);
    assert_eq!(c.rope_layout, RopeLayout::Halves);
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (2, 1, 32));
    assert!(c.qk_norm && c.post_norms && c.scale_embeddings && c.tie_embeddings);
    assert_eq!(c.activation, Activation::GeluTanh);
    assert_eq!(c.sliding_window, Some(16));
    assert_eq!(c.sliding_window_pattern, Some(6));
    assert_eq!(c.rope_local_theta, Some(10000.0));
    assert_eq!(c.query_pre_attn_scalar, Some(32.0));
    assert!(c.is_sliding(0) && !c.is_sliding(5) && c.is_sliding(6));
    assert_eq!((c.bos_token_id, c.add_bos), (Some(1), true));
    // GGUF Gemma norms already include the +1: loaded unchanged.
    for name in [
        "blk.3.attn_norm.weight",
        "blk.3.post_ffw_norm.weight",
        "blk.3.attn_q_norm.weight",
        "output_norm.weight",
    ] {
        assert_eq!(&tensor_values(&m, name), &expected[name], "{name}");
    }
}

fn load_err(edit: impl FnOnce(&mut Vec<(String, Meta)>, &mut Vec<GgufTensor>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    write_tiny_gguf(&path, "llama", TINY, true, edit);
    let err = load_gguf(&path).unwrap_err();
    assert!(matches!(err, LoadError::Format { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("bad.gguf"),
        "error should name the file: {msg}"
    );
    msg
}

#[test]
fn unsupported_architecture_is_named() {
    let msg = load_err(|meta, _| {
        meta.retain(|(k, _)| k != "general.architecture");
        meta.push(("general.architecture".into(), s("bert")));
    });
    assert!(msg.contains("unsupported architecture `bert`"), "{msg}");
}

#[test]
fn unsupported_tensor_type_names_tensor_and_type() {
    let msg = load_err(|_, tensors| {
        let t = tensors
            .iter_mut()
            .find(|t| t.name == "blk.1.ffn_up.weight")
            .unwrap();
        // IQ2_XXS (type 16): 66 bytes per 256 values.
        t.data = Data::Raw(16, vec![0u8; 64 * 32 / 256 * 66]);
    });
    assert!(
        msg.contains("blk.1.ffn_up.weight") && msg.contains("IQ2_XXS"),
        "{msg}"
    );
}

#[test]
fn shape_mismatch_names_tensor() {
    let msg = load_err(|_, tensors| {
        let t = tensors
            .iter_mut()
            .find(|t| t.name == "blk.1.attn_k.weight")
            .unwrap();
        t.dims = vec![24, 32];
        t.data = Data::F32(values(9, 24 * 32));
    });
    assert!(
        msg.contains("blk.1.attn_k.weight") && msg.contains("[24, 32]") && msg.contains("[16, 32]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let msg = load_err(|_, tensors| tensors.retain(|t| t.name != "blk.1.ffn_up.weight"));
    assert!(msg.contains("`blk.1.ffn_up.weight` is missing"), "{msg}");
}

#[test]
fn unexpected_tensor_is_named() {
    let msg = load_err(|_, tensors| {
        tensors.push(GgufTensor {
            name: "rope_freqs.weight".into(),
            dims: vec![4],
            data: Data::F32(vec![1.0; 4]),
        })
    });
    assert!(msg.contains("rope_freqs.weight"), "{msg}");
}

#[test]
fn missing_metadata_key_is_named() {
    let msg = load_err(|meta, _| meta.retain(|(k, _)| k != "llama.block_count"));
    assert!(msg.contains("llama.block_count"), "{msg}");
}

#[test]
fn layer_count_mismatch_is_reported() {
    let msg = load_err(|meta, _| {
        meta.retain(|(k, _)| k != "llama.block_count");
        meta.push(("llama.block_count".into(), Meta::U32(3)));
    });
    assert!(msg.contains("blk.2.attn_norm.weight"), "{msg}");
}

#[test]
fn gqa_head_counts_must_divide() {
    let msg = load_err(|meta, _| {
        meta.retain(|(k, _)| k != "llama.attention.head_count_kv");
        meta.push(("llama.attention.head_count_kv".into(), Meta::U32(3)));
    });
    assert!(msg.contains("multiple of KV heads"), "{msg}");
}

#[test]
fn wrong_magic_and_truncation_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    write_tiny_gguf(&good, "llama", TINY, true, |_, _| {});
    let bytes = std::fs::read(&good).unwrap();

    let bad_magic = dir.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&bad_magic, &b).unwrap();
    let msg = load_gguf(&bad_magic).unwrap_err().to_string();
    assert!(msg.contains("magic.gguf") && msg.contains("magic"), "{msg}");

    // Cut inside the header (metadata) and inside the tensor data.
    for (label, cut) in [("header", 300), ("data", bytes.len() - 100)] {
        let p = dir.path().join(format!("cut-{label}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err = load_gguf(&p).unwrap_err();
        assert!(matches!(err, LoadError::Format { .. }), "{label}: {err:?}");
    }
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(load_gguf(&empty).is_err());
}

#[test]
fn unknown_spec_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_model("no-such-model", &AssetCache::new(dir.path())).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("no-such-model") && msg.contains("smollm2"),
        "{msg}"
    );
}

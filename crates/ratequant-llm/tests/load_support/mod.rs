//! Test-only builders: a minimal GGUF v3 writer, tiny random checkpoints and tiny vocabularies.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use half::f16;

/// A metadata value as GGUF stores it.
#[derive(Clone, Debug)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

pub fn s(v: &str) -> Meta {
    Meta::Str(v.to_string())
}

/// Tensor contents and the GGUF type to store them in.
#[derive(Clone, Debug)]
pub enum Data {
    F32(Vec<f32>),
    F16(Vec<f32>),
    Q8_0(Vec<f32>),
    /// Raw bytes under an arbitrary ggml type id (for unsupported-type errors).
    Raw(u32, Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// PyTorch order (`[out, in]`); written innermost-first as GGUF wants.
    pub dims: Vec<usize>,
    pub data: Data,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, v: &Meta) {
    let (ty, body): (u32, Vec<u8>) = match v {
        Meta::U32(x) => (4, x.to_le_bytes().to_vec()),
        Meta::I32(x) => (5, x.to_le_bytes().to_vec()),
        Meta::F32(x) => (6, x.to_le_bytes().to_vec()),
        Meta::Bool(x) => (7, vec![*x as u8]),
        Meta::Str(x) => {
            let mut b = Vec::new();
            put_str(&mut b, x);
            (8, b)
        }
        Meta::Strs(xs) => {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                put_str(&mut b, x);
            }
            (9, b)
        }
        Meta::I32s(xs) => {
            let mut b = 5u32.to_le_bytes().to_vec();
            b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                b.extend_from_slice(&x.to_le_bytes());
            }
            (9, b)
        }
        Meta::F32s(xs) => {
            let mut b = 6u32.to_le_bytes().to_vec();
            b.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            for x in xs {
                b.extend_from_slice(&x.to_le_bytes());
            }
            (9, b)
        }
    };
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&body);
}

/// What ggml's Q8_0 stores for `x` (blocks of 32: f16 scale `amax/127`, then 32 rounded i8)
/// and the values it dequantizes to.
pub fn q8_0(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(x.len() % 32, 0, "Q8_0 needs rows that are multiples of 32");
    let mut bytes = Vec::new();
    let mut deq = Vec::new();
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        let d16 = f16::from_f32(d);
        bytes.extend_from_slice(&d16.to_le_bytes());
        for v in block {
            let q = (v * inv).round().clamp(-128.0, 127.0) as i8;
            bytes.push(q as u8);
            deq.push(d16.to_f32() * q as f32);
        }
    }
    (bytes, deq)
}

fn tensor_bytes(data: &Data) -> (u32, Vec<u8>) {
    match data {
        Data::F32(v) => (0, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        Data::F16(v) => (
            1,
            v.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
        ),
        Data::Q8_0(v) => (8, q8_0(v).0),
        Data::Raw(ty, b) => (*ty, b.clone()),
    }
}

/// Serialises a GGUF v3 file (alignment 32).
pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[GgufTensor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        put_meta(&mut out, v);
    }
    let mut blobs = Vec::new();
    let mut offset = 0usize;
    for t in tensors {
        let (ty, bytes) = tensor_bytes(&t.data);
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += bytes.len().div_ceil(32) * 32;
        blobs.push(bytes);
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for b in blobs {
        let padded = b.len().div_ceil(32) * 32;
        out.extend_from_slice(&b);
        out.resize(out.len() + padded - b.len(), 0);
    }
    out
}

pub fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[GgufTensor]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&gguf_bytes(meta, tensors)).unwrap();
}

/// Deterministic pseudo-random values in [-0.5, 0.5).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// GPT-2's byte-to-character table.
pub fn byte_chars() -> Vec<char> {
    ratequant_llm::byte_level_chars().to_vec()
}

/// A tiny byte-level BPE vocabulary: `<|endoftext|>` (0) and `<|im_start|>` (1) as control
/// tokens, the 256 byte characters (2..258), then the results of `MERGES` in order.
pub const MERGES: [&str; 6] = ["Ġ t", "h e", "Ġt he", "i n", "1 2", "Ġ Ġ"];

pub fn bpe_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string()];
    let mut types = vec![3, 3];
    for c in byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    for m in MERGES {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    (
        tokens,
        types,
        MERGES.iter().map(|m| m.to_string()).collect(),
    )
}

/// The id of `text` in [`bpe_vocab`].
pub fn bpe_id(text: &str) -> u32 {
    bpe_vocab()
        .0
        .iter()
        .position(|t| t == text)
        .unwrap_or_else(|| panic!("{text:?} not in vocab")) as u32
}

pub fn bpe_tokenizer_meta(pre: &str, add_bos: bool) -> Vec<(&'static str, Meta)> {
    let (tokens, types, merges) = bpe_vocab();
    vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s(pre)),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(merges)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(0)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(add_bos)),
    ]
}

/// A tiny SentencePiece-style vocabulary: `(text, score, type)`.
pub fn spm_vocab() -> Vec<(String, f32, i32)> {
    let mut v: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<bos>".into(), 0.0, 3),
        ("<eos>".into(), 0.0, 3),
    ];
    for b in 0..256 {
        v.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    for (t, score) in [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -2.0),
        ("c", -3.0),
        ("ab", -1.5),
        ("▁a", -1.0),
        ("▁ab", -0.5),
        ("bc", -0.1),
        ("aa", -1.0),
    ] {
        v.push((t.to_string(), score, 1));
    }
    v.push(("\n\n".into(), 0.0, 4));
    v
}

pub fn spm_id(text: &str) -> u32 {
    spm_vocab()
        .iter()
        .position(|t| t.0 == text)
        .unwrap_or_else(|| panic!("{text:?} not in vocab")) as u32
}

pub fn spm_tokenizer_meta(add_space_prefix: bool) -> Vec<(&'static str, Meta)> {
    let v = spm_vocab();
    vec![
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.pre", s("default")),
        (
            "tokenizer.ggml.tokens",
            Meta::Strs(v.iter().map(|t| t.0.clone()).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Meta::F32s(v.iter().map(|t| t.1).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Meta::I32s(v.iter().map(|t| t.2).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
        (
            "tokenizer.ggml.add_space_prefix",
            Meta::Bool(add_space_prefix),
        ),
    ]
}

/// Shape parameters of a tiny decoder.
#[derive(Clone, Copy, Debug)]
pub struct Tiny {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
}

pub const TINY: Tiny = Tiny {
    layers: 2,
    hidden: 32,
    heads: 4,
    kv_heads: 2,
    head_dim: 8,
    ffn: 64,
};

/// Canonical tensors of a tiny model: `(name, [out, in] dims)`.
pub fn tiny_tensor_shapes(
    t: Tiny,
    vocab: usize,
    arch: &str,
    tied: bool,
) -> Vec<(String, Vec<usize>)> {
    let (h, q, kv) = (t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![vocab, h]),
        ("output_norm.weight".to_string(), vec![h]),
    ];
    if !tied {
        out.push(("output.weight".to_string(), vec![vocab, h]));
    }
    for l in 0..t.layers {
        let mut add = |n: &str, d: Vec<usize>| out.push((format!("blk.{l}.{n}"), d));
        add("attn_norm.weight", vec![h]);
        add("attn_q.weight", vec![q, h]);
        add("attn_k.weight", vec![kv, h]);
        add("attn_v.weight", vec![kv, h]);
        add("attn_output.weight", vec![h, q]);
        add("ffn_norm.weight", vec![h]);
        add("ffn_gate.weight", vec![t.ffn, h]);
        add("ffn_up.weight", vec![t.ffn, h]);
        add("ffn_down.weight", vec![h, t.ffn]);
        if arch == "qwen2" {
            add("attn_q.bias", vec![q]);
            add("attn_k.bias", vec![kv]);
            add("attn_v.bias", vec![kv]);
        }
        if arch == "gemma3" || arch == "qwen3" {
            add("attn_q_norm.weight", vec![t.head_dim]);
            add("attn_k_norm.weight", vec![t.head_dim]);
        }
        if arch == "gemma3" {
            add("post_attention_norm.weight", vec![h]);
            add("post_ffw_norm.weight", vec![h]);
        }
    }
    out
}

/// Model metadata for `arch` with shape `t`.
pub fn model_meta(arch: &'static str, t: Tiny) -> Vec<(String, Meta)> {
    let k = |x: &str| format!("{arch}.{x}");
    let mut m = vec![
        ("general.architecture".to_string(), s(arch)),
        (k("block_count"), Meta::U32(t.layers as u32)),
        (k("context_length"), Meta::U32(256)),
        (k("embedding_length"), Meta::U32(t.hidden as u32)),
        (k("feed_forward_length"), Meta::U32(t.ffn as u32)),
        (k("attention.head_count"), Meta::U32(t.heads as u32)),
        (k("attention.head_count_kv"), Meta::U32(t.kv_heads as u32)),
        (k("attention.layer_norm_rms_epsilon"), Meta::F32(1e-5)),
        (k("rope.freq_base"), Meta::F32(10000.0)),
    ];
    if t.hidden != t.heads * t.head_dim || arch == "gemma3" {
        m.push((k("attention.key_length"), Meta::U32(t.head_dim as u32)));
        m.push((k("attention.value_length"), Meta::U32(t.head_dim as u32)));
    }
    if arch == "gemma3" {
        m.push((k("attention.sliding_window"), Meta::U32(16)));
    }
    m
}

/// Writes a tiny GGUF model: linear weights Q8_0 for layer 0 and F16 for layer 1, everything
/// else F32. Returns the f32 values each tensor should load as.
pub fn write_tiny_gguf(
    path: &Path,
    arch: &'static str,
    t: Tiny,
    tied: bool,
    edit: impl FnOnce(&mut Vec<(String, Meta)>, &mut Vec<GgufTensor>),
) -> std::collections::HashMap<String, Vec<f32>> {
    let (tok_meta, vocab) = if arch == "gemma3" {
        (spm_tokenizer_meta(false), spm_vocab().len())
    } else {
        (bpe_tokenizer_meta("smollm", false), bpe_vocab().0.len())
    };
    let mut meta = model_meta(arch, t);
    meta.extend(tok_meta.into_iter().map(|(k, v)| (k.to_string(), v)));
    let mut expected = std::collections::HashMap::new();
    let mut tensors = Vec::new();
    for (i, (name, dims)) in tiny_tensor_shapes(t, vocab, arch, tied)
        .into_iter()
        .enumerate()
    {
        let n: usize = dims.iter().product();
        let v = values(i as u64 + 1, n);
        let linear = dims.len() == 2 && name.starts_with("blk.");
        let (data, loaded) = if linear && name.starts_with("blk.0.") {
            let deq = q8_0(&v).1;
            (Data::Q8_0(v), deq)
        } else if linear {
            let deq = v.iter().map(|x| f16::from_f32(*x).to_f32()).collect();
            (Data::F16(v), deq)
        } else {
            (Data::F32(v.clone()), v)
        };
        expected.insert(name.clone(), loaded);
        tensors.push(GgufTensor { name, dims, data });
    }
    edit(&mut meta, &mut tensors);
    let meta_refs: Vec<(&str, Meta)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    write_gguf(path, &meta_refs, &tensors);
    expected
}

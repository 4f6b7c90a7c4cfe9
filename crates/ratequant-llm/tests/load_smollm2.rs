//! The real default assets: `smollm2` and `botchan`, fetched into the cache on first use
//! (`$RATEQUANT_CACHE` or the user cache dir) and reused afterwards. Token ids are compared with
//! llama.cpp's `llama-tokenize` on the same GGUF (reference values recorded by running llama.cpp
//! commit 0c1e570 (`llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf -f FILE --ids`, file read
//! verbatim, special tokens parsed) on these strings and on the cleaned botchan text).

use ratequant_llm::assets::{find_asset, sha256_file};
use ratequant_llm::config::{Arch, RopeLayout};
use ratequant_llm::{load_model, load_text, AssetCache};

/// sha256 of botchan after the cleaning rule, as produced independently for the llama.cpp
/// reference runs.
const BOTCHAN_CLEAN_SHA256: &str =
    "a2fce51092bec221a98787c2eebe839d386d92213a20445ff1fe039a7309418c";

/// `(text, llama-tokenize ids)`.
const REFERENCE_IDS: &[(&str, &[u32])] = &[
    ("Hello world", &[19556, 905]),
    (" Hello  world\n\n", &[38699, 216, 905, 1116]),
    (
        "It's 1234567 dollars, isn't it?",
        &[
            1589, 506, 216, 33, 34, 35, 36, 37, 38, 39, 8358, 28, 3247, 982, 357, 47,
        ],
    ),
    (
        "naïve café — ünïcödé 日本語 🤖",
        &[
            3546, 46494, 37366, 1841, 5549, 137, 94, 25972, 83, 7466, 84, 2756, 17097, 241, 115,
            40993, 179, 120, 248, 15107, 114, 240,
        ],
    ),
    ("<|im_start|>user\nHi<|im_end|>", &[1, 4093, 198, 26843, 2]),
    ("a\tb\r\nc   d", &[81, 197, 82, 201, 198, 83, 256, 287]),
];

/// llama-tokenize on the cleaned botchan text: count, first and last ids, and the sha256 of
/// all ids as little-endian u32.
const BOTCHAN_TOKENS: usize = 65_695;
const BOTCHAN_HEAD: &[u32] = &[
    18082, 766, 411, 5259, 625, 26836, 284, 260, 8646, 38854, 32334, 16593, 12733, 198, 42416,
    5229, 2810, 365, 48329, 8978, 40567, 60, 4728, 25,
];
const BOTCHAN_TAIL: &[u32] = &[
    7080, 77, 198, 13182, 282, 5265, 45382, 506, 14639, 2410, 365, 23534, 9117, 1519, 643, 411,
    25131, 29, 34985, 7983, 442, 1457, 2522, 198,
];
const BOTCHAN_IDS_SHA256: &str = "c4cb01a23affcf21feff410c384221c9dd851c6a6f0d603b4d20b8d38e151667";

fn sha256_bytes(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t");
    std::fs::write(&p, bytes).unwrap();
    sha256_file(&p).unwrap()
}

fn sha256_str(s: &str) -> String {
    sha256_bytes(s.as_bytes())
}

#[test]
fn smollm2_and_botchan_load_and_tokenize_like_llama_cpp() {
    let cache = AssetCache::from_env();
    let m = load_model("smollm2", &cache).unwrap();
    let path = cache.path_of(find_asset("smollm2").unwrap());
    assert!(path.is_file());
    let c = &m.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.rope_layout, RopeLayout::Adjacent);
    assert_eq!(
        (c.num_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!((c.vocab_size, c.max_position), (49152, 8192));
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_embeddings && !c.qkv_bias && !c.qk_norm);
    assert_eq!(
        (c.bos_token_id, c.eos_token_id, c.add_bos),
        (Some(1), Some(2), false)
    );
    assert_eq!(m.weights.tensors.len(), 272);
    assert_eq!(
        m.weights.get("blk.0.attn_k.weight").unwrap().dims(),
        &[192, 576]
    );

    let text = load_text("botchan", &cache).unwrap();
    assert_eq!(text.len(), 255_287);
    assert_eq!(sha256_str(&text), BOTCHAN_CLEAN_SHA256);

    let tok = &m.tokenizer;
    for (text, ids) in REFERENCE_IDS {
        assert_eq!(tok.encode(text, false).unwrap(), *ids, "{text:?}");
        assert_eq!(tok.decode(ids).unwrap(), *text);
    }
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.len(), BOTCHAN_TOKENS, "botchan token count");
    assert_eq!(&ids[..BOTCHAN_HEAD.len()], BOTCHAN_HEAD);
    assert_eq!(&ids[ids.len() - BOTCHAN_TAIL.len()..], BOTCHAN_TAIL);
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    assert_eq!(
        sha256_bytes(&id_bytes),
        BOTCHAN_IDS_SHA256,
        "every botchan token id equals llama.cpp's"
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

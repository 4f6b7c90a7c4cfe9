//! Evaluation and calibration texts: the `botchan` and `brown` assets, or a local file.
//!
//! `botchan` is Project Gutenberg's Botchan, cleaned by one fixed rule (the same rule the
//! llama.cpp reference runs use): strip a UTF-8 BOM, turn CRLF into LF, keep only the lines
//! strictly between the line containing `*** START OF` and the next line containing
//! `*** END OF`, trim leading and trailing whitespace of the whole text, end with exactly one
//! `\n`.
//!
//! `brown` is the Brown corpus with its part-of-speech tags stripped and the tokens
//! detokenised into plain prose (see [`brown_to_text`]). `brown:SEL` selects genres by their
//! letters: `brown:a-h` (a range), `brown:j,k` (a list), `brown:a-c,j` (both); plain `brown` is
//! every genre. Selections with no letter in common are disjoint texts, which is how a
//! calibration set is kept apart from an evaluation set ([`TextSpec::brown_genres`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::assets::{find_asset, is_brown_file, AssetCache};
use crate::loader::{LoadError, Result};

/// The Brown corpus genres: letter (the second character of the file names) and name.
pub const BROWN_GENRES: [(char, &str); 15] = [
    ('a', "news"),
    ('b', "editorial"),
    ('c', "reviews"),
    ('d', "religion"),
    ('e', "hobbies"),
    ('f', "lore"),
    ('g', "belles_lettres"),
    ('h', "government"),
    ('j', "learned"),
    ('k', "fiction"),
    ('l', "mystery"),
    ('m', "science_fiction"),
    ('n', "adventure"),
    ('p', "romance"),
    ('r', "humor"),
];

/// A parsed text spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSpec {
    Botchan,
    /// The Brown corpus restricted to these genre letters.
    Brown(BTreeSet<char>),
    /// A local UTF-8 text file, used as is (a leading BOM removed).
    File(PathBuf),
}

impl TextSpec {
    /// `botchan`, `brown`, `brown:<genres>`, or a path to an existing file.
    pub fn parse(spec: &str) -> Result<TextSpec> {
        if spec == "botchan" {
            return Ok(TextSpec::Botchan);
        }
        if spec == "brown" {
            return Ok(TextSpec::Brown(
                BROWN_GENRES.iter().map(|(c, _)| *c).collect(),
            ));
        }
        if let Some(sel) = spec.strip_prefix("brown:") {
            return parse_genres(sel).map(TextSpec::Brown);
        }
        let path = Path::new(spec);
        if path.is_file() {
            return Ok(TextSpec::File(path.to_path_buf()));
        }
        Err(LoadError::Spec(format!(
            "text `{spec}` is neither a known text (botchan, brown, brown:<genres> such as brown:a-h) nor an existing file"
        )))
    }

    /// The genre letters of a Brown selection; `None` for other texts.
    pub fn brown_genres(&self) -> Option<&BTreeSet<char>> {
        match self {
            TextSpec::Brown(g) => Some(g),
            _ => None,
        }
    }

    /// Whether two specs certainly share no text: different sources, or Brown selections with
    /// no genre in common. (Two files are compared by path only.)
    pub fn is_disjoint_from(&self, other: &TextSpec) -> bool {
        match (self, other) {
            (TextSpec::Brown(a), TextSpec::Brown(b)) => a.is_disjoint(b),
            (TextSpec::Botchan, TextSpec::Botchan) => false,
            (TextSpec::File(a), TextSpec::File(b)) => a != b,
            _ => true,
        }
    }
}

fn parse_genres(sel: &str) -> Result<BTreeSet<char>> {
    let known: BTreeSet<char> = BROWN_GENRES.iter().map(|(c, _)| *c).collect();
    let bad = |why: String| {
        LoadError::Spec(format!(
            "brown genre selection `{sel}`: {why} (genres: {})",
            BROWN_GENRES
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        ))
    };
    let letter = |s: &str| -> Result<char> {
        let mut chars = s.trim().chars();
        match (chars.next(), chars.next()) {
            (Some(c), None) if c.is_ascii_lowercase() => Ok(c),
            _ => Err(bad(format!("`{s}` is not a genre letter"))),
        }
    };
    let mut out = BTreeSet::new();
    for item in sel.split(',') {
        let picked: Vec<char> = match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (letter(lo)?, letter(hi)?);
                if lo > hi {
                    return Err(bad(format!("range `{item}` is reversed")));
                }
                known
                    .iter()
                    .copied()
                    .filter(|c| (lo..=hi).contains(c))
                    .collect()
            }
            None => {
                let c = letter(item)?;
                if !known.contains(&c) {
                    return Err(bad(format!("there is no genre `{c}`")));
                }
                vec![c]
            }
        };
        if picked.is_empty() {
            return Err(bad(format!("range `{item}` contains no genre")));
        }
        out.extend(picked);
    }
    Ok(out)
}

/// Loads the text `spec` names (see [`TextSpec::parse`]), fetching assets into `cache` when
/// missing.
pub fn load_text(spec: &str, cache: &AssetCache) -> Result<String> {
    match TextSpec::parse(spec)? {
        TextSpec::Botchan => {
            let asset = find_asset("botchan").expect("botchan is a known asset");
            let path = cache.ensure(asset)?;
            let raw = read_utf8(&path)?;
            clean_gutenberg(&raw).map_err(|msg| LoadError::format(&path, msg))
        }
        TextSpec::Brown(genres) => {
            let asset = find_asset("brown").expect("brown is a known asset");
            let dir = cache.ensure(asset)?;
            load_brown(&dir, &genres)
        }
        TextSpec::File(path) => {
            let text = read_utf8(&path)?;
            Ok(text
                .strip_prefix('\u{feff}')
                .map(str::to_string)
                .unwrap_or(text))
        }
    }
}

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| LoadError::format(path, format!("not UTF-8 text: {e}")))
}

/// The Project Gutenberg cleaning rule described in the module docs.
pub fn clean_gutenberg(raw: &str) -> std::result::Result<String, String> {
    let text = raw
        .strip_prefix('\u{feff}')
        .unwrap_or(raw)
        .replace("\r\n", "\n");
    let lines: Vec<&str> = text.split('\n').collect();
    let start = lines
        .iter()
        .position(|l| l.contains("*** START OF"))
        .ok_or("no `*** START OF` line (not a Project Gutenberg text?)")?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.contains("*** END OF"))
        .map(|i| start + 1 + i)
        .ok_or("no `*** END OF` line after the `*** START OF` line")?;
    let body = lines[start + 1..end].join("\n");
    let body = body.trim();
    if body.is_empty() {
        return Err("nothing between the `*** START OF` and `*** END OF` lines".into());
    }
    Ok(format!("{body}\n"))
}

/// Concatenates the selected genres' files (in file-name order, so genre by genre), each
/// detokenised by [`brown_to_text`], separated by blank lines.
pub fn load_brown(dir: &Path, genres: &BTreeSet<char>) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::io(dir, e))?
        .filter_map(|entry| {
            entry
                .ok()
                .map(|e| e.file_name().to_string_lossy().into_owned())
        })
        .filter(|n| is_brown_file(n) && genres.contains(&(n.as_bytes()[1] as char)))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(LoadError::format(
            dir,
            format!("no Brown corpus files for genres {genres:?}"),
        ));
    }
    let mut docs = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(name);
        docs.push(brown_to_text(&read_utf8(&path)?));
    }
    let mut text = docs.join("\n\n");
    text.push('\n');
    Ok(text)
}

/// One tagged Brown file as plain prose.
///
/// - Tags are stripped: each whitespace-separated `word/TAG` becomes `word` (split at the last
///   `/`, so `1/2/cd` is `1/2`).
/// - Paragraphs: a tab-indented line, or a line after a blank line, starts a paragraph; other
///   lines continue it; a line whose tokens are all headline-tagged (`-hl`) is a paragraph of
///   its own. Paragraphs are separated by a blank line.
/// - Within a paragraph tokens are joined by single spaces, except: no space before
///   `. , ; : ! ? ) ]` and closing quotes, none after opening quotes and `( [`; the corpus's
///   ``` `` ``` and `''` become `"`.
pub fn brown_to_text(tagged: &str) -> String {
    let mut paragraphs: Vec<Vec<&str>> = Vec::new();
    let mut after_blank = true;
    let mut prev_heading = false;
    for line in tagged.lines() {
        if line.trim().is_empty() {
            after_blank = true;
            continue;
        }
        let tagged_tokens: Vec<&str> = line.split_whitespace().collect();
        let heading = tagged_tokens.iter().all(|t| {
            t.rsplit_once('/')
                .is_some_and(|(_, tag)| tag.ends_with("-hl"))
        });
        let words = tagged_tokens
            .iter()
            .map(|t| t.rsplit_once('/').map_or(*t, |(w, _)| w));
        let new_paragraph = after_blank
            || line.starts_with('\t')
            || heading
            || prev_heading
            || paragraphs.is_empty();
        if new_paragraph {
            paragraphs.push(Vec::new());
        }
        paragraphs
            .last_mut()
            .expect("a paragraph exists")
            .extend(words);
        after_blank = false;
        prev_heading = heading;
    }
    paragraphs
        .iter()
        .map(|p| detokenize(p))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn detokenize(tokens: &[&str]) -> String {
    let mut out = String::new();
    let mut glue_next = true;
    for &tok in tokens {
        let (text, attach_left, attach_right) = match tok {
            "``" => ("\"", false, true),
            "''" => ("\"", true, false),
            "`" => ("'", false, true),
            "'" => ("'", true, false),
            "(" | "[" => (tok, false, true),
            "." | "," | ";" | ":" | "!" | "?" | ")" | "]" => (tok, true, false),
            _ => (tok, false, false),
        };
        if !(glue_next || attach_left) {
            out.push(' ');
        }
        out.push_str(text);
        glue_next = attach_right;
    }
    out
}

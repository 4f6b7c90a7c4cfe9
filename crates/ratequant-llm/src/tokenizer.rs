//! Tokenizers whose ids equal llama.cpp's for GGUF files, and the `tokenizers` pipeline for
//! Hugging Face `tokenizer.json`.
//!
//! For a GGUF file the tokenizer is rebuilt from the file's own metadata the way llama.cpp
//! builds it:
//! 1. the text is partitioned on special tokens (control, user-defined and unknown tokens;
//!    longest first, each one splitting every remaining raw fragment left to right — user-defined
//!    tokens always, control tokens only when `parse_special`);
//! 2. each raw fragment goes through the vocabulary's model:
//!    - `gpt2`: byte-level BPE (the `tokenizers` crate: vocabulary and merges from the file,
//!      the pre-tokenizer regexes llama.cpp's `llama-vocab.cpp` uses for `tokenizer.ggml.pre`,
//!      each splitting the pieces of the previous one and keeping the gaps, then byte-level);
//!    - `llama`: SentencePiece-style — spaces become `▁`, adjacent symbols are merged greedily
//!      by the highest vocabulary score (ties: leftmost), unknown symbols fall back to `<0xXX>`
//!      byte tokens.
//!
//! BOS is prepended when asked (`add_bos_default` is `tokenizer.ggml.add_bos_token`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use aho_corasick::AhoCorasick;
use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::loader::{LoadError, Result};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            // 0 (undefined) and 1 (normal) are treated alike by llama.cpp.
            _ => TokenType::Normal,
        }
    }
}

// llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by the `tokenizer.ggml.pre` names that
// select them.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_DIGIT: &str = r"\p{N}";

/// The regex cascade and `ignore_merges` flag llama.cpp uses for a `tokenizer.ggml.pre` name.
fn pre_tokenizer_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    let r = match pre {
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            false,
        ),
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" | "trillion" => (vec![RE_GPT2], false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![RE_DIGIT, RE_GPT2], false)
        }
        "qwen2" | "stablelm2" | "hunyuan" => (vec![RE_QWEN2], false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (vec![RE_LLAMA3], true),
        "dbrx" | "smaug-bpe" => (vec![RE_LLAMA3], false),
        _ => return None,
    };
    Some(r)
}

const SUPPORTED_PRE: &str = "default, gpt-2, smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, \
                             qwen2, stablelm2, hunyuan, llama3, llama-v3, llama-bpe, falcon3, pixtral, dbrx, smaug-bpe";

/// A tokenizer with llama.cpp-compatible ids for GGUF files, or the HF pipeline for
/// `tokenizer.json`.
pub struct Tokenizer {
    engine: Engine,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

enum Engine {
    /// Built from GGUF metadata.
    Gguf {
        vocab: GgufVocab,
        model: GgufModel,
        specials: SpecialTokens,
    },
    /// A Hugging Face `tokenizer.json`, used as is (its added tokens are always matched).
    HfJson(Box<tokenizers::Tokenizer>),
}

enum GgufModel {
    ByteLevelBpe(Box<tokenizers::Tokenizer>),
    SentencePiece {
        add_space_prefix: bool,
        byte_tokens: Box<[u32; 256]>,
    },
}

struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    index: HashMap<String, u32>,
}

impl GgufVocab {
    fn lookup(&self, text: &str) -> Option<u32> {
        self.index.get(text).copied()
    }
}

/// One piece of text after the special-token partition.
enum Fragment<'a> {
    Raw(&'a str),
    Token(u32),
}

/// llama.cpp's special tokens, longest text first.
struct SpecialTokens {
    /// `(text, id, is_control_or_unknown)`, sorted by text length descending (ties by id).
    tokens: Vec<(String, u32, bool)>,
    /// Finds which special tokens occur at all, so the partition only walks those.
    matcher: Option<AhoCorasick>,
}

impl SpecialTokens {
    fn new(vocab: &GgufVocab) -> Result<Self> {
        let mut tokens: Vec<(String, u32, bool)> = vocab
            .types
            .iter()
            .enumerate()
            .filter(|(_, t)| {
                matches!(
                    t,
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                )
            })
            .filter(|(id, _)| !vocab.tokens[*id].is_empty())
            .map(|(id, t)| {
                (
                    vocab.tokens[id].clone(),
                    id as u32,
                    *t != TokenType::UserDefined,
                )
            })
            .collect();
        tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let matcher = if tokens.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::new(tokens.iter().map(|t| t.0.as_str()))
                    .map_err(|e| LoadError::Tokenizer(format!("special-token matcher: {e}")))?,
            )
        };
        Ok(SpecialTokens { tokens, matcher })
    }

    /// llama.cpp's `tokenizer_st_partition`: every special token, longest first, splits every
    /// raw fragment at each of its occurrences (left to right, non-overlapping).
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Raw(text)];
        let Some(matcher) = &self.matcher else {
            return fragments;
        };
        let mut present = vec![false; self.tokens.len()];
        for m in matcher.find_overlapping_iter(text) {
            present[m.pattern().as_usize()] = true;
        }
        for (i, (tok_text, id, control)) in self.tokens.iter().enumerate() {
            if !present[i] || (*control && !parse_special) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                match fragment {
                    Fragment::Raw(mut raw) => {
                        while let Some(at) = raw.find(tok_text.as_str()) {
                            if at > 0 {
                                next.push(Fragment::Raw(&raw[..at]));
                            }
                            next.push(Fragment::Token(*id));
                            raw = &raw[at + tok_text.len()..];
                        }
                        if !raw.is_empty() {
                            next.push(Fragment::Raw(raw));
                        }
                    }
                    token => next.push(token),
                }
            }
            fragments = next;
        }
        fragments
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.*` keys).
    pub fn from_gguf_metadata(md: &HashMap<String, Value>, path: &Path) -> Result<Self> {
        let err = |msg: String| LoadError::format(path, msg);
        let get = |key: &str| {
            md.get(key)
                .ok_or_else(|| err(format!("metadata key `{key}` is missing")))
        };
        let string = |key: &str| match get(key)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(err(format!(
                "metadata key `{key}` should be a string, found {:?}",
                other.value_type()
            ))),
        };
        let array = |key: &str| match get(key)? {
            Value::Array(a) => Ok(a),
            other => Err(err(format!(
                "metadata key `{key}` should be an array, found {:?}",
                other.value_type()
            ))),
        };
        let opt_id = |key: &str| -> Result<Option<u32>> {
            match md.get(key) {
                None => Ok(None),
                Some(v) => crate::gguf::value_to_u64(v)
                    .map(|x| Some(x as u32))
                    .ok_or_else(|| err(format!("metadata key `{key}` should be a token id"))),
            }
        };
        let opt_bool = |key: &str| -> Result<Option<bool>> {
            match md.get(key) {
                None => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(err(format!(
                    "metadata key `{key}` should be a bool, found {:?}",
                    other.value_type()
                ))),
            }
        };

        let model_kind = string("tokenizer.ggml.model")?;
        let tokens: Vec<String> = array("tokenizer.ggml.tokens")?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(err(format!("tokenizer.ggml.tokens[{i}] is not a string"))),
            })
            .collect::<Result<_>>()?;
        let n = tokens.len();
        if n == 0 {
            return Err(err("tokenizer.ggml.tokens is empty".into()));
        }
        let types: Vec<TokenType> = match md.get("tokenizer.ggml.token_type") {
            None => vec![TokenType::Normal; n],
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| match *v {
                    Value::I32(x) => Ok(TokenType::from_gguf(x as i64)),
                    Value::U32(x) => Ok(TokenType::from_gguf(x as i64)),
                    _ => Err(err("tokenizer.ggml.token_type holds non-integers".into())),
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(err(format!(
                    "tokenizer.ggml.token_type must be an array of {n} integers"
                )))
            }
        };
        let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
            None => vec![0.0; n],
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| match *v {
                    Value::F32(x) => Ok(x),
                    _ => Err(err("tokenizer.ggml.scores holds non-f32 values".into())),
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(err(format!(
                    "tokenizer.ggml.scores must be an array of {n} f32"
                )))
            }
        };
        // Later duplicates win, as in llama.cpp's token_to_id map.
        let index: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let vocab = GgufVocab {
            tokens,
            types,
            scores,
            index,
        };

        let check_id = |key: &str, id: Option<u32>| -> Result<Option<u32>> {
            match id {
                Some(i) if i as usize >= n => Err(err(format!(
                    "{key} = {i} is outside the vocabulary of {n} tokens"
                ))),
                other => Ok(other),
            }
        };
        let bos = check_id(
            "tokenizer.ggml.bos_token_id",
            opt_id("tokenizer.ggml.bos_token_id")?,
        )?;
        let eos = check_id(
            "tokenizer.ggml.eos_token_id",
            opt_id("tokenizer.ggml.eos_token_id")?,
        )?;

        let (model, default_add_bos) = match model_kind.as_str() {
            "gpt2" => {
                let pre = match md.get("tokenizer.ggml.pre") {
                    Some(_) => string("tokenizer.ggml.pre")?,
                    None => "default".to_string(),
                };
                let merges: Vec<(String, String)> = array("tokenizer.ggml.merges")?
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => s
                            .split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| err(format!("tokenizer.ggml.merges[{i}] = {s:?} is not `left right`"))),
                        _ => Err(err(format!("tokenizer.ggml.merges[{i}] is not a string"))),
                    })
                    .collect::<Result<_>>()?;
                let bpe = build_byte_level_bpe(&vocab, merges, &pre).map_err(&err)?;
                (GgufModel::ByteLevelBpe(Box::new(bpe)), false)
            }
            "llama" => {
                let mut byte_tokens = Box::new([0u32; 256]);
                for (b, slot) in byte_tokens.iter_mut().enumerate() {
                    let name = format!("<0x{b:02X}>");
                    *slot = vocab
                        .lookup(&name)
                        .ok_or_else(|| err(format!("SentencePiece vocabulary lacks the byte token {name}")))?;
                }
                let add_space_prefix = opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                (GgufModel::SentencePiece { add_space_prefix, byte_tokens }, true)
            }
            other => {
                return Err(err(format!(
                    "tokenizer model `{other}` is not supported (supported: gpt2 byte-level BPE, llama SentencePiece)"
                )))
            }
        };
        let add_bos = opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        if add_bos && bos.is_none() {
            return Err(err(
                "tokenizer.ggml.add_bos_token is set but there is no bos_token_id".into(),
            ));
        }
        let specials = SpecialTokens::new(&vocab)?;
        Ok(Tokenizer {
            engine: Engine::Gguf {
                vocab,
                model,
                specials,
            },
            bos,
            eos,
            add_bos,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`. BOS/EOS come from the caller (the directory's
    /// `config.json`); whether BOS is added from `tokenizer_config.json`'s `add_bos_token`, or,
    /// when that is absent, from whether the file's post-processor puts BOS in front.
    pub fn from_hf_json(
        path: &Path,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: Option<bool>,
    ) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| LoadError::format(path, format!("tokenizer.json: {e}")))?;
        let n = tok.get_vocab_size(true) as u32;
        let add_bos = match add_bos {
            Some(b) => b,
            None => {
                let probe = |special| tok.encode("a", special).map(|e| e.get_ids().to_vec());
                match (probe(true), probe(false), bos) {
                    (Ok(with), Ok(without), Some(b)) => {
                        with.len() > without.len() && with.first() == Some(&b)
                    }
                    _ => false,
                }
            }
        };
        for (what, id) in [("bos", bos), ("eos", eos)] {
            if let Some(i) = id {
                if i >= n {
                    return Err(LoadError::format(
                        path,
                        format!("{what} token id {i} is outside the vocabulary of {n} tokens"),
                    ));
                }
            }
        }
        if add_bos && bos.is_none() {
            return Err(LoadError::format(
                path,
                "the tokenizer adds a BOS token but none is defined",
            ));
        }
        Ok(Tokenizer {
            engine: Engine::HfJson(Box::new(tok)),
            bos,
            eos,
            add_bos,
        })
    }

    /// Token ids of `text`, with BOS first when `add_bos`. Special tokens written in the text
    /// (e.g. `<|im_start|>`) become their single ids, as `llama-tokenize` does by default.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        self.encode_with(text, add_bos, true)
    }

    /// As [`encode`](Self::encode); with `parse_special = false` control tokens written in the
    /// text are tokenized as plain text (llama.cpp's `llama-perplexity` does this; user-defined
    /// tokens are matched either way). A `tokenizer.json` always matches its added tokens.
    pub fn encode_with(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            out.push(self.bos.ok_or_else(|| {
                LoadError::Tokenizer("BOS requested but the model defines none".into())
            })?);
        }
        match &self.engine {
            Engine::HfJson(tok) => {
                let enc = tok
                    .encode(text, false)
                    .map_err(|e| LoadError::Tokenizer(e.to_string()))?;
                out.extend_from_slice(enc.get_ids());
            }
            Engine::Gguf {
                vocab,
                model,
                specials,
            } => {
                let mut prev_special = true;
                for fragment in specials.partition(text, parse_special) {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Raw(raw) => {
                            match model {
                                GgufModel::ByteLevelBpe(tok) => {
                                    let enc = tok
                                        .encode(raw, false)
                                        .map_err(|e| LoadError::Tokenizer(e.to_string()))?;
                                    out.extend_from_slice(enc.get_ids());
                                }
                                GgufModel::SentencePiece {
                                    add_space_prefix,
                                    byte_tokens,
                                } => {
                                    let mut escaped = String::with_capacity(raw.len() + 3);
                                    if *add_space_prefix && prev_special {
                                        escaped.push('\u{2581}');
                                    }
                                    escaped.extend(raw.chars().map(|c| {
                                        if c == ' ' {
                                            '\u{2581}'
                                        } else {
                                            c
                                        }
                                    }));
                                    sentencepiece_merge(vocab, byte_tokens, &escaped, &mut out);
                                }
                            }
                            prev_special = false;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The text of `ids`; special tokens are written out, invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.engine {
            Engine::HfJson(tok) => tok
                .decode(ids, false)
                .map_err(|e| LoadError::Tokenizer(e.to_string())),
            Engine::Gguf { vocab, model, .. } => {
                let byte_decoder = match model {
                    GgufModel::ByteLevelBpe(_) => Some(byte_level_decoder()),
                    GgufModel::SentencePiece { .. } => None,
                };
                let mut bytes = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    let text = vocab.tokens.get(id as usize).ok_or_else(|| {
                        LoadError::Tokenizer(format!(
                            "token id {id} is outside the vocabulary of {}",
                            vocab.tokens.len()
                        ))
                    })?;
                    match (vocab.types[id as usize], &byte_decoder) {
                        (TokenType::Normal | TokenType::Unused, Some(dec)) => {
                            for c in text.chars() {
                                match dec.get(&c) {
                                    Some(b) => bytes.push(*b),
                                    None => bytes.extend_from_slice(c.to_string().as_bytes()),
                                }
                            }
                        }
                        (TokenType::Byte, _) => match parse_byte_token(text) {
                            Some(b) => bytes.push(b),
                            None => bytes.extend_from_slice(text.as_bytes()),
                        },
                        (TokenType::Normal | TokenType::Unused, None) => {
                            bytes.extend_from_slice(text.replace('\u{2581}', " ").as_bytes())
                        }
                        _ => bytes.extend_from_slice(text.as_bytes()),
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model expects BOS in front of a text (llama.cpp adds it when this is set).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// Number of token ids the tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        match &self.engine {
            Engine::HfJson(tok) => tok.get_vocab_size(true),
            Engine::Gguf { vocab, .. } => vocab.tokens.len(),
        }
    }

    /// The vocabulary entry of `id` (GGUF token text / HF token string), if any.
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.engine {
            Engine::HfJson(tok) => tok.id_to_token(id),
            Engine::Gguf { vocab, .. } => vocab.tokens.get(id as usize).cloned(),
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.engine {
            Engine::HfJson(_) => "tokenizer.json",
            Engine::Gguf {
                model: GgufModel::ByteLevelBpe(_),
                ..
            } => "gguf byte-level BPE",
            Engine::Gguf {
                model: GgufModel::SentencePiece { .. },
                ..
            } => "gguf SentencePiece",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

fn build_byte_level_bpe(
    vocab: &GgufVocab,
    merges: Vec<(String, String)>,
    pre: &str,
) -> std::result::Result<tokenizers::Tokenizer, String> {
    let (regexes, ignore_merges) = pre_tokenizer_regexes(pre)
        .ok_or_else(|| format!("pre-tokenizer `{pre}` (tokenizer.ggml.pre) is not supported (supported: {SUPPORTED_PRE})"))?;
    let bpe_vocab: tokenizers::models::bpe::Vocab =
        vocab.index.iter().map(|(t, id)| (t.clone(), *id)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| format!("BPE vocabulary/merges: {e}"))?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("pre-tokenizer regex {re:?}: {e}"))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tok)
}

/// GPT-2's byte → printable-character table of byte-level BPE vocabularies: printable Latin-1
/// bytes stand for themselves, the others are shifted to U+0100 onwards in byte order. Public
/// for tests that write byte-level vocabularies.
pub fn byte_level_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut shifted = 0u32;
    for (b, c) in chars.iter_mut().enumerate() {
        let b = b as u32;
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        *c = char::from_u32(code).expect("valid code point");
    }
    chars
}

/// [`byte_level_chars`] inverted.
fn byte_level_decoder() -> HashMap<char, u8> {
    byte_level_chars()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// A candidate merge of two adjacent symbols in the SentencePiece pass.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text; a stale entry no longer matches its symbols' lengths.
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Highest score first; among equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// llama.cpp's SentencePiece pass over one escaped fragment: start from UTF-8 characters,
/// repeatedly merge the adjacent pair whose concatenation is the vocabulary entry with the
/// highest score, then emit each symbol as its token or as byte tokens.
fn sentencepiece_merge(
    vocab: &GgufVocab,
    byte_tokens: &[u32; 256],
    text: &str,
    out: &mut Vec<u32>,
) {
    if text.is_empty() {
        return;
    }
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (start, c) in text.char_indices() {
        let idx = symbols.len();
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: idx.checked_sub(1),
            next: if start + c.len_utf8() == text.len() {
                None
            } else {
                Some(idx + 1)
            },
        });
    }
    let mut queue = BinaryHeap::new();
    let try_add = |queue: &mut BinaryHeap<Bigram>,
                   symbols: &[Symbol],
                   left: Option<usize>,
                   right: Option<usize>| {
        let (Some(l), Some(r)) = (left, right) else {
            return;
        };
        let piece = &text[symbols[l].start..symbols[l].start + symbols[l].len + symbols[r].len];
        if let Some(id) = vocab.lookup(piece) {
            queue.push(Bigram {
                score: vocab.scores[id as usize],
                left: l,
                right: r,
                size: piece.len(),
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(&mut queue, &symbols, Some(i - 1), Some(i));
    }
    while let Some(bigram) = queue.pop() {
        let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
            continue;
        }
        symbols[bigram.left].len += r.len;
        symbols[bigram.right].len = 0;
        symbols[bigram.left].next = r.next;
        if let Some(n) = r.next {
            symbols[n].prev = Some(bigram.left);
        }
        try_add(
            &mut queue,
            &symbols,
            symbols[bigram.left].prev,
            Some(bigram.left),
        );
        try_add(
            &mut queue,
            &symbols,
            Some(bigram.left),
            symbols[bigram.left].next,
        );
    }
    let mut at = Some(0);
    while let Some(i) = at {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.lookup(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().map(|b| byte_tokens[b as usize])),
        }
        at = s.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned against GPT-2's published table, independently of how it is computed.
    #[test]
    fn byte_level_chars_match_gpt2() {
        let chars = byte_level_chars();
        for (byte, want) in [
            (0x00u8, '\u{100}'),
            (0x0A, '\u{10A}'),
            (0x20, '\u{120}'), // 'Ġ', the space of every GPT-2 style vocabulary
            (0x21, '!'),
            (0x61, 'a'),
            (0x7E, '~'),
            (0x7F, '\u{121}'),
            (0x80, '\u{122}'),
            (0xA0, '\u{142}'),
            (0xA1, '¡'),
            (0xAD, '\u{143}'),
            (0xAE, '®'),
            (0xFF, 'ÿ'),
        ] {
            assert_eq!(chars[byte as usize], want, "byte {byte:#04x}");
        }
        let decoder = byte_level_decoder();
        assert_eq!(decoder.len(), 256);
        assert!(chars.iter().enumerate().all(|(b, c)| decoder[c] == b as u8));
    }
}

//! Quantizer designs: each turns a `[tokens, head_dim]` tile of keys or values into `b`-bit
//! codes plus f16 scales/zero-points, and back.
//!
//! Contract shared by every design (tests enforce it):
//! * `fake_quantize(x)` is bit-for-bit equal to `decode(encode(x))`;
//! * scales and zero-points are rounded to f16 *before* they are used, so the simulation
//!   equals the real packed encoding;
//! * asymmetric min-max with `2^b − 1` levels, round to nearest; a constant group is
//!   reproduced exactly; a trailing partial group uses its own min/max.
//!
//! How the f16 parameters are chosen (see [`minmax`]): the zero-point is the group minimum
//! rounded *down* to f16 and the scale is `(max − zero) / (2^b − 1)` rounded *up* to f16, so
//! the grid `zero + scale·q` (q = 0..2^b−1) still covers the whole group. Every element is
//! therefore within half a step (`scale / 2`, the f16 scale actually used) of its
//! reconstruction, up to f32 rounding of the arithmetic; QuaRot's clipped elements excepted.
//! A constant group whose value is representable in f16 (0, padding, …) is reproduced
//! exactly; any other constant group is reproduced within half of a step that is itself
//! below one f16 ulp of the value.

mod engine;
mod fused;
pub mod kivi;
mod minmax;
pub mod quarot;
pub mod rtn;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use kivi::Kivi;
pub use quarot::Quarot;
pub use rtn::RtnToken;

/// Names of the available designs, as accepted by [`QuantizerSpec::parse`].
pub const DESIGNS: &[&str] = &["kivi", "quarot", "rtn-token"];

/// Highest supported bit-width (codes are stored in at most one byte).
pub const MAX_BITS: u8 = 8;

/// Keys or values of one KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "k")]
    K,
    #[serde(rename = "v")]
    V,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::K => "k",
            Kind::V => "v",
        }
    }
}

/// Shape of a row-major tile: `tokens` rows of `head_dim` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileShape {
    pub tokens: usize,
    pub head_dim: usize,
}

impl TileShape {
    pub fn new(tokens: usize, head_dim: usize) -> Self {
        TileShape { tokens, head_dim }
    }
    pub fn len(&self) -> usize {
        self.tokens * self.head_dim
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for TileShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} tokens, head_dim {}]", self.tokens, self.head_dim)
    }
}

/// A tile encoded into bit-packed codes plus f16 metadata; `decode` reproduces
/// `fake_quantize` exactly.
///
/// Layout (the same for every design):
/// * `codes`: one `bits`-wide code per element in row-major `[tokens, head_dim]` order
///   (element `t·head_dim + c`), packed LSB-first as by [`crate::pack::pack`]: element `i`
///   occupies bits `i·bits .. (i+1)·bits` of the little-endian byte stream; the last byte is
///   zero-padded. For QuaRot the codes are those of the *rotated* token vectors.
/// * `scales` / `zeros`: one per group, value = `zero + scale·code`. Group order:
///   - per-token groups (KIVI values, QuaRot, RTN-token): group `t·⌈head_dim/G⌉ + g` covers
///     channels `g·G .. min((g+1)·G, head_dim)` of token `t`;
///   - per-channel groups (KIVI keys): group `j·head_dim + c` covers tokens
///     `j·G .. min((j+1)·G, tokens)` of channel `c` (token-group-major, so appending a
///     completed group of G tokens appends `head_dim` parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedTile {
    pub shape: TileShape,
    pub kind: Kind,
    pub bits: u8,
    /// Codes packed little-endian, LSB-first, `bits` per element, in the design's element order.
    pub codes: Vec<u8>,
    /// One f16 scale per group, in the design's group order.
    pub scales: Vec<half::f16>,
    /// One f16 zero-point (the group minimum) per group.
    pub zeros: Vec<half::f16>,
}

impl EncodedTile {
    /// Bytes this tile really occupies (codes + scales + zero-points).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * (self.scales.len() + self.zeros.len())
    }
}

/// A quantizer design (KIVI, QuaRot, per-token RTN, …).
pub trait Quantizer: Send + Sync {
    /// Short stable name used in files and on the command line (`kivi`, `quarot`, `rtn-token`).
    fn name(&self) -> &'static str;
    /// The design's parameters as written into CALIB/PLAN files, e.g. `{"group": 32}`.
    fn params(&self) -> serde_json::Value;
    /// Checks that the design can serve heads of this size (QuaRot needs a power of two).
    fn check_head_dim(&self, head_dim: usize) -> Result<()>;
    /// Fake-quantizes `x` (row-major `shape`) at `bits` (1..=8) into `out` (same length).
    fn fake_quantize(
        &self,
        x: &[f32],
        shape: TileShape,
        kind: Kind,
        bits: u8,
        out: &mut [f32],
    ) -> Result<()>;
    /// Encodes into packed codes and f16 metadata.
    fn encode(&self, x: &[f32], shape: TileShape, kind: Kind, bits: u8) -> Result<EncodedTile>;
    /// Decodes into `out` (length `shape.len()`), bit-exactly equal to `fake_quantize`.
    fn decode(&self, enc: &EncodedTile, out: &mut [f32]) -> Result<()>;
    /// Metadata bits per element for a tile of this shape (scales + zero-points, 16 bits each,
    /// divided by the elements they serve). Nominal bits are `bits` themselves.
    fn metadata_bits_per_element(&self, shape: TileShape, kind: Kind) -> f64;
}

/// A design named with its parameters, as parsed from the command line (`kivi`, `kivi:g=64`)
/// or read from a CALIB/PLAN file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizerSpec {
    pub name: String,
    /// Group size; `None` means the design's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<usize>,
}

impl QuantizerSpec {
    /// Parses `NAME` or `NAME:g=GROUP` (e.g. `kivi`, `kivi:g=64`, `quarot:g=32`).
    pub fn parse(s: &str) -> Result<QuantizerSpec> {
        let s = s.trim();
        let (name, params) = match s.split_once(':') {
            Some((name, params)) => (name, Some(params)),
            None => (s, None),
        };
        check_design_name(name)?;
        let mut group = None;
        if let Some(params) = params {
            for param in params.split(',') {
                let (key, value) = param.split_once('=').ok_or_else(|| {
                    Error::invalid(format!(
                        "quantizer spec `{s}`: expected parameters like `g=32` after `:`, got `{param}`"
                    ))
                })?;
                match key.trim() {
                    "g" | "group" => {
                        if group.is_some() {
                            return Err(Error::invalid(format!(
                                "quantizer spec `{s}`: group given twice"
                            )));
                        }
                        group =
                            Some(parse_group(value.trim()).map_err(|e| {
                                Error::invalid(format!("quantizer spec `{s}`: {e}"))
                            })?);
                    }
                    other => {
                        return Err(Error::invalid(format!(
                            "quantizer spec `{s}`: unknown parameter `{other}` (known: g=GROUP)"
                        )))
                    }
                }
            }
        }
        Ok(QuantizerSpec {
            name: name.to_string(),
            group,
        })
    }

    /// Checks the name and group of a spec built or deserialised directly.
    pub fn validate(&self) -> Result<()> {
        check_design_name(&self.name)?;
        if self.group == Some(0) {
            return Err(Error::invalid(format!(
                "quantizer `{}`: group size must be at least 1, got 0",
                self.name
            )));
        }
        Ok(())
    }
}

impl FromStr for QuantizerSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        QuantizerSpec::parse(s)
    }
}

impl fmt::Display for QuantizerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.group {
            Some(g) => write!(f, "{}:g={g}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

fn check_design_name(name: &str) -> Result<()> {
    if DESIGNS.contains(&name) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "unknown quantizer `{name}` (known: {})",
            DESIGNS.join(", ")
        )))
    }
}

fn parse_group(value: &str) -> std::result::Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("group size must be at least 1, got 0".to_string()),
        Ok(g) => Ok(g),
        Err(_) => Err(format!(
            "group size must be a positive integer, got `{value}`"
        )),
    }
}

/// Builds the design a spec names.
pub fn build(spec: &QuantizerSpec) -> Result<Box<dyn Quantizer>> {
    spec.validate()?;
    Ok(match spec.name.as_str() {
        "kivi" => Box::new(Kivi::new(spec.group)?),
        "quarot" => Box::new(Quarot::new(spec.group)?),
        "rtn-token" => Box::new(RtnToken::new(spec.group)?),
        other => unreachable!("validate accepted unknown design {other}"),
    })
}

/// Checks a bit-width is in 1..=8.
pub fn check_bits(bits: u8) -> Result<()> {
    if (1..=MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "bits must be in 1..={MAX_BITS}, got {bits}"
        )))
    }
}

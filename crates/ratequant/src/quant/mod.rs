//! Quantizer designs: each turns a `[tokens, head_dim]` tile of keys or values into `b`-bit
//! codes plus f16 scales/zero-points, and back.
//!
//! Contract shared by every design (tests enforce it):
//! * `fake_quantize(x)` is bit-for-bit equal to `decode(encode(x))`;
//! * scales and zero-points are rounded to f16 *before* they are used, so the simulation
//!   equals the real packed encoding;
//! * asymmetric min-max with `2^b − 1` levels, round to nearest; a constant group is
//!   reproduced exactly; a trailing partial group uses its own min/max.

use serde::{Deserialize, Serialize};

use crate::Result;

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
    pub fn len(&self) -> usize {
        self.tokens * self.head_dim
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A tile encoded into bit-packed codes plus f16 metadata; `decode` reproduces
/// `fake_quantize` exactly.
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
    fn fake_quantize(&self, x: &[f32], shape: TileShape, kind: Kind, bits: u8, out: &mut [f32]) -> Result<()>;
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

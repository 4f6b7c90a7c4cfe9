//! QuaRot (Ashkboos et al., 2024) for the KV cache: rotate every token's vector by the
//! normalised Walsh–Hadamard matrix of order head_dim, which spreads outlier channels over
//! all channels, quantize per token over groups of `G` channels (default `G = head_dim`)
//! with the min-max range clipped to 95% about its midpoint (values outside it are clamped
//! into it before rounding), and rotate back. Keys and values alike. head_dim must be a
//! power of two (Sylvester construction).
//!
//! Encoded codes, scales and zero-points describe the *rotated* vectors; `decode` rotates
//! back. The half-step guarantee holds in the rotated domain, against the values clamped into
//! the clipped range.

use super::engine::{Groups, Scheme};
use super::{EncodedTile, Kind, Quantizer, TileShape};
use crate::{hadamard, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quarot {
    /// `None`: one group per token (`G = head_dim`).
    group: Option<usize>,
}

impl Quarot {
    /// Fraction of each group's min-max range kept, shrunk about its midpoint.
    pub const CLIP_RATIO: f32 = 0.95;

    /// QuaRot with group size `group` (default: head_dim); the group must be at least 1.
    pub fn new(group: Option<usize>) -> Result<Quarot> {
        if group == Some(0) {
            return Err(Error::invalid(
                "quarot: group size must be at least 1, got 0",
            ));
        }
        Ok(Quarot { group })
    }

    /// Head-size check for a tile; an empty tile is left to the engine's clearer error.
    fn check_shape(&self, shape: TileShape) -> Result<()> {
        if shape.is_empty() {
            return Ok(());
        }
        self.check_head_dim(shape.head_dim)
    }

    fn scheme(&self, head_dim: usize) -> Scheme {
        Scheme {
            groups: Groups::PerToken,
            group: self.group.unwrap_or(head_dim).max(1),
            clip_ratio: Some(Self::CLIP_RATIO),
            rotate: true,
        }
    }
}

impl Quantizer for Quarot {
    fn name(&self) -> &'static str {
        "quarot"
    }

    /// `{"group": G, "clip_ratio": 0.95, "rotation": "hadamard"}`, with group `null` meaning
    /// one group per token (G = head_dim).
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "group": self.group, "clip_ratio": Self::CLIP_RATIO, "rotation": "hadamard" })
    }

    fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        hadamard::check_order(head_dim).map_err(|_| {
            Error::invalid(format!(
                "quarot needs a power-of-two head_dim for its Walsh–Hadamard rotation, got {head_dim}"
            ))
        })
    }

    fn fake_quantize(
        &self,
        x: &[f32],
        shape: TileShape,
        kind: Kind,
        bits: u8,
        out: &mut [f32],
    ) -> Result<()> {
        let _ = kind;
        self.check_shape(shape)?;
        self.scheme(shape.head_dim)
            .fake_quantize(x, shape, bits, out)
    }

    fn encode(&self, x: &[f32], shape: TileShape, kind: Kind, bits: u8) -> Result<EncodedTile> {
        self.check_shape(shape)?;
        self.scheme(shape.head_dim).encode(x, shape, kind, bits)
    }

    fn decode(&self, enc: &EncodedTile, out: &mut [f32]) -> Result<()> {
        self.check_shape(enc.shape)?;
        self.scheme(enc.shape.head_dim).decode(enc, out)
    }

    /// Metadata of the per-token groups; well defined for any head_dim, though only
    /// power-of-two head_dims can be quantized.
    fn metadata_bits_per_element(&self, shape: TileShape, _kind: Kind) -> f64 {
        self.scheme(shape.head_dim).metadata_bits_per_element(shape)
    }
}

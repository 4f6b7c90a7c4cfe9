//! KIVI (Liu et al., 2024): keys per channel, values per token.
//!
//! Keys: each channel's consecutive groups of `G` tokens share one min-max grid (outlier
//! channels get their own range). Values: each token's consecutive groups of `G` channels
//! share one grid. Default `G = 32`.

use super::engine::{Groups, Scheme};
use super::{EncodedTile, Kind, Quantizer, TileShape};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kivi {
    group: usize,
}

impl Kivi {
    pub const DEFAULT_GROUP: usize = 32;

    /// KIVI with group size `group` (default 32); the group must be at least 1.
    pub fn new(group: Option<usize>) -> Result<Kivi> {
        match group.unwrap_or(Self::DEFAULT_GROUP) {
            0 => Err(Error::invalid("kivi: group size must be at least 1, got 0")),
            group => Ok(Kivi { group }),
        }
    }

    pub fn group(&self) -> usize {
        self.group
    }

    fn scheme(&self, kind: Kind) -> Scheme {
        let groups = match kind {
            Kind::K => Groups::PerChannel,
            Kind::V => Groups::PerToken,
        };
        Scheme {
            groups,
            group: self.group,
            clip_ratio: None,
            rotate: false,
        }
    }
}

impl Quantizer for Kivi {
    fn name(&self) -> &'static str {
        "kivi"
    }

    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "group": self.group })
    }

    fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        if head_dim == 0 {
            return Err(Error::invalid("kivi: head_dim must be at least 1"));
        }
        Ok(())
    }

    fn fake_quantize(
        &self,
        x: &[f32],
        shape: TileShape,
        kind: Kind,
        bits: u8,
        out: &mut [f32],
    ) -> Result<()> {
        self.scheme(kind).fake_quantize(x, shape, bits, out)
    }

    fn encode(&self, x: &[f32], shape: TileShape, kind: Kind, bits: u8) -> Result<EncodedTile> {
        self.scheme(kind).encode(x, shape, kind, bits)
    }

    fn decode(&self, enc: &EncodedTile, out: &mut [f32]) -> Result<()> {
        self.scheme(enc.kind).decode(enc, out)
    }

    fn metadata_bits_per_element(&self, shape: TileShape, kind: Kind) -> f64 {
        self.scheme(kind).metadata_bits_per_element(shape)
    }
}

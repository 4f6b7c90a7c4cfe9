//! Per-token round-to-nearest: each token's consecutive groups of `G` channels share one
//! min-max grid (default `G = head_dim`: one grid per token), keys and values alike.

use super::engine::{Groups, Scheme};
use super::{EncodedTile, Kind, Quantizer, TileShape};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtnToken {
    /// `None`: one group per token (`G = head_dim`).
    group: Option<usize>,
}

impl RtnToken {
    /// Per-token RTN with group size `group` (default: head_dim); the group must be at least 1.
    pub fn new(group: Option<usize>) -> Result<RtnToken> {
        if group == Some(0) {
            return Err(Error::invalid(
                "rtn-token: group size must be at least 1, got 0",
            ));
        }
        Ok(RtnToken { group })
    }

    fn scheme(&self, head_dim: usize) -> Scheme {
        Scheme {
            groups: Groups::PerToken,
            group: self.group.unwrap_or(head_dim).max(1),
            clip_ratio: None,
            rotate: false,
        }
    }
}

impl Quantizer for RtnToken {
    fn name(&self) -> &'static str {
        "rtn-token"
    }

    /// `{"group": G}`, with `null` meaning one group per token (G = head_dim).
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "group": self.group })
    }

    fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        if head_dim == 0 {
            return Err(Error::invalid("rtn-token: head_dim must be at least 1"));
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
        let _ = kind;
        self.scheme(shape.head_dim)
            .fake_quantize(x, shape, bits, out)
    }

    fn encode(&self, x: &[f32], shape: TileShape, kind: Kind, bits: u8) -> Result<EncodedTile> {
        self.scheme(shape.head_dim).encode(x, shape, kind, bits)
    }

    fn decode(&self, enc: &EncodedTile, out: &mut [f32]) -> Result<()> {
        self.scheme(enc.shape.head_dim).decode(enc, out)
    }

    fn metadata_bits_per_element(&self, shape: TileShape, _kind: Kind) -> f64 {
        self.scheme(shape.head_dim).metadata_bits_per_element(shape)
    }
}

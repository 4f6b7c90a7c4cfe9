//! Rotary position embeddings in both pairings.
//!
//! Frequency `i` (of `head_dim/2`) rotates by `pos · base^(−2i/head_dim)`. The pairing decides
//! which two dimensions rotate together: [`RopeLayout::Adjacent`] rotates `(2i, 2i+1)`,
//! [`RopeLayout::Halves`] rotates `(i, i + head_dim/2)`.

use candle_core::{Device, Result, Tensor, D};

use crate::config::RopeLayout;

/// Cosines and sines for a run of consecutive positions, `[positions, head_dim/2]` each.
#[derive(Debug, Clone)]
pub struct RopeAngles {
    cos: Tensor,
    sin: Tensor,
    layout: RopeLayout,
}

impl RopeAngles {
    /// Angles for positions `start..start+len` with the given base.
    pub fn new(
        base: f64,
        head_dim: usize,
        layout: RopeLayout,
        start: usize,
        len: usize,
        device: &Device,
    ) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            candle_core::bail!("RoPE needs an even head_dim, got {head_dim}");
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| base.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            for &f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(RopeAngles {
            cos: Tensor::from_vec(cos, (len, half), device)?,
            sin: Tensor::from_vec(sin, (len, half), device)?,
            layout,
        })
    }

    /// Rotates `x` (`[heads, T, head_dim]`, contiguous) with candle's fused kernels.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x4 = x.contiguous()?.unsqueeze(0)?;
        let out = match self.layout {
            RopeLayout::Adjacent => candle_nn::rotary_emb::rope_i(&x4, &self.cos, &self.sin)?,
            RopeLayout::Halves => candle_nn::rotary_emb::rope(&x4, &self.cos, &self.sin)?,
        };
        out.squeeze(0)
    }

    /// The same rotation spelled with differentiable candle ops.
    pub fn apply_differentiable(&self, x: &Tensor) -> Result<Tensor> {
        let (heads, t, d) = x.dims3()?;
        let half = d / 2;
        match self.layout {
            RopeLayout::Halves => {
                let x1 = x.narrow(D::Minus1, 0, half)?;
                let x2 = x.narrow(D::Minus1, half, half)?;
                let cos = self.cos.unsqueeze(0)?;
                let sin = self.sin.unsqueeze(0)?;
                let y1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                let y2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
                Tensor::cat(&[y1, y2], D::Minus1)
            }
            RopeLayout::Adjacent => {
                let pairs = x.reshape((heads, t, half, 2))?;
                let x0 = pairs.narrow(D::Minus1, 0, 1)?;
                let x1 = pairs.narrow(D::Minus1, 1, 1)?;
                let cos = self.cos.reshape((1, t, half, 1))?;
                let sin = self.sin.reshape((1, t, half, 1))?;
                let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
                Tensor::cat(&[y0, y1], D::Minus1)?.reshape((heads, t, d))
            }
        }
    }
}

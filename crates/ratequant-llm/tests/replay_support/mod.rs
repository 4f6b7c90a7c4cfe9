//! Records the attention calls a cache serves inside the decoder, to replay the identical
//! inputs into another cache.
//!
//! Why: both the packed cache and its simulation round K/V to f16 before anything else. Two
//! decoders running freely over the two caches compute the next layers' K/V with float
//! differences of ~1e-6; near an f16 rounding midpoint such a difference becomes a whole f16
//! step (~5e-4 relative), which can move a group's min/max and with it low-bit codes, and the
//! difference grows layer by layer. Whether the caches store and attend the same way is
//! therefore checked on identical inputs at every layer and step, taken from a real decoder
//! run (its block sizes, GQA and sliding windows).

#![allow(dead_code)]

use candle_core::{DType, Result, Tensor};
use ratequant_llm::{AttnParams, KvCache};

/// One `attend` call: where the cache stood, its inputs, and what it returned.
pub struct Call {
    pub position: usize,
    pub layer: usize,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub params: AttnParams,
    pub output: Vec<f32>,
}

/// A cache that passes every call to `inner` and records it.
pub struct Recording<C> {
    pub inner: C,
    pub calls: Vec<Call>,
}

impl<C> Recording<C> {
    pub fn new(inner: C) -> Self {
        Recording {
            inner,
            calls: Vec::new(),
        }
    }
}

impl<C: KvCache> KvCache for Recording<C> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor> {
        let position = self.inner.len();
        let out = self.inner.attend(layer, q, k, v, params)?;
        self.calls.push(Call {
            position,
            layer,
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            params: *params,
            output: out.flatten_all()?.to_vec1()?,
        });
        Ok(out)
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn advance(&mut self, new_tokens: usize) {
        self.inner.advance(new_tokens)
    }

    fn reset(&mut self) {
        self.calls.clear();
        self.inner.reset()
    }
}

/// A cache that receives K and V rounded to f16 (nearest, ties to even): what the packed
/// cache holds before quantizing. Lets a full-precision simulation (tile semantics) be compared
/// with the packed cache on the values the packed cache actually stores.
pub struct F16Inputs<C>(pub C);

impl<C: KvCache> KvCache for F16Inputs<C> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor> {
        let as_f16 = |x: &Tensor| x.to_dtype(DType::F16)?.to_dtype(DType::F32);
        self.0.attend(layer, q, &as_f16(k)?, &as_f16(v)?, params)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn advance(&mut self, new_tokens: usize) {
        self.0.advance(new_tokens)
    }

    fn reset(&mut self) {
        self.0.reset()
    }
}

/// Feeds `calls` to the empty cache `other` in order (advancing it to each call's position)
/// and returns the largest difference between its outputs and the recorded ones, relative to
/// `1 + max |recorded output|` of the call.
pub fn replay_difference(calls: &[Call], other: &mut dyn KvCache) -> f32 {
    assert!(other.is_empty(), "replay needs an empty cache");
    let mut worst = 0.0f32;
    for call in calls {
        assert!(
            other.len() <= call.position,
            "calls must come in position order"
        );
        if other.len() < call.position {
            other.advance(call.position - other.len());
        }
        let out: Vec<f32> = other
            .attend(call.layer, &call.q, &call.k, &call.v, &call.params)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out.len(), call.output.len());
        let scale = 1.0 + call.output.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = out
            .iter()
            .zip(&call.output)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        worst = worst.max(diff / scale);
    }
    worst
}

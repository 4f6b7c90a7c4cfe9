//! The full-precision KV cache: keys and values kept as f32 tensors, attention by
//! [`crate::attention::attention`].

use candle_core::{Result, Tensor};

use crate::attention::attention;
use crate::kv::{AttnParams, KvCache};

/// Per-layer K/V storage shared by the tensor-backed caches: `[kv_heads, tokens, head_dim]`
/// per layer, appended along the token axis.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerStore {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl LayerStore {
    pub(crate) fn new(num_layers: usize) -> Self {
        LayerStore {
            layers: vec![None; num_layers],
        }
    }

    /// Appends `k`, `v` to `layer`, which must hold exactly `expected_len` tokens (the cache
    /// position), and returns the whole stored K and V.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        expected_len: usize,
    ) -> Result<(Tensor, Tensor)> {
        let num_layers = self.layers.len();
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "KV cache has {num_layers} layers, asked for layer {layer}"
            ))
        })?;
        let (kv_heads, new, d) = k.dims3()?;
        if v.dims() != k.dims() {
            candle_core::bail!(
                "layer {layer}: keys {:?} and values {:?} differ in shape",
                k.dims(),
                v.dims()
            );
        }
        let stored = match slot {
            None => 0,
            Some((sk, _)) => sk.dim(1)?,
        };
        if stored != expected_len {
            candle_core::bail!(
                "layer {layer} holds {stored} tokens but the cache is at position {expected_len}: \
                 attend was called twice for one layer before advance"
            );
        }
        let (k_all, v_all) = match slot.take() {
            None => (k.clone(), v.clone()),
            Some((sk, sv)) => {
                let (skh, _, sd) = sk.dims3()?;
                if (skh, sd) != (kv_heads, d) {
                    candle_core::bail!(
                        "layer {layer}: new keys {:?} do not match stored keys {:?}",
                        k.dims(),
                        sk.dims()
                    );
                }
                (Tensor::cat(&[&sk, k], 1)?, Tensor::cat(&[&sv, v], 1)?)
            }
        };
        debug_assert_eq!(k_all.dim(1)?, expected_len + new);
        *slot = Some((k_all.clone(), v_all.clone()));
        Ok((k_all, v_all))
    }

    pub(crate) fn get(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub(crate) fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }
}

/// Keys and values in full precision.
#[derive(Debug, Clone)]
pub struct FpCache {
    store: LayerStore,
    len: usize,
}

impl FpCache {
    pub fn new(num_layers: usize) -> Self {
        FpCache {
            store: LayerStore::new(num_layers),
            len: 0,
        }
    }

    /// Stored keys of `layer`, `[kv_heads, tokens, head_dim]` (after RoPE).
    pub fn keys(&self, layer: usize) -> Option<&Tensor> {
        self.store.get(layer).map(|(k, _)| k)
    }

    /// Stored values of `layer`, `[kv_heads, tokens, head_dim]`.
    pub fn values(&self, layer: usize) -> Option<&Tensor> {
        self.store.get(layer).map(|(_, v)| v)
    }

    pub fn num_layers(&self) -> usize {
        self.store.num_layers()
    }
}

impl KvCache for FpCache {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        params: &AttnParams,
    ) -> Result<Tensor> {
        let (k_all, v_all) = self.store.append(layer, k, v, self.len)?;
        attention(q, &k_all, &v_all, self.len, params)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn advance(&mut self, new_tokens: usize) {
        self.len += new_tokens;
    }

    fn reset(&mut self) {
        self.store.clear();
        self.len = 0;
    }
}

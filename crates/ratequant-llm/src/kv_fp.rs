//! The full-precision KV cache: keys and values kept as f32 tensors, attention by
//! [`crate::attention::attention`].

use candle_core::{Result, Tensor};

use crate::attention::attention;
use crate::kv::{AttnParams, KvCache};

/// Per-layer K/V storage shared by the tensor-backed caches: `[kv_heads, tokens, head_dim]`
/// per layer, appended along the token axis.
///
/// The first append keeps the given tensors as they are (so a single differentiable pass keeps
/// its gradients). Later appends write into buffers with spare capacity, grown by doubling,
/// and hand out views of their filled part: a decode step then copies its one new token, not
/// the whole cache (concatenating made every step copy all of it, quadratic over a
/// generation; at 8K tokens that was most of a full-precision decode step). Appends after the
/// first carry no gradient.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerStore {
    layers: Vec<Option<LayerSlot>>,
}

#[derive(Debug)]
struct LayerSlot {
    /// What the layer holds.
    views: (Tensor, Tensor),
    /// `[kv_heads, capacity, head_dim]` buffers behind `views`, once a second append came.
    buffers: Option<(Tensor, Tensor)>,
}

impl Clone for LayerSlot {
    /// A clone shares the held tokens but not the spare capacity: its next append grows
    /// buffers of its own, so neither copy writes where the other reads.
    fn clone(&self) -> LayerSlot {
        LayerSlot {
            views: self.views.clone(),
            buffers: None,
        }
    }
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
            Some(s) => s.views.0.dim(1)?,
        };
        if stored != expected_len {
            candle_core::bail!(
                "layer {layer} holds {stored} tokens but the cache is at position {expected_len}: \
                 attend was called twice for one layer before advance"
            );
        }
        let next = match slot.take() {
            None => LayerSlot {
                views: (k.clone(), v.clone()),
                buffers: None,
            },
            Some(LayerSlot { views, buffers }) => {
                let (skh, _, sd) = views.0.dims3()?;
                if (skh, sd) != (kv_heads, d) {
                    candle_core::bail!(
                        "layer {layer}: new keys {:?} do not match stored keys {:?}",
                        k.dims(),
                        views.0.dims()
                    );
                }
                let total = stored + new;
                let buffers = match buffers {
                    Some(b) if b.0.dim(1)? >= total => b,
                    _ => {
                        // Room for as many tokens again: amortised O(1) copies per token.
                        let capacity = total.max(2 * stored).max(64);
                        let grow = |held: &Tensor| -> Result<Tensor> {
                            let buf = Tensor::zeros(
                                (kv_heads, capacity, d),
                                held.dtype(),
                                held.device(),
                            )?;
                            buf.slice_set(&held.contiguous()?, 1, 0)?;
                            Ok(buf)
                        };
                        (grow(&views.0)?, grow(&views.1)?)
                    }
                };
                buffers.0.slice_set(&k.contiguous()?, 1, stored)?;
                buffers.1.slice_set(&v.contiguous()?, 1, stored)?;
                LayerSlot {
                    views: (
                        buffers.0.narrow(1, 0, total)?,
                        buffers.1.narrow(1, 0, total)?,
                    ),
                    buffers: Some(buffers),
                }
            }
        };
        debug_assert_eq!(next.views.0.dim(1)?, expected_len + new);
        let out = next.views.clone();
        *slot = Some(next);
        Ok(out)
    }

    pub(crate) fn get(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers
            .get(layer)
            .and_then(Option::as_ref)
            .map(|s| &s.views)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
        t.to_vec3::<f32>().unwrap()
    }

    /// Token-by-token appends (through buffer growth) hold what concatenation would, and a
    /// clone's appends and the original's do not see each other.
    #[test]
    fn appends_equal_concatenation_and_clones_stay_apart() {
        let dev = Device::Cpu;
        let full = Tensor::arange(0f32, 2.0 * 200.0 * 4.0, &dev)
            .unwrap()
            .reshape((2, 200, 4))
            .unwrap();
        let other = (full.clone() * -1.0).unwrap();
        let mut store = LayerStore::new(1);
        let mut at = 0;
        for n in std::iter::once(10)
            .chain(std::iter::repeat_n(1, 70))
            .chain([30, 5])
        {
            let k = full.narrow(1, at, n).unwrap();
            let (ka, va) = store.append(0, &k, &k, at).unwrap();
            at += n;
            let want = rows(&full.narrow(1, 0, at).unwrap());
            assert_eq!(rows(&ka), want, "{at} tokens");
            assert_eq!(rows(&va), want, "{at} tokens");
        }
        let mut fork = store.clone();
        let (ka, _) = store
            .append(
                0,
                &full.narrow(1, at, 3).unwrap(),
                &full.narrow(1, at, 3).unwrap(),
                at,
            )
            .unwrap();
        let (kb, _) = fork
            .append(
                0,
                &other.narrow(1, at, 3).unwrap(),
                &other.narrow(1, at, 3).unwrap(),
                at,
            )
            .unwrap();
        assert_eq!(rows(&ka), rows(&full.narrow(1, 0, at + 3).unwrap()));
        let mut want = rows(&full.narrow(1, 0, at).unwrap());
        for (h, head) in rows(&other.narrow(1, at, 3).unwrap())
            .into_iter()
            .enumerate()
        {
            want[h].extend(head);
        }
        assert_eq!(rows(&kb), want);
        // A stale position is refused, not overwritten.
        assert!(store
            .append(
                0,
                &full.narrow(1, 0, 1).unwrap(),
                &full.narrow(1, 0, 1).unwrap(),
                5
            )
            .is_err());
    }
}

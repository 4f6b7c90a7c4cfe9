//! The KV input file: a safetensors file with captured keys and values per layer.
//!
//! Tensors (f32, f16 or bf16):
//! * `layers.{l}.k`, `layers.{l}.v`: `[kv_heads, tokens, head_dim]` or
//!   `[sequences, kv_heads, tokens, head_dim]`; K and V of a layer have the same shape; layers
//!   are numbered contiguously from 0;
//! * optional `layers.{l}.k_importance`, `layers.{l}.v_importance`: the data's shape
//!   (per-element squared-gradient sums) or `[kv_heads]` (one importance per unit). Either every
//!   layer has both or none has.
//!
//! Any other tensor is an error (a misspelt name must not be silently ignored).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::distortion::{UnitImportance, UnitTiles};
use crate::quant::{Kind, TileShape};
use crate::{Error, Result};

/// Which tensor of a layer a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slot {
    K,
    V,
    KImportance,
    VImportance,
}

fn parse_name(name: &str) -> Option<(usize, Slot)> {
    let rest = name.strip_prefix("layers.")?;
    let (layer, slot) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|c| c.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let slot = match slot {
        "k" => Slot::K,
        "v" => Slot::V,
        "k_importance" => Slot::KImportance,
        "v_importance" => Slot::VImportance,
        _ => return None,
    };
    Some((layer.parse().ok()?, slot))
}

/// A tensor converted to f32 with its name and shape.
struct Loaded {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn to_f32(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::file(
                path,
                format!("tensor `{name}` has dtype {other:?}, expected F32, F16 or BF16"),
            ));
        }
    })
}

/// Formats a flat index as a multi-index of `shape`: `[1, 0, 5, 3]`.
fn multi_index(mut flat: usize, shape: &[usize]) -> String {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        idx[d] = flat % n;
        flat /= n;
    }
    format!("{idx:?}")
}

/// Reads a KV file into one [`UnitTiles`] per (layer, head, K/V), ordered by layer, head, K
/// before V. The file is memory-mapped; each unit's tiles are converted to f32.
pub fn read_kv_file(path: impl AsRef<Path>) -> Result<Vec<UnitTiles>> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the mapping is read-only and dropped before returning; like every reader of
    // memory-mapped files we rely on the file not being truncated while we read it.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;

    let mut layers: BTreeMap<usize, BTreeMap<Slot, Loaded>> = BTreeMap::new();
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    if names.is_empty() {
        return Err(Error::file(
            path,
            "no tensors (expected layers.{l}.k and layers.{l}.v)",
        ));
    }
    for name in names {
        let (layer, slot) = parse_name(name).ok_or_else(|| {
            Error::file(
                path,
                format!("unexpected tensor `{name}` (expected layers.{{l}}.k, .v, .k_importance or .v_importance)"),
            )
        })?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
        let data = to_f32(path, name, view.dtype(), view.data())?;
        let loaded = Loaded {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            data,
        };
        layers.entry(layer).or_default().insert(slot, loaded);
    }

    let num_layers = layers.len();
    if let Some((i, _)) = layers.keys().enumerate().find(|&(i, &l)| i != l) {
        return Err(Error::file(
            path,
            format!("layer {i} is missing (layers must be numbered 0..{num_layers} without gaps)"),
        ));
    }
    let any_importance = layers
        .values()
        .any(|m| m.contains_key(&Slot::KImportance) || m.contains_key(&Slot::VImportance));

    let mut units = Vec::new();
    for (&layer, tensors) in &layers {
        let get = |slot: Slot, suffix: &str| {
            tensors.get(&slot).ok_or_else(|| {
                Error::file(path, format!("tensor `layers.{layer}.{suffix}` is missing"))
            })
        };
        let k = get(Slot::K, "k")?;
        let v = get(Slot::V, "v")?;
        let (sequences, heads, shape) = data_layout(path, k)?;
        if v.shape != k.shape {
            return Err(Error::file(
                path,
                format!(
                    "`{}` has shape {:?} but `{}` has {:?}; K and V of a layer must agree",
                    v.name, v.shape, k.name, k.shape
                ),
            ));
        }
        for (kind, data, imp_slot, imp_suffix) in [
            (Kind::K, k, Slot::KImportance, "k_importance"),
            (Kind::V, v, Slot::VImportance, "v_importance"),
        ] {
            check_finite(path, data)?;
            let importance = if any_importance {
                let imp = get(imp_slot, imp_suffix).map_err(|_| {
                    Error::file(
                        path,
                        format!("tensor `layers.{layer}.{imp_suffix}` is missing (importance must be given for every layer or none)"),
                    )
                })?;
                check_importance(path, imp, data, heads)?;
                Some(imp)
            } else {
                None
            };
            let tile_len = shape.len();
            for head in 0..heads {
                let tile_at = |buf: &[f32], s: usize| {
                    let start = (s * heads + head) * tile_len;
                    buf[start..start + tile_len].to_vec()
                };
                let tiles = (0..sequences).map(|s| tile_at(&data.data, s)).collect();
                let importance = importance.map(|imp| {
                    if imp.shape.len() == 1 {
                        UnitImportance::PerUnit(imp.data[head] as f64)
                    } else {
                        UnitImportance::PerElement(
                            (0..sequences).map(|s| tile_at(&imp.data, s)).collect(),
                        )
                    }
                });
                units.push(UnitTiles {
                    layer,
                    head,
                    kind,
                    shape,
                    tiles,
                    importance,
                });
            }
        }
    }
    units.sort_by_key(|u| (u.layer, u.head, u.kind));
    Ok(units)
}

/// (sequences, kv_heads, per-sequence tile shape) of a data tensor.
fn data_layout(path: &Path, t: &Loaded) -> Result<(usize, usize, TileShape)> {
    let (s, h, tokens, d) = match t.shape[..] {
        [h, tokens, d] => (1, h, tokens, d),
        [s, h, tokens, d] => (s, h, tokens, d),
        _ => {
            return Err(Error::file(
                path,
                format!(
                    "`{}` has shape {:?}, expected [kv_heads, tokens, head_dim] or [sequences, kv_heads, tokens, head_dim]",
                    t.name, t.shape
                ),
            ))
        }
    };
    if s == 0 || h == 0 || tokens == 0 || d == 0 {
        return Err(Error::file(
            path,
            format!(
                "`{}` has shape {:?}: empty tiles (every dimension must be at least 1)",
                t.name, t.shape
            ),
        ));
    }
    Ok((
        s,
        h,
        TileShape {
            tokens,
            head_dim: d,
        },
    ))
}

fn check_finite(path: &Path, t: &Loaded) -> Result<()> {
    if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
        return Err(Error::file(
            path,
            format!(
                "`{}` at index {} is {} (values must be finite)",
                t.name,
                multi_index(i, &t.shape),
                t.data[i]
            ),
        ));
    }
    Ok(())
}

fn check_importance(path: &Path, imp: &Loaded, data: &Loaded, heads: usize) -> Result<()> {
    if imp.shape != data.shape && imp.shape != [heads] {
        return Err(Error::file(
            path,
            format!(
                "`{}` has shape {:?}, expected the data's shape {:?} (per element) or [{heads}] (per unit)",
                imp.name, imp.shape, data.shape
            ),
        ));
    }
    if let Some(i) = imp.data.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
        return Err(Error::file(
            path,
            format!(
                "`{}` at index {} is {} (importance must be finite and non-negative)",
                imp.name,
                multi_index(i, &imp.shape),
                imp.data[i]
            ),
        ));
    }
    Ok(())
}

/// Writes units in the layout [`read_kv_file`] reads (f32, `[sequences, kv_heads, tokens,
/// head_dim]`), atomically. Units must cover layers 0..L, every head of a layer for K and V,
/// with one shape per layer and the same number of sequences; importance is written if the
/// units have it (all per-element or all per-unit).
pub fn write_kv_file(path: impl AsRef<Path>, units: &[UnitTiles]) -> Result<()> {
    let path = path.as_ref();
    let mut by_layer: BTreeMap<usize, Vec<&UnitTiles>> = BTreeMap::new();
    for u in units {
        by_layer.entry(u.layer).or_default().push(u);
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, (&layer, us)) in by_layer.iter().enumerate() {
        if i != layer {
            return Err(Error::invalid(format!(
                "cannot write KV file: layer {i} is missing"
            )));
        }
        for kind in [Kind::K, Kind::V] {
            let mut heads: Vec<&&UnitTiles> = us.iter().filter(|u| u.kind == kind).collect();
            heads.sort_by_key(|u| u.head);
            if heads.is_empty() || heads.iter().enumerate().any(|(h, u)| u.head != h) {
                return Err(Error::invalid(format!(
                    "cannot write KV file: layer {layer} {} heads must be numbered 0.. without gaps",
                    kind.as_str()
                )));
            }
            let first = heads[0];
            for u in &heads {
                u.validate()?;
                if u.shape != first.shape || u.tiles.len() != first.tiles.len() {
                    return Err(Error::invalid(format!(
                        "cannot write KV file: {} differs in shape from {}",
                        u.label(),
                        first.label()
                    )));
                }
            }
            let (s, h, shape) = (first.tiles.len(), heads.len(), first.shape);
            let dims = vec![s, h, shape.tokens, shape.head_dim];
            let mut data = Vec::with_capacity(s * h * shape.len() * 4);
            for seq in 0..s {
                for u in &heads {
                    data.extend(u.tiles[seq].iter().flat_map(|x| x.to_le_bytes()));
                }
            }
            tensors.push((
                format!("layers.{layer}.{}", kind.as_str()),
                dims.clone(),
                data,
            ));
            let suffix = format!("layers.{layer}.{}_importance", kind.as_str());
            match heads.iter().map(|u| &u.importance).collect::<Vec<_>>()[..] {
                ref imps if imps.iter().all(|i| i.is_none()) => {}
                ref imps
                    if imps
                        .iter()
                        .all(|i| matches!(i, Some(UnitImportance::PerUnit(_)))) =>
                {
                    let bytes = imps
                        .iter()
                        .flat_map(|i| match i {
                            Some(UnitImportance::PerUnit(w)) => (*w as f32).to_le_bytes(),
                            _ => unreachable!("checked per-unit"),
                        })
                        .collect();
                    tensors.push((suffix, vec![h], bytes));
                }
                ref imps
                    if imps
                        .iter()
                        .all(|i| matches!(i, Some(UnitImportance::PerElement(_)))) =>
                {
                    let mut bytes = Vec::with_capacity(s * h * shape.len() * 4);
                    for seq in 0..s {
                        for i in imps {
                            if let Some(UnitImportance::PerElement(t)) = i {
                                bytes.extend(t[seq].iter().flat_map(|x| x.to_le_bytes()));
                            }
                        }
                    }
                    tensors.push((suffix, dims, bytes));
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "cannot write KV file: layer {layer} {} heads mix kinds of importance",
                        kind.as_str()
                    )))
                }
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::invalid(format!("cannot write tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    crate::atomic::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names() {
        assert_eq!(parse_name("layers.0.k"), Some((0, Slot::K)));
        assert_eq!(
            parse_name("layers.12.v_importance"),
            Some((12, Slot::VImportance))
        );
        assert_eq!(parse_name("layers.01.k"), None);
        assert_eq!(parse_name("layers.x.k"), None);
        assert_eq!(parse_name("layers.0.key"), None);
        assert_eq!(parse_name("model.layers.0.k"), None);
    }

    #[test]
    fn multi_index_is_row_major() {
        assert_eq!(multi_index(0, &[2, 3, 4]), "[0, 0, 0]");
        assert_eq!(multi_index(23, &[2, 3, 4]), "[1, 2, 3]");
        assert_eq!(multi_index(5, &[2, 3, 4]), "[0, 1, 1]");
    }
}

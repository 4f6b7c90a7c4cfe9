//! Distortion measurement: how much error each unit's tiles suffer when a design
//! fake-quantizes them at each bit-width.
//!
//! A *unit* is one (layer, KV head, K or V). Its data is one `[tokens, head_dim]` tile per
//! calibration sequence; every sequence's tile is quantized on its own (as a cache would store
//! it) and the unit's distortion pools the errors of all its sequences:
//!
//! * `mse(b) = Σ err² / E`, over the unit's `E` elements (all sequences);
//! * with per-element importance `f ≥ 0`: `weighted(b) = Σ f·err² / Σ f` (if `Σ f = 0` the
//!   unit carries no importance at all and `weighted = mse`, to stay finite);
//! * the unit's importance weight `w`: the given per-unit value, or for per-element importance
//!   `Σ f / sequences` (summed over the unit's elements, averaged over sequences), or 1 when no
//!   importance is given. With per-element importance `w·weighted(b) = Σ f·err² / sequences`,
//!   the second-order (Fisher) estimate of the loss increase, per sequence.

use rayon::prelude::*;

use crate::quant::{Kind, Quantizer, TileShape};
use crate::{Error, Result};

/// Importance of a unit, as captured from gradients or supplied by the user.
#[derive(Debug, Clone, PartialEq)]
pub enum UnitImportance {
    /// One non-negative number for the whole unit.
    PerUnit(f64),
    /// One non-negative number per element, one tile per sequence (same layout as the data).
    PerElement(Vec<Vec<f32>>),
}

/// One unit's calibration data: a `[tokens, head_dim]` tile per sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitTiles {
    pub layer: usize,
    pub head: usize,
    pub kind: Kind,
    /// Shape of every sequence's tile.
    pub shape: TileShape,
    /// Row-major tiles, one per sequence, each `shape.len()` long.
    pub tiles: Vec<Vec<f32>>,
    pub importance: Option<UnitImportance>,
}

impl UnitTiles {
    /// `unit (layer L, head H, k|v)`, for error messages.
    pub fn label(&self) -> String {
        unit_label(self.layer, self.head, self.kind)
    }

    /// Total elements over all sequences.
    pub fn elements(&self) -> u64 {
        (self.shape.len() * self.tiles.len()) as u64
    }

    /// Checks shapes and values: non-empty tiles of the declared shape, finite data, finite
    /// non-negative importance of matching layout.
    pub fn validate(&self) -> Result<()> {
        let label = self.label();
        if self.shape.is_empty() {
            return Err(Error::invalid(format!(
                "{label}: empty tiles ({} tokens × head_dim {})",
                self.shape.tokens, self.shape.head_dim
            )));
        }
        if self.tiles.is_empty() {
            return Err(Error::invalid(format!(
                "{label}: no sequences (at least one tile is needed)"
            )));
        }
        for (s, tile) in self.tiles.iter().enumerate() {
            if tile.len() != self.shape.len() {
                return Err(Error::invalid(format!(
                    "{label}: sequence {s} has {} values, expected {} ({} tokens × head_dim {})",
                    tile.len(),
                    self.shape.len(),
                    self.shape.tokens,
                    self.shape.head_dim
                )));
            }
            if let Some(i) = tile.iter().position(|x| !x.is_finite()) {
                return Err(Error::invalid(format!(
                    "{label}: sequence {s}, token {}, channel {} is {} (values must be finite)",
                    i / self.shape.head_dim,
                    i % self.shape.head_dim,
                    tile[i]
                )));
            }
        }
        match &self.importance {
            None => {}
            Some(UnitImportance::PerUnit(w)) if !(w.is_finite() && *w >= 0.0) => {
                return Err(Error::invalid(format!(
                    "{label}: importance {w} must be finite and non-negative"
                )));
            }
            Some(UnitImportance::PerUnit(_)) => {}
            Some(UnitImportance::PerElement(imp)) => {
                if imp.len() != self.tiles.len() {
                    return Err(Error::invalid(format!(
                        "{label}: importance has {} sequences, the data {}",
                        imp.len(),
                        self.tiles.len()
                    )));
                }
                for (s, tile) in imp.iter().enumerate() {
                    if tile.len() != self.shape.len() {
                        return Err(Error::invalid(format!(
                            "{label}: importance of sequence {s} has {} values, expected {}",
                            tile.len(),
                            self.shape.len()
                        )));
                    }
                    if let Some(i) = tile.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
                        return Err(Error::invalid(format!(
                            "{label}: importance at sequence {s}, token {}, channel {} is {} (must be finite and non-negative)",
                            i / self.shape.head_dim,
                            i % self.shape.head_dim,
                            tile[i]
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn unit_label(layer: usize, head: usize, kind: Kind) -> String {
    format!("unit (layer {layer}, head {head}, {})", kind.as_str())
}

/// What was measured for one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitDistortion {
    pub elements: u64,
    /// Population variance of the unit's values (all sequences pooled).
    pub variance: f64,
    /// Mean of the squared values; the reference for the zero-distortion floor of the fit.
    pub mean_square: f64,
    /// Importance weight `w` (see the module docs).
    pub weight: f64,
    /// MSE per measured bit-width.
    pub mse: Vec<f64>,
    /// Importance-weighted squared error per measured bit-width (per-element importance only).
    pub weighted: Option<Vec<f64>>,
}

/// Measures one unit at each of `bits`.
pub fn measure_unit(
    unit: &UnitTiles,
    quantizer: &dyn Quantizer,
    bits: &[u8],
) -> Result<UnitDistortion> {
    unit.validate()?;
    quantizer
        .check_head_dim(unit.shape.head_dim)
        .map_err(|e| Error::invalid(format!("{}: {e}", unit.label())))?;

    let elements = unit.elements();
    let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
    for tile in &unit.tiles {
        for &x in tile {
            sum += x as f64;
            sum_sq += (x as f64) * (x as f64);
        }
    }
    let mean = sum / elements as f64;
    let mean_square = sum_sq / elements as f64;
    // Second pass for the variance: E[x²] − mean² cancels badly for offset data.
    let variance = unit
        .tiles
        .iter()
        .flat_map(|t| t.iter())
        .map(|&x| {
            let d = x as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / elements as f64;

    let per_element = match &unit.importance {
        Some(UnitImportance::PerElement(imp)) => Some(imp),
        _ => None,
    };
    let importance_sum: f64 = per_element.map_or(0.0, |imp| {
        imp.iter().flat_map(|t| t.iter()).map(|&f| f as f64).sum()
    });
    let weight = match &unit.importance {
        None => 1.0,
        Some(UnitImportance::PerUnit(w)) => *w,
        Some(UnitImportance::PerElement(_)) => importance_sum / unit.tiles.len() as f64,
    };

    let mut mse = Vec::with_capacity(bits.len());
    let mut weighted = per_element.map(|_| Vec::with_capacity(bits.len()));
    let mut scratch = vec![0.0f32; unit.shape.len()];
    for &b in bits {
        let (mut err_sum, mut weighted_sum) = (0.0f64, 0.0f64);
        for (s, tile) in unit.tiles.iter().enumerate() {
            quantizer
                .fake_quantize(tile, unit.shape, unit.kind, b, &mut scratch)
                .map_err(|e| {
                    Error::invalid(format!("{}: quantizing at {b} bits: {e}", unit.label()))
                })?;
            match per_element {
                Some(imp) => {
                    for ((&x, &q), &f) in tile.iter().zip(&scratch).zip(&imp[s]) {
                        let e = (x as f64 - q as f64).powi(2);
                        err_sum += e;
                        weighted_sum += f as f64 * e;
                    }
                }
                None => {
                    for (&x, &q) in tile.iter().zip(&scratch) {
                        err_sum += (x as f64 - q as f64).powi(2);
                    }
                }
            }
        }
        let unit_mse = err_sum / elements as f64;
        if !unit_mse.is_finite() {
            return Err(Error::invalid(format!(
                "{}: {} produced a non-finite reconstruction at {b} bits",
                unit.label(),
                quantizer.name()
            )));
        }
        mse.push(unit_mse);
        if let Some(w) = weighted.as_mut() {
            w.push(if importance_sum > 0.0 {
                weighted_sum / importance_sum
            } else {
                unit_mse
            });
        }
    }
    Ok(UnitDistortion {
        elements,
        variance,
        mean_square,
        weight,
        mse,
        weighted,
    })
}

/// Measures every unit (in parallel across units); results are in input order and do not
/// depend on the number of threads.
pub fn measure(
    units: &[UnitTiles],
    quantizer: &dyn Quantizer,
    bits: &[u8],
) -> Result<Vec<UnitDistortion>> {
    units
        .par_iter()
        .map(|u| measure_unit(u, quantizer, bits))
        .collect()
}

//! ratequant core: everything that does not know what a language model is.
//!
//! Data flow: K/V tiles → [`quant`] designs (fake-quantize, pack) → [`distortion`] tables →
//! [`fit`] (`D_i(b) = α_i·β^(−b)`) → [`allocate`] (reverse water-filling + exact integer
//! rounding) → [`formats`] (CALIB.json / PLAN.json).

pub mod allocate;
pub mod atomic;
pub mod bits;
pub mod distortion;
pub mod error;
pub mod fit;
pub mod formats;
pub mod hadamard;
pub mod kvcache;
pub mod kvfile;
pub mod pack;
pub mod plan;
pub mod quant;

pub use error::{Error, Result};
pub use quant::{EncodedTile, Kind, Quantizer, QuantizerSpec, TileShape};

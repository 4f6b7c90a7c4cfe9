//! Per-unit packed storage: one [`KeyStore`] and one [`ValueStore`] per (layer, KV head).
//!
//! Code layouts (chosen so that the kernels' inner loops are one unpack + one FMA per row):
//! * keys are kept in *blocks* of `block_tokens` tokens, channel-major inside a block: for
//!   channel `c`, the block's codes form one LSB-first bit run of `slot_bytes =
//!   ⌈block_tokens·bits/8⌉` bytes at offset `c·slot_bytes`. KIVI's per-channel keys use one
//!   block per quantization group (`block_tokens = G`, scales/zero-points `[block][channel]`);
//!   per-token keys (QuaRot, RTN) use blocks of [`PER_TOKEN_KEY_BLOCK`] tokens, filled token
//!   by token as tokens leave the residual window, with scales/zero-points in one stream per
//!   channel group indexed by token.
//! * values are row-major: one LSB-first bit run of `⌈head_dim·bits/8⌉` bytes per token,
//!   scales/zero-points in one stream per channel group indexed by token.
//! * the residual (not yet quantized) tokens are kept in f16, row-major, unrotated, as real
//!   KV caches keep them (KIVI as published, llama.cpp, vLLM): every appended row is rounded
//!   to the nearest f16 (ties to even) once, by [`super::round_to_residual_precision`].
//!   Tokens leaving the residual are quantized from those f16-rounded values, so a token's
//!   codes do not depend on when it leaves (inside a prefill block, or later while decoding).
//!
//! * with the integer kernels ([`super::AttentionKernel::Int8`]) codes are kept in the bit-plane
//!   *tiles* of [`int8`] instead: a key block is `block_tokens / 16` key tiles, values are
//!   value tiles of 32 tokens (allocated a tile at a time). Scales and zero-points are as
//!   above.
//!
//! Codes and parameters come from the design's own [`Quantizer::encode`], so the stored
//! values are exactly `fake_quantize`'s of the f16-rounded rows; only their order in memory
//! differs.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::aligned::AlignedVec;
use super::attention::{int8, CODE_PADDING};
use crate::quant::{self, Kind, Quantizer, QuantizerSpec, TileShape};
use crate::{pack, Error, Result};

/// Tokens per key block for per-token-quantized keys: a multiple of 16, so every SIMD chunk
/// of a block starts on a byte boundary.
pub const PER_TOKEN_KEY_BLOCK: usize = 32;

/// How one unit quantizes: the design's layout facts the cache needs. Public so that a
/// simulation can reproduce exactly which tokens the cache holds as codes
/// ([`UnitLayout::quantized_len`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitLayout {
    /// Groups run along tokens (KIVI keys) rather than along channels.
    pub per_channel: bool,
    /// Tokens are rotated by the normalised Hadamard matrix before quantization (QuaRot).
    pub rotated: bool,
    /// Group size: tokens per group when `per_channel`, channels per group otherwise.
    pub group: usize,
}

impl UnitLayout {
    pub fn of(quantizer: &dyn Quantizer, kind: Kind, head_dim: usize) -> Result<UnitLayout> {
        let group = match quantizer.params().get("group").and_then(|g| g.as_u64()) {
            Some(g) => g as usize,
            None => head_dim,
        };
        if group == 0 {
            return Err(Error::invalid(format!(
                "{}: group size must be at least 1",
                quantizer.name()
            )));
        }
        Ok(match quantizer.name() {
            "kivi" => UnitLayout { per_channel: kind == Kind::K, rotated: false, group },
            "quarot" => UnitLayout { per_channel: false, rotated: true, group },
            "rtn-token" => UnitLayout { per_channel: false, rotated: false, group },
            other => {
                return Err(Error::invalid(format!(
                    "the packed KV cache does not know the layout of quantizer `{other}` (known: kivi, quarot, rtn-token)"
                )))
            }
        })
    }

    /// Channel groups per token (per-token layouts).
    pub fn channel_groups(&self, head_dim: usize) -> usize {
        head_dim.div_ceil(self.group)
    }

    /// Tokens quantized once `len` tokens are stored: KIVI keys quantize each complete group of
    /// G tokens; per-token units keep the `residual` most recent tokens unquantized (in f16).
    pub fn quantized_len(&self, len: usize, residual: usize) -> usize {
        if self.per_channel {
            len / self.group * self.group
        } else {
            len.saturating_sub(residual)
        }
    }
}

/// Rows of not-yet-quantized tokens in f16, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Residual {
    rows: Vec<f16>,
    /// Rows at the front already quantized, dropped lazily so that decode doesn't shift the
    /// whole buffer every token.
    dead: usize,
}

impl Residual {
    pub fn tokens(&self, head_dim: usize) -> usize {
        self.rows.len() / head_dim.max(1) - self.dead
    }

    /// Appends `rows` (f32), each value rounded to the nearest f16.
    pub fn push(&mut self, rows: &[f32]) {
        let at = self.rows.len();
        self.rows.resize(at + rows.len(), f16::ZERO);
        // Vectorised (F16C where the CPU has it), round to nearest even like `f16::from_f32`.
        self.rows[at..].convert_from_f32_slice(rows);
    }

    /// The live rows, oldest first.
    pub fn live(&self, head_dim: usize) -> &[f16] {
        &self.rows[self.dead * head_dim..]
    }

    /// The live rows of `tokens` (indices relative to the oldest live row) widened to f32.
    pub fn to_f32(&self, tokens: Range<usize>, head_dim: usize) -> Vec<f32> {
        let live = &self.rows[self.dead * head_dim..];
        let src = &live[tokens.start * head_dim..tokens.end * head_dim];
        let mut out = vec![0.0f32; src.len()];
        src.convert_to_f32_slice(&mut out);
        out
    }

    /// Forgets the `n` oldest live rows.
    pub fn drop_front(&mut self, n: usize, head_dim: usize) {
        self.dead += n;
        let live = self.tokens(head_dim);
        if self.dead >= live.max(16) {
            self.rows.drain(..self.dead * head_dim);
            self.dead = 0;
        }
    }

    pub fn clear(&mut self) {
        self.rows.clear();
        self.dead = 0;
    }
}

/// Shared state of a key or value store.
pub(crate) struct UnitCore {
    pub quantizer: Box<dyn Quantizer>,
    pub kind: Kind,
    pub bits: u8,
    pub layout: UnitLayout,
    pub head_dim: usize,
    /// Tokens `[0, quantized)` are stored as codes.
    pub quantized: usize,
    pub residual: Residual,
    /// Code bytes followed by [`CODE_PADDING`] zero bytes, from a 64-byte boundary.
    pub codes: AlignedVec<u8>,
    /// Scale streams: per-channel layout one stream `[block][channel]`; per-token layouts one
    /// stream per channel group, indexed by token.
    pub scales: Vec<AlignedVec<f16>>,
    pub zeros: Vec<AlignedVec<f16>>,
}

impl UnitCore {
    pub fn new(
        spec: &QuantizerSpec,
        bits: u8,
        kind: Kind,
        head_dim: usize,
        what: &str,
    ) -> Result<UnitCore> {
        let quantizer = quant::build(spec).map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        quant::check_bits(bits).map_err(|e| Error::invalid(format!("{what} ({spec}): {e}")))?;
        quantizer
            .check_head_dim(head_dim)
            .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        let layout = UnitLayout::of(quantizer.as_ref(), kind, head_dim)?;
        let streams = if layout.per_channel {
            1
        } else {
            layout.channel_groups(head_dim)
        };
        Ok(UnitCore {
            quantizer,
            kind,
            bits,
            layout,
            head_dim,
            quantized: 0,
            residual: Residual::default(),
            codes: AlignedVec::from_elem(0, CODE_PADDING),
            scales: vec![AlignedVec::new(); streams],
            zeros: vec![AlignedVec::new(); streams],
        })
    }

    pub fn code_bytes(&self) -> usize {
        self.codes.len() - CODE_PADDING
    }

    pub fn metadata_bytes(&self) -> usize {
        let count: usize = self.scales.iter().chain(&self.zeros).map(|s| s.len()).sum();
        2 * count
    }

    /// Grows the code buffer to `bytes` code bytes (zero-filled), keeping the padding after.
    fn grow_codes(&mut self, bytes: usize) {
        if bytes > self.code_bytes() {
            self.codes.resize(bytes + CODE_PADDING, 0);
        }
    }

    fn encode(&self, rows: &[f32], tokens: usize) -> Result<(Vec<u8>, quant::EncodedTile)> {
        let shape = TileShape::new(tokens, self.head_dim);
        let enc = self.quantizer.encode(rows, shape, self.kind, self.bits)?;
        let mut codes = vec![0u8; shape.len()];
        pack::unpack(&enc.codes, self.bits, &mut codes)?;
        Ok((codes, enc))
    }

    pub fn reset(&mut self) {
        self.quantized = 0;
        self.residual.clear();
        self.codes.clear();
        self.codes.resize(CODE_PADDING, 0);
        self.scales
            .iter_mut()
            .chain(self.zeros.iter_mut())
            .for_each(AlignedVec::clear);
    }
}

/// A key or value store: its shared state and how it quantizes tokens leaving the residual.
pub(crate) trait Store {
    fn core(&self) -> &UnitCore;
    fn core_mut(&mut self) -> &mut UnitCore;
    /// Quantizes tokens `[quantized, quantized + n)`, whose rows are `rows` (f16-rounded values
    /// widened to f32).
    fn quantize(&mut self, rows: &[f32], n: usize) -> Result<()>;
}

impl Store for KeyStore {
    fn core(&self) -> &UnitCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut UnitCore {
        &mut self.core
    }
    fn quantize(&mut self, rows: &[f32], n: usize) -> Result<()> {
        KeyStore::quantize(self, rows, n)
    }
}

impl Store for ValueStore {
    fn core(&self) -> &UnitCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut UnitCore {
        &mut self.core
    }
    fn quantize(&mut self, rows: &[f32], n: usize) -> Result<()> {
        ValueStore::quantize(self, rows, n)
    }
}

/// Writes one `bits`-wide code at stream bit `bit` of a zero-initialised buffer.
#[inline]
fn put_code(buf: &mut [u8], bit: usize, bits: u8, code: u8) {
    let v = (code as u16) << (bit % 8);
    buf[bit / 8] |= v as u8;
    if (bit % 8) + bits as usize > 8 {
        buf[bit / 8 + 1] |= (v >> 8) as u8;
    }
}

pub(crate) struct KeyStore {
    pub core: UnitCore,
    pub block_tokens: usize,
    pub slot_bytes: usize,
    /// Codes in [`int8`] key tiles rather than channel-major bit runs.
    pub tiled: bool,
}

/// Why a unit's layout can't be kept in [`int8`] tiles, as an error naming the unit.
fn check_tiled(core: &UnitCore, what: &str) -> Result<()> {
    int8::check_layout(
        core.head_dim,
        core.layout.group,
        core.layout.per_channel,
        core.kind == Kind::K,
    )
    .map_err(|e| Error::invalid(format!("{what} ({}): {e}", core.quantizer.name())))
}

impl KeyStore {
    pub fn new(
        spec: &QuantizerSpec,
        bits: u8,
        head_dim: usize,
        what: &str,
        tiled: bool,
    ) -> Result<KeyStore> {
        let core = UnitCore::new(spec, bits, Kind::K, head_dim, what)?;
        if tiled {
            check_tiled(&core, what)?;
        }
        let block_tokens = if core.layout.per_channel {
            core.layout.group
        } else {
            PER_TOKEN_KEY_BLOCK
        };
        let slot_bytes = pack::packed_len(block_tokens, bits);
        Ok(KeyStore {
            core,
            block_tokens,
            slot_bytes,
            tiled,
        })
    }

    pub fn block_bytes(&self) -> usize {
        if self.tiled {
            self.block_tokens / int8::KEY_TILE_TOKENS
                * int8::key_tile_bytes(self.core.head_dim, self.core.bits)
        } else {
            self.core.head_dim * self.slot_bytes
        }
    }

    /// Writes the code of token `t` of the block at byte `base`, channel `c`.
    fn put(&mut self, base: usize, t: usize, c: usize, code: u8) {
        let (d, bits) = (self.core.head_dim, self.core.bits);
        if self.tiled {
            let tile = base + t / int8::KEY_TILE_TOKENS * int8::key_tile_bytes(d, bits);
            let t = t % int8::KEY_TILE_TOKENS;
            int8::put_key_code(&mut self.core.codes[tile..], d, bits, t, c, code);
        } else {
            let bit = (c * self.slot_bytes) * 8 + t * bits as usize;
            put_code(&mut self.core.codes[base..], bit, bits, code);
        }
    }

    /// Quantizes tokens `[self.quantized, self.quantized + n)`, whose rows are `rows`.
    pub fn quantize(&mut self, rows: &[f32], n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let d = self.core.head_dim;
        let bits = self.core.bits;
        if self.core.layout.per_channel {
            // Whole groups only (quantized_len guarantees it): one block per group.
            let g = self.block_tokens;
            debug_assert!(n.is_multiple_of(g) && self.core.quantized.is_multiple_of(g));
            let mut slot = vec![0u8; g];
            for group_rows in rows[..n * d].chunks_exact(g * d) {
                let (codes, enc) = self.core.encode(group_rows, g)?;
                let start = self.core.code_bytes();
                self.core.grow_codes(start + self.block_bytes());
                if self.tiled {
                    for t in 0..g {
                        for c in 0..d {
                            self.put(start, t, c, codes[t * d + c]);
                        }
                    }
                } else {
                    for c in 0..d {
                        for (t, s) in slot.iter_mut().enumerate() {
                            *s = codes[t * d + c];
                        }
                        let at = start + c * self.slot_bytes;
                        pack::pack(&slot, bits, &mut self.core.codes[at..at + self.slot_bytes])?;
                    }
                }
                self.core.scales[0].extend_from_slice(&enc.scales);
                self.core.zeros[0].extend_from_slice(&enc.zeros);
                self.core.quantized += g;
            }
        } else {
            let (codes, enc) = self.core.encode(&rows[..n * d], n)?;
            let groups = self.core.layout.channel_groups(d);
            let first = self.core.quantized;
            let blocks = (first + n).div_ceil(self.block_tokens);
            self.core.grow_codes(blocks * self.block_bytes());
            for i in 0..n {
                let pos = first + i;
                let base = (pos / self.block_tokens) * self.block_bytes();
                for c in 0..d {
                    self.put(base, pos % self.block_tokens, c, codes[i * d + c]);
                }
                for g in 0..groups {
                    self.core.scales[g].push(enc.scales[i * groups + g]);
                    self.core.zeros[g].push(enc.zeros[i * groups + g]);
                }
            }
            self.core.quantized += n;
        }
        Ok(())
    }
}

pub(crate) struct ValueStore {
    pub core: UnitCore,
    pub row_bytes: usize,
    /// Codes in [`int8`] value tiles rather than one bit run per token.
    pub tiled: bool,
}

impl ValueStore {
    pub fn new(
        spec: &QuantizerSpec,
        bits: u8,
        head_dim: usize,
        what: &str,
        tiled: bool,
    ) -> Result<ValueStore> {
        let core = UnitCore::new(spec, bits, Kind::V, head_dim, what)?;
        if tiled {
            check_tiled(&core, what)?;
        }
        let row_bytes = pack::packed_len(head_dim, bits);
        Ok(ValueStore {
            core,
            row_bytes,
            tiled,
        })
    }

    pub fn tile_bytes(&self) -> usize {
        int8::value_tile_bytes(self.core.head_dim, self.core.bits)
    }

    /// Quantizes tokens `[self.quantized, self.quantized + n)`, whose rows are `rows`.
    pub fn quantize(&mut self, rows: &[f32], n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let d = self.core.head_dim;
        let (codes, enc) = self.core.encode(&rows[..n * d], n)?;
        let groups = self.core.layout.channel_groups(d);
        let first = self.core.quantized;
        let bits = self.core.bits;
        if self.tiled {
            let tiles = (first + n).div_ceil(int8::VALUE_TILE_TOKENS);
            self.core.grow_codes(tiles * self.tile_bytes());
        } else {
            self.core.grow_codes((first + n) * self.row_bytes);
        }
        for i in 0..n {
            let pos = first + i;
            let row = &codes[i * d..(i + 1) * d];
            if self.tiled {
                let at = pos / int8::VALUE_TILE_TOKENS * self.tile_bytes();
                let t = pos % int8::VALUE_TILE_TOKENS;
                for (c, &code) in row.iter().enumerate() {
                    int8::put_value_code(&mut self.core.codes[at..], bits, t, c, code);
                }
            } else {
                let at = pos * self.row_bytes;
                pack::pack(row, bits, &mut self.core.codes[at..at + self.row_bytes])?;
            }
            for g in 0..groups {
                self.core.scales[g].push(enc.scales[i * groups + g]);
                self.core.zeros[g].push(enc.zeros[i * groups + g]);
            }
        }
        self.core.quantized += n;
        Ok(())
    }
}

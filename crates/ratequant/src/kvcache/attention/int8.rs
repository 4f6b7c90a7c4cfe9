//! The integer attention kernels (the cache's opt-in [`crate::kvcache::AttentionKernel::Int8`]):
//! dot products of unsigned codes with signed 8-bit weights, summed exactly in 32-bit integers,
//! the operation of AVX-512 VNNI's `vpdpbusd` (64 multiply-adds per instruction, against 16 for
//! an f32 FMA on codes that must first be unpacked and converted).
//!
//! The float kernels in [`super`] cannot reach the bandwidth bound on a CPU: every 16 codes
//! cost a shuffle, a mask and a conversion beside their FMAs, on the same ports. Here a code
//! is used where it lies in its byte (one mask, sometimes one shift, per 64 bytes), so the
//! codes must sit where `vpdpbusd` wants them: the four bytes of a 32-bit lane hold four
//! consecutive elements of the *reduction* axis for one output lane.
//!
//! ## Tile layout
//! A `b`-bit code is split into *bit planes* of width 8, 4, 2 or 1 ([`planes`]: 3 = 2 + 1,
//! 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), so every plane's sub-codes divide a byte evenly and
//! the memory is exactly `b` bits per element. A plane of width `w` packs `m = 8/w` sub-codes
//! per byte; one 64-byte *line* holds 16 output lanes × `4m` reduction elements: byte
//! `4·lane + j`, bits `k·w .. (k+1)·w`, hold reduction element `4k + j` of the line. Masking
//! (and shifting) sub-plane `k` out of a loaded line gives 16 lanes × 4 elements, ready for
//! one `vpdpbusd` against the 4 weights `4k .. 4k+4` broadcast to every lane.
//! * keys: a *key tile* is 16 tokens (the lanes) × `head_dim` channels (the reduction); plane
//!   at bit offset `o` starts at byte `2·head_dim·o`, its lines run along channels. Tile bytes
//!   `2·head_dim·b`.
//! * values: a *value tile* is 32 tokens (the reduction) × `head_dim` channels in groups of 16
//!   (the lanes); lane group `g`'s plane at offset `o` starts at byte `64·(g·b + o)`, its lines
//!   run along tokens. Tile bytes `4·head_dim·b`.
//!
//! Layout constraints (checked when a cache is built, see [`check_layout`]): `head_dim` a
//! multiple of 32; per-channel key groups a multiple of 16 tokens; per-token channel groups
//! a multiple of 32 (keys: whole lines of every plane) or 16 (values: whole lane groups).
//!
//! The scalar functions here are the definition; the AVX-512 VNNI ones must equal them bit for
//! bit (the sums are exact integers, and the one float step is the same fused multiply-add).

use std::ops::Range;

/// Tokens per key tile (the lanes of one vector).
pub const KEY_TILE_TOKENS: usize = 16;
/// Tokens per value tile (the reduction run of the widest line, 4 × 8 one-bit sub-planes).
pub const VALUE_TILE_TOKENS: usize = 32;

/// The bit planes of a `bits`-wide code as `(width, offset)`, lowest bits first: the code is
/// `Σ sub_code << offset`. At most 3 planes.
pub fn planes(bits: u8) -> impl Iterator<Item = (u8, u8)> + Clone {
    let widths: &[u8] = match bits {
        8 => &[8],
        7 => &[4, 2, 1],
        6 => &[4, 2],
        5 => &[4, 1],
        4 => &[4],
        3 => &[2, 1],
        2 => &[2],
        1 => &[1],
        _ => &[],
    };
    widths.iter().scan(0u8, |off, &w| {
        let at = *off;
        *off += w;
        Some((w, at))
    })
}

/// Byte and bit shift of reduction element `red` of output lane `lane` in a plane of width `w`.
#[inline(always)]
fn position(w: u8, lane: usize, red: usize) -> (usize, u32) {
    let per_line = 32 / w as usize;
    let (line, r) = (red / per_line, red % per_line);
    (line * 64 + lane * 4 + r % 4, (r / 4) as u32 * w as u32)
}

pub fn key_tile_bytes(head_dim: usize, bits: u8) -> usize {
    2 * head_dim * bits as usize
}

pub fn value_tile_bytes(head_dim: usize, bits: u8) -> usize {
    4 * head_dim * bits as usize
}

/// Bit locations of `(token t < 16, channel c)`'s planes in a key tile.
fn key_positions(
    head_dim: usize,
    bits: u8,
    t: usize,
    c: usize,
) -> impl Iterator<Item = (u8, u8, usize, u32)> {
    planes(bits).map(move |(w, off)| {
        let (byte, shift) = position(w, t, c);
        (w, off, 2 * head_dim * off as usize + byte, shift)
    })
}

/// Bit locations of `(token t < 32, channel c)`'s planes in a value tile.
fn value_positions(bits: u8, t: usize, c: usize) -> impl Iterator<Item = (u8, u8, usize, u32)> {
    let lane_group = c / 16;
    planes(bits).map(move |(w, off)| {
        let (byte, shift) = position(w, c % 16, t);
        (
            w,
            off,
            64 * (lane_group * bits as usize + off as usize) + byte,
            shift,
        )
    })
}

/// Writes `code` for `(token t, channel c)` into a zero-initialised key tile.
pub fn put_key_code(tile: &mut [u8], head_dim: usize, bits: u8, t: usize, c: usize, code: u8) {
    for (w, off, byte, shift) in key_positions(head_dim, bits, t, c) {
        tile[byte] |= ((code >> off) & mask(w)) << shift;
    }
}

/// Writes `code` for `(token t, channel c)` into a zero-initialised value tile.
pub fn put_value_code(tile: &mut [u8], bits: u8, t: usize, c: usize, code: u8) {
    for (w, off, byte, shift) in value_positions(bits, t, c) {
        tile[byte] |= ((code >> off) & mask(w)) << shift;
    }
}

pub fn key_code(tile: &[u8], head_dim: usize, bits: u8, t: usize, c: usize) -> u8 {
    key_positions(head_dim, bits, t, c)
        .map(|(w, off, byte, shift)| ((tile[byte] >> shift) & mask(w)) << off)
        .sum()
}

pub fn value_code(tile: &[u8], bits: u8, t: usize, c: usize) -> u8 {
    value_positions(bits, t, c)
        .map(|(w, off, byte, shift)| ((tile[byte] >> shift) & mask(w)) << off)
        .sum()
}

fn mask(w: u8) -> u8 {
    if w == 8 {
        0xFF
    } else {
        (1u8 << w) - 1
    }
}

/// Why a layout can't be tiled, if it can't: `head_dim`, the design's group and whether the
/// group runs along tokens (per-channel keys).
pub fn check_layout(
    head_dim: usize,
    group: usize,
    per_channel: bool,
    is_key: bool,
) -> Result<(), String> {
    if !head_dim.is_multiple_of(32) {
        return Err(format!(
            "int8 attention needs head_dim a multiple of 32, got {head_dim}"
        ));
    }
    if per_channel {
        if !group.is_multiple_of(KEY_TILE_TOKENS) {
            return Err(format!(
                "int8 attention needs per-channel key groups of a multiple of {KEY_TILE_TOKENS} tokens, got g={group}"
            ));
        }
    } else {
        let unit = if is_key { 32 } else { 16 };
        if group < head_dim && !group.is_multiple_of(unit) {
            let what = if is_key { "key" } else { "value" };
            return Err(format!(
                "int8 attention needs per-token {what} channel groups of a multiple of {unit} channels (or the whole head), got g={group}"
            ));
        }
    }
    Ok(())
}

/// Which implementation runs [`key_dot`] and [`value_accumulate`]. All give the same sums
/// bit for bit; the scalar one is the definition. Ordered from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernels {
    Scalar,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` (see `int8_avx2`).
    Avx2,
    /// AVX2 registers with AVX-VNNI's `vpdpbusd`.
    AvxVnni,
    /// AVX-512 with VNNI.
    Avx512Vnni,
}

impl Kernels {
    /// The fastest this CPU runs within `isa`'s vector width.
    pub fn best(isa: super::Isa) -> Kernels {
        let fits = |k: Kernels| match k {
            Kernels::Avx512Vnni => isa == super::Isa::Avx512,
            Kernels::Avx2 | Kernels::AvxVnni => isa != super::Isa::Scalar,
            Kernels::Scalar => true,
        };
        [Kernels::Avx512Vnni, Kernels::AvxVnni, Kernels::Avx2]
            .into_iter()
            .find(|&k| fits(k) && k.is_available())
            .unwrap_or(Kernels::Scalar)
    }

    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = || is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match self {
                Kernels::Scalar => true,
                // F16C for the AVX2 weight builders.
                Kernels::Avx2 => avx2() && is_x86_feature_detected!("f16c"),
                Kernels::AvxVnni => {
                    Kernels::Avx2.is_available() && is_x86_feature_detected!("avxvnni")
                }
                // F16C for the AVX-512 weight builders.
                Kernels::Avx512Vnni => vnni_available() && is_x86_feature_detected!("f16c"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernels::Scalar
        }
    }

    /// For reports.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Scalar => "scalar",
            Kernels::Avx2 => "avx2",
            Kernels::AvxVnni => "avx-vnni",
            Kernels::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Query rows per kernel pass.
    fn rows_per_pass(self) -> usize {
        match self {
            Kernels::Avx2 | Kernels::AvxVnni => super::int8_avx2::ROWS,
            _ => super::MAX_ROWS,
        }
    }
}

/// Whether the VNNI kernels can run here (AVX-512 F, BW, VL and VNNI).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `i8` query rows as [`key_dot`] reads them: row `r` of the weights for key tile `tile`
/// starts at `(tile / block_tiles)·block_stride + r·stride` in `q`, so that per-channel keys
/// can give each block of `block_tiles` tiles its own weights (per-token keys: one block).
#[derive(Clone, Copy, Debug)]
pub struct KeyWeights<'a> {
    pub q: &'a [i8],
    pub stride: usize,
    pub rows: usize,
    pub block_tiles: usize,
    pub block_stride: usize,
}

impl<'a> KeyWeights<'a> {
    /// The same `rows` rows for every tile.
    pub fn shared(q: &'a [i8], stride: usize, rows: usize) -> KeyWeights<'a> {
        KeyWeights {
            q,
            stride,
            rows,
            block_tiles: 1,
            block_stride: 0,
        }
    }

    /// The rows from row `r0` on.
    fn skip_rows(self, r0: usize) -> KeyWeights<'a> {
        KeyWeights {
            q: &self.q[r0 * self.stride..],
            rows: self.rows - r0,
            ..self
        }
    }

    /// Where the weights of `tile` start.
    pub(super) fn at(&self, tile: usize) -> usize {
        tile / self.block_tiles * self.block_stride
    }
}

/// The bounds every key kernel relies on (`rows` and `tiles` nonzero).
fn key_dot_checks(
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    channels: Range<usize>,
    w: &KeyWeights,
) {
    assert!(
        (1..=8).contains(&bits),
        "key_dot: bits {bits} outside 1..=8"
    );
    assert!(
        channels.start.is_multiple_of(32)
            && (channels.end.is_multiple_of(32) || channels.end == head_dim)
            && channels.end <= head_dim,
        "key_dot: channels {channels:?} not aligned to lines"
    );
    assert!(
        codes.len() >= tiles * key_tile_bytes(head_dim, bits),
        "key_dot: codes too short"
    );
    assert!(w.block_tiles > 0, "key_dot: zero tiles per weight block");
    assert!(
        w.q.len() >= w.at(tiles - 1) + (w.rows - 1) * w.stride + channels.end,
        "key_dot: query too short"
    );
}

/// Key scores in integers: for `tiles` consecutive key tiles at `codes` and `r < w.rows`,
/// `out[r·out_stride + 16·tile + t] = Σ_{c ∈ channels} q_tile[r·stride + c] · code(tile, t, c)`
/// with the tile's weights `q_tile` as [`KeyWeights`] places them. `channels` must start and
/// end on multiples of 32 (or at `head_dim`).
#[allow(clippy::too_many_arguments)]
pub fn key_dot(
    kernels: Kernels,
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    channels: Range<usize>,
    w: KeyWeights,
    out: &mut [i32],
    out_stride: usize,
) {
    let rows = w.rows;
    if rows == 0 || tiles == 0 {
        return;
    }
    key_dot_checks(codes, tiles, head_dim, bits, channels.clone(), &w);
    assert!(
        out.len() >= (rows - 1) * out_stride + tiles * KEY_TILE_TOKENS,
        "key_dot: output too short"
    );
    let kernels = checked(kernels);
    let per_pass = kernels.rows_per_pass();
    for r0 in (0..rows).step_by(per_pass) {
        let w = w.skip_rows(r0);
        let n = per_pass.min(w.rows);
        let out = &mut out[r0 * out_stride..];
        #[cfg(target_arch = "x86_64")]
        {
            use super::{int8_avx2, int8_avx512};
            let simd = match kernels {
                Kernels::Avx512Vnni => Some(int8_avx512::key_dot as KeyDotFn),
                Kernels::AvxVnni => Some(int8_avx2::key_dot_vnni as KeyDotFn),
                Kernels::Avx2 => Some(int8_avx2::key_dot_madd as KeyDotFn),
                Kernels::Scalar => None,
            };
            if let Some(f) = simd {
                let w = KeyWeights { rows: n, ..w };
                // SAFETY: features checked by `checked`; bounds asserted above.
                unsafe {
                    f(
                        codes,
                        tiles,
                        head_dim,
                        bits,
                        channels.clone(),
                        w,
                        out,
                        out_stride,
                    )
                };
                continue;
            }
        }
        for r in 0..n {
            for tile in 0..tiles {
                let t_codes = &codes[tile * key_tile_bytes(head_dim, bits)..];
                let q = &w.q[w.at(tile) + r * w.stride..];
                for t in 0..KEY_TILE_TOKENS {
                    let mut sum = 0i32;
                    for c in channels.clone() {
                        sum += q[c] as i32 * key_code(t_codes, head_dim, bits, t, c) as i32;
                    }
                    out[r * out_stride + tile * KEY_TILE_TOKENS + t] = sum;
                }
            }
        }
    }
}

/// The float step of per-channel key scores ([`key_scores`]), per weight block `j` and query
/// row `r < rows`: `score = h·σ + b` with `σ = sigma[j·rows + r]`, `b = bias[j·rows + r]` and
/// `h` the integer sum of row `r`; with `lo_scale`, the weights are split (rows `rows..2·rows`
/// hold the `lo` parts, sum `l`) and `score = h·σ + (l·(σ·lo_scale) + b)`. Each step one
/// fused multiply-add, as the glue's definition.
#[derive(Clone, Copy, Debug)]
pub struct KeyScoreScales<'a> {
    pub sigma: &'a [f32],
    pub bias: &'a [f32],
    pub rows: usize,
    pub lo_scale: Option<f32>,
}

impl KeyScoreScales<'_> {
    /// Row `r`'s score from its integer sums `h` (and `l`) in block `j`.
    #[inline(always)]
    pub(super) fn score(&self, j: usize, r: usize, h: i32, l: i32) -> f32 {
        let (sig, b) = (self.sigma[j * self.rows + r], self.bias[j * self.rows + r]);
        match self.lo_scale {
            Some(lo) => (h as f32).mul_add(sig, (l as f32).mul_add(sig * lo, b)),
            None => (h as f32).mul_add(sig, b),
        }
    }
}

/// Whether [`key_scores`] applies its float step inside the kernel for `weight_rows` rows
/// with `kernels` (AVX-512 VNNI, up to [`super::MAX_ROWS`] rows); elsewhere it is its
/// definition, which a caller with its own vectorized float step need not use.
pub fn key_scores_fused(kernels: Kernels, weight_rows: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && checked(kernels) == Kernels::Avx512Vnni
        && weight_rows <= super::MAX_ROWS
}

/// Per-channel key scores in f32 over all channels of `tiles` consecutive key tiles:
/// `out[r·out_stride + 16·tile + t]` is [`KeyScoreScales`]'s score of the [`key_dot`] sums of
/// the tile's weight block (`tile / w.block_tiles`), for `r < scales.rows`; `max[r]` becomes
/// the largest of row `r`'s scores. `w.rows` must be `scales.rows` (doubled when split).
/// Defined as [`key_dot`] into `sums` (`w.rows × 16·tiles`, scratch), then the float step;
/// the AVX-512 version applies the float step to each tile's sums while they are in registers
/// (the same bits).
#[allow(clippy::too_many_arguments)]
pub fn key_scores(
    kernels: Kernels,
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    w: KeyWeights,
    scales: KeyScoreScales,
    out: &mut [f32],
    out_stride: usize,
    max: &mut [f32],
    sums: &mut Vec<i32>,
) {
    let rows = scales.rows;
    assert_eq!(
        w.rows,
        if scales.lo_scale.is_some() {
            2 * rows
        } else {
            rows
        },
        "key_scores: weight rows against score rows"
    );
    assert!(max.len() >= rows, "key_scores: max too short");
    if rows == 0 || tiles == 0 {
        max[..rows].fill(f32::NEG_INFINITY);
        return;
    }
    let blocks = (tiles - 1) / w.block_tiles + 1;
    assert!(
        scales.sigma.len() >= blocks * rows && scales.bias.len() >= blocks * rows,
        "key_scores: scales too short"
    );
    assert!(
        out.len() >= (rows - 1) * out_stride + tiles * KEY_TILE_TOKENS,
        "key_scores: output too short"
    );
    #[cfg(target_arch = "x86_64")]
    if key_scores_fused(kernels, w.rows) {
        key_dot_checks(codes, tiles, head_dim, bits, 0..head_dim, &w);
        // SAFETY: features checked by `checked`; bounds asserted above and by the checks.
        unsafe {
            super::int8_avx512::key_scores(
                codes, tiles, head_dim, bits, w, scales, out, out_stride, max,
            )
        };
        return;
    }
    let n = tiles * KEY_TILE_TOKENS;
    sums.clear();
    sums.resize(w.rows * n, 0);
    key_dot(
        kernels,
        codes,
        tiles,
        head_dim,
        bits,
        0..head_dim,
        w,
        sums,
        n,
    );
    for r in 0..rows {
        let mut m = f32::NEG_INFINITY;
        for i in 0..n {
            let j = i / KEY_TILE_TOKENS / w.block_tiles;
            let l = if scales.lo_scale.is_some() {
                sums[(rows + r) * n + i]
            } else {
                0
            };
            let x = scales.score(j, r, sums[r * n + i], l);
            out[r * out_stride + i] = x;
            m = if x > m { x } else { m };
        }
        max[r] = m;
    }
}

/// Value accumulation in integers: for `tiles` consecutive value tiles at `codes`, `r < rows`,
/// `c ∈ channels`, tile by tile in order:
/// `acc[r·acc_stride + c] = (Σ_{t<32} w[r·w_stride + 32·tile + t] · code(tile, t, c)) as f32
///  · scale[r·scale_stride + tile] + acc[…]` (one fused multiply-add per tile).
/// `w` holds non-negative weights (`0..=127`); `channels` starts and ends on multiples of 16.
#[allow(clippy::too_many_arguments)]
pub fn value_accumulate(
    kernels: Kernels,
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    channels: Range<usize>,
    w: &[i8],
    w_stride: usize,
    scale: &[f32],
    scale_stride: usize,
    rows: usize,
    acc: &mut [f32],
    acc_stride: usize,
) {
    if rows == 0 || tiles == 0 {
        return;
    }
    value_accumulate_checks(
        codes,
        tiles,
        head_dim,
        bits,
        &channels,
        (w.len(), w_stride),
        (scale.len(), scale_stride),
        rows,
        (acc.len(), acc_stride),
    );
    let kernels = checked(kernels);
    let per_pass = kernels.rows_per_pass();
    for r0 in (0..rows).step_by(per_pass) {
        let n = per_pass.min(rows - r0);
        let (w, scale) = (&w[r0 * w_stride..], &scale[r0 * scale_stride..]);
        let acc = &mut acc[r0 * acc_stride..];
        #[cfg(target_arch = "x86_64")]
        {
            use super::{int8_avx2, int8_avx512};
            let simd = match kernels {
                Kernels::Avx512Vnni => Some(int8_avx512::value_accumulate as ValueFn),
                Kernels::AvxVnni => Some(int8_avx2::value_accumulate_vnni as ValueFn),
                Kernels::Avx2 => Some(int8_avx2::value_accumulate_madd as ValueFn),
                Kernels::Scalar => None,
            };
            if let Some(f) = simd {
                let ch = channels.clone();
                // SAFETY: features checked by `checked`; bounds asserted above.
                unsafe {
                    f(
                        codes,
                        tiles,
                        head_dim,
                        bits,
                        ch,
                        w,
                        w_stride,
                        scale,
                        scale_stride,
                        n,
                        acc,
                        acc_stride,
                    )
                };
                continue;
            }
        }
        for r in 0..n {
            for tile in 0..tiles {
                let t_codes = &codes[tile * value_tile_bytes(head_dim, bits)..];
                let s = scale[r * scale_stride + tile];
                for c in channels.clone() {
                    let mut sum = 0i32;
                    for t in 0..VALUE_TILE_TOKENS {
                        let wt = w[r * w_stride + tile * VALUE_TILE_TOKENS + t] as i32;
                        sum += wt * value_code(t_codes, bits, t, c) as i32;
                    }
                    let a = &mut acc[r * acc_stride + c];
                    *a = (sum as f32).mul_add(s, *a);
                }
            }
        }
    }
}

/// The bounds every value kernel relies on (`rows` and `tiles` nonzero): the weights,
/// scales and sums given as `(available length, row stride)`.
#[allow(clippy::too_many_arguments)]
fn value_accumulate_checks(
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    channels: &Range<usize>,
    (w_len, w_stride): (usize, usize),
    (scale_len, scale_stride): (usize, usize),
    rows: usize,
    (acc_len, acc_stride): (usize, usize),
) {
    assert!(
        (1..=8).contains(&bits),
        "value_accumulate: bits {bits} outside 1..=8"
    );
    assert!(
        channels.start.is_multiple_of(16)
            && channels.end.is_multiple_of(16)
            && channels.end <= head_dim,
        "value_accumulate: channels {channels:?} not aligned to lane groups"
    );
    assert!(
        codes.len() >= tiles * value_tile_bytes(head_dim, bits),
        "value_accumulate: codes too short"
    );
    assert!(
        w_len >= (rows - 1) * w_stride + tiles * VALUE_TILE_TOKENS,
        "value_accumulate: weights too short"
    );
    assert!(
        scale_len >= (rows - 1) * scale_stride + tiles,
        "value_accumulate: scales too short"
    );
    assert!(
        acc_len >= (rows - 1) * acc_stride + channels.end,
        "value_accumulate: accumulator too short"
    );
}

/// [`value_accumulate`] over all channels `0..head_dim`, in channel groups of `group`
/// channels (a multiple of 16, or at least `head_dim`: one group), group `g` with its own
/// weights `w[g·w_group_stride..]` and scales `scale[g·scale_group_stride..]`: the same sums
/// as one call per group, bit for bit. The AVX-512 kernels make one pass over the tiles for
/// all groups (each tile's lane groups are adjacent bytes); the others call per group.
#[allow(clippy::too_many_arguments)]
pub fn value_accumulate_groups(
    kernels: Kernels,
    codes: &[u8],
    tiles: usize,
    head_dim: usize,
    bits: u8,
    group: usize,
    w: &[i8],
    w_stride: usize,
    w_group_stride: usize,
    scale: &[f32],
    scale_stride: usize,
    scale_group_stride: usize,
    rows: usize,
    acc: &mut [f32],
    acc_stride: usize,
) {
    let group = group.min(head_dim);
    assert!(
        group > 0 && group.is_multiple_of(16),
        "value_accumulate_groups: group {group} not a multiple of 16"
    );
    let ng = head_dim.div_ceil(group);
    if rows == 0 || tiles == 0 {
        return;
    }
    // Each group's bounds, as one call per group would check them.
    for g in 0..ng {
        let c0 = g * group;
        value_accumulate_checks(
            codes,
            tiles,
            head_dim,
            bits,
            &(c0..(c0 + group).min(head_dim)),
            (w.len().saturating_sub(g * w_group_stride), w_stride),
            (
                scale.len().saturating_sub(g * scale_group_stride),
                scale_stride,
            ),
            rows,
            (acc.len(), acc_stride),
        );
    }
    #[cfg(target_arch = "x86_64")]
    if checked(kernels) == Kernels::Avx512Vnni {
        for r0 in (0..rows).step_by(super::MAX_ROWS) {
            let n = super::MAX_ROWS.min(rows - r0);
            // SAFETY: features checked by `checked`; bounds asserted above.
            unsafe {
                super::int8_avx512::value_accumulate_groups(
                    codes,
                    tiles,
                    head_dim,
                    bits,
                    group,
                    &w[r0 * w_stride..],
                    w_stride,
                    w_group_stride,
                    &scale[r0 * scale_stride..],
                    scale_stride,
                    scale_group_stride,
                    n,
                    &mut acc[r0 * acc_stride..],
                    acc_stride,
                )
            };
        }
        return;
    }
    for g in 0..ng {
        let c0 = g * group;
        value_accumulate(
            kernels,
            codes,
            tiles,
            head_dim,
            bits,
            c0..(c0 + group).min(head_dim),
            &w[g * w_group_stride..],
            w_stride,
            &scale[g * scale_group_stride..],
            scale_stride,
            rows,
            acc,
            acc_stride,
        );
    }
}

/// `1/127`: the weights' scale is `max|x|` times this, a multiplication where a division
/// would take a vector division unit's throughput for every 16 scales.
pub const INV_127: f32 = 1.0 / 127.0;

/// Rounds `x` to signed 8-bit weights with one scale `σ = max|x|·(1/127)` and returns `σ`
/// (0, with every weight 0, when `x` is all zeros): `hi = round(x/σ)`, ties to even. With
/// `lo`, also the residual to 1/254 of that step: `lo = round((x/σ − hi)·254)`, so that
/// `x ≈ σ·(hi + lo/254)`. `x` must be finite. The AVX-512 version (used where VNNI is) gives
/// the same bytes.
pub fn quantize_i8(x: &[f32], hi: &mut [i8], lo: Option<&mut [i8]>) -> f32 {
    assert!(hi.len() >= x.len() && lo.as_ref().is_none_or(|l| l.len() >= x.len()));
    #[cfg(target_arch = "x86_64")]
    if checked(Kernels::Avx512Vnni) == Kernels::Avx512Vnni {
        // SAFETY: AVX-512 F/BW detected; lengths asserted.
        return unsafe { super::int8_avx512::quantize_i8(x, hi, lo) };
    }
    quantize_i8_scalar(x, hi, lo)
}

/// The definition of [`quantize_i8`].
pub fn quantize_i8_scalar(x: &[f32], hi: &mut [i8], lo: Option<&mut [i8]>) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        hi[..x.len()].fill(0);
        if let Some(lo) = lo {
            lo[..x.len()].fill(0);
        }
        return 0.0;
    }
    let k = 127.0 / amax;
    match lo {
        None => {
            for (h, v) in hi.iter_mut().zip(x) {
                *h = (v * k).round_ties_even() as i8;
            }
        }
        Some(lo) => {
            for ((h, l), v) in hi.iter_mut().zip(lo.iter_mut()).zip(x) {
                let t = v * k;
                let r = t.round_ties_even();
                *h = r as i8;
                *l = ((t - r) * 254.0).round_ties_even() as i8;
            }
        }
    }
    amax * INV_127
}

/// The weights of `rows` query rows (`q`: `rows × d`) against `blocks` consecutive blocks of
/// per-channel keys (`s`, `z`: `blocks × d` scales and zero-points). For block `j` and row `r`:
/// `w = q_r ∘ s_j` rounded by [`quantize_i8`] into `w8[(j·q_rows + r)·d..]` (`hi`) and, when
/// `split`, `w8[(j·q_rows + rows + r)·d..]` (`lo`), where `q_rows` is `2·rows` when split and
/// `rows` otherwise (the row layout [`key_dot`] reads with a block stride of `q_rows·d`);
/// `sigma[j·rows + r] = σ` and `bias[j·rows + r] = Σ_c q_c·z_c`. The AVX-512 version gives
/// the same bytes and `σ`; `bias` may differ in rounding (another summation order). The
/// AVX-512 version runs with [`Kernels::Avx512Vnni`], the AVX2 one with the AVX2 kernels.
#[allow(clippy::too_many_arguments)]
pub fn key_block_weights(
    kernels: Kernels,
    q: &[f32],
    rows: usize,
    s: &[half::f16],
    z: &[half::f16],
    blocks: usize,
    split: bool,
    w8: &mut [i8],
    sigma: &mut [f32],
    bias: &mut [f32],
) {
    if rows == 0 || blocks == 0 {
        return;
    }
    let d = q.len() / rows;
    let q_rows = if split { 2 * rows } else { rows };
    assert!(
        q.len() == rows * d,
        "key_block_weights: query not rows × head_dim"
    );
    assert!(d <= 512, "key_block_weights: head_dim {d} above 512");
    assert!(s.len() >= blocks * d && z.len() >= blocks * d);
    assert!(w8.len() >= blocks * q_rows * d);
    assert!(sigma.len() >= blocks * rows && bias.len() >= blocks * rows);
    #[cfg(target_arch = "x86_64")]
    match checked(kernels) {
        Kernels::Avx512Vnni if d.is_multiple_of(32) => {
            // SAFETY: AVX-512 F/BW/VL and F16C detected; lengths asserted, `d` as it requires.
            return unsafe {
                super::int8_avx512::key_block_weights(q, rows, s, z, blocks, split, w8, sigma, bias)
            };
        }
        Kernels::Avx2 | Kernels::AvxVnni if d.is_multiple_of(8) => {
            // SAFETY: AVX2, FMA and F16C detected; lengths asserted, `d` as it requires.
            return unsafe {
                super::int8_avx2::key_block_weights(q, rows, s, z, blocks, split, w8, sigma, bias)
            };
        }
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    key_block_weights_scalar(q, rows, s, z, blocks, split, w8, sigma, bias)
}

/// The definition of [`key_block_weights`].
#[allow(clippy::too_many_arguments)]
pub fn key_block_weights_scalar(
    q: &[f32],
    rows: usize,
    s: &[half::f16],
    z: &[half::f16],
    blocks: usize,
    split: bool,
    w8: &mut [i8],
    sigma: &mut [f32],
    bias: &mut [f32],
) {
    let d = q.len() / rows.max(1);
    let q_rows = if split { 2 * rows } else { rows };
    let mut w = [0.0f32; 512];
    let w = &mut w[..d];
    for j in 0..blocks {
        let (sj, zj) = (&s[j * d..(j + 1) * d], &z[j * d..(j + 1) * d]);
        let wj = &mut w8[j * q_rows * d..(j + 1) * q_rows * d];
        let (his, los) = wj.split_at_mut(rows * d);
        for (r, qr) in q.chunks_exact(d).enumerate() {
            let mut b = 0.0f32;
            for (((w, &q), s), z) in w.iter_mut().zip(qr).zip(sj).zip(zj) {
                *w = q * s.to_f32();
                b = q.mul_add(z.to_f32(), b);
            }
            let lo = split.then(|| &mut los[r * d..(r + 1) * d]);
            sigma[j * rows + r] = quantize_i8_scalar(w, &mut his[r * d..(r + 1) * d], lo);
            bias[j * rows + r] = b;
        }
    }
}

/// The weights of `rows` probability rows and one channel group over value tiles: for row
/// `r`, probability `p[r·p_stride + i]` of the token at tile position `first + i`
/// (`first < 32`, `i < n`) times its scale `s[i]`, rounded per tile of 32 positions by
/// [`quantize_i8`] into `hi[r·nt·32 + 32·j..]` (and `lo`, laid out alike) with scale
/// `sigma[r·nt + j]`, `nt = ⌈(first + n)/32⌉`; positions outside `first..first + n` weigh 0.
/// `zero[r] = Σ_i p[r·p_stride + i]·z[i]`. The AVX-512 version gives the same bytes and
/// scales; the zero-point sums may differ in rounding. The AVX-512 version runs with
/// [`Kernels::Avx512Vnni`], the AVX2 one with the AVX2 kernels.
///
/// Probabilities and scales must not be negative (a min-max grid's step never is): the
/// AVX-512 version takes the weights' maximum as their largest magnitude.
#[allow(clippy::too_many_arguments)]
pub fn value_weights(
    kernels: Kernels,
    p: &[f32],
    p_stride: usize,
    rows: usize,
    n: usize,
    s: &[half::f16],
    z: &[half::f16],
    first: usize,
    hi: &mut [i8],
    lo: Option<&mut [i8]>,
    sigma: &mut [f32],
    zero: &mut [f32],
) {
    if rows == 0 {
        return;
    }
    let nt = (first + n).div_ceil(VALUE_TILE_TOKENS);
    assert!(first < VALUE_TILE_TOKENS && s.len() >= n && z.len() >= n);
    assert!(p.len() >= (rows - 1) * p_stride + n && zero.len() >= rows);
    assert!(hi.len() >= rows * nt * VALUE_TILE_TOKENS && sigma.len() >= rows * nt);
    assert!(lo
        .as_ref()
        .is_none_or(|l| l.len() >= rows * nt * VALUE_TILE_TOKENS));
    debug_assert!(non_negative(&s[..n]), "value_weights: a negative scale");
    debug_assert!(
        (0..rows).all(|r| p[r * p_stride..r * p_stride + n].iter().all(|&x| x >= 0.0)),
        "value_weights: a negative probability"
    );
    #[cfg(target_arch = "x86_64")]
    match checked(kernels) {
        Kernels::Avx512Vnni if rows <= 16 => {
            // SAFETY: AVX-512 F/BW and F16C detected; lengths asserted, rows as it requires.
            return unsafe {
                super::int8_avx512::value_weights(
                    p, p_stride, rows, n, s, z, first, hi, lo, sigma, zero,
                )
            };
        }
        Kernels::Avx2 | Kernels::AvxVnni => {
            // SAFETY: AVX2, FMA and F16C detected; lengths asserted.
            return unsafe {
                super::int8_avx2::value_weights(
                    p, p_stride, rows, n, s, z, first, hi, lo, sigma, zero,
                )
            };
        }
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernels;
    value_weights_scalar(p, p_stride, rows, n, s, z, first, hi, lo, sigma, zero)
}

/// No negative value (nor NaN) in `x`; −0 is allowed.
fn non_negative(x: &[half::f16]) -> bool {
    x.iter().all(|v| v.to_f32() >= 0.0)
}

/// [`value_weights`] (without `lo` weights) for `s.len()` channel groups of the same
/// probabilities, group `g` with scales `s[g]` and zero-points `z[g]`: its weights at
/// `hi[g·rows·nt·32..]`, scales at `sigma[g·rows·nt..]` and zero-point sums at
/// `zero[g·rows..]`, the same bytes and scales as one call per group. The AVX-512 version
/// reads each probability once for all groups (up to 4 groups, `rows·groups ≤ 16`).
///
/// With `exp = Some((max, sums))` (a row each), `p` holds scores rather than probabilities:
/// the probabilities are `exp(score − max[r])` ([`super::exp_f32`], the softmax's own bits),
/// and their sum is added to `sums[r]` (in another order than [`super::softmax_exp`] adds
/// them, so it may differ in the last bits). The AVX-512 version computes them on the way,
/// saving the softmax its own pass.
///
/// As for [`value_weights`], probabilities and scales must not be negative; with `exp`, no
/// score may lie above its row's `max`.
#[allow(clippy::too_many_arguments)]
pub fn value_weights_groups(
    kernels: Kernels,
    p: &[f32],
    p_stride: usize,
    rows: usize,
    n: usize,
    s: &[&[half::f16]],
    z: &[&[half::f16]],
    first: usize,
    hi: &mut [i8],
    sigma: &mut [f32],
    zero: &mut [f32],
    exp: Option<(&[f32], &mut [f32])>,
) {
    let ng = s.len();
    assert_eq!(
        z.len(),
        ng,
        "value_weights_groups: scales against zero-points"
    );
    if rows == 0 || ng == 0 {
        return;
    }
    if let Some((max, sums)) = &exp {
        assert!(
            max.len() >= rows && sums.len() >= rows,
            "value_weights_groups: exp rows"
        );
    }
    let nt = (first + n).div_ceil(VALUE_TILE_TOKENS);
    let (w_len, s_len) = (rows * nt * VALUE_TILE_TOKENS, rows * nt);
    assert!(first < VALUE_TILE_TOKENS && s.iter().chain(z).all(|x| x.len() >= n));
    assert!(p.len() >= (rows - 1) * p_stride + n && zero.len() >= ng * rows);
    assert!(hi.len() >= ng * w_len && sigma.len() >= ng * s_len);
    debug_assert!(
        s.iter().all(|g| non_negative(&g[..n])),
        "value_weights_groups: a negative scale"
    );
    debug_assert!(
        (0..rows).all(|r| {
            let row = &p[r * p_stride..r * p_stride + n];
            match &exp {
                None => row.iter().all(|&x| x >= 0.0),
                Some((max, _)) => row.iter().all(|&x| x <= max[r]),
            }
        }),
        "value_weights_groups: a negative probability, or a score above its row's maximum"
    );
    #[cfg(target_arch = "x86_64")]
    if checked(kernels) == Kernels::Avx512Vnni && rows * ng <= 16 {
        use super::int8_avx512::value_weights_groups as groups;
        // SAFETY: AVX-512 F/BW and F16C detected; lengths asserted, `rows·NG ≤ 16`.
        unsafe {
            match ng {
                1 => {
                    let (s, z) = ([s[0]], [z[0]]);
                    return groups::<1>(p, p_stride, rows, n, s, z, first, hi, sigma, zero, exp);
                }
                2 => {
                    let (s, z) = ([s[0], s[1]], [z[0], z[1]]);
                    return groups::<2>(p, p_stride, rows, n, s, z, first, hi, sigma, zero, exp);
                }
                4 => {
                    let (s, z) = ([s[0], s[1], s[2], s[3]], [z[0], z[1], z[2], z[3]]);
                    return groups::<4>(p, p_stride, rows, n, s, z, first, hi, sigma, zero, exp);
                }
                _ => {}
            }
        }
    }
    // The definition: the probabilities first, then group by group.
    let probs: Vec<f32>;
    let (p, p_stride) = match exp {
        Some((max, sums)) => {
            probs = (0..rows)
                .flat_map(|r| {
                    p[r * p_stride..r * p_stride + n]
                        .iter()
                        .map(move |&x| (r, x))
                })
                .map(|(r, x)| super::exp_f32(x - max[r]))
                .collect();
            for (r, sum) in sums.iter_mut().enumerate().take(rows) {
                *sum += probs[r * n..(r + 1) * n].iter().sum::<f32>();
            }
            (&probs[..], n)
        }
        None => (p, p_stride),
    };
    for g in 0..ng {
        value_weights(
            kernels,
            p,
            p_stride,
            rows,
            n,
            s[g],
            z[g],
            first,
            &mut hi[g * w_len..],
            None,
            &mut sigma[g * s_len..],
            &mut zero[g * rows..],
        );
    }
}

/// The definition of [`value_weights`].
#[allow(clippy::too_many_arguments)]
pub fn value_weights_scalar(
    p: &[f32],
    p_stride: usize,
    rows: usize,
    n: usize,
    s: &[half::f16],
    z: &[half::f16],
    first: usize,
    hi: &mut [i8],
    mut lo: Option<&mut [i8]>,
    sigma: &mut [f32],
    zero: &mut [f32],
) {
    const T: usize = VALUE_TILE_TOKENS;
    let nt = (first + n).div_ceil(T);
    for r in 0..rows {
        let p = &p[r * p_stride..r * p_stride + n];
        zero[r] = 0.0;
        for (&p, z) in p.iter().zip(z) {
            zero[r] = p.mul_add(z.to_f32(), zero[r]);
        }
        let mut w = [0.0f32; T];
        for j in 0..nt {
            for (t, w) in w.iter_mut().enumerate() {
                let i = (j * T + t).wrapping_sub(first);
                *w = if i < n { p[i] * s[i].to_f32() } else { 0.0 };
            }
            let at = (r * nt + j) * T..(r * nt + j + 1) * T;
            let lo = lo.as_deref_mut().map(|l| &mut l[at.clone()]);
            sigma[r * nt + j] = quantize_i8_scalar(&w, &mut hi[at], lo);
        }
    }
}

/// The SIMD kernels' signatures (one per ISA, each compiled for its features).
#[cfg(target_arch = "x86_64")]
type KeyDotFn = unsafe fn(&[u8], usize, usize, u8, Range<usize>, KeyWeights, &mut [i32], usize);
#[cfg(target_arch = "x86_64")]
type ValueFn = unsafe fn(
    &[u8],
    usize,
    usize,
    u8,
    Range<usize>,
    &[i8],
    usize,
    &[f32],
    usize,
    usize,
    &mut [f32],
    usize,
);

/// `kernels` if this CPU runs them, else the scalar definition; asked once per level.
fn checked(kernels: Kernels) -> Kernels {
    static AVAILABLE: [std::sync::OnceLock<bool>; 4] = [const { std::sync::OnceLock::new() }; 4];
    let i = kernels as usize;
    if *AVAILABLE[i].get_or_init(|| kernels.is_available()) {
        kernels
    } else {
        Kernels::Scalar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    #[test]
    fn planes_cover_every_bit_once() {
        for bits in 1..=8u8 {
            let p: Vec<_> = planes(bits).collect();
            assert_eq!(p.iter().map(|&(w, _)| w).sum::<u8>(), bits, "bits {bits}");
            let mut next = 0;
            for &(w, off) in &p {
                assert!([1, 2, 4, 8].contains(&w));
                assert_eq!(off, next);
                next += w;
            }
        }
    }

    #[test]
    fn put_then_read_round_trips_and_fills_the_tile_exactly() {
        for bits in 1..=8u8 {
            for d in [32usize, 64, 96] {
                let mut seed = bits as u64 * 1000 + d as u64;
                // Keys: every (t, c) written once with all-ones codes fills every bit.
                let mut tile = vec![0u8; key_tile_bytes(d, bits)];
                let max = ((1u16 << bits) - 1) as u8;
                for t in 0..KEY_TILE_TOKENS {
                    for c in 0..d {
                        put_key_code(&mut tile, d, bits, t, c, max);
                    }
                }
                assert!(
                    tile.iter().all(|&b| b == 0xFF),
                    "key tile bits {bits} d {d}"
                );
                let mut tile = vec![0u8; value_tile_bytes(d, bits)];
                for t in 0..VALUE_TILE_TOKENS {
                    for c in 0..d {
                        put_value_code(&mut tile, bits, t, c, max);
                    }
                }
                assert!(
                    tile.iter().all(|&b| b == 0xFF),
                    "value tile bits {bits} d {d}"
                );
                // Random codes read back.
                let codes: Vec<u8> = (0..VALUE_TILE_TOKENS * d)
                    .map(|_| (lcg(&mut seed) as u8) & max)
                    .collect();
                let mut kt = vec![0u8; key_tile_bytes(d, bits)];
                let mut vt = vec![0u8; value_tile_bytes(d, bits)];
                for t in 0..VALUE_TILE_TOKENS {
                    for c in 0..d {
                        if t < KEY_TILE_TOKENS {
                            put_key_code(&mut kt, d, bits, t, c, codes[t * d + c]);
                        }
                        put_value_code(&mut vt, bits, t, c, codes[t * d + c]);
                    }
                }
                for t in 0..VALUE_TILE_TOKENS {
                    for c in 0..d {
                        if t < KEY_TILE_TOKENS {
                            assert_eq!(key_code(&kt, d, bits, t, c), codes[t * d + c]);
                        }
                        assert_eq!(value_code(&vt, bits, t, c), codes[t * d + c]);
                    }
                }
            }
        }
    }

    /// Every SIMD version of the kernels this CPU runs equals the scalar definition bit for
    /// bit, over every bit-width, row count and aligned channel range, with extreme weights
    /// and codes.
    #[test]
    fn simd_kernels_equal_the_scalar_definition() {
        let levels: Vec<Kernels> = [Kernels::Avx2, Kernels::AvxVnni, Kernels::Avx512Vnni]
            .into_iter()
            .filter(|k| k.is_available())
            .collect();
        if levels.is_empty() {
            eprintln!("skipped: no SIMD integer kernels on this CPU");
            return;
        }
        for &level in &levels {
            // 64: the AVX-512 key kernel's unrolled whole-head path.
            for d in [64, 96] {
                simd_kernels_equal_the_scalar_definition_on(level, d);
            }
        }
    }

    fn simd_kernels_equal_the_scalar_definition_on(level: Kernels, d: usize) {
        for bits in 1..=8u8 {
            let mut seed = 77 + bits as u64;
            let max = ((1u16 << bits) - 1) as u8;
            let tiles = 3;
            let kt_bytes = key_tile_bytes(d, bits);
            let vt_bytes = value_tile_bytes(d, bits);
            let mut kcodes = vec![0u8; tiles * kt_bytes];
            let mut vcodes = vec![0u8; tiles * vt_bytes];
            for tile in 0..tiles {
                for t in 0..VALUE_TILE_TOKENS {
                    for c in 0..d {
                        let code = if tile == 0 {
                            max
                        } else {
                            lcg(&mut seed) as u8 & max
                        };
                        if t < KEY_TILE_TOKENS {
                            put_key_code(&mut kcodes[tile * kt_bytes..], d, bits, t, c, code);
                        }
                        put_value_code(&mut vcodes[tile * vt_bytes..], bits, t, c, code);
                    }
                }
            }
            for rows in [1usize, 3, 7, 8, 11] {
                let q: Vec<i8> = (0..rows * d)
                    .map(|i| {
                        if i % 5 == 0 {
                            -128
                        } else {
                            lcg(&mut seed) as i8
                        }
                    })
                    .collect();
                for channels in [0..d, 32..64, d - 32..d, 0..32] {
                    let n = tiles * KEY_TILE_TOKENS;
                    let mut a = vec![0i32; rows * n];
                    let mut b = vec![0i32; rows * n];
                    // Shared rows, and per-tile rows (one block per tile, the query
                    // rotated by a row each tile so the blocks' weights differ).
                    let per_tile: Vec<i8> = (0..tiles)
                        .flat_map(|t| q.iter().cycle().skip(t * d).take(rows * d).copied())
                        .collect();
                    for w in [
                        KeyWeights::shared(&q, d, rows),
                        KeyWeights {
                            q: &per_tile,
                            stride: d,
                            rows,
                            block_tiles: 1,
                            block_stride: rows * d,
                        },
                    ] {
                        let (ch, n) = (channels.clone(), n);
                        let scalar = Kernels::Scalar;
                        key_dot(scalar, &kcodes, tiles, d, bits, ch.clone(), w, &mut a, n);
                        key_dot(level, &kcodes, tiles, d, bits, ch, w, &mut b, n);
                        assert_eq!(
                            a, b,
                            "{level:?} key_dot bits {bits} rows {rows} channels {channels:?} {w:?}"
                        );
                    }
                }
                // The f32 scores with their float step in the kernel: per block (here per
                // tile) scales, plain and split (the lo rows after the hi rows).
                let per_tile: Vec<i8> = (0..tiles)
                    .flat_map(|t| q.iter().cycle().skip(t * d).take(rows * d).copied())
                    .collect();
                let w = KeyWeights {
                    q: &per_tile,
                    stride: d,
                    rows,
                    block_tiles: 1,
                    block_stride: rows * d,
                };
                for split in [false, true] {
                    if split && rows % 2 == 1 {
                        continue;
                    }
                    let score_rows = if split { rows / 2 } else { rows };
                    let sigma: Vec<f32> = (0..tiles * score_rows)
                        .map(|_| (lcg(&mut seed) % 1000) as f32 * 1e-4 + 1e-3)
                        .collect();
                    let bias: Vec<f32> = (0..tiles * score_rows)
                        .map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0)
                        .collect();
                    let scales = KeyScoreScales {
                        sigma: &sigma,
                        bias: &bias,
                        rows: score_rows,
                        lo_scale: split.then_some(1.0 / 254.0),
                    };
                    let n = tiles * KEY_TILE_TOKENS + 5;
                    let mut sums = Vec::new();
                    let mut out = [vec![0.0f32; score_rows * n], vec![0.0f32; score_rows * n]];
                    let mut maxes = [vec![0.0f32; score_rows], vec![0.0f32; score_rows]];
                    for (k, kernels) in [Kernels::Scalar, level].into_iter().enumerate() {
                        key_scores(
                            kernels,
                            &kcodes,
                            tiles,
                            d,
                            bits,
                            w,
                            scales,
                            &mut out[k],
                            n,
                            &mut maxes[k],
                            &mut sums,
                        );
                    }
                    let what =
                        format!("{level:?} key_scores bits {bits} rows {rows} split {split}");
                    assert_eq!(out[0], out[1], "{what}");
                    assert_eq!(maxes[0], maxes[1], "{what}");
                    // The definition, from the integer sums.
                    let t_n = tiles * KEY_TILE_TOKENS;
                    let mut ints = vec![0i32; rows * t_n];
                    key_dot(
                        Kernels::Scalar,
                        &kcodes,
                        tiles,
                        d,
                        bits,
                        0..d,
                        w,
                        &mut ints,
                        t_n,
                    );
                    for r in 0..score_rows {
                        for i in 0..t_n {
                            let j = i / KEY_TILE_TOKENS;
                            let (sig, b) = (sigma[j * score_rows + r], bias[j * score_rows + r]);
                            let h = ints[r * t_n + i] as f32;
                            let want = if split {
                                let l = ints[(score_rows + r) * t_n + i] as f32;
                                h.mul_add(sig, l.mul_add(sig * (1.0 / 254.0), b))
                            } else {
                                h.mul_add(sig, b)
                            };
                            assert_eq!(out[1][r * n + i].to_bits(), want.to_bits(), "{what}");
                        }
                        let row_max = out[1][r * n..r * n + t_n]
                            .iter()
                            .fold(f32::MIN, |m, &x| m.max(x));
                        assert_eq!(maxes[1][r], row_max, "{what}");
                    }
                }
                let ws = tiles * VALUE_TILE_TOKENS;
                let w: Vec<i8> = (0..rows * ws)
                    .map(|i| {
                        if i % 7 == 0 {
                            127
                        } else {
                            (lcg(&mut seed) % 128) as i8
                        }
                    })
                    .collect();
                let scale: Vec<f32> = (0..rows * tiles).map(|i| 0.01 + i as f32 * 1e-3).collect();
                for channels in [0..d, 16..48, d - 16..d] {
                    let init: Vec<f32> = (0..rows * d).map(|i| i as f32 * 0.25).collect();
                    let (mut a, mut b) = (init.clone(), init);
                    value_accumulate(
                        Kernels::Scalar,
                        &vcodes,
                        tiles,
                        d,
                        bits,
                        channels.clone(),
                        &w,
                        ws,
                        &scale,
                        tiles,
                        rows,
                        &mut a,
                        d,
                    );
                    value_accumulate(
                        level,
                        &vcodes,
                        tiles,
                        d,
                        bits,
                        channels.clone(),
                        &w,
                        ws,
                        &scale,
                        tiles,
                        rows,
                        &mut b,
                        d,
                    );
                    assert_eq!(
                        a, b,
                        "{level:?} value_accumulate bits {bits} rows {rows} channels {channels:?}"
                    );
                }
            }
        }
    }

    /// The grouped value builders give what one call per group gives (weights, scales and
    /// sums bit for bit; zero-point sums in the same order too) on every kernel level.
    #[test]
    fn grouped_value_builders_equal_one_call_per_group() {
        use half::f16;
        let mut seed = 21;
        let mut f = |scale: f32| (lcg(&mut seed) as f32 / (1u64 << 31) as f32 - 0.5) * scale;
        let levels = [
            Kernels::Scalar,
            Kernels::Avx2,
            Kernels::AvxVnni,
            Kernels::Avx512Vnni,
        ];
        for level in levels.into_iter().filter(|k| k.is_available()) {
            for (d, group, rows, first, n, bits) in [
                (64usize, 32usize, 3usize, 0usize, 1024usize, 2u8),
                (64, 32, 3, 7, 300, 3),
                (64, 16, 4, 31, 65, 2),
                (64, 64, 3, 0, 96, 3),
                (96, 32, 2, 3, 100, 1),
                (64, 32, 9, 0, 64, 2),
                (64, 16, 5, 1, 40, 5),
            ] {
                let ng = d.div_ceil(group);
                let what = format!("{level:?} d {d} group {group} rows {rows} first {first} n {n}");
                let p_stride = n + 3;
                let p: Vec<f32> = (0..rows * p_stride).map(|_| f(2.0).abs()).collect();
                let s: Vec<Vec<f16>> = (0..ng)
                    .map(|_| (0..n).map(|_| f16::from_f32(f(1.0).abs())).collect())
                    .collect();
                let z: Vec<Vec<f16>> = (0..ng)
                    .map(|_| (0..n).map(|_| f16::from_f32(f(3.0))).collect())
                    .collect();
                let (sl, zl): (Vec<&[f16]>, Vec<&[f16]>) = (
                    s.iter().map(|x| &x[..]).collect(),
                    z.iter().map(|x| &x[..]).collect(),
                );
                let tiles = (first + n).div_ceil(VALUE_TILE_TOKENS);
                let ws = tiles * VALUE_TILE_TOKENS;
                let mut a = (
                    vec![7i8; ng * rows * ws],
                    vec![1f32; ng * rows * tiles],
                    vec![0f32; ng * rows],
                );
                let mut b = (
                    vec![9i8; ng * rows * ws],
                    vec![2f32; ng * rows * tiles],
                    vec![5f32; ng * rows],
                );
                value_weights_groups(
                    level, &p, p_stride, rows, n, &sl, &zl, first, &mut a.0, &mut a.1, &mut a.2,
                    None,
                );
                // From scores: the same weights as from their exponentials, and the sums.
                let max: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32).collect();
                let scores: Vec<f32> = (0..rows * p_stride)
                    .map(|i| max[i / p_stride] + p[i].max(1e-30).ln())
                    .collect();
                let exps: Vec<f32> = (0..rows * p_stride)
                    .map(|i| crate::kvcache::attention::exp_f32(scores[i] - max[i / p_stride]))
                    .collect();
                let mut e = (
                    vec![3i8; ng * rows * ws],
                    vec![3f32; ng * rows * tiles],
                    vec![3f32; ng * rows],
                );
                let mut want_w = e.clone();
                let mut sums = (vec![0.5f32; rows], vec![0.5f32; rows]);
                value_weights_groups(
                    level,
                    &scores,
                    p_stride,
                    rows,
                    n,
                    &sl,
                    &zl,
                    first,
                    &mut e.0,
                    &mut e.1,
                    &mut e.2,
                    Some((&max, &mut sums.0)),
                );
                value_weights_groups(
                    Kernels::Scalar,
                    &exps,
                    p_stride,
                    rows,
                    n,
                    &sl,
                    &zl,
                    first,
                    &mut want_w.0,
                    &mut want_w.1,
                    &mut want_w.2,
                    None,
                );
                assert_eq!(
                    (&e.0, &e.1),
                    (&want_w.0, &want_w.1),
                    "{what}: weights from scores"
                );
                for r in 0..rows {
                    let want: f32 = 0.5 + exps[r * p_stride..r * p_stride + n].iter().sum::<f32>();
                    let got = sums.0[r];
                    assert!(
                        (got - want).abs() <= 1e-5 * want,
                        "{what}: sum {got} vs {want}"
                    );
                }
                for g in 0..ng {
                    value_weights(
                        level,
                        &p,
                        p_stride,
                        rows,
                        n,
                        sl[g],
                        zl[g],
                        first,
                        &mut b.0[g * rows * ws..],
                        None,
                        &mut b.1[g * rows * tiles..],
                        &mut b.2[g * rows..],
                    );
                }
                let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(a.0, b.0, "{what}: weights");
                assert_eq!(bits_of(&a.1), bits_of(&b.1), "{what}: scales");
                assert_eq!(bits_of(&a.2), bits_of(&b.2), "{what}: zero-point sums");
                // Groups differ (their own scales): a mix-up of groups would show.
                if ng > 1 {
                    let k = rows * tiles;
                    assert_ne!(a.1[..k], a.1[k..2 * k], "{what}");
                }
                // The accumulation over all groups at once, against group by group on the
                // scalar definition.
                let mut vcodes = vec![0u8; tiles * value_tile_bytes(d, bits)];
                for tile in 0..tiles {
                    for t in 0..VALUE_TILE_TOKENS {
                        for c in 0..d {
                            let code = (f(1024.0) as i32 & ((1 << bits) - 1)) as u8;
                            let at = tile * value_tile_bytes(d, bits);
                            put_value_code(&mut vcodes[at..], bits, t, c, code);
                        }
                    }
                }
                let init: Vec<f32> = (0..rows * d).map(|i| i as f32 * 0.5).collect();
                let (mut x, mut y) = (init.clone(), init);
                value_accumulate_groups(
                    level,
                    &vcodes,
                    tiles,
                    d,
                    bits,
                    group,
                    &a.0,
                    ws,
                    rows * ws,
                    &a.1,
                    tiles,
                    rows * tiles,
                    rows,
                    &mut x,
                    d,
                );
                for g in 0..ng {
                    value_accumulate(
                        Kernels::Scalar,
                        &vcodes,
                        tiles,
                        d,
                        bits,
                        g * group..((g + 1) * group).min(d),
                        &a.0[g * rows * ws..],
                        ws,
                        &a.1[g * rows * tiles..],
                        tiles,
                        rows,
                        &mut y,
                        d,
                    );
                }
                assert_eq!(bits_of(&x), bits_of(&y), "{what}: accumulation");
            }
        }
    }

    #[test]
    fn quantize_i8_rounds_to_the_shared_scale() {
        let x = [0.5f32, -1.27, 0.0, 1.27, 0.004];
        let mut q = [1i8; 5];
        let s = quantize_i8_scalar(&x, &mut q, None);
        assert!((s - 0.01).abs() < 1e-7);
        assert_eq!(q, [50, -127, 0, 127, 0]);
        let mut lo = [0i8; 5];
        quantize_i8_scalar(&x, &mut q, Some(&mut lo));
        // 0.004 is 0.4 steps: hi 0, lo round(0.4·254) = 102 (up to the f32 rounding of 0.4).
        assert_eq!(q[4], 0);
        assert!((101..=102).contains(&lo[4]), "{lo:?}");
        assert_eq!(quantize_i8_scalar(&[0.0; 3], &mut q, Some(&mut lo)), 0.0);
        assert_eq!((&q[..3], &lo[..3]), (&[0i8, 0, 0][..], &[0i8, 0, 0][..]));
    }

    #[test]
    fn weight_builders_dispatch_equal_their_definitions() {
        for level in [Kernels::Avx2, Kernels::Avx512Vnni] {
            if level.is_available() {
                weight_builders_equal_their_definitions_on(level);
            }
        }
    }

    fn weight_builders_equal_their_definitions_on(level: Kernels) {
        use half::f16;
        let mut seed = 3;
        let mut f = |scale: f32| (lcg(&mut seed) as f32 / (1u64 << 31) as f32 - 0.5) * scale;
        for (d, rows, blocks) in [
            (32usize, 1usize, 1usize),
            (64, 3, 5),
            (256, 2, 3),
            (64, 4, 3),
            (96, 7, 4),
            (128, 3, 2),
        ] {
            let q: Vec<f32> = (0..rows * d).map(|_| f(4.0)).collect();
            let mut s: Vec<f16> = (0..blocks * d)
                .map(|_| f16::from_f32(f(1.0).abs()))
                .collect();
            // A block of zero scales: all weights 0, σ 0.
            s[..d].fill(f16::ZERO);
            let z: Vec<f16> = (0..blocks * d).map(|_| f16::from_f32(f(3.0))).collect();
            for split in [false, true] {
                let q_rows = if split { 2 * rows } else { rows };
                let (mut w1, mut w2) = (
                    vec![1i8; blocks * q_rows * d],
                    vec![2i8; blocks * q_rows * d],
                );
                let (mut s1, mut s2) = (vec![1.0f32; blocks * rows], vec![2.0f32; blocks * rows]);
                let (mut b1, mut b2) = (vec![0.0f32; blocks * rows], vec![0.0f32; blocks * rows]);
                key_block_weights_scalar(
                    &q, rows, &s, &z, blocks, split, &mut w1, &mut s1, &mut b1,
                );
                key_block_weights(
                    level, &q, rows, &s, &z, blocks, split, &mut w2, &mut s2, &mut b2,
                );
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    (bits(&s1), &w1),
                    (bits(&s2), &w2),
                    "{level:?} keys d {d} rows {rows}"
                );
                assert_eq!(s1[0], 0.0);
                assert!(w1[..d].iter().all(|&x| x == 0));
                assert!(s1[rows..].iter().all(|&x| x > 0.0));
                for (x, y) in b1.iter().zip(&b2) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
                }
                // Each block's weights are its own: block j, row r is q_r ∘ s_j rounded.
                let (j, r) = (blocks - 1, rows - 1);
                let w: Vec<f32> = (0..d)
                    .map(|c| q[r * d + c] * s[j * d + c].to_f32())
                    .collect();
                let mut hi = vec![0i8; d];
                let sig = quantize_i8_scalar(&w, &mut hi, None);
                assert_eq!(sig, s1[j * rows + r]);
                assert_eq!(&w1[(j * q_rows + r) * d..(j * q_rows + r + 1) * d], &hi[..]);
            }
        }
        for (first, n, rows) in [
            (0usize, 1usize, 1usize),
            (0, 32, 2),
            (5, 27, 1),
            (31, 1, 3),
            (7, 100, 3),
            (0, 1024, 1),
            (13, 1011, 3),
            (2, 70, 4),
            (3, 300, 16),
            (9, 200, 17),
        ] {
            // Rows `p_stride` apart, with a gap of junk between them.
            let p_stride = n + 5;
            let mut p: Vec<f32> = (0..rows * p_stride).map(|_| f(2.0).abs()).collect();
            if n >= 100 {
                // Covers a whole tile of row 0: its weights and scale are 0.
                p[30..100].fill(0.0);
            }
            let s: Vec<f16> = (0..n).map(|_| f16::from_f32(f(1.0).abs())).collect();
            let z: Vec<f16> = (0..n).map(|_| f16::from_f32(f(3.0))).collect();
            let tiles = (first + n).div_ceil(32);
            let len = rows * tiles * 32;
            for split in [false, true] {
                let mut a = (vec![9i8; len], vec![9i8; len], vec![0f32; rows * tiles]);
                let mut b = (vec![9i8; len], vec![9i8; len], vec![0f32; rows * tiles]);
                let (mut za, mut zb) = (vec![0f32; rows], vec![0f32; rows]);
                let lo = split.then_some(&mut a.1[..]);
                value_weights_scalar(
                    &p, p_stride, rows, n, &s, &z, first, &mut a.0, lo, &mut a.2, &mut za,
                );
                let lo = split.then_some(&mut b.1[..]);
                value_weights(
                    level, &p, p_stride, rows, n, &s, &z, first, &mut b.0, lo, &mut b.2, &mut zb,
                );
                let what =
                    format!("{level:?} values first {first} n {n} rows {rows} split {split}");
                assert_eq!(a, b, "{what}");
                assert_eq!(a.2[..tiles].contains(&0.0), n >= 100, "{what}");
                for (x, y) in za.iter().zip(&zb) {
                    assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{x} vs {y}");
                }
                // Each row is its own: the last row's zero-point sum, and positions outside
                // the tokens weigh nothing.
                let r = rows - 1;
                let want: f32 = (0..n).map(|i| p[r * p_stride + i] * z[i].to_f32()).sum();
                assert!((za[r] - want).abs() <= 1e-3 * (1.0 + want.abs()), "{what}");
                let row = &a.0[r * tiles * 32..(r + 1) * tiles * 32];
                assert!(row[..first].iter().all(|&x| x == 0));
                assert!(row[first + n..].iter().all(|&x| x == 0));
                assert!(row[first..first + n].iter().any(|&x| x != 0));
            }
        }
    }

    #[test]
    fn quantize_i8_dispatch_equals_the_definition() {
        let mut seed = 9;
        for n in [1usize, 15, 16, 17, 32, 64, 100] {
            for trial in 0..20 {
                let x: Vec<f32> = (0..n)
                    .map(|i| {
                        let u = lcg(&mut seed) as f32 / (1u64 << 31) as f32 - 1.0;
                        // Exact ties and zeros too.
                        match (trial + i) % 9 {
                            0 => 0.0,
                            1 => 0.5 * (i as f32 + 1.0),
                            _ => u * (1.0 + trial as f32),
                        }
                    })
                    .collect();
                let (mut h1, mut l1, mut h2, mut l2) =
                    (vec![0i8; n], vec![0i8; n], vec![0i8; n], vec![0i8; n]);
                let s1 = quantize_i8_scalar(&x, &mut h1, Some(&mut l1));
                let s2 = quantize_i8(&x, &mut h2, Some(&mut l2));
                assert_eq!((s1.to_bits(), &h1, &l1), (s2.to_bits(), &h2, &l2), "n {n}");
                let s2 = quantize_i8(&x, &mut h2, None);
                assert_eq!((s1.to_bits(), &h1), (s2.to_bits(), &h2), "n {n}");
            }
        }
    }
}

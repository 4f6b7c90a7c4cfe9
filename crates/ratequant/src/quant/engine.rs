//! The block-parallel engine every design runs on.
//!
//! A design is a [`Scheme`]: where its groups lie (along a token's channels or along a
//! channel's tokens), an optional clip ratio and an optional Hadamard rotation of each token.
//! The tile is cut into blocks of whole rows, aligned so that every block starts on a byte
//! of the packed codes and (for per-channel groups) on a token group; blocks run in parallel
//! on rayon for large tiles. Each block kernel is compiled once per instruction set
//! ([`Isa`]) from the same source, so LLVM vectorises it for AVX-512 or AVX2 where the CPU has
//! them; the arithmetic is identical in every variant (tests compare them bit for bit).

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::minmax::{self, clip_range, min_max, Grid};
use super::{check_bits, EncodedTile, Kind, TileShape};
use crate::hadamard::fwht_normalized_unchecked;
use crate::pack::{pack_unchecked, packed_len, unpack_unchecked};
use crate::{Error, Result};

/// Where a scheme's groups lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Groups {
    /// Each token's consecutive groups of `group` channels.
    PerToken,
    /// Each channel's consecutive groups of `group` tokens.
    PerChannel,
}

/// One way of quantizing a tile: the grouping, clipping and rotation of a design for one
/// kind (keys or values).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scheme {
    pub groups: Groups,
    /// Group size G (≥ 1).
    pub group: usize,
    /// Shrink each group's min-max range about its midpoint to this ratio and clamp the
    /// values into it before rounding (QuaRot: 0.95). Per-token groups only.
    pub clip_ratio: Option<f32>,
    /// Rotate each token by the normalised Hadamard matrix before quantizing (QuaRot).
    pub rotate: bool,
}

/// Instruction sets the block kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Whatever the build target allows (SSE2 on plain x86-64).
    Baseline,
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest instruction set this CPU supports.
    pub fn detect() -> Isa {
        if has(Isa::Avx512) {
            Isa::Avx512
        } else if has(Isa::Avx2) {
            Isa::Avx2
        } else {
            Isa::Baseline
        }
    }

    /// Every instruction set this CPU supports (for tests comparing the variants).
    #[cfg(test)]
    pub fn available() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| has(isa))
            .collect()
    }
}

fn has(isa: Isa) -> bool {
    match isa {
        Isa::Baseline => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => std::is_x86_feature_detected!("avx2"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx2")
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

/// Defines `$name(isa, args…)`, which runs the `#[inline(always)]` function `$generic`
/// compiled for the requested instruction set (if this CPU has it; baseline otherwise).
macro_rules! isa_variants {
    ($(fn $name:ident = $generic:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {$(
        fn $name(isa: Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic($($arg),*)
                }
                match isa {
                    // SAFETY: `has` checked at run time that the CPU supports the features.
                    Isa::Avx512 if has(Isa::Avx512) => return unsafe { avx512($($arg),*) },
                    Isa::Avx2 if has(Isa::Avx2) => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            let _ = isa;
            $generic($($arg),*)
        }
    )*};
}

/// What went wrong inside a block; turned into an [`Error`] with global positions.
#[derive(Debug, Clone, Copy)]
enum Problem {
    NonFinite,
    /// A group whose zero-point or scale does not fit in f16.
    OutOfF16 {
        token: usize,
        channel: usize,
        lo: f32,
        hi: f32,
    },
}

/// Block sizes aim at this many elements: big enough to amortise scheduling, small enough
/// that a block's scratch codes stay in L1/L2.
const TARGET_BLOCK_ELEMS: usize = 16 * 1024;
/// Tiles smaller than this run on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 64 * 1024;
/// Channels handled together by the per-channel kernels (stack arrays of grids).
const CHANNEL_CHUNK: usize = 64;

/// Parameters a block kernel needs, fixed for one call.
#[derive(Debug, Clone, Copy)]
struct BlockCtx {
    head_dim: usize,
    group: usize,
    bits: u8,
    levels: f32,
    clip_ratio: Option<f32>,
    rotate: bool,
}

impl BlockCtx {
    /// The grid of one group of values, given its min and max.
    #[inline(always)]
    fn grid(
        &self,
        lo: f32,
        hi: f32,
        token: usize,
        channel: usize,
    ) -> std::result::Result<Grid, Problem> {
        let grid = Grid::covering(lo, hi, self.levels);
        if grid.fits_f16() {
            Ok(grid)
        } else {
            Err(Problem::OutOfF16 {
                token,
                channel,
                lo,
                hi,
            })
        }
    }

    /// The grid of a contiguous group (per-token grouping) and, when the scheme clips, the
    /// clipped range its values are clamped into before rounding.
    #[inline(always)]
    fn slice_grid(
        &self,
        values: &[f32],
        token: usize,
        channel: usize,
    ) -> std::result::Result<(Grid, Option<(f32, f32)>), Problem> {
        let (lo, hi, finite) = min_max(values);
        if !finite {
            // Rotated values of a finite row can only be infinite through overflow.
            return Err(if self.rotate {
                Problem::OutOfF16 {
                    token,
                    channel,
                    lo,
                    hi,
                }
            } else {
                Problem::NonFinite
            });
        }
        match self.clip_ratio {
            Some(ratio) => {
                let (lo, hi) = clip_range(lo, hi, ratio);
                Ok((self.grid(lo, hi, token, channel)?, Some((lo, hi))))
            }
            None => Ok((self.grid(lo, hi, token, channel)?, None)),
        }
    }

    /// Copies a token row into `buf` and rotates it (QuaRot's forward transform).
    #[inline(always)]
    fn rotate_into(&self, row: &[f32], buf: &mut [f32]) -> std::result::Result<(), Problem> {
        // finiteness of the original values: `v − v` is NaN exactly for ±inf and NaN
        let mut poison = 0.0f32;
        for (b, &v) in buf.iter_mut().zip(row) {
            *b = v;
            poison += v - v;
        }
        if poison != 0.0 {
            return Err(Problem::NonFinite);
        }
        fwht_normalized_unchecked(buf);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Per-token kernels: groups of `group` consecutive channels of one token.

#[inline(always)]
fn fake_per_token(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    out: &mut [f32],
    row_buf: &mut [f32],
) -> std::result::Result<(), Problem> {
    let d = ctx.head_dim;
    for (r, (src, dst)) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        let token = first_token + r;
        let src = if ctx.rotate {
            ctx.rotate_into(src, row_buf)?;
            &*row_buf
        } else {
            src
        };
        for (g, (s, o)) in src
            .chunks(ctx.group)
            .zip(dst.chunks_mut(ctx.group))
            .enumerate()
        {
            match ctx.slice_grid(s, token, g * ctx.group)? {
                (grid, None) => minmax::fake_slice(s, o, grid, ctx.levels),
                (grid, Some((lo, hi))) => {
                    minmax::fake_slice_clamped(s, o, grid, lo, hi, ctx.levels)
                }
            }
        }
        if ctx.rotate {
            fwht_normalized_unchecked(dst);
        }
    }
    Ok(())
}

#[inline(always)]
fn encode_per_token(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    packed: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u16],
    scratch: &mut Scratch,
) -> std::result::Result<(), Problem> {
    let d = ctx.head_dim;
    let groups_per_row = d.div_ceil(ctx.group);
    let codes = &mut scratch.codes[..x.len()];
    let row_buf = &mut scratch.row[..];
    for (r, (src, row_codes)) in x.chunks_exact(d).zip(codes.chunks_exact_mut(d)).enumerate() {
        let token = first_token + r;
        let src = if ctx.rotate {
            ctx.rotate_into(src, row_buf)?;
            &*row_buf
        } else {
            src
        };
        let row_scales = &mut scales[r * groups_per_row..(r + 1) * groups_per_row];
        let row_zeros = &mut zeros[r * groups_per_row..(r + 1) * groups_per_row];
        for (g, (s, c)) in src
            .chunks(ctx.group)
            .zip(row_codes.chunks_mut(ctx.group))
            .enumerate()
        {
            let (grid, clamp) = ctx.slice_grid(s, token, g * ctx.group)?;
            row_scales[g] = minmax::f16_bits_exact(grid.scale);
            row_zeros[g] = minmax::f16_bits_exact(grid.zero);
            match clamp {
                None => minmax::code_slice(s, c, grid, ctx.levels),
                Some((lo, hi)) => minmax::code_slice_clamped(s, c, grid, lo, hi, ctx.levels),
            }
        }
    }
    pack_unchecked(codes, ctx.bits, packed);
    Ok(())
}

#[inline(always)]
fn decode_per_token(
    ctx: &BlockCtx,
    packed: &[u8],
    scales: &[u16],
    zeros: &[u16],
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let d = ctx.head_dim;
    let groups_per_row = d.div_ceil(ctx.group);
    let codes = &mut scratch.codes[..out.len()];
    unpack_unchecked(packed, ctx.bits, codes);
    for (r, (dst, row_codes)) in out
        .chunks_exact_mut(d)
        .zip(codes.chunks_exact(d))
        .enumerate()
    {
        let row_scales = &scales[r * groups_per_row..(r + 1) * groups_per_row];
        let row_zeros = &zeros[r * groups_per_row..(r + 1) * groups_per_row];
        for (g, (o, c)) in dst
            .chunks_mut(ctx.group)
            .zip(row_codes.chunks(ctx.group))
            .enumerate()
        {
            minmax::value_slice(c, o, Grid::from_f16_bits(row_zeros[g], row_scales[g]));
        }
        if ctx.rotate {
            fwht_normalized_unchecked(dst);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Per-channel kernels: groups of `group` consecutive tokens of one channel. Grids of up to
// CHANNEL_CHUNK channels are held as arrays so the element loops run across channels.

/// Grids of a chunk of channels, structure-of-arrays.
struct ChannelGrids {
    zero: [f32; CHANNEL_CHUNK],
    scale: [f32; CHANNEL_CHUNK],
    inv_scale: [f32; CHANNEL_CHUNK],
}

impl ChannelGrids {
    #[inline(always)]
    fn new() -> Self {
        ChannelGrids {
            zero: [0.0; CHANNEL_CHUNK],
            scale: [0.0; CHANNEL_CHUNK],
            inv_scale: [0.0; CHANNEL_CHUNK],
        }
    }

    #[inline(always)]
    fn set(&mut self, i: usize, grid: Grid) {
        self.zero[i] = grid.zero;
        self.scale[i] = grid.scale;
        self.inv_scale[i] = grid.inv_scale;
    }

    /// Min-max grids of channels `c0..c0+width` over the `rows` rows of `x` (row stride `d`).
    #[inline(always)]
    fn measure(
        &mut self,
        ctx: &BlockCtx,
        x: &[f32],
        c0: usize,
        width: usize,
        first_token: usize,
    ) -> std::result::Result<(), Problem> {
        let mut lo = [f32::INFINITY; CHANNEL_CHUNK];
        let mut hi = [f32::NEG_INFINITY; CHANNEL_CHUNK];
        let mut poison = [0.0f32; CHANNEL_CHUNK];
        for row in x.chunks_exact(ctx.head_dim) {
            let row = &row[c0..c0 + width];
            for (((l, h), p), &v) in lo
                .iter_mut()
                .zip(hi.iter_mut())
                .zip(poison.iter_mut())
                .zip(row)
            {
                *l = if v < *l { v } else { *l };
                *h = if v > *h { v } else { *h };
                *p += v - v;
            }
        }
        if poison[..width].iter().any(|&p| p != 0.0) {
            return Err(Problem::NonFinite);
        }
        for i in 0..width {
            let grid = ctx.grid(lo[i], hi[i], first_token, c0 + i)?;
            self.set(i, grid);
        }
        Ok(())
    }
}

#[inline(always)]
fn fake_per_channel(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    out: &mut [f32],
) -> std::result::Result<(), Problem> {
    let d = ctx.head_dim;
    let mut grids = ChannelGrids::new();
    for (j, (xs, os)) in x
        .chunks(ctx.group * d)
        .zip(out.chunks_mut(ctx.group * d))
        .enumerate()
    {
        let token = first_token + j * ctx.group;
        for c0 in (0..d).step_by(CHANNEL_CHUNK) {
            let width = CHANNEL_CHUNK.min(d - c0);
            grids.measure(ctx, xs, c0, width, token)?;
            for (src, dst) in xs.chunks_exact(d).zip(os.chunks_exact_mut(d)) {
                let lanes = src[c0..c0 + width].iter().zip(&mut dst[c0..c0 + width]);
                for (i, (&v, o)) in lanes.enumerate() {
                    *o = minmax::fake(
                        v,
                        grids.zero[i],
                        grids.scale[i],
                        grids.inv_scale[i],
                        ctx.levels,
                    );
                }
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn encode_per_channel(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    packed: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u16],
    scratch: &mut Scratch,
) -> std::result::Result<(), Problem> {
    let d = ctx.head_dim;
    let codes = &mut scratch.codes[..x.len()];
    let mut grids = ChannelGrids::new();
    for (j, (xs, cs)) in x
        .chunks(ctx.group * d)
        .zip(codes.chunks_mut(ctx.group * d))
        .enumerate()
    {
        let token = first_token + j * ctx.group;
        for c0 in (0..d).step_by(CHANNEL_CHUNK) {
            let width = CHANNEL_CHUNK.min(d - c0);
            grids.measure(ctx, xs, c0, width, token)?;
            for i in 0..width {
                scales[j * d + c0 + i] = minmax::f16_bits_exact(grids.scale[i]);
                zeros[j * d + c0 + i] = minmax::f16_bits_exact(grids.zero[i]);
            }
            for (src, dst) in xs.chunks_exact(d).zip(cs.chunks_exact_mut(d)) {
                let lanes = src[c0..c0 + width].iter().zip(&mut dst[c0..c0 + width]);
                for (i, (&v, c)) in lanes.enumerate() {
                    *c = minmax::code(v, grids.zero[i], grids.inv_scale[i], ctx.levels);
                }
            }
        }
    }
    pack_unchecked(codes, ctx.bits, packed);
    Ok(())
}

#[inline(always)]
fn decode_per_channel(
    ctx: &BlockCtx,
    packed: &[u8],
    scales: &[u16],
    zeros: &[u16],
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let d = ctx.head_dim;
    let codes = &mut scratch.codes[..out.len()];
    unpack_unchecked(packed, ctx.bits, codes);
    let mut grids = ChannelGrids::new();
    for (j, (os, cs)) in out
        .chunks_mut(ctx.group * d)
        .zip(codes.chunks(ctx.group * d))
        .enumerate()
    {
        for c0 in (0..d).step_by(CHANNEL_CHUNK) {
            let width = CHANNEL_CHUNK.min(d - c0);
            for i in 0..width {
                grids.set(
                    i,
                    Grid::from_f16_bits(zeros[j * d + c0 + i], scales[j * d + c0 + i]),
                );
            }
            for (dst, src) in os.chunks_exact_mut(d).zip(cs.chunks_exact(d)) {
                let lanes = src[c0..c0 + width].iter().zip(&mut dst[c0..c0 + width]);
                for (i, (&c, o)) in lanes.enumerate() {
                    *o = minmax::value(c, grids.zero[i], grids.scale[i]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// One entry point per operation, dispatching on the grouping, compiled per instruction set.

#[inline(always)]
fn fake_block(
    ctx: &BlockCtx,
    groups: Groups,
    first_token: usize,
    x: &[f32],
    out: &mut [f32],
    scratch: &mut Scratch,
) -> std::result::Result<(), Problem> {
    match groups {
        Groups::PerToken => fake_per_token(ctx, first_token, x, out, &mut scratch.row),
        Groups::PerChannel => fake_per_channel(ctx, first_token, x, out),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn encode_block(
    ctx: &BlockCtx,
    groups: Groups,
    first_token: usize,
    x: &[f32],
    packed: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u16],
    scratch: &mut Scratch,
) -> std::result::Result<(), Problem> {
    match groups {
        Groups::PerToken => encode_per_token(ctx, first_token, x, packed, scales, zeros, scratch),
        Groups::PerChannel => {
            encode_per_channel(ctx, first_token, x, packed, scales, zeros, scratch)
        }
    }
}

#[inline(always)]
fn decode_block(
    ctx: &BlockCtx,
    groups: Groups,
    packed: &[u8],
    scales: &[u16],
    zeros: &[u16],
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    match groups {
        Groups::PerToken => decode_per_token(ctx, packed, scales, zeros, out, scratch),
        Groups::PerChannel => decode_per_channel(ctx, packed, scales, zeros, out, scratch),
    }
}

isa_variants! {
    fn fake_block_isa = fake_block(
        ctx: &BlockCtx, groups: Groups, first_token: usize, x: &[f32], out: &mut [f32], scratch: &mut Scratch,
    ) -> std::result::Result<(), Problem>;
    fn encode_block_isa = encode_block(
        ctx: &BlockCtx, groups: Groups, first_token: usize, x: &[f32], packed: &mut [u8],
        scales: &mut [u16], zeros: &mut [u16], scratch: &mut Scratch,
    ) -> std::result::Result<(), Problem>;
    fn decode_block_isa = decode_block(
        ctx: &BlockCtx, groups: Groups, packed: &[u8], scales: &[u16], zeros: &[u16], out: &mut [f32],
        scratch: &mut Scratch,
    ) -> ();
}

/// Per-worker buffers: unpacked codes of one block and one rotated token row.
struct Scratch {
    codes: Vec<u8>,
    row: Vec<f32>,
}

/// Runs `task` over `tasks`, on rayon when `parallel`, each worker with its own scratch;
/// returns the first problem (in block order when serial, any when parallel).
fn run_blocks<T: Send>(
    tasks: Vec<T>,
    parallel: bool,
    scratch: impl Fn() -> Scratch + Sync + Send,
    task: impl Fn(&mut Scratch, T) -> std::result::Result<(), Problem> + Sync + Send,
) -> std::result::Result<(), Problem> {
    if parallel {
        tasks.into_par_iter().try_for_each_init(scratch, task)
    } else {
        let mut s = scratch();
        tasks.into_iter().try_for_each(|t| task(&mut s, t))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Scheme {
    /// Number of groups (= scales = zero-points) of a tile.
    pub fn num_groups(&self, shape: TileShape) -> usize {
        match self.groups {
            Groups::PerToken => shape.tokens * shape.head_dim.div_ceil(self.group),
            Groups::PerChannel => shape.tokens.div_ceil(self.group) * shape.head_dim,
        }
    }

    /// Scale and zero-point bits per element, counting partial groups exactly.
    pub fn metadata_bits_per_element(&self, shape: TileShape) -> f64 {
        if shape.is_empty() {
            return 0.0;
        }
        (32 * self.num_groups(shape)) as f64 / shape.len() as f64
    }

    /// Rows per block: whole token groups (per-channel), and a multiple of 8 elements so
    /// that every block's packed codes start on a byte.
    fn block_rows(&self, shape: TileShape) -> usize {
        let byte_aligned = 8 / gcd(shape.head_dim, 8);
        let unit = match self.groups {
            Groups::PerToken => byte_aligned,
            Groups::PerChannel => self.group / gcd(self.group, byte_aligned) * byte_aligned,
        };
        unit * (TARGET_BLOCK_ELEMS / (unit * shape.head_dim)).max(1)
    }

    /// Groups covered by `rows` whole rows starting on a block boundary.
    fn groups_in_rows(&self, rows: usize, head_dim: usize) -> usize {
        self.num_groups(TileShape {
            tokens: rows,
            head_dim,
        })
    }

    fn ctx(&self, shape: TileShape, bits: u8) -> BlockCtx {
        BlockCtx {
            head_dim: shape.head_dim,
            group: self.group,
            bits,
            levels: minmax::levels(bits),
            clip_ratio: self.clip_ratio,
            rotate: self.rotate,
        }
    }

    fn scratch_maker(
        &self,
        shape: TileShape,
        rows: usize,
        codes: bool,
    ) -> impl Fn() -> Scratch + Sync + Send {
        let code_len = if codes { rows * shape.head_dim } else { 0 };
        let row_len = if self.rotate { shape.head_dim } else { 0 };
        move || Scratch {
            codes: vec![0; code_len],
            row: vec![0.0; row_len],
        }
    }

    pub fn fake_quantize(
        &self,
        x: &[f32],
        shape: TileShape,
        bits: u8,
        out: &mut [f32],
    ) -> Result<()> {
        self.fake_quantize_isa(Isa::detect(), x, shape, bits, out)
    }

    pub(crate) fn fake_quantize_isa(
        &self,
        isa: Isa,
        x: &[f32],
        shape: TileShape,
        bits: u8,
        out: &mut [f32],
    ) -> Result<()> {
        check_bits(bits)?;
        check_tile(shape, x.len(), "input")?;
        check_tile(shape, out.len(), "output")?;
        let rows = self.block_rows(shape);
        let block = rows * shape.head_dim;
        let ctx = self.ctx(shape, bits);
        let tasks: Vec<_> = x
            .chunks(block)
            .zip(out.chunks_mut(block))
            .enumerate()
            .collect();
        run_blocks(
            tasks,
            x.len() >= PARALLEL_MIN_ELEMS,
            self.scratch_maker(shape, rows, false),
            |scratch, (b, (xb, ob))| {
                fake_block_isa(isa, &ctx, self.groups, b * rows, xb, ob, scratch)
            },
        )
        .map_err(|p| problem_error(p, x, shape, bits))
    }

    pub fn encode(&self, x: &[f32], shape: TileShape, kind: Kind, bits: u8) -> Result<EncodedTile> {
        self.encode_isa(Isa::detect(), x, shape, kind, bits)
    }

    pub(crate) fn encode_isa(
        &self,
        isa: Isa,
        x: &[f32],
        shape: TileShape,
        kind: Kind,
        bits: u8,
    ) -> Result<EncodedTile> {
        check_bits(bits)?;
        check_tile(shape, x.len(), "input")?;
        let n_groups = self.num_groups(shape);
        let mut codes = vec![0u8; packed_len(x.len(), bits)];
        let mut scales = vec![half::f16::ZERO; n_groups];
        let mut zeros = vec![half::f16::ZERO; n_groups];
        let rows = self.block_rows(shape);
        let block = rows * shape.head_dim;
        let block_bytes = block * bits as usize / 8;
        let block_groups = self.groups_in_rows(rows, shape.head_dim);
        let ctx = self.ctx(shape, bits);
        let tasks: Vec<_> = x
            .chunks(block)
            .zip(codes.chunks_mut(block_bytes))
            .zip(scales.reinterpret_cast_mut().chunks_mut(block_groups))
            .zip(zeros.reinterpret_cast_mut().chunks_mut(block_groups))
            .enumerate()
            .collect();
        run_blocks(
            tasks,
            x.len() >= PARALLEL_MIN_ELEMS,
            self.scratch_maker(shape, rows, true),
            |scratch, (b, (((xb, cb), sb), zb))| {
                encode_block_isa(isa, &ctx, self.groups, b * rows, xb, cb, sb, zb, scratch)
            },
        )
        .map_err(|p| problem_error(p, x, shape, bits))?;
        Ok(EncodedTile {
            shape,
            kind,
            bits,
            codes,
            scales,
            zeros,
        })
    }

    pub fn decode(&self, enc: &EncodedTile, out: &mut [f32]) -> Result<()> {
        self.decode_isa(Isa::detect(), enc, out)
    }

    pub(crate) fn decode_isa(&self, isa: Isa, enc: &EncodedTile, out: &mut [f32]) -> Result<()> {
        let shape = enc.shape;
        check_bits(enc.bits)?;
        check_tile(shape, out.len(), "output")?;
        self.check_encoded(enc)?;
        let rows = self.block_rows(shape);
        let block = rows * shape.head_dim;
        let block_bytes = block * enc.bits as usize / 8;
        let block_groups = self.groups_in_rows(rows, shape.head_dim);
        let ctx = self.ctx(shape, enc.bits);
        let parallel = out.len() >= PARALLEL_MIN_ELEMS;
        let tasks: Vec<_> = enc
            .codes
            .chunks(block_bytes)
            .zip(enc.scales.reinterpret_cast().chunks(block_groups))
            .zip(enc.zeros.reinterpret_cast().chunks(block_groups))
            .zip(out.chunks_mut(block))
            .collect();
        run_blocks(
            tasks,
            parallel,
            self.scratch_maker(shape, rows, true),
            |scratch, (((cb, sb), zb), ob)| {
                decode_block_isa(isa, &ctx, self.groups, cb, sb, zb, ob, scratch);
                Ok(())
            },
        )
        .map_err(|p| problem_error(p, &[], shape, enc.bits))
    }

    /// Lengths and metadata of an encoded tile, so that decoding cannot go wrong.
    fn check_encoded(&self, enc: &EncodedTile) -> Result<()> {
        let shape = enc.shape;
        let want_bytes = packed_len(shape.len(), enc.bits);
        if enc.codes.len() != want_bytes {
            return Err(Error::invalid(format!(
                "encoded tile {shape} at {} bits needs {want_bytes} code bytes, has {}",
                enc.bits,
                enc.codes.len()
            )));
        }
        let want_groups = self.num_groups(shape);
        if enc.scales.len() != want_groups || enc.zeros.len() != want_groups {
            return Err(Error::invalid(format!(
                "encoded tile {shape} needs {want_groups} scales and zero-points, has {} and {}",
                enc.scales.len(),
                enc.zeros.len()
            )));
        }
        if let Some(i) = enc
            .scales
            .iter()
            .position(|s| s.is_sign_negative() || !s.is_finite())
        {
            return Err(Error::invalid(format!(
                "encoded tile: scale {i} is {} (must be finite and ≥ 0)",
                enc.scales[i]
            )));
        }
        if let Some(i) = enc.zeros.iter().position(|z| !z.is_finite()) {
            return Err(Error::invalid(format!(
                "encoded tile: zero-point {i} is {} (must be finite)",
                enc.zeros[i]
            )));
        }
        Ok(())
    }
}

/// Checks a tile's shape is non-empty and matches a buffer's length.
pub(crate) fn check_tile(shape: TileShape, len: usize, what: &str) -> Result<()> {
    if shape.is_empty() {
        return Err(Error::invalid(format!(
            "empty tile {shape}: tokens and head_dim must both be at least 1"
        )));
    }
    if len != shape.len() {
        return Err(Error::invalid(format!(
            "{what} has {len} values but a tile of shape {shape} has {}",
            shape.len()
        )));
    }
    Ok(())
}

/// Turns a block's problem into an error naming the element or group.
fn problem_error(problem: Problem, x: &[f32], shape: TileShape, bits: u8) -> Error {
    match problem {
        Problem::NonFinite => match x.iter().position(|v| !v.is_finite()) {
            Some(i) => Error::invalid(format!(
                "non-finite value {} at element {i} (token {}, channel {}) of tile {shape}",
                x[i],
                i / shape.head_dim,
                i % shape.head_dim
            )),
            None => Error::invalid(format!("non-finite value in tile {shape}")),
        },
        Problem::OutOfF16 {
            token,
            channel,
            lo,
            hi,
        } => Error::invalid(format!(
            "group at token {token}, channel {channel} of tile {shape} spans [{lo}, {hi}], which \
             f16 zero-points and scales cannot represent at {bits} bits (|values| ≤ 65504, \
             range / (2^bits − 1) ≤ 65504)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // a few outliers and repeated values, as in real K/V
                if i % 97 == 0 {
                    u * 40.0
                } else if i % 13 == 0 {
                    0.25
                } else {
                    u * (1.0 + (i % 7) as f32)
                }
            })
            .collect()
    }

    fn schemes() -> Vec<Scheme> {
        let per_token = |group| Scheme {
            groups: Groups::PerToken,
            group,
            clip_ratio: None,
            rotate: false,
        };
        vec![
            per_token(32),
            per_token(128),
            per_token(24),
            Scheme {
                groups: Groups::PerChannel,
                group: 32,
                clip_ratio: None,
                rotate: false,
            },
            Scheme {
                groups: Groups::PerChannel,
                group: 5,
                clip_ratio: None,
                rotate: false,
            },
            Scheme {
                groups: Groups::PerToken,
                group: 128,
                clip_ratio: Some(0.95),
                rotate: true,
            },
            Scheme {
                groups: Groups::PerToken,
                group: 32,
                clip_ratio: Some(0.95),
                rotate: true,
            },
        ]
    }

    fn bits_of(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every instruction-set variant gives the baseline's bits, serial and parallel tiles alike.
    #[test]
    fn instruction_set_variants_agree_with_baseline() {
        let isas = Isa::available();
        eprintln!("instruction sets compared: {isas:?}");
        for (tokens, head_dim) in [(37usize, 128usize), (1030, 128), (9, 64), (700, 64)] {
            let shape = TileShape::new(tokens, head_dim);
            let x = data(shape.len(), (tokens * head_dim) as u64);
            for scheme in schemes() {
                for bits in 1..=8u8 {
                    let mut base_fake = vec![0.0; x.len()];
                    scheme
                        .fake_quantize_isa(Isa::Baseline, &x, shape, bits, &mut base_fake)
                        .unwrap();
                    let base_enc = scheme
                        .encode_isa(Isa::Baseline, &x, shape, Kind::K, bits)
                        .unwrap();
                    let mut base_dec = vec![0.0; x.len()];
                    scheme
                        .decode_isa(Isa::Baseline, &base_enc, &mut base_dec)
                        .unwrap();
                    assert_eq!(
                        bits_of(&base_fake),
                        bits_of(&base_dec),
                        "{scheme:?} {shape} b={bits}"
                    );
                    for &isa in &isas[1..] {
                        let mut fake = vec![0.0; x.len()];
                        scheme
                            .fake_quantize_isa(isa, &x, shape, bits, &mut fake)
                            .unwrap();
                        assert_eq!(
                            bits_of(&fake),
                            bits_of(&base_fake),
                            "{isa:?} {scheme:?} {shape} b={bits}"
                        );
                        let enc = scheme.encode_isa(isa, &x, shape, Kind::K, bits).unwrap();
                        assert_eq!(enc, base_enc, "{isa:?} {scheme:?} {shape} b={bits}");
                        let mut dec = vec![0.0; x.len()];
                        scheme.decode_isa(isa, &base_enc, &mut dec).unwrap();
                        assert_eq!(
                            bits_of(&dec),
                            bits_of(&base_dec),
                            "{isa:?} {scheme:?} {shape} b={bits}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn blocks_are_byte_aligned_and_whole_token_groups() {
        for head_dim in [1usize, 3, 6, 64, 100, 128] {
            for scheme in schemes() {
                let shape = TileShape::new(1000, head_dim);
                let rows = scheme.block_rows(shape);
                assert_eq!(rows * head_dim % 8, 0, "{scheme:?} d={head_dim}");
                if scheme.groups == Groups::PerChannel {
                    assert_eq!(rows % scheme.group, 0, "{scheme:?} d={head_dim}");
                }
            }
        }
    }
}

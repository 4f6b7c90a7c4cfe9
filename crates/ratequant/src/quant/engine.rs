//! The block-parallel engine every design runs on.
//!
//! A design is a [`Scheme`]: where its groups lie (along a token's channels or along a
//! channel's tokens), an optional clip ratio and an optional Hadamard rotation of each token.
//! The tile is cut into blocks of whole rows, aligned so that every block starts on a byte
//! of the packed codes and (for per-channel groups) on a token group; blocks run in parallel
//! on rayon for large tiles. Each block kernel is compiled twice from the same source
//! ([`Isa`]): for the build target, and with AVX2 enabled (chosen at run time), where it also
//! calls the hand-written AVX2 range kernels of `minmax::avx2` and, when head_dim is a
//! multiple of 8, encodes with the fused quantize-and-pack kernel of `fused::avx2` instead of
//! coding into bytes and packing them; the results are identical in both (tests compare them
//! bit for bit). There is no AVX-512 variant: the development machine has no AVX-512 to test
//! one on.

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::fused::avx2::Packer;
use super::minmax::{self, clip_range, column_min_max, Grid, RowGrids};
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
    /// AVX2: the kernels autovectorised for 256-bit vectors, plus hand-written range kernels.
    Avx2,
}

impl Isa {
    /// The widest instruction set this CPU supports.
    pub fn detect() -> Isa {
        if has(Isa::Avx2) {
            Isa::Avx2
        } else {
            Isa::Baseline
        }
    }

    /// Every instruction set this CPU supports (for tests comparing the variants).
    #[cfg(test)]
    pub fn available() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2]
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
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

/// Defines `$name(isa, args…)`, which runs the `#[inline(always)]` function `$generic` compiled
/// for the requested instruction set if this CPU has it (baseline otherwise). The generic
/// function's `const AVX2: bool` parameter says whether it may call the hand-written AVX2
/// kernels of `minmax::avx2`.
macro_rules! isa_variants {
    ($(fn $name:ident = $generic:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty;)*) => {$(
        #[allow(clippy::too_many_arguments)]
        fn $name(isa: Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $generic::<true>($($arg),*)
                }
                if isa == Isa::Avx2 && has(Isa::Avx2) {
                    // SAFETY: `has` checked at run time that the CPU supports AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = isa;
            $generic::<false>($($arg),*)
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

type Outcome = std::result::Result<(), Problem>;

/// Block sizes aim at this many elements: big enough to amortise scheduling, small enough
/// that a block's codes and rotated copy stay in L2.
const TARGET_BLOCK_ELEMS: usize = 16 * 1024;
/// Tiles smaller than this run on the calling thread.
const PARALLEL_MIN_ELEMS: usize = 64 * 1024;
/// Channels the per-channel kernels handle together, their ranges and grids held in
/// registers while the kernel walks down the token group.
const CHANNEL_LANES: usize = 16;

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
    fn groups_per_row(&self) -> usize {
        self.head_dim.div_ceil(self.group)
    }
}

/// Per-worker buffers, sized for one block.
struct Scratch {
    /// Unpacked codes of the block; grown on first use (the fused AVX2 encoders need none).
    codes: Vec<u8>,
    /// The block's rotated token vectors (QuaRot).
    rotated: Vec<f32>,
    /// Per-token groups of the block.
    groups: GroupArrays,
    /// Grids of the row being processed, one per channel.
    row: RowGrids,
    /// Per-token groups: the group (within its row) of each run of 8 channels, for the
    /// fused AVX2 encoder when the group size is a multiple of 8.
    run_group: Vec<usize>,
}

/// The first `n` bytes of `buf`, grown with zeros to that length if shorter.
fn grown(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    &mut buf[..n]
}

/// Range and grid of every per-token group of a block, structure-of-arrays so that the grids
/// are computed in one vectorised loop.
struct GroupArrays {
    lo: Vec<f32>,
    hi: Vec<f32>,
    zero: Vec<f32>,
    scale: Vec<f32>,
    inv_scale: Vec<f32>,
}

impl GroupArrays {
    fn new(n: usize) -> Self {
        GroupArrays {
            lo: vec![0.0; n],
            hi: vec![0.0; n],
            zero: vec![0.0; n],
            scale: vec![0.0; n],
            inv_scale: vec![0.0; n],
        }
    }

    #[inline(always)]
    fn grid(&self, k: usize) -> Grid {
        Grid {
            zero: self.zero[k],
            scale: self.scale[k],
            inv_scale: self.inv_scale[k],
        }
    }
}

/// Copies rows into `rotated` and rotates each (QuaRot's forward transform); fails on a
/// non-finite original value.
#[inline(always)]
fn rotate_rows(x: &[f32], head_dim: usize, rotated: &mut [f32]) -> Outcome {
    // `v·0` is ±0 for finite v and NaN for ±inf/NaN; NaN is sticky under addition.
    let mut poison = 0.0f32;
    for (b, &v) in rotated.iter_mut().zip(x) {
        *b = v;
        poison += v * 0.0;
    }
    if poison != 0.0 {
        return Err(Problem::NonFinite);
    }
    for row in rotated.chunks_exact_mut(head_dim) {
        fwht_normalized_unchecked(row);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Per-token kernels: groups of `group` consecutive channels of one token. Pass 1 measures
// every group's range, pass 2 turns all ranges into grids at once, pass 3 rounds.

/// Passes 1 and 2: the range (QuaRot: clipped) and grid of every group of the rows in `src`.
#[inline(always)]
fn per_token_grids<const AVX2: bool>(
    ctx: &BlockCtx,
    first_token: usize,
    src: &[f32],
    ga: &mut GroupArrays,
) -> Outcome {
    let (finite, fits) = per_token_grids_at::<AVX2>(ctx, src, ga, 0);
    if finite && fits {
        Ok(())
    } else {
        Err(per_token_problem(ctx, first_token, src, ga, finite))
    }
}

/// Ranges (QuaRot: clipped) and grids of the groups of the rows `src`, whose first group is
/// group `k0` of the block; whether every value is finite and every grid fits f16 (with a
/// non-finite value the grids are meaningless).
#[inline(always)]
fn per_token_grids_at<const AVX2: bool>(
    ctx: &BlockCtx,
    src: &[f32],
    ga: &mut GroupArrays,
    k0: usize,
) -> (bool, bool) {
    let d = ctx.head_dim;
    let per_row = ctx.groups_per_row();
    let n = src.len() / d * per_row;
    let (lo, hi) = (&mut ga.lo[k0..k0 + n], &mut ga.hi[k0..k0 + n]);
    let finite = if d.is_multiple_of(ctx.group) {
        // whole groups tile the rows: the rows are one run of equal groups
        minmax::group_ranges::<AVX2>(src, ctx.group, lo, hi)
    } else {
        let mut finite = true;
        for (row, (row_lo, row_hi)) in src.chunks_exact(d).zip(
            lo.chunks_exact_mut(per_row)
                .zip(hi.chunks_exact_mut(per_row)),
        ) {
            finite &= minmax::group_ranges::<AVX2>(row, ctx.group, row_lo, row_hi);
        }
        finite
    };
    if let Some(ratio) = ctx.clip_ratio {
        for (l, h) in lo.iter_mut().zip(hi.iter_mut()) {
            (*l, *h) = clip_range(*l, *h, ratio);
        }
    }
    let fits = minmax::grids_of_ranges(
        lo,
        hi,
        ctx.levels,
        &mut ga.zero[k0..k0 + n],
        &mut ga.scale[k0..k0 + n],
        &mut ga.inv_scale[k0..k0 + n],
    );
    (finite, fits)
}

/// What is wrong with a per-token block whose values are not all finite, or else whose
/// grids do not all fit f16 (`ga` holding the block's grids).
#[cold]
fn per_token_problem(
    ctx: &BlockCtx,
    first_token: usize,
    src: &[f32],
    ga: &GroupArrays,
    finite: bool,
) -> Problem {
    let d = ctx.head_dim;
    let per_row = ctx.groups_per_row();
    if !finite {
        if !ctx.rotate {
            return Problem::NonFinite;
        }
        // Rotated values of a finite row can only be non-finite through overflow.
        let r = src
            .chunks_exact(d)
            .position(|row| row.iter().any(|v| !v.is_finite()))
            .unwrap_or(0);
        return Problem::OutOfF16 {
            token: first_token + r,
            channel: 0,
            lo: f32::NEG_INFINITY,
            hi: f32::INFINITY,
        };
    }
    let n = src.len() / d * per_row;
    let k = (0..n).find(|&k| !ga.grid(k).fits_f16()).unwrap_or(0);
    Problem::OutOfF16 {
        token: first_token + k / per_row,
        channel: (k % per_row) * ctx.group,
        lo: ga.lo[k],
        hi: ga.hi[k],
    }
}

/// Spreads the grids of row `r`'s groups over the row's channels.
#[inline(always)]
fn fill_row_grids(ctx: &BlockCtx, ga: &GroupArrays, r: usize, row: &mut RowGrids) {
    let per_row = ctx.groups_per_row();
    for g in 0..per_row {
        let k = r * per_row + g;
        let (start, end) = (g * ctx.group, ((g + 1) * ctx.group).min(ctx.head_dim));
        row.fill(start, end, ga.grid(k), ga.lo[k], ga.hi[k]);
    }
}

/// The source rows of a per-token block: `x` itself, or its rotation in `rotated`.
#[inline(always)]
fn per_token_source<'a>(
    ctx: &BlockCtx,
    x: &'a [f32],
    rotated: &'a mut [f32],
) -> std::result::Result<&'a [f32], Problem> {
    if ctx.rotate {
        let rotated = &mut rotated[..x.len()];
        rotate_rows(x, ctx.head_dim, rotated)?;
        Ok(rotated)
    } else {
        Ok(x)
    }
}

#[inline(always)]
fn fake_per_token<const AVX2: bool>(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    out: &mut [f32],
    scratch: &mut Scratch,
) -> Outcome {
    let src = per_token_source(ctx, x, &mut scratch.rotated)?;
    let (ga, grids) = (&mut scratch.groups, &mut scratch.row);
    per_token_grids::<AVX2>(ctx, first_token, src, ga)?;
    for (r, (row, dst)) in src
        .chunks_exact(ctx.head_dim)
        .zip(out.chunks_exact_mut(ctx.head_dim))
        .enumerate()
    {
        fill_row_grids(ctx, ga, r, grids);
        if ctx.clip_ratio.is_some() {
            minmax::fake_row_clamped(row, dst, grids, ctx.levels);
        } else {
            minmax::fake_row(row, dst, grids, ctx.levels);
        }
        if ctx.rotate {
            fwht_normalized_unchecked(dst);
        }
    }
    Ok(())
}

#[inline(always)]
fn encode_per_token<const AVX2: bool>(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    packed: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u16],
    scratch: &mut Scratch,
) -> Outcome {
    let src = per_token_source(ctx, x, &mut scratch.rotated)?;
    let (ga, grids) = (&mut scratch.groups, &mut scratch.row);
    let mut fused = false;
    #[cfg(target_arch = "x86_64")]
    if AVX2 && ctx.head_dim.is_multiple_of(8) {
        // SAFETY: AVX2 = true is only instantiated after detecting AVX2 at run time.
        let (finite, fits) =
            unsafe { encode_per_token_avx2(ctx, src, ga, grids, &scratch.run_group, packed) };
        if !(finite && fits) {
            return Err(per_token_problem(ctx, first_token, src, ga, finite));
        }
        fused = true;
    }
    if !fused {
        per_token_grids::<AVX2>(ctx, first_token, src, ga)?;
    }
    let n = scales.len();
    for (((s, z), &scale), &zero) in scales
        .iter_mut()
        .zip(zeros.iter_mut())
        .zip(&ga.scale[..n])
        .zip(&ga.zero[..n])
    {
        (*s, *z) = (minmax::f16_bits_exact(scale), minmax::f16_bits_exact(zero));
    }
    if fused {
        return Ok(());
    }
    let codes = grown(&mut scratch.codes, x.len());
    for (r, (row, row_codes)) in src
        .chunks_exact(ctx.head_dim)
        .zip(codes.chunks_exact_mut(ctx.head_dim))
        .enumerate()
    {
        fill_row_grids(ctx, ga, r, grids);
        if ctx.clip_ratio.is_some() {
            minmax::code_row_clamped(row, row_codes, grids, ctx.levels);
        } else {
            minmax::code_row(row, row_codes, grids, ctx.levels);
        }
    }
    pack_unchecked::<AVX2>(codes, ctx.bits, packed);
    Ok(())
}

/// Rows a step of the fused per-token encoder aims at, in values: its rows are read from
/// memory for their ranges, then coded from L1 while the next step's rows are prefetched.
const STEP_ELEMS: usize = 4096;

/// Ranges, grids, codes and packed bytes of per-token rows (head_dim a multiple of 8, so that
/// every row starts on a byte), a few rows at a time so that the coding pass reads from L1;
/// returns whether every value is finite and every grid fits f16, as [`per_token_grids_at`].
/// Each run of 8 channels lies in one group when the group size is a multiple of 8, and takes
/// that group's grid by broadcast; otherwise each row's grids are spread over its channels
/// first and loaded per element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn encode_per_token_avx2(
    ctx: &BlockCtx,
    src: &[f32],
    ga: &mut GroupArrays,
    grids: &mut RowGrids,
    run_group: &[usize],
    packed: &mut [u8],
) -> (bool, bool) {
    use super::fused::avx2::{code_pack_rows, Grid8};
    let (d, bits, levels) = (ctx.head_dim, ctx.bits, ctx.levels);
    let per_row = ctx.groups_per_row();
    let clamp = ctx.clip_ratio.is_some();
    let packer = Packer::new(bits);
    let step_rows = (STEP_ELEMS / d).max(1);
    let step = step_rows * d;
    let row_bytes = d * bits as usize / 8;
    let (mut finite, mut fits) = (true, true);
    for (i, (rows, out)) in src
        .chunks(step)
        .zip(packed.chunks_mut(step_rows * row_bytes))
        .enumerate()
    {
        let (r0, k0) = (i * step_rows, i * step_rows * per_row);
        let (ok, fit) = per_token_grids_at::<true>(ctx, rows, ga, k0);
        (finite, fits) = (finite & ok, fits & fit);
        let ahead = src.get((i + 1) * step..).unwrap_or(&[]);
        let ga: &GroupArrays = ga;
        if ctx.group.is_multiple_of(8) {
            let grid = |r: usize, q: usize| {
                let k = k0 + r * per_row + run_group[q];
                Grid8::splat(ga.zero[k], ga.inv_scale[k], ga.lo[k], ga.hi[k])
            };
            // runs of 32 lie in one group when groups of a multiple of 32 tile the rows
            let run32 = ctx.group.is_multiple_of(32) && d.is_multiple_of(ctx.group);
            match (clamp, run32) {
                (false, false) => {
                    code_pack_rows::<false, false>(&packer, rows, d, levels, grid, ahead, out)
                }
                (false, true) => {
                    code_pack_rows::<false, true>(&packer, rows, d, levels, grid, ahead, out)
                }
                (true, false) => {
                    code_pack_rows::<true, false>(&packer, rows, d, levels, grid, ahead, out)
                }
                (true, true) => {
                    code_pack_rows::<true, true>(&packer, rows, d, levels, grid, ahead, out)
                }
            }
            continue;
        }
        for (r, (row, row_out)) in rows
            .chunks_exact(d)
            .zip(out.chunks_exact_mut(row_bytes))
            .enumerate()
        {
            fill_row_grids(ctx, ga, r0 + r, grids);
            let g: &RowGrids = grids;
            let ahead = ahead.get(r * d..).unwrap_or(&[]);
            if clamp {
                let grid = |_, q| Grid8::load(&g.zero, &g.inv_scale, Some((&g.lo, &g.hi)), 8 * q);
                code_pack_rows::<true, false>(&packer, row, d, levels, grid, ahead, row_out);
            } else {
                let grid = |_, q| Grid8::load(&g.zero, &g.inv_scale, None, 8 * q);
                code_pack_rows::<false, false>(&packer, row, d, levels, grid, ahead, row_out);
            }
        }
    }
    (finite, fits)
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
    let codes = grown(&mut scratch.codes, out.len());
    unpack_unchecked(packed, ctx.bits, codes);
    let n = scales.len();
    let (ga, grids) = (&mut scratch.groups, &mut scratch.row);
    for (((z, s), &zero), &scale) in ga.zero[..n]
        .iter_mut()
        .zip(ga.scale[..n].iter_mut())
        .zip(zeros)
        .zip(scales)
    {
        (*z, *s) = (
            minmax::f16_bits_to_f32(zero),
            minmax::f16_bits_to_f32(scale),
        );
    }
    for (r, (dst, row_codes)) in out
        .chunks_exact_mut(ctx.head_dim)
        .zip(codes.chunks_exact(ctx.head_dim))
        .enumerate()
    {
        fill_row_grids(ctx, ga, r, grids);
        minmax::value_row(row_codes, dst, grids);
        if ctx.rotate {
            fwht_normalized_unchecked(dst);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Per-channel kernels: groups of `group` consecutive tokens of one channel. `W` channels at a
// time (CHANNEL_LANES, then single channels for a remainder): their ranges and grids are
// fixed-size arrays that live in vector registers while the kernel walks down the rows.

/// Grids of every channel over one token group `xs`: the ranges of CHANNEL_LANES channels at
/// a time (then one at a time for a remainder) into `grids.lo`/`grids.hi`, then all grids in
/// one vectorised loop. On a problem the channels are gone through again in order, so that
/// the problem reported is that of the first offending channel, as a channel-by-channel
/// pass would find it.
#[inline(always)]
fn token_group_grids<const AVX2: bool>(
    ctx: &BlockCtx,
    xs: &[f32],
    token: usize,
    grids: &mut RowGrids,
) -> Outcome {
    let d = ctx.head_dim;
    let mut finite = true;
    let mut c0 = 0;
    while c0 + CHANNEL_LANES <= d {
        let (lo, hi, ok) = column_min_max::<CHANNEL_LANES, AVX2>(xs, d, c0);
        grids.lo[c0..c0 + CHANNEL_LANES].copy_from_slice(&lo);
        grids.hi[c0..c0 + CHANNEL_LANES].copy_from_slice(&hi);
        finite &= ok;
        c0 += CHANNEL_LANES;
    }
    while c0 < d {
        let (lo, hi, ok) = column_min_max::<1, AVX2>(xs, d, c0);
        (grids.lo[c0], grids.hi[c0]) = (lo[0], hi[0]);
        finite &= ok;
        c0 += 1;
    }
    let fits = minmax::grids_of_ranges(
        &grids.lo,
        &grids.hi,
        ctx.levels,
        &mut grids.zero,
        &mut grids.scale,
        &mut grids.inv_scale,
    );
    if finite && fits {
        return Ok(());
    }
    // Only on failure: go through the batches again in order, each reporting its non-finite
    // values before any misfit among its channels.
    let mut c0 = 0;
    while c0 < d {
        let (w, ok) = if c0 + CHANNEL_LANES <= d {
            let (_, _, ok) = column_min_max::<CHANNEL_LANES, AVX2>(xs, d, c0);
            (CHANNEL_LANES, ok)
        } else {
            let (_, _, ok) = column_min_max::<1, AVX2>(xs, d, c0);
            (1, ok)
        };
        if !ok {
            return Err(Problem::NonFinite);
        }
        for c in c0..c0 + w {
            let (lo, hi) = (grids.lo[c], grids.hi[c]);
            if !Grid::covering(lo, hi, ctx.levels).fits_f16() {
                return Err(Problem::OutOfF16 {
                    token,
                    channel: c,
                    lo,
                    hi,
                });
            }
        }
        c0 += w;
    }
    unreachable!("a non-finite value or a misfit was found above")
}

#[inline(always)]
fn fake_per_channel<const AVX2: bool>(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    out: &mut [f32],
    grids: &mut RowGrids,
) -> Outcome {
    let d = ctx.head_dim;
    for (j, (xs, os)) in x
        .chunks(ctx.group * d)
        .zip(out.chunks_mut(ctx.group * d))
        .enumerate()
    {
        token_group_grids::<AVX2>(ctx, xs, first_token + j * ctx.group, grids)?;
        for (src, dst) in xs.chunks_exact(d).zip(os.chunks_exact_mut(d)) {
            minmax::fake_row(src, dst, grids, ctx.levels);
        }
    }
    Ok(())
}

#[inline(always)]
fn encode_per_channel<const AVX2: bool>(
    ctx: &BlockCtx,
    first_token: usize,
    x: &[f32],
    packed: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u16],
    scratch: &mut Scratch,
) -> Outcome {
    let d = ctx.head_dim;
    // Fused AVX2 coding needs every token group to start on a byte of `packed`.
    let fused = cfg!(target_arch = "x86_64") && AVX2 && d.is_multiple_of(8);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 = true is only instantiated after detecting AVX2 at run time.
    let packer = fused.then(|| unsafe { Packer::new(ctx.bits) });
    let codes = grown(&mut scratch.codes, if fused { 0 } else { x.len() });
    let grids = &mut scratch.row;
    let span = ctx.group * d;
    let span_bytes = span * ctx.bits as usize / 8;
    for (j, xs) in x.chunks(span).enumerate() {
        token_group_grids::<AVX2>(ctx, xs, first_token + j * ctx.group, grids)?;
        let (group_scales, group_zeros) = (
            &mut scales[j * d..(j + 1) * d],
            &mut zeros[j * d..(j + 1) * d],
        );
        for c in 0..d {
            group_scales[c] = minmax::f16_bits_exact(grids.scale[c]);
            group_zeros[c] = minmax::f16_bits_exact(grids.zero[c]);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(packer) = &packer {
            let start = j * span_bytes;
            let out = &mut packed[start..start + xs.len() * ctx.bits as usize / 8];
            let ahead = x.get((j + 1) * span..).unwrap_or(&[]);
            // SAFETY: AVX2 = true is only instantiated after detecting AVX2 at run time.
            unsafe { code_pack_per_channel_avx2(ctx, packer, xs, grids, ahead, out) };
            continue;
        }
        let cs = &mut codes[j * span..j * span + xs.len()];
        for (src, dst) in xs.chunks_exact(d).zip(cs.chunks_exact_mut(d)) {
            minmax::code_row(src, dst, grids, ctx.levels);
        }
    }
    if !fused {
        pack_unchecked::<AVX2>(codes, ctx.bits, packed);
    }
    Ok(())
}

/// Codes and packs the rows of one token group with the fused kernel, each run of 8
/// channels loading its 8 channels' grids, while the next token group (`ahead`) is
/// prefetched for its ranges.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn code_pack_per_channel_avx2(
    ctx: &BlockCtx,
    packer: &Packer,
    xs: &[f32],
    grids: &RowGrids,
    ahead: &[f32],
    out: &mut [u8],
) {
    use super::fused::avx2::{code_pack_rows, Grid8};
    let grid = |_, q| Grid8::load(&grids.zero, &grids.inv_scale, None, 8 * q);
    code_pack_rows::<false, false>(packer, xs, ctx.head_dim, ctx.levels, grid, ahead, out);
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
    let codes = grown(&mut scratch.codes, out.len());
    unpack_unchecked(packed, ctx.bits, codes);
    let grids = &mut scratch.row;
    for (j, (os, cs)) in out
        .chunks_mut(ctx.group * d)
        .zip(codes.chunks(ctx.group * d))
        .enumerate()
    {
        let (group_scales, group_zeros) = (&scales[j * d..(j + 1) * d], &zeros[j * d..(j + 1) * d]);
        for c in 0..d {
            grids.zero[c] = minmax::f16_bits_to_f32(group_zeros[c]);
            grids.scale[c] = minmax::f16_bits_to_f32(group_scales[c]);
        }
        for (dst, src) in os.chunks_exact_mut(d).zip(cs.chunks_exact(d)) {
            minmax::value_row(src, dst, grids);
        }
    }
}

// ---------------------------------------------------------------------------------------
// One entry point per operation, dispatching on the grouping, compiled per instruction set.

#[inline(always)]
fn fake_block<const AVX2: bool>(
    ctx: &BlockCtx,
    groups: Groups,
    first_token: usize,
    x: &[f32],
    out: &mut [f32],
    scratch: &mut Scratch,
) -> Outcome {
    match groups {
        Groups::PerToken => fake_per_token::<AVX2>(ctx, first_token, x, out, scratch),
        Groups::PerChannel => fake_per_channel::<AVX2>(ctx, first_token, x, out, &mut scratch.row),
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn encode_block<const AVX2: bool>(
    ctx: &BlockCtx,
    groups: Groups,
    first_token: usize,
    x: &[f32],
    packed: &mut [u8],
    scales: &mut [u16],
    zeros: &mut [u16],
    scratch: &mut Scratch,
) -> Outcome {
    match groups {
        Groups::PerToken => {
            encode_per_token::<AVX2>(ctx, first_token, x, packed, scales, zeros, scratch)
        }
        Groups::PerChannel => {
            encode_per_channel::<AVX2>(ctx, first_token, x, packed, scales, zeros, scratch)
        }
    }
}

#[inline(always)]
fn decode_block<const AVX2: bool>(
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
    ) -> Outcome;
    fn encode_block_isa = encode_block(
        ctx: &BlockCtx, groups: Groups, first_token: usize, x: &[f32], packed: &mut [u8],
        scales: &mut [u16], zeros: &mut [u16], scratch: &mut Scratch,
    ) -> Outcome;
    fn decode_block_isa = decode_block(
        ctx: &BlockCtx, groups: Groups, packed: &[u8], scales: &[u16], zeros: &[u16], out: &mut [f32],
        scratch: &mut Scratch,
    ) -> ();
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

    /// Buffers one worker needs for blocks of `rows` rows: a rotated copy for QuaRot, group
    /// arrays for per-token grouping (codes for encode/decode are allocated on first use).
    fn scratch_maker(&self, shape: TileShape, rows: usize) -> impl Fn() -> Scratch + Sync + Send {
        let block = rows * shape.head_dim;
        let rotated_len = if self.rotate { block } else { 0 };
        let group_len = if self.groups == Groups::PerToken {
            self.groups_in_rows(rows, shape.head_dim)
        } else {
            0
        };
        let head_dim = shape.head_dim;
        let group = self.group;
        move || Scratch {
            codes: Vec::new(),
            rotated: vec![0.0; rotated_len],
            groups: GroupArrays::new(group_len),
            row: RowGrids::new(head_dim),
            run_group: (0..head_dim / 8).map(|q| 8 * q / group).collect(),
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
            self.scratch_maker(shape, rows),
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
            self.scratch_maker(shape, rows),
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
            self.scratch_maker(shape, rows),
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

    fn f16_bits(v: &[half::f16]) -> Vec<u16> {
        v.iter().map(|h| h.to_bits()).collect()
    }

    /// Every instruction-set variant of fake-quantize, encode and decode gives the baseline's
    /// bits for `x` at every width.
    fn assert_variants_agree(scheme: Scheme, shape: TileShape, x: &[f32]) {
        for bits in 1..=8u8 {
            let mut base_fake = vec![0.0; x.len()];
            scheme
                .fake_quantize_isa(Isa::Baseline, x, shape, bits, &mut base_fake)
                .unwrap();
            let base_enc = scheme
                .encode_isa(Isa::Baseline, x, shape, Kind::K, bits)
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
            for &isa in &Isa::available()[1..] {
                let mut fake = vec![0.0; x.len()];
                scheme
                    .fake_quantize_isa(isa, x, shape, bits, &mut fake)
                    .unwrap();
                assert_eq!(
                    bits_of(&fake),
                    bits_of(&base_fake),
                    "{isa:?} {scheme:?} {shape} b={bits}"
                );
                let enc = scheme.encode_isa(isa, x, shape, Kind::K, bits).unwrap();
                assert_eq!(enc, base_enc, "{isa:?} {scheme:?} {shape} b={bits}");
                assert_eq!(
                    (f16_bits(&enc.scales), f16_bits(&enc.zeros)),
                    (f16_bits(&base_enc.scales), f16_bits(&base_enc.zeros)),
                    "{isa:?} {scheme:?} {shape} b={bits}"
                );
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

    /// Every instruction-set variant gives the baseline's bits, serial and parallel tiles alike.
    #[test]
    fn instruction_set_variants_agree_with_baseline() {
        eprintln!("instruction sets compared: {:?}", Isa::available());
        for (tokens, head_dim) in [(37usize, 128usize), (1030, 128), (9, 64), (700, 64)] {
            let shape = TileShape::new(tokens, head_dim);
            let x = data(shape.len(), (tokens * head_dim) as u64);
            for scheme in schemes() {
                assert_variants_agree(scheme, shape, &x);
            }
        }
    }

    /// The same on the shapes the fused AVX2 paths treat specially: rows that end in a run
    /// of 8, 16 or 24 channels, rows of a length that is not a multiple of 8 (no fused path),
    /// group sizes of a multiple of 8 that do and do not divide the row, partial token
    /// groups, and tiles of long constant stretches (constant groups, exact zeros).
    #[test]
    fn instruction_set_variants_agree_on_odd_shapes() {
        let per_token = |group| Scheme {
            groups: Groups::PerToken,
            group,
            clip_ratio: None,
            rotate: false,
        };
        let per_channel = |group| Scheme {
            groups: Groups::PerChannel,
            group,
            clip_ratio: None,
            rotate: false,
        };
        let quarot = |group| Scheme {
            groups: Groups::PerToken,
            group,
            clip_ratio: Some(0.95),
            rotate: true,
        };
        for (tokens, head_dim) in [
            (45usize, 8usize),
            (1500, 24),
            (130, 40),
            (500, 72),
            (33, 100),
        ] {
            let shape = TileShape::new(tokens, head_dim);
            let noisy = data(shape.len(), (tokens + head_dim) as u64);
            // constant over runs of 7 tokens × 11 channels, some of them zero
            let blocky: Vec<f32> = (0..shape.len())
                .map(|i| {
                    let (t, c) = (i / head_dim, i % head_dim);
                    let cell = (t / 7 * 13 + c / 11) % 5;
                    [0.0, 1.5, -0.75, 0.0, 3.1][cell] + if cell == 4 { c as f32 } else { 0.0 }
                })
                .collect();
            let mut schemes = vec![
                per_token(8),
                per_token(16),
                per_token(head_dim),
                per_token(40),
                per_channel(8),
                per_channel(32),
                per_channel(7),
            ];
            if head_dim.is_power_of_two() {
                schemes.extend([quarot(8), quarot(head_dim)]);
            }
            for scheme in schemes {
                assert_variants_agree(scheme, shape, &noisy);
                assert_variants_agree(scheme, shape, &blocky);
            }
        }
    }

    /// Tiles that cannot be encoded fail with the same error in every variant: a group beyond
    /// f16 before or after a non-finite value, in the same or another batch of channels.
    #[test]
    fn instruction_set_variants_report_the_same_problem() {
        let shape = TileShape::new(64, 64);
        let mut cases = Vec::new();
        for (misfit, bad) in [(3usize, 40usize), (40, 3), (5, 9), (9, 5), (63, 62)] {
            let mut x = data(shape.len(), 5);
            // channel `misfit` of token 33 out of f16 range, channel `bad` of token 40 NaN
            x[33 * 64 + misfit] = 1.0e6;
            x[40 * 64 + bad] = f32::NAN;
            cases.push(x.clone());
            x[40 * 64 + bad] = 0.0;
            cases.push(x);
        }
        let mut schemes = schemes();
        schemes.push(Scheme {
            groups: Groups::PerChannel,
            group: 8,
            clip_ratio: None,
            rotate: false,
        });
        for scheme in schemes {
            for x in &cases {
                let errors = |isa| {
                    let fake = scheme
                        .fake_quantize_isa(isa, x, shape, 4, &mut vec![0.0; x.len()])
                        .unwrap_err()
                        .to_string();
                    let enc = scheme
                        .encode_isa(isa, x, shape, Kind::K, 4)
                        .unwrap_err()
                        .to_string();
                    (fake, enc)
                };
                let base = errors(Isa::Baseline);
                for &isa in &Isa::available()[1..] {
                    assert_eq!(errors(isa), base, "{isa:?} {scheme:?}");
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

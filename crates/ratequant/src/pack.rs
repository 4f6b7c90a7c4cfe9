//! Bit packing of `b`-bit codes (b = 1..=8), LSB-first.
//!
//! Code `i` occupies bits `i·b .. (i+1)·b` of the packed stream, bytes little-endian (bit `k`
//! of the stream is bit `k % 8` of byte `k / 8`); the last byte is zero-padded. Eight codes
//! always fill exactly `b` bytes, so every width has a word-parallel fast path: three
//! shift-and-mask steps squeeze (or spread) eight one-byte codes in a `u64` into `8·b`
//! contiguous bits, and eight such fields fill exactly `b` words (64 codes per step; the
//! width is a const generic, so every shift is a constant). [`pack_reference`] / [`unpack_reference`] are the bit-by-bit definition
//! the tests compare against.

use crate::{Error, Result};

/// Bytes needed for `n` codes of `bits` bits.
pub fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}

fn check_width(bits: u8) -> Result<()> {
    if (1..=8).contains(&bits) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "pack: bits must be in 1..=8, got {bits}"
        )))
    }
}

/// Packs `codes` (each `< 2^bits`) into `out`, which must hold exactly
/// [`packed_len`]`(codes.len(), bits)` bytes.
pub fn pack(codes: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_width(bits)?;
    let want = packed_len(codes.len(), bits);
    if out.len() != want {
        return Err(Error::invalid(format!(
            "pack: {} codes at {bits} bits need {want} bytes, output has {}",
            codes.len(),
            out.len()
        )));
    }
    let limit = ((1u16 << bits) - 1) as u8;
    if codes.iter().fold(0u8, |acc, &c| acc | (c & !limit)) != 0 {
        let (i, c) = codes
            .iter()
            .enumerate()
            .find(|(_, &c)| c > limit)
            .expect("found by the fold");
        return Err(Error::invalid(format!(
            "pack: code {c} at index {i} does not fit in {bits} bits"
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        pack_unchecked::<true>(codes, bits, out);
        return Ok(());
    }
    pack_unchecked::<false>(codes, bits, out);
    Ok(())
}

/// Unpacks `out.len()` codes from `packed`, which must hold exactly
/// [`packed_len`]`(out.len(), bits)` bytes.
pub fn unpack(packed: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_width(bits)?;
    let want = packed_len(out.len(), bits);
    if packed.len() != want {
        return Err(Error::invalid(format!(
            "unpack: {} codes at {bits} bits need {want} bytes, input has {}",
            out.len(),
            packed.len()
        )));
    }
    unpack_unchecked(packed, bits, out);
    Ok(())
}

/// Mask of the low `n` bits (n ≤ 64).
#[inline(always)]
const fn low_bits(n: u32) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// `m` (a field mask within 16 bits) repeated in each 16-bit lane.
#[inline(always)]
const fn every16(m: u64) -> u64 {
    m * 0x0001_0001_0001_0001
}

/// `m` (a field mask within 32 bits) repeated in each 32-bit lane.
#[inline(always)]
const fn every32(m: u64) -> u64 {
    m * 0x0000_0001_0000_0001
}

/// Squeezes eight codes (one per byte of `word`) into the low `8·B` bits: each step joins
/// the two fields of every lane (bytes, then 16-bit, then 32-bit lanes) into one.
#[inline(always)]
fn squeeze8<const B: u32>(word: u64) -> u64 {
    let v = word & (low_bits(B) * 0x0101_0101_0101_0101);
    let v = (v & every16(low_bits(B))) | ((v >> (8 - B)) & every16(low_bits(B) << B));
    let v = (v & every32(low_bits(2 * B)))
        | ((v >> (16 - 2 * B)) & every32(low_bits(2 * B) << (2 * B)));
    (v & low_bits(4 * B)) | ((v >> (32 - 4 * B)) & (low_bits(4 * B) << (4 * B)))
}

/// Inverse of [`squeeze8`]: spreads the low `8·B` bits into eight codes, one per byte.
#[inline(always)]
fn spread8<const B: u32>(packed: u64) -> u64 {
    let v = packed & low_bits(8 * B);
    let v = (v & low_bits(4 * B)) | ((v << (32 - 4 * B)) & (low_bits(4 * B) << 32));
    let v = (v & every32(low_bits(2 * B))) | ((v << (16 - 2 * B)) & every32(low_bits(2 * B) << 16));
    (v & every16(low_bits(B))) | ((v << (8 - B)) & every16(low_bits(B) << 8))
}

/// Packs 64 codes into `8·B` bytes: eight squeezed 8-code fields laid end to end in `B`
/// words (all shifts are constants once `B` is).
#[inline(always)]
fn pack64<const B: u32>(codes: &[u8], out: &mut [u8]) {
    let b = B as usize;
    let mut fields = [0u64; 8];
    for (k, f) in fields.iter_mut().enumerate() {
        *f = squeeze8::<B>(u64::from_le_bytes(
            codes[8 * k..8 * k + 8].try_into().expect("8 codes"),
        ));
    }
    let mut words = [0u64; 8];
    for (k, &f) in fields.iter().enumerate() {
        let bit = 8 * b * k;
        let (w, shift) = (bit / 64, bit % 64);
        words[w] |= f << shift;
        if shift + 8 * b > 64 {
            words[w + 1] |= f >> (64 - shift);
        }
    }
    for (w, dst) in words.iter().zip(out.chunks_exact_mut(8)) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
}

/// Inverse of [`pack64`].
#[inline(always)]
fn unpack64<const B: u32>(packed: &[u8], out: &mut [u8]) {
    let b = B as usize;
    let mut words = [0u64; 8];
    for (w, src) in words.iter_mut().zip(packed.chunks_exact(8)) {
        *w = u64::from_le_bytes(src.try_into().expect("8 bytes"));
    }
    for k in 0..8 {
        let bit = 8 * b * k;
        let (w, shift) = (bit / 64, bit % 64);
        let mut field = words[w] >> shift;
        if shift + 8 * b > 64 {
            field |= words[w + 1] << (64 - shift);
        }
        out[8 * k..8 * k + 8].copy_from_slice(&spread8::<B>(field).to_le_bytes());
    }
}

#[inline(always)]
fn pack_width<const B: u32>(codes: &[u8], out: &mut [u8]) {
    let b = B as usize;
    // 64 codes (8·B bytes) at a time, then 8 at a time, then a zero-padded tail
    let full64 = codes.len() / 64;
    let (out64, out_rest) = out.split_at_mut(full64 * 8 * b);
    for (chunk, dst) in codes.chunks_exact(64).zip(out64.chunks_exact_mut(8 * b)) {
        pack64::<B>(chunk, dst);
    }
    let codes = &codes[full64 * 64..];
    let full = codes.len() / 8;
    let (out_full, out_tail) = out_rest.split_at_mut(full * b);
    for (chunk, dst) in codes.chunks_exact(8).zip(out_full.chunks_exact_mut(b)) {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunk of 8"));
        dst.copy_from_slice(&squeeze8::<B>(word).to_le_bytes()[..b]);
    }
    let tail = &codes[full * 8..];
    if !tail.is_empty() {
        let mut padded = [0u8; 8];
        padded[..tail.len()].copy_from_slice(tail);
        let word = squeeze8::<B>(u64::from_le_bytes(padded)).to_le_bytes();
        let n = out_tail.len();
        out_tail.copy_from_slice(&word[..n]);
    }
}

#[inline(always)]
fn unpack_width<const B: u32>(packed: &[u8], out: &mut [u8]) {
    let b = B as usize;
    let full64 = out.len() / 64;
    let (out64, out_rest) = out.split_at_mut(full64 * 64);
    for (dst, src) in out64.chunks_exact_mut(64).zip(packed.chunks_exact(8 * b)) {
        unpack64::<B>(src, dst);
    }
    let packed = &packed[full64 * 8 * b..];
    let full = out_rest.len() / 8;
    let (out_full, out_tail) = out_rest.split_at_mut(full * 8);
    for (dst, src) in out_full.chunks_exact_mut(8).zip(packed.chunks_exact(b)) {
        let mut word = [0u8; 8];
        word[..b].copy_from_slice(src);
        dst.copy_from_slice(&spread8::<B>(u64::from_le_bytes(word)).to_le_bytes());
    }
    if !out_tail.is_empty() {
        let src = &packed[full * b..];
        let mut word = [0u8; 8];
        word[..src.len()].copy_from_slice(src);
        let codes = spread8::<B>(u64::from_le_bytes(word)).to_le_bytes();
        let n = out_tail.len();
        out_tail.copy_from_slice(&codes[..n]);
    }
}

/// [`pack`] without checks: lengths must match and codes must fit (higher bits are dropped).
/// With `AVX2` (only inside AVX2-enabled code), widths 2 and 4 use the hand-written kernels.
#[inline(always)]
pub(crate) fn pack_unchecked<const AVX2: bool>(codes: &[u8], bits: u8, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 && (bits == 2 || bits == 4) {
        // SAFETY: callers instantiate AVX2 = true only after detecting AVX2 at run time.
        let done = unsafe { avx2::pack_2_or_4(codes, bits, out) };
        pack_scalar(&codes[done..], bits, &mut out[done * bits as usize / 8..]);
        return;
    }
    pack_scalar(codes, bits, out);
}

/// Portable [`pack_unchecked`] (the reference the AVX2 kernels are tested against).
#[inline(always)]
fn pack_scalar(codes: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        1 => pack_width::<1>(codes, out),
        2 => pack_width::<2>(codes, out),
        3 => pack_width::<3>(codes, out),
        4 => pack_width::<4>(codes, out),
        5 => pack_width::<5>(codes, out),
        6 => pack_width::<6>(codes, out),
        7 => pack_width::<7>(codes, out),
        8 => out.copy_from_slice(codes),
        _ => unreachable!("bits checked by the caller"),
    }
}

/// [`unpack`] without checks: lengths must match.
#[inline(always)]
pub(crate) fn unpack_unchecked(packed: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        1 => unpack_width::<1>(packed, out),
        2 => unpack_width::<2>(packed, out),
        3 => unpack_width::<3>(packed, out),
        4 => unpack_width::<4>(packed, out),
        5 => unpack_width::<5>(packed, out),
        6 => unpack_width::<6>(packed, out),
        7 => unpack_width::<7>(packed, out),
        8 => out.copy_from_slice(packed),
        _ => unreachable!("bits checked by the caller"),
    }
}

/// Hand-written AVX2 packing of 2- and 4-bit codes (LLVM does not vectorise the word-parallel
/// path): 64 codes per step, multiply-add instructions join neighbouring codes into bytes.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Packs the longest prefix of `codes` that is a multiple of 64 codes; returns its length.
    #[target_feature(enable = "avx2")]
    pub(super) fn pack_2_or_4(codes: &[u8], bits: u8, out: &mut [u8]) -> usize {
        let n = codes.len() / 64 * 64;
        let low = _mm256_set1_epi8(((1u16 << bits) - 1) as i8);
        for (src, dst) in codes[..n]
            .chunks_exact(64)
            .zip(out.chunks_exact_mut(8 * bits as usize))
        {
            // SAFETY: `src` holds 64 bytes.
            let (a, b) = unsafe {
                (
                    _mm256_and_si256(_mm256_loadu_si256(src.as_ptr().cast()), low),
                    _mm256_and_si256(_mm256_loadu_si256(src.as_ptr().add(32).cast()), low),
                )
            };
            if bits == 4 {
                // 16-bit lanes c0 + 16·c1, then bytes; packus works per 128-bit half, the
                // permute restores the order
                let weights = _mm256_set1_epi16(0x1001);
                let a = _mm256_maddubs_epi16(a, weights);
                let b = _mm256_maddubs_epi16(b, weights);
                let packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0b11_01_10_00);
                // SAFETY: `dst` holds 32 bytes.
                unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), packed) };
            } else {
                // 16-bit lanes c0 + 4·c1, 32-bit lanes (c0 + 4·c1) + 16·(c2 + 4·c3)
                let pairs = _mm256_set1_epi16(0x0401);
                let quads = _mm256_set1_epi32(0x0010_0001);
                let a = _mm256_madd_epi16(_mm256_maddubs_epi16(a, pairs), quads);
                let b = _mm256_madd_epi16(_mm256_maddubs_epi16(b, pairs), quads);
                // dwords → words → bytes, per 128-bit half; then gather the 4-byte groups
                let words = _mm256_packus_epi32(a, b);
                let bytes = _mm256_packus_epi16(words, words);
                let ordered =
                    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
                // SAFETY: `dst` holds 16 bytes.
                unsafe {
                    _mm_storeu_si128(dst.as_mut_ptr().cast(), _mm256_castsi256_si128(ordered))
                };
            }
        }
        n
    }
}

/// Bit-by-bit definition of the packed layout (slow; for tests and as documentation).
pub fn pack_reference(codes: &[u8], bits: u8) -> Vec<u8> {
    let mut out = vec![0u8; packed_len(codes.len(), bits)];
    for (i, &code) in codes.iter().enumerate() {
        for j in 0..bits as usize {
            if code >> j & 1 == 1 {
                let bit = i * bits as usize + j;
                out[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    out
}

/// Bit-by-bit inverse of [`pack_reference`].
pub fn unpack_reference(packed: &[u8], bits: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (0..bits as usize).fold(0u8, |code, j| {
                let bit = i * bits as usize + j;
                code | ((packed[bit / 8] >> (bit % 8)) & 1) << j
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_bit_layout_is_lsb_first() {
        let mut out = [0u8; 3];
        pack(&[1, 2, 3, 0, 3, 1, 2, 0, 3], 2, &mut out).unwrap();
        // byte 0: codes 1,2,3,0 → 0b00_11_10_01
        assert_eq!(out, [0b0011_1001, 0b0010_0111, 0b0000_0011]);
        let mut back = [0u8; 9];
        unpack(&out, 2, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 0, 3, 1, 2, 0, 3]);
    }

    #[test]
    fn three_bit_codes_straddle_bytes() {
        let mut out = [0u8; 2];
        pack(&[0b101, 0b110, 0b011], 3, &mut out).unwrap();
        // stream bits: 101 | 110 << 3 | 011 << 6 = 0b011_110_101
        assert_eq!(out, [0b1111_0101, 0]);
        assert_eq!(u16::from_le_bytes(out), 0b011_110_101);
    }

    /// The AVX2 kernels against the portable word-parallel path, every length to 300.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_packing_matches_scalar() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        let mut state = 7u64;
        for bits in [2u8, 4] {
            for n in 0..300usize {
                let codes: Vec<u8> = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (state >> 56) as u8 & ((1u8 << bits) - 1)
                    })
                    .collect();
                let mut simd = vec![0u8; packed_len(n, bits)];
                pack_unchecked::<true>(&codes, bits, &mut simd);
                let mut scalar = vec![0u8; packed_len(n, bits)];
                pack_scalar(&codes, bits, &mut scalar);
                assert_eq!(simd, scalar, "bits {bits} n {n}");
                assert_eq!(simd, pack_reference(&codes, bits), "bits {bits} n {n}");
            }
        }
    }

    #[test]
    fn rejects_bad_widths_lengths_and_codes() {
        assert!(pack(&[0; 4], 0, &mut [0; 0]).is_err());
        assert!(pack(&[0; 4], 9, &mut [0; 5]).is_err());
        assert!(pack(&[0; 9], 2, &mut [0; 2]).is_err());
        let err = pack(&[0, 4], 2, &mut [0; 1]).unwrap_err().to_string();
        assert!(err.contains("code 4 at index 1"), "{err}");
        assert!(unpack(&[0; 2], 2, &mut [0; 9]).is_err());
    }
}

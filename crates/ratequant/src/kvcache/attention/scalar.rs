//! Scalar reference kernels: the definition the SIMD paths are tested against.

/// Code `bits` wide starting at stream bit `bit` (LSB-first, little-endian bytes).
#[inline(always)]
pub(crate) fn read_code(codes: &[u8], bit: usize, bits: u8) -> u32 {
    let byte = bit / 8;
    let lo = codes[byte] as u32;
    let hi = codes.get(byte + 1).copied().unwrap_or(0) as u32;
    ((lo | (hi << 8)) >> (bit % 8)) & ((1u32 << bits) - 1)
}

/// See [`super::key_scores`].
#[allow(clippy::too_many_arguments)]
pub(super) fn key_scores(
    codes: &[u8],
    slot_bytes: usize,
    bits: u8,
    channels: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    weights: &[f32],
    w_stride: usize,
    rows: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    for r in 0..rows {
        let w = &weights[r * w_stride..];
        for t in tokens.clone() {
            let mut acc = 0.0f32;
            for c in channels.clone() {
                let code = read_code(codes, c * slot_bytes * 8 + t * bits as usize, bits);
                acc += w[c] * code as f32;
            }
            out[r * out_stride + (t - tokens.start)] = acc;
        }
    }
}

/// See [`super::value_accumulate`].
#[allow(clippy::too_many_arguments)]
pub(super) fn value_accumulate(
    codes: &[u8],
    row_bytes: usize,
    bits: u8,
    tokens: usize,
    channels: std::ops::Range<usize>,
    weights: &[f32],
    w_stride: usize,
    rows: usize,
    acc: &mut [f32],
    acc_stride: usize,
) {
    for r in 0..rows {
        let w = &weights[r * w_stride..r * w_stride + tokens];
        for c in channels.clone() {
            let mut sum = 0.0f32;
            for (t, &wt) in w.iter().enumerate() {
                let code = read_code(codes, t * row_bytes * 8 + c * bits as usize, bits);
                sum += wt * code as f32;
            }
            acc[r * acc_stride + c] += sum;
        }
    }
}

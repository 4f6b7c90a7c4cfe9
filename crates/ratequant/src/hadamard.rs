//! Normalised Walsh–Hadamard transform (Sylvester order), as QuaRot rotates keys and values.
//!
//! `H_1 = [1]`, `H_{2n} = [[H_n, H_n], [H_n, −H_n]]`, normalised by `1/√d` so that it is
//! orthogonal; it is also symmetric, hence its own inverse. The fast transform costs
//! `d·log2(d)` additions per vector instead of `d²` multiply-adds.

use crate::{Error, Result};

/// Checks that `d` is a power of two (the orders the Sylvester construction has).
pub fn check_order(d: usize) -> Result<()> {
    if d.is_power_of_two() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "the Walsh–Hadamard rotation needs a power-of-two head_dim, got {d}"
        )))
    }
}

/// In-place normalised transform `x ← H·x / √d` of a vector whose length `d` is a power of two.
pub fn fwht_normalized(x: &mut [f32]) -> Result<()> {
    check_order(x.len())?;
    fwht_normalized_unchecked(x);
    Ok(())
}

/// [`fwht_normalized`] for a length already known to be a power of two.
#[inline(always)]
pub(crate) fn fwht_normalized_unchecked(x: &mut [f32]) {
    let d = x.len();
    let mut half = 1;
    while half < d {
        for block in x.chunks_exact_mut(2 * half) {
            let (a, b) = block.split_at_mut(half);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = (*u, *v);
                *u = p + q;
                *v = p - q;
            }
        }
        half *= 2;
    }
    let norm = 1.0 / (d as f32).sqrt();
    for v in x.iter_mut() {
        *v *= norm;
    }
}

/// The explicit normalised matrix `H_d / √d`, row-major (for tests and small `d`).
pub fn matrix(d: usize) -> Result<Vec<f32>> {
    check_order(d)?;
    let norm = 1.0 / (d as f64).sqrt();
    // Sylvester: H[i][j] = (−1)^popcount(i & j)
    Ok((0..d * d)
        .map(|k| {
            let (i, j) = (k / d, k % d);
            let sign = if (i & j).count_ones() % 2 == 0 {
                1.0
            } else {
                -1.0
            };
            (sign * norm) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_explicit_matrix() {
        for d in [1usize, 2, 4, 8, 16, 64] {
            let h = matrix(d).unwrap();
            let x: Vec<f32> = (0..d).map(|i| ((i * 7 + 3) % 11) as f32 - 5.0).collect();
            let mut fast = x.clone();
            fwht_normalized(&mut fast).unwrap();
            for i in 0..d {
                let slow: f64 = (0..d).map(|j| h[i * d + j] as f64 * x[j] as f64).sum();
                assert!(
                    (fast[i] as f64 - slow).abs() < 1e-5,
                    "d={d} i={i}: {} vs {slow}",
                    fast[i]
                );
            }
        }
    }

    #[test]
    fn order_two_by_hand_and_involution() {
        let mut x = [3.0f32, 1.0];
        fwht_normalized(&mut x).unwrap();
        let r = std::f32::consts::FRAC_1_SQRT_2;
        assert!((x[0] - 4.0 * r).abs() < 1e-6 && (x[1] - 2.0 * r).abs() < 1e-6);
        fwht_normalized(&mut x).unwrap();
        assert!((x[0] - 3.0).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rejects_non_power_of_two() {
        let err = fwht_normalized(&mut [0.0; 6]).unwrap_err().to_string();
        assert!(err.contains("power-of-two") && err.contains('6'), "{err}");
        assert!(matrix(12).is_err());
    }
}

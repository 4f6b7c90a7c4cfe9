//! Sets of bit-widths as written on the command line and in files: `1-8`, `2,3,4`, `1-3,5`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::quant::MAX_BITS;
use crate::{Error, Result};

/// A non-empty, sorted set of distinct bit-widths in `1..=8`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct BitList(Vec<u8>);

impl BitList {
    /// Builds a list from any bit-widths (sorted and deduplicated); each must be in 1..=8.
    pub fn new(bits: impl IntoIterator<Item = u8>) -> Result<Self> {
        let mut v: Vec<u8> = bits.into_iter().collect();
        if let Some(&b) = v.iter().find(|&&b| b == 0 || b > MAX_BITS) {
            return Err(Error::invalid(format!(
                "bit-width {b} is outside 1..={MAX_BITS}"
            )));
        }
        v.sort_unstable();
        v.dedup();
        if v.is_empty() {
            return Err(Error::invalid("empty set of bit-widths"));
        }
        Ok(BitList(v))
    }

    /// `lo..=hi`.
    pub fn range(lo: u8, hi: u8) -> Result<Self> {
        if lo > hi {
            return Err(Error::invalid(format!("empty bit range {lo}-{hi}")));
        }
        Self::new(lo..=hi)
    }

    /// Parses a comma-separated list of bit-widths and ranges: `1-8`, `2,3,4`, `1-3,5`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::invalid(format!(
                "bit list `{s}`: {why} (expected e.g. `1-8` or `2,3,4`)"
            ))
        };
        let number = |t: &str| -> Result<u8> {
            let t = t.trim();
            match t.parse::<u8>() {
                Ok(b) if (1..=MAX_BITS).contains(&b) => Ok(b),
                _ => Err(bad(format!("`{t}` is not a bit-width in 1..={MAX_BITS}"))),
            }
        };
        let mut bits = Vec::new();
        for part in s.split(',') {
            if part.trim().is_empty() {
                return Err(bad("empty entry".into()));
            }
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (number(a)?, number(b)?);
                    if a > b {
                        return Err(bad(format!("range {a}-{b} is empty")));
                    }
                    bits.extend(a..=b);
                }
                None => bits.push(number(part)?),
            }
        }
        Self::new(bits)
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Always false: a `BitList` is never empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn min(&self) -> u8 {
        self.0[0]
    }
    pub fn max(&self) -> u8 {
        self.0[self.0.len() - 1]
    }
    pub fn contains(&self, b: u8) -> bool {
        self.0.binary_search(&b).is_ok()
    }
    /// Position of `b` in the list.
    pub fn index_of(&self, b: u8) -> Option<usize> {
        self.0.binary_search(&b).ok()
    }
    /// True when the list is every integer from its minimum to its maximum.
    pub fn is_consecutive(&self) -> bool {
        usize::from(self.max() - self.min()) + 1 == self.0.len()
    }
    pub fn is_subset_of(&self, other: &BitList) -> bool {
        self.0.iter().all(|&b| other.contains(b))
    }
}

impl TryFrom<Vec<u8>> for BitList {
    type Error = Error;
    fn try_from(v: Vec<u8>) -> Result<Self> {
        let sorted = v.windows(2).all(|w| w[0] < w[1]);
        if !sorted {
            return Err(Error::invalid(format!(
                "bit-widths {v:?} must be strictly increasing"
            )));
        }
        Self::new(v)
    }
}

impl From<BitList> for Vec<u8> {
    fn from(b: BitList) -> Vec<u8> {
        b.0
    }
}

/// Compact form: `1-8`, `2,4,8`, `1-3,5`.
impl fmt::Display for BitList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j > i {
                write!(f, "{start}-{}", self.0[j])?;
            } else {
                write!(f, "{start}")?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_lists() {
        assert_eq!(
            BitList::parse("1-8").unwrap().as_slice(),
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(BitList::parse("4,2,3").unwrap().as_slice(), &[2, 3, 4]);
        assert_eq!(BitList::parse("1-3, 5").unwrap().as_slice(), &[1, 2, 3, 5]);
        assert_eq!(BitList::parse("1-3,5").unwrap().to_string(), "1-3,5");
        assert_eq!(BitList::parse("2,4,8").unwrap().to_string(), "2,4,8");
        assert!(!BitList::parse("1-3,5").unwrap().is_consecutive());
        assert!(BitList::parse("2-4").unwrap().is_consecutive());
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in ["", "0-3", "1-9", "5-2", "a", "1,,2", "3-"] {
            let err = BitList::parse(bad).unwrap_err().to_string();
            assert!(err.contains("bit list"), "{bad}: {err}");
        }
    }
}

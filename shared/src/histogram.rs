//! The mergeable duration histogram stored in every rollup row (`duration_hist`).
//!
//! Log-linear buckets: durations 0..8 ms have a bucket each; above that every power of two is
//! split into four equal sub-buckets, so a bucket is at most 25 % wide and a quantile read
//! from the bucket's midpoint is within ±12.5 % of the true value. Rollups merge by adding
//! arrays element-wise (`control.hist_add`), so any set of rollup rows combines exactly.

use crate::events::MAX_DURATION_MS;

/// Number of buckets; enough for [`MAX_DURATION_MS`].
pub const BUCKETS: usize = 83;

/// The bucket a duration falls into.
pub fn index(duration_ms: i64) -> usize {
    let d = duration_ms.clamp(0, MAX_DURATION_MS) as u64;
    if d < 8 {
        return d as usize;
    }
    let log2 = 63 - d.leading_zeros() as usize; // ≥ 3
    let sub = ((d >> (log2 - 2)) & 3) as usize;
    (8 + 4 * (log2 - 3) + sub).min(BUCKETS - 1)
}

/// The half-open range `[lo, hi)` of durations in bucket `i`.
pub fn bounds(i: usize) -> (i64, i64) {
    if i < 8 {
        return (i as i64, i as i64 + 1);
    }
    let log2 = (i - 8) / 4 + 3;
    let sub = ((i - 8) % 4) as i64;
    let step = 1i64 << (log2 - 2);
    ((4 + sub) * step, (5 + sub) * step)
}

/// A histogram with one duration counted.
pub fn single(duration_ms: i64) -> Vec<i64> {
    let mut h = vec![0; BUCKETS];
    h[index(duration_ms)] = 1;
    h
}

/// Adds `other` into `into` (arrays of unequal length are treated as zero-padded).
pub fn merge(into: &mut Vec<i64>, other: &[i64]) {
    if into.len() < other.len() {
        into.resize(other.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(other) {
        *a += b;
    }
}

/// The `q`-quantile (0..=1) estimated from the histogram, or `None` when it is empty.
/// Exact for durations under 8 ms; otherwise the midpoint of the bucket holding the rank.
pub fn quantile(hist: &[i64], q: f64) -> Option<f64> {
    let total: i64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as i64).max(1);
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let (lo, hi) = bounds(i);
            return Some(if hi - lo == 1 {
                lo as f64
            } else {
                (lo + hi) as f64 / 2.0
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_duration_lies_in_its_bucket() {
        for d in (0..5000).chain([65_535, 65_536, 1_000_000, MAX_DURATION_MS]) {
            let i = index(d);
            let (lo, hi) = bounds(i);
            assert!(lo <= d && d < hi, "{d} not in bucket {i} [{lo},{hi})");
        }
        assert_eq!(index(MAX_DURATION_MS), BUCKETS - 1);
    }

    #[test]
    fn buckets_are_contiguous_and_narrow() {
        for i in 1..BUCKETS {
            assert_eq!(bounds(i - 1).1, bounds(i).0);
            let (lo, hi) = bounds(i);
            assert!((hi - lo) as f64 <= 0.25 * lo as f64 || hi - lo == 1);
        }
    }

    #[test]
    fn quantiles_follow_the_data() {
        let mut h = vec![0; BUCKETS];
        for d in 1..=100 {
            merge(&mut h, &single(d));
        }
        let p95 = quantile(&h, 0.95).unwrap();
        assert!((95.0 * 0.875..=95.0 * 1.125).contains(&p95), "{p95}");
        assert_eq!(quantile(&h, 0.0), Some(1.0));
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
        let mut small = vec![0; BUCKETS];
        merge(&mut small, &single(3));
        assert_eq!(quantile(&small, 0.99), Some(3.0));
    }
}

//! Small statistics helpers: latency percentiles from raw samples, medians of per-run figures.

use serde::{Deserialize, Serialize};

/// Latency percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Number of samples.
    pub samples: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample.
    pub max_us: u64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

/// The `p`-th percentile (0 < p ≤ 100) of sorted samples, by the nearest-rank method; 0 when there are none.
pub fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    u64::from(sorted[index])
}

/// Summarise latency samples (microseconds). Sorts in place.
pub fn summarise(samples: &mut [u32]) -> Latency {
    samples.sort_unstable();
    let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
    Latency {
        samples: samples.len() as u64,
        p50_us: percentile(samples, 50.0),
        p90_us: percentile(samples, 90.0),
        p99_us: percentile(samples, 99.0),
        p999_us: percentile(samples, 99.9),
        max_us: samples.last().map(|&s| u64::from(s)).unwrap_or(0),
        mean_us: if samples.is_empty() { 0.0 } else { sum as f64 / samples.len() as f64 },
    }
}

/// The median of some figures (the mean of the two middle ones for an even count); 0 when there are none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u32> = (1..=100).rev().collect();
        let l = summarise(&mut samples);
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_us, 50);
        assert_eq!(l.p90_us, 90);
        assert_eq!(l.p99_us, 99);
        assert_eq!(l.p999_us, 100);
        assert_eq!(l.max_us, 100);
        assert!((l.mean_us - 50.5).abs() < 1e-9);
    }

    #[test]
    fn percentiles_of_few_or_no_samples() {
        assert_eq!(percentile(&[], 99.0), 0);
        assert_eq!(percentile(&[7], 1.0), 7);
        assert_eq!(percentile(&[7], 100.0), 7);
        assert_eq!(percentile(&[1, 2], 50.0), 1);
        assert_eq!(percentile(&[1, 2], 51.0), 2);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }
}

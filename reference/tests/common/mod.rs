//! Shared helpers of the reference's integration tests.

#![allow(dead_code)]

pub use kvsqueeze_reference::testing::Rng;

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

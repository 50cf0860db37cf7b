//! Shared helpers of the reference's integration tests: a tiny seeded generator (so proptest draws a seed and
//! the data follows from it), never producing zeros.

#![allow(dead_code)]

/// SplitMix64: deterministic, seedable, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`, never exactly 0.
    pub fn uniform(&mut self) -> f64 {
        let x = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        if x == 0.0 {
            0.5
        } else {
            x
        }
    }
    pub fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
    /// A random-walk signal (the smooth-ish time series FourierAttention is meant for), `[t][c]` flattened.
    pub fn walk(&mut self, t: usize, c: usize) -> Vec<f64> {
        let mut x = self.vec(c);
        let mut out = Vec::with_capacity(t * c);
        for _ in 0..t {
            for xi in x.iter_mut() {
                *xi += 0.1 * self.uniform();
            }
            out.extend_from_slice(&x);
        }
        out
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

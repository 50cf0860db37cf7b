//! Seeded test data for every harness (the reference's own tests, the kernel tests, benches): SplitMix64, so
//! a proptest-drawn seed determines the data and a failing case prints a reproduction. Never yields exact 0.

/// SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
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
    /// `n` values uniform in `[-scale, scale)`.
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    /// A random walk of `t` steps over `c` channels, `[t][c]` flattened (the smooth-ish series FourierAttention
    /// targets).
    pub fn walk(&mut self, t: usize, c: usize) -> Vec<f64> {
        let mut x = self.vec(c, 1.0);
        let mut out = Vec::with_capacity(t * c);
        for _ in 0..t {
            for xi in x.iter_mut() {
                *xi += 0.1 * self.uniform();
            }
            out.extend_from_slice(&x);
        }
        out
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

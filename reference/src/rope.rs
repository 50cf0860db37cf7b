//! RoPE in the rotate-half layout (Llama / GPT-NeoX style), at an arbitrary position per vector, and the
//! NTK-scaled base of LongLLaDA (spec §4.1).
//!
//! For a head vector `x` of even length `D`, `h = D/2`, frequency `θ_i = base^(−2i/D)` for `i < h`, and
//! position `p`:
//! ```text
//! y[i]     = x[i]·cos(p·θ_i) − x[i+h]·sin(p·θ_i)
//! y[i+h]   = x[i+h]·cos(p·θ_i) + x[i]·sin(p·θ_i)
//! ```
//! Angles are computed in `f64` and rounded to `T` (positions reach 10⁵; an angle in f16 would be useless).

use crate::Real;

/// RoPE parameters: the (possibly NTK-scaled) base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    /// The base `β` of `θ_i = β^(−2i/D)` (Llama-3: 500 000; Llama-2: 10 000).
    pub base: f64,
}

impl Default for Rope {
    fn default() -> Self {
        Rope { base: 10_000.0 }
    }
}

impl Rope {
    /// `cos(p·θ_i)` and `sin(p·θ_i)` for `i < D/2`, in `f64`.
    pub fn angles(&self, pos: usize, d: usize) -> Vec<(f64, f64)> {
        let h = d / 2;
        (0..h)
            .map(|i| {
                let theta = self.base.powf(-2.0 * i as f64 / d as f64);
                let a = pos as f64 * theta;
                (a.cos(), a.sin())
            })
            .collect()
    }

    /// Rotates one head vector (`x.len()` must be even) to position `pos`, in place.
    pub fn apply<T: Real>(&self, x: &mut [T], pos: usize) {
        let d = x.len();
        assert!(d.is_multiple_of(2), "RoPE needs an even head dimension, got {d}");
        let h = d / 2;
        for (i, (c, s)) in self.angles(pos, d).into_iter().enumerate() {
            let (c, s) = (T::of(c), T::of(s));
            let (a, b) = (x[i], x[i + h]);
            x[i] = a * c - b * s;
            x[i + h] = b * c + a * s;
        }
    }

    /// Returns a rotated copy.
    pub fn rotated<T: Real>(&self, x: &[T], pos: usize) -> Vec<T> {
        let mut y = x.to_vec();
        self.apply(&mut y, pos);
        y
    }
}

/// LongLLaDA's NTK scaling factor λ for extrapolating a model trained on `t_train` tokens with base `base0` and
/// head dim `d` to `t_target` tokens (spec §4.1, "Scaling Laws of RoPE-based Extrapolation"):
/// ```text
/// d_extra = 2·⌈(d/2)·log_{β0}(T_train/2π)⌉
/// β_new   = (T_target/2π)^(d/d_extra)
/// λ       = ⌈β_new/β0⌉      (the new base is λ·β0)
/// ```
/// For LLaDA-8B (`d = 128, β0 = 5e5, T_train = 4096`) this gives 4 / 14 / 31 / 55 for 8k / 16k / 24k / 32k.
pub fn ntk_scale_factor(d: usize, base0: f64, t_train: usize, t_target: usize) -> f64 {
    let two_pi = 2.0 * std::f64::consts::PI;
    let d_extra = 2.0 * ((d as f64 / 2.0) * ((t_train as f64 / two_pi).ln() / base0.ln())).ceil();
    let beta_new = (t_target as f64 / two_pi).powf(d as f64 / d_extra);
    (beta_new / base0).ceil()
}

/// The NTK-scaled base `λ·β0` (see [`ntk_scale_factor`]).
pub fn ntk_scaled_base(d: usize, base0: f64, t_train: usize, t_target: usize) -> f64 {
    ntk_scale_factor(d, base0, t_train, t_target) * base0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llada_factors() {
        let f: Vec<f64> = [8192, 16384, 24576, 32768].iter().map(|&t| ntk_scale_factor(128, 500_000.0, 4096, t)).collect();
        assert_eq!(f, vec![4.0, 14.0, 31.0, 55.0]);
    }

    #[test]
    fn position_zero_is_identity_and_rotation_preserves_norm() {
        let x: Vec<f64> = (0..8).map(|i| (i as f64 * 0.37).sin()).collect();
        assert_eq!(Rope::default().rotated(&x, 0), x);
        let y = Rope::default().rotated(&x, 1234);
        let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!((n(&x) - n(&y)).abs() < 1e-12);
    }

    #[test]
    fn relative_position_property() {
        // <R(p)q, R(p')k> depends only on p - p' (the property RoPE exists for).
        let q: Vec<f64> = (0..16).map(|i| (i as f64 * 0.71).cos()).collect();
        let k: Vec<f64> = (0..16).map(|i| (i as f64 * 1.3).sin()).collect();
        let r = Rope { base: 500_000.0 };
        let a = crate::dot(&r.rotated(&q, 100), &r.rotated(&k, 90));
        let b = crate::dot(&r.rotated(&q, 5010), &r.rotated(&k, 5000));
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
}

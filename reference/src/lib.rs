//! # kvsqueeze-reference — the executable specification
//!
//! Plain Rust, naive loops, no cubecl, no `unsafe`. Every function here is the definition that the CubeCL
//! kernels of `kvsqueeze-kernels` are tested against. Everything is generic over [`Real`]: `f64` is the gold
//! standard; `f32`, `half::f16` and `half::bf16` give the *same-precision naive baseline* whose error against
//! `f64` sets the kernel tolerance (design.md §5: `err(kernel) ≤ 2·err(naive same dtype) + floor`).
//!
//! Section numbers (`spec §x.y`) refer to `shared/docs/algorithms.md`.
//!
//! Modules, one per method (the same names are used in `kernels/`, `src/`, `tests/` and `benches/`):
//! - [`attention`]: dense (decode and causal multi-token) attention with GQA, per-slot probabilities;
//! - [`rope`]: rotate-half RoPE at arbitrary positions, NTK-scaled base (spec §4.1);
//! - [`fourier`]: FourierAttention cache, transforms, direct and spectral decode attention (spec §1);
//! - [`policy`]: the common fixed-budget cache state machine (layout `[sinks | middle | recent]`);
//! - [`treekv`], [`weightedkv`], [`baselines`]: the policies' choice rules (spec §2, §3, §5);
//! - [`metrics`]: relative L2, NMSE, cosine similarity, KL divergence, Jaccard;
//! - [`testing`]: the seeded data generator every test harness shares.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attention;
pub mod baselines;
pub mod fourier;
pub mod matmul;
pub mod metrics;
pub mod policy;
pub mod rope;
pub mod testing;
pub mod treekv;
pub mod weightedkv;

/// The float types the reference runs in: `f64`, `f32`, `half::f16`, `half::bf16`.
///
/// Every arithmetic operation is performed *in* `T` (a naive same-precision implementation); only the
/// transcendental functions of the half types go through `f32` internally, as `half` implements them.
pub trait Real: num_traits::Float + num_traits::FromPrimitive + core::fmt::Debug + core::iter::Sum + Default + Send + Sync + 'static {
    /// Converts an `f64` constant into `T` (rounding to nearest).
    fn of(x: f64) -> Self {
        Self::from_f64(x).expect("every f64 converts to a float type")
    }
    /// Widens to `f64`, exactly.
    fn f64(self) -> f64 {
        self.to_f64().expect("every float widens to f64")
    }
}

impl<T> Real for T where T: num_traits::Float + num_traits::FromPrimitive + core::fmt::Debug + core::iter::Sum + Default + Send + Sync + 'static {}

/// Converts a slice of one float type into another (through `f64`, so widening is exact).
pub fn cast_slice<A: Real, B: Real>(x: &[A]) -> Vec<B> {
    x.iter().map(|&v| B::of(v.f64())).collect()
}

/// Dot product of two equal-length vectors, accumulated in `T` in index order.
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(T::zero(), |acc, (&x, &y)| acc + x * y)
}

/// Softmax of `s`, numerically stabilised by the maximum; returns `(p, log-sum-exp)`.
///
/// NaN anywhere in `s` makes every output NaN (no masking of NaN); an all-`-inf` row gives NaN probabilities
/// and `lse = -inf`, the IEEE result of `0/0`, which kernels must reproduce.
pub fn softmax<T: Real>(s: &[T]) -> (Vec<T>, T) {
    let m = s.iter().fold(T::neg_infinity(), |m, &x| if x.is_nan() || m.is_nan() { T::nan() } else { m.max(x) });
    let e: Vec<T> = s.iter().map(|&x| (x - m).exp()).collect();
    let z = e.iter().fold(T::zero(), |a, &x| a + x);
    let p = e.iter().map(|&x| x / z).collect();
    (p, m + z.ln())
}

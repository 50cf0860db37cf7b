//! The one test harness of the kernel tests: a shared client, seeded data that never contains zeros, dtype
//! rounding, poisoned buffers, the derived tolerance of design.md §5 and visible skips.

#![allow(dead_code)]

use cubecl::client::Client;
use kvsqueeze::{DType, DeviceTensor};
use std::sync::OnceLock;

/// The client every test uses, opened once; prints which device it found.
pub fn client() -> &'static Client {
    static C: OnceLock<Client> = OnceLock::new();
    C.get_or_init(|| {
        let c = kvsqueeze::runtime::client().expect("a cubecl device (install mesa-vulkan-drivers for lavapipe)");
        eprintln!("kernel tests on: {}", kvsqueeze::attention::device_name(&c));
        c
    })
}

/// Prints a visible skip, or fails when `KVSQUEEZE_REQUIRE_ALL=1` (GPU runs).
pub fn skip(what: &str, why: &str) {
    if kvsqueeze::runtime::require_all() {
        panic!("required but skipped: {what}: {why}");
    }
    eprintln!("SKIP {what}: {why}");
}

#[allow(unused_imports)]
/// Machine epsilon of the storage dtype.
pub fn eps(dtype: DType) -> f64 {
    dtype.eps()
}
#[allow(unused_imports)]
pub use kvsqueeze::reference::testing::Rng;

/// Rounds every value to `dtype` (the inputs the kernel and every reference then share).
pub fn round_to(x: &[f64], dtype: DType) -> Vec<f64> {
    x.iter()
        .map(|&v| match dtype {
            DType::F32 => v as f32 as f64,
            DType::F16 => half::f16::from_f64(v).to_f64(),
            DType::BF16 => half::bf16::from_f64(v).to_f64(),
            DType::U32 => v.round(),
        })
        .collect()
}

/// Uploads f64 values as `dtype` (rounding to nearest).
pub fn upload(c: &Client, data: &[f64], shape: &[usize], dtype: DType) -> DeviceTensor {
    kvsqueeze::tensor::upload_f64(c, data, shape, dtype).unwrap().0
}

/// A contiguous output buffer whose every byte is 0xFF — NaN in f32, f16 and bf16 — so an element the
/// kernel forgets to write shows up.
pub fn poisoned(c: &Client, shape: &[usize], dtype: DType) -> DeviceTensor {
    DeviceTensor::filled(c, shape, dtype, 0xFF).expect("a test-sized buffer")
}

/// Max |a − b| over finite pairs, and whether the NaN/Inf pattern of `a` equals that of `b`.
pub fn compare(a: &[f64], b: &[f64]) -> (f64, bool) {
    assert_eq!(a.len(), b.len());
    let mut err: f64 = 0.0;
    let mut parity = true;
    for (&x, &y) in a.iter().zip(b) {
        if x.is_finite() && y.is_finite() {
            err = err.max((x - y).abs());
        } else if !(x.is_nan() && y.is_nan()) && x != y {
            parity = false;
        }
    }
    (err, parity)
}

/// design.md §5: the kernel's error against the f64 reference may be at most twice the error of the naive
/// same-dtype reference against it, plus a floor of a few output ulps.
pub fn check_tolerance(what: &str, case: &str, kernel: &[f64], naive: &[f64], gold: &[f64], floor: f64) {
    let (ek, pk) = compare(kernel, gold);
    let (en, _) = compare(naive, gold);
    assert!(pk, "{what}: NaN/Inf pattern differs from the reference\n  case: {case}");
    let tol = 2.0 * en + floor;
    assert!(ek <= tol, "{what}: error {ek:.3e} > 2·{en:.3e} + {floor:.1e}\n  case: {case}");
}

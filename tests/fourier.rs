//! FourierAttention's compression kernels against the reference: the prefill transform (random L_mid, column
//! counts around the 128-thread tile, N, T, f32/f16 storage, strided rows), and decode updates that must
//! reproduce a one-shot transform; typed errors.

mod common;

use common::*;
use kvsqueeze::fourier::{fourier_transform, fourier_update};
use kvsqueeze::reference::fourier::transform;
use kvsqueeze::{DType, DeviceTensor, Error};
use proptest::prelude::*;

/// Kernel coefficients vs the f64 reference with the derived tolerance (naive f32 reference as the yardstick:
/// the kernel accumulates in f32 whatever the storage dtype).
fn check_transform(lmid: usize, cols: usize, n: usize, extra: usize, f16: bool, pad: usize, seed: u64) {
    let cl = client();
    let dtype = if f16 { DType::F16 } else { DType::F32 };
    let window = lmid + extra;
    let mut rng = Rng(seed);
    let x = round_to(&rng.walk(lmid, cols), dtype);
    // Rows of `cols + pad` elements; the view covers the first `cols` of each (padding is NaN).
    let rs = cols + pad;
    let mut buf = vec![f64::NAN; lmid * rs];
    for t in 0..lmid {
        buf[t * rs..t * rs + cols].copy_from_slice(&x[t * cols..][..cols]);
    }
    let up = upload(cl, &buf, &[lmid * rs], dtype).view(&[lmid, cols], &[rs, 1], 0);
    let got = fourier_transform(cl, &up, n, window).unwrap().to_host_f64(cl).unwrap();
    let rows: Vec<Vec<f64>> = x.chunks(cols).map(|r| r.to_vec()).collect();
    let gold = transform(&rows, (0..cols).collect(), n, window).coef;
    let rows32: Vec<Vec<f32>> = rows.iter().map(|r| r.iter().map(|&v| v as f32).collect()).collect();
    let naive: Vec<f64> = transform(&rows32, (0..cols).collect(), n, window).coef.iter().map(|&v| v as f64).collect();
    let mag = gold.iter().fold(1.0f64, |a, v| a.max(v.abs()));
    check_tolerance("coef", &format!("lmid {lmid} cols {cols} n {n} T {window} f16 {f16} pad {pad} seed {seed}"), &got, &naive, &gold, 8.0 * f32::EPSILON as f64 * mag);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn transform_matches_reference(lmid in 1usize..400, cols in prop::sample::select(vec![1usize, 7, 127, 128, 129, 200]),
                                   n in 1usize..40, extra in 0usize..300, f16: bool, pad in prop::sample::select(vec![0usize, 3]), seed: u64) {
        check_transform(lmid, cols, n, extra, f16, pad, seed);
    }

    /// Prefill of the first `m` rows, then one decode update per remaining row at its middle index, equals
    /// the one-shot transform of all rows.
    #[test]
    fn updates_reproduce_one_shot(lmid in 2usize..120, cols in 1usize..140, n in 1usize..24, seed: u64) {
        let cl = client();
        let window = lmid + 17;
        let m = lmid / 2;
        let mut rng = Rng(seed);
        let x = round_to(&rng.walk(lmid, cols), DType::F32);
        let head = upload(cl, &x[..m.max(1) * cols], &[m.max(1), cols], DType::F32);
        let coef = fourier_transform(cl, &head, n, window).unwrap();
        for t in m.max(1)..lmid {
            fourier_update(cl, &upload(cl, &x[t * cols..][..cols], &[cols], DType::F32), &coef, t, window).unwrap();
        }
        let got = coef.to_host_f64(cl).unwrap();
        let rows: Vec<Vec<f64>> = x.chunks(cols).map(|r| r.to_vec()).collect();
        let gold = transform(&rows, (0..cols).collect(), n, window).coef;
        let mag = gold.iter().fold(1.0f64, |a, v| a.max(v.abs()));
        let (err, parity) = compare(&got, &gold);
        prop_assert!(parity && err <= 1e-5 * mag * (lmid as f64).sqrt(), "error {} (mag {})", err, mag);
    }
}

#[test]
fn fourier_errors() {
    let cl = client();
    let x = upload(cl, &vec![0.5; 12], &[3, 4], DType::F32);
    assert!(fourier_transform(cl, &x, 4, 3).is_ok());
    assert!(matches!(fourier_transform(cl, &x, 4, 2), Err(Error::LengthBeyondCapacity { len: 3, capacity: 2, .. })));
    assert!(matches!(fourier_transform(cl, &x, 0, 8), Err(Error::Config(_))));
    assert!(matches!(fourier_transform(cl, &x, 1 << 16, 1 << 16), Err(Error::Config(_))));
    assert!(matches!(fourier_transform(cl, &upload(cl, &vec![0.5; 12], &[12], DType::F32), 4, 16), Err(Error::ShapeMismatch { .. })));
    let coef = fourier_transform(cl, &x, 4, 8).unwrap();
    let row = upload(cl, &vec![0.5; 4], &[4], DType::F32);
    assert!(fourier_update(cl, &row, &coef, 7, 8).is_ok());
    assert!(matches!(fourier_update(cl, &row, &coef, 8, 8), Err(Error::LengthBeyondCapacity { .. })));
    assert!(matches!(fourier_update(cl, &upload(cl, &vec![0.5; 5], &[5], DType::F32), &coef, 1, 8), Err(Error::ShapeMismatch { tensor: "coef", .. })));
    let _: &DeviceTensor = &coef;
}

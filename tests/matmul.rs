//! `kvsqueeze::matmul::rows_matmul` (the burn model's decode projections) against the reference: shapes 1,
//! the cube's tile ±1 (4 rows, 8·vec columns) and primes, vector widths 4/2/1 (from `N`, `w`'s offset and row
//! stride), random element offsets and row strides, a poisoned output whose bytes outside the view must stay untouched, and refusals.

mod common;

use common::*;
use kvsqueeze::matmul::rows_matmul;
use kvsqueeze::reference::matmul::rows_matmul as reference;
use kvsqueeze::{DType, DeviceTensor, Error};
use proptest::prelude::*;

/// `data` (`rows × cols`) at element `offset` of a buffer, each row followed by `pad` elements (row stride
/// `cols + pad`), `tail` elements after the last; everything outside the view random too.
fn at_offset(rng: &mut common::Rng, data: &[f64], (rows, cols, pad): (usize, usize, usize), offset: usize, tail: usize) -> DeviceTensor {
    let mut all = rng.vec(offset, 1.0);
    for r in 0..rows {
        all.extend_from_slice(&data[r * cols..(r + 1) * cols]);
        all.extend(rng.vec(pad, 1.0));
    }
    all.extend(rng.vec(tail, 1.0));
    let t = upload(client(), &all, &[all.len()], DType::F32);
    t.view(&[rows, cols], &[cols + pad, 1], offset)
}

/// `m × k · k × n` with element offsets `(xo, wo, oo)` and row paddings `(xp, wp, op)` of x, w and out.
fn run(m: usize, k: usize, n: usize, (xo, wo, oo): (usize, usize, usize), (xp, wp, op): (usize, usize, usize), seed: u64) {
    let cl = client();
    let mut rng = common::Rng(seed);
    let (x, w) = (round_to(&rng.vec(m * k, 1.5), DType::F32), round_to(&rng.vec(k * n, 0.5), DType::F32));
    let (xt, wt) = (at_offset(&mut rng, &x, (m, k, xp), xo, 3), at_offset(&mut rng, &w, (k, n, wp), wo, 5));
    let os = n + op;
    let buf = poisoned(cl, &[oo + m * os + 7], DType::F32);
    let out = buf.view(&[m, n], &[os, 1], oo);
    rows_matmul(cl, &xt, &wt, &out).unwrap();
    let got = buf.to_host_f64(cl).unwrap();
    let want = reference(&x, &w, m, k, n);
    // f32 products summed in f32 in some order: |error| ≤ K·u·Σ|x||w| (u = 2⁻²⁴), doubled for slack.
    let u = f32::EPSILON as f64 / 2.0;
    let mut inside = vec![false; got.len()];
    for r in 0..m {
        for c in 0..n {
            let mag: f64 = (0..k).map(|kk| (x[r * k + kk] * w[kk * n + c]).abs()).sum();
            let (g, e) = (got[oo + r * os + c], want[r * n + c]);
            inside[oo + r * os + c] = true;
            assert!((g - e).abs() <= 2.0 * k as f64 * u * mag + 1e-30, "m {m} k {k} n {n} offsets {xo}/{wo}/{oo} pads {xp}/{wp}/{op}: out[{r},{c}] = {g} vs {e}");
        }
    }
    assert!(got.iter().zip(&inside).all(|(v, &i)| i || v.is_nan()), "elements outside the output view were written");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn rows_matmul_matches_reference(m in prop::sample::select(vec![1usize, 3, 4, 5, 8, 13, 24]),
                                     k in prop::sample::select(vec![1usize, 7, 64, 129, 576]),
                                     n in prop::sample::select(vec![1usize, 3, 31, 32, 33, 127, 128, 129, 132, 580]),
                                     xo in 0usize..9, wo in 0usize..9, oo in 0usize..9,
                                     xp in 0usize..3, wp in prop::sample::select(vec![0usize, 1, 2, 4]), op in 0usize..3, seed: u64) {
        run(m, k, n, (xo, wo, oo), (xp, wp, op), seed);
    }
}

/// The model's shapes: 8 rows against a layer's stacked Q/K/V weights and the output head's width.
#[test]
fn rows_matmul_model_shapes() {
    run(8, 576, 1728, (0, 0, 0), (0, 0, 0), 1);
    run(2, 576, 49152, (0, 0, 0), (0, 0, 0), 2);
    // A pitched weight matrix (CUDA's preferred layout pads burn's rows).
    run(8, 576, 1728, (0, 0, 0), (0, 64, 0), 3);
}

/// Bad input is refused before any launch and leaves the output as it was.
#[test]
fn rows_matmul_refuses_bad_input() {
    let cl = client();
    let mut rng = common::Rng(3);
    let x = upload(cl, &rng.vec(4 * 8, 1.0), &[4, 8], DType::F32);
    let w = upload(cl, &rng.vec(8 * 12, 1.0), &[8, 12], DType::F32);
    let out = poisoned(cl, &[4, 12], DType::F32);
    let bad_k = upload(cl, &rng.vec(7 * 12, 1.0), &[7, 12], DType::F32);
    assert!(matches!(rows_matmul(cl, &x, &bad_k, &out), Err(Error::ShapeMismatch { tensor: "w", .. })));
    assert!(matches!(rows_matmul(cl, &x, &w, &poisoned(cl, &[4, 11], DType::F32)), Err(Error::ShapeMismatch { tensor: "out", .. })));
    let strided = x.view(&[4, 4], &[8, 2], 0);
    assert!(matches!(rows_matmul(cl, &strided, &upload(cl, &rng.vec(4 * 12, 1.0), &[4, 12], DType::F32), &out), Err(Error::Layout { tensor: "x", .. })));
    assert!(matches!(rows_matmul(cl, &x, &w, &x.view(&[4, 12], &[12, 1], 0)), Err(Error::ShapeMismatch { .. }) | Err(Error::Layout { .. })));
    let overlapping = upload(cl, &rng.vec(4 * 8, 1.0), &[32], DType::F32).view(&[4, 8], &[4, 1], 0);
    assert!(matches!(rows_matmul(cl, &overlapping, &w, &out), Err(Error::Layout { tensor: "x", .. })), "rows that overlap are refused");
    let half = upload(cl, &rng.vec(8 * 12, 1.0), &[8, 12], DType::F16);
    assert!(matches!(rows_matmul(cl, &x, &half, &out), Err(Error::DtypeMismatch { tensor: "w", .. })));
    let big = poisoned(cl, &[4 * 12 + 8 * 12], DType::F32);
    let (w_in, out_in) = (big.view(&[8, 12], &[12, 1], 0), big.view(&[4, 12], &[12, 1], 8 * 12));
    assert!(matches!(rows_matmul(cl, &x, &w_in, &out_in), Err(Error::Layout { tensor: "out", .. })), "an output aliasing an input is refused");
    assert!(out.to_host_f64(cl).unwrap().iter().all(|v| v.is_nan()), "a refused call wrote nothing");
}

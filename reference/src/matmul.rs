//! The decode step's projections: `out = x · w` for a few rows (kernel: `kvsqueeze_kernels::matmul::rows_matmul`).

/// `out[m, n] = Σ_k x[m, k] · w[k, n]` for row-major `x [M, K]` and `w [K, N]`, summed in f64.
pub fn rows_matmul(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    assert!(x.len() == m * k && w.len() == k * n, "shapes");
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for kk in 0..k {
            let xv = x[r * k + kk];
            for c in 0..n {
                out[r * n + c] += xv * w[kk * n + c];
            }
        }
    }
    out
}

//! `out = x · w` for a few rows `x` (the decode step's projections: `M = B` hidden rows against a `[K, N]` weight
//! matrix). Bandwidth-bound: every weight is read once per cube row-chunk, with vector loads along `N`.
//! Reference: `kvsqueeze_reference::matmul::rows_matmul`.

use cubecl::prelude::*;

/// Lanes along `N` per cube (each a vector of `vec` columns).
pub const LANES: usize = 32;

/// `out[m, n] = Σ_k x[m, k] · w[k, n]`, all f32 and row-major from their element offsets (`w_off` in vectors):
/// `x [M, K]`, `w [K, N]` read as `nv = N / vec` vectors per row, `out [M, N]`. Cube `(cx, cy)` owns column vectors `cx·LANES ..` and rows `cy·rows ..`; its `splits`
/// unit rows take every `splits`-th `k` (unit `(lane, s)`), and the partial sums meet in shared memory. Rows past
/// `m` and column vectors past `nv` are neither read nor written.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn rows_matmul<N: Size>(
    x: &[f32],
    w: &[Vector<f32, N>],
    out: &mut [f32],
    x_off: usize,
    w_off: usize,
    out_off: usize,
    m: usize,
    k: usize,
    nv: usize,
    #[comptime] rows: usize,
    #[comptime] vec: usize,
    #[comptime] splits: usize,
) {
    let lane = UNIT_POS_X as usize;
    let s = UNIT_POS_Y as usize;
    let col = CUBE_POS_X as usize * LANES + lane;
    let m0 = CUBE_POS_Y as usize * rows;
    let mut acc = Array::<f32>::new(comptime![rows * vec]);
    #[unroll]
    for i in 0..comptime![rows * vec] {
        acc[i] = 0.0;
    }
    if col < nv {
        let mut kk = s;
        while kk < k {
            let wv = w[w_off + kk * nv + col];
            #[unroll]
            for r in 0..rows {
                let mut xv = 0.0f32.runtime();
                if m0 + r < m {
                    xv = x[x_off + (m0 + r) * k + kk];
                }
                #[unroll]
                for e in 0..vec {
                    acc[r * vec + e] += xv * wv.extract(e);
                }
            }
            kk += splits;
        }
    }
    let mut red = Shared::<[f32]>::new_slice(comptime![splits * rows * vec * LANES]);
    #[unroll]
    for i in 0..comptime![rows * vec] {
        red[(s * comptime![rows * vec] + i) * LANES + lane] = acc[i];
    }
    sync_cube();
    if s == 0 && col < nv {
        #[unroll]
        for i in 0..comptime![rows * vec] {
            let r = i / vec;
            if m0 + r < m {
                let mut t = 0.0f32.runtime();
                for j in 0..splits {
                    t += red[(j * comptime![rows * vec] + i) * LANES + lane];
                }
                out[out_off + (m0 + r) * nv * vec + col * vec + i % vec] = t;
            }
        }
    }
}

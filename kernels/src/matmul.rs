//! `out = x · w` for a few rows `x` (the decode step's projections: `M = B` hidden rows against a `[K, N]` weight
//! matrix). Bandwidth-bound: every weight is read once per cube row-chunk, with vector loads along `N`.
//! Reference: `kvsqueeze_reference::matmul::rows_matmul`.

use cubecl::prelude::*;

/// Lanes along `N` per cube (each a vector of `vec` columns). Few lanes and many `K` splits per cube give the
/// decode step's small matrices enough cubes (and loads in flight) to fill a GPU: at `N = 576` the first version
/// (32 lanes × 4 splits) launched 10 cubes and read its weights at ~40 GB/s on an H100.
pub const LANES: usize = 8;

/// `out[m, n] = Σ_k x[m, k] · w[k, n]`, all f32, rows at their element offsets and row strides (`xs`, `os` in
/// elements; `w_off`, `ws` in vectors), unit column stride: `x [M, K]`, `w [K, N]` read as `nv = N / vec`
/// vectors per row, `out [M, N]`. Cube `(cx, cy)` owns column vectors `cx·LANES ..` and rows `cy·rows ..`; its `splits`
/// unit rows take every `splits`-th `k` (unit `(lane, s)`), and the partial sums meet in shared memory
/// (`splits·rows·vec·LANES` f32; `splits ≥ rows·vec`). Rows past
/// `m` and column vectors past `nv` are neither read nor written.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn rows_matmul<N: Size>(
    x: &[f32],
    w: &[Vector<f32, N>],
    out: &mut [f32],
    x_off: usize,
    w_off: usize,
    out_off: usize,
    xs: usize,
    ws: usize,
    os: usize,
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
            let wv = w[w_off + kk * ws + col];
            #[unroll]
            for r in 0..rows {
                let mut xv = 0.0f32.runtime();
                if m0 + r < m {
                    xv = x[x_off + (m0 + r) * xs + kk];
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
    // The cube's `rows·vec·LANES` outputs, one per unit (`splits·LANES ≥ rows·vec·LANES` units), each summing
    // its `splits` partials.
    let t = s * LANES + lane;
    if t < comptime![rows * vec * LANES] {
        let i = t / LANES;
        let ln = t % LANES;
        let c = CUBE_POS_X as usize * LANES + ln;
        let r = i / vec;
        if c < nv && m0 + r < m {
            let mut sum = 0.0f32.runtime();
            for j in 0..splits {
                sum += red[(j * comptime![rows * vec] + i) * LANES + ln];
            }
            out[out_off + (m0 + r) * os + c * vec + i % vec] = sum;
        }
    }
}

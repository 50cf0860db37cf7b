//! FourierAttention's compression kernels (spec §1.3; reference `kvsqueeze-reference::fourier`): the prefill
//! transform of the middle segment and the rank-1 decode update.
//!
//! A compressed column is a time series `x_t`, `t = 0..L_mid`; with `ω = 2π/T` and `n < N`:
//! `coef[n, j] = Σ_t x[t, j]·cos(ωnt)` (rows `0..N`) and `coef[N + n, j] = Σ_t x[t, j]·sin(ωnt)` (rows `N..2N`).
//! Angles are reduced exactly in integers, `(n·t) mod T` (the host checks `N·T < 2³²`), then scaled by `2π/T` in
//! f32; sums accumulate in f32. Layouts: `x: [L_mid, C]` (row stride `x_rs` elements, so a view of the
//! compressed columns of a wider buffer works), `coef: [2N, C]` f32 contiguous.

use cubecl::prelude::*;

/// `(cos, sin)(2π·((n·t) mod T)/T)`.
#[cube]
fn basis(n: u32, t: u32, window: u32) -> (f32, f32) {
    let r = (n * t) % window;
    let a = f32::cast_from(r) * (6.283_185_5 / f32::cast_from(window));
    (f32::cos(a), f32::sin(a))
}

/// Prefill transform. Grid `(⌈C/tile⌉, N)`, `tile` threads: one frequency per cube row, one column per thread,
/// looping over the `L_mid` tokens (coalesced across columns).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_transform<E: Float>(x: &[E], coef: &mut [f32], lmid: usize, cols: usize, x_rs: usize, n_freq: usize, window: u32, #[comptime] tile: usize) {
    let j = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let n = CUBE_POS_Y;
    if j < cols {
        let mut c = 0.0f32.runtime();
        let mut s = 0.0f32.runtime();
        for t in 0..lmid {
            let (cs, sn) = basis(n, t as u32, window);
            let v = f32::cast_from(x[t * x_rs + j]);
            c += v * cs;
            s += v * sn;
        }
        coef[n as usize * cols + j] = c;
        coef[(n_freq + n as usize) * cols + j] = s;
    }
}

/// Decode update: adds one token's compressed columns `x: [C]` at middle index `p`. Grid `(⌈C/tile⌉, N)`.
#[cube(launch_unchecked)]
pub fn fourier_update<E: Float>(x: &[E], coef: &mut [f32], cols: usize, n_freq: usize, p: u32, window: u32, #[comptime] tile: usize) {
    let j = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let n = CUBE_POS_Y;
    if j < cols {
        let (cs, sn) = basis(n, p, window);
        let v = f32::cast_from(x[j]);
        coef[n as usize * cols + j] += v * cs;
        coef[(n_freq + n as usize) * cols + j] += v * sn;
    }
}

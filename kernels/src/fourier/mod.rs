//! FourierAttention on the device (spec §1; reference `kvsqueeze-reference::fourier`): the compression kernels
//! (prefill transform, reconstruction statistics, rank-1 decode update), the row gather that moves tokens between
//! the exact segments and the middle, and FlashFourierAttention decode — the direct path (reconstruct the middle,
//! the paper's semantics) and the exact spectral path (spec §1.5) — as one split kernel plus one combine.
//!
//! ## Conventions
//! - A compressed column is a time series `x_t`, `t = 0..L_mid` (middle index). With `ω = 2π/T` and `n < N`:
//!   `coef[c, n] = Σ_t x_t cos(ωnt)`, `coef[c, N + n] = Σ_t x_t sin(ωnt)`. Coefficients are stored
//!   **column-major**, `[C, 2N]` f32 per sequence (the official code's `[2N, C]` transposed), so that the
//!   frequency axis is contiguous: the kernels put frequencies on threads and read them coalesced.
//! - Angles are reduced exactly in integers, `(n·t) mod T` (the host checks `N·T < 2³²`), scaled by `2π/T` in
//!   f32. Inner loops advance the angle by a complex rotation (4 multiply-adds, no trig) and re-seed it from the
//!   exact angle every [`RESEED`] steps, which bounds the recurrence's drift to 32 rotations.
//! - The affine renormalisation is kept as `x̃ = a·x̂ + b` per compressed column (`a = dev_u/dev_d` or 1 where
//!   the raw reconstruction is constant to rounding, `b = avg_u − a·avg_d`), stored `[2, C]` per sequence.
//! - Columns are addressed by offset tables: element `(row, col)` of a source is `src[row_off[row] + col_off[col]]`
//!   (u32 offsets; the host keeps every buffer below 2³² elements), so one kernel reads the prompt
//!   (`[L, Hkv, D]`, token-major) and the cache's exact buffer (`[B, Hkv, X, D]`) alike.
//! - Bindings (WebGPU's default of 8 storage buffers per stage, one kept by cubecl for scalars): the u32 tables
//!   the decode kernels share — the per-sequence `state` (both halves) and the packed column tables `cols` — are
//!   regions of one buffer, bound as `ints` (`state` from 0, `cols` from `cols_at`); the decode f32 scratch —
//!   the tile basis `tab` (from 0), the projections `pq`, the partials `o_part`, `ml_part`, `sp_part` and the
//!   direct path's reconstruction `mkv` — are regions of one buffer, bound as `work` at the `*_at` offsets. The
//!   docs below name the regions.

use crate::attention::{cube_max_rows, NEG};
use cubecl::prelude::*;

pub mod fft;

/// A row offset that means "no row": the thread does nothing.
pub const NONE: u32 = u32::MAX;
/// Rotation steps between exact re-seeds of an angle recurrence.
pub const RESEED: usize = 32;
/// Frequencies staged through shared memory per chunk in [`fourier_split()`] and [`fourier_combine()`].
pub const FCHUNK: usize = 64;
/// Column slices of the spectral projection (more cubes in flight; the split kernel sums the slices).
pub const PCHUNKS: usize = 4;
/// Marks a critical dim in the dim map of [`fourier_reconstruct()`] (the low bits are its critical index).
pub const CRIT: u32 = 1 << 31;

/// `(cos, sin)(2π·((n·t) mod T)/T)`.
#[cube]
fn basis(n: u32, t: u32, window: u32) -> (f32, f32) {
    let r = (n * t) % window;
    let a = f32::cast_from(r) * (6.283_185_5 / f32::cast_from(window));
    (f32::cos(a), f32::sin(a))
}

/// A cosine/sine coefficient pair `(c, s)` of one frequency re-expressed for a time origin shifted by the angle
/// `a` (`ca = cos a`, `sa = sin a`): `c·cos(θ + a) + s·sin(θ + a) = c'·cos θ + s'·sin θ` with
/// `c' = c·ca + s·sa`, `s' = s·ca − c·sa`.
#[cube]
fn shift_origin(c: f32, s: f32, ca: f32, sa: f32) -> (f32, f32) {
    (c * ca + s * sa, s * ca - c * sa)
}

/// Slot of exact token `j` (init tokens first, then the local ring, which starts `skip` slots later).
#[cube]
fn exact_slot(j: usize, l_init: usize, skip: usize) -> usize {
    let mut slot = j;
    if j >= l_init {
        slot = j + skip;
    }
    slot
}

/// Prefill transform. Grid `(⌈N/tile⌉, C)`, `tile` threads: one frequency per thread, one column per cube row;
/// the cube's threads read the same token value (a broadcast) and advance their own angle by rotation.
/// Column `c` of token `t` is `x[x_base + col_off[c] + t·t_stride]`; writes `coef[coef_base + c·2N + …]`, the
/// `n = 0` cosine coefficient times `dc` (1 for the paper's reconstruction, ½ for the least-squares one: see
/// `kvsqueeze_reference::fourier::Spectrum::least_squares`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_transform<E: Float>(
    x: &[E],
    col_off: &[u32],
    coef: &mut [f32],
    x_base: usize,
    t_stride: usize,
    lmid: usize,
    coef_base: usize,
    n_freq: usize,
    window: u32,
    dc: f32,
    #[comptime] tile: usize,
) {
    let n = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let c = CUBE_POS_Y as usize;
    if n < n_freq {
        let (rc, rs) = basis(n as u32, 1, window);
        let col = x_base + col_off[c] as usize;
        let mut ac = 0.0f32.runtime();
        let mut asn = 0.0f32.runtime();
        let mut bc = 1.0f32.runtime();
        let mut bs = 0.0f32.runtime();
        for t in 0..lmid {
            if t % RESEED == 0 {
                let (c0, s0) = basis(n as u32, t as u32, window);
                bc = c0;
                bs = s0;
            }
            let v = f32::cast_from(x[col + t * t_stride]);
            ac += v * bc;
            asn += v * bs;
            let nc = bc * rc - bs * rs;
            bs = bs * rc + bc * rs;
            bc = nc;
        }
        let mut w = 1.0f32.runtime();
        if n == 0 {
            w = dc;
        }
        coef[coef_base + c * 2 * n_freq + n] = ac * w;
        coef[coef_base + c * 2 * n_freq + n_freq + n] = asn;
    }
}

/// Raw inverse `x̂_t = (1/N)·Σ_n coef[n]·cos(ωnt) + coef[N + n]·sin(ωnt)` of one column (`coef` at `base`).
#[cube]
fn raw_inverse(coef: &[f32], base: usize, t: u32, n_freq: usize, window: u32) -> f32 {
    let (rc, rs) = basis(t, 1, window);
    let mut acc = 0.0f32.runtime();
    let mut bc = 1.0f32.runtime();
    let mut bs = 0.0f32.runtime();
    for n in 0..n_freq {
        if n % RESEED == 0 {
            let (c0, s0) = basis(n as u32, t, window);
            bc = c0;
            bs = s0;
        }
        acc += coef[base + n] * bc + coef[base + n_freq + n] * bs;
        let nc = bc * rc - bs * rs;
        bs = bs * rc + bc * rs;
        bc = nc;
    }
    acc / f32::cast_from(n_freq)
}

/// Statistics, phase 1. Grid `(⌈L_mid/tile⌉, C)`: thread = token, cube = (token block, column). Each cube
/// writes `part[(blk·C + c)·6 + …] = (Σx, min x, max x, Σx̂, min x̂, max x̂)` over its tokens.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_stats_partial<E: Float>(
    x: &[E],
    col_off: &[u32],
    coef: &[f32],
    part: &mut [f32],
    x_base: usize,
    t_stride: usize,
    lmid: usize,
    cols: usize,
    coef_base: usize,
    n_freq: usize,
    window: u32,
    #[comptime] tile: usize,
) {
    let t = UNIT_POS as usize;
    let blk = CUBE_POS_X as usize;
    let c = CUBE_POS_Y as usize;
    let tok = blk * tile + t;
    let mut red = Shared::<[f32]>::new_slice(comptime![6 * tile]);
    let mut xu = 0.0f32.runtime();
    let mut xd = 0.0f32.runtime();
    let valid = tok < lmid;
    if valid {
        xu = f32::cast_from(x[x_base + col_off[c] as usize + tok * t_stride]);
        xd = raw_inverse(coef, coef_base + c * 2 * n_freq, tok as u32, n_freq, window);
    }
    red[t] = xu;
    red[tile + t] = xu;
    red[2 * tile + t] = xu;
    red[3 * tile + t] = xd;
    red[4 * tile + t] = xd;
    red[5 * tile + t] = xd;
    if !valid {
        // Neutral elements: 0 for the sums, the first token's value would be better for min/max but any
        // valid token's value is not known here, so use ±f32::MAX.
        red[tile + t] = f32::MAX;
        red[2 * tile + t] = f32::MIN;
        red[4 * tile + t] = f32::MAX;
        red[5 * tile + t] = f32::MIN;
    }
    sync_cube();
    if t < 6 {
        let kind = t % 3;
        let mut r = red[t * tile];
        for i in 1..tile {
            let v = red[t * tile + i];
            if kind == 0 {
                r += v;
            } else if kind == 1 {
                r = min(r, v);
            } else {
                r = max(r, v);
            }
        }
        part[(blk * cols + c) * 6 + t] = r;
    }
}

/// Statistics, phase 2. Grid `(⌈C/tile⌉)`: thread = column; reduces the `blocks` partials and writes
/// `ab[ab_base + c] = a`, `ab[ab_base + C + c] = b` — the paper's renormalisation, or with `ls_a > 0` the
/// least-squares series' fixed `(a, b) = (ls_a, 0)` (`ls_a = 2N/T`).
#[cube(launch_unchecked)]
pub fn fourier_stats_finalize(part: &[f32], ab: &mut [f32], blocks: usize, cols: usize, lmid: usize, ab_base: usize, ls_a: f32, #[comptime] tile: usize) {
    let c = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    if c < cols {
        let mut su = 0.0f32.runtime();
        let mut lu = f32::MAX.runtime();
        let mut hu = f32::MIN.runtime();
        let mut sd = 0.0f32.runtime();
        let mut ld = f32::MAX.runtime();
        let mut hd = f32::MIN.runtime();
        for blk in 0..blocks {
            let p = (blk * cols + c) * 6;
            su += part[p];
            lu = min(lu, part[p + 1]);
            hu = max(hu, part[p + 2]);
            sd += part[p + 3];
            ld = min(ld, part[p + 4]);
            hd = max(hd, part[p + 5]);
        }
        let inv = 1.0f32 / f32::cast_from(lmid);
        let avg_u = su * inv;
        let avg_d = sd * inv;
        let dev_u = max(hu - avg_u, avg_u - lu);
        let dev_d = max(hd - avg_d, avg_d - ld);
        // The reference's guard: a raw reconstruction constant to rounding (its range, not its deviation from
        // the inexact mean) keeps scale 1.
        let mut a = 1.0f32.runtime();
        if hd - ld > 16.0 * f32::EPSILON * max(f32::abs(hd), f32::abs(ld)) && dev_d > 0.0 {
            a = dev_u / dev_d;
        }
        let mut bb = avg_u - a * avg_d;
        if ls_a > 0.0 {
            a = ls_a;
            bb = 0.0;
        }
        ab[ab_base + c] = a;
        ab[ab_base + cols + c] = bb;
    }
}

/// Rows of the per-sequence decode state `[ST_ROWS, B]` u32 (one half of the cache's double buffer): the exact
/// tokens the decode kernels read (`l_init + l_local` once formed, else every token), the ring's start offset,
/// the middle length, the tokens represented, the ring's oldest slot, and the flags.
pub const ST_EXACT: usize = 0;
/// See [`ST_EXACT`].
pub const ST_SKIP: usize = 1;
/// See [`ST_EXACT`].
pub const ST_MID: usize = 2;
/// See [`ST_EXACT`].
pub const ST_COUNT: usize = 3;
/// See [`ST_EXACT`].
pub const ST_RING: usize = 4;
/// See [`ST_EXACT`]: bit 0 [`ST_ACTIVE`], bit 1 [`ST_FORMED`].
pub const ST_FLAGS: usize = 5;
/// Rows of one half of the state.
pub const ST_ROWS: usize = 6;
/// The sequence is live (a retired or never-admitted slot is skipped by the append and attends to nothing).
pub const ST_ACTIVE: u32 = 1;
/// The sequence's middle is formed.
pub const ST_FORMED: u32 = 2;

/// One decode token per live sequence, part 1 of 2: the middle's update. Grid `(Hkv, B, P)`, `tile` threads; the
/// `P` cubes of a (sequence, head) share its columns. A formed sequence's oldest local token (slot
/// `l_init + skip + ring`) moves into the middle — critical columns to row `mid` of `ck/cv`, compressed columns
/// added to the coefficients at middle index `mid` (the rank-1 update). Cube `(0, b, 0)`'s first thread writes the
/// sequence's next state into the other half of `state` (an unformed sequence that then holds more than `trigger`
/// tokens is marked formed; its middle of `2N + 1` tokens is transformed by the launches the host issues after
/// this one); every cube reads only the current half. [`fourier_append_write()`] then writes the new token into
/// the freed slot (a second launch: every cube here must have read the old token first).
///
/// `cols` packs the column tables of K then V, each `[c_off (Hkv+1) | c_dim (C_c) | n_off (Hkv+1) | n_dim (C_n)]`
/// (offsets per head into the column lists, in-head dims).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_append<E: Float>(
    ek: &[E],
    ev: &[E],
    ck: &mut [E],
    cv: &mut [E],
    coef_k: &mut [f32],
    coef_v: &mut [f32],
    ints: &mut [u32],
    cols_at: usize,
    cur: usize,
    next: usize,
    batch: usize,
    hkv: usize,
    x_cap: usize,
    t_cap: usize,
    l_init: usize,
    l_local: usize,
    trigger: usize,
    ckc: usize,
    ckn: usize,
    cvc: usize,
    cvn: usize,
    window: u32,
    dc: f32,
    #[comptime] d: usize,
    #[comptime] n_freq: usize,
    #[comptime] tile: usize,
) {
    let t = UNIT_POS as usize;
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let part = CUBE_POS_Z as usize;
    let parts = CUBE_COUNT_Z as usize;
    let bs = batch;
    let flags = ints[cur + ST_FLAGS * bs + b];
    let count = ints[cur + ST_COUNT * bs + b] as usize;
    let skip = ints[cur + ST_SKIP * bs + b] as usize;
    let mid = ints[cur + ST_MID * bs + b] as usize;
    let ring = ints[cur + ST_RING * bs + b] as usize;
    let active = (flags & ST_ACTIVE) == ST_ACTIVE;
    let formed = (flags & ST_FORMED) == ST_FORMED;
    if h == 0 && part == 0 && t == 0 {
        let mut n_exact = ints[cur + ST_EXACT * bs + b];
        let mut n_skip = skip;
        let mut n_mid = mid;
        let mut n_count = count;
        let mut n_ring = ring;
        let mut n_flags = flags;
        if active {
            n_count = count + 1;
            if formed {
                n_mid = mid + 1;
                n_ring = (ring + 1) % l_local;
            } else if count + 1 > trigger {
                n_flags = flags | ST_FORMED;
                n_mid = count + 1 - l_init - l_local;
                n_skip = n_mid;
                n_ring = 0;
                n_exact = (l_init + l_local) as u32;
            } else {
                n_exact = (count + 1) as u32;
            }
        }
        ints[next + ST_EXACT * bs + b] = n_exact;
        ints[next + ST_SKIP * bs + b] = n_skip as u32;
        ints[next + ST_MID * bs + b] = n_mid as u32;
        ints[next + ST_COUNT * bs + b] = n_count as u32;
        ints[next + ST_RING * bs + b] = n_ring as u32;
        ints[next + ST_FLAGS * bs + b] = n_flags;
    }
    let hk1 = hkv + 1;
    // Sections of `cols`.
    let kc_off = cols_at;
    let kc_dim = cols_at + hk1;
    let kn_off = cols_at + hk1 + ckc;
    let kn_dim = cols_at + 2 * hk1 + ckc;
    let vbase = cols_at + 2 * hk1 + ckc + ckn;
    let vc_off = vbase;
    let vc_dim = vbase + hk1;
    let vn_off = vbase + hk1 + cvc;
    let vn_dim = vbase + 2 * hk1 + cvc;
    let row = ((b * hkv + h) * x_cap + l_init + skip + ring) * d;
    let mut old_k = Shared::<[f32]>::new_slice(d);
    let mut old_v = Shared::<[f32]>::new_slice(d);
    let mut cs = Shared::<[f32]>::new_slice(n_freq);
    let mut sn = Shared::<[f32]>::new_slice(n_freq);
    if active && formed {
        for i in 0..comptime![d.div_ceil(tile)] {
            let idx = i * tile + t;
            if idx < d {
                old_k[idx] = f32::cast_from(ek[row + idx]);
                old_v[idx] = f32::cast_from(ev[row + idx]);
            }
        }
        for i in 0..comptime![n_freq.div_ceil(tile)] {
            let n = i * tile + t;
            if n < n_freq {
                let (c, s) = basis(n as u32, mid as u32, window);
                cs[n] = c;
                if n == 0 {
                    // The DC weight of the transform (`dc`, see `fourier_transform`).
                    cs[n] = c * dc;
                }
                sn[n] = s;
            }
        }
    }
    sync_cube();
    if active && formed {
        // Critical columns of this head to row `mid` of the middle; compressed ones into the coefficients (this
        // cube's share of each).
        move_critical::<E>(ck, &old_k, ints, kn_off, kn_dim, h, part, parts, (b * t_cap + mid) * ckn, tile);
        move_critical::<E>(cv, &old_v, ints, vn_off, vn_dim, h, part, parts, (b * t_cap + mid) * cvn, tile);
        rank1_update(coef_k, &old_k, ints, kc_off, kc_dim, h, part, parts, b * ckc, &cs, &sn, n_freq, tile);
        rank1_update(coef_v, &old_v, ints, vc_off, vc_dim, h, part, parts, b * cvc, &cs, &sn, n_freq, tile);
    }
}

/// One decode token per live sequence, part 2 of 2 (after [`fourier_append()`]): the new token `k, v: [B, Hkv, D]`
/// (from `k_off`, `v_off`) into its exact slot — the freed ring slot of a formed sequence, slot `count` of an
/// unformed one — read from the current half of `state`. Grid `(Hkv, B)`, `tile` threads.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_append_write<E: Float>(
    k: &[E],
    v: &[E],
    ek: &mut [E],
    ev: &mut [E],
    ints: &[u32],
    k_off: usize,
    v_off: usize,
    cur: usize,
    batch: usize,
    hkv: usize,
    x_cap: usize,
    l_init: usize,
    #[comptime] d: usize,
    #[comptime] tile: usize,
) {
    let t = UNIT_POS as usize;
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let flags = ints[cur + ST_FLAGS * batch + b];
    if (flags & ST_ACTIVE) == ST_ACTIVE {
        let mut slot = ints[cur + ST_COUNT * batch + b] as usize;
        if (flags & ST_FORMED) == ST_FORMED {
            slot = l_init + ints[cur + ST_SKIP * batch + b] as usize + ints[cur + ST_RING * batch + b] as usize;
        }
        let row = ((b * hkv + h) * x_cap + slot) * d;
        let src = (b * hkv + h) * d;
        for i in 0..comptime![d.div_ceil(tile)] {
            let idx = i * tile + t;
            if idx < d {
                ek[row + idx] = k[k_off + src + idx];
                ev[row + idx] = v[v_off + src + idx];
            }
        }
    }
}

/// [`fourier_append()`]'s critical-column move: `dst[row + j] = old[dim_j]` for share `part` of `parts` of head `h`'s
/// critical columns `j` (offsets at `cols[off + h]`, in-head dims at `cols[dims + j]`), one column per thread.
#[cube]
#[allow(clippy::too_many_arguments)]
fn move_critical<E: Float>(dst: &mut [E], old: &Shared<[f32]>, cols: &mut [u32], off: usize, dims: usize, h: usize, part: usize, parts: usize, row: usize, #[comptime] tile: usize) {
    let h0 = cols[off + h] as usize;
    let h1 = cols[off + h + 1] as usize;
    let per = (h1 - h0 + parts - 1) / parts;
    let j0 = min(h0 + part * per, h1);
    let j1 = min(j0 + per, h1);
    for i in 0..(j1 - j0 + tile - 1) / tile {
        let j = j0 + i * tile + UNIT_POS as usize;
        if j < j1 {
            dst[row + j] = E::cast_from(old[cols[dims + j] as usize]);
        }
    }
}

/// [`fourier_append()`]'s rank-1 update: for share `part` of `parts` of head `h`'s compressed columns `c` (offsets at
/// `cols[off + h]`, in-head dims at `cols[dims + c]`), `coef[(c0 + c)·2N + n] += old[dim_c]·cos`,
/// `… + N + n] += old[dim_c]·sin` with the basis of the new middle index in `cs`/`sn`; one (column, frequency) pair
/// per thread and round.
#[cube]
#[allow(clippy::too_many_arguments)]
fn rank1_update(
    coef: &mut [f32],
    old: &Shared<[f32]>,
    cols: &mut [u32],
    off: usize,
    dims: usize,
    h: usize,
    part: usize,
    parts: usize,
    c0: usize,
    cs: &Shared<[f32]>,
    sn: &Shared<[f32]>,
    #[comptime] n_freq: usize,
    #[comptime] tile: usize,
) {
    let h0 = cols[off + h] as usize;
    let h1 = cols[off + h + 1] as usize;
    let per = (h1 - h0 + parts - 1) / parts;
    let lo = min(h0 + part * per, h1);
    let hi = min(lo + per, h1);
    let work = (hi - lo) * n_freq;
    for i in 0..(work + tile - 1) / tile {
        let e = i * tile + UNIT_POS as usize;
        if e < work {
            let c = lo + e / n_freq;
            let n = e % n_freq;
            let x = old[cols[dims + c] as usize];
            let base = (c0 + c) * 2 * n_freq;
            coef[base + n] += x * cs[n];
            coef[base + n_freq + n] += x * sn[n];
        }
    }
}

/// Strided row gather: `dst[dst_base + r·dst_stride + w] = src[src_base + r·src_stride + col_off[w]]` for
/// `r < rows`, `w < width`. Grid `(⌈width/tile⌉, rows)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_gather_strided<E: Float>(src: &[E], col_off: &[u32], dst: &mut [E], src_base: usize, src_stride: usize, dst_base: usize, dst_stride: usize, width: usize, #[comptime] tile: usize) {
    let w = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let r = CUBE_POS_Y as usize;
    if w < width {
        dst[dst_base + r * dst_stride + w] = src[src_base + r * src_stride + col_off[w] as usize];
    }
}

/// Row gather: `dst[dst_row[r] + w] = src[src_row[r] + col_off[w]]` for `w < width`; rows whose `src_row` is
/// [`NONE`] are skipped. Grid `(⌈width/tile⌉, rows)`.
#[cube(launch_unchecked)]
pub fn fourier_gather<E: Float>(src: &[E], src_row: &[u32], col_off: &[u32], dst: &mut [E], dst_row: &[u32], width: usize, #[comptime] tile: usize) {
    let w = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let r = CUBE_POS_Y as usize;
    let s = src_row[r];
    if w < width && !(s == NONE) {
        dst[dst_row[r] as usize + w] = src[s as usize + col_off[w] as usize];
    }
}

/// Direct path: reconstructs the middle of one of K/V into `out: [B, Hkv, T_cap, D]` f32 (from `out_base`) (critical dims
/// copied from `crit: [B, T, Cn]`, compressed dims `a·x̂ + b`). Grid `(⌈max L_mid/tile⌉, Hkv·D, B)`, thread =
/// token; `dmap[h·D + d]` is the compressed column index, or [`CRIT`]` | ` the critical column index. The cube's
/// column coefficients are rotated by the tile's start angle into shared memory, chunk by chunk, so each token
/// needs only the fixed tile basis of [`fourier_basis_table()`].
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, unused_assignments)]
pub fn fourier_reconstruct<E: Float>(
    crit: &[E],
    coef: &[f32],
    ab: &[f32],
    dmap: &[u32],
    ints: &[u32],
    work: &mut [f32],
    mid_base: usize,
    out_base: usize,
    hkv: usize,
    d: usize,
    t_crit: usize,
    n_crit: usize,
    t_cap: usize,
    cols: usize,
    n_freq: usize,
    window: u32,
    #[comptime] tile: usize,
) {
    let i = UNIT_POS as usize;
    let base = CUBE_POS_X as usize * tile;
    let t = base + i;
    let hd = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let len = ints[mid_base + b] as usize;
    let m = dmap[hd];
    let h = hd / d;
    if m >= CRIT {
        if t < len {
            work[out_base + ((b * hkv + h) * t_cap + t) * d + hd % d] = f32::cast_from(crit[(b * t_crit + t) * n_crit + (m - CRIT) as usize]);
        }
    } else if base < len {
        let c = m as usize;
        let cbase = (b * cols + c) * 2 * n_freq;
        let mut cf = Shared::<[f32]>::new_slice(comptime![2 * FCHUNK]);
        let mut acc = 0.0f32.runtime();
        for ch in 0..(n_freq + FCHUNK - 1) / FCHUNK {
            let n0 = ch * FCHUNK;
            sync_cube();
            for r in 0..comptime![(2 * FCHUNK).div_ceil(tile)] {
                let idx = r * tile + i;
                if idx < FCHUNK {
                    let mut vc = 0.0f32.runtime();
                    let mut vs = 0.0f32.runtime();
                    if n0 + idx < n_freq {
                        let (ca, sa) = basis((n0 + idx) as u32, base as u32, window);
                        let (rc, rs) = shift_origin(coef[cbase + n0 + idx], coef[cbase + n_freq + n0 + idx], ca, sa);
                        vc = rc;
                        vs = rs;
                    }
                    cf[idx] = vc;
                    cf[FCHUNK + idx] = vs;
                }
            }
            sync_cube();
            let nc_here = min(FCHUNK, n_freq - n0);
            for k in 0..nc_here {
                acc += cf[k] * work[(n0 + k) * tile + i] + cf[FCHUNK + k] * work[(n_freq + n0 + k) * tile + i];
            }
        }
        if t < len {
            let raw = acc / f32::cast_from(n_freq);
            work[out_base + ((b * hkv + h) * t_cap + t) * d + hd % d] = ab[b * 2 * cols + c] * raw + ab[b * 2 * cols + cols + c];
        }
    }
}

/// The tile basis both decode paths use: `tab[n·tile + i] = cos(ωn·i)`, `tab[(N + n)·tile + i] = sin(ωn·i)`
/// (token-minor), then the transpose `tab[2N·tile + i·N + n]`, `tab[2N·tile + (tile + i)·N + n]`
/// (frequency-minor), for `n < N`, `i < tile`. Grid `(⌈N·tile/256⌉)`, 256 threads.
#[cube(launch_unchecked)]
pub fn fourier_basis_table(tab: &mut [f32], n_freq: usize, window: u32, #[comptime] tile: usize) {
    let idx = CUBE_POS_X as usize * 256 + UNIT_POS as usize;
    if idx < n_freq * tile {
        let n = idx / tile;
        let i = idx % tile;
        let (cs, sn) = basis(n as u32, i as u32, window);
        tab[n * tile + i] = cs;
        tab[(n_freq + n) * tile + i] = sn;
        let tt = 2 * n_freq * tile;
        tab[tt + i * n_freq + n] = cs;
        tab[tt + (tile + i) * n_freq + n] = sn;
    }
}

/// Spectral path, query projection (spec §1.5): for KV head `h` and its `G` query heads,
/// `pc[b, hq, n'] = Σ_{c ∈ head h} q[b, hq, d_c]·a_c·coef[b, c, n']` for `n' < 2N` and
/// `qb[b, hq] = Σ_c q[b, hq, d_c]·b_c`, as [`PCHUNKS`] partial sums over slices of the head's columns
/// (`pq` holds `pc: [PCHUNKS, B, Hq, 2N]` then, from `qb_at`, `qb: [PCHUNKS, B, Hq]`; summed by [`fourier_split()`];
/// `cols` is the packed table of [`fourier_append()`], its K compressed section). Grid
/// `(⌈2N/tile⌉, Hkv, PCHUNKS·B)`, thread = coefficient row `n'`; the coefficient reads are shared by the group.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_project<E: Float>(
    q: &[E],
    coef: &[f32],
    ab: &[f32],
    ints: &[u32],
    work: &mut [f32],
    cols_at: usize,
    pq_at: usize,
    qb_at: usize,
    batch: usize,
    hkv: usize,
    ncols: usize,
    n_freq: usize,
    #[comptime] g: usize,
    #[comptime] d: usize,
    #[comptime] tile: usize,
) {
    let nn = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize % batch;
    let part = CUBE_POS_Z as usize / batch;
    let hq = hkv * g;
    let qbase = (b * hq + h * g) * d;
    let h0 = ints[cols_at + h] as usize;
    let h1 = ints[cols_at + h + 1] as usize;
    let c_dim = hkv + 1;
    let per = (h1 - h0 + PCHUNKS - 1) / PCHUNKS;
    let c0 = min(h0 + part * per, h1);
    let c1 = min(c0 + per, h1);
    let two_n = 2 * n_freq;
    let obase = (part * batch + b) * hq + h * g;
    if nn < two_n {
        let mut acc = Array::<f32>::new(g);
        #[unroll]
        for gi in 0..g {
            acc[gi] = 0.0;
        }
        for c in c0..c1 {
            let w = coef[(b * ncols + c) * two_n + nn] * ab[b * 2 * ncols + c];
            let dd = ints[cols_at + c_dim + c] as usize;
            #[unroll]
            for gi in 0..g {
                acc[gi] += f32::cast_from(q[qbase + gi * d + dd]) * w;
            }
        }
        #[unroll]
        for gi in 0..g {
            work[pq_at + (obase + gi) * two_n + nn] = acc[gi];
        }
    }
    if CUBE_POS_X == 0 && (UNIT_POS as usize) < g {
        let gi = UNIT_POS as usize;
        let mut s = 0.0f32.runtime();
        for c in c0..c1 {
            s += f32::cast_from(q[qbase + gi * d + ints[cols_at + c_dim + c] as usize]) * ab[b * 2 * ncols + ncols + c];
        }
        work[qb_at + obase + gi] = s;
    }
}

/// Comptime shape of [`fourier_split()`] / [`fourier_combine()`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    /// Head dim `D`.
    pub d: usize,
    /// Query heads per KV head `G`.
    pub g: usize,
    /// Threads per cube = tokens per tile.
    pub tile: usize,
    /// Frequencies `N`.
    pub n_freq: usize,
    /// Spectral middle (otherwise the middle is read from the direct path's reconstruction).
    pub spectral: bool,
    /// With `spectral`: the FFT path ([`fft`]) — the middle's compressed score parts are read from `sc` (and
    /// the full scores written back there), and the value moments are left to [`fft::fourier_fft_moments()`].
    pub fft: bool,
    /// Plane (warp) reductions for the tile maxima.
    pub plane: bool,
}

/// FlashFourierAttention phase 1 (decode, one query token per sequence). Grid `(S_x + S_m, Hkv, B)`, `tile`
/// threads. Splits `< S_x` cover the exact tokens (init + local: token `j` sits in slot `j` if `j < l_init`,
/// else `j + skip[b]` of `ek/ev: [B, Hkv, X, D]`), splits `≥ S_x` the middle. Each cube runs an online softmax
/// over its tokens for the `G` query rows of the group and writes its partials:
/// `ml_part[((b·Hkv + h)·S + split)·G + g] = (m, l)`, `o_part[… ·D + d]` (unnormalised, every dim), and for
/// spectral middle splits `sp_part[((b·Hkv + h)·S_m + split − S_x)·G + g][2N] = (Σ p·cos(ωnt), Σ p·sin(ωnt))`.
///
/// Middle scores: direct, `s = scale·⟨q, k̃_t⟩` from the reconstruction `mkv` (K `[B, Hkv, T_cap, D]` f32, then V
/// from `mv_at`); spectral, with the projections `pq` of [`fourier_project()`],
/// `s = scale·((1/N)·Σ_n pc[n] cos(ωnt) + pc[N + n] sin(ωnt) + qb + Σ_{critical} q_d·K[t, d])`.
/// Middle values: direct, `Σ p·ṽ_t`; spectral, only the critical dims here (the compressed ones are
/// resolved from `sp_part` in [`fourier_combine()`]).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, unused_assignments)]
pub fn fourier_split<E: Float>(
    q: &[E],
    ek: &[E],
    ev: &[E],
    ints: &[u32],
    ck: &[E],
    cv: &[E],
    work: &mut [f32],
    state_base: usize,
    mkv_at: usize,
    pq_at: usize,
    op_at: usize,
    ml_at: usize,
    sp_at: usize,
    mv_at: usize,
    kn_at: usize,
    vn_at: usize,
    qb_at: usize,
    sc_at: usize,
    tq: usize,
    batch: usize,
    hkv: usize,
    l_init: usize,
    x_cap: usize,
    t_crit: usize,
    t_cap: usize,
    ckn: usize,
    cvn: usize,
    chunk_x: usize,
    chunk_m: usize,
    sx: usize,
    sm: usize,
    window: u32,
    scale: f32,
    #[comptime] cfg: FlashConfig,
) {
    let g = cfg.g;
    let d = cfg.d;
    let tile = cfg.tile;
    let n_freq = cfg.n_freq;
    let npt = comptime![cfg.n_freq.div_ceil(cfg.tile)];
    let two_n = comptime![2 * cfg.n_freq];
    let t = UNIT_POS as usize;
    let split = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    let hq = hkv * g;
    let s_total = sx + sm;
    let middle = split >= sx;
    // state (from `state_base`) = [exact_len; skip; mid_len], each [B] (rows ST_EXACT, ST_SKIP, ST_MID).
    let mut start = split * chunk_x;
    let mut len = ints[state_base + b] as usize;
    let mut chunk = chunk_x;
    if middle {
        start = (split - sx) * chunk_m;
        len = ints[state_base + 2 * batch + b] as usize;
        chunk = chunk_m;
    }
    let skip = ints[state_base + batch + b] as usize;
    let end = max(min(start + chunk, len), start);
    let n_tiles = (end - start + tile - 1) / tile;

    let mut q_s = Shared::<[f32]>::new_slice(comptime![cfg.g * cfg.d]);
    let mut acc_s = Shared::<[f32]>::new_slice(comptime![cfg.g * cfg.d]);
    let mut p_s = Shared::<[f32]>::new_slice(comptime![cfg.g * cfg.tile]);
    let mut red = Shared::<[f32]>::new_slice(comptime![cfg.g * cfg.tile]);
    // Spectral: the group's query projections, rotated to the current tile's start angle.
    let mut pf_s = Shared::<[f32]>::new_slice(comptime![if cfg.spectral && !cfg.fft { cfg.g * 2 * cfg.n_freq } else { 1 }]);
    let qbase = (b * hq + h * g) * d;
    for i in 0..comptime![(cfg.g * cfg.d).div_ceil(cfg.tile)] {
        let idx = i * tile + t;
        if idx < g * d {
            q_s[idx] = f32::cast_from(q[qbase + idx]) * scale;
            acc_s[idx] = 0.0;
        }
    }
    sync_cube();

    let mut m_r = Array::<f32>::new(g);
    let mut l_r = Array::<f32>::new(g);
    let mut al = Array::<f32>::new(g);
    let mut s = Array::<f32>::new(g);
    let mut tm = Array::<f32>::new(g);
    let mut spc = Array::<f32>::new(comptime![cfg.g * cfg.n_freq.div_ceil(cfg.tile)]);
    let mut sps = Array::<f32>::new(comptime![cfg.g * cfg.n_freq.div_ceil(cfg.tile)]);
    #[unroll]
    for gi in 0..g {
        m_r[gi] = NEG;
        l_r[gi] = 0.0;
    }
    #[unroll]
    for e in 0..g * npt {
        spc[e] = 0.0;
        sps[e] = 0.0;
    }
    let spectral_mid = comptime![cfg.spectral] && middle;
    // FFT path: the trigonometric sums are done by the FFT kernels; the split only reads and writes scores.
    let sums_mid = comptime![cfg.spectral && !cfg.fft] && middle;
    let ekbase = (b * hkv + h) * x_cap;
    let mbase = (b * hkv + h) * t_cap;
    // Critical columns of this head (sections of the packed table `cols`: offsets, then in-head dims).
    let kn0 = ints[kn_at + h] as usize;
    let kn1 = ints[kn_at + h + 1] as usize;
    let vn0 = ints[vn_at + h] as usize;
    let vn1 = ints[vn_at + h + 1] as usize;
    let kn_dim = kn_at + hkv + 1;
    let vn_dim = vn_at + hkv + 1;

    if sums_mid {
        // pf[g, n] = the projections (summed over the column slices) rotated by the chunk's start angle ωn·start.
        for i in 0..comptime![(cfg.g * cfg.n_freq).div_ceil(cfg.tile)] {
            let idx = i * tile + t;
            if idx < g * n_freq {
                let gi = idx / n_freq;
                let n = idx % n_freq;
                let mut pcv = 0.0f32.runtime();
                let mut psv = 0.0f32.runtime();
                #[unroll]
                for part in 0..PCHUNKS {
                    let row = ((part * batch + b) * hq + h * g + gi) * two_n;
                    pcv += work[pq_at + row + n];
                    psv += work[pq_at + row + n_freq + n];
                }
                let (ca, sa) = basis(n as u32, start as u32, window);
                let (rc, rs) = shift_origin(pcv, psv, ca, sa);
                pf_s[gi * two_n + n] = rc;
                pf_s[gi * two_n + n_freq + n] = rs;
            }
        }
        sync_cube();
    }
    for ti in 0..n_tiles {
        let base = start + ti * tile;
        let j = base + t;
        let valid = j < end;
        let nvalid = min(tile, end - base);
        #[unroll]
        for gi in 0..g {
            s[gi] = 0.0;
        }
        if spectral_mid {
            if valid {
                for c in kn0..kn1 {
                    let kv = f32::cast_from(ck[(b * t_crit + j) * ckn + c]);
                    let dd = ints[kn_dim + c] as usize;
                    #[unroll]
                    for gi in 0..g {
                        s[gi] += q_s[gi * d + dd] * kv;
                    }
                }
            }
            if comptime![cfg.fft] {
                if valid {
                    #[unroll]
                    for gi in 0..g {
                        let mut qbs = 0.0f32.runtime();
                        #[unroll]
                        for part in 0..PCHUNKS {
                            qbs += work[qb_at + (part * batch + b) * hq + h * g + gi];
                        }
                        let at = sc_at + (b * hq + h * g + gi) * tq + j;
                        s[gi] += scale * (work[at] + qbs);
                        work[at] = s[gi];
                    }
                }
            } else {
                let mut sp = Array::<f32>::new(g);
                #[unroll]
                for gi in 0..g {
                    sp[gi] = 0.0;
                }
                // t = base + i: the projections are already rotated to the tile's start angle ωn·base, so every
                // token needs only the fixed tile basis (cos, sin)(ωn·i) of the table.
                if valid {
                    // Four frequencies per round: their table loads are issued together.
                    for n4 in 0..comptime![cfg.n_freq / 4] {
                        let mut bc = Array::<f32>::new(4usize);
                        let mut bs = Array::<f32>::new(4usize);
                        #[unroll]
                        for u in 0..4usize {
                            let n = n4 * 4 + u;
                            bc[u] = work[n * tile + t];
                            bs[u] = work[(n_freq + n) * tile + t];
                        }
                        #[unroll]
                        for u in 0..4usize {
                            let n = n4 * 4 + u;
                            #[unroll]
                            for gi in 0..g {
                                sp[gi] += pf_s[gi * two_n + n] * bc[u] + pf_s[gi * two_n + n_freq + n] * bs[u];
                            }
                        }
                    }
                    for n in comptime![cfg.n_freq / 4 * 4]..n_freq {
                        let bc = work[n * tile + t];
                        let bs = work[(n_freq + n) * tile + t];
                        #[unroll]
                        for gi in 0..g {
                            sp[gi] += pf_s[gi * two_n + n] * bc + pf_s[gi * two_n + n_freq + n] * bs;
                        }
                    }
                }
                if valid {
                    let inv_n = 1.0f32 / f32::cast_from(n_freq);
                    #[unroll]
                    for gi in 0..g {
                        let mut qbs = 0.0f32.runtime();
                        #[unroll]
                        for part in 0..PCHUNKS {
                            qbs += work[qb_at + (part * batch + b) * hq + h * g + gi];
                        }
                        s[gi] += scale * (sp[gi] * inv_n + qbs);
                    }
                }
            }
        } else if valid {
            if middle {
                for dd in 0..d {
                    let kv = work[mkv_at + (mbase + j) * d + dd];
                    #[unroll]
                    for gi in 0..g {
                        s[gi] += q_s[gi * d + dd] * kv;
                    }
                }
            } else {
                let slot = exact_slot(j, l_init, skip);
                for dd in 0..d {
                    let kv = f32::cast_from(ek[(ekbase + slot) * d + dd]);
                    #[unroll]
                    for gi in 0..g {
                        s[gi] += q_s[gi * d + dd] * kv;
                    }
                }
            }
        }
        #[unroll]
        for gi in 0..g {
            if !valid {
                s[gi] = NEG;
            }
        }
        cube_max_rows(&s, &mut tm, &mut red, g, tile, cfg.plane);
        #[unroll]
        for gi in 0..g {
            let m_new = max(m_r[gi], tm[gi]);
            let mut p = 0.0f32.runtime();
            if valid {
                p = f32::exp(s[gi] - m_new);
            }
            p_s[gi * tile + t] = p;
            let mut alpha = 1.0f32.runtime();
            if !(m_new == NEG) {
                alpha = f32::exp(m_r[gi] - m_new);
            }
            al[gi] = alpha;
            m_r[gi] = m_new;
            l_r[gi] = l_r[gi] * alpha + p;
        }
        sync_cube();
        if spectral_mid {
            if comptime![!cfg.fft] {
                // Advance the staged projections to the next tile: rotate by ωn·tile = ωn·(tile − 1) + ωn·1 (both in
                // the table; every thread has finished this tile's score reads at the barrier above).
                for i in 0..comptime![(cfg.g * cfg.n_freq).div_ceil(cfg.tile)] {
                    let idx = i * tile + t;
                    if idx < g * n_freq {
                        let gi = idx / n_freq;
                        let n = idx % n_freq;
                        let (c1, s1) = (work[n * tile + 1], work[(n_freq + n) * tile + 1]);
                        let (ce, se) = (work[n * tile + tile - 1], work[(n_freq + n) * tile + tile - 1]);
                        let cs = ce * c1 - se * s1;
                        let sn = se * c1 + ce * s1;
                        let (rc, rs) = shift_origin(pf_s[gi * two_n + n], pf_s[gi * two_n + n_freq + n], cs, sn);
                        pf_s[gi * two_n + n] = rc;
                        pf_s[gi * two_n + n_freq + n] = rs;
                    }
                }
            }
            // Critical value dims: thread = critical column of this head.
            for i in 0..comptime![cfg.d.div_ceil(cfg.tile)] {
                let cc = vn0 + i * tile + t;
                if cc < vn1 {
                    let dd = ints[vn_dim + cc] as usize;
                    let mut a = Array::<f32>::new(g);
                    #[unroll]
                    for gi in 0..g {
                        a[gi] = acc_s[gi * d + dd] * al[gi];
                    }
                    for k in 0..nvalid {
                        let vv = f32::cast_from(cv[(b * t_crit + base + k) * cvn + cc]);
                        #[unroll]
                        for gi in 0..g {
                            a[gi] += p_s[gi * tile + k] * vv;
                        }
                    }
                    #[unroll]
                    for gi in 0..g {
                        acc_s[gi * d + dd] = a[gi];
                    }
                }
            }
            if comptime![!cfg.fft] {
                // Compressed value dims in the frequency domain: thread = frequency; `U = Σ_i p_i cos(ωn·i)`,
                // `W = Σ_i p_i sin(ωn·i)` from the transposed table, then rotated by the tile's start angle.
                let ttab = comptime![2 * cfg.n_freq * cfg.tile];
                #[unroll]
                for kk in 0..npt {
                    let n = kk * tile + t;
                    if n < n_freq {
                        let mut u = Array::<f32>::new(g);
                        let mut wv = Array::<f32>::new(g);
                        #[unroll]
                        for gi in 0..g {
                            u[gi] = 0.0;
                            wv[gi] = 0.0;
                        }
                        for k4 in 0..nvalid / 4 {
                            let mut bc = Array::<f32>::new(4usize);
                            let mut bs = Array::<f32>::new(4usize);
                            #[unroll]
                            for e in 0..4usize {
                                let k = k4 * 4 + e;
                                bc[e] = work[ttab + k * n_freq + n];
                                bs[e] = work[ttab + (tile + k) * n_freq + n];
                            }
                            #[unroll]
                            for e in 0..4usize {
                                let k = k4 * 4 + e;
                                #[unroll]
                                for gi in 0..g {
                                    let p = p_s[gi * tile + k];
                                    u[gi] += p * bc[e];
                                    wv[gi] += p * bs[e];
                                }
                            }
                        }
                        for k in nvalid / 4 * 4..nvalid {
                            let bc = work[ttab + k * n_freq + n];
                            let bs = work[ttab + (tile + k) * n_freq + n];
                            #[unroll]
                            for gi in 0..g {
                                let p = p_s[gi * tile + k];
                                u[gi] += p * bc;
                                wv[gi] += p * bs;
                            }
                        }
                        let (ca, sa) = basis(n as u32, base as u32, window);
                        #[unroll]
                        for gi in 0..g {
                            spc[gi * npt + kk] = spc[gi * npt + kk] * al[gi] + ca * u[gi] - sa * wv[gi];
                            sps[gi * npt + kk] = sps[gi * npt + kk] * al[gi] + sa * u[gi] + ca * wv[gi];
                        }
                    }
                }
            }
        } else {
            // Dense rows: thread = dim, every group member at once (each V element is read once).
            for i in 0..comptime![cfg.d.div_ceil(cfg.tile)] {
                let dd = i * tile + t;
                if dd < d {
                    let mut a = Array::<f32>::new(g);
                    #[unroll]
                    for gi in 0..g {
                        a[gi] = acc_s[gi * d + dd] * al[gi];
                    }
                    for k in 0..nvalid {
                        let mut vv = 0.0f32.runtime();
                        if middle {
                            vv = work[mkv_at + mv_at + (mbase + base + k) * d + dd];
                        } else {
                            vv = f32::cast_from(ev[(ekbase + exact_slot(base + k, l_init, skip)) * d + dd]);
                        }
                        #[unroll]
                        for gi in 0..g {
                            a[gi] += p_s[gi * tile + k] * vv;
                        }
                    }
                    #[unroll]
                    for gi in 0..g {
                        acc_s[gi * d + dd] = a[gi];
                    }
                }
            }
        }
        sync_cube();
    }

    // l is per thread (its own tokens, rescaled with the shared maxima): sum it over the cube.
    #[unroll]
    for gi in 0..g {
        red[gi * tile + t] = l_r[gi];
    }
    sync_cube();
    let pbase = ((b * hkv + h) * s_total + split) * g;
    if t < g {
        let mut sum = 0.0f32.runtime();
        for i in 0..tile {
            sum += red[t * tile + i];
        }
        work[ml_at + (pbase + t) * 2] = m_r[t];
        work[ml_at + (pbase + t) * 2 + 1] = sum;
    }
    for i in 0..comptime![(cfg.g * cfg.d).div_ceil(cfg.tile)] {
        let idx = i * tile + t;
        if idx < g * d {
            work[op_at + pbase * d + idx] = acc_s[idx];
        }
    }
    if comptime![cfg.spectral && !cfg.fft] {
        if middle {
            let sbase = ((b * hkv + h) * sm + split - sx) * g;
            #[unroll]
            for kk in 0..npt {
                let n = kk * tile + t;
                if n < n_freq {
                    #[unroll]
                    for gi in 0..g {
                        work[sp_at + (sbase + gi) * two_n + n] = spc[gi * npt + kk];
                        work[sp_at + (sbase + gi) * two_n + n_freq + n] = sps[gi * npt + kk];
                    }
                }
            }
        }
    }
}

/// The weight `exp(m_s − M)` of a split's partials (0 for a split that saw no token).
#[cube]
fn split_weight(m: f32, m_max: f32) -> f32 {
    let mut w = 0.0f32.runtime();
    if !(m == NEG) {
        w = f32::exp(m - m_max);
    }
    w
}

/// Most splits `head_weights` handles (the host keeps `S_x + S_m` at or below it).
pub const MAX_SPLITS: usize = 1024;

/// For one query head (partials at `work[ml_at + ((pbase + s)·G + gi)·2]`): stores `w[s] = exp(m_s − M)` for every
/// split `s < s_total` in shared memory and returns `(Σ_s w_s·l_s, Σ_{s ≥ sx} w_s·l_s)`, cooperatively over the
/// cube's `tile` threads (`red` holds `2·tile` floats). Every thread gets the sums.
#[cube]
#[allow(clippy::too_many_arguments)]
fn head_weights(work: &[f32], ml_at: usize, pbase: usize, g: usize, gi: usize, sx: usize, s_total: usize, w: &mut Shared<[f32]>, red: &mut Shared<[f32]>, #[comptime] tile: usize) -> (f32, f32) {
    let t = UNIT_POS as usize;
    let rounds = (s_total + tile - 1) / tile;
    let mut m = NEG.runtime();
    for r in 0..rounds {
        let sp = r * tile + t;
        if sp < s_total {
            m = max(m, work[ml_at + ((pbase + sp) * g + gi) * 2]);
        }
    }
    red[t] = m;
    sync_cube();
    let mut mx = NEG.runtime();
    for i in 0..tile {
        mx = max(mx, red[i]);
    }
    sync_cube();
    let mut lt = 0.0f32.runtime();
    let mut lm = 0.0f32.runtime();
    for r in 0..rounds {
        let sp = r * tile + t;
        if sp < s_total {
            let wt = split_weight(work[ml_at + ((pbase + sp) * g + gi) * 2], mx);
            w[sp] = wt;
            let l = wt * work[ml_at + ((pbase + sp) * g + gi) * 2 + 1];
            lt += l;
            if sp >= sx {
                lm += l;
            }
        }
    }
    red[t] = lt;
    red[tile + t] = lm;
    sync_cube();
    let mut a = 0.0f32.runtime();
    let mut bm = 0.0f32.runtime();
    for i in 0..tile {
        a += red[i];
        bm += red[tile + i];
    }
    sync_cube();
    (a, bm)
}

/// FlashFourierAttention phase 2. Grid `(Hkv, B·G)`, `tile` threads (one query head per cube): merges the
/// `S_x + S_m` partials of the head (weights `w_s = exp(m_s − M)`, `M` the head's maximum) and writes
/// `o[b, hq, :] = acc/l` in the storage dtype (zeros for a sequence with no token: a retired slot).
///
/// Spectral path: first merges the middle splits' frequency accumulators, `spec[n'] = Σ_{s ≥ S_x} w_s·sp_part[s, n']`
/// (shared memory), then resolves each compressed value dim `d_c` (column `c` of `coef_v`) from them,
/// `a_c/N·Σ_n' spec[n']·coef_v[c, n'] + b_c·l_mid` (`l_mid` the middle's share of the softmax mass), and adds it
/// to the critical and exact part from the partials.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn fourier_combine<E: Float>(
    work: &[f32],
    coef_v: &[f32],
    ab_v: &[f32],
    dmap_v: &[u32],
    o: &mut [E],
    op_at: usize,
    ml_at: usize,
    sp_at: usize,
    hkv: usize,
    sx: usize,
    sm: usize,
    cvc: usize,
    #[comptime] cfg: FlashConfig,
) {
    let g = cfg.g;
    let d = cfg.d;
    let tile = cfg.tile;
    let n_freq = cfg.n_freq;
    let two_n = comptime![2 * cfg.n_freq];
    let t = UNIT_POS as usize;
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize / g;
    let gi = CUBE_POS_Y as usize % g;
    let hq = hkv * g;
    let s_total = sx + sm;
    let pbase = (b * hkv + h) * s_total;
    let mut w = Shared::<[f32]>::new_slice(MAX_SPLITS);
    let mut red = Shared::<[f32]>::new_slice(comptime![2 * cfg.tile]);
    let mut spec = Shared::<[f32]>::new_slice(comptime![if cfg.spectral { 2 * cfg.n_freq } else { 1 }]);
    let (lt, l_mid) = head_weights(work, ml_at, pbase, g, gi, sx, s_total, &mut w, &mut red, tile);
    if comptime![cfg.spectral] {
        for i in 0..comptime![(2 * cfg.n_freq).div_ceil(cfg.tile)] {
            let nn = i * tile + t;
            if nn < two_n {
                let mut acc = 0.0f32.runtime();
                let rowbase = ((b * hkv + h) * sm * g + gi) * two_n + nn;
                for sp in 0..sm {
                    acc += w[sx + sp] * work[sp_at + rowbase + sp * g * two_n];
                }
                spec[nn] = acc;
            }
        }
        sync_cube();
    }
    for i in 0..comptime![cfg.d.div_ceil(cfg.tile)] {
        let dd = i * tile + t;
        if dd < d {
            let mut acc = 0.0f32.runtime();
            let ob = (pbase * g + gi) * d + dd;
            for sp in 0..s_total {
                acc += w[sp] * work[op_at + ob + sp * g * d];
            }
            if comptime![cfg.spectral] {
                let col = dmap_v[h * d + dd];
                if col < CRIT {
                    let c = col as usize;
                    let cbase = (b * cvc + c) * two_n;
                    let mut sacc = 0.0f32.runtime();
                    for nn in 0..two_n {
                        sacc += spec[nn] * coef_v[cbase + nn];
                    }
                    acc += ab_v[b * 2 * cvc + c] * sacc / f32::cast_from(n_freq) + ab_v[b * 2 * cvc + cvc + c] * l_mid;
                }
            }
            let mut r = 0.0f32.runtime();
            if !(lt == 0.0) {
                r = acc / lt;
            }
            o[(b * hq + h * g + gi) * d + dd] = E::cast_from(r);
        }
    }
}

//! Split-KV decode attention (flash-decoding) with GQA, optional per-slot attention mass.
//!
//! ## Indexing (all tensors row-major; strides of `k`/`v` are runtime scalars, in elements)
//! - `q`: `[B, Lq, Hq, D]`, storage dtype `E`, element `(b, i, h, d)` at `q_off + b·q_sb + i·q_sl + h·q_sh + d`
//!   (a view of a fused QKV buffer); `o`: the same shape and dtype, contiguous from `o_off`.
//! - `k`, `v`: element `(b, h, j, d)` at `off + b·sb + h·sh + j·sl + d` (any strides and offset that are
//!   multiples of the vector width `N`, so views of a larger cache buffer work). Every other tensor is
//!   contiguous from its own element offset (`*_off`).
//! - Bindings (at most 7, within WebGPU's default of 8 storage buffers per stage with cubecl's scalars): `q`,
//!   `k`, `v`; `ints`, one u32 buffer holding the lengths `lens: [B]` at `lens_off` and, with RoPE, the positions
//!   `q_pos: [B, Lq]` at `qp_off` and `k_pos` at `kp_off`; `o` and one f32 output `stat` (the single-split
//!   variant's `lse` or `mass`, at most one of them); and `work`, one f32 scratch holding the RoPE table at 0,
//!   the scores at `sc_off`, the split partials at `op_off` / `ml_off` and the rows' `(m, l)` at `rml_off`.
//! - A cube handles one `(split, kv head, batch·row-block)`: the keys `[split·chunk, min((split+1)·chunk, len))`
//!   against up to `ROWS` query rows of one GQA group, `row = i·G + g` (query token `i`, group member `g`), so K
//!   and V are read once per group. Row `i` sits at position `len − Lq + i` and sees keys `j ≤ len − Lq + i`.
//! - `lse: [B, Lq, Hq]` (f32, natural log, the scale included); `mass: [B, Hkv, Lq, L_cap]` (f32), the mean over
//!   the group of the softmax probabilities; `scores: [B, Hkv, R, L_cap]` (f32 scratch, `R = G·Lq`) holds the
//!   scaled scores `s` when the mass is requested.
//!
//! ## Math (`s = scale·⟨q, k⟩`, accumulated in f32 whatever the storage dtype)
//! Per tile of `TILE` keys: `m' = max(m, max_tile s)`, `α = exp(m − m')`, `acc = α·acc + Σ exp(s_j − m')·v_j`,
//! `l = α·l + Σ exp(s_j − m')`. With one split the cube normalises itself (`o = acc/l`, `lse = m + ln l`,
//! `mass_j = mean_g exp(s_gj − m_g)/l_g`); with several, [`decode_combine()`] merges
//! the partials and [`mass_finalize()`] turns the stored scores into probabilities.
//!
//! ## Threads
//! Scores: thread `t` owns key `tile + t` and reads its row with `N`-wide loads (L1 serves the neighbouring
//! halves). Values: thread `t` is `(key lane kl, vector dv)`, `DV = D/N` vectors per row, `KL = TILE/DV` key
//! lanes; each row of V is read by `DV` adjacent threads (coalesced). The key lanes are summed once at the end.
//! Masked slots (past the length or in the causal future) are never loaded and weigh exactly 0.

use crate::rope::rope_cos_sin;
use cubecl::prelude::*;

/// The masked-score sentinel: the most negative finite f32 (WGSL has no infinity literal). A slot with this
/// score weighs exactly 0; a row whose every slot is masked keeps `m = NEG`, `l = 0`.
pub const NEG: f32 = f32::MIN;

/// Comptime shape of one [`decode_split()`] variant (everything else is a runtime scalar).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SplitConfig {
    /// Head dimension `D` (a multiple of `vec`).
    pub d: usize,
    /// Vector width `N` of the K/V loads (must equal the launch's vector size).
    pub vec: usize,
    /// Keys per tile = threads per cube (a multiple of `D/vec` and of the plane size when `plane`).
    pub tile: usize,
    /// Query rows a cube handles (rows past the ones it is given are masked).
    pub rows: usize,
    /// One split: normalise and write `o` (and `lse` or `mass` into `stat`) directly; otherwise write partials.
    pub single: bool,
    /// With `single`: write the lse into `stat` (`mass` must then be off).
    pub lse: bool,
    /// Write the scores scratch (and, with `single`, the mass itself into `stat`).
    pub mass: bool,
    /// Use plane (warp) reductions; otherwise shared memory only.
    pub plane: bool,
    /// Unroll the load loops (GPUs: more loads in flight; CPU-class adapters: JIT time grows ten-fold).
    pub unroll: bool,
    /// Stage each K tile through shared memory with coalesced loads (rows padded by one vector against bank
    /// conflicts) instead of one row per thread straight from global memory. Needs `tile·(D/N + 1)·N`
    /// elements of shared memory more.
    pub stage_k: bool,
    /// Rotate the (pre-RoPE) query and keys in the kernel, rotate-half layout, from `q_pos`/`k_pos` and the
    /// angle table of [`crate::rope`]; needs `vec` to divide `D/2`.
    pub rope: bool,
    /// Issue each tile's V loads (into registers) together with its K loads, before the scores, so that their
    /// latency overlaps the score arithmetic (`⌈tile/KL⌉` vectors of registers more per thread).
    pub early_v: bool,
}

/// A sequence's length as the kernels use it: `lens[b]` when it is in `[lq, lcap]`, else 0 (an inactive slot of a
/// cache, or a length the host could not check because it lives on the device): nothing is read past the
/// view, and an empty row is written as zeros.
#[cube]
pub(crate) fn live_len(raw: u32, lq: usize, lcap: usize) -> usize {
    let len = raw as usize;
    let mut out = len;
    if len < lq || len > lcap {
        out = 0;
    }
    out
}

/// `a / l`, or 0 for an empty row (`l = 0`: no key was visible). A NaN `l` (a NaN score) stays NaN, as in the
/// reference.
#[cube]
pub(crate) fn safe_div(a: f32, l: f32) -> f32 {
    let mut out = 0.0f32.runtime();
    if !(l == 0.0) {
        out = a / l;
    }
    out
}

/// Per-row maximum over the `tile` threads of a cube of one value per thread and row; every thread gets the
/// results in `m`. One barrier for all rows: `red` holds `rows·tile` floats (`rows·tile/PLANE_DIM` are used
/// with plane reductions). The caller syncs before `red` is written again.
#[cube]
pub(crate) fn cube_max_rows(s: &Array<f32>, m: &mut Array<f32>, red: &mut Shared<[f32]>, #[comptime] rows: usize, #[comptime] tile: usize, #[comptime] plane: bool) {
    let t = UNIT_POS as usize;
    if comptime![plane] {
        let pd = PLANE_DIM as usize;
        let nw = tile / pd;
        #[unroll]
        for r in 0..rows {
            let w = plane_max(s[r]);
            if UNIT_POS_PLANE == 0 {
                red[r * nw + t / pd] = w;
            }
        }
        sync_cube();
        #[unroll]
        for r in 0..rows {
            let mut result = NEG.runtime();
            for i in 0..nw {
                result = max(result, red[r * nw + i]);
            }
            m[r] = result;
        }
    } else {
        #[unroll]
        for r in 0..rows {
            red[r * tile + t] = s[r];
        }
        sync_cube();
        #[unroll]
        for r in 0..rows {
            let mut result = NEG.runtime();
            for i in 0..tile {
                result = max(result, red[r * tile + i]);
            }
            m[r] = result;
        }
    }
}

/// Phase 1 of decode attention (see the module docs). Grid `(n_splits, Hkv, B·n_rb)`, `tile` threads.
/// K/V offsets and strides are in vectors of `vec` elements.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn decode_split<E: Float, N: Size>(
    q: &[E],
    k: &[Vector<E, N>],
    v: &[Vector<E, N>],
    ints: &[u32],
    o: &mut [E],
    stat: &mut [f32],
    work: &mut [f32],
    lens_off: usize,
    qp_off: usize,
    kp_off: usize,
    kp_sb: usize,
    kp_sh: usize,
    q_off: usize,
    q_sb: usize,
    q_sl: usize,
    q_sh: usize,
    o_off: usize,
    stat_off: usize,
    sc_off: usize,
    op_off: usize,
    ml_off: usize,
    k_off: usize,
    k_sb: usize,
    k_sh: usize,
    k_sl: usize,
    v_off: usize,
    v_sb: usize,
    v_sh: usize,
    v_sl: usize,
    hkv: usize,
    g: usize,
    lq: usize,
    lcap: usize,
    chunk: usize,
    n_splits: usize,
    n_rb: usize,
    scale: f32,
    #[comptime] cfg: SplitConfig,
) {
    let d = cfg.d;
    let vec = cfg.vec;
    let tile = cfg.tile;
    let rows = cfg.rows;
    let rd = comptime![cfg.rows * cfg.d];
    let dv_n = comptime![cfg.d / cfg.vec];
    let kl_n = comptime![cfg.tile / (cfg.d / cfg.vec)];

    let t = UNIT_POS as usize;
    let split = CUBE_POS_X as usize;
    let kvh = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize / n_rb;
    let rb = CUBE_POS_Z as usize % n_rb;
    let hq = hkv * g;
    let r_total = g * lq;
    let row0 = rb * rows;
    let nrows = min(rows, r_total - row0);
    let len = live_len(ints[lens_off + b], lq, lcap);
    let offset = len - min(len, lq);
    let start = split * chunk;
    let end = min(start + chunk, len);

    // q as f32 vectors of the K/V width: one shared load feeds `vec` multiply-adds.
    let mut q_s = Shared::<[Vector<f32, N>]>::new_slice(comptime![cfg.rows * (cfg.d / cfg.vec)]);
    let mut p_s = Shared::<[f32]>::new_slice(comptime![cfg.rows * cfg.tile]);
    let mut red = Shared::<[f32]>::new_slice(comptime![cfg.rows * cfg.tile]);
    let mut acc_s = Shared::<[f32]>::new_slice(rd);
    let mut k_s = Shared::<[Vector<E, N>]>::new_slice(comptime![if cfg.stage_k { cfg.tile * (cfg.d / cfg.vec + 1) } else { 1 }]);
    let mut l_s = Shared::<[f32]>::new_slice(rows);
    let mut m_s = Shared::<[f32]>::new_slice(rows);

    // With RoPE, the angle table (`D/2·6` f32 at the start of `work`) staged once per cube: the rotation reads it
    // for every key and dim pair.
    let mut tab_s = Shared::<[f32]>::new_slice(comptime![if cfg.rope { cfg.d / 2 * 6 } else { 1 }]);
    if comptime![cfg.rope] {
        let mut i = t;
        while i < comptime![cfg.d / 2 * 6] {
            tab_s[i] = work[i];
            i += tile;
        }
        sync_cube();
    }

    // The group's query rows, pre-multiplied by the softmax scale (rows past `nrows` are zero).
    let half = comptime![cfg.d / 2];
    let mut idx = t;
    while idx < rows * dv_n {
        let r = idx / dv_n;
        let mut valf = Vector::<f32, N>::empty();
        #[unroll]
        for e in 0..vec {
            let mut x = 0.0f32.runtime();
            if r < nrows {
                let row = row0 + r;
                let h = kvh * g + row % g;
                let base = q_off + b * q_sb + (row / g) * q_sl + h * q_sh;
                let dim = (idx % dv_n) * vec + e;
                x = f32::cast_from(q[base + dim]);
                if comptime![cfg.rope] {
                    // Rotate-half: y[i] = x[i]·c − x[i+h]·s, y[i+h] = x[i+h]·c + x[i]·s.
                    let pos = ints[qp_off + b * lq + row / g];
                    if dim < half {
                        let (c, sn) = rope_cos_sin(&tab_s, dim, pos);
                        x = x * c - f32::cast_from(q[base + dim + half]) * sn;
                    } else {
                        let (c, sn) = rope_cos_sin(&tab_s, dim - half, pos);
                        x = x * c + f32::cast_from(q[base + dim - half]) * sn;
                    }
                }
                x *= scale;
            }
            valf.insert(e, x);
        }
        q_s[idx] = valf;
        idx += tile;
    }
    sync_cube();

    let mut m_r = Array::<f32>::new(rows);
    let mut l_r = Array::<f32>::new(rows);
    let mut s = Array::<f32>::new(rows);
    let mut tm = Array::<f32>::new(rows);
    let mut acc = Array::<f32>::new(comptime![cfg.rows * cfg.vec]);
    #[unroll]
    for r in 0..rows {
        m_r[r] = NEG;
        l_r[r] = 0.0;
    }
    #[unroll]
    for e in 0..rows * vec {
        acc[e] = 0.0;
    }
    let my_kl = t / dv_n;
    let my_dv = t % dv_n;
    let kbase = k_off + b * k_sb + kvh * k_sh;
    let vbase = v_off + b * v_sb + kvh * v_sh;
    let sbase = (b * hkv + kvh) * r_total + row0;

    let v_iters = comptime![cfg.tile.div_ceil(cfg.tile / (cfg.d / cfg.vec))];
    let mut vr = Array::<Vector<E, N>>::new(comptime![if cfg.early_v { cfg.tile.div_ceil(cfg.tile / (cfg.d / cfg.vec)) } else { 1 }]);
    let mut tile_start = start;
    while tile_start < end {
        let j = tile_start + t;
        if comptime![cfg.early_v] {
            let tile_len = min(tile, end - tile_start);
            #[unroll(cfg.unroll)]
            for it in 0..v_iters {
                let jj = my_kl + it * kl_n;
                if my_kl < kl_n && jj < tile_len {
                    vr[it] = v[vbase + (tile_start + jj) * v_sl + my_dv];
                }
            }
        }
        #[unroll]
        for r in 0..rows {
            s[r] = 0.0;
        }
        if comptime![cfg.stage_k] {
            // Consecutive threads read consecutive vectors of a row: every global load is coalesced.
            #[unroll(cfg.unroll)]
            for it in 0..dv_n {
                let idx = it * tile + t;
                let key = idx / dv_n;
                if tile_start + key < end {
                    k_s[key * (dv_n + 1) + idx % dv_n] = k[kbase + (tile_start + key) * k_sl + idx % dv_n];
                }
            }
            sync_cube();
        }
        if j < end {
            if comptime![cfg.rope] {
                // Pairs (i, i + D/2) are rotated together: vector `dvi` of the first half with `dvi + DV/2`.
                let pos = ints[kp_off + b * kp_sb + kvh * kp_sh + j];
                let hv = comptime![cfg.d / cfg.vec / 2];
                #[unroll(cfg.unroll)]
                for dvi in 0..hv {
                    let ka = if comptime![cfg.stage_k] { k_s[t * (dv_n + 1) + dvi] } else { k[kbase + j * k_sl + dvi] };
                    let kb = if comptime![cfg.stage_k] { k_s[t * (dv_n + 1) + dvi + hv] } else { k[kbase + j * k_sl + dvi + hv] };
                    let mut fa = Array::<f32>::new(vec);
                    let mut fb = Array::<f32>::new(vec);
                    #[unroll]
                    for e in 0..vec {
                        let (c, sn) = rope_cos_sin(&tab_s, dvi * vec + e, pos);
                        let xa = f32::cast_from(ka.extract(e));
                        let xb = f32::cast_from(kb.extract(e));
                        fa[e] = xa * c - xb * sn;
                        fb[e] = xb * c + xa * sn;
                    }
                    #[unroll]
                    for r in 0..rows {
                        let qa = q_s[r * dv_n + dvi];
                        let qb = q_s[r * dv_n + dvi + hv];
                        #[unroll]
                        for e in 0..vec {
                            s[r] += qa.extract(e) * fa[e] + qb.extract(e) * fb[e];
                        }
                    }
                }
            } else {
                // Unrolled (on GPUs) so that all D/N loads of the row are in flight together.
                #[unroll(cfg.unroll)]
                for dvi in 0..dv_n {
                    let kv = if comptime![cfg.stage_k] { k_s[t * (dv_n + 1) + dvi] } else { k[kbase + j * k_sl + dvi] };
                    let mut kf = Array::<f32>::new(vec);
                    #[unroll]
                    for e in 0..vec {
                        kf[e] = f32::cast_from(kv.extract(e));
                    }
                    #[unroll]
                    for r in 0..rows {
                        let qv = q_s[r * dv_n + dvi];
                        #[unroll]
                        for e in 0..vec {
                            s[r] += qv.extract(e) * kf[e];
                        }
                    }
                }
            }
        }
        #[unroll]
        for r in 0..rows {
            let visible = j < end && r < nrows && j <= offset + (row0 + r) / g;
            if !visible {
                s[r] = NEG;
            }
            if comptime![cfg.mass] {
                if visible {
                    work[sc_off + (sbase + r) * lcap + j] = s[r];
                }
            }
        }
        // Online softmax: the tile maximum per row (one barrier), then this thread's key's numerator.
        cube_max_rows(&s, &mut tm, &mut red, rows, tile, cfg.plane);
        #[unroll]
        for r in 0..rows {
            let m_new = max(m_r[r], tm[r]);
            let mut p = 0.0f32.runtime();
            if !(s[r] == NEG) {
                p = f32::exp(s[r] - m_new);
            }
            p_s[r * tile + t] = p;
            let mut alpha = 1.0f32.runtime();
            if !(m_new == NEG) {
                alpha = f32::exp(m_r[r] - m_new);
            }
            m_r[r] = m_new;
            l_r[r] *= alpha;
            #[unroll]
            for e in 0..vec {
                acc[r * vec + e] *= alpha;
            }
        }
        sync_cube();
        if my_kl < kl_n {
            let tile_len = min(tile, end - tile_start);
            // Unrolled (on GPUs) over the tile's keys of this lane, so the V loads are issued together.
            #[unroll(cfg.unroll)]
            for it in 0..v_iters {
                let jj = my_kl + it * kl_n;
                if jj < tile_len {
                    let vv = if comptime![cfg.early_v] { vr[it] } else { v[vbase + (tile_start + jj) * v_sl + my_dv] };
                    #[unroll]
                    for r in 0..rows {
                        let p = p_s[r * tile + jj];
                        // Skip exact zeros (masked rows): 0·inf in a row's future must not make it NaN.
                        // Comparisons are written `!(x == c)` so that a NaN is never taken for a mask:
                        // SPIR-V lowers `!=` to an ordered compare, false for NaN.
                        if !(p == 0.0) {
                            l_r[r] += p;
                            #[unroll]
                            for e in 0..vec {
                                acc[r * vec + e] += p * f32::cast_from(vv.extract(e));
                            }
                        }
                    }
                }
            }
        }
        sync_cube();
        tile_start += tile;
    }

    // Sum the key lanes.
    let mut idx = t;
    while idx < rd {
        acc_s[idx] = 0.0;
        idx += tile;
    }
    if t < rows {
        l_s[t] = 0.0;
        m_s[t] = m_r[t];
    }
    sync_cube();
    for lane in 0..kl_n {
        if my_kl == lane {
            #[unroll]
            for r in 0..rows {
                #[unroll]
                for e in 0..vec {
                    acc_s[r * d + my_dv * vec + e] += acc[r * vec + e];
                }
                if my_dv == 0 {
                    l_s[r] += l_r[r];
                }
            }
        }
        sync_cube();
    }

    if comptime![cfg.single] {
        let mut idx = t;
        while idx < rd {
            let r = idx / d;
            if r < nrows {
                let row = row0 + r;
                let h = kvh * g + row % g;
                o[o_off + ((b * lq + row / g) * hq + h) * d + idx % d] = E::cast_from(safe_div(acc_s[idx], l_s[r]));
            }
            idx += tile;
        }
        if comptime![cfg.lse] {
            if t < nrows {
                let row = row0 + t;
                let h = kvh * g + row % g;
                stat[stat_off + (b * lq + row / g) * hq + h] = m_s[t] + f32::ln(l_s[t]);
            }
        }
        if comptime![cfg.mass] {
            // Each thread revisits the keys it scored itself (same thread: no fence needed).
            let mut jj = t;
            while jj < lcap {
                for i in 0..lq {
                    let mut total = 0.0f32.runtime();
                    if jj < len && jj <= offset + i {
                        for gg in 0..g {
                            let r = i * g + gg;
                            total += f32::exp(work[sc_off + (sbase + r) * lcap + jj] - m_s[r]) / l_s[r];
                        }
                    }
                    stat[stat_off + ((b * hkv + kvh) * lq + i) * lcap + jj] = total / f32::cast_from(g);
                }
                jj += tile;
            }
        }
    } else {
        let mut idx = t;
        while idx < rd {
            let r = idx / d;
            if r < nrows {
                work[op_off + ((sbase + r) * n_splits + split) * d + idx % d] = acc_s[idx];
            }
            idx += tile;
        }
        if t < nrows {
            work[ml_off + ((sbase + t) * n_splits + split) * 2] = m_s[t];
            work[ml_off + ((sbase + t) * n_splits + split) * 2 + 1] = l_s[t];
        }
    }
}

/// Most splits [`decode_combine()`] merges (its weights live in shared memory); plans never make more.
pub const MAX_SPLITS: usize = 512;

/// Phase 2: merges the splits of one query row. Grid `(Hkv·G·Lq, B)`, `D` threads (one per output dim).
/// Writes `o`, `lse` (when `write_lse`), and the row's global `(m, l)` into `work` at `rml_off` for
/// [`mass_finalize()`]. The splits' maxima and weights are spread over the threads (no thread walks every split
/// twice); each thread then sums its dim over the splits with the weights from shared memory.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn decode_combine<E: Float>(
    work: &mut [f32],
    o: &mut [E],
    lse: &mut [f32],
    op_off: usize,
    ml_off: usize,
    rml_off: usize,
    o_off: usize,
    lse_off: usize,
    hkv: usize,
    g: usize,
    lq: usize,
    n_splits: usize,
    #[comptime] d: usize,
    #[comptime] write_lse: bool,
) {
    let dd = UNIT_POS as usize;
    let b = CUBE_POS_Y as usize;
    let grow = CUBE_POS_X as usize; // kvh·R + row
    let r_total = g * lq;
    let kvh = grow / r_total;
    let row = grow % r_total;
    let base = b * hkv * r_total + grow;
    let mut red = Shared::<[f32]>::new_slice(d);
    let mut w_s = Shared::<[f32]>::new_slice(MAX_SPLITS);
    let mut m_t = NEG.runtime();
    let mut sp = dd;
    while sp < n_splits {
        m_t = max(m_t, work[ml_off + (base * n_splits + sp) * 2]);
        sp += d;
    }
    red[dd] = m_t;
    sync_cube();
    let mut m = NEG.runtime();
    for i in 0..d {
        m = max(m, red[i]);
    }
    sync_cube();
    let mut l_t = 0.0f32.runtime();
    let mut sp = dd;
    while sp < n_splits {
        let ms = work[ml_off + (base * n_splits + sp) * 2];
        let mut w = 0.0f32.runtime();
        if !(ms == NEG) {
            w = f32::exp(ms - m);
            l_t += work[ml_off + (base * n_splits + sp) * 2 + 1] * w;
        }
        w_s[sp] = w;
        sp += d;
    }
    red[dd] = l_t;
    sync_cube();
    let mut l = 0.0f32.runtime();
    for i in 0..d {
        l += red[i];
    }
    let mut acc = 0.0f32.runtime();
    for sp in 0..n_splits {
        let w = w_s[sp];
        if !(w == 0.0) {
            acc += work[op_off + (base * n_splits + sp) * d + dd] * w;
        }
    }
    let h = kvh * g + row % g;
    let out = (b * lq + row / g) * hkv * g + h;
    o[o_off + out * d + dd] = E::cast_from(safe_div(acc, l));
    if dd == 0 {
        if comptime![write_lse] {
            lse[lse_off + out] = m + f32::ln(l);
        }
        work[rml_off + base * 2] = m;
        work[rml_off + base * 2 + 1] = l;
    }
}

/// Phase 3 (mass requested with several splits or row blocks): `mass_j = mean_g exp(s_gj − m_g)/l_g`.
/// Grid `(⌈L_cap/tile⌉, Hkv·Lq, B)`, `tile` threads, one key each; slots past the length or in the causal
/// future get 0.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn mass_finalize(
    work: &[f32],
    ints: &[u32],
    mass: &mut [f32],
    sc_off: usize,
    rml_off: usize,
    lens_off: usize,
    mass_off: usize,
    hkv: usize,
    g: usize,
    lq: usize,
    lcap: usize,
    #[comptime] tile: usize,
) {
    let j = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let kvh = CUBE_POS_Y as usize / lq;
    let i = CUBE_POS_Y as usize % lq;
    let b = CUBE_POS_Z as usize;
    if j < lcap {
        let len = live_len(ints[lens_off + b], lq, lcap);
        let r_total = g * lq;
        let base = (b * hkv + kvh) * r_total;
        let mut total = 0.0f32.runtime();
        if j < len && j + lq <= len + i {
            for gg in 0..g {
                let r = base + i * g + gg;
                total += f32::exp(work[sc_off + r * lcap + j] - work[rml_off + r * 2]) / work[rml_off + r * 2 + 1];
            }
        }
        mass[mass_off + ((b * hkv + kvh) * lq + i) * lcap + j] = total / f32::cast_from(g);
    }
}

//! The plane (warp) variant of [`super::decode_split()`]: same inputs, outputs, partial format and masking, laid
//! out for devices with plane shuffles so that no cube-wide barrier sits in the key loop.
//!
//! ## Layout
//! A key row of `D/N` vectors is shared by `LK` adjacent lanes of a plane (`LK` a power of two dividing the plane
//! size); lane `ln` of the group owns the vectors `ln + i·LK`, `i < VPL = D/(N·LK)`, of every key and value row
//! it reads — a group's lanes read adjacent vectors, so every load is coalesced — and keeps the group's query
//! rows at those dims in registers (pre-rotated and pre-scaled). A plane holds `P/LK` groups; each group takes
//! `U` keys per iteration, so a plane takes `KW = U·P/LK` keys and a cube of `W` planes `W·KW` keys per
//! iteration, all their K and V loads issued before any arithmetic.
//!
//! ## Per iteration (every plane on its own: no barrier)
//! Partial dot products over the lane's dims, summed over the group by `log₂ LK` xor shuffles; masked slots get
//! [`NEG`]; the plane's running maximum per row by one plane max; the accumulator rescaled only when that maximum
//! moved; `p = exp(s − m)` and `acc += p·v` for the lane's dims. Per-slot scores for the mass are written by the
//! group's lane 0.
//!
//! ## End
//! The groups of a plane are summed by xor shuffles, the planes of a cube merged through shared memory (`W·rows`
//! maxima, sums and `D`-vectors), then written exactly as the tiled kernel writes them: `o`, the lse or the mass
//! (one split), or the split partials `(acc, m, l)` for [`super::decode_combine()`].
//!
//! ## RoPE
//! With `VPL` even, vector `i < VPL/2` of a lane and vector `i + VPL/2` are dims `d` and `d + D/2`, a rotate-half
//! pair: the lane rotates its own keys with one angle per pair (the table of [`crate::rope`] in shared memory).

use super::{live_len, safe_div, NEG};
use crate::rope::rope_cos_sin;
use cubecl::prelude::*;

/// Comptime shape of one [`decode_lanes()`] variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LanesConfig {
    /// Head dimension `D` (a multiple of `vec · lanes`).
    pub d: usize,
    /// Vector width `N` of the K/V loads (must equal the launch's vector size).
    pub vec: usize,
    /// Lanes per key row `LK` (a power of two dividing `plane`).
    pub lanes: usize,
    /// Plane size `P` of the device (the cube is `warps · P` units).
    pub plane: usize,
    /// Planes per cube `W`.
    pub warps: usize,
    /// Keys per lane group and iteration `U`.
    pub keys: usize,
    /// Query rows a cube handles (rows past the ones it is given are masked).
    pub rows: usize,
    /// One split: normalise and write `o` (and `lse` or `mass` into `stat`) directly; otherwise write partials.
    pub single: bool,
    /// With `single`: write the lse into `stat` (`mass` must then be off).
    pub lse: bool,
    /// Write the scores scratch (and, with `single`, the mass itself into `stat`).
    pub mass: bool,
    /// Rotate the (pre-RoPE) query and keys in the kernel; needs `D/(vec·lanes)` even.
    pub rope: bool,
    /// Issue the next iteration's loads before this iteration's arithmetic (twice the load registers).
    pub prefetch: bool,
}

impl LanesConfig {
    /// Keys a cube takes per iteration (split lengths are multiples of it).
    pub fn keys_per_iteration(&self) -> usize {
        self.warps * self.plane / self.lanes * self.keys
    }
}

/// This lane's K and V vectors of the `U` keys of its group at `base` (keys at or past `end` are not loaded).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_keys<E: Float, N: Size>(
    k: &[Vector<E, N>],
    v: &[Vector<E, N>],
    kb: &mut Array<Vector<E, N>>,
    vb: &mut Array<Vector<E, N>>,
    kbase: usize,
    vbase: usize,
    k_sl: usize,
    v_sl: usize,
    base: usize,
    end: usize,
    grp: usize,
    ln: usize,
    #[comptime] cfg: LanesConfig,
) {
    let vpl = comptime![cfg.d / cfg.vec / cfg.lanes];
    let gpp = comptime![cfg.plane / cfg.lanes];
    #[unroll]
    for u in 0..cfg.keys {
        let j = base + u * gpp + grp;
        if j < end {
            #[unroll]
            for i in 0..vpl {
                kb[u * vpl + i] = k[kbase + j * k_sl + ln + i * cfg.lanes];
                vb[u * vpl + i] = v[vbase + j * v_sl + ln + i * cfg.lanes];
            }
        }
    }
}

/// Phase 1 of decode attention, plane layout (see the module docs). Grid `(n_splits, Hkv, B·n_rb)`,
/// `warps · plane` units; the arguments are those of [`super::decode_split()`].
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn decode_lanes<E: Float, N: Size>(
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
    #[comptime] cfg: LanesConfig,
) {
    let d = cfg.d;
    let vec = cfg.vec;
    let rows = cfg.rows;
    let lk = cfg.lanes;
    let nk = cfg.keys;
    let warps = cfg.warps;
    let vpl = comptime![cfg.d / cfg.vec / cfg.lanes];
    let hv = comptime![cfg.d / cfg.vec / cfg.lanes / 2];
    let gpp = comptime![cfg.plane / cfg.lanes];
    let kw = comptime![cfg.plane / cfg.lanes * cfg.keys];
    let kc = comptime![cfg.warps * cfg.plane / cfg.lanes * cfg.keys];
    let threads = comptime![cfg.warps * cfg.plane];
    let shuffles_in = comptime![cfg.lanes.trailing_zeros() as usize];
    let shuffles_out = comptime![(cfg.plane / cfg.lanes).trailing_zeros() as usize];

    let t = UNIT_POS as usize;
    let w = t / cfg.plane;
    let lane = t % cfg.plane;
    let grp = lane / lk;
    let ln = lane % lk;
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

    let mut tab_s = Shared::<[f32]>::new_slice(comptime![if cfg.rope { cfg.d / 2 * 6 } else { 1 }]);
    if comptime![cfg.rope] {
        let mut i = t;
        while i < comptime![cfg.d / 2 * 6] {
            tab_s[i] = work[i];
            i += threads;
        }
        sync_cube();
    }

    // The query rows at this lane's dims, rotated and scaled: `qr[(r·VPL + i)·N + e]`.
    let half = comptime![cfg.d / 2];
    let mut qr = Array::<f32>::new(comptime![cfg.rows * cfg.d / cfg.lanes]);
    #[unroll]
    for r in 0..rows {
        #[unroll]
        for i in 0..vpl {
            #[unroll]
            for e in 0..vec {
                let mut x = 0.0f32.runtime();
                if r < nrows {
                    let row = row0 + r;
                    let h = kvh * g + row % g;
                    let base = q_off + b * q_sb + (row / g) * q_sl + h * q_sh;
                    let dim = (ln + i * lk) * vec + e;
                    x = f32::cast_from(q[base + dim]);
                    if comptime![cfg.rope] {
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
                qr[(r * vpl + i) * vec + e] = x;
            }
        }
    }

    let mut m_r = Array::<f32>::new(rows);
    let mut l_r = Array::<f32>::new(rows);
    let mut acc = Array::<f32>::new(comptime![cfg.rows * cfg.d / cfg.lanes]);
    #[unroll]
    for r in 0..rows {
        m_r[r] = NEG;
        l_r[r] = 0.0;
    }
    #[unroll]
    for x in 0..comptime![cfg.rows * cfg.d / cfg.lanes] {
        acc[x] = 0.0;
    }
    let mut kb = Array::<Vector<E, N>>::new(comptime![cfg.keys * cfg.d / cfg.vec / cfg.lanes]);
    let mut vb = Array::<Vector<E, N>>::new(comptime![cfg.keys * cfg.d / cfg.vec / cfg.lanes]);
    #[unroll]
    for x in 0..comptime![cfg.keys * cfg.d / cfg.vec / cfg.lanes] {
        kb[x] = Vector::new(E::from_int(0));
        vb[x] = Vector::new(E::from_int(0));
    }
    let mut s = Array::<f32>::new(comptime![cfg.keys * cfg.rows]);
    let mut kf = Array::<f32>::new(comptime![cfg.d / cfg.lanes]);
    let kbase = k_off + b * k_sb + kvh * k_sh;
    let vbase = v_off + b * v_sb + kvh * v_sh;
    let sbase = (b * hkv + kvh) * r_total + row0;

    // With `prefetch`, the next iteration's loads are issued before this one's arithmetic (into `kn`/`vn`).
    let mut kn = Array::<Vector<E, N>>::new(comptime![if cfg.prefetch { cfg.keys * cfg.d / cfg.vec / cfg.lanes } else { 1 }]);
    let mut vn = Array::<Vector<E, N>>::new(comptime![if cfg.prefetch { cfg.keys * cfg.d / cfg.vec / cfg.lanes } else { 1 }]);
    let mut base = start + w * kw;
    if comptime![cfg.prefetch] {
        load_keys::<E, N>(k, v, &mut kn, &mut vn, kbase, vbase, k_sl, v_sl, base, end, grp, ln, cfg);
    }
    while base < end {
        if comptime![cfg.prefetch] {
            #[unroll]
            for x in 0..comptime![cfg.keys * cfg.d / cfg.vec / cfg.lanes] {
                kb[x] = kn[x];
                vb[x] = vn[x];
            }
            load_keys::<E, N>(k, v, &mut kn, &mut vn, kbase, vbase, k_sl, v_sl, base + kc, end, grp, ln, cfg);
        } else {
            load_keys::<E, N>(k, v, &mut kb, &mut vb, kbase, vbase, k_sl, v_sl, base, end, grp, ln, cfg);
        }
        // Scores: this lane's dims, then the group's sum.
        #[unroll]
        for u in 0..nk {
            #[unroll]
            for r in 0..rows {
                s[u * rows + r] = 0.0;
            }
            if comptime![cfg.rope] {
                let j = base + u * gpp + grp;
                let mut pos = 0u32.runtime();
                if j < end {
                    pos = ints[kp_off + b * kp_sb + kvh * kp_sh + j];
                }
                #[unroll]
                for i in 0..hv {
                    let ka = kb[u * vpl + i];
                    let kz = kb[u * vpl + i + hv];
                    #[unroll]
                    for e in 0..vec {
                        let (c, sn) = rope_cos_sin(&tab_s, (ln + i * lk) * vec + e, pos);
                        let xa = f32::cast_from(ka.extract(e));
                        let xb = f32::cast_from(kz.extract(e));
                        kf[i * vec + e] = xa * c - xb * sn;
                        kf[(i + hv) * vec + e] = xb * c + xa * sn;
                    }
                }
            } else {
                #[unroll]
                for i in 0..vpl {
                    let kv = kb[u * vpl + i];
                    #[unroll]
                    for e in 0..vec {
                        kf[i * vec + e] = f32::cast_from(kv.extract(e));
                    }
                }
            }
            #[unroll]
            for x in 0..comptime![cfg.d / cfg.lanes] {
                #[unroll]
                for r in 0..rows {
                    s[u * rows + r] += qr[r * comptime![cfg.d / cfg.lanes] + x] * kf[x];
                }
            }
        }
        let mut mask = comptime![(cfg.lanes / 2) as u32].runtime();
        #[unroll]
        for _step in 0..shuffles_in {
            #[unroll]
            for x in 0..comptime![cfg.keys * cfg.rows] {
                s[x] += plane_shuffle_xor(s[x], mask);
            }
            mask /= 2;
        }
        #[unroll]
        for u in 0..nk {
            let j = base + u * gpp + grp;
            #[unroll]
            for r in 0..rows {
                let visible = j < end && r < nrows && j <= offset + (row0 + r) / g;
                if !visible {
                    s[u * rows + r] = NEG;
                }
                if comptime![cfg.mass] {
                    if visible && ln == 0 {
                        work[sc_off + (sbase + r) * lcap + j] = s[u * rows + r];
                    }
                }
            }
        }
        // Online softmax per row: the plane's maximum, a rescale only when it moved, then the numerators.
        #[unroll]
        for r in 0..rows {
            let mut tm = NEG.runtime();
            #[unroll]
            for u in 0..nk {
                tm = max(tm, s[u * rows + r]);
            }
            // Every lane of a group holds its keys' scores: the maximum over the groups is enough.
            let mut mask = comptime![cfg.lanes as u32].runtime();
            #[unroll]
            for _step in 0..shuffles_out {
                tm = max(tm, plane_shuffle_xor(tm, mask));
                mask *= 2;
            }
            let m_new = max(m_r[r], tm);
            // Uniform over the plane; an unchanged maximum needs no rescale (NEG → finite gives alpha = 0).
            if m_new > m_r[r] {
                let alpha = f32::exp(m_r[r] - m_new);
                m_r[r] = m_new;
                l_r[r] *= alpha;
                #[unroll]
                for x in 0..comptime![cfg.d / cfg.lanes] {
                    acc[r * comptime![cfg.d / cfg.lanes] + x] *= alpha;
                }
            }
            #[unroll]
            for u in 0..nk {
                let sv = s[u * rows + r];
                let mut p = 0.0f32.runtime();
                if !(sv == NEG) {
                    p = f32::exp(sv - m_new);
                }
                s[u * rows + r] = p;
            }
        }
        #[unroll]
        for u in 0..nk {
            #[unroll]
            for i in 0..vpl {
                let vv = vb[u * vpl + i];
                #[unroll]
                for e in 0..vec {
                    kf[i * vec + e] = f32::cast_from(vv.extract(e));
                }
            }
            #[unroll]
            for r in 0..rows {
                let p = s[u * rows + r];
                // Skip exact zeros (masked slots): 0·inf in a row's future must not make it NaN.
                if !(p == 0.0) {
                    l_r[r] += p;
                    #[unroll]
                    for x in 0..comptime![cfg.d / cfg.lanes] {
                        acc[r * comptime![cfg.d / cfg.lanes] + x] += p * kf[x];
                    }
                }
            }
        }
        base += kc;
    }

    // The plane's groups summed (every lane of a group holds the same `l`), then the planes merged.
    let mut mask = comptime![cfg.lanes as u32].runtime();
    #[unroll]
    for _step in 0..shuffles_out {
        #[unroll]
        for r in 0..rows {
            l_r[r] += plane_shuffle_xor(l_r[r], mask);
        }
        #[unroll]
        for x in 0..comptime![cfg.rows * cfg.d / cfg.lanes] {
            acc[x] += plane_shuffle_xor(acc[x], mask);
        }
        mask *= 2;
    }
    let mut wm = Shared::<[f32]>::new_slice(comptime![cfg.warps * cfg.rows]);
    let mut wl = Shared::<[f32]>::new_slice(comptime![cfg.warps * cfg.rows]);
    let mut wacc = Shared::<[f32]>::new_slice(comptime![cfg.warps * cfg.rows * cfg.d]);
    let mut fin = Shared::<[f32]>::new_slice(comptime![2 * cfg.rows]);
    if lane == 0 {
        #[unroll]
        for r in 0..rows {
            wm[w * rows + r] = m_r[r];
            wl[w * rows + r] = l_r[r];
        }
    }
    if grp == 0 {
        #[unroll]
        for r in 0..rows {
            #[unroll]
            for i in 0..vpl {
                #[unroll]
                for e in 0..vec {
                    wacc[(w * rows + r) * d + (ln + i * lk) * vec + e] = acc[(r * vpl + i) * vec + e];
                }
            }
        }
    }
    sync_cube();
    let mut idx = t;
    while idx < comptime![cfg.rows * cfg.d] {
        let r = idx / d;
        let dim = idx % d;
        let mut mm = NEG.runtime();
        #[unroll]
        for w2 in 0..warps {
            mm = max(mm, wm[w2 * rows + r]);
        }
        let mut ll = 0.0f32.runtime();
        let mut aa = 0.0f32.runtime();
        #[unroll]
        for w2 in 0..warps {
            let mw = wm[w2 * rows + r];
            if !(mw == NEG) {
                let f = f32::exp(mw - mm);
                ll += wl[w2 * rows + r] * f;
                aa += wacc[(w2 * rows + r) * d + dim] * f;
            }
        }
        if r < nrows {
            let row = row0 + r;
            if comptime![cfg.single] {
                let h = kvh * g + row % g;
                let out = (b * lq + row / g) * hq + h;
                o[o_off + out * d + dim] = E::cast_from(safe_div(aa, ll));
                if comptime![cfg.lse] {
                    if dim == 0 {
                        stat[stat_off + out] = mm + f32::ln(ll);
                    }
                }
            } else {
                work[op_off + ((sbase + r) * n_splits + split) * d + dim] = aa;
                if dim == 0 {
                    work[ml_off + ((sbase + r) * n_splits + split) * 2] = mm;
                    work[ml_off + ((sbase + r) * n_splits + split) * 2 + 1] = ll;
                }
            }
        }
        if dim == 0 {
            fin[2 * r] = mm;
            fin[2 * r + 1] = ll;
        }
        idx += threads;
    }

    if comptime![cfg.single && cfg.mass] {
        // One split holds every row of the group (the plan guarantees it). Each group's lane 0 revisits the keys
        // whose scores it wrote (same unit: no fence needed); slots past the length are zeros.
        sync_cube();
        let mut base = w * kw;
        while base < len {
            #[unroll]
            for u in 0..nk {
                let j = base + u * gpp + grp;
                if j < len && ln == 0 {
                    for i in 0..lq {
                        let mut total = 0.0f32.runtime();
                        if j <= offset + i {
                            for gg in 0..g {
                                let r = i * g + gg;
                                total += f32::exp(work[sc_off + (sbase + r) * lcap + j] - fin[2 * r]) / fin[2 * r + 1];
                            }
                        }
                        stat[stat_off + ((b * hkv + kvh) * lq + i) * lcap + j] = total / f32::cast_from(g);
                    }
                }
            }
            base += kc;
        }
        let mut jj = len + t;
        while jj < lcap {
            for i in 0..lq {
                stat[stat_off + ((b * hkv + kvh) * lq + i) * lcap + jj] = 0.0;
            }
            jj += threads;
        }
    }
}

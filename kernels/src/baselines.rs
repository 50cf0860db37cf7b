//! The baseline eviction rules on the device (spec §5; reference `kvsqueeze-reference::baselines` and
//! `policy.rs`): the region argmin by which H2O (accumulated attention `S`), TOVA (this step's attention) and
//! WeightedKV (average attention `S/C`) pick their victim inside [`crate::policy::policy_step()`], and SnapKV's
//! prompt selection (pooled window attention, top-k).

use crate::policy::{Rule, FREE};
use cubecl::prelude::*;

/// The rank in `[lo, end)` with the smallest score by `rule` (ties: the leftmost): H2O `S`, TOVA this step's
/// `mass`, the others the average `S/C`. The cache's packed state (see [`crate::policy`]): `ints[ob + q]` is the
/// slot of rank `q`; `S`, `C` and the mass are read at `fl[sb + slot]`, `fl[cb + slot]` and `mass[mb + slot]`.
/// Cooperative over the cube's `threads` units (`vals`/`idxs`: one entry per unit); every unit gets the winner.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn region_argmin(
    ints: &mut [u32],
    fl: &mut [f32],
    mass: &[f32],
    ob: usize,
    sb: usize,
    cb: usize,
    mb: usize,
    lo: usize,
    end: usize,
    vals: &mut Shared<[f32]>,
    idxs: &mut Shared<[u32]>,
    #[comptime] rule: Rule,
    #[comptime] threads: usize,
) -> u32 {
    let mut best = f32::MAX.runtime();
    let mut best_q = u32::MAX.runtime();
    let mut q = lo + UNIT_POS as usize;
    while q < end {
        let s = ints[ob + q] as usize;
        let val = if comptime![rule == Rule::H2o] {
            fl[sb + s]
        } else if comptime![rule == Rule::Tova] {
            mass[mb + s]
        } else {
            fl[sb + s] / fl[cb + s]
        };
        if val < best || best_q == u32::MAX {
            best = val;
            best_q = q as u32;
        }
        q += threads;
    }
    argmin_leftmost(best, best_q, vals, idxs)
}

/// Leftmost minimum over `(value, rank)` pairs held one per thread; every thread gets the winning rank.
/// `vals`/`idxs` hold one entry per unit of the cube (a power of two).
#[cube]
pub fn argmin_leftmost(v: f32, q: u32, vals: &mut Shared<[f32]>, idxs: &mut Shared<[u32]>) -> u32 {
    let t = UNIT_POS as usize;
    vals[t] = v;
    idxs[t] = q;
    sync_cube();
    // A runtime counter (a comptime initial value would freeze the loop at expansion time).
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if t < stride {
            let va = vals[t];
            let qa = idxs[t];
            let vb = vals[t + stride];
            let qb = idxs[t + stride];
            if vb < va || (vb == va && qb < qa) {
                vals[t] = vb;
                idxs[t] = qb;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let winner = idxs[0];
    winner
}

/// SnapKV prefill, phase 1 (spec §5.3; reference `kvsqueeze-reference::baselines::snapkv_select`): for every
/// token `j < n = L − w` before the observation window, `s_j = Σ_{i<w} mass[b, h, i, j]` pooled over
/// `j − kernel/2 ..= j + kernel/2` (clipped to `[0, n)`; average counts the padding as zeros, like PyTorch's
/// default) into `pooled: [B, Hkv, n]`. Grid `(⌈n/tile⌉, Hkv, B)`, thread = token.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn snapkv_scores(mass: &[f32], pooled: &mut [f32], hkv: usize, w: usize, l: usize, n: usize, kernel: usize, #[comptime] max_pool: bool, #[comptime] tile: usize) {
    let j = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    if j < n {
        let half = kernel / 2;
        let lo = j - min(j, half);
        let hi = min(j + half + 1, n);
        let mut acc = 0.0f32.runtime();
        let mut best = f32::MIN.runtime();
        for jj in lo..hi {
            let mut s = 0.0f32.runtime();
            for i in 0..w {
                s += mass[((b * hkv + h) * w + i) * l + jj];
            }
            acc += s;
            best = max(best, s);
        }
        let mut out = acc / f32::cast_from(kernel);
        if comptime![max_pool] {
            out = best;
        }
        pooled[(b * hkv + h) * n + j] = out;
    }
}

/// The order-preserving unsigned key of an f32 (larger float ⇒ larger key; −0 < +0 is harmless here).
#[cube]
fn order_key(x: f32) -> u32 {
    let bits = u32::reinterpret(x);
    let mut k = bits | 0x8000_0000u32;
    if bits >= 0x8000_0000u32 {
        k = !bits;
    }
    k
}

/// SnapKV prefill, phase 2: keeps the `sel` tokens with the largest pooled score (ties: the earlier token), by a
/// 32-step radix select of the `sel`-th largest key and a chunked compaction, then the `w` window tokens; writes
/// the kept positions ascending to `kept[b, h, 0..sel + w]` and [`FREE`] to the rest of the `cap` entries. Grid
/// `(Hkv, B)`, `tile` threads, each owning a contiguous chunk of tokens (`O(32·n/tile)` per thread).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn snapkv_topk(pooled: &[f32], kept: &mut [u32], hkv: usize, l: usize, n: usize, sel: usize, cap: usize, #[comptime] tile: usize) {
    let t = UNIT_POS as usize;
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let head = b * hkv + h;
    let pbase = head * n;
    let obase = head * cap;
    let per = (n + tile - 1) / tile;
    let c0 = min(t * per, n);
    let c1 = min(c0 + per, n);
    let mut red = Shared::<[u32]>::new_slice(comptime![2 * tile]);
    // Radix select: the largest threshold `thr` with #{key ≥ thr} ≥ sel is the sel-th largest key.
    let mut thr = 0u32.runtime();
    for r in 0..32u32 {
        let cand = thr | (1u32 << (31 - r));
        let mut cnt = 0u32.runtime();
        for j in c0..c1 {
            if order_key(pooled[pbase + j]) >= cand {
                cnt += 1;
            }
        }
        red[t] = cnt;
        sync_cube();
        let mut total = 0u32.runtime();
        for i in 0..tile {
            total += red[i];
        }
        sync_cube();
        if total as usize >= sel {
            thr = cand;
        }
    }
    // Per chunk: how many strictly above, how many equal; exclusive prefix sums over the chunks.
    let mut gt = 0u32.runtime();
    let mut eq = 0u32.runtime();
    for j in c0..c1 {
        let key = order_key(pooled[pbase + j]);
        if key > thr {
            gt += 1;
        } else if key == thr {
            eq += 1;
        }
    }
    red[t] = gt;
    red[tile + t] = eq;
    sync_cube();
    let mut gt_all = 0u32.runtime();
    let mut eq_before = 0u32.runtime();
    let mut out_before = 0u32.runtime();
    for i in 0..tile {
        gt_all += red[i];
    }
    let need_eq = sel as u32 - gt_all;
    for i in 0..t {
        eq_before += red[tile + i];
        out_before += red[i];
    }
    // Selected equals before this chunk: min(eq_before, need_eq).
    out_before += min(eq_before, need_eq);
    let mut o = out_before as usize;
    let mut e = eq_before;
    for j in c0..c1 {
        let key = order_key(pooled[pbase + j]);
        let mut take = key > thr;
        if key == thr {
            take = e < need_eq;
            e += 1;
        }
        if take {
            kept[obase + o] = j as u32;
            o += 1;
        }
    }
    // The observation window, then padding.
    for i in 0..(cap + tile - 1) / tile {
        let idx = i * tile + t;
        if idx >= sel && idx < cap {
            let mut val = FREE.runtime();
            if idx < sel + l - n {
                val = (n + idx - sel) as u32;
            }
            kept[obase + idx] = val;
        }
    }
}

//! The fixed-budget cache's device step (spec §2, §3, §5; host side in `kvsqueeze::policy`).
//!
//! Per (sequence `b`, KV head `h`) the cache has `cap + 1` physical slots (the new token is appended before
//! one entry is evicted), and four small arrays: `order: [cap+1]` (rank → slot), `rank: [cap+1]` (slot → rank,
//! `FREE` for the free slot), `score: [cap+1]` (`S`, f32) and `count: [cap+1]` (`C`, f32). K/V rows never move;
//! evicting rank `r` shifts `order[r+1..len]` down by one (4 bytes per slot, against the `2·D·elem` bytes per
//! slot attention reads) and frees one slot, which the next token fills.
//!
//! `order` is double-buffered per sequence: `order: [2, B, Hkv, cap+1]`, and an evicting step reads the half its
//! sequence's parity names and writes the shifted order into the other, so the shift needs no barrier.
//!
//! Per-sequence state lives on the device (continuous batching, no per-step upload): `seq: [2, B, 4]` u32 holds,
//! per sequence, `(len, seen, evictions, flags)` — entries held, tokens streamed (the next original position),
//! evictions so far (TreeKV's pointer), and flags (bit 0 active, bit 1 order parity). It is double-buffered by
//! step: a step reads the half at `cur` and [`policy_step()`] writes the next state into the other (the host
//! alternates `cur`, which is a choice of launch scalar, not an upload). [`policy_append()`] also writes
//! `att: [2, B]` — each sequence's attention length (`len + 1`, or 0 when inactive) and its query's cache rank
//! (`len`) — which decode attention reads as its lengths and RoPE query positions.
//!
//! [`policy_append()`] writes the new token into the free slot; after decode attention has written the per-slot
//! mass, [`policy_step()`] accumulates `S += mass`, `C += 1` on every valid slot and, when `len > cap`, removes one
//! rank of the region `[sinks, len − recent)` by the policy's rule (ties: the leftmost rank), merging values for
//! WeightedKV. The rules are those of `kvsqueeze-reference` (`policy.rs`, `treekv.rs`, `weightedkv.rs`,
//! `baselines.rs`).

use cubecl::prelude::*;

/// Marks the free slot in `rank`.
pub const FREE: u32 = u32::MAX;

/// Which rule [`policy_step()`] applies (comptime: one kernel variant per policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Keep everything (no eviction; the step only accumulates).
    Full,
    /// Evict the region's oldest rank.
    StreamingLlm,
    /// Evict the region's smallest accumulated `S`.
    H2o,
    /// Evict the region's smallest current mass.
    Tova,
    /// The pair `(sinks + ptr, sinks + ptr + 1)`: evict the right one if `S̄` of the left is larger, else the
    /// left; `select_left` always the left.
    TreeKv {
        /// The ablation.
        select_left: bool,
    },
    /// Smallest `S̄` among the region's first `middle` ranks; its value merges into the next rank's.
    WeightedKv,
}

/// Seq-state fields (see the module docs).
pub const SEQ_LEN: usize = 0;
/// Tokens streamed.
pub const SEQ_SEEN: usize = 1;
/// Evictions so far.
pub const SEQ_EVICTIONS: usize = 2;
/// Bit 0 active, bit 1 order parity.
pub const SEQ_FLAGS: usize = 3;
/// Words per sequence in `seq`.
pub const SEQ_WORDS: usize = 4;

/// Writes each active sequence's new token into its free slot. Grid `(Hkv, B)`, `D` threads. Reads the
/// per-sequence state at `seq[cur_base + b·4 ..]`; the token's original position is `seen`, its rank `len`; the
/// free slot is `free[b·Hkv + h]`. `k_new, v_new: [B, Hkv, D]` contiguous from element `kn_off` / `vn_off`. Writes
/// `att` (attention length and query rank) for every sequence.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn policy_append<E: Float>(
    k_new: &[E],
    v_new: &[E],
    k: &mut [E],
    v: &mut [E],
    order: &mut [u32],
    rank: &mut [u32],
    score: &mut [f32],
    count: &mut [f32],
    pos: &mut [u32],
    free: &[u32],
    seq: &[u32],
    att: &mut [u32],
    kn_off: usize,
    vn_off: usize,
    cur_base: usize,
    nb: usize,
    hkv: usize,
    cap1: usize,
    d: usize,
) {
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let dd = UNIT_POS as usize;
    let head = b * hkv + h;
    let st = cur_base + b * SEQ_WORDS;
    let flags = seq[st + SEQ_FLAGS];
    let len = seq[st + SEQ_LEN];
    if (flags & 1u32) == 1u32 {
        let slot = free[head] as usize;
        let row = (head * cap1 + slot) * d;
        if dd < d {
            k[row + dd] = k_new[kn_off + head * d + dd];
            v[row + dd] = v_new[vn_off + head * d + dd];
        }
        if dd == 0 {
            let half = ((flags >> 1u32) & 1u32) as usize * nb * hkv * cap1;
            let l = len as usize;
            order[half + head * cap1 + l] = slot as u32;
            rank[head * cap1 + slot] = len;
            score[head * cap1 + slot] = 0.0;
            count[head * cap1 + slot] = 0.0;
            pos[head * cap1 + slot] = seq[st + SEQ_SEEN];
        }
    }
    if h == 0 && dd == 0 {
        let mut n = 0u32.runtime();
        if (flags & 1u32) == 1u32 {
            n = len + 1;
        }
        att[b] = n;
        att[nb + b] = len;
    }
}

/// Leftmost minimum over `(value, rank)` pairs held one per thread; every thread gets the winning rank.
/// `vals`/`idxs` hold one entry per unit of the cube (a power of two).
#[cube]
fn argmin_leftmost(v: f32, q: u32, vals: &mut Shared<[f32]>, idxs: &mut Shared<[u32]>) -> u32 {
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

/// Accumulates the step's mass and evicts (or merges) one rank when over budget, for every active sequence.
/// Grid `(Hkv, B)`, `threads` units. `mass: [B, Hkv, cap+1]` (decode attention's output for one query token).
/// Reads the sequence's state at `seq[cur_base + b·4 ..]` (valid slots after the append: `len + 1`; TreeKV's
/// pointer: `evictions mod middle`) and writes the next state at `seq[next_base + b·4 ..]` (cube `h = 0`; an
/// inactive sequence's state is carried over). Writes the slot the next token will use into `free`, and, when it
/// evicts, the new rank → slot order into the other half of `order` (the parity flips).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn policy_step<E: Float>(
    mass: &[f32],
    v: &mut [E],
    order: &mut [u32],
    rank: &mut [u32],
    score: &mut [f32],
    count: &mut [f32],
    free: &mut [u32],
    seq: &mut [u32],
    cur_base: usize,
    next_base: usize,
    nb: usize,
    hkv: usize,
    cap1: usize,
    d: usize,
    sinks: usize,
    middle: usize,
    recent: usize,
    #[comptime] rule: Rule,
    #[comptime] threads: usize,
) {
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let t = UNIT_POS as usize;
    let head = b * hkv + h;
    let base = head * cap1;
    let st = cur_base + b * SEQ_WORDS;
    let flags = seq[st + SEQ_FLAGS];
    let active = (flags & 1u32) == 1u32;
    let held = seq[st + SEQ_LEN] as usize;
    let evictions = seq[st + SEQ_EVICTIONS];
    let parity = (flags >> 1u32) & 1u32;
    let cur_half = parity as usize * nb * hkv * cap1;
    let next_half = (1 - parity as usize) * nb * hkv * cap1;
    // Valid slots after the append; an inactive sequence has none (every loop below is empty for it, and the
    // barriers are reached by the whole cube either way: the condition is uniform per cube).
    let mut l = 0usize.runtime();
    if active {
        l = held + 1;
    }
    let mut ptr = 0u32.runtime();
    if middle > 0 {
        ptr = evictions % (middle as u32);
    }
    let cap = cap1 - 1;
    let mut vals = Shared::<[f32]>::new_slice(threads);
    let mut idxs = Shared::<[u32]>::new_slice(threads);

    // S += mass, C += 1 on every valid slot (slot order; a slot is valid iff its rank is < len).
    let mut slot = t;
    while slot < cap1 {
        if rank[base + slot] < l as u32 {
            score[base + slot] += mass[base + slot];
            count[base + slot] += 1.0;
        }
        slot += threads;
    }
    sync_cube();

    let mut evict = active && l > cap;
    if comptime![rule == Rule::Full] {
        evict = false;
    }
    if evict {
        let lo = sinks;
        let hi = l - recent; // region = ranks [lo, hi), middle + 1 of them
        let mut victim = lo as u32;
        if comptime![rule == Rule::StreamingLlm] {
            // The oldest rank of the region is `lo` already.
        } else if comptime![matches!(rule, Rule::TreeKv { .. })] {
            let a = lo + ptr as usize;
            if comptime![rule == Rule::TreeKv { select_left: true }] {
                victim = a as u32;
            } else {
                let sa = order[cur_half + base + a] as usize;
                let sb = order[cur_half + base + a + 1] as usize;
                let ma = score[base + sa] / count[base + sa];
                let mb = score[base + sb] / count[base + sb];
                victim = a as u32;
                if ma > mb {
                    victim = (a + 1) as u32;
                }
            }
        } else {
            // Argmin over the region (WeightedKV: its first `middle` ranks, the newest can only be the target).
            let mut end = hi;
            if comptime![rule == Rule::WeightedKv] {
                end = lo + middle;
            }
            let mut best = f32::MAX.runtime();
            let mut best_q = u32::MAX.runtime();
            let mut q = lo + t;
            while q < end {
                let s = order[cur_half + base + q] as usize;
                let val = if comptime![rule == Rule::H2o] {
                    score[base + s]
                } else if comptime![rule == Rule::Tova] {
                    mass[base + s]
                } else {
                    score[base + s] / count[base + s]
                };
                if val < best || best_q == u32::MAX {
                    best = val;
                    best_q = q as u32;
                }
                q += threads;
            }
            victim = argmin_leftmost(best, best_q, &mut vals, &mut idxs);
        }
        let r = victim as usize;
        let vslot = order[cur_half + base + r] as usize;
        if comptime![rule == Rule::WeightedKv] {
            // V[j+1] ← (ā_j·V[j] + ā_{j+1}·V[j+1]) / (ā_j + ā_{j+1}); equal weights if both are 0.
            let tslot = order[cur_half + base + r + 1] as usize;
            let mut wa = score[base + vslot] / count[base + vslot];
            let mut wb = score[base + tslot] / count[base + tslot];
            if !(wa + wb > 0.0) {
                wa = 1.0;
                wb = 1.0;
            }
            let mut dd = t;
            while dd < d {
                let src = f32::cast_from(v[(base + vslot) * d + dd]);
                let dst = f32::cast_from(v[(base + tslot) * d + dd]);
                v[(base + tslot) * d + dd] = E::cast_from((wa * src + wb * dst) / (wa + wb));
                dd += threads;
            }
        }
        // Ranks above r move down by one; the victim's slot becomes free.
        let mut s2 = t;
        while s2 < cap1 {
            let rk = rank[base + s2];
            if rk != FREE && rk > victim {
                rank[base + s2] = rk - 1;
            }
            s2 += threads;
        }
        // The new order, written to the other buffer (no read/write hazard, no barrier): rank r is gone.
        let mut q = t;
        while q < l - 1 {
            let mut src = q;
            if q >= r {
                src = q + 1;
            }
            order[next_half + base + q] = order[cur_half + base + src];
            q += threads;
        }
        if t == 0 {
            rank[base + vslot] = FREE;
            free[head] = vslot as u32;
        }
    } else if active {
        if t == 0 {
            free[head] = l as u32;
        }
    }
    // The sequence's next state (one writer per sequence).
    if h == 0 && t == 0 {
        let nx = next_base + b * SEQ_WORDS;
        if active {
            let mut ev = 0u32.runtime();
            if evict {
                ev = 1;
            }
            seq[nx + SEQ_LEN] = (l - ev as usize) as u32;
            seq[nx + SEQ_SEEN] = seq[st + SEQ_SEEN] + 1;
            seq[nx + SEQ_EVICTIONS] = evictions + ev;
            seq[nx + SEQ_FLAGS] = 1u32 | ((parity ^ ev) << 1u32);
        } else {
            seq[nx + SEQ_LEN] = seq[st + SEQ_LEN];
            seq[nx + SEQ_SEEN] = seq[st + SEQ_SEEN];
            seq[nx + SEQ_EVICTIONS] = evictions;
            seq[nx + SEQ_FLAGS] = flags;
        }
    }
}

/// TreeKV block prefill, phase 1 (spec §2.4; reference `kvsqueeze-reference::treekv::prefill_blocks`): the
/// score of every block but the last (the observation window), `scores[b, h, blk] = (1/bsz)·Σ_{i<w} Σ_{j∈blk}
/// mass[b, h, i, j]` from decode attention's group-mean probabilities of the `w` window queries
/// (`mass: [B, Hkv, w, L]`). Grid `(⌈nb1/tile⌉, Hkv, B)`, thread = block.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn treekv_block_scores(mass: &[f32], scores: &mut [f32], hkv: usize, w: usize, l: usize, bsz: usize, nb1: usize, #[comptime] tile: usize) {
    let blk = CUBE_POS_X as usize * tile + UNIT_POS as usize;
    let h = CUBE_POS_Y as usize;
    let b = CUBE_POS_Z as usize;
    if blk < nb1 {
        let mut acc = 0.0f32.runtime();
        for i in 0..w {
            let row = ((b * hkv + h) * w + i) * l + blk * bsz;
            for j in 0..bsz {
                acc += mass[row + j];
            }
        }
        scores[(b * hkv + h) * nb1 + blk] = acc / f32::cast_from(bsz);
    }
}

/// TreeKV block prefill, phase 2: the cyclic pair scan over the static block scores (spec §2.2 rule, ties evict
/// the left, `select_left` always evicts the left), keeping `keep − 1` blocks, then the observation block. Writes
/// the kept token positions, ascending, to `kept[b, h, 0..n]` and [`FREE`] to the rest of the `cap` entries;
/// `list: [B, Hkv, keep]` is scratch. Grid `(Hkv, B)`, one thread (a sequential rule: `O(nb1·keep)` steps).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn treekv_block_scan(scores: &[f32], list: &mut [u32], kept: &mut [u32], hkv: usize, l: usize, bsz: usize, nb1: usize, keep: usize, cap: usize, #[comptime] select_left: bool) {
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let head = b * hkv + h;
    let lbase = head * keep;
    let obase = head * cap;
    let sbase = head * nb1;
    let k1 = keep - 1;
    let mut n = 0usize.runtime();
    let mut idx = 0usize.runtime();
    if k1 > 0 {
        for i in 0..nb1 {
            list[lbase + n] = i as u32;
            n += 1;
            if n > k1 {
                let a = list[lbase + idx] as usize;
                let c = list[lbase + idx + 1] as usize;
                let mut r = idx;
                if !comptime![select_left] {
                    if scores[sbase + a] > scores[sbase + c] {
                        r = idx + 1;
                    }
                }
                for e in r..n - 1 {
                    list[lbase + e] = list[lbase + e + 1];
                }
                n -= 1;
                idx = (idx + 1) % k1;
            }
        }
    }
    let mut t = 0usize.runtime();
    for e in 0..n {
        let blk = list[lbase + e] as usize;
        for j in blk * bsz..blk * bsz + bsz {
            kept[obase + t] = j as u32;
            t += 1;
        }
    }
    for j in nb1 * bsz..l {
        kept[obase + t] = j as u32;
        t += 1;
    }
    for e in t..cap {
        kept[obase + e] = FREE;
    }
}

/// Installs a prompt's kept tokens into sequences `b0 .. b0 + nb` of a policy cache (admission; the other
/// sequences are untouched): for source sequence `b` and head `h`, slot `s < n` gets the K/V row of token
/// `kept[b, h, s]` of `k, v: [nb, Hkv, L, D]` (contiguous from elements `sk_off` / `sv_off`), rank `s` (order half 0), original position `kept[…]`, `S = C = 0`;
/// every other slot is freed; the next token goes to slot `n`; the sequence's state at `seq[cur_base + (b0 + b)·4
/// ..]` becomes `(n, L, 0, active)`. `n = 0` admits an empty sequence. Grid `(Hkv, nb)`, `D` threads.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn policy_install<E: Float>(
    src_k: &[E],
    src_v: &[E],
    kept: &[u32],
    k: &mut [E],
    v: &mut [E],
    order: &mut [u32],
    rank: &mut [u32],
    score: &mut [f32],
    count: &mut [f32],
    pos: &mut [u32],
    free: &mut [u32],
    seq: &mut [u32],
    sk_off: usize,
    sv_off: usize,
    n: usize,
    l: usize,
    cap: usize,
    hkv: usize,
    cap1: usize,
    d: usize,
    b0: usize,
    cur_base: usize,
) {
    let t = UNIT_POS as usize;
    let h = CUBE_POS_X as usize;
    let b = CUBE_POS_Y as usize;
    let src = b * hkv + h;
    let head = (b0 + b) * hkv + h;
    for s in 0..n {
        let j = kept[src * cap + s] as usize;
        k[(head * cap1 + s) * d + t] = src_k[sk_off + (src * l + j) * d + t];
        v[(head * cap1 + s) * d + t] = src_v[sv_off + (src * l + j) * d + t];
        if t == 0 {
            order[head * cap1 + s] = s as u32;
            pos[head * cap1 + s] = j as u32;
        }
    }
    let mut s = t;
    while s < cap1 {
        let mut r = FREE.runtime();
        if s < n {
            r = s as u32;
        }
        rank[head * cap1 + s] = r;
        score[head * cap1 + s] = 0.0;
        count[head * cap1 + s] = 0.0;
        s += d;
    }
    if t == 0 {
        free[head] = n as u32;
    }
    if h == 0 && t == 0 {
        let st = cur_base + (b0 + b) * SEQ_WORDS;
        seq[st + SEQ_LEN] = n as u32;
        seq[st + SEQ_SEEN] = l as u32;
        seq[st + SEQ_EVICTIONS] = 0;
        seq[st + SEQ_FLAGS] = 1;
    }
}

/// Retires sequence `b`: its state at `seq[cur_base + b·4 ..]` becomes inactive and empty (its slots are
/// reclaimed by the next admission). One unit.
#[cube(launch_unchecked)]
pub fn policy_retire(seq: &mut [u32], b: usize, cur_base: usize) {
    let st = cur_base + b * SEQ_WORDS;
    seq[st + SEQ_LEN] = 0;
    seq[st + SEQ_SEEN] = 0;
    seq[st + SEQ_EVICTIONS] = 0;
    seq[st + SEQ_FLAGS] = 0;
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

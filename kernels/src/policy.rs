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
//! Packed state: every u32 array (`order`, `rank`, `pos`, `free`, `seq`, `att`) is a region of one buffer `ints`
//! and the f32 ones (`score`, `count`) of one buffer `fl`, each region at an element offset the host passes (`o_*`
//! launch scalars; `score` at `fl[0..]`). A kernel therefore binds K, V, the new token's or prompt's K/V and two
//! state buffers — within WebGPU's default of 8 storage buffers per stage.
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
//! `baselines.rs`), and each method's device part sits in the file of the same name here: TreeKV's pair decision
//! and block prefill in [`crate::treekv`], WeightedKV's value merge in [`crate::weightedkv`], the region argmin
//! (H2O, TOVA, WeightedKV's victim) and SnapKV's selection in [`crate::baselines`]; this file keeps the fused step
//! that calls them, the append, the admission and the retirement.

use crate::baselines::region_argmin;
use crate::treekv::treekv_pair_victim;
use crate::weightedkv::weightedkv_merge;
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
/// per-sequence state at `seq[cur_base + b·4 ..]` (`seq` is the region of `ints` at `o_seq`, and so on); the
/// token's original position is `seen`, its rank `len`; the free slot is `free[b·Hkv + h]`. `k_new, v_new: [B, Hkv, D]` contiguous from element `kn_off` / `vn_off`. Writes
/// `att` (attention length and query rank) for every sequence.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn policy_append<E: Float>(
    k_new: &[E],
    v_new: &[E],
    k: &mut [E],
    v: &mut [E],
    ints: &mut [u32],
    fl: &mut [f32],
    kn_off: usize,
    vn_off: usize,
    o_order: usize,
    o_rank: usize,
    o_pos: usize,
    o_free: usize,
    o_seq: usize,
    o_att: usize,
    o_count: usize,
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
    let st = o_seq + cur_base + b * SEQ_WORDS;
    let flags = ints[st + SEQ_FLAGS];
    let len = ints[st + SEQ_LEN];
    if (flags & 1u32) == 1u32 {
        let slot = ints[o_free + head] as usize;
        let row = (head * cap1 + slot) * d;
        if dd < d {
            k[row + dd] = k_new[kn_off + head * d + dd];
            v[row + dd] = v_new[vn_off + head * d + dd];
        }
        if dd == 0 {
            let half = ((flags >> 1u32) & 1u32) as usize * nb * hkv * cap1;
            let l = len as usize;
            ints[o_order + half + head * cap1 + l] = slot as u32;
            ints[o_rank + head * cap1 + slot] = len;
            fl[head * cap1 + slot] = 0.0;
            fl[o_count + head * cap1 + slot] = 0.0;
            ints[o_pos + head * cap1 + slot] = ints[st + SEQ_SEEN];
        }
    }
    if h == 0 && dd == 0 {
        let mut n = 0u32.runtime();
        if (flags & 1u32) == 1u32 {
            n = len + 1;
        }
        ints[o_att + b] = n;
        ints[o_att + nb + b] = len;
    }
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
    ints: &mut [u32],
    fl: &mut [f32],
    o_order: usize,
    o_rank: usize,
    o_free: usize,
    o_seq: usize,
    o_count: usize,
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
    let st = o_seq + cur_base + b * SEQ_WORDS;
    let flags = ints[st + SEQ_FLAGS];
    let active = (flags & 1u32) == 1u32;
    let held = ints[st + SEQ_LEN] as usize;
    let evictions = ints[st + SEQ_EVICTIONS];
    let parity = (flags >> 1u32) & 1u32;
    let cur_half = o_order + parity as usize * nb * hkv * cap1;
    let next_half = o_order + (1 - parity as usize) * nb * hkv * cap1;
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
        if ints[o_rank + base + slot] < l as u32 {
            fl[base + slot] += mass[base + slot];
            fl[o_count + base + slot] += 1.0;
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
            victim = treekv_pair_victim(ints, fl, cur_half + base, base, o_count + base, lo + ptr as usize, comptime![rule == Rule::TreeKv { select_left: true }]);
        } else {
            // The least-scored rank of the region (WeightedKV: its first `middle` ranks, so that the newest can
            // only be the merge target).
            let mut end = hi;
            if comptime![rule == Rule::WeightedKv] {
                end = lo + middle;
            }
            victim = region_argmin(ints, fl, mass, cur_half + base, base, o_count + base, base, lo, end, &mut vals, &mut idxs, rule, threads);
        }
        let r = victim as usize;
        let vslot = ints[cur_half + base + r] as usize;
        if comptime![rule == Rule::WeightedKv] {
            let tslot = ints[cur_half + base + r + 1] as usize;
            weightedkv_merge::<E>(v, fl, base, base, o_count + base, vslot, tslot, d, threads);
        }
        // Ranks above r move down by one; the victim's slot becomes free.
        let mut s2 = t;
        while s2 < cap1 {
            let rk = ints[o_rank + base + s2];
            if rk != FREE && rk > victim {
                ints[o_rank + base + s2] = rk - 1;
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
            ints[next_half + base + q] = ints[cur_half + base + src];
            q += threads;
        }
        if t == 0 {
            ints[o_rank + base + vslot] = FREE;
            ints[o_free + head] = vslot as u32;
        }
    } else if active {
        if t == 0 {
            ints[o_free + head] = l as u32;
        }
    }
    // The sequence's next state (one writer per sequence).
    if h == 0 && t == 0 {
        let nx = o_seq + next_base + b * SEQ_WORDS;
        if active {
            let mut ev = 0u32.runtime();
            if evict {
                ev = 1;
            }
            ints[nx + SEQ_LEN] = (l - ev as usize) as u32;
            ints[nx + SEQ_SEEN] = ints[st + SEQ_SEEN] + 1;
            ints[nx + SEQ_EVICTIONS] = evictions + ev;
            ints[nx + SEQ_FLAGS] = 1u32 | ((parity ^ ev) << 1u32);
        } else {
            ints[nx + SEQ_LEN] = ints[st + SEQ_LEN];
            ints[nx + SEQ_SEEN] = ints[st + SEQ_SEEN];
            ints[nx + SEQ_EVICTIONS] = evictions;
            ints[nx + SEQ_FLAGS] = flags;
        }
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
    ints: &mut [u32],
    fl: &mut [f32],
    sk_off: usize,
    sv_off: usize,
    o_order: usize,
    o_rank: usize,
    o_pos: usize,
    o_free: usize,
    o_seq: usize,
    o_count: usize,
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
            ints[o_order + head * cap1 + s] = s as u32;
            ints[o_pos + head * cap1 + s] = j as u32;
        }
    }
    let mut s = t;
    while s < cap1 {
        let mut r = FREE.runtime();
        if s < n {
            r = s as u32;
        }
        ints[o_rank + head * cap1 + s] = r;
        fl[head * cap1 + s] = 0.0;
        fl[o_count + head * cap1 + s] = 0.0;
        s += d;
    }
    if t == 0 {
        ints[o_free + head] = n as u32;
    }
    if h == 0 && t == 0 {
        let st = o_seq + cur_base + (b0 + b) * SEQ_WORDS;
        ints[st + SEQ_LEN] = n as u32;
        ints[st + SEQ_SEEN] = l as u32;
        ints[st + SEQ_EVICTIONS] = 0;
        ints[st + SEQ_FLAGS] = 1;
    }
}

/// Retires sequence `b`: its state at `ints[seq_base + b·4 ..]` (the current half of `seq`) becomes inactive and empty (its slots are
/// reclaimed by the next admission). One unit.
#[cube(launch_unchecked)]
pub fn policy_retire(ints: &mut [u32], b: usize, seq_base: usize) {
    let st = seq_base + b * SEQ_WORDS;
    ints[st + SEQ_LEN] = 0;
    ints[st + SEQ_SEEN] = 0;
    ints[st + SEQ_EVICTIONS] = 0;
    ints[st + SEQ_FLAGS] = 0;
}

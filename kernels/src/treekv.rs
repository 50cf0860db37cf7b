//! TreeKV on the device (spec §2; reference `kvsqueeze-reference::treekv`): the pair decision the fused policy
//! step ([`crate::policy::policy_step()`]) makes under the cyclic pointer, and the block-level prefill.

use crate::policy::FREE;
use cubecl::prelude::*;

/// TreeKV's decode decision (spec §2.2): of the adjacent ranks `(a, a + 1)` under the cyclic pointer, the one with
/// the lower average attention `S/C` is evicted (ties: the left); `select_left` always evicts the left.
/// The cache's packed state (see [`crate::policy`]): `ints[ob + q]` is the slot of rank `q`; `S` and `C` are read
/// at `fl[sb + slot]` and `fl[cb + slot]`.
#[cube]
pub fn treekv_pair_victim(ints: &mut [u32], fl: &mut [f32], ob: usize, sb: usize, cb: usize, a: usize, #[comptime] select_left: bool) -> u32 {
    let mut victim = a as u32;
    if comptime![!select_left] {
        let sa = ints[ob + a] as usize;
        let sn = ints[ob + a + 1] as usize;
        let ma = fl[sb + sa] / fl[cb + sa];
        let mb = fl[sb + sn] / fl[cb + sn];
        if ma > mb {
            victim = (a + 1) as u32;
        }
    }
    victim
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

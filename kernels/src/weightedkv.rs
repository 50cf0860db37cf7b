//! WeightedKV on the device (spec §3; reference `kvsqueeze-reference::weightedkv`): the value merge the fused
//! policy step ([`crate::policy::policy_step()`]) makes after dropping the key of the least-attended rank of the
//! region ([`crate::baselines::region_argmin()`] by average attention).

use cubecl::prelude::*;

/// Merges the dropped token's value into its right neighbour's by a convex combination weighted by average
/// attention: `V[t] ← (ā_v·V[v] + ā_t·V[t]) / (ā_v + ā_t)` with `ā = S/C` per slot (equal weights when both are
/// 0), for slots `vslot` (dropped) and `tslot` (target) of the `[cap+1, D]` rows at `base`, `S` and `C` read at
/// `fl[sb + slot]` and `fl[cb + slot]` (the cache's packed state). Cooperative over the
/// cube's `threads` units (a dim each).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn weightedkv_merge<E: Float>(v: &mut [E], fl: &mut [f32], base: usize, sb: usize, cb: usize, vslot: usize, tslot: usize, d: usize, #[comptime] threads: usize) {
    let mut wa = fl[sb + vslot] / fl[cb + vslot];
    let mut wb = fl[sb + tslot] / fl[cb + tslot];
    if !(wa + wb > 0.0) {
        wa = 1.0;
        wb = 1.0;
    }
    let mut dd = UNIT_POS as usize;
    while dd < d {
        let src = f32::cast_from(v[(base + vslot) * d + dd]);
        let dst = f32::cast_from(v[(base + tslot) * d + dd]);
        v[(base + tslot) * d + dd] = E::cast_from((wa * src + wb * dst) / (wa + wb));
        dd += threads;
    }
}

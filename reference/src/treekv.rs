//! TreeKV (arXiv:2501.04987, spec §2): the decode rule and the block-level prefill.
//!
//! **Decode rule** (spec §2.2), applied by [`crate::policy::PolicyCache`] when the cache holds `c + 1` entries.
//! The region (the tree region of spec §2.3 plus the token that just left the recent window) has `middle + 1`
//! entries; the scope is the adjacent pair `{idx, idx+1}` of the region under a cyclic pointer `idx`:
//! - if `S̄[idx] > S̄[idx+1]` evict `idx + 1`, otherwise evict `idx` — **ties evict the left entry**;
//! - the select-left ablation (spec §2.5) always evicts `idx`;
//! - then `idx ← (idx + 1) mod middle` (0-based; spec §2.8.1's best reading — the printed formula
//!   `(idx+1) mod c + 1` would step by two).
//!
//! `S̄ = S/C` is the average attention an entry received since it entered the cache (the paper's best score).
//! The pointer starts at 0 at the first eviction and moves once per eviction; since every KV head evicts at the
//! same steps, it is the same for all heads (spec §2.9).
//!
//! **Prefill** (spec §2.4) with [`prefill_blocks`]: blocks of `b` tokens, the last block is the observation
//! window whose queries score every block (mean attention over the block's tokens), and the same cyclic pair
//! scan runs over blocks with those static scores, keeping `⌊c/b⌋` blocks. Choices (spec §2.8.4, unspecified
//! in the paper): the observation block is always kept (it is appended after the scan, which keeps
//! `⌊c/b⌋ − 1` of the other blocks); a trailing partial block is the observation block; window queries attend
//! causally; scores are summed over window queries and averaged over the GQA group.

use crate::attention::{attention, Dims};
use crate::policy::Entry;
use crate::Real;

/// The region index the decode rule evicts, for scope `{idx, idx+1}` (see the module docs).
pub fn victim<T: Real>(region: &[Entry<T>], idx: usize, select_left: bool) -> usize {
    assert!(idx + 1 < region.len(), "scope outside the region");
    if select_left {
        return idx;
    }
    if region[idx].avg() > region[idx + 1].avg() {
        idx + 1
    } else {
        idx
    }
}

/// Pointer update `idx ← (idx + 1) mod middle`.
pub fn advance(idx: usize, middle: usize) -> usize {
    (idx + 1) % middle
}

/// The cyclic pair scan over items with **static** scores (used by the prefill, and the paper's toy example):
/// streams `scores` in order through a cache of `keep` items and returns the surviving item indices in order.
pub fn static_scan<T: Real>(scores: &[T], keep: usize, select_left: bool) -> Vec<usize> {
    assert!(keep >= 1);
    let mut kept: Vec<usize> = Vec::new();
    let mut idx = 0;
    for i in 0..scores.len() {
        kept.push(i);
        if kept.len() > keep {
            let r = if select_left || !(scores[kept[idx]] > scores[kept[idx + 1]]) { idx } else { idx + 1 };
            kept.remove(r);
            idx = advance(idx, keep);
        }
    }
    kept
}

/// Block-level TreeKV prefill for one KV head (spec §2.4).
///
/// `q_obs: [w, G, D]` are the (already RoPE'd) queries of the last `w` prompt tokens, the observation window,
/// which must be the last block (`w = L − b·⌊(L−1)/b⌋`); `keys: [L, D]`. Keeps `⌊budget/b⌋ ≥ 1` blocks and
/// returns the kept token positions in order (all of them if the prompt has no more blocks than that).
pub fn prefill_blocks<T: Real>(q_obs: &[T], keys: &[T], d: usize, b: usize, budget: usize, scale: T, select_left: bool) -> Vec<usize> {
    let l = keys.len() / d;
    assert!(b >= 1 && l >= 1 && budget >= b);
    let nblocks = l.div_ceil(b);
    let w = l - b * (nblocks - 1);
    assert!(q_obs.len().is_multiple_of(w * d), "q_obs must hold the last block's queries");
    let g = q_obs.len() / (w * d);
    let keep = budget / b;
    if nblocks <= keep {
        return (0..l).collect();
    }
    // s[j] = Σ_{window rows i} mean_g A[i, g, j]; a block's score is the mean of s over its tokens.
    let zeros = vec![T::zero(); l * d];
    let att = attention(q_obs, keys, &zeros, Dims { lq: w, l, hq: g, hkv: 1, d }, l - w, scale);
    let s: Vec<T> = (0..l).map(|j| (0..w).fold(T::zero(), |a, i| a + att.group_mean[i * l + j])).collect();
    let block_score: Vec<T> = (0..nblocks - 1)
        .map(|blk| {
            let toks = &s[blk * b..(blk + 1) * b];
            toks.iter().fold(T::zero(), |a, &x| a + x) / T::of(b as f64)
        })
        .collect();
    let mut blocks = if keep > 1 { static_scan(&block_score, keep - 1, select_left) } else { Vec::new() };
    blocks.push(nblocks - 1);
    blocks.into_iter().flat_map(|blk| blk * b..((blk + 1) * b).min(l)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_toy_attention_variant() {
        // spec §2.2: scores [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.05], c = 4 → [0, 4, 8, 9].
        let s = [0.9f64, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.05];
        assert_eq!(static_scan(&s, 4, false), vec![0, 4, 8, 9]);
    }

    #[test]
    fn prefill_keeps_observation_block_and_budget() {
        let d = 4;
        let l = 37;
        let keys: Vec<f64> = (0..l * d).map(|i| ((i * 7919) % 101) as f64 / 50.0 - 1.0).collect();
        let b = 4;
        let w = l - b * ((l - 1) / b);
        let q: Vec<f64> = (0..w * 2 * d).map(|i| ((i * 31) % 17) as f64 / 8.0 - 1.0).collect();
        let kept = prefill_blocks(&q, &keys, d, b, 16, 1.0, false);
        assert_eq!(kept.len(), 3 * b + w);
        assert!(kept.ends_with(&[36]));
        assert!(kept.windows(2).all(|p| p[0] < p[1]));
    }
}

//! Baselines (spec §5): StreamingLLM, H2O, TOVA as decode rules for [`crate::policy::PolicyCache`], and SnapKV's
//! prefill selection.
//!
//! - **StreamingLLM** keeps the sinks and the most recent tokens: the region's oldest entry is evicted.
//! - **H2O** evicts the region entry with the smallest accumulated attention `S` (a running sum, not an
//!   average), i.e. it keeps the top-`middle` heavy hitters of the non-recent part, plus sinks and recents.
//! - **TOVA** evicts the region entry with the smallest attention from the current query (group mean).
//!
//! Ties evict the leftmost entry. The sinks and the recent window are protected for every policy; TOVA's
//! original (unprotected) form is `sinks = recent = 0`.
//!
//! **SnapKV** (spec §5.3) for one KV head: with the last `w` prompt queries as observation window,
//! `s[j] = Σ_{window i} mean_g softmax_causal(scale·Q Kᵀ)[i, g, j]` for the prefix `j < L − w`, smoothed by a 1-D
//! pool (odd `kernel`, stride 1, padding `kernel/2`; average pooling counts the padding, as PyTorch's
//! `avg_pool1d` does by default; max pooling ignores it), then the top `capacity − w` prefix tokens (ties: the
//! earlier token) plus the window are kept. Prompts with `L ≤ capacity` are kept whole.

use crate::attention::{attention, Dims};
use crate::policy::Entry;
use crate::weightedkv::argmin_leftmost;
use crate::Real;

/// H2O's victim: smallest accumulated attention in the region.
pub fn h2o_victim<T: Real>(region: &[Entry<T>]) -> usize {
    argmin_leftmost(&region.iter().map(|e| e.score).collect::<Vec<_>>())
}

/// TOVA's victim: smallest current attention in the region.
pub fn tova_victim<T: Real>(current_region: &[T]) -> usize {
    argmin_leftmost(current_region)
}

/// SnapKV's pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Average pooling (padding counted as zeros).
    Avg,
    /// Max pooling.
    Max,
}

/// SnapKV selection for one KV head: `q_win: [w, G, D]` (RoPE'd window queries), `keys: [L, D]`; returns the
/// kept token positions in order.
pub fn snapkv_select<T: Real>(q_win: &[T], keys: &[T], d: usize, w: usize, capacity: usize, kernel: usize, pool: Pool, scale: T) -> Vec<usize> {
    let l = keys.len() / d;
    assert!(w >= 1 && w <= l && capacity >= w && kernel % 2 == 1);
    if l <= capacity {
        return (0..l).collect();
    }
    let g = q_win.len() / (w * d);
    let zeros = vec![T::zero(); l * d];
    let att = attention(q_win, keys, &zeros, Dims { lq: w, l, hq: g, hkv: 1, d }, l - w, scale);
    let n = l - w;
    let s: Vec<T> = (0..n).map(|j| (0..w).fold(T::zero(), |a, i| a + att.group_mean[i * l + j])).collect();
    let half = kernel / 2;
    let pooled: Vec<T> = (0..n)
        .map(|j| {
            let lo = j.saturating_sub(half);
            let hi = (j + half + 1).min(n);
            match pool {
                Pool::Avg => s[lo..hi].iter().fold(T::zero(), |a, &x| a + x) / T::of(kernel as f64),
                Pool::Max => s[lo..hi].iter().fold(T::neg_infinity(), |a, &x| a.max(x)),
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    // Descending score, earlier token first on ties (a stable sort keeps index order among equals).
    order.sort_by(|&a, &b| pooled[b].partial_cmp(&pooled[a]).unwrap_or(core::cmp::Ordering::Equal));
    let mut kept: Vec<usize> = order[..capacity - w].to_vec();
    kept.sort_unstable();
    kept.extend(n..l);
    kept
}

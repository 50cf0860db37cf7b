//! WeightedKV (arXiv:2503.01330, spec §3): when over budget, drop the key of the least-attended token and
//! merge its value into its right neighbour by a convex combination weighted by average attention.
//!
//! Applied by [`crate::policy::PolicyCache`] to the region (the merge region plus the token that just left the
//! recent window, `m + 1` entries, `m = middle`), with `ā = S/C` a temporary (spec §3.6.1: `S` stays a running
//! sum):
//! ```text
//! j = argmin_{j < m} ā[j]                      (leftmost minimum, spec §3.6.2; the newest region entry
//!                                               can be the target j+1 but never j)
//! V[j+1] ← (ā[j]·V[j] + ā[j+1]·V[j+1]) / (ā[j] + ā[j+1])
//! delete K[j], V[j], S[j], C[j]                (the survivor keeps its own key, S and C)
//! ```
//! If both weights are zero (attention underflowed), the merge uses equal weights so it stays convex.

use crate::policy::Entry;
use crate::Real;

/// Index of the leftmost minimum of `x` (NaN never wins).
pub fn argmin_leftmost<T: Real>(x: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate().skip(1) {
        if v < x[best] {
            best = i;
        }
    }
    best
}

/// Merges per the rule above and returns the region index `j` whose key is dropped (the caller removes it).
pub fn merge_victim<T: Real>(region: &mut [Entry<T>]) -> usize {
    let m = region.len() - 1;
    assert!(m >= 1, "merge region needs at least one entry");
    let avg: Vec<T> = region[..m].iter().map(|e| e.avg()).collect();
    let j = argmin_leftmost(&avg);
    let (wa, wb) = (region[j].avg(), region[j + 1].avg());
    let (wa, wb) = if wa + wb > T::zero() { (wa, wb) } else { (T::one(), T::one()) };
    let (left, right) = region.split_at_mut(j + 1);
    let (src, dst) = (&left[j], &mut right[0]);
    for (dv, &sv) in dst.v.iter_mut().zip(&src.v) {
        *dv = (wa * sv + wb * *dv) / (wa + wb);
    }
    dst.absorbed.extend_from_slice(&src.absorbed);
    j
}

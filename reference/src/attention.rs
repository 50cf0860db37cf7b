//! Dense attention with grouped-query heads (GQA): decode (one query token) and multi-token queries with a
//! causal offset. Returns the output, the log-sum-exp and the per-slot attention probabilities, per query head
//! and reduced over the GQA group by mean.
//!
//! Shapes (one sequence, row-major, token-major):
//! - `q`: `[Lq, Hq, D]`, `k` and `v`: `[L, Hkv, D]`, `G = Hq / Hkv`; query head `h` reads KV head `h / G`.
//! - Query row `i` sits at position `offset + i` and attends keys `0..=offset+i` (causal); `offset = L − Lq`
//!   is the usual decode/append case, and `Lq = 1, offset = L − 1` is plain decode.
//! - Output `o`: `[Lq, Hq, D]`; `lse`: `[Lq, Hq]` (natural log of `Σ exp(score)` with the scale applied);
//!   `probs`: `[Lq, Hq, L]`; `group_mean`: `[Lq, Hkv, L]`, the mean of `probs` over the `G` heads of a group.
//!   Masked (future) slots have probability exactly 0.
//!
//! Math: `s_j = scale·⟨q, k_j⟩`, `p = softmax(s)`, `o = Σ_j p_j v_j`, `scale = 1/√D` by default.

use crate::{dot, softmax, Real};

/// Sizes of one attention problem (one sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Number of query tokens `Lq`.
    pub lq: usize,
    /// Number of key/value tokens `L`.
    pub l: usize,
    /// Query heads `Hq`.
    pub hq: usize,
    /// Key/value heads `Hkv` (`Hq % Hkv == 0`).
    pub hkv: usize,
    /// Head dimension `D`.
    pub d: usize,
}

impl Dims {
    /// GQA group size `G = Hq / Hkv`.
    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }
}

/// Everything dense attention produces.
#[derive(Clone, Debug)]
pub struct AttentionOut<T> {
    /// `[Lq, Hq, D]`.
    pub o: Vec<T>,
    /// `[Lq, Hq]`.
    pub lse: Vec<T>,
    /// `[Lq, Hq, L]`.
    pub probs: Vec<T>,
    /// `[Lq, Hkv, L]`.
    pub group_mean: Vec<T>,
}

/// The default softmax scale `1/√D`.
pub fn default_scale(d: usize) -> f64 {
    1.0 / (d as f64).sqrt()
}

/// Dense causal attention with GQA (see the module docs for shapes). Panics on inconsistent shapes: the
/// reference is a specification, validated inputs are the host API's job.
pub fn attention<T: Real>(q: &[T], k: &[T], v: &[T], dims: Dims, offset: usize, scale: T) -> AttentionOut<T> {
    let Dims { lq, l, hq, hkv, d } = dims;
    assert!(hkv > 0 && hq % hkv == 0, "GQA ratio must be integral");
    assert_eq!(q.len(), lq * hq * d);
    assert_eq!(k.len(), l * hkv * d);
    assert_eq!(v.len(), l * hkv * d);
    assert!(offset + lq <= l, "query rows past the last key");
    let g = hq / hkv;
    let mut out = AttentionOut { o: vec![T::zero(); lq * hq * d], lse: vec![T::zero(); lq * hq], probs: vec![T::zero(); lq * hq * l], group_mean: vec![T::zero(); lq * hkv * l] };
    for i in 0..lq {
        let visible = offset + i + 1;
        for h in 0..hq {
            let kvh = h / g;
            let qv = &q[(i * hq + h) * d..][..d];
            let s: Vec<T> = (0..visible).map(|j| scale * dot(qv, &k[(j * hkv + kvh) * d..][..d])).collect();
            let (p, lse) = softmax(&s);
            out.lse[i * hq + h] = lse;
            let o = &mut out.o[(i * hq + h) * d..][..d];
            for (j, &pj) in p.iter().enumerate() {
                let vj = &v[(j * hkv + kvh) * d..][..d];
                for (oc, &vc) in o.iter_mut().zip(vj) {
                    *oc = *oc + pj * vc;
                }
                out.probs[(i * hq + h) * l + j] = pj;
            }
        }
        for kvh in 0..hkv {
            for j in 0..l {
                let sum = (0..g).fold(T::zero(), |a, gi| a + out.probs[(i * hq + kvh * g + gi) * l + j]);
                out.group_mean[(i * hkv + kvh) * l + j] = sum / T::of(g as f64);
            }
        }
    }
    out
}

/// Decode attention: one query token `q: [Hq, D]` at the last position over `k, v: [L, Hkv, D]`.
pub fn decode_attention<T: Real>(q: &[T], k: &[T], v: &[T], hq: usize, hkv: usize, d: usize, scale: T) -> AttentionOut<T> {
    let l = k.len() / (hkv * d);
    attention(q, k, v, Dims { lq: 1, l, hq, hkv, d }, l - 1, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_key_returns_its_value() {
        let q = vec![0.3f64, -1.0];
        let k = vec![2.0f64, 5.0];
        let v = vec![7.0f64, -3.0];
        let out = decode_attention(&q, &k, &v, 1, 1, 2, 1.0);
        assert_eq!(out.o, v);
        assert_eq!(out.probs, vec![1.0]);
        assert!((out.lse[0] - (0.3 * 2.0 - 5.0)).abs() < 1e-15);
    }

    #[test]
    fn equal_scores_average_values_and_mask_future() {
        // Two query rows, three keys, offset 1: row 0 sees keys 0..=1, row 1 sees all three.
        let q = vec![0.0f64; 2];
        let k = vec![1.0f64, 2.0, 3.0];
        let v = vec![3.0f64, 6.0, 9.0];
        let out = attention(&q, &k, &v, Dims { lq: 2, l: 3, hq: 1, hkv: 1, d: 1 }, 1, 1.0);
        assert_eq!(out.o, vec![4.5, 6.0]);
        assert_eq!(out.probs[2], 0.0);
        assert!((out.lse[0] - 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn group_mean_is_mean_over_group() {
        // Hq = 2 query heads sharing one KV head, with opposite preferences.
        let q = vec![10.0f64, -10.0];
        let k = vec![1.0f64, -1.0];
        let v = vec![0.0f64, 1.0];
        let out = decode_attention(&q, &k, &v, 2, 1, 1, 1.0);
        assert!((out.group_mean[0] - 0.5).abs() < 1e-12 && (out.group_mean[1] - 0.5).abs() < 1e-12);
    }
}

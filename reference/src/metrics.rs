//! Fidelity metrics, all computed in `f64`.
//!
//! - relative L2: `‖a − b‖₂ / ‖b‖₂` (`b` is the reference);
//! - NMSE: `‖a − b‖₂² / ‖b‖₂²` (ggml's test-backend-ops metric for lossy ops);
//! - cosine similarity: `⟨a, b⟩ / (‖a‖‖b‖)`;
//! - KL divergence of two distributions: `Σ p log(p/q)` (terms with `p = 0` are 0; `q = 0 < p` gives +∞);
//! - Jaccard of two sets: `|A ∩ B| / |A ∪ B|` (1 for two empty sets).

use std::collections::BTreeSet;

fn norm2(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum()
}

/// `‖a − b‖₂ / ‖b‖₂`.
pub fn relative_l2(a: &[f64], b: &[f64]) -> f64 {
    nmse(a, b).sqrt()
}

/// `‖a − b‖₂² / ‖b‖₂²`.
pub fn nmse(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    diff / norm2(b)
}

/// `⟨a, b⟩ / (‖a‖‖b‖)`.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    d / (norm2(a) * norm2(b)).sqrt()
}

/// `KL(p ‖ q) = Σ p log(p/q)`.
pub fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    assert_eq!(p.len(), q.len());
    p.iter().zip(q).map(|(&pi, &qi)| if pi == 0.0 { 0.0 } else { pi * (pi / qi).ln() }).sum()
}

/// `|A ∩ B| / |A ∪ B|`.
pub fn jaccard(a: &[usize], b: &[usize]) -> f64 {
    let (a, b): (BTreeSet<_>, BTreeSet<_>) = (a.iter().collect(), b.iter().collect());
    let union = a.union(&b).count();
    if union == 0 {
        1.0
    } else {
        a.intersection(&b).count() as f64 / union as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(relative_l2(&[3.0, 4.0], &[0.0, 0.0 + 5.0]), (9.0f64 + 1.0).sqrt() / 5.0);
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-15);
        assert_eq!(kl_divergence(&[0.5, 0.5], &[0.5, 0.5]), 0.0);
        assert!((kl_divergence(&[1.0, 0.0], &[0.5, 0.5]) - 2f64.ln()).abs() < 1e-15);
        assert_eq!(jaccard(&[1, 2, 3], &[2, 3, 4]), 0.5);
        assert_eq!(jaccard(&[], &[]), 1.0);
    }
}

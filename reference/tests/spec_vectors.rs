//! Every test vector of shared/docs/algorithms.md, run through the same code paths the policies use.

mod common;

use common::Rng;
use kvsqueeze_reference::policy::{Entry, Layout, Policy, PolicyCache, PolicyConfig, Positions};
use kvsqueeze_reference::rope::ntk_scale_factor;

fn cfg(policy: Policy, layout: Layout) -> PolicyConfig {
    PolicyConfig { policy, layout, rope: None, positions: Positions::CacheRank, scale: 0.5 }
}

fn whole(middle: usize) -> Layout {
    Layout { sinks: 0, middle, recent: 0 }
}

/// spec §2.2: TreeKV select-left, c = 8, T = 64 → [39, 47, 51, 55, 57, 59, 61, 63], driven by real decode steps.
#[test]
fn treekv_select_left_c8_t64() {
    let mut rng = Rng(7);
    let d = 4;
    let mut cache = PolicyCache::<f64>::new(cfg(Policy::TreeKv { select_left: true }, whole(8)), d);
    for _ in 0..64 {
        cache.step(&rng.vec(2 * d, 1.0), &rng.vec(d, 1.0), &rng.vec(d, 1.0));
    }
    assert_eq!(cache.kept_positions(), vec![39, 47, 51, 55, 57, 59, 61, 63]);
}

/// spec §2.2: attention variant with fixed average scores, c = 4, pointer 0,1,2,3,0,1;
/// evicted in order 1, 3, 5, 7, 2, 6; final [0, 4, 8, 9].
#[test]
fn treekv_fixed_scores_c4() {
    let scores = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6, 0.05];
    let mut cache = PolicyCache::<f64>::new(cfg(Policy::TreeKv { select_left: false }, whole(4)), 1);
    let mut evicted = Vec::new();
    let mut pointers = Vec::new();
    for (t, &s) in scores.iter().enumerate() {
        cache.push_entry(Entry { score: s, count: 1.0, ..Entry::new(t, vec![1.0], vec![t as f64]) });
        let p = cache.pointer();
        if let Some(e) = cache.compress(&[]) {
            evicted.push(e);
            pointers.push(p);
        }
    }
    assert_eq!(pointers, vec![0, 1, 2, 3, 0, 1]);
    assert_eq!(evicted, vec![1, 3, 5, 7, 2, 6]);
    assert_eq!(cache.kept_positions(), vec![0, 4, 8, 9]);
}

/// spec §3.3: WeightedKV with static scores [0.4, 0.1, 0.5, 0.3, 0.2, 0.6], values 1..6, m = 3:
/// keys {0, 2, 5}, values [1.0, 2.8333…, 5.6].
#[test]
fn weightedkv_static_scores_m3() {
    let scores = [0.4, 0.1, 0.5, 0.3, 0.2, 0.6];
    let mut cache = PolicyCache::<f64>::new(cfg(Policy::WeightedKv, whole(3)), 1);
    let mut merged = Vec::new();
    for (t, &s) in scores.iter().enumerate() {
        cache.push_entry(Entry { score: s, count: 1.0, ..Entry::new(t, vec![1.0], vec![(t + 1) as f64]) });
        if let Some(gone) = cache.compress(&[]) {
            let into = cache.entries().iter().find(|e| e.absorbed.contains(&gone)).unwrap();
            merged.push((t, gone, into.pos, into.v[0]));
        }
    }
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let expect = [(3, 1, 2, 17.0 / 6.0), (4, 3, 4, 4.4), (5, 4, 5, 5.6)];
    assert_eq!(merged.len(), 3);
    for (got, want) in merged.iter().zip(expect) {
        assert_eq!((got.0, got.1, got.2), (want.0, want.1, want.2));
        assert!(close(got.3, want.3), "{got:?} vs {want:?}");
    }
    assert_eq!(cache.kept_positions(), vec![0, 2, 5]);
    let v: Vec<f64> = cache.entries().iter().map(|e| e.v[0]).collect();
    assert!(close(v[0], 1.0) && close(v[1], 2.833_333_333_333_333) && close(v[2], 5.6), "{v:?}");
    // The survivor keeps its own score (spec §3.3 step 5).
    assert_eq!(cache.entries().iter().map(|e| e.score).collect::<Vec<_>>(), vec![0.4, 0.5, 0.6]);
}

/// spec §4.1: LongLLaDA's NTK factors for LLaDA-8B at 8k / 16k / 24k / 32k.
#[test]
fn llada_ntk_factors() {
    let f: Vec<f64> = [8192, 16384, 24576, 32768].iter().map(|&t| ntk_scale_factor(128, 500_000.0, 4096, t)).collect();
    assert_eq!(f, vec![4.0, 14.0, 31.0, 55.0]);
}

//! The device policy caches against the reference's state machines, step by step: the reference policy is
//! driven with the very attention mass the device computed (`PolicyCache::step_with_mass`), so every eviction
//! decision must be identical — kept sets compared exactly, ties generated on purpose (keys drawn from a small
//! pool give bit-identical masses) — and the step's output is checked against f64 attention over the same
//! entries with the derived tolerance; WeightedKV's merged values against the reference's.

mod common;

use common::*;
use kvsqueeze::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use kvsqueeze::reference::attention::{attention, Dims};
use kvsqueeze::reference::cast_slice;
use kvsqueeze::reference::policy::{PolicyCache as RefCache, PolicyConfig, Positions};
use kvsqueeze::reference::rope::Rope;
use kvsqueeze::DType;
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Stream {
    policy: Policy,
    layout: Layout,
    batch: usize,
    hkv: usize,
    g: usize,
    d: usize,
    dtype: DType,
    steps: usize,
    /// 0: random keys; 1: most keys drawn from a pool of three (equal masses at a step); 2: every key equal
    /// (with `c + 1` a power of two, every steady-state mass is exactly `1/(c+1)`, so `S̄` ties exactly).
    ties: u8,
    seed: u64,
    /// RoPE base (keys rotated by cache rank).
    rope: Option<f64>,
}

fn run(s: &Stream) {
    let cl = client();
    if !kvsqueeze::attention::dtype_supported(cl, s.dtype) {
        skip(&format!("{:?} policy cache", s.dtype), "dtype unsupported on this device");
        return;
    }
    let case = format!("{s:?}");
    let (b, hkv, hq, d) = (s.batch, s.hkv, s.hkv * s.g, s.d);
    let cap = s.layout.capacity();
    let cap1 = cap + 1;
    let mut pcfg = PolicyCacheConfig::new(s.policy, s.layout, b, hq, hkv, d, s.dtype);
    if let Some(base) = s.rope {
        pcfg = pcfg.with_rope(base);
    }
    let mut dev = PolicyCache::new(cl, pcfg).unwrap();
    let rope = s.rope.map(|base| Rope { base });
    let rcfg = PolicyConfig { policy: s.policy, layout: s.layout, rope, positions: Positions::CacheRank, scale: 1.0 / (d as f64).sqrt() };
    let mut refs: Vec<RefCache<f32>> = (0..b * hkv).map(|_| RefCache::new(rcfg, d)).collect();
    let mut rng = Rng(s.seed);
    let pool: Vec<Vec<f64>> = (0..3).map(|_| round_to(&rng.vec(d, 1.5), s.dtype)).collect();
    // K/V, order (two halves), rank, S, C, positions, the free slots, the per-sequence state (two halves of 4 u32)
    // and the step's attention lengths and query ranks (2 u32).
    let expected_bytes = 2 * b * hkv * cap1 * d * s.dtype.size() + 6 * b * hkv * cap1 * 4 + b * hkv * 4 + 2 * b * 4 * 4 + 2 * b * 4;
    assert_eq!(dev.physical_bytes(), expected_bytes, "physical bytes");
    for t in 0..s.steps {
        let q = round_to(&rng.vec(b * hq * d, 1.5), s.dtype);
        let mut k = round_to(&rng.vec(b * hkv * d, 1.5), s.dtype);
        if (s.ties == 1 && t % 3 != 0) || s.ties == 2 {
            for head in 0..b * hkv {
                let p = &pool[if s.ties == 2 { 0 } else { (rng.next_u64() % 3) as usize }];
                k[head * d..][..d].copy_from_slice(p);
            }
        }
        let v = round_to(&rng.vec(b * hkv * d, 1.0), s.dtype);
        // The slot of every entry at attention time: the current order plus the free slot for the new token.
        let [order, rank, ..] = dev.slots().unwrap();
        let before = dev.len();
        let free: Vec<usize> = (0..b * hkv).map(|head| (0..cap1).find(|&sl| rank[head * cap1 + sl] as u32 == u32::MAX).filter(|_| before >= cap).unwrap_or(before)).collect();
        let o = dev
            .step(&upload(cl, &q, &[b, 1, hq, d], s.dtype), &upload(cl, &k, &[b, hkv, d], s.dtype), &upload(cl, &v, &[b, hkv, d], s.dtype))
            .unwrap_or_else(|e| panic!("step {t}: {e}\n  case: {case}"));
        let o = o.to_host_f64(cl).unwrap();
        let mass = dev.last_mass().unwrap().to_host_f64(cl).unwrap();
        for head in 0..b * hkv {
            let r = &mut refs[head];
            let len_before = r.len();
            let slots: Vec<usize> = (0..len_before).map(|qr| order[head * cap1 + qr] as usize).chain([free[head]]).collect();
            let m: Vec<f32> = slots.iter().map(|&sl| mass[head * cap1 + sl] as f32).collect();
            // f64 attention over exactly the entries the reference holds, plus the new token.
            let mut ks: Vec<f64> = r.entries().iter().flat_map(|e| cast_slice::<f32, f64>(&e.k)).chain(k[head * d..][..d].iter().copied()).collect();
            let vs: Vec<f64> = r.entries().iter().flat_map(|e| cast_slice::<f32, f64>(&e.v)).chain(v[head * d..][..d].iter().copied()).collect();
            let (bi, h) = (head / hkv, head % hkv);
            let mut qh = q[(bi * hq + h * s.g) * d..][..s.g * d].to_vec();
            let l = len_before + 1;
            if let Some(rope) = rope {
                // Cache ranks: entry j at rank j, the query (and the new key) at rank len_before.
                for (j, kr) in ks.chunks_mut(d).enumerate() {
                    rope.apply(kr, j);
                }
                for qg in qh.chunks_mut(d) {
                    rope.apply(qg, len_before);
                }
            }
            let qh = &qh[..];
            let dims = Dims { lq: 1, l, hq: s.g, hkv: 1, d };
            let gold = attention(qh, &ks, &vs, dims, l - 1, 1.0 / (d as f64).sqrt());
            let naive = attention(&cast_slice::<f64, f32>(qh), &cast_slice(&ks), &cast_slice(&vs), dims, l - 1, 1.0 / (d as f32).sqrt());
            let ko = &o[(bi * hq + h * s.g) * d..][..s.g * d];
            let mag = gold.o.iter().fold(1.0f64, |a, &x| a.max(x.abs()));
            let rope_floor = if rope.is_some() {
                let norm = |x: &[f64]| x.chunks(d).map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt()).fold(0.0, f64::max);
                2.0 * kvsqueeze::rope::ANGLE_ERROR_RAD * norm(qh) * norm(&ks) / (d as f64).sqrt()
            } else {
                0.0
            };
            check_tolerance("o", &format!("step {t} head {head}: {case}"), ko, &cast_slice(&naive.o), &gold.o, 4.0 * eps(s.dtype) * mag + rope_floor);
            r.step_with_mass(&cast_slice(&k[head * d..][..d]), &cast_slice(&v[head * d..][..d]), &m);
        }
        let kept = dev.kept_positions().unwrap();
        for head in 0..b * hkv {
            let want = refs[head].kept_positions();
            assert_eq!(kept[head / hkv][head % hkv], want, "kept set differs at step {t}, head {head}\n  case: {case}");
        }
        assert_eq!(dev.len(), (t + 1).min(cap));
    }
    if s.policy == Policy::WeightedKv {
        // Merged values: the device's against the reference's (same convex merges of the same f32 scores).
        let vals = dev.values().unwrap();
        let [order, ..] = dev.slots().unwrap();
        for head in 0..b * hkv {
            for (qr, e) in refs[head].entries().iter().enumerate() {
                let sl = order[head * cap1 + qr] as usize;
                for dd in 0..d {
                    let (got, want) = (vals[(head * cap1 + sl) * d + dd], e.v[dd] as f64);
                    assert!((got - want).abs() <= 4.0 * eps(s.dtype) * (1.0 + want.abs()), "merged value {got} vs {want}\n  case: {case}");
                }
            }
        }
    }
}

const POLICIES: [Policy; 6] = Policy::EVICTING;

/// One long stream per policy: 2,000 steps through a 4 + 24 + 8 budget, GQA 4, ties on purpose.
#[test]
fn long_streams_match_reference() {
    for (i, &policy) in POLICIES.iter().enumerate() {
        run(&Stream { policy, layout: Layout { sinks: 4, middle: 24, recent: 8 }, batch: 2, hkv: 2, g: 4, d: 16, dtype: DType::F32, steps: 2000, ties: 1, seed: 100 + i as u64, rope: None });
    }
}

/// Exact ties of the scores every rule compares: all keys equal, capacity 31 so every steady-state mass is
/// exactly 1/32 — the leftmost-tie rule decides every eviction.
#[test]
fn exact_ties_take_the_leftmost() {
    for (i, &policy) in POLICIES.iter().enumerate() {
        run(&Stream { policy, layout: Layout { sinks: 2, middle: 21, recent: 8 }, batch: 1, hkv: 2, g: 2, d: 16, dtype: DType::F32, steps: 400, ties: 2, seed: 7 + i as u64, rope: None });
    }
}

/// Keys stored pre-RoPE, rotated by cache rank inside attention: 1,000 steps per policy with position
/// reassignment after every eviction.
#[test]
fn rope_by_cache_rank() {
    for (i, &policy) in POLICIES.iter().enumerate() {
        run(&Stream { policy, layout: Layout { sinks: 4, middle: 20, recent: 8 }, batch: 1, hkv: 2, g: 4, d: 32, dtype: DType::F32, steps: 1000, ties: 1, seed: 40 + i as u64, rope: Some(500_000.0) });
    }
}

/// A budget at least the stream length is exactly dense attention (and Full never evicts).
#[test]
fn big_budget_is_dense_and_full_refuses_overflow() {
    for &policy in POLICIES.iter().chain([Policy::Full].iter()) {
        run(&Stream { policy, layout: Layout { sinks: 1, middle: 60, recent: 3 }, batch: 1, hkv: 1, g: 8, d: 32, dtype: DType::F32, steps: 64, ties: 0, seed: 5, rope: None });
    }
    let cl = client();
    let mut full = PolicyCache::new(cl, PolicyCacheConfig::new(Policy::Full, Layout { sinks: 0, middle: 2, recent: 0 }, 1, 1, 1, 8, DType::F32)).unwrap();
    let x = |shape: &[usize]| upload(cl, &vec![0.5; shape.iter().product()], shape, DType::F32);
    for _ in 0..2 {
        full.step(&x(&[1, 1, 1, 8]), &x(&[1, 1, 8]), &x(&[1, 1, 8])).unwrap();
    }
    assert!(matches!(full.step(&x(&[1, 1, 1, 8]), &x(&[1, 1, 8]), &x(&[1, 1, 8])), Err(kvsqueeze::Error::LengthBeyondCapacity { .. })));
    assert!(matches!(full.step(&x(&[1, 1, 2, 8]), &x(&[1, 1, 8]), &x(&[1, 1, 8])), Err(kvsqueeze::Error::ShapeMismatch { tensor: "q", .. })));
    assert!(PolicyCache::new(cl, PolicyCacheConfig::new(Policy::WeightedKv, Layout { sinks: 2, middle: 0, recent: 2 }, 1, 1, 1, 8, DType::F32)).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random layouts (budgets 16–80), GQA 1/4/8, f32 and f16, 300-step streams.
    #[test]
    fn random_layouts_match_reference(p in 0usize..6, sinks in 0usize..5, middle in 1usize..64, recent in 0usize..12,
                                      g in prop::sample::select(vec![1usize, 4, 8]), f16 in any::<bool>(), ties in 0u8..2, rope in any::<bool>(), seed: u64) {
        let layout = Layout { sinks, middle: middle.max(16usize.saturating_sub(sinks + recent)), recent };
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        run(&Stream { policy: POLICIES[p], layout, batch: 2, hkv: 2, g, d: 16, dtype, steps: 300, ties, seed, rope: rope.then_some(10_000.0) });
    }
}

/// Resident memory of this process (lavapipe's device memory is host memory, so a device-side leak shows here).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()).unwrap_or(0) * 4096
}

/// Soak: 100,000 decode steps of WeightedKV (merges compound over the whole stream) with every step checked
/// against f64 attention over the reference's entries and every kept set compared, on this test's device (in CI
/// lavapipe, which executes on the CPU), and no memory growth between a 10k-step and a 100k-step run.
#[test]
fn soak_100k_steps_no_drift_no_growth() {
    let s = |steps| Stream { policy: Policy::WeightedKv, layout: Layout { sinks: 4, middle: 24, recent: 8 }, batch: 1, hkv: 1, g: 2, d: 16, dtype: DType::F32, steps, ties: 1, seed: 77, rope: None };
    run(&s(10_000));
    let after_short = rss_bytes();
    run(&s(100_000));
    let after_long = rss_bytes();
    eprintln!("soak: resident memory {:.1} MB after 10k steps, {:.1} MB after 100k", after_short as f64 / 1e6, after_long as f64 / 1e6);
    assert!(after_long <= after_short + (16 << 20), "memory grew by {} bytes over 90k more steps", after_long.saturating_sub(after_short));
}

/// Head `(bi, h)`'s window queries `[w, G, D]` (the last `w` tokens' query rows of its group, from
/// `q: [B, w, Hq, D]`) and keys `[L, D]` (from `k: [B, Hkv, L, D]`), rotated at their true positions if `rope`.
fn window_head(q: &[f64], k: &[f64], (bi, h): (usize, usize), (w, l, hq, hkv, g, d): (usize, usize, usize, usize, usize, usize), rope: Option<Rope>) -> (Vec<f64>, Vec<f64>) {
    let head = bi * hkv + h;
    let mut keys: Vec<f64> = k[head * l * d..][..l * d].to_vec();
    let mut qs: Vec<f64> = (0..w).flat_map(|i| q[((bi * w + i) * hq + h * g) * d..][..g * d].to_vec()).collect();
    if let Some(r) = rope {
        for (j, kr) in keys.chunks_mut(d).enumerate() {
            r.apply(kr, j);
        }
        for (i, qr) in qs.chunks_mut(g * d).enumerate() {
            for qg in qr.chunks_mut(d) {
                r.apply(qg, l - w + i);
            }
        }
    }
    (qs, keys)
}

/// A reference cache holding head `head`'s tokens `kept` of `k, v: [B, Hkv, L, D]` as fresh entries.
fn ref_from_kept(cfg: PolicyConfig, kept: &[usize], k: &[f64], v: &[f64], head: usize, l: usize, d: usize) -> RefCache<f64> {
    let mut rc = RefCache::new(cfg, d);
    for &p in kept {
        rc.push_entry(kvsqueeze::reference::policy::Entry::new(p, k[(head * l + p) * d..][..d].to_vec(), v[(head * l + p) * d..][..d].to_vec()));
    }
    rc
}

/// One decode step of every sequence with random f32-exact `q: [B, 1, Hq, D]`, `k, v: [B, Hkv, D]`; returns them
/// (f64) and the step's output.
fn random_step(dev: &mut PolicyCache, rng: &mut common::Rng, (b, hkv, hq, d): (usize, usize, usize, usize)) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let cl = client();
    let qd = round_to(&rng.vec(b * hq * d, 1.5), DType::F32);
    let kd = round_to(&rng.vec(b * hkv * d, 1.5), DType::F32);
    let vd = round_to(&rng.vec(b * hkv * d, 1.0), DType::F32);
    let o = dev.step(&upload(cl, &qd, &[b, 1, hq, d], DType::F32), &upload(cl, &kd, &[b, hkv, d], DType::F32), &upload(cl, &vd, &[b, hkv, d], DType::F32)).unwrap().to_host_f64(cl).unwrap();
    (qd, kd, vd, o)
}

/// 40 decode steps after a prefill: the device's outputs and kept sets follow the reference caches `refs` (one
/// per head, started from the same kept entries).
fn decode_after_prefill(dev: &mut PolicyCache, refs: &mut [RefCache<f64>], rng: &mut common::Rng, (b, hkv, g, d): (usize, usize, usize, usize), ci: usize) {
    let hq = hkv * g;
    for t in 0..40 {
        let (qd, kd, vd, o) = random_step(dev, rng, (b, hkv, hq, d));
        let kept = dev.kept_positions().unwrap();
        for (head, rc) in refs.iter_mut().enumerate() {
            let (bi, h) = (head / hkv, head % hkv);
            let want = rc.step(&qd[(bi * hq + h * g) * d..][..g * d], &kd[head * d..][..d], &vd[head * d..][..d]).o;
            let (err, _) = compare(&o[(bi * hq + h * g) * d..][..g * d], &want);
            assert!(err < 1e-4, "case {ci} step {t} head {head}: output error {err:.3e}");
            assert_eq!(kept[bi][h], rc.kept_positions(), "case {ci} step {t} head {head}: kept set");
        }
    }
}

/// TreeKV's block prefill on the device against the reference: block scores (f64 attention of the window
/// queries) within tolerance, the kept set exactly what the cyclic scan keeps on the device's scores, and then
/// decode steps that agree with the reference state machine started from the same kept entries.
#[test]
fn treekv_block_prefill_matches_reference() {
    use kvsqueeze::reference::treekv::static_scan;
    let cl = client();
    let cases = [(200usize, 8usize, false, false), (129, 16, true, false), (333, 7, false, true), (40, 8, false, false)];
    for (ci, &(l, block, select_left, rope)) in cases.iter().enumerate() {
        let (b, hkv, g, d) = (2, 2, 4, 16);
        let hq = hkv * g;
        let layout = Layout { sinks: 4, middle: 44, recent: 16 };
        let cap = layout.capacity();
        let policy = Policy::TreeKv { select_left };
        let mut cfg = PolicyCacheConfig::new(policy, layout, b, hq, hkv, d, DType::F32);
        if rope {
            cfg = cfg.with_rope(10_000.0);
        }
        let mut dev = PolicyCache::new(cl, cfg).unwrap();
        let nb = l.div_ceil(block);
        let w = l - block * (nb - 1);
        let mut rng = Rng(900 + ci as u64);
        let k = round_to(&rng.vec(b * hkv * l * d, 1.5), DType::F32);
        let v = round_to(&rng.vec(b * hkv * l * d, 1.0), DType::F32);
        let q = round_to(&rng.vec(b * w * hq * d, 1.5), DType::F32);
        let scores = dev.prefill_treekv(&upload(cl, &q, &[b, w, hq, d], DType::F32), &upload(cl, &k, &[b, hkv, l, d], DType::F32), &upload(cl, &v, &[b, hkv, l, d], DType::F32), block).unwrap();
        let scores = scores.map(|s| s.to_host_f64(cl).unwrap());
        let kept = dev.kept_positions().unwrap();
        let keep = cap / block;
        let r = Rope { base: 10_000.0 };
        let scale = 1.0 / (d as f64).sqrt();
        let mut refs: Vec<RefCache<f64>> = Vec::new();
        for bi in 0..b {
            for h in 0..hkv {
                let head = bi * hkv + h;
                let (qs, keys) = window_head(&q, &k, (bi, h), (w, l, hq, hkv, g, d), rope.then_some(r));
                let want: Vec<usize> = if nb <= keep {
                    assert!(scores.is_none());
                    (0..l).collect()
                } else {
                    let att = attention(&qs, &keys, &keys, Dims { lq: w, l, hq: g, hkv: 1, d }, l - w, scale);
                    let s: Vec<f64> = (0..l).map(|j| (0..w).map(|i| att.group_mean[i * l + j]).sum()).collect();
                    let gold: Vec<f64> = (0..nb - 1).map(|blk| s[blk * block..(blk + 1) * block].iter().sum::<f64>() / block as f64).collect();
                    let got = &scores.as_ref().unwrap()[head * (nb - 1)..][..nb - 1];
                    let mag = gold.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                    let (err, _) = compare(got, &gold);
                    assert!(err <= 64.0 * f32::EPSILON as f64 * mag.max(1e-30) * (w as f64), "case {ci} head {head}: block scores off by {err:.3e} (max {mag:.3e})");
                    let mut blocks = if keep > 1 { static_scan(got, keep - 1, select_left) } else { Vec::new() };
                    blocks.push(nb - 1);
                    blocks.into_iter().flat_map(|blk| blk * block..((blk + 1) * block).min(l)).collect()
                };
                assert_eq!(kept[bi][h], want, "case {ci} head {head}: kept set after prefill");
                let rcfg = PolicyConfig { policy, layout, rope: rope.then_some(r), positions: Positions::CacheRank, scale };
                refs.push(ref_from_kept(rcfg, &want, &k, &v, head, l, d));
            }
        }
        // Decode after the prefill: outputs and kept sets follow the reference from the same entries.
        decode_after_prefill(&mut dev, &mut refs, &mut rng, (b, hkv, g, d), ci);
    }
    // Typed errors: not TreeKV, wrong window, non-empty cache.
    let mk = |p| PolicyCache::new(cl, PolicyCacheConfig::new(p, Layout { sinks: 2, middle: 10, recent: 4 }, 1, 2, 1, 8, DType::F32)).unwrap();
    let x = |shape: &[usize]| upload(cl, &vec![0.5; shape.iter().product()], shape, DType::F32);
    let (kk, qq) = (x(&[1, 1, 20, 8]), x(&[1, 4, 2, 8]));
    assert!(matches!(mk(Policy::H2o).prefill_treekv(&qq, &kk, &kk, 8), Err(kvsqueeze::Error::Config(_))));
    assert!(matches!(mk(Policy::TreeKv { select_left: false }).prefill_treekv(&x(&[1, 3, 2, 8]), &kk, &kk, 8), Err(kvsqueeze::Error::ShapeMismatch { tensor: "q_obs", .. })));
    let mut c = mk(Policy::TreeKv { select_left: false });
    c.prefill_treekv(&qq, &kk, &kk, 8).unwrap();
    assert!(matches!(c.prefill_treekv(&qq, &kk, &kk, 8), Err(kvsqueeze::Error::Config(_))));
}

/// SnapKV prefill on the device against the reference: pooled scores (avg and max pooling) within tolerance,
/// the kept set exactly the `c − w` best of the device's scores (ties: the earlier token; one case has every key
/// equal so ties decide) plus the window, then decode steps of the policy that agree with the reference started
/// from the same entries.
#[test]
fn snapkv_prefill_matches_reference() {
    use kvsqueeze::policy::Pool;
    let cl = client();
    // (L, w, kernel, pool, policy, equal keys, rope)
    let cases = [
        (300usize, 16usize, 7usize, Pool::Avg, Policy::H2o, false, false),
        (129, 8, 5, Pool::Max, Policy::Tova, false, true),
        (500, 32, 1, Pool::Avg, Policy::WeightedKv, false, false),
        (200, 4, 3, Pool::Avg, Policy::StreamingLlm, true, false),
        (50, 8, 7, Pool::Avg, Policy::H2o, false, false),
    ];
    for (ci, &(l, w, kernel, pool, policy, equal, rope)) in cases.iter().enumerate() {
        let (b, hkv, g, d) = (2, 2, 4, 16);
        let hq = hkv * g;
        let layout = Layout { sinks: 4, middle: 44, recent: 16 };
        let cap = layout.capacity();
        let mut cfg = PolicyCacheConfig::new(policy, layout, b, hq, hkv, d, DType::F32);
        if rope {
            cfg = cfg.with_rope(10_000.0);
        }
        let mut dev = PolicyCache::new(cl, cfg).unwrap();
        let mut rng = Rng(700 + ci as u64);
        let mut k = round_to(&rng.vec(b * hkv * l * d, 1.5), DType::F32);
        if equal {
            let row = k[..d].to_vec();
            for r in k.chunks_mut(d) {
                r.copy_from_slice(&row);
            }
        }
        let v = round_to(&rng.vec(b * hkv * l * d, 1.0), DType::F32);
        let q = round_to(&rng.vec(b * w * hq * d, 1.5), DType::F32);
        let pooled = dev.prefill_snapkv(&upload(cl, &q, &[b, w, hq, d], DType::F32), &upload(cl, &k, &[b, hkv, l, d], DType::F32), &upload(cl, &v, &[b, hkv, l, d], DType::F32), kernel, pool).unwrap();
        let pooled = pooled.map(|p| p.to_host_f64(cl).unwrap());
        let kept = dev.kept_positions().unwrap();
        let r = Rope { base: 10_000.0 };
        let scale = 1.0 / (d as f64).sqrt();
        let n = l.saturating_sub(w);
        let mut refs: Vec<RefCache<f64>> = Vec::new();
        for bi in 0..b {
            for h in 0..hkv {
                let head = bi * hkv + h;
                let want: Vec<usize> = if l <= cap {
                    assert!(pooled.is_none());
                    (0..l).collect()
                } else {
                    let (qs, keys) = window_head(&q, &k, (bi, h), (w, l, hq, hkv, g, d), rope.then_some(r));
                    let att = attention(&qs, &keys, &keys, Dims { lq: w, l, hq: g, hkv: 1, d }, l - w, scale);
                    let s: Vec<f64> = (0..n).map(|j| (0..w).map(|i| att.group_mean[i * l + j]).sum()).collect();
                    let half = kernel / 2;
                    let gold: Vec<f64> = (0..n)
                        .map(|j| {
                            let win = &s[j.saturating_sub(half)..(j + half + 1).min(n)];
                            match pool {
                                Pool::Avg => win.iter().sum::<f64>() / kernel as f64,
                                Pool::Max => win.iter().cloned().fold(f64::MIN, f64::max),
                            }
                        })
                        .collect();
                    let got = &pooled.as_ref().unwrap()[head * n..][..n];
                    let mag = gold.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                    let (err, _) = compare(got, &gold);
                    assert!(err <= 64.0 * f32::EPSILON as f64 * mag.max(1e-30) * (w * kernel) as f64, "case {ci} head {head}: pooled scores off by {err:.3e} (max {mag:.3e})");
                    // The reference's rule (stable descending sort, the earlier token first on ties) on the device's scores.
                    let mut order: Vec<usize> = (0..n).collect();
                    order.sort_by(|&a, &c| got[c].partial_cmp(&got[a]).unwrap());
                    let mut sel = order[..cap - w].to_vec();
                    sel.sort_unstable();
                    sel.extend(n..l);
                    sel
                };
                assert_eq!(kept[bi][h], want, "case {ci} head {head}: kept set after prefill");
                let rcfg = PolicyConfig { policy, layout, rope: rope.then_some(r), positions: Positions::CacheRank, scale };
                refs.push(ref_from_kept(rcfg, &want, &k, &v, head, l, d));
            }
        }
        decode_after_prefill(&mut dev, &mut refs, &mut rng, (b, hkv, g, d), ci);
    }
    let mk = |p| PolicyCache::new(cl, PolicyCacheConfig::new(p, Layout { sinks: 2, middle: 10, recent: 4 }, 1, 2, 1, 8, DType::F32)).unwrap();
    let x = |shape: &[usize]| upload(cl, &vec![0.5; shape.iter().product()], shape, DType::F32);
    let (kk, qq) = (x(&[1, 1, 40, 8]), x(&[1, 4, 2, 8]));
    assert!(matches!(mk(Policy::Full).prefill_snapkv(&qq, &kk, &kk, 3, Pool::Avg), Err(kvsqueeze::Error::Config(_))));
    assert!(matches!(mk(Policy::H2o).prefill_snapkv(&qq, &kk, &kk, 4, Pool::Avg), Err(kvsqueeze::Error::Config(_))), "even kernel");
    assert!(matches!(mk(Policy::H2o).prefill_snapkv(&x(&[1, 17, 2, 8]), &kk, &kk, 3, Pool::Avg), Err(kvsqueeze::Error::Config(_))), "window > budget");
}

/// StreamingLLM's prompt rule on the device (`prefill_recent`): the kept set equals the reference's after streaming
/// the whole prompt step by step, then 40 decode steps follow the reference; a prompt that fits is kept whole (also
/// for Full), a Full cache refuses a longer one, other policies are refused.
#[test]
fn streaming_prefill_matches_reference() {
    let cl = client();
    for (ci, &(l, rope)) in [(300usize, true), (64, false), (50, false), (1, true)].iter().enumerate() {
        let (b, hkv, g, d) = (2, 2, 4, 16);
        let hq = hkv * g;
        let layout = Layout { sinks: 4, middle: 44, recent: 16 };
        let mut cfg = PolicyCacheConfig::new(Policy::StreamingLlm, layout, b, hq, hkv, d, DType::F32);
        if rope {
            cfg = cfg.with_rope(10_000.0);
        }
        let mut dev = PolicyCache::new(cl, cfg).unwrap();
        let mut rng = Rng(900 + ci as u64);
        let k = round_to(&rng.vec(b * hkv * l * d, 1.5), DType::F32);
        let v = round_to(&rng.vec(b * hkv * l * d, 1.0), DType::F32);
        dev.prefill_recent(&upload(cl, &k, &[b, hkv, l, d], DType::F32), &upload(cl, &v, &[b, hkv, l, d], DType::F32)).unwrap();
        let kept = dev.kept_positions().unwrap();
        let r = Rope { base: 10_000.0 };
        let rcfg = PolicyConfig { policy: Policy::StreamingLlm, layout, rope: rope.then_some(r), positions: Positions::CacheRank, scale: 1.0 / (d as f64).sqrt() };
        let mut refs = Vec::new();
        for bi in 0..b {
            for h in 0..hkv {
                let head = bi * hkv + h;
                // The reference streams the prompt (queries do not matter to StreamingLLM's choice).
                let mut streamed = RefCache::new(rcfg, d);
                for t in 0..l {
                    let row = |x: &[f64]| x[(head * l + t) * d..][..d].to_vec();
                    streamed.step(&rng.vec(g * d, 1.0), &row(&k), &row(&v));
                }
                let want = streamed.kept_positions();
                assert_eq!(kept[bi][h], want, "case {ci} head {head}: kept set");
                refs.push(ref_from_kept(rcfg, &want, &k, &v, head, l, d));
            }
        }
        decode_after_prefill(&mut dev, &mut refs, &mut rng, (b, hkv, g, d), ci);
    }
    let mk = |p, cap: usize| PolicyCache::new(cl, PolicyCacheConfig::new(p, Layout { sinks: 2, middle: cap - 6, recent: 4 }, 1, 2, 1, 8, DType::F32)).unwrap();
    let x = |shape: &[usize]| upload(cl, &vec![0.5; shape.iter().product()], shape, DType::F32);
    let kk = x(&[1, 1, 40, 8]);
    let mut full = PolicyCache::new(cl, PolicyCacheConfig::new(Policy::Full, Layout { sinks: 0, middle: 40, recent: 0 }, 1, 2, 1, 8, DType::F32)).unwrap();
    full.prefill_recent(&kk, &kk).unwrap();
    assert_eq!(full.kept_positions().unwrap()[0][0], (0..40).collect::<Vec<_>>());
    assert!(matches!(mk(Policy::Full, 16).prefill_recent(&kk, &kk), Err(kvsqueeze::Error::LengthBeyondCapacity { .. })));
    assert!(matches!(mk(Policy::H2o, 16).prefill_recent(&kk, &kk), Err(kvsqueeze::Error::Config(_))));
}

/// Plan once, step many: after the first step, a policy cache's steps allocate and upload nothing (the crate's
/// allocation counter does not move over 300 steps, with RoPE and without, at B = 3 with a retired sequence).
/// The counter is not blind: the one-shot op, which uploads its lengths, moves it.
#[test]
fn steady_state_steps_allocate_and_upload_nothing() {
    let cl = client();
    let (b, hkv, g, d) = (3, 2, 4, 16);
    let hq = hkv * g;
    for (policy, rope) in [(Policy::TreeKv { select_left: false }, Some(10_000.0)), (Policy::H2o, None), (Policy::WeightedKv, None)] {
        let mut cfg = PolicyCacheConfig::new(policy, Layout { sinks: 2, middle: 12, recent: 6 }, b, hq, hkv, d, DType::F32);
        if let Some(base) = rope {
            cfg = cfg.with_rope(base);
        }
        let mut dev = PolicyCache::new(cl, cfg).unwrap();
        dev.retire(1).unwrap();
        let mut rng = Rng(5);
        let (q, k, v) = (
            upload(cl, &rng.vec(b * hq * d, 1.5), &[b, 1, hq, d], DType::F32),
            upload(cl, &rng.vec(b * hkv * d, 1.5), &[b, hkv, d], DType::F32),
            upload(cl, &rng.vec(b * hkv * d, 1.0), &[b, hkv, d], DType::F32),
        );
        dev.step(&q, &k, &v).unwrap();
        // The counter is per thread: other tests running in parallel do not move it.
        let before = kvsqueeze::tensor::device_allocations();
        for _ in 0..300 {
            dev.step(&q, &k, &v).unwrap();
        }
        let grew = kvsqueeze::tensor::device_allocations() - before;
        kvsqueeze::util::sync(cl).unwrap();
        let seen = kvsqueeze::tensor::device_allocations();
        let kk = upload(cl, &rng.vec(b * hkv * 4 * d, 1.0), &[b, hkv, 4, d], DType::F32);
        kvsqueeze::attention::decode_attention(cl, &q, &kk, &kk, &[4, 4, 4], &kvsqueeze::attention::DecodeConfig::new()).unwrap();
        assert!(kvsqueeze::tensor::device_allocations() >= seen + 3, "the counter sees uploads and allocations");
        assert_eq!(grew, 0, "{policy:?}: steps allocated or uploaded {grew} buffers");
        assert_eq!(dev.seq_len(1), None);
        assert_eq!(dev.seq_len(0), Some(20));
    }
}

/// Continuous batching: over a churn of admissions (empty, or a prompt prefilled by the policy's prefill) and
/// retirements, every live sequence's outputs and kept sets equal those of its own single-sequence reference
/// run, while retired slots output zeros; a prefilled admission keeps the same entries as a one-sequence cache
/// prefilled with the same prompt.
#[test]
fn churn_of_admissions_and_retirements_matches_single_sequence_runs() {
    use kvsqueeze::policy::{Admission, Pool};
    let cl = client();
    let (b, hkv, g, d) = (3usize, 2usize, 2usize, 16usize);
    let hq = hkv * g;
    let layout = Layout { sinks: 2, middle: 6, recent: 4 };
    let scale = 1.0 / (d as f64).sqrt();
    let mut total_steps = 0;
    for (pi, (policy, rope)) in
        [(Policy::H2o, None), (Policy::TreeKv { select_left: false }, Some(10_000.0)), (Policy::WeightedKv, None), (Policy::StreamingLlm, Some(10_000.0)), (Policy::Tova, None)].into_iter().enumerate()
    {
        let mut cfg = PolicyCacheConfig::new(policy, layout, b, hq, hkv, d, DType::F32);
        if let Some(base) = rope {
            cfg = cfg.with_rope(base);
        }
        let rcfg = PolicyConfig { policy, layout, rope: rope.map(|base| Rope { base }), positions: Positions::CacheRank, scale };
        let mut dev = PolicyCache::new(cl, cfg).unwrap();
        // Per slot: the reference caches of its live sequence (one per KV head), or None when retired.
        let mut refs: Vec<Option<Vec<RefCache<f64>>>> = (0..b).map(|_| Some((0..hkv).map(|_| RefCache::new(rcfg, d)).collect())).collect();
        let mut rng = Rng(900 + pi as u64);
        let (mut admitted, mut retired) = (0, 0);
        for t in 0..500 {
            // Churn: retire a live sequence now and then; admit into a free slot now and then.
            let r = rng.next_u64() % 100;
            let slot = (rng.next_u64() % b as u64) as usize;
            if r < 6 && refs[slot].is_some() {
                dev.retire(slot).unwrap();
                refs[slot] = None;
                retired += 1;
            } else if r < 18 && refs[slot].is_none() {
                let l = 4 + (rng.next_u64() % 30) as usize;
                let k = round_to(&rng.vec(hkv * l * d, 1.5), DType::F32);
                let v = round_to(&rng.vec(hkv * l * d, 1.0), DType::F32);
                let (kd, vd) = (upload(cl, &k, &[1, hkv, l, d], DType::F32), upload(cl, &v, &[1, hkv, l, d], DType::F32));
                let w = 3.min(l);
                let q = round_to(&rng.vec(w * hq * d, 1.5), DType::F32);
                let qd = upload(cl, &q, &[1, w, hq, d], DType::F32);
                // TreeKV's observation window is the last block: 1 + (L − 1) mod 4 tokens for blocks of 4.
                let wo = 1 + (l - 1) % 4;
                let q_obs = upload(cl, &round_to(&rng.vec(wo * hq * d, 1.5), DType::F32), &[1, wo, hq, d], DType::F32);
                let how = match (rng.next_u64() % 3, policy) {
                    (0, _) => Admission::Empty,
                    (_, Policy::StreamingLlm) => Admission::Recent { k: &kd, v: &vd },
                    (_, Policy::TreeKv { .. }) => Admission::TreeKv { q_obs: &q_obs, k: &kd, v: &vd, block: 4 },
                    _ => Admission::SnapKv { q_win: &qd, k: &kd, v: &vd, kernel: 3, pool: Pool::Avg },
                };
                let empty = matches!(how, Admission::Empty);
                // The same admission into a fresh one-sequence cache: the entries kept must be the same.
                let mut one = cfg;
                one.batch = 1;
                let mut solo = PolicyCache::new(cl, one).unwrap();
                solo.admit(0, how).unwrap();
                dev.admit(slot, how).unwrap();
                let kept = dev.kept_positions().unwrap();
                assert_eq!(kept[slot], solo.kept_positions().unwrap()[0], "{policy:?} step {t}: admission into slot {slot}");
                refs[slot] = Some(if empty { (0..hkv).map(|_| RefCache::new(rcfg, d)).collect() } else { (0..hkv).map(|h| ref_from_kept(rcfg, &kept[slot][h], &k, &v, h, l, d)).collect() });
                admitted += 1;
            }
            let (qd, kd, vd, o) = random_step(&mut dev, &mut rng, (b, hkv, hq, d));
            let kept = dev.kept_positions().unwrap();
            for (bi, r) in refs.iter_mut().enumerate() {
                let rows = &o[bi * hq * d..][..hq * d];
                let Some(heads) = r else {
                    assert!(rows.iter().all(|&x| x == 0.0), "{policy:?} step {t}: retired slot {bi} wrote a non-zero output");
                    assert!(kept[bi].iter().all(|h| h.is_empty()));
                    continue;
                };
                for (h, rc) in heads.iter_mut().enumerate() {
                    let head = bi * hkv + h;
                    let want = rc.step(&qd[(bi * hq + h * g) * d..][..g * d], &kd[head * d..][..d], &vd[head * d..][..d]).o;
                    let (err, parity) = compare(&rows[h * g * d..][..g * d], &want);
                    assert!(parity && err < 1e-4, "{policy:?} step {t} slot {bi} head {h}: output error {err:.3e}");
                    assert_eq!(kept[bi][h], rc.kept_positions(), "{policy:?} step {t} slot {bi} head {h}: kept set");
                }
                assert_eq!(dev.seq_len(bi), Some(heads[0].len()), "{policy:?} step {t} slot {bi}: length");
            }
            total_steps += 1;
        }
        eprintln!("churn {policy:?}: 500 steps, {admitted} admissions, {retired} retirements");
        assert!(admitted >= 10 && retired >= 10, "{policy:?}: too little churn ({admitted} admissions, {retired} retirements)");
        // Refusals: admitting into a live slot, indices beyond the batch; the cache is unchanged.
        let live = (0..b).find(|&s| dev.seq_len(s).is_some_and(|n| n > 0)).expect("a live slot");
        assert!(matches!(dev.admit(live, Admission::Empty), Err(kvsqueeze::Error::Config(_))));
        assert!(matches!(dev.admit(b, Admission::Empty), Err(kvsqueeze::Error::Config(_))));
        assert!(matches!(dev.retire(b), Err(kvsqueeze::Error::Config(_))));
    }
    assert_eq!(total_steps, 2500);
}

/// Device graphs (`BurnModel::step_graphed` records whole model steps this way): a cache's steps recorded once per
/// parity (`record_step`, nothing runs) and replayed against fixed input buffers refreshed between replays give,
/// with `graph_parity` before and `note_replayed` after each replay, exactly the outputs, lengths and kept
/// positions of plain steps; a Full cache at capacity and a cache that checks its inputs are refused before any
/// launch, and a step is recorded only after a plain one.
#[test]
fn recorded_steps_replay_as_plain_steps() {
    let cl = client();
    let (b, hkv, g, d) = (3, 2, 4, 16);
    let hq = hkv * g;
    let (n, cap) = (14, 12);
    for (policy, rope) in [(Policy::TreeKv { select_left: false }, Some(10_000.0)), (Policy::H2o, None), (Policy::Full, None)] {
        let mut cfg = PolicyCacheConfig::new(policy, Layout { sinks: 2, middle: 6, recent: 4 }, b, hq, hkv, d, DType::F32);
        if let Some(base) = rope {
            cfg = cfg.with_rope(base);
        }
        let (mut plain, mut rec) = (PolicyCache::new(cl, cfg).unwrap(), PolicyCache::new(cl, cfg).unwrap());
        for c in [&mut plain, &mut rec] {
            c.retire(1).unwrap();
        }
        let mut rng = common::Rng(11);
        let shapes = [vec![b, 1, hq, d], vec![b, hkv, d], vec![b, hkv, d]];
        let fixed: Vec<_> = shapes.iter().map(|s| poisoned(cl, s, DType::F32)).collect();
        let fresh = |rng: &mut common::Rng| {
            for (t, s) in fixed.iter().zip(&shapes) {
                let x: Vec<f32> = rng.vec(s.iter().product(), 1.5).iter().map(|&v| v as f32).collect();
                cl.write(&t.handle, cubecl::bytes::Bytes::from_elems(x));
            }
        };
        let (q, k, v) = (&fixed[0], &fixed[1], &fixed[2]);
        assert!(rec.record_step(q, k, v, 0).is_err(), "{policy:?}: recording before a plain step is refused");
        fresh(&mut rng);
        plain.step(q, k, v).unwrap();
        rec.step(q, k, v).unwrap();
        let mut graphs = Vec::new();
        for parity in 0..2 {
            cl.graph_prepare().unwrap();
            cl.start_capture().unwrap();
            let r = rec.record_step(q, k, v, parity);
            graphs.push(cl.stop_capture().unwrap());
            r.unwrap();
        }
        assert_eq!(rec.len(), 1, "recording left the host state alone");
        for t in 1..n {
            fresh(&mut rng);
            let want = plain.step(q, k, v);
            let parity = rec.graph_parity();
            if policy == Policy::Full && t >= cap {
                assert!(want.is_err() && parity.is_err(), "{policy:?} step {t}: past capacity both refuse");
                continue;
            }
            let want = want.unwrap().to_host_f64(cl).unwrap();
            // SAFETY: the graph's buffers (the cache's and `fixed`) are alive and used by this thread only.
            unsafe { graphs[parity.unwrap()].replay() }.unwrap();
            rec.note_replayed();
            let got = rec.step_output().unwrap().to_host_f64(cl).unwrap();
            let diff = got.iter().zip(&want).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(got == want, "{policy:?} step {t}: a replayed step is off a plain one by {diff:e}");
            assert_eq!((rec.len(), rec.kept_positions().unwrap()), (plain.len(), plain.kept_positions().unwrap()), "{policy:?} step {t}");
        }
        let checking = PolicyCache::new(cl, cfg.with_check_finite(true)).unwrap();
        assert!(checking.graph_parity().is_err(), "a cache that reads its inputs back cannot be recorded");
    }
}

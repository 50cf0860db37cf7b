//! FourierAttention on the device against the reference (`kvsqueeze-reference::fourier`):
//! - the prefill transform alone (random L_mid, column counts around the 128-thread tile, N, T, f32/f16
//!   storage, strided rows);
//! - the whole layer cache: ragged prompts (some formed at prefill, some below the trigger that form at a
//!   decode step), decode steps through the rank-1 update and the ring, per-head random critical lists, GQA
//!   1/4/8, and FlashFourierAttention by both paths against the reference's direct attention (f64 gold, f32
//!   naive yardstick, design.md §5 tolerance), outputs poisoned by construction (fresh buffers);
//! - `physical_bytes` against the formula, the official dim-list schema, and the typed errors.

mod common;

use common::Rng;
use common::*;
use kvsqueeze::fourier::{fourier_transform, FourierDims, FourierLayerCache, FourierLayerConfig, FourierPath};
use kvsqueeze::reference::fourier::{transform, FourierCache, FourierConfig};
use kvsqueeze::{DType, Error};
use proptest::prelude::*;

/// Kernel coefficients vs the f64 reference with the derived tolerance (naive f32 reference as the yardstick:
/// the kernel accumulates in f32 whatever the storage dtype). The kernel's layout is `[C, 2N]`.
fn check_transform(lmid: usize, cols: usize, n: usize, extra: usize, f16: bool, pad: usize, seed: u64) {
    let cl = client();
    let dtype = if f16 { DType::F16 } else { DType::F32 };
    if !kvsqueeze::attention::dtype_supported(cl, dtype) {
        skip(&format!("{dtype:?} transform"), "dtype unsupported on this device");
        return;
    }
    let window = lmid + extra;
    let mut rng = Rng(seed);
    let x = round_to(&rng.walk(lmid, cols), dtype);
    let rs = cols + pad;
    let mut buf = vec![f64::NAN; lmid * rs];
    for t in 0..lmid {
        buf[t * rs..t * rs + cols].copy_from_slice(&x[t * cols..][..cols]);
    }
    let up = upload(cl, &buf, &[lmid * rs], dtype).view(&[lmid, cols], &[rs, 1], 0);
    let got = fourier_transform(cl, &up, n, window).unwrap().to_host_f64(cl).unwrap();
    let rows: Vec<Vec<f64>> = x.chunks(cols).map(|r| r.to_vec()).collect();
    let transpose = |coef: &[f64]| -> Vec<f64> { (0..cols).flat_map(|j| (0..2 * n).map(move |f| coef[f * cols + j])).collect() };
    let gold = transpose(&transform(&rows, (0..cols).collect(), n, window).coef);
    let rows32: Vec<Vec<f32>> = rows.iter().map(|r| r.iter().map(|&v| v as f32).collect()).collect();
    let naive = transpose(&transform(&rows32, (0..cols).collect(), n, window).coef.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let mag = gold.iter().fold(1.0f64, |a, v| a.max(v.abs()));
    check_tolerance("coef", &format!("lmid {lmid} cols {cols} n {n} T {window} f16 {f16} pad {pad} seed {seed}"), &got, &naive, &gold, 8.0 * f32::EPSILON as f64 * mag);
}

#[derive(Clone, Debug)]
struct Case {
    d: usize,
    hkv: usize,
    g: usize,
    l_init: usize,
    l_local: usize,
    n: usize,
    /// Prompt length per sequence.
    prompts: Vec<usize>,
    steps: usize,
    /// Spare window beyond the longest middle.
    extra: usize,
    /// Probability (in %) that a dim is critical.
    crit_pct: u64,
    /// Least-squares reconstruction instead of the paper's renormalisation.
    ls: bool,
    dtype: DType,
    seed: u64,
}

fn per_head_crit(rng: &mut Rng, hkv: usize, d: usize, pct: u64) -> Vec<Vec<usize>> {
    (0..hkv).map(|_| (0..d).filter(|_| rng.next_u64() % 100 < pct).collect()).collect()
}

fn run(c: &Case) {
    let cl = client();
    if !kvsqueeze::attention::dtype_supported(cl, c.dtype) {
        skip(&format!("{:?} fourier cache", c.dtype), "dtype unsupported on this device");
        return;
    }
    let case = format!("{c:?}");
    let (bsz, hkv, d, g) = (c.prompts.len(), c.hkv, c.d, c.g);
    let hq = hkv * g;
    let mut rng = Rng(c.seed);
    let dims = FourierDims::from_critical(hkv, d, per_head_crit(&mut rng, hkv, d, c.crit_pct), per_head_crit(&mut rng, hkv, d, c.crit_pct)).unwrap();
    let trigger = c.l_init + 2 * c.n + c.l_local;
    let max_mid = c.prompts.iter().map(|&l| (l + c.steps).saturating_sub(c.l_init + c.l_local)).max().unwrap();
    let window = max_mid + c.extra;
    let cfg = FourierLayerConfig::new(bsz, hq, c.dtype, c.l_init, c.l_local, c.n, window, dims.clone()).with_least_squares(c.ls);
    let mut dev = FourierLayerCache::new(cl, cfg.clone()).unwrap();
    let rcfg = |h: usize| FourierConfig { d, l_init: c.l_init, l_local: c.l_local, n_freq: c.n, window, k_crit: dims.k_crit[h].clone(), v_crit: dims.v_crit[h].clone(), least_squares: c.ls };
    let mut gold: Vec<FourierCache<f64>> = (0..bsz * hkv).map(|i| FourierCache::new(rcfg(i % hkv)).unwrap()).collect();
    let mut naive: Vec<FourierCache<f32>> = (0..bsz * hkv).map(|i| FourierCache::new(rcfg(i % hkv)).unwrap()).collect();
    let to32 = |x: &[f64]| -> Vec<f32> { x.iter().map(|&v| v as f32).collect() };
    for (b, &l) in c.prompts.iter().enumerate() {
        // Smooth series (what the method targets) plus a little noise; [L, Hkv, D] token-major.
        let k = round_to(&rng.walk(l, hkv * d), c.dtype);
        let v = round_to(&rng.walk(l, hkv * d), c.dtype);
        dev.prefill(b, &upload(cl, &k, &[l, hkv, d], c.dtype), &upload(cl, &v, &[l, hkv, d], c.dtype)).unwrap();
        for h in 0..hkv {
            let pick = |x: &[f64]| -> Vec<f64> { (0..l).flat_map(|t| x[(t * hkv + h) * d..][..d].to_vec()).collect() };
            let (kh, vh) = (pick(&k), pick(&v));
            gold[b * hkv + h].prefill(&kh, &vh).unwrap();
            naive[b * hkv + h].prefill(&to32(&kh), &to32(&vh)).unwrap();
        }
    }
    let scale = 1.0 / (d as f64).sqrt();
    let check = |dev: &FourierLayerCache, gold: &[FourierCache<f64>], naive: &[FourierCache<f32>], rng: &mut Rng, when: &str| {
        let lens = dev.lens();
        for (b, r) in gold.iter().enumerate().step_by(hkv) {
            assert_eq!(lens[b / hkv], r.len(), "tokens of sequence {} {when}\n  case: {case}", b / hkv);
        }
        assert_eq!(dev.mid_lens(), (0..bsz).map(|b| gold[b * hkv].mid_len()).collect::<Vec<_>>(), "middle lengths {when}\n  case: {case}");
        let q = round_to(&rng.vec(bsz * hq * d, 1.5), c.dtype);
        let qd = upload(cl, &q, &[bsz, 1, hq, d], c.dtype);
        let mut want = Vec::new();
        let mut yard = Vec::new();
        for b in 0..bsz {
            for h in 0..hkv {
                let qg = &q[(b * hq + h * g) * d..][..g * d];
                want.extend(gold[b * hkv + h].attend_direct(qg, scale));
                yard.extend(naive[b * hkv + h].attend_direct(&to32(qg), scale as f32).iter().map(|&x| x as f64));
            }
        }
        let mag = want.iter().fold(1.0f64, |a, v| a.max(v.abs()));
        // Floor: the output's rounding to the storage dtype, plus the kernel's f32 angle (2π/T rounded, the
        // naive reference uses f64 angles) over the `2N` terms of a reconstruction.
        let floor = (4.0 * eps(c.dtype) + 64.0 * f32::EPSILON as f64 * (c.n as f64).sqrt()) * mag;
        for path in [FourierPath::Direct, FourierPath::Spectral, FourierPath::Fft] {
            let o = dev.attend(&qd, scale as f32, path).unwrap().to_host_f64(cl).unwrap();
            check_tolerance(&format!("{path:?} attention {when}"), &case, &o, &yard, &want, floor);
        }
    };
    check(&dev, &gold, &naive, &mut rng, "after prefill");
    for step in 0..c.steps {
        let k = round_to(&rng.walk(1, bsz * hkv * d), c.dtype);
        let v = round_to(&rng.walk(1, bsz * hkv * d), c.dtype);
        dev.append(&upload(cl, &k, &[bsz, hkv, d], c.dtype), &upload(cl, &v, &[bsz, hkv, d], c.dtype)).unwrap();
        for i in 0..bsz * hkv {
            let (kh, vh) = (&k[i * d..][..d], &v[i * d..][..d]);
            gold[i].append(kh, vh).unwrap();
            naive[i].append(&to32(kh), &to32(vh)).unwrap();
        }
        if step + 1 == c.steps || step == c.steps / 2 {
            check(&dev, &gold, &naive, &mut rng, &format!("after step {step}"));
        }
    }
    if gold.iter().all(|r| r.mid_len() > 0) {
        assert_eq!(dev.physical_bytes(), cfg.formula_bytes(), "physical bytes once every middle is formed\n  case: {case}");
    }
    let _ = trigger;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn transform_matches_reference(lmid in 1usize..400, cols in prop::sample::select(vec![1usize, 7, 127, 128, 129, 200]),
                                   n in 1usize..40, extra in 0usize..300, f16: bool, pad in prop::sample::select(vec![0usize, 3]), seed: u64) {
        check_transform(lmid, cols, n, extra, f16, pad, seed);
    }

    /// Ragged prompts around the trigger and the 128-token tile, decode steps through formation at a step.
    #[test]
    fn flash_fourier_matches_reference(d in prop::sample::select(vec![8usize, 16, 32]), hkv in 1usize..3, g in prop::sample::select(vec![1usize, 4, 8]),
                                       l_init in 0usize..5, l_local in prop::sample::select(vec![1usize, 3, 16]), n in prop::sample::select(vec![1usize, 5, 16]),
                                       lens in prop::collection::vec(prop::sample::select(vec![1usize, 20, 127, 128, 129, 200, 331]), 1..4),
                                       steps in 1usize..40, extra in 0usize..50, crit_pct in prop::sample::select(vec![0u64, 25, 100]), f16: bool, ls: bool, seed: u64) {
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        run(&Case { d, hkv, g, l_init, l_local, n, prompts: lens, steps, extra, crit_pct, ls, dtype, seed });
    }
}

/// A fixed case large enough for several splits of both kinds, with the paper's split of init/local.
#[test]
fn flash_fourier_long_middle() {
    run(&Case { d: 64, hkv: 2, g: 4, l_init: 4, l_local: 60, n: 64, prompts: vec![700, 1500, 90], steps: 70, extra: 5, crit_pct: 20, ls: false, dtype: DType::F32, seed: 11 });
    run(&Case { d: 32, hkv: 1, g: 8, l_init: 4, l_local: 30, n: 40, prompts: vec![900, 300], steps: 40, extra: 3, crit_pct: 10, ls: true, dtype: DType::F32, seed: 12 });
}

#[test]
fn official_dim_lists() {
    // A two-head, D = 4 layer in the official schema (global ids h·D + d; cumulative per-head counts).
    let json = r#"{"Layer_0": {"kc_list": [0, 1, 5, 6, 7], "kn_list": [2, 3, 4], "kc_h_list": [2, 5], "kn_h_list": [2, 3],
                  "vc_list": [0, 1, 2, 3, 4], "vn_list": [5, 6, 7], "vc_h_list": [4, 5], "vn_h_list": [0, 3]}}"#;
    let dims = FourierDims::from_official_json(json, 0, 2, 4).unwrap();
    assert_eq!(dims.k_crit, vec![vec![2, 3], vec![0]]);
    assert_eq!(dims.v_crit, vec![vec![], vec![1, 2, 3]]);
    assert!(FourierDims::from_official_json(json, 1, 2, 4).is_err());
    assert!(FourierDims::from_official_json(&json.replace("[2, 3, 4]", "[2, 3]"), 0, 2, 4).is_err(), "not a partition");
    assert!(FourierDims::from_official_json(&json.replace("\"kc_h_list\": [2, 5]", "\"kc_h_list\": [3, 5]"), 0, 2, 4).is_err(), "counts");
    // The paper's Llama-3.1-8B file, when the shared data is present: 73.7% of K and 79.3% of V compressed.
    let rel = "benches/data/llama3.1-8b-layer10-dims.json";
    let text = std::fs::read_to_string(rel).or_else(|_| std::fs::read_to_string(format!("{}/{rel}", env!("CARGO_MANIFEST_DIR")))).expect("benches/data holds layer 10 of the paper's dim lists");
    let l10 = FourierDims::from_official_json(&text, 10, 8, 128).unwrap();
    let (fk, fv) = l10.compressed_fraction();
    assert!((fk - 0.8).abs() < 0.01 && (fv - 0.8).abs() < 0.01, "layer 10 compresses 80% of K and V columns: {fk} {fv}");
}

#[test]
fn fourier_errors() {
    let cl = client();
    let x = upload(cl, &[0.5; 12], &[3, 4], DType::F32);
    assert!(fourier_transform(cl, &x, 4, 3).is_ok());
    assert!(matches!(fourier_transform(cl, &x, 4, 2), Err(Error::LengthBeyondCapacity { len: 3, capacity: 2, .. })));
    assert!(matches!(fourier_transform(cl, &x, 0, 8), Err(Error::Config(_))));
    assert!(matches!(fourier_transform(cl, &x, 1 << 16, 1 << 16), Err(Error::Config(_))));
    assert!(matches!(fourier_transform(cl, &upload(cl, &[0.5; 12], &[12], DType::F32), 4, 16), Err(Error::ShapeMismatch { .. })));

    let d = 8;
    let dims = FourierDims::uniform(1, d, &[0, 3], &[1]).unwrap();
    assert!(FourierDims::uniform(1, d, &[3, 0], &[]).is_err(), "unsorted");
    assert!(FourierDims::uniform(1, d, &[8], &[]).is_err(), "beyond D");
    assert!(FourierDims::from_critical(2, d, vec![vec![]], vec![vec![], vec![]]).is_err(), "one list per head");
    let cfg = FourierLayerConfig::new(1, 2, DType::F32, 1, 2, 2, 8, dims.clone());
    assert!(matches!(FourierLayerCache::new(cl, FourierLayerConfig::new(1, 3, DType::F32, 1, 2, 2, 8, FourierDims::uniform(2, d, &[0], &[1]).unwrap())), Err(Error::GqaRatio { .. })));
    assert!(matches!(FourierLayerCache::new(cl, FourierLayerConfig::new(1, 2, DType::F32, 1, 0, 2, 8, dims.clone())), Err(Error::Config(_))));
    assert!(matches!(FourierLayerCache::new(cl, FourierLayerConfig::new(1, 2, DType::F32, 1, 2, 1 << 16, 1 << 16, dims.clone())), Err(Error::Config(_))));
    let mut dev = FourierLayerCache::new(cl, cfg).unwrap();
    let q = upload(cl, &[0.5; 16], &[1, 1, 2, d], DType::F32);
    assert!(matches!(dev.attend(&q, 1.0, FourierPath::Spectral), Err(Error::ZeroLength { batch: 0 })), "empty cache");
    let mut rng = Rng(3);
    // Trigger = 1 + 4 + 2 = 7; a prompt of 16 tokens has a middle of 13 > T = 8.
    let long = upload(cl, &rng.vec(16 * d, 1.0), &[16, 1, d], DType::F32);
    assert!(matches!(dev.prefill(0, &long, &long), Err(Error::LengthBeyondCapacity { len: 13, capacity: 8, .. })));
    assert!(matches!(dev.prefill(0, &long, &upload(cl, &rng.vec(15 * d, 1.0), &[15, 1, d], DType::F32)), Err(Error::ShapeMismatch { .. })));
    assert!(dev.prefill(0, &upload(cl, &rng.vec(4 * d, 1.0), &[4, 1, d], DType::F16), &long).is_err());
    assert!(matches!(dev.prefill(1, &long, &long), Err(Error::Config(_))));
    // 11 tokens: middle 8 = T. Then one more decode token would make it 9: refused, the cache unchanged.
    let k = rng.vec(11 * d, 1.0);
    let v = rng.vec(11 * d, 1.0);
    dev.prefill(0, &upload(cl, &k, &[11, 1, d], DType::F32), &upload(cl, &v, &[11, 1, d], DType::F32)).unwrap();
    assert!(matches!(dev.prefill(0, &upload(cl, &k, &[11, 1, d], DType::F32), &upload(cl, &v, &[11, 1, d], DType::F32)), Err(Error::Config(_))), "prefill twice");
    let tok = upload(cl, &rng.vec(d, 1.0), &[1, 1, d], DType::F32);
    assert!(matches!(dev.append(&tok, &tok), Err(Error::LengthBeyondCapacity { len: 9, capacity: 8, .. })));
    assert!(matches!(dev.append(&upload(cl, &rng.vec(2 * d, 1.0), &[2, 1, d], DType::F32), &tok), Err(Error::ShapeMismatch { .. })));
    assert_eq!(dev.lens(), vec![11]);
    let r = FourierConfig { d, l_init: 1, l_local: 2, n_freq: 2, window: 8, k_crit: vec![0, 3], v_crit: vec![1], least_squares: false };
    let mut gold = FourierCache::<f64>::new(r).unwrap();
    gold.prefill(&k, &v).unwrap();
    let qv = rng.vec(2 * d, 1.0);
    let want = gold.attend_direct(&qv, 0.5);
    for path in [FourierPath::Direct, FourierPath::Spectral, FourierPath::Fft] {
        let got = dev.attend(&upload(cl, &qv, &[1, 1, 2, d], DType::F32), 0.5, path).unwrap().to_host_f64(cl).unwrap();
        let (err, parity) = compare(&got, &want);
        assert!(parity && err < 1e-4, "{path:?} after refused ops: {err}");
    }
    assert!(matches!(dev.attend(&q, f32::NAN, FourierPath::Direct), Err(Error::Config(_))));
    // A transform too long for the device's shared memory: the FFT path is refused before any launch, the other
    // paths still serve the cache.
    // (N = 1025 needs F = 8192, 64 KiB: beyond lavapipe's 32 KiB and WebGPU's 16 KiB, within an H100's 227 KiB.)
    let big = FourierLayerConfig::new(1, 1, DType::F32, 1, 1, 1025, 9000, FourierDims::uniform(1, d, &[0], &[0]).unwrap());
    let mut wide = FourierLayerCache::new(cl, big).unwrap();
    wide.prefill(0, &upload(cl, &k[..3 * d], &[3, 1, d], DType::F32), &upload(cl, &v[..3 * d], &[3, 1, d], DType::F32)).unwrap();
    let q1 = upload(cl, &qv[..d], &[1, 1, 1, d], DType::F32);
    let fits = 8 * 8192 <= cl.properties().hardware.max_shared_memory_size;
    assert_eq!(wide.fft_size(), if fits { Some((8192, 8192 - 1025 + 1)) } else { None });
    let l0 = kvsqueeze::tensor::device_launches();
    let got = wide.attend(&q1, 0.5, FourierPath::Fft);
    if fits {
        assert!(got.is_ok(), "FFT path within shared memory: {:?}", got.err());
    } else {
        assert!(matches!(got, Err(Error::DeviceLimit(_))), "FFT path beyond shared memory");
        assert_eq!(kvsqueeze::tensor::device_launches(), l0, "a refused FFT attend launched");
    }
    assert!(wide.attend(&q1, 0.5, FourierPath::Spectral).is_ok());
    assert!(matches!(dev.attend(&upload(cl, &[0.5; 8], &[1, 1, 1, d], DType::F32), 1.0, FourierPath::Direct), Err(Error::ShapeMismatch { .. })));
}

/// Regression (found by a fresh proptest seed in CI): with N = 1 the raw reconstruction is exactly constant, but
/// the mean of 125 equal f32 values is not, and a guard on `dev_d` relative to the mean let `dev_u/dev_d` blow up.
/// The guard is now on the reconstruction's range, in the kernel and the reference alike.
#[test]
fn flat_reconstruction_keeps_scale_one() {
    run(&Case { d: 8, hkv: 1, g: 8, l_init: 2, l_local: 1, n: 1, prompts: vec![128], steps: 3, extra: 42, crit_pct: 0, ls: false, dtype: DType::F16, seed: 3580259819133131016 });
}

/// Continuous batching: over a churn of admissions (prompts below, at and above the trigger, into a cache whose
/// exact buffer is re-packed or not) and retirements, every live sequence's step outputs match its own
/// single-sequence reference run (design.md §5 tolerance), its token and middle counts exactly, and a retired
/// slot's rows are zeros.
#[test]
fn churn_of_admissions_and_retirements_matches_single_sequence_runs() {
    use kvsqueeze::policy::CompressedKvCache;
    let cl = client();
    let (bsz, hkv, g, d) = (3usize, 2usize, 2usize, 16usize);
    let hq = hkv * g;
    let (li, ll, n, window) = (2usize, 4usize, 8usize, 48usize);
    let trigger = li + 2 * n + ll;
    let mut rng = Rng(4242);
    let dims = FourierDims::from_critical(hkv, d, per_head_crit(&mut rng, hkv, d, 30), per_head_crit(&mut rng, hkv, d, 30)).unwrap();
    let cfg = FourierLayerConfig::new(bsz, hq, DType::F32, li, ll, n, window, dims.clone());
    let mut dev = FourierLayerCache::new(cl, cfg.clone()).unwrap();
    let rcfg = |h: usize| FourierConfig { d, l_init: li, l_local: ll, n_freq: n, window, k_crit: dims.k_crit[h].clone(), v_crit: dims.v_crit[h].clone(), least_squares: false };
    type Refs = Option<(Vec<FourierCache<f64>>, Vec<FourierCache<f32>>)>;
    let fresh = || -> Refs { Some(((0..hkv).map(|h| FourierCache::new(rcfg(h)).unwrap()).collect(), (0..hkv).map(|h| FourierCache::new(rcfg(h)).unwrap()).collect())) };
    let mut refs: Vec<Refs> = (0..bsz).map(|_| fresh()).collect();
    let to32 = |x: &[f64]| -> Vec<f32> { x.iter().map(|&v| v as f32).collect() };
    let scale = 1.0 / (d as f64).sqrt();
    let (mut admitted, mut retired, mut regrown, mut packed_steps) = (0, 0, 0, 0);
    // Per slot, the random walks its keys and values follow (smooth series, what the method targets; i.i.d.
    // tokens would make the frozen renormalisation of a middle formed at a step ill-conditioned).
    let mut walks: Vec<(Vec<f64>, Vec<f64>)> = (0..bsz).map(|_| (rng.vec(hkv * d, 1.0), rng.vec(hkv * d, 1.0))).collect();
    for t in 0..1500 {
        let r = rng.next_u64() % 100;
        let slot = (rng.next_u64() % bsz as u64) as usize;
        if r < 2 && refs[slot].is_some() {
            dev.retire(slot).unwrap();
            refs[slot] = None;
            retired += 1;
        } else if r < 8 && refs[slot].is_none() {
            let l = [1, 5, trigger, trigger + 1, 40][(rng.next_u64() % 5) as usize];
            let (k, v) = (rng.walk(l, hkv * d), rng.walk(l, hkv * d));
            let packed = dev.physical_bytes() == cfg.formula_bytes();
            dev.prefill(slot, &upload(cl, &k, &[l, hkv, d], DType::F32), &upload(cl, &v, &[l, hkv, d], DType::F32)).unwrap();
            regrown += usize::from(packed && dev.physical_bytes() != cfg.formula_bytes());
            let mut fr = fresh();
            let (gold, naive) = fr.as_mut().unwrap();
            for h in 0..hkv {
                let pick = |x: &[f64]| -> Vec<f64> { (0..l).flat_map(|s| x[(s * hkv + h) * d..][..d].to_vec()).collect() };
                gold[h].prefill(&pick(&k), &pick(&v)).unwrap();
                naive[h].prefill(&to32(&pick(&k)), &to32(&pick(&v))).unwrap();
            }
            refs[slot] = fr;
            walks[slot] = (k[(l - 1) * hkv * d..].to_vec(), v[(l - 1) * hkv * d..].to_vec());
            admitted += 1;
        }
        // A sequence whose middle would outgrow the window `T` ends (the cache would refuse the step).
        for b in 0..bsz {
            if refs[b].as_ref().is_some_and(|(gold, _)| gold[0].mid_len() + 1 > window) {
                dev.retire(b).unwrap();
                refs[b] = None;
                retired += 1;
            }
        }
        packed_steps += usize::from(dev.physical_bytes() == cfg.formula_bytes());
        for (wk, wv) in walks.iter_mut() {
            for x in wk.iter_mut().chain(wv.iter_mut()) {
                *x += 0.1 * rng.uniform();
            }
        }
        let (k, v): (Vec<f64>, Vec<f64>) = (walks.iter().flat_map(|w| w.0.clone()).collect(), walks.iter().flat_map(|w| w.1.clone()).collect());
        let q = rng.vec(bsz * hq * d, 1.5);
        let o = dev.step(&upload(cl, &q, &[bsz, 1, hq, d], DType::F32), &upload(cl, &k, &[bsz, hkv, d], DType::F32), &upload(cl, &v, &[bsz, hkv, d], DType::F32)).unwrap().to_host_f64(cl).unwrap();
        let case = format!("step {t}, slots {:?}", dev.lens());
        for b in 0..bsz {
            let rows = &o[b * hq * d..][..hq * d];
            let Some((gold, naive)) = refs[b].as_mut() else {
                assert!(rows.iter().all(|&x| x == 0.0), "retired slot {b} must output zeros ({case})");
                assert!(!dev.is_active(b));
                continue;
            };
            let (mut want, mut yard) = (Vec::new(), Vec::new());
            for h in 0..hkv {
                let (kh, vh) = (&k[(b * hkv + h) * d..][..d], &v[(b * hkv + h) * d..][..d]);
                gold[h].append(kh, vh).unwrap();
                naive[h].append(&to32(kh), &to32(vh)).unwrap();
                let qg = &q[(b * hq + h * g) * d..][..g * d];
                want.extend(gold[h].attend_direct(qg, scale));
                yard.extend(naive[h].attend_direct(&to32(qg), scale as f32).iter().map(|&x| x as f64));
            }
            assert_eq!((dev.lens()[b], dev.mid_lens()[b]), (gold[0].len(), gold[0].mid_len()), "sequence {b} ({case})");
            let mag = want.iter().fold(1.0f64, |a, v| a.max(v.abs()));
            let floor = (4.0 * eps(DType::F32) + 64.0 * f32::EPSILON as f64 * (n as f64).sqrt()) * mag;
            check_tolerance(&format!("sequence {b}"), &case, rows, &yard, &want, floor);
        }
    }
    eprintln!("churn: {admitted} admissions, {retired} retirements, re-grown {regrown}, packed steps {packed_steps}");
    assert!(admitted >= 10 && retired >= 10, "churn: {admitted} admissions, {retired} retirements");
    assert!(regrown >= 1 && packed_steps >= 100, "the exact buffer re-grew {regrown} times, was packed for {packed_steps} steps");
}

/// A steady-state decode step (every live middle formed, a retired slot beside them) allocates and uploads
/// nothing (the counter sees every buffer FourierAttention creates) and makes eight launches on the FFT path (five
/// where the device cannot hold its transform).
#[test]
fn steady_state_steps_allocate_and_upload_nothing() {
    use kvsqueeze::policy::CompressedKvCache;
    let cl = client();
    let (bsz, hkv, g, d) = (3usize, 2usize, 4usize, 16usize);
    let hq = hkv * g;
    let mut rng = Rng(77);
    let dims = FourierDims::from_critical(hkv, d, per_head_crit(&mut rng, hkv, d, 30), per_head_crit(&mut rng, hkv, d, 30)).unwrap();
    let cfg = FourierLayerConfig::new(bsz, hq, DType::F32, 2, 8, 4, 600, dims);
    let mut dev = FourierLayerCache::new(cl, cfg.clone()).unwrap();
    for b in [0, 2] {
        let l = 40 + b;
        dev.prefill(b, &upload(cl, &rng.walk(l, hkv * d), &[l, hkv, d], DType::F32), &upload(cl, &rng.walk(l, hkv * d), &[l, hkv, d], DType::F32)).unwrap();
    }
    dev.retire(1).unwrap();
    let (q, k, v) = (
        upload(cl, &rng.vec(bsz * hq * d, 1.5), &[bsz, 1, hq, d], DType::F32),
        upload(cl, &rng.vec(bsz * hkv * d, 1.0), &[bsz, hkv, d], DType::F32),
        upload(cl, &rng.vec(bsz * hkv * d, 1.0), &[bsz, hkv, d], DType::F32),
    );
    dev.step(&q, &k, &v).unwrap();
    assert_eq!(dev.physical_bytes(), cfg.formula_bytes(), "re-packed once every live middle formed");
    // The counter is per thread: other tests running in parallel do not move it.
    let (before, l0) = (kvsqueeze::tensor::device_allocations(), kvsqueeze::tensor::device_launches());
    for _ in 0..300 {
        dev.step(&q, &k, &v).unwrap();
    }
    let grew = kvsqueeze::tensor::device_allocations() - before;
    // The append's update and write, projection, (transform, scores,) split, (moments,) combine.
    let per = if dev.step_path() == FourierPath::Fft { 8 } else { 5 };
    assert_eq!(dev.fft_size().is_some(), dev.step_path() == FourierPath::Fft);
    assert_eq!(kvsqueeze::tensor::device_launches() - l0, 300 * per, "launches per {:?} step", dev.step_path());
    let seen = kvsqueeze::tensor::device_allocations();
    FourierLayerCache::new(cl, cfg).unwrap();
    assert!(kvsqueeze::tensor::device_allocations() > seen + 10, "the counter sees FourierAttention's buffers");
    assert_eq!(grew, 0, "steps allocated or uploaded {grew} buffers");
    assert_eq!(dev.lens(), vec![40 + 301, 0, 42 + 301]);
}

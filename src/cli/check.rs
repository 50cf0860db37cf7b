//! `kvsqueeze check`: every kernel against the reference on the device at hand, at a few sizes — the quickest
//! way to trust a new GPU or driver. Each check reports its worst error, the tolerance it was held to and a
//! verdict; the tolerance follows design.md §5 (twice the error of the same computation done naively in f32 on
//! the host, plus a few ulps of the storage dtype).
//!
//! The policy checks drive the reference's state machine with the very attention mass the device computed, so
//! an eviction decision is compared on identical scores (an f32-vs-f64 near-tie cannot flip it).

use cubecl::client::Client;
use kvsqueeze::attention::{decode_attention, dtype_supported, DecodeConfig};
use kvsqueeze::fourier::{fourier_transform, FourierDims, FourierLayerCache, FourierLayerConfig, FourierPath};
use kvsqueeze::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use kvsqueeze::tensor::{upload_f64, DType, DeviceTensor};
use kvsqueeze::Error;

use kvsqueeze_reference::attention::{attention, Dims};
use kvsqueeze_reference::cast_slice;
use kvsqueeze_reference::fourier::{transform, FourierCache, FourierConfig};
use kvsqueeze_reference::policy::{PolicyCache as RefCache, PolicyConfig, Positions};
use kvsqueeze_reference::testing::Rng;

/// `x` rounded to `dtype` and uploaded (the shapes here are the check's own, so a failure is a device failure).
fn upload(client: &Client, x: &[f64], shape: &[usize], dtype: DType) -> (DeviceTensor, Vec<f64>) {
    upload_f64(client, x, shape, dtype).expect("an upload of the check's own sizes")
}

fn eps(dtype: DType) -> f64 {
    dtype.eps()
}

/// One check's outcome.
#[derive(Clone, Debug)]
pub struct CheckResult {
    /// What was checked (kernel, dtype, shape).
    pub name: String,
    /// Worst absolute error against the f64 reference.
    pub error: f64,
    /// The tolerance it was held to.
    pub tolerance: f64,
    /// Whether it passed (the error is within the tolerance and every decision matched).
    pub pass: bool,
    /// Extra facts (a mismatch, a skip reason).
    pub note: String,
}

fn max_err(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| if x.is_finite() && y.is_finite() { m.max((x - y).abs()) } else { f64::INFINITY })
}

fn result(name: String, error: f64, tolerance: f64, note: String, ok: bool) -> CheckResult {
    CheckResult { pass: ok && error <= tolerance, name, error, tolerance, note }
}

/// Every check, on `client`; `progress(i, n, name)` is called before each.
pub fn run_checks(client: &Client, progress: &mut dyn FnMut(usize, usize, &str)) -> Vec<CheckResult> {
    let dtypes: Vec<DType> = [DType::F32, DType::F16, DType::BF16].into_iter().filter(|&t| dtype_supported(client, t)).collect();
    let mut jobs: Vec<(String, Box<dyn Fn(&Client) -> Result<CheckResult, Error>>)> = Vec::new();
    for &dt in &dtypes {
        jobs.push((format!("decode attention {dt:?}"), Box::new(move |c| check_attention(c, dt))));
    }
    for policy in [Policy::Full].into_iter().chain(Policy::EVICTING) {
        jobs.push((format!("policy cache {policy:?}"), Box::new(move |c| check_policy(c, policy, DType::F32))));
    }
    jobs.push(("fourier transform F32".into(), Box::new(check_transform)));
    for &dt in dtypes.iter().take(2) {
        jobs.push((format!("fourier attention {dt:?}"), Box::new(move |c| check_fourier(c, dt))));
    }
    let n = jobs.len();
    let mut out = Vec::new();
    for (i, (name, job)) in jobs.into_iter().enumerate() {
        progress(i, n, &name);
        out.push(job(client).unwrap_or_else(|e| result(name, f64::NAN, 0.0, format!("error: {e}"), false)));
    }
    progress(n, n, "done");
    out
}

fn check_attention(c: &Client, dt: DType) -> Result<CheckResult, Error> {
    let (b, hq, hkv, d, lcap) = (2, 8, 2, 64, 1000);
    let lens = [700u32, 1000];
    let mut rng = Rng(17);
    let (q, qh) = upload(c, &rng.vec(b * hq * d, 1.5), &[b, 1, hq, d], dt);
    let (k, kh) = upload(c, &rng.vec(b * hkv * lcap * d, 1.5), &[b, hkv, lcap, d], dt);
    let (v, vh) = upload(c, &rng.vec(b * hkv * lcap * d, 1.0), &[b, hkv, lcap, d], dt);
    let out = decode_attention(c, &q, &k, &v, &lens, &DecodeConfig::new().with_mass(true))?;
    let (o, mass) = (out.o.to_host_f64(c)?, out.mass.as_ref().expect("mass requested").to_host_f64(c)?);
    let (mut err, mut yard, mut mag) = (0.0f64, 0.0f64, 1.0f64);
    for bi in 0..b {
        let l = lens[bi] as usize;
        let tok = |src: &[f64]| -> Vec<f64> { (0..l).flat_map(|j| (0..hkv).flat_map(move |h| (0..d).map(move |dd| src[((bi * hkv + h) * lcap + j) * d + dd]))).collect() };
        let (kt, vt) = (tok(&kh), tok(&vh));
        let qb = &qh[bi * hq * d..][..hq * d];
        let dims = Dims { lq: 1, l, hq, hkv, d };
        let gold = attention(qb, &kt, &vt, dims, l - 1, 1.0 / (d as f64).sqrt());
        let naive = attention(&cast_slice::<f64, f32>(qb), &cast_slice(&kt), &cast_slice(&vt), dims, l - 1, 1.0 / (d as f32).sqrt());
        err = err.max(max_err(&o[bi * hq * d..][..hq * d], &gold.o));
        yard = yard.max(max_err(&cast_slice(&naive.o), &gold.o));
        mag = gold.o.iter().fold(mag, |m, x| m.max(x.abs()));
        for h in 0..hkv {
            let got: Vec<f64> = (0..l).map(|j| mass[(bi * hkv + h) * lcap + j]).collect();
            err = err.max(max_err(&got, &gold.group_mean[h * l..][..l]));
        }
    }
    let tol = 2.0 * yard + 4.0 * eps(dt) * mag;
    Ok(result(format!("decode attention {dt:?} B{b} L{lens:?} Hq{hq}/Hkv{hkv} D{d} (o and mass)"), err, tol, String::new(), true))
}

fn check_policy(c: &Client, policy: Policy, dt: DType) -> Result<CheckResult, Error> {
    let (hkv, g, d, steps) = (2, 4, 32, 300);
    let hq = hkv * g;
    let layout = Layout { sinks: 4, middle: 20, recent: 8 };
    let layout = if policy == Policy::Full { Layout { sinks: 0, middle: steps, recent: 0 } } else { layout };
    let cap_dev = layout.capacity();
    let mut dev = PolicyCache::new(c, PolicyCacheConfig::new(policy, layout, 1, hq, hkv, d, dt))?;
    let rcfg = PolicyConfig { policy, layout, rope: None, positions: Positions::CacheRank, scale: 1.0 / (d as f64).sqrt() };
    let mut refs: Vec<RefCache<f32>> = (0..hkv).map(|_| RefCache::new(rcfg, d)).collect();
    let mut rng = Rng(23);
    let (mut err, mut tol) = (0.0f64, 0.0f64);
    let mut note = String::new();
    let cap1_dev = cap_dev + 1;
    for t in 0..steps {
        let (qd, q) = upload(c, &rng.vec(hq * d, 1.5), &[1, 1, hq, d], dt);
        let (kd, k) = upload(c, &rng.vec(hkv * d, 1.5), &[1, hkv, d], dt);
        let (vd, v) = upload(c, &rng.vec(hkv * d, 1.0), &[1, hkv, d], dt);
        let [order, rank, ..] = dev.slots()?;
        let before = dev.len();
        let o = dev.step(&qd, &kd, &vd)?.to_host_f64(c)?;
        let mass = dev.last_mass().expect("a step ran").to_host_f64(c)?;
        for h in 0..hkv {
            let free = (0..cap1_dev).find(|&sl| rank[h * cap1_dev + sl] as u32 == u32::MAX).filter(|_| before >= cap_dev).unwrap_or(before);
            let r = &mut refs[h];
            let slots: Vec<usize> = (0..r.len()).map(|i| order[h * cap1_dev + i] as usize).chain([free]).collect();
            let m: Vec<f32> = slots.iter().map(|&sl| mass[h * cap1_dev + sl] as f32).collect();
            let ks: Vec<f64> = r.entries().iter().flat_map(|e| cast_slice::<f32, f64>(&e.k)).chain(k[h * d..][..d].iter().copied()).collect();
            let vs: Vec<f64> = r.entries().iter().flat_map(|e| cast_slice::<f32, f64>(&e.v)).chain(v[h * d..][..d].iter().copied()).collect();
            let qh = &q[h * g * d..][..g * d];
            let l = r.len() + 1;
            let dims = Dims { lq: 1, l, hq: g, hkv: 1, d };
            let gold = attention(qh, &ks, &vs, dims, l - 1, 1.0 / (d as f64).sqrt());
            let naive = attention(&cast_slice::<f64, f32>(qh), &cast_slice(&ks), &cast_slice(&vs), dims, l - 1, 1.0 / (d as f32).sqrt());
            err = err.max(max_err(&o[h * g * d..][..g * d], &gold.o));
            let mag = gold.o.iter().fold(1.0f64, |a, x| a.max(x.abs()));
            tol = tol.max(2.0 * max_err(&cast_slice(&naive.o), &gold.o) + 4.0 * eps(dt) * mag);
            r.step_with_mass(&cast_slice(&k[h * d..][..d]), &cast_slice(&v[h * d..][..d]), &m);
        }
        let kept = dev.kept_positions()?;
        for h in 0..hkv {
            if note.is_empty() && kept[0][h] != refs[h].kept_positions() {
                note = format!("kept set differs from the reference at step {t}, head {h}");
            }
        }
    }
    let ok = note.is_empty();
    Ok(result(format!("policy cache {policy:?} {dt:?} budget {cap_dev}, {steps} steps, GQA {g} (o, kept sets)"), err, tol, note, ok))
}

fn check_transform(c: &Client) -> Result<CheckResult, Error> {
    let (lmid, cols, n, window) = (500, 130, 24, 600);
    let mut rng = Rng(5);
    let (x, xh) = upload(c, &rng.walk(lmid, cols), &[lmid, cols], DType::F32);
    let got = fourier_transform(c, &x, n, window)?.to_host_f64(c)?;
    let rows: Vec<Vec<f64>> = xh.chunks(cols).map(|r| r.to_vec()).collect();
    let tr = |coef: &[f64]| -> Vec<f64> { (0..cols).flat_map(|j| (0..2 * n).map(move |f| coef[f * cols + j])).collect() };
    let gold = tr(&transform(&rows, (0..cols).collect(), n, window).coef);
    let rows32: Vec<Vec<f32>> = rows.iter().map(|r| cast_slice(r)).collect();
    let naive = tr(&cast_slice(&transform(&rows32, (0..cols).collect(), n, window).coef));
    let mag = gold.iter().fold(1.0f64, |a, v| a.max(v.abs()));
    let tol = 2.0 * max_err(&naive, &gold) + 8.0 * f32::EPSILON as f64 * mag;
    Ok(result(format!("fourier transform L_mid {lmid}, {cols} columns, N {n}, T {window}"), max_err(&got, &gold), tol, String::new(), true))
}

fn check_fourier(c: &Client, dt: DType) -> Result<CheckResult, Error> {
    let (hkv, g, d, n, li, ll) = (2, 4, 32, 16, 4, 40);
    let hq = hkv * g;
    let (prompt, steps) = (500, 20);
    let window = prompt + steps;
    let mut rng = Rng(31);
    let crit = |rng: &mut Rng| -> Vec<Vec<usize>> { (0..hkv).map(|_| (0..d).filter(|_| rng.below(4) == 0).collect()).collect() };
    let dims = FourierDims::from_critical(hkv, d, crit(&mut rng), crit(&mut rng))?;
    let mut dev = FourierLayerCache::new(c, FourierLayerConfig::new(1, hq, dt, li, ll, n, window, dims.clone()))?;
    let rc = |h: usize| FourierConfig { d, l_init: li, l_local: ll, n_freq: n, window, k_crit: dims.k_crit[h].clone(), v_crit: dims.v_crit[h].clone(), least_squares: false };
    let mut gold: Vec<FourierCache<f64>> = (0..hkv).map(|h| FourierCache::new(rc(h)).expect("valid")).collect();
    let mut naive: Vec<FourierCache<f32>> = (0..hkv).map(|h| FourierCache::new(rc(h)).expect("valid")).collect();
    let feed = |x: &[f64], l: usize, h: usize| -> Vec<f64> { (0..l).flat_map(|t| x[(t * hkv + h) * d..][..d].to_vec()).collect() };
    let (kd, k) = upload(c, &rng.walk(prompt, hkv * d), &[prompt, hkv, d], dt);
    let (vd, v) = upload(c, &rng.walk(prompt, hkv * d), &[prompt, hkv, d], dt);
    dev.prefill(0, &kd, &vd)?;
    for h in 0..hkv {
        let (kh, vh) = (feed(&k, prompt, h), feed(&v, prompt, h));
        gold[h].prefill(&kh, &vh).expect("fits");
        naive[h].prefill(&cast_slice(&kh), &cast_slice(&vh)).expect("fits");
    }
    for _ in 0..steps {
        let (kd, k) = upload(c, &rng.walk(1, hkv * d), &[1, hkv, d], dt);
        let (vd, v) = upload(c, &rng.walk(1, hkv * d), &[1, hkv, d], dt);
        dev.append(&kd, &vd)?;
        for h in 0..hkv {
            gold[h].append(&k[h * d..][..d], &v[h * d..][..d]).expect("fits");
            naive[h].append(&cast_slice(&k[h * d..][..d]), &cast_slice(&v[h * d..][..d])).expect("fits");
        }
    }
    let (qd, q) = upload(c, &rng.vec(hq * d, 1.5), &[1, 1, hq, d], dt);
    let scale = 1.0 / (d as f64).sqrt();
    let mut want = Vec::new();
    let mut yard = Vec::new();
    for h in 0..hkv {
        let qg = &q[h * g * d..][..g * d];
        want.extend(gold[h].attend_direct(qg, scale));
        yard.extend(cast_slice::<f32, f64>(&naive[h].attend_direct(&cast_slice(qg), scale as f32)));
    }
    let mag = want.iter().fold(1.0f64, |a, x| a.max(x.abs()));
    let tol = 2.0 * max_err(&yard, &want) + (4.0 * eps(dt) + 64.0 * f32::EPSILON as f64 * (n as f64).sqrt()) * mag;
    let mut err = 0.0f64;
    for path in [FourierPath::Direct, FourierPath::Spectral, FourierPath::Fft] {
        err = err.max(max_err(&dev.attend(&qd, scale as f32, path)?.to_host_f64(c)?, &want));
    }
    let mid = gold[0].mid_len();
    Ok(result(format!("fourier attention {dt:?} direct + spectral + FFT, {} tokens (middle {mid}), N {n}, GQA {g}", prompt + steps), err, tol, String::new(), true))
}

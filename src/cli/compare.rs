//! `kvsqueeze compare`, the main job: one decode stream through every cache at the budgets given, on the
//! device, against dense attention over the whole stream.
//!
//! The default stream is synthetic but structured (not white noise), per KV head: a few **anchor** tokens early
//! in the stream whose keys align with a direction every query keeps (persistent heavy hitters, which
//! StreamingLLM drops and attention-aware policies keep), and a **drifting context** (keys and queries share a
//! direction that rotates slowly with the position, so recent tokens matter more), values that drift as slow
//! random walks, plus noise. No RoPE (keys are
//! used as given), so a policy's attention over its kept tokens is exactly dense attention restricted to them.
//!
//! The first three quarters of the stream play the prompt: the policy caches take it token by token (their decode
//! step), FourierAttention as one prefill (its middle forms there, as in the paper, and its prefill attention
//! is exact). Every metric below is over the last quarter, the decode steps.
//!
//! Per cache and budget: the bytes the device holds and their ratio to the dense cache of the whole stream; the
//! relative L2 error of the attention output over the stream against f64 dense attention; the KL divergence of
//! the cache's attention distribution from the dense one, `KL(p_cache ‖ p_dense) = −ln(dense mass on the kept
//! tokens)` (exact for eviction without position reassignment, averaged over KV heads and sampled steps); the
//! Jaccard index of the kept original positions against the f64 reference state machine run on the same stream;
//! the mean step time (upload of q/k/v, every launch, and a synchronisation; absolute times only mean something
//! on a GPU). FourierAttention keeps every token: its row has no kept-set columns.

use cubecl::client::Client;
use kvsqueeze::fourier::{FourierDims, FourierLayerCache, FourierLayerConfig, FourierPath};
use kvsqueeze::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use kvsqueeze::tensor::{DType, DeviceTensor};
use kvsqueeze::Error;
use kvsqueeze_reference::attention::{attention, Dims};
use kvsqueeze_reference::metrics::jaccard;
use kvsqueeze_reference::policy::{LayerPolicy, PolicyConfig, Positions};
use kvsqueeze_reference::testing::Rng;
use std::time::Instant;

/// A decode stream of one sequence: `q: [steps, Hq, D]`, `k, v: [steps, Hkv, D]`.
#[derive(Clone, Debug)]
pub struct Stream {
    /// Queries.
    pub q: Vec<f64>,
    /// Keys (no RoPE applied or expected).
    pub k: Vec<f64>,
    /// Values.
    pub v: Vec<f64>,
    /// Steps.
    pub steps: usize,
    /// Query heads.
    pub hq: usize,
    /// KV heads.
    pub hkv: usize,
    /// Head dim.
    pub d: usize,
}

impl Stream {
    /// The structured synthetic stream described in the module docs (seeded).
    pub fn synthetic(steps: usize, hq: usize, hkv: usize, d: usize, seed: u64) -> Stream {
        let mut rng = Rng(seed);
        let g = hq / hkv;
        let unit = |rng: &mut Rng| -> Vec<f64> {
            let v = rng.vec(d, 1.0);
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        };
        let heads: Vec<(Vec<f64>, Vec<f64>, Vec<f64>, Vec<usize>)> = (0..hkv)
            .map(|_| {
                let anchors: Vec<usize> = (0..4).map(|_| 8 + rng.below((steps / 4).max(1))).collect();
                (unit(&mut rng), unit(&mut rng), unit(&mut rng), anchors)
            })
            .collect();
        let sd = (d as f64).sqrt();
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        let mut walks: Vec<Vec<f64>> = (0..hkv).map(|_| rng.vec(d, 1.0)).collect();
        for t in 0..steps {
            let phase = t as f64 / 100.0;
            for (h, (a, u, w, anchors)) in heads.iter().enumerate() {
                let drift: Vec<f64> = (0..d).map(|i| phase.cos() * u[i] + phase.sin() * w[i]).collect();
                // In logits (scale 1/√D): anchor ≈ 4, context ≈ 2, noise ≈ 0.5.
                for _ in 0..g {
                    q.extend((0..d).map(|i| sd.sqrt() * (0.5 * a[i] + drift[i]) * 2.0 + 0.3 * rng.uniform()));
                }
                let anchor = anchors.contains(&t);
                k.extend((0..d).map(|i| sd.sqrt() * if anchor { 4.0 * a[i] } else { drift[i] } + 0.3 * rng.uniform()));
                // Values: a slow random walk per dim plus a little noise.
                for x in walks[h].iter_mut() {
                    *x += 0.05 * rng.uniform();
                }
                v.extend((0..d).map(|i| walks[h][i] + 0.2 * rng.uniform()));
            }
        }
        Stream { q, k, v, steps, hq, hkv, d }
    }
}

/// What [`compare`] runs.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Budgets (tokens per KV head); each must be below the stream length.
    pub budgets: Vec<usize>,
    /// The policies, by name ([`kvsqueeze::policy::CACHE_NAMES`]); `fourier` adds a FourierAttention row per
    /// budget (init 4, local budget/2, N budget/8, a quarter of the dims critical).
    pub policies: Vec<String>,
    /// Storage dtype.
    pub dtype: DType,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct CompareRow {
    /// Policy name.
    pub policy: String,
    /// Budget (tokens per KV head; for Fourier the exact part, see [`CompareOptions::policies`]).
    pub budget: usize,
    /// Bytes the device holds.
    pub physical_bytes: usize,
    /// `physical_bytes` over the dense cache of the whole stream.
    pub ratio_to_full: f64,
    /// Relative L2 error of the outputs over the stream vs f64 dense attention.
    pub rel_l2: f64,
    /// Mean `KL(p_cache ‖ p_dense)` (None for Fourier).
    pub kl: Option<f64>,
    /// Kept-set Jaccard vs the f64 reference at the end (None for Full and Fourier).
    pub jaccard: Option<f64>,
    /// Mean step time, µs.
    pub step_us: f64,
}

/// Dense f64 attention of every step over the stream so far: outputs `[steps, Hq, D]` and, at the sampled
/// steps, the group-mean probabilities `[Hkv][t + 1]`.
fn dense(s: &Stream, samples: &[usize]) -> (Vec<f64>, Vec<Vec<Vec<f64>>>) {
    let (hq, hkv, d) = (s.hq, s.hkv, s.d);
    let mut o = Vec::with_capacity(s.steps * hq * d);
    let mut probs = Vec::new();
    for t in 0..s.steps {
        let l = t + 1;
        let att = attention(&s.q[t * hq * d..][..hq * d], &s.k[..l * hkv * d], &s.v[..l * hkv * d], Dims { lq: 1, l, hq, hkv, d }, t, 1.0 / (d as f64).sqrt());
        o.extend(att.o);
        if samples.contains(&t) {
            probs.push((0..hkv).map(|h| att.group_mean[h * l..][..l].to_vec()).collect());
        }
    }
    (o, probs)
}

fn upload(client: &Client, x: &[f64], shape: &[usize], dtype: DType) -> DeviceTensor {
    kvsqueeze::tensor::upload_f64(client, x, shape, dtype).expect("an upload of the stream's own sizes").0
}

impl Stream {
    /// Step `t`'s `(q [Hq·D], k [Hkv·D], v [Hkv·D])`.
    fn token(&self, t: usize) -> (&[f64], &[f64], &[f64]) {
        let (qn, kn) = (self.hq * self.d, self.hkv * self.d);
        (&self.q[t * qn..][..qn], &self.k[t * kn..][..kn], &self.v[t * kn..][..kn])
    }
    /// Step `t` on the device: `q: [1, 1, Hq, D]`, `k, v: [1, Hkv, D]`.
    fn upload_token(&self, client: &Client, t: usize, dtype: DType) -> (DeviceTensor, DeviceTensor, DeviceTensor) {
        let (q, k, v) = self.token(t);
        let (hq, hkv, d) = (self.hq, self.hkv, self.d);
        (upload(client, q, &[1, 1, hq, d], dtype), upload(client, k, &[1, hkv, d], dtype), upload(client, v, &[1, hkv, d], dtype))
    }
}

/// `‖o − dense_o[t]‖²`.
fn sq_err(o: &[f64], dense_o: &[f64], t: usize) -> f64 {
    o.iter().zip(&dense_o[t * o.len()..][..o.len()]).map(|(a, b)| (a - b) * (a - b)).sum()
}

fn rel_l2(num: f64, den: f64) -> f64 {
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Runs the comparison; `progress(done, total, label)` after every step.
pub fn compare(client: &Client, s: &Stream, opts: &CompareOptions, progress: &mut dyn FnMut(usize, usize, &str)) -> Result<Vec<CompareRow>, Error> {
    let (hq, hkv, d, steps) = (s.hq, s.hkv, s.d, s.steps);
    for &b in &opts.budgets {
        if b == 0 || b >= steps {
            return Err(Error::Config("every budget must be at least 1 and below the stream length"));
        }
    }
    let warm = steps * 3 / 4;
    // Up to 16 distinct decode steps in `warm..steps` (fewer when the decode part is shorter).
    let mut samples: Vec<usize> = (1..=16).map(|i| warm + (i * (steps - warm)).div_ceil(16).max(1) - 1).collect();
    samples.dedup();
    let (dense_o, dense_p) = dense(s, &samples);
    let den: f64 = dense_o[warm * hq * d..].iter().map(|x| x * x).sum();
    let full_bytes = 2 * hkv * steps * d * opts.dtype.size();
    let mut jobs: Vec<(String, Option<Policy>, usize)> = Vec::new();
    for name in &opts.policies {
        if name == "fourier" {
            jobs.extend(opts.budgets.iter().map(|&b| (name.clone(), None, b)));
            continue;
        }
        let p = kvsqueeze::policy::parse_policy(name).ok_or(Error::Config("unknown policy (the names are kvsqueeze::policy::CACHE_NAMES)"))?;
        if p == Policy::Full {
            jobs.push((name.clone(), Some(p), steps));
        } else {
            jobs.extend(opts.budgets.iter().map(|&b| (name.clone(), Some(p), b)));
        }
    }
    let total: usize = jobs.iter().map(|j| if j.1.is_some() { steps } else { steps - warm }).sum();
    let mut done = 0;
    let mut rows = Vec::new();
    let scale = 1.0 / (d as f64).sqrt();
    for (name, policy, budget) in jobs {
        let label = format!("{name} budget {budget}");
        let mut num = 0.0;
        let mut secs = 0.0;
        let (mut kl_sum, mut kl_n) = (0.0, 0usize);
        let row = match policy {
            Some(p) => {
                let layout = if p == Policy::Full { Layout { sinks: 0, middle: steps, recent: 0 } } else { kvsqueeze::policy::budget_layout(budget) };
                let mut cache = PolicyCache::new(client, PolicyCacheConfig::new(p, layout, 1, hq, hkv, d, opts.dtype))?;
                let rcfg = PolicyConfig { policy: p, layout, rope: None, positions: Positions::CacheRank, scale };
                let mut gold = LayerPolicy::<f64>::new(rcfg, hq, hkv, d);
                for t in 0..steps {
                    let (q, k, v) = s.token(t);
                    let (qd, kd, vd) = s.upload_token(client, t, opts.dtype);
                    let t0 = Instant::now();
                    let o = cache.step(&qd, &kd, &vd)?.to_host_f64(client)?;
                    if t >= warm {
                        secs += t0.elapsed().as_secs_f64();
                    }
                    gold.step(q, k, v);
                    if t >= warm {
                        num += sq_err(&o, &dense_o, t);
                    }
                    if let Some(si) = samples.iter().position(|&x| x == t) {
                        let kept = cache.kept_positions()?;
                        for h in 0..hkv {
                            let mass: f64 = kept[0][h].iter().map(|&p| dense_p[si][h][p]).sum();
                            kl_sum += (-mass.ln()).max(0.0);
                            kl_n += 1;
                        }
                    }
                    done += 1;
                    progress(done, total, &label);
                }
                let kept = cache.kept_positions()?;
                let jac = (0..hkv).map(|h| jaccard(&kept[0][h], &gold.heads[h].kept_positions())).sum::<f64>() / hkv as f64;
                CompareRow {
                    policy: name.clone(),
                    budget,
                    physical_bytes: cache.physical_bytes(),
                    ratio_to_full: cache.physical_bytes() as f64 / full_bytes as f64,
                    rel_l2: rel_l2(num, den),
                    kl: Some(kl_sum / kl_n.max(1) as f64),
                    jaccard: if p == Policy::Full { None } else { Some(jac) },
                    step_us: 1e6 * secs / (steps - warm) as f64,
                }
            }
            None => {
                let n = (budget / 8).max(1);
                let (l_init, l_local) = (4.min(budget / 4), (budget / 2).max(1));
                let crit: Vec<usize> = (0..d).filter(|j| j % 4 == 0).collect();
                let dims = FourierDims::uniform(hkv, d, &crit, &crit)?;
                let window = steps - l_init - l_local;
                let mut cache = FourierLayerCache::new(client, FourierLayerConfig::new(1, hq, opts.dtype, l_init, l_local, n, window, dims))?;
                let (kp, vp) = (upload(client, &s.k[..warm * hkv * d], &[warm, hkv, d], opts.dtype), upload(client, &s.v[..warm * hkv * d], &[warm, hkv, d], opts.dtype));
                cache.prefill(0, &kp, &vp)?;
                for t in warm..steps {
                    let (qd, kd, vd) = s.upload_token(client, t, opts.dtype);
                    let t0 = Instant::now();
                    cache.append(&kd, &vd)?;
                    let o = cache.attend(&qd, scale as f32, FourierPath::Spectral)?.to_host_f64(client)?;
                    secs += t0.elapsed().as_secs_f64();
                    num += sq_err(&o, &dense_o, t);
                    done += 1;
                    progress(done, total, &label);
                }
                CompareRow {
                    policy: format!("fourier (N {n}, local {l_local})"),
                    budget,
                    physical_bytes: cache.physical_bytes(),
                    ratio_to_full: cache.physical_bytes() as f64 / full_bytes as f64,
                    rel_l2: rel_l2(num, den),
                    kl: None,
                    jaccard: None,
                    step_us: 1e6 * secs / (steps - warm) as f64,
                }
            }
        };
        rows.push(row);
    }
    Ok(rows)
}

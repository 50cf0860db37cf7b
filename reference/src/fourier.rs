//! FourierAttention (arXiv:2506.11886, spec §1): the compressed cache of one KV head, its prefill transform and
//! incremental decode update, reconstruction, and decode attention by direct reconstruction (the paper's
//! FlashFourierAttention semantics) and by the exact spectral-domain fast path (spec §1.5).
//!
//! ## Layout (one KV head, head dim `D`, keys post-RoPE at true positions as given by the caller)
//! - init: the first `l_init` tokens, all dims exact;
//! - middle: every token between, with the **critical** dims (`k_crit`, `v_crit`, in-head indices) exact
//!   (`[L_mid, |crit|]`) and the other, **compressed** dims (`k_comp`, `v_comp`, the sorted complement) as `2N`
//!   real Fourier coefficients per column: rows `0..N` cosine, rows `N..2N` sine (`[2N, |comp|]`);
//! - local: the last `l_local` tokens, all dims exact (a sliding window);
//! - stats per compressed column, frozen when the middle is formed: `avg_u, dev_u` of the original signal and
//!   `avg_d, dev_d` of its raw reconstruction; `scale = dev_u/dev_d` (1 where the raw reconstruction is
//!   constant to rounding, see [`Spectrum::scale`]).
//!
//! ## Math (spec §1.3), `ω = 2π/T`, middle index `t = 0..L_mid`
//! ```text
//! Ccos[n] = Σ_t x_t cos(ωnt),  Csin[n] = Σ_t x_t sin(ωnt)                  (prefill, n < N)
//! Ccos[n] += x cos(ωnp),       Csin[n] += x sin(ωnp)                        (decode, p = middle index)
//! x̂_t = (1/N) Σ_n Ccos[n] cos(ωnt) + Csin[n] sin(ωnt)                      (raw inverse, note 1/N)
//! x̃_t = (x̂_t − avg_d)·scale + avg_u                                         (affine renormalisation)
//! avg = mean_t x_t,  dev = max(max_t x_t − avg, avg − min_t x_t)
//! ```
//! Angles are reduced exactly, `ωnt = 2π·((n·t) mod T)/T`, computed in `f64` and rounded to `T`.
//!
//! ## Choices (spec §1.10)
//! - Decode position = **middle index** (the token's row in the critical buffer), not the code's `+1` (§1.10.2).
//! - The middle is formed the first time the cache holds more than `l_init + 2N + l_local` tokens — at prefill
//!   or at a decode step, whichever comes first — so short prompts compress once they grow (the evident intent
//!   of the code, whose length check never fires for prompts ≤ 2048, §1.10.3). Until then all tokens are
//!   exact. Stats are computed on that first middle and frozen (§1.10.1).
//! - A middle longer than `T` would alias (the basis is `T`-periodic, §1.10.6): [`FourierError::WindowExceeded`].

use crate::attention::{attention, Dims};
use crate::{dot, softmax, Real};
use std::collections::VecDeque;

/// Configuration of one KV head's Fourier cache.
#[derive(Clone, Debug, PartialEq)]
pub struct FourierConfig {
    /// Head dimension `D`.
    pub d: usize,
    /// Exact leading tokens (default 4).
    pub l_init: usize,
    /// Exact trailing window (default 1020, the official code's; the paper says 1024).
    pub l_local: usize,
    /// Number of frequencies `N` (default 512, i.e. `2N = 1024` coefficient rows).
    pub n_freq: usize,
    /// Translated-window length `T`: the largest middle length this cache may reach.
    pub window: usize,
    /// Critical (exact) key dims, in-head indices, sorted and distinct.
    pub k_crit: Vec<usize>,
    /// Critical (exact) value dims.
    pub v_crit: Vec<usize>,
    /// Reconstruct by the least-squares truncated series over the window instead of the paper's `1/N` inverse
    /// and renormalisation ([`Spectrum::least_squares`]); `false` is the paper.
    pub least_squares: bool,
}

impl FourierConfig {
    /// The official defaults (`l_init 4, l_local 1020, N 512`) with the given `D`, `T` and critical dims.
    pub fn paper(d: usize, window: usize, k_crit: Vec<usize>, v_crit: Vec<usize>) -> Self {
        FourierConfig { d, l_init: 4, l_local: 1020, n_freq: 512, window, k_crit, v_crit, least_squares: false }
    }
    /// Tokens held exactly before the middle is formed: `l_init + 2N + l_local`.
    pub fn trigger(&self) -> usize {
        self.l_init + 2 * self.n_freq + self.l_local
    }
    fn complement(&self, crit: &[usize]) -> Vec<usize> {
        (0..self.d).filter(|j| !crit.contains(j)).collect()
    }
}

/// Why a Fourier cache refused an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FourierError {
    /// The middle would exceed the window `T` (positions would alias).
    WindowExceeded {
        /// Middle length that was requested.
        mid: usize,
        /// The window.
        window: usize,
    },
    /// A configuration value is out of range.
    BadConfig(&'static str),
    /// A tensor has the wrong length.
    Shape(&'static str),
}

/// `cos(ωnt)` and `sin(ωnt)` with exact angle reduction.
pub fn basis(n: usize, t: usize, window: usize) -> (f64, f64) {
    let r = ((n as u128 * t as u128) % window as u128) as f64;
    let a = 2.0 * std::f64::consts::PI * r / window as f64;
    (a.cos(), a.sin())
}

/// The compressed part of one of K or V.
#[derive(Clone, Debug)]
pub struct Spectrum<T> {
    /// Compressed in-head dims (columns), sorted.
    pub cols: Vec<usize>,
    /// `[2N, |cols|]`: cosine rows then sine rows.
    pub coef: Vec<T>,
    /// Per column: mean of the original middle signal.
    pub avg_u: Vec<T>,
    /// Per column: max deviation of the original.
    pub dev_u: Vec<T>,
    /// Per column: mean of the raw reconstruction.
    pub avg_d: Vec<T>,
    /// Per column: max deviation of the raw reconstruction.
    pub dev_d: Vec<T>,
    /// Per column: whether the raw reconstruction is constant to rounding, i.e. its range
    /// `max x̂ − min x̂ ≤ 16·ε·max(|max x̂|, |min x̂|)` (`N = 1`, a one-token middle).
    pub flat_d: Vec<bool>,
    /// Least-squares mode: the `n = 0` cosine row holds `C₀/2` (the transform and the update weight it by ½) and
    /// the reconstruction is `x̃ = (2N/T)·x̂ = (1/T)(C₀ + 2Σ_{n≥1} …)` — the truncated Fourier series of the
    /// window, the `L²`-closest `N`-frequency series when the middle fills the window — with no renormalisation
    /// (the stats are kept but unused). `false`: the paper's `x̃ = (x̂ − avg_d)·scale + avg_u`.
    pub least_squares: bool,
}

impl<T: Real> Spectrum<T> {
    /// `scale = dev_u/dev_d`, or 1 where the raw reconstruction is constant to rounding ([`Self::flat_d`], e.g.
    /// `N = 1` or a one-token middle): there `dev_u/dev_d` is a ratio of rounding noise (the mean of `L_mid`
    /// equal values is itself inexact) and would amplify it without bound, while scale 1 reconstructs the column
    /// as its mean. The test is on the range, not on `dev_d`, because `dev_d` carries the mean's rounding.
    pub fn scale(&self) -> Vec<T> {
        (0..self.dev_u.len())
            .map(|j| {
                let (u, d) = (self.dev_u[j], self.dev_d[j]);
                if self.flat_d[j] || d <= T::zero() {
                    T::one()
                } else {
                    u / d
                }
            })
            .collect()
    }
    /// Raw inverse `x̂_t` of every column.
    pub fn raw(&self, t: usize, n: usize, window: usize) -> Vec<T> {
        let c = self.cols.len();
        let mut x = vec![T::zero(); c];
        for f in 0..n {
            let (cs, sn) = basis(f, t, window);
            let (cs, sn) = (T::of(cs), T::of(sn));
            for j in 0..c {
                x[j] = x[j] + self.coef[f * c + j] * cs + self.coef[(n + f) * c + j] * sn;
            }
        }
        let inv = T::one() / T::of(n as f64);
        x.iter().map(|&v| v * inv).collect()
    }
    /// The affine map `x̃ = a·x̂ + b` of every column: the paper's `(scale, avg_u − avg_d·scale)`, or `(2N/T, 0)`
    /// in least-squares mode.
    pub fn affine(&self, n: usize, window: usize) -> (Vec<T>, Vec<T>) {
        if self.least_squares {
            let c = self.cols.len();
            return (vec![T::of(2.0 * n as f64 / window as f64); c], vec![T::zero(); c]);
        }
        let a = self.scale();
        let b = (0..a.len()).map(|j| self.avg_u[j] - self.avg_d[j] * a[j]).collect();
        (a, b)
    }
    /// Reconstruction `x̃_t` of every column (renormalised, or the least-squares series).
    pub fn reconstruct(&self, t: usize, n: usize, window: usize) -> Vec<T> {
        let raw = self.raw(t, n, window);
        let (a, b) = self.affine(n, window);
        (0..raw.len()).map(|j| raw[j] * a[j] + b[j]).collect()
    }
    /// Adds one token's compressed columns `x` (`[|cols|]`) at middle index `p` (spec §1.3 step 2).
    fn update(&mut self, x: &[T], p: usize, n: usize, window: usize) {
        let c = self.cols.len();
        for f in 0..n {
            let (cs, sn) = basis(f, p, window);
            let cs = if f == 0 && self.least_squares { cs * 0.5 } else { cs };
            let (cs, sn) = (T::of(cs), T::of(sn));
            for j in 0..c {
                self.coef[f * c + j] = self.coef[f * c + j] + x[j] * cs;
                self.coef[(n + f) * c + j] = self.coef[(n + f) * c + j] + x[j] * sn;
            }
        }
    }
}

/// Mean and max deviation of each column of `rows: [t][c]`.
fn stats<T: Real>(rows: &[Vec<T>]) -> (Vec<T>, Vec<T>) {
    let c = rows[0].len();
    let n = T::of(rows.len() as f64);
    (0..c)
        .map(|j| {
            let avg = rows.iter().fold(T::zero(), |a, r| a + r[j]) / n;
            let hi = rows.iter().fold(T::neg_infinity(), |a, r| a.max(r[j]));
            let lo = rows.iter().fold(T::infinity(), |a, r| a.min(r[j]));
            (avg, (hi - avg).max(avg - lo))
        })
        .unzip()
}

/// The prefill transform of one matrix `mid: [L_mid][|cols|]` (spec §1.3 step 1), with the stats of step 4.
pub fn transform<T: Real>(mid: &[Vec<T>], cols: Vec<usize>, n: usize, window: usize) -> Spectrum<T> {
    transform_mode(mid, cols, n, window, false)
}

/// [`transform`] in the paper's mode or the least-squares one ([`Spectrum::least_squares`]).
pub fn transform_mode<T: Real>(mid: &[Vec<T>], cols: Vec<usize>, n: usize, window: usize, least_squares: bool) -> Spectrum<T> {
    let c = cols.len();
    let mut coef = vec![T::zero(); 2 * n * c];
    for f in 0..n {
        for (t, row) in mid.iter().enumerate() {
            let (cs, sn) = basis(f, t, window);
            let cs = if f == 0 && least_squares { cs * 0.5 } else { cs };
            let (cs, sn) = (T::of(cs), T::of(sn));
            for j in 0..c {
                coef[f * c + j] = coef[f * c + j] + row[j] * cs;
                coef[(n + f) * c + j] = coef[(n + f) * c + j] + row[j] * sn;
            }
        }
    }
    let (avg_u, dev_u) = stats(mid);
    let mut s = Spectrum { cols, coef, avg_u, dev_u, avg_d: vec![T::zero(); c], dev_d: vec![T::zero(); c], flat_d: vec![true; c], least_squares };
    if c > 0 {
        let raw: Vec<Vec<T>> = (0..mid.len()).map(|t| s.raw(t, n, window)).collect();
        let (avg_d, dev_d) = stats(&raw);
        s.avg_d = avg_d;
        s.dev_d = dev_d;
        let tiny = T::epsilon() * T::of(16.0);
        s.flat_d = (0..c)
            .map(|j| {
                let hi = raw.iter().fold(T::neg_infinity(), |a, r| a.max(r[j]));
                let lo = raw.iter().fold(T::infinity(), |a, r| a.min(r[j]));
                hi - lo <= tiny * hi.abs().max(lo.abs())
            })
            .collect();
    }
    s
}

/// One token: key and value, `[D]` each.
type Token<T> = (Vec<T>, Vec<T>);

/// The Fourier-compressed cache of one KV head.
#[derive(Clone, Debug)]
pub struct FourierCache<T> {
    cfg: FourierConfig,
    init: Vec<Token<T>>,
    local: VecDeque<Token<T>>,
    /// Critical dims of every middle token: `[L_mid][|k_crit|]`, `[L_mid][|v_crit|]`.
    mid_k: Vec<Vec<T>>,
    mid_v: Vec<Vec<T>>,
    /// Present once the middle has been formed.
    spec: Option<(Spectrum<T>, Spectrum<T>)>,
}

fn pick<T: Real>(x: &[T], cols: &[usize]) -> Vec<T> {
    cols.iter().map(|&j| x[j]).collect()
}

impl<T: Real> FourierCache<T> {
    /// An empty cache; checks the configuration.
    pub fn new(cfg: FourierConfig) -> Result<Self, FourierError> {
        let sorted = |v: &[usize]| v.windows(2).all(|w| w[0] < w[1]) && v.iter().all(|&j| j < cfg.d);
        if cfg.d == 0 || cfg.n_freq == 0 || cfg.window == 0 {
            return Err(FourierError::BadConfig("d, n_freq and window must be positive"));
        }
        if !sorted(&cfg.k_crit) || !sorted(&cfg.v_crit) {
            return Err(FourierError::BadConfig("critical dims must be sorted, distinct and < d"));
        }
        Ok(FourierCache { cfg, init: Vec::new(), local: VecDeque::new(), mid_k: Vec::new(), mid_v: Vec::new(), spec: None })
    }

    /// The configuration.
    pub fn config(&self) -> &FourierConfig {
        &self.cfg
    }
    /// Tokens represented (init + middle + local).
    pub fn len(&self) -> usize {
        self.init.len() + self.mid_k.len() + self.local.len()
    }
    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Middle length `L_mid`.
    pub fn mid_len(&self) -> usize {
        self.mid_k.len()
    }
    /// The K and V spectra, once the middle is formed.
    pub fn spectra(&self) -> Option<&(Spectrum<T>, Spectrum<T>)> {
        self.spec.as_ref()
    }

    /// Prefill with the prompt's (post-RoPE) keys and values, `[L][D]` flattened.
    pub fn prefill(&mut self, k: &[T], v: &[T]) -> Result<(), FourierError> {
        let d = self.cfg.d;
        if k.len() != v.len() || !k.len().is_multiple_of(d) {
            return Err(FourierError::Shape("k and v must both be [L, D]"));
        }
        let l = k.len() / d;
        self.check_window(l)?;
        for t in 0..l {
            self.push_exact(k[t * d..][..d].to_vec(), v[t * d..][..d].to_vec());
        }
        self.form_middle_if_due();
        Ok(())
    }

    /// Appends one decode token (`[D]` each); the oldest local token moves into the middle if the window is full.
    pub fn append(&mut self, k: &[T], v: &[T]) -> Result<(), FourierError> {
        let d = self.cfg.d;
        if k.len() != d || v.len() != d {
            return Err(FourierError::Shape("k and v must both be [D]"));
        }
        self.check_window(1)?;
        if self.spec.is_none() {
            self.push_exact(k.to_vec(), v.to_vec());
            self.form_middle_if_due();
            return Ok(());
        }
        self.local.push_back((k.to_vec(), v.to_vec()));
        if self.local.len() > self.cfg.l_local {
            let (ok, ov) = self.local.pop_front().expect("local is non-empty");
            let p = self.mid_k.len();
            let (n, w) = (self.cfg.n_freq, self.cfg.window);
            let (sk, sv) = self.spec.as_mut().expect("middle formed");
            sk.update(&pick(&ok, &sk.cols), p, n, w);
            sv.update(&pick(&ov, &sv.cols), p, n, w);
            self.mid_k.push(pick(&ok, &self.cfg.k_crit));
            self.mid_v.push(pick(&ov, &self.cfg.v_crit));
        }
        Ok(())
    }

    /// Refuses growth that would make the middle longer than `T` (it can grow by at most `extra`).
    fn check_window(&self, extra: usize) -> Result<(), FourierError> {
        let fixed = self.cfg.l_init + self.cfg.l_local;
        let after = self.len() + extra;
        let mid = if self.spec.is_some() || after > self.cfg.trigger() { after.saturating_sub(fixed) } else { 0 };
        if mid > self.cfg.window {
            return Err(FourierError::WindowExceeded { mid, window: self.cfg.window });
        }
        Ok(())
    }

    fn push_exact(&mut self, k: Vec<T>, v: Vec<T>) {
        if self.init.len() < self.cfg.l_init {
            self.init.push((k, v));
        } else {
            self.local.push_back((k, v));
        }
    }

    /// Forms the middle (prefill transform + frozen stats) when the exact cache exceeds the trigger length.
    fn form_middle_if_due(&mut self) {
        if self.spec.is_some() || self.len() <= self.cfg.trigger() {
            return;
        }
        let n_mid = self.local.len() - self.cfg.l_local;
        let mid: Vec<Token<T>> = self.local.drain(..n_mid).collect();
        let (kc, vc) = (self.cfg.complement(&self.cfg.k_crit), self.cfg.complement(&self.cfg.v_crit));
        let kx: Vec<Vec<T>> = mid.iter().map(|(k, _)| pick(k, &kc)).collect();
        let vx: Vec<Vec<T>> = mid.iter().map(|(_, v)| pick(v, &vc)).collect();
        let (n, w) = (self.cfg.n_freq, self.cfg.window);
        let ls = self.cfg.least_squares;
        self.spec = Some((transform_mode(&kx, kc, n, w, ls), transform_mode(&vx, vc, n, w, ls)));
        self.mid_k = mid.iter().map(|(k, _)| pick(k, &self.cfg.k_crit)).collect();
        self.mid_v = mid.iter().map(|(_, v)| pick(v, &self.cfg.v_crit)).collect();
    }

    /// Reconstructed middle row `t` of K (`key = true`) or V, all `D` dims.
    pub fn mid_row(&self, t: usize, key: bool) -> Vec<T> {
        let (spec, crit, exact) = match (&self.spec, key) {
            (Some((sk, _)), true) => (sk, &self.cfg.k_crit, &self.mid_k[t]),
            (Some((_, sv)), false) => (sv, &self.cfg.v_crit, &self.mid_v[t]),
            (None, _) => panic!("no middle"),
        };
        let mut row = vec![T::zero(); self.cfg.d];
        for (&j, &x) in crit.iter().zip(exact) {
            row[j] = x;
        }
        for (&j, x) in spec.cols.iter().zip(spec.reconstruct(t, self.cfg.n_freq, self.cfg.window)) {
            row[j] = x;
        }
        row
    }

    /// The assembled `K̃` (`key = true`) or `Ṽ`, `[L][D]` flattened, in position order (init, middle, local).
    pub fn assembled(&self, key: bool) -> Vec<T> {
        let sel = |tok: &Token<T>| if key { tok.0.clone() } else { tok.1.clone() };
        let mut out: Vec<T> = self.init.iter().flat_map(sel).collect();
        for t in 0..self.mid_len() {
            out.extend(self.mid_row(t, key));
        }
        out.extend(self.local.iter().flat_map(sel));
        out
    }

    /// Decode attention by direct reconstruction (spec §1.3 step 5): `q: [G, D]` → `o: [G, D]`.
    pub fn attend_direct(&self, q: &[T], scale: T) -> Vec<T> {
        let d = self.cfg.d;
        let (k, v) = (self.assembled(true), self.assembled(false));
        let l = self.len();
        attention(q, &k, &v, Dims { lq: 1, l, hq: q.len() / d, hkv: 1, d }, l - 1, scale).o
    }

    /// Decode attention by the exact spectral-domain path (spec §1.5): the middle's compressed dims are never
    /// reconstructed; scores come from query-projected coefficients, values from a forward DFT of the middle's
    /// softmax weights. Equal to [`Self::attend_direct`] up to rounding.
    pub fn attend_spectral(&self, q: &[T], scale: T) -> Vec<T> {
        let Some((sk, sv)) = &self.spec else { return self.attend_direct(q, scale) };
        let (d, n, w) = (self.cfg.d, self.cfg.n_freq, self.cfg.window);
        let inv_n = T::one() / T::of(n as f64);
        let lm = self.mid_len();
        let ((ka, kb), (va, vb)) = (sk.affine(n, self.cfg.window), sv.affine(n, self.cfg.window));
        let (ck, cv) = (sk.cols.len(), sv.cols.len());
        let mut out = Vec::with_capacity(q.len());
        for qh in q.chunks(d) {
            let qc = pick(qh, &sk.cols);
            let qn = pick(qh, &self.cfg.k_crit);
            // pc[n] = Σ_j q_c[j]·a[j]·Ccos[n,j], ps[n] likewise with Csin; qb = ⟨q_c, b⟩.
            let proj = |row: usize| (0..ck).fold(T::zero(), |acc, j| acc + qc[j] * ka[j] * sk.coef[row * ck + j]);
            let pc: Vec<T> = (0..n).map(proj).collect();
            let ps: Vec<T> = (n..2 * n).map(proj).collect();
            let qb = dot(&qc, &kb);
            let mut s: Vec<T> = self.init.iter().map(|(k, _)| scale * dot(qh, k)).collect();
            for t in 0..lm {
                let spec = (0..n).fold(T::zero(), |acc, f| {
                    let (cs, sn) = basis(f, t, w);
                    acc + pc[f] * T::of(cs) + ps[f] * T::of(sn)
                });
                s.push(scale * (spec * inv_n + qb + dot(&qn, &self.mid_k[t])));
            }
            s.extend(self.local.iter().map(|(k, _)| scale * dot(qh, k)));
            let (p, _) = softmax(&s);
            let mut o = vec![T::zero(); d];
            let exact = self.init.iter().chain(self.local.iter());
            let exact_p = p[..self.init.len()].iter().chain(&p[self.init.len() + lm..]);
            for ((_, v), &pj) in exact.zip(exact_p) {
                for (oc, &vc) in o.iter_mut().zip(v) {
                    *oc = *oc + pj * vc;
                }
            }
            let pm = &p[self.init.len()..self.init.len() + lm];
            for (t, &pt) in pm.iter().enumerate() {
                for (&j, &x) in self.cfg.v_crit.iter().zip(&self.mid_v[t]) {
                    o[j] = o[j] + pt * x;
                }
            }
            // Pc[n] = Σ_t p_t cos(ωnt), Ps[n] = Σ_t p_t sin(ωnt); o_c[j] = a_j/N·Σ_n(Pc Ccos + Ps Csin) + b_j·Σ_t p_t.
            let mass = pm.iter().fold(T::zero(), |a, &x| a + x);
            let (mut pcs, mut pss) = (vec![T::zero(); n], vec![T::zero(); n]);
            for (t, &pt) in pm.iter().enumerate() {
                for f in 0..n {
                    let (cs, sn) = basis(f, t, w);
                    pcs[f] = pcs[f] + pt * T::of(cs);
                    pss[f] = pss[f] + pt * T::of(sn);
                }
            }
            for (jj, &j) in sv.cols.iter().enumerate() {
                let acc = (0..n).fold(T::zero(), |a, f| a + pcs[f] * sv.coef[f * cv + jj] + pss[f] * sv.coef[(n + f) * cv + jj]);
                o[j] = o[j] + va[jj] * inv_n * acc + vb[jj] * mass;
            }
            out.extend(o);
        }
        out
    }
}

/// Calibration score of spec §1.6: for each column of a captured middle `mid: [L_mid][C]`, the mean squared
/// error of its renormalised reconstruction from `n` frequencies over the window `T = L_mid` (the official
/// search's choice).
pub fn column_mse(mid: &[Vec<f64>], n: usize) -> Vec<f64> {
    let (l, c) = (mid.len(), mid.first().map_or(0, Vec::len));
    if l == 0 || c == 0 {
        return vec![0.0; c];
    }
    let s = transform(mid, (0..c).collect(), n, l);
    let mut err = vec![0.0; c];
    for (t, row) in mid.iter().enumerate() {
        for (e, (x, y)) in err.iter_mut().zip(row.iter().zip(s.reconstruct(t, n, l))) {
            *e += (x - y) * (x - y);
        }
    }
    err.iter().map(|e| e / l as f64).collect()
}

/// The paper's compressed fractions `(K, V)` for layer `layer` of `n_layers` (spec §1.6): 0.90/0.95 in the first
/// four layers, 0.50/0.70 in the last eight, 0.80/0.80 elsewhere.
pub fn paper_fraction(layer: usize, n_layers: usize) -> (f64, f64) {
    if layer < 4 {
        (0.90, 0.95)
    } else if layer + 8 >= n_layers {
        (0.50, 0.70)
    } else {
        (0.80, 0.80)
    }
}

/// Chooses the compressed columns of one layer's K or V (spec §1.6): each captured sample `[L][C]` (all heads'
/// columns, `C = Hkv·D`) is split into init / middle / local, the per-column reconstruction MSE of the middle is
/// averaged over samples, and the `⌊fraction·C⌋` columns with the lowest error are compressed. Returns them
/// sorted (global column ids). Samples whose middle is empty are skipped.
pub fn calibrate(samples: &[Vec<Vec<f64>>], l_init: usize, l_local: usize, n: usize, fraction: f64) -> Vec<usize> {
    let c = samples.iter().find_map(|s| s.first().map(Vec::len)).unwrap_or(0);
    let mut score = vec![0.0; c];
    for s in samples {
        if s.len() <= l_init + l_local {
            continue;
        }
        for (a, e) in score.iter_mut().zip(column_mse(&s[l_init..s.len() - l_local], n)) {
            *a += e;
        }
    }
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b)));
    let k = ((fraction.clamp(0.0, 1.0) * c as f64).floor() as usize).min(c);
    let mut chosen = order[..k].to_vec();
    chosen.sort_unstable();
    chosen
}

/// The FFT form of the spectral path (issue 16, spec §1.5): the compressed part of the middle's scores is a
/// length-`N` trigonometric polynomial evaluated at the integer positions `t` with `ω = 2π/T`, i.e. one inverse
/// DFT of length `T`, and the value side needs the probabilities' forward DFT at `N` frequencies. Both in
/// `O(T log T)` for any `T` (radix 2 for powers of two, Bluestein's chirp-z otherwise). `f64` only: this is the
/// definition a device FFT is tested against, and it equals the direct sums of [`basis`] to rounding.
pub mod fft {
    use std::f64::consts::PI;

    /// A complex number in `f64`.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct C64 {
        /// Real part.
        pub re: f64,
        /// Imaginary part.
        pub im: f64,
    }

    impl C64 {
        /// `re + i·im`.
        pub fn new(re: f64, im: f64) -> Self {
            C64 { re, im }
        }
        /// `e^{i·2π·num/den}` with the angle reduced exactly (`num mod den` in integers first).
        pub fn turn(num: u128, den: u128) -> Self {
            let a = 2.0 * PI * (num % den) as f64 / den as f64;
            C64::new(a.cos(), a.sin())
        }
        fn mul(self, o: C64) -> C64 {
            C64::new(self.re * o.re - self.im * o.im, self.re * o.im + self.im * o.re)
        }
        fn add(self, o: C64) -> C64 {
            C64::new(self.re + o.re, self.im + o.im)
        }
        fn sub(self, o: C64) -> C64 {
            C64::new(self.re - o.re, self.im - o.im)
        }
        fn conj(self) -> C64 {
            C64::new(self.re, -self.im)
        }
        fn scale(self, s: f64) -> C64 {
            C64::new(self.re * s, self.im * s)
        }
    }

    /// In place, `x.len()` a power of two: `X[k] = Σ_j x[j]·e^{∓2πi·jk/n}` (`−` forward, `+` inverse; never
    /// normalised). Iterative radix 2, decimation in time.
    pub fn fft_pow2(x: &mut [C64], inverse: bool) {
        let n = x.len();
        assert!(n.is_power_of_two(), "fft_pow2 needs a power-of-two length, got {n}");
        let bits = n.trailing_zeros();
        for i in 0..n {
            let j = if bits == 0 { 0 } else { i.reverse_bits() >> (usize::BITS - bits) };
            if j > i {
                x.swap(i, j);
            }
        }
        let mut len = 2;
        while len <= n {
            for start in (0..n).step_by(len) {
                for k in 0..len / 2 {
                    let mut w = C64::turn(k as u128, len as u128);
                    if !inverse {
                        w = w.conj();
                    }
                    let (a, b) = (x[start + k], x[start + k + len / 2].mul(w));
                    x[start + k] = a.add(b);
                    x[start + k + len / 2] = a.sub(b);
                }
            }
            len *= 2;
        }
    }

    /// The DFT of any length `n` (`−` forward, `+` inverse, never normalised): radix 2 when `n` is a power of
    /// two, else Bluestein — `jk = (j² + k² − (k − j)²)/2` turns it into a convolution with the chirp
    /// `e^{∓iπ·m²/n}` (angles reduced exactly, `m² mod 2n`), done by power-of-two FFTs of length `≥ 2n − 1`.
    pub fn dft(x: &[C64], inverse: bool) -> Vec<C64> {
        let n = x.len();
        if n <= 1 || n.is_power_of_two() {
            let mut y = x.to_vec();
            if n > 1 {
                fft_pow2(&mut y, inverse);
            }
            return y;
        }
        // chirp(m) = e^{−iπ m²/n} (forward); the inverse is the conjugate throughout.
        let chirp = |m: usize| {
            let c = C64::turn((m as u128 * m as u128) % (2 * n as u128), 2 * n as u128);
            if inverse {
                c
            } else {
                c.conj()
            }
        };
        let size = (2 * n - 1).next_power_of_two();
        let mut a = vec![C64::default(); size];
        let mut b = vec![C64::default(); size];
        for j in 0..n {
            a[j] = x[j].mul(chirp(j));
        }
        for m in 0..n {
            let c = chirp(m).conj();
            b[m] = c;
            if m > 0 {
                b[size - m] = c;
            }
        }
        fft_pow2(&mut a, false);
        fft_pow2(&mut b, false);
        for (p, q) in a.iter_mut().zip(&b) {
            *p = p.mul(*q);
        }
        fft_pow2(&mut a, true);
        (0..n).map(|k| a[k].scale(1.0 / size as f64).mul(chirp(k))).collect()
    }

    /// `s_t = (1/N)·Σ_{n<N} c[n]·cos(ωnt) + s[n]·sin(ωnt)` for `t < len`, `ω = 2π/T` (`T = window`, `N =
    /// c.len() = s.len() ≤ T`, `len ≤ T`): the raw inverse of [`super::Spectrum::raw`] for one column, or the
    /// compressed part of every middle score once `c, s` are the query-projected coefficients. One inverse DFT
    /// of `X[n] = c[n] − i·s[n]` (zero above `N`): `Re(X[n]·e^{iωnt}) = c[n]·cos + s[n]·sin`.
    pub fn series(c: &[f64], s: &[f64], window: usize, len: usize) -> Vec<f64> {
        let n = c.len();
        assert!(s.len() == n && n <= window && len <= window, "series: N = {n}, sin {}, T = {window}, len = {len}", s.len());
        let mut x = vec![C64::default(); window];
        for f in 0..n {
            x[f] = C64::new(c[f], -s[f]);
        }
        dft(&x, true).iter().take(len).map(|v| v.re / n as f64).collect()
    }

    /// `(Σ_t p_t·cos(ωnt), Σ_t p_t·sin(ωnt))` for `n < n_freq` over `t < p.len() ≤ T`: the value side of the
    /// spectral path (the probabilities' weights on each basis function). One forward DFT of length `T`:
    /// `Σ_t p_t·e^{−iωnt} = cos-sum − i·sin-sum`.
    pub fn moments(p: &[f64], window: usize, n_freq: usize) -> (Vec<f64>, Vec<f64>) {
        assert!(p.len() <= window && n_freq <= window, "moments: len {}, N = {n_freq}, T = {window}", p.len());
        let mut x = vec![C64::default(); window];
        for (t, &v) in p.iter().enumerate() {
            x[t] = C64::new(v, 0.0);
        }
        let y = dft(&x, false);
        (y[..n_freq].iter().map(|v| v.re).collect(), y[..n_freq].iter().map(|v| -v.im).collect())
    }
}

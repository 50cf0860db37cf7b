//! FourierAttention on the device (spec §1; reference `kvsqueeze-reference::fourier`, kernels
//! `kvsqueeze_kernels::fourier`): the compressed cache of one layer, batched over sequences and KV heads, and
//! FlashFourierAttention decode over it by two paths.
//!
//! ## The cache ([`FourierLayerCache`])
//! Per sequence and KV head, keys post-RoPE at their true positions (the caller rotates; nothing is
//! re-assigned):
//! - **exact** rows `[B, Hkv, X, D]` (storage dtype): the `l_init` first tokens and the `l_local` last ones, the
//!   latter as a ring (a decode step moves the oldest out and writes the new token into its slot);
//! - **middle, critical**: `[B, T, |Dkn|]` and `[B, T, |Dvn|]` (storage dtype), the critical columns of every
//!   middle token, allocated for the whole window `T`;
//! - **middle, compressed**: `[B, |Dkc|, 2N]` and `[B, |Dvc|, 2N]` f32 Fourier coefficients (column-major: the
//!   official `[2N, C]` transposed);
//! - **stats**: `[B, 2, |Dkc|]` and `[B, 2, |Dvc|]` f32, the frozen affine map `x̃ = a·x̂ + b`.
//!
//! Columns are global `h·D + d` as in the official dim lists; per-head counts vary ([`FourierDims`]).
//!
//! Until a sequence's middle is formed (the first time it holds more than `l_init + 2N + l_local` tokens, at
//! prefill or at a decode step, spec §1.10.3 as the reference resolves it) all of its tokens are exact, so the
//! exact buffer starts with `X = l_init + 2N + l_local + 1` rows; once every sequence has formed its middle it
//! is re-packed to `X = l_init + l_local` and [`FourierLayerCache::physical_bytes`] equals
//! [`FourierLayerConfig::formula_bytes`]. A middle longer than `T` is refused with
//! [`Error::LengthBeyondCapacity`] (positions would alias), before anything is launched.
//!
//! ## Continuous batching
//! Each sequence has its own state (live, tokens, middle length, ring position) on the device, double-buffered
//! and advanced by the append kernel, with a host mirror that validates steps without a read-back. A new
//! cache's slots are live and empty; [`FourierLayerCache::prefill`] admits a prompt into an empty or retired slot
//! while the others keep theirs, [`FourierLayerCache::retire`] frees a slot (its output rows are zeros).
//!
//! ## Decode attention ([`FourierLayerCache::attend`]), `q: [B, 1, Hq, D]` → `o: [B, 1, Hq, D]`
//! One softmax over `[init | middle | local]`, split over the tokens (exact splits and middle splits, each cube
//! serving the `G` query heads of a KV head), combined on the device.
//! - [`FourierPath::Direct`] (the paper's kernel's semantics): reconstructs the middle's K and V
//!   (`[B, Hkv, L_mid, D]` f32 each, a per-call scratch that is not part of the cache) and attends over it.
//!   Cost `O(L_mid·2N·|Dc|)` per KV head.
//! - [`FourierPath::Spectral`] (spec §1.5, exact): projects the coefficients by the query
//!   (`pc = Σ_c q_c·a_c·coef[c]`), scores middle tokens by an inverse DFT of `pc` at their positions, accumulates
//!   the middle's softmax weights in the frequency domain (`P[n] = Σ_t p_t·(cos, sin)(ωnt)`) and resolves the
//!   compressed value dims once per query in the combine. Cost `O(L_mid·N·G)` per KV head, no scratch.

use crate::tensor::{contiguous_strides, with_float_type, DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::server::Handle;
use kvsqueeze_kernels::fourier::fft::{fourier_fft_moments, fourier_fft_prep, fourier_fft_scores, FftConfig};
use kvsqueeze_kernels::fourier::{
    fourier_append, fourier_append_write, fourier_basis_table, fourier_combine, fourier_gather, fourier_gather_strided, fourier_project, fourier_reconstruct, fourier_split, fourier_stats_finalize,
    fourier_stats_partial, fourier_transform as transform_kernel, FlashConfig, CRIT, NONE, PCHUNKS, ST_ACTIVE, ST_COUNT, ST_EXACT, ST_FLAGS, ST_FORMED, ST_MID, ST_RING, ST_ROWS, ST_SKIP,
};
use kvsqueeze_kernels::util::copy_range;

const TILE: usize = 128;

fn check_window(n_freq: usize, window: usize) -> Result<(), Error> {
    if n_freq == 0 || window == 0 {
        return Err(Error::Config("n_freq and the window T must be positive"));
    }
    if (n_freq as u64) * (window as u64) >= 1 << 32 {
        return Err(Error::Config("N·T must be below 2^32 (exact angle reduction in u32)"));
    }
    Ok(())
}

fn upload_u32(client: &Client, v: &[u32]) -> Handle {
    crate::tensor::count_allocation();
    if v.is_empty() {
        client.create_from_slice(bytemuck::cast_slice(&[NONE]))
    } else {
        client.create_from_slice(bytemuck::cast_slice(v))
    }
}

fn zeros_f32(client: &Client, n: usize) -> Handle {
    crate::tensor::count_allocation();
    client.create_from_slice(bytemuck::cast_slice(&vec![0.0f32; n.max(1)]))
}

/// `BufferArg` over a handle of `len` elements.
///
/// # Safety
/// The kernel it is passed to must index only below `len`.
unsafe fn arg(h: &Handle, len: usize) -> BufferArg {
    BufferArg::from_raw_parts(h.clone(), len.max(1))
}

/// The prefill transform (spec §1.3 step 1) of `x: [L_mid, C]` (any row stride, unit column stride): returns the
/// coefficients `[C, 2N]` f32 (column `c`: `N` cosine then `N` sine coefficients).
pub fn fourier_transform(client: &Client, x: &DeviceTensor, n_freq: usize, window: usize) -> Result<DeviceTensor, Error> {
    crate::tensor::check_bindings(client, &["fourier_transform"])?;
    if x.shape.len() != 2 || x.shape.contains(&0) {
        return Err(Error::ShapeMismatch { tensor: "x", expected: vec![1, 1], got: x.shape.clone() });
    }
    if !crate::attention::dtype_supported(client, x.dtype) {
        return Err(Error::DtypeUnsupported { dtype: x.dtype, device: crate::attention::device_name(client) });
    }
    if x.strides[1] != 1 {
        return Err(Error::Layout { tensor: "x", reason: "needs a unit column stride" });
    }
    x.check_in_buffer("x")?;
    check_window(n_freq, window)?;
    let (lmid, cols) = (x.shape[0], x.shape[1]);
    if lmid > window {
        return Err(Error::LengthBeyondCapacity { batch: 0, len: lmid, capacity: window });
    }
    if x.buffer_len >= 1 << 32 {
        return Err(Error::DeviceLimit("the transform indexes columns with u32 offsets".into()));
    }
    let shape = [cols, 2 * n_freq];
    let coef = DeviceTensor { handle: client.empty(2 * n_freq * cols * 4), buffer_len: 2 * n_freq * cols, shape: shape.to_vec(), strides: contiguous_strides(&shape), offset: 0, dtype: DType::F32 };
    let col_off: Vec<u32> = (0..cols as u32).collect();
    let col_off = upload_u32(client, &col_off);
    let count = CubeCount::Static(n_freq.div_ceil(TILE) as u32, cols as u32, 1);
    crate::tensor::count_launches(1);
    // SAFETY: the kernel reads rows `< L_mid` of the validated view and writes the `2N·C` coefficients.
    unsafe {
        with_float_type!(x.dtype, E => transform_kernel::launch_unchecked::<E>(client, count, CubeDim::new_1d(TILE as u32), arg(&x.handle, x.buffer_len), arg(&col_off, cols), arg(&coef.handle, coef.buffer_len), x.offset, x.strides[0], lmid, 0, n_freq, window as u32, 1.0f32, TILE))
    }
    Ok(coef)
}

/// Which dims of each KV head are critical (kept exactly in the middle) and which are compressed, for K and V.
/// Lists are in-head dims, sorted; the compressed list of a head is the complement of its critical list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FourierDims {
    /// KV heads.
    pub hkv: usize,
    /// Head dim.
    pub d: usize,
    /// Per head: critical key dims.
    pub k_crit: Vec<Vec<usize>>,
    /// Per head: critical value dims.
    pub v_crit: Vec<Vec<usize>>,
}

/// Flattened column tables of one of K/V: per-head offsets into the global column lists and the columns.
#[derive(Clone, Debug, Default)]
struct Columns {
    /// `[Hkv + 1]` prefix offsets of the compressed columns; their in-head dims; their heads.
    c_off: Vec<u32>,
    c_dim: Vec<u32>,
    c_head: Vec<u32>,
    n_off: Vec<u32>,
    n_dim: Vec<u32>,
    n_head: Vec<u32>,
}

impl FourierDims {
    /// From per-head critical lists (checked: sorted, distinct, `< d`, one list per head).
    pub fn from_critical(hkv: usize, d: usize, k_crit: Vec<Vec<usize>>, v_crit: Vec<Vec<usize>>) -> Result<Self, Error> {
        if k_crit.len() != hkv || v_crit.len() != hkv {
            return Err(Error::Config("one critical list per KV head, for K and for V"));
        }
        let ok = |l: &Vec<usize>| l.windows(2).all(|w| w[0] < w[1]) && l.iter().all(|&j| j < d);
        if !k_crit.iter().chain(&v_crit).all(ok) {
            return Err(Error::Config("critical dims must be sorted, distinct and below the head dim"));
        }
        Ok(FourierDims { hkv, d, k_crit, v_crit })
    }

    /// The same critical lists for every head.
    pub fn uniform(hkv: usize, d: usize, k_crit: &[usize], v_crit: &[usize]) -> Result<Self, Error> {
        Self::from_critical(hkv, d, vec![k_crit.to_vec(); hkv], vec![v_crit.to_vec(); hkv])
    }

    /// One layer of the official JSON schema (spec §1.6): `Layer_<layer> → {kc_list, kn_list, vc_list,
    /// vn_list, …_h_list}` with global column ids `h·D + d`. Checks that, per head, the compressed and critical
    /// lists partition the head's dims and agree with the cumulative `*_h_list` counts.
    pub fn from_official_json(text: &str, layer: usize, hkv: usize, d: usize) -> Result<Self, Error> {
        let bad = |why: String| Error::Device(format!("dim-list JSON: {why}"));
        let root: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let entry = root.get(format!("Layer_{layer}")).ok_or_else(|| bad(format!("no Layer_{layer}")))?;
        let list = |name: &str| -> Result<Vec<usize>, Error> {
            let arr = entry.get(name).and_then(|v| v.as_array()).ok_or_else(|| bad(format!("Layer_{layer}.{name} missing")))?;
            arr.iter().map(|v| v.as_u64().map(|x| x as usize).ok_or_else(|| bad(format!("{name}: not an integer")))).collect()
        };
        let per_head = |c: &str, n: &str| -> Result<Vec<Vec<usize>>, Error> {
            let (cl, nl) = (list(c)?, list(n)?);
            let (ch, nh) = (list(&format!("{}_h_list", &c[..2]))?, list(&format!("{}_h_list", &n[..2]))?);
            let mut crit = vec![Vec::new(); hkv];
            let mut comp_count = vec![0usize; hkv];
            for &g in &nl {
                if g >= hkv * d {
                    return Err(bad(format!("{n}: column {g} beyond {hkv}×{d}")));
                }
                crit[g / d].push(g % d);
            }
            for &g in &cl {
                if g >= hkv * d {
                    return Err(bad(format!("{c}: column {g} beyond {hkv}×{d}")));
                }
                comp_count[g / d] += 1;
            }
            for h in 0..hkv {
                if crit[h].len() + comp_count[h] != d {
                    return Err(bad(format!("head {h}: compressed and critical lists do not partition its {d} dims")));
                }
            }
            // The cumulative per-head counts (the loader prepends 0), when present in full.
            let check = |cum: &[usize], counts: Vec<usize>| {
                cum.len() != hkv
                    || cum
                        .iter()
                        .zip(counts.iter().scan(0, |a, &x| {
                            *a += x;
                            Some(*a)
                        }))
                        .all(|(a, b)| *a == b)
            };
            if !check(&ch, comp_count.clone()) || !check(&nh, crit.iter().map(Vec::len).collect()) {
                return Err(bad("per-head counts (*_h_list) disagree with the lists".into()));
            }
            Ok(crit)
        };
        let k_crit = per_head("kc_list", "kn_list")?;
        let v_crit = per_head("vc_list", "vn_list")?;
        Self::from_critical(hkv, d, k_crit, v_crit).map_err(|_| bad("critical lists are not sorted".into()))
    }

    /// Calibrates the lists on captured keys and values (spec §1.6, [`kvsqueeze_reference::fourier::calibrate`]):
    /// each sample is `[L][Hkv·D]` (all heads' columns of one layer, token-major), the columns with the lowest
    /// renormalised reconstruction error from `n_freq` frequencies are compressed, `fractions = (K, V)` of them
    /// (the paper's schedule: [`kvsqueeze_reference::fourier::paper_fraction`]).
    #[allow(clippy::too_many_arguments)]
    pub fn calibrate(k_samples: &[Vec<Vec<f64>>], v_samples: &[Vec<Vec<f64>>], hkv: usize, d: usize, l_init: usize, l_local: usize, n_freq: usize, fractions: (f64, f64)) -> Result<Self, Error> {
        let wide = |s: &[Vec<Vec<f64>>]| s.iter().all(|x| x.iter().all(|r| r.len() == hkv * d));
        if !wide(k_samples) || !wide(v_samples) {
            return Err(Error::Config("calibration samples must be [L][Hkv·D]"));
        }
        let crit = |samples: &[Vec<Vec<f64>>], f: f64| -> Vec<Vec<usize>> {
            let comp = kvsqueeze_reference::fourier::calibrate(samples, l_init, l_local, n_freq, f);
            (0..hkv).map(|h| (0..d).filter(|&j| !comp.contains(&(h * d + j))).collect()).collect()
        };
        Self::from_critical(hkv, d, crit(k_samples, fractions.0), crit(v_samples, fractions.1))
    }

    /// Compressed fraction of the K and V columns.
    pub fn compressed_fraction(&self) -> (f64, f64) {
        let tot = (self.hkv * self.d) as f64;
        let k: usize = self.k_crit.iter().map(Vec::len).sum();
        let v: usize = self.v_crit.iter().map(Vec::len).sum();
        (1.0 - k as f64 / tot, 1.0 - v as f64 / tot)
    }

    fn columns(&self, crit: &[Vec<usize>]) -> Columns {
        let mut c = Columns { c_off: vec![0], n_off: vec![0], ..Default::default() };
        for (h, list) in crit.iter().enumerate() {
            for j in 0..self.d {
                if list.contains(&j) {
                    c.n_dim.push(j as u32);
                    c.n_head.push(h as u32);
                } else {
                    c.c_dim.push(j as u32);
                    c.c_head.push(h as u32);
                }
            }
            c.c_off.push(c.c_dim.len() as u32);
            c.n_off.push(c.n_dim.len() as u32);
        }
        c
    }
}

/// Shape and settings of a [`FourierLayerCache`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FourierLayerConfig {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub hq: usize,
    /// Storage dtype of the exact rows and the critical columns (coefficients and stats are f32).
    pub dtype: DType,
    /// Exact leading tokens.
    pub l_init: usize,
    /// Exact trailing window.
    pub l_local: usize,
    /// Frequencies `N`.
    pub n_freq: usize,
    /// Translated window `T`: the longest middle.
    pub window: usize,
    /// The dim lists (carry `Hkv` and `D`).
    pub dims: FourierDims,
    /// Refuse a prefill, append or attend whose inputs hold NaN/±∞ ([`Error::NonFinite`], the cache unchanged;
    /// [`crate::finite`]). Off by default.
    pub check_finite: bool,
    /// Least-squares reconstruction instead of the paper's renormalisation ([`Self::with_least_squares`]). Off
    /// by default.
    pub least_squares: bool,
}

impl FourierLayerConfig {
    /// A configuration.
    #[allow(clippy::too_many_arguments)]
    pub fn new(batch: usize, hq: usize, dtype: DType, l_init: usize, l_local: usize, n_freq: usize, window: usize, dims: FourierDims) -> Self {
        FourierLayerConfig { batch, hq, dtype, l_init, l_local, n_freq, window, dims, check_finite: false, least_squares: false }
    }
    /// Reconstructs the compressed columns by the least-squares truncated Fourier series over the window,
    /// `x̃_t = (1/T)(C₀ + 2Σ_{n≥1} Ccos[n]·cos(ωnt) + Csin[n]·sin(ωnt))`, instead of the paper's `1/N` inverse
    /// with its frozen mean / max-deviation renormalisation (spec §1.3 step 4); see
    /// `kvsqueeze_reference::fourier::FourierConfig::least_squares` and the fidelity study in README.
    pub fn with_least_squares(mut self, on: bool) -> Self {
        self.least_squares = on;
        self
    }

    /// The transform's weight of the `n = 0` cosine coefficient (½ in least-squares mode).
    fn dc_weight(&self) -> f32 {
        if self.least_squares {
            0.5
        } else {
            1.0
        }
    }

    /// The least-squares mode's scale `2N/T` (0: the paper's renormalisation).
    fn ls_scale(&self) -> f32 {
        if self.least_squares {
            (2.0 * self.n_freq as f64 / self.window as f64) as f32
        } else {
            0.0
        }
    }

    /// Turns the non-finite check of every input on or off.
    pub fn with_check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }
    /// Tokens held exactly before the middle forms: `l_init + 2N + l_local`.
    pub fn trigger(&self) -> usize {
        self.l_init + 2 * self.n_freq + self.l_local
    }
    /// Bytes of the cache once every sequence has formed its middle:
    /// `B·(2·Hkv·(l_init + l_local)·D·e + T·(|Dkn| + |Dvn|)·e + 2N·(|Dkc| + |Dvc|)·4 + 2·(|Dkc| + |Dvc|)·4)`
    /// plus the decode kernels' basis table, `4·N·tile·4` (tile = 128 tokens, 64 when `G·D > 1024`).
    pub fn formula_bytes(&self) -> usize {
        let e = self.dtype.size();
        let (hkv, d) = (self.dims.hkv, self.dims.d);
        let crit: usize = self.dims.k_crit.iter().chain(&self.dims.v_crit).map(Vec::len).sum();
        let comp = 2 * hkv * d - crit;
        let tile = FourierLayerCache::tile(self.hq / hkv.max(1), d);
        self.batch * (2 * hkv * (self.l_init + self.l_local) * d * e + self.window * crit * e + 2 * self.n_freq * comp * 4 + 2 * comp * 4) + 4 * self.n_freq * tile * 4
    }
}

/// Which decode-attention path [`FourierLayerCache::attend`] takes (all three compute the same function).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FourierPath {
    /// Reconstruct the middle, then attend (the paper's kernel's semantics). `O(L·N·|Dc|)` per step.
    Direct,
    /// Exact spectral-domain path (spec §1.5): the query projected onto the coefficients, then the `N`-term
    /// trigonometric sums evaluated at every middle token (scores) and weighted by every probability (values).
    /// `O(L·N·G)` per KV head and step.
    Spectral,
    /// The spectral path with both sums done as Bluestein convolutions by FFTs of length `F` in shared memory
    /// (`kvsqueeze_kernels::fourier::fft`): `O(L·log F·F/Q)` per query head, `Q = F − N + 1` tokens per block.
    /// Needs `8·F` bytes of shared memory ([`FourierLayerCache::fft_size`]; `None`: this path returns
    /// [`Error::DeviceLimit`]).
    Fft,
}

/// The FFT path's shape and its regions of the decode scratch (offsets from the region's start; see
/// `kvsqueeze_kernels::fourier::fft` for the math and the layout).
#[derive(Clone, Copy, Debug)]
struct FftPlan {
    cfg: FftConfig,
    /// Tokens per block `Q = F − N + 1` (the FFT path's middle split length).
    q: usize,
    /// Blocks covering the window: `⌈T/Q⌉`.
    blocks: usize,
    /// Row length of the score region: `blocks·Q`.
    tq: usize,
    tw: usize,
    ch: usize,
    bh: usize,
    cm: usize,
    ah: usize,
    sc: usize,
    /// Elements of the whole region; the first `ah` (twiddles, chirp, chirp spectra) are constants.
    len: usize,
}

impl FftPlan {
    /// The smallest transform `F ≥ 4N` (power of two, at least 8) whose blocks cover the window in at most
    /// `MAX_SPLITS/2` splits; `None` when its `8·F` bytes of shared memory exceed `smem` (or the `rows = B·Hq`
    /// query rows exceed a grid dimension).
    fn new(n: usize, window: usize, rows: usize, smem: usize, max_units: usize) -> Option<Self> {
        if rows > u16::MAX as usize {
            return None;
        }
        let mut f = (4 * n).next_power_of_two().max(8);
        while window.div_ceil(f - n + 1) > kvsqueeze_kernels::fourier::MAX_SPLITS / 2 {
            f *= 2;
        }
        if 8 * f > smem {
            return None;
        }
        let q = f - n + 1;
        let blocks = window.div_ceil(q);
        let tq = blocks * q;
        let tw = 0;
        let ch = tw + f;
        let bh = ch + 2 * window.max(n);
        let cm = bh + blocks * 2 * f;
        let ah = cm + blocks * 2 * f;
        let sc = ah + rows * 2 * f;
        let len = rows.checked_mul(tq)?.checked_add(sc)?;
        let threads = (f / 2).clamp(32, 256).min(max_units);
        Some(FftPlan { cfg: FftConfig { size: f, threads }, q, blocks, tq, tw, ch, bh, cm, ah, sc, len })
    }

    /// The constant part of the region (`[0, ah)`), computed in `f64` and rounded once: twiddles
    /// `e^{2πij/F}`, the chirp `ch(m) = e^{iπ·(m² mod 2T)/T}`, and per block the chirp spectra
    /// `B̂_j/F`, `Ĉ_j/F` in bit-reversed order.
    fn tables(&self, n: usize, window: usize) -> Vec<f32> {
        use kvsqueeze_reference::fourier::fft::{fft_pow2, C64};
        let f = self.cfg.size;
        let t2 = 2 * window as u128;
        let chirp = |m: i64| C64::turn((m.unsigned_abs() as u128).pow(2) % t2, t2);
        let mut out = Vec::with_capacity(self.ah);
        let mut push = |z: C64| {
            out.push(z.re as f32);
            out.push(z.im as f32);
        };
        for j in 0..f / 2 {
            push(C64::turn(j as u128, f as u128));
        }
        for m in 0..window.max(n) {
            push(chirp(m as i64));
        }
        let bits = f.trailing_zeros();
        let rev = |p: usize| p.reverse_bits() >> (usize::BITS - bits);
        let (q, n) = (self.q as i64, n as i64);
        for conj in [true, false] {
            for j in 0..self.blocks as i64 {
                let mut x: Vec<C64> = (0..f as i64)
                    .map(|k| {
                        if conj {
                            let z = chirp(j * q - n + 1 + k);
                            C64::new(z.re, -z.im)
                        } else {
                            chirp(k - j * q - q + 1)
                        }
                    })
                    .collect();
                fft_pow2(&mut x, false);
                for p in 0..f {
                    let z = x[rev(p)];
                    push(C64::new(z.re / f as f64, z.im / f as f64));
                }
            }
        }
        out
    }
}

/// Host mirror of one sequence's decode state (the device's `state`, advanced by the same rule in
/// [`FourierLayerCache::append`]): answers lengths and validates steps with no read-back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seq {
    /// Live (admitted and not retired). A new cache's slots are live and empty.
    active: bool,
    /// Tokens represented.
    count: usize,
    formed: bool,
    mid_len: usize,
    /// Ring slots start at `l_init + skip`; `ring` is the oldest local token's index in the ring.
    skip: usize,
    ring: usize,
}

impl Seq {
    /// Its column of the device state (rows `ST_*`).
    fn words(&self, l_init: usize, l_local: usize) -> [u32; ST_ROWS] {
        let mut w = [0u32; ST_ROWS];
        if !self.active {
            return w;
        }
        w[ST_EXACT] = if self.formed { l_init + l_local } else { self.count } as u32;
        w[ST_SKIP] = self.skip as u32;
        w[ST_MID] = self.mid_len as u32;
        w[ST_COUNT] = self.count as u32;
        w[ST_RING] = self.ring as u32;
        w[ST_FLAGS] = ST_ACTIVE | if self.formed { ST_FORMED } else { 0 };
        w
    }

    /// The state after one appended token (the rule of the append kernel).
    fn advanced(self, l_init: usize, l_local: usize, trigger: usize) -> Seq {
        if !self.active {
            return self;
        }
        let count = self.count + 1;
        if self.formed {
            Seq { count, mid_len: self.mid_len + 1, ring: (self.ring + 1) % l_local, ..self }
        } else if count > trigger {
            let mid_len = count - l_init - l_local;
            Seq { active: true, count, formed: true, mid_len, skip: mid_len, ring: 0 }
        } else {
            Seq { count, ..self }
        }
    }
}

struct Tables {
    k: Columns,
    v: Columns,
    /// Device copies: dim maps for the reconstruction, global-column offsets (`h·D + d`, the prompt's layout),
    /// the identity `0..D`.
    dmap_k: Handle,
    dmap_v: Handle,
    kc_glob: Handle,
    kn_glob: Handle,
    vc_glob: Handle,
    vn_glob: Handle,
    ident: Handle,
    /// The decode kernels' column tables, packed: K then V, each `[c_off | c_dim | n_off | n_dim]` (per-head
    /// offsets into the compressed and critical column lists, in-head dims); on the device after the state, in
    /// the cache's `state` buffer (uploaded with it).
    packed: Vec<u32>,
    /// Offsets of the columns in the exact buffer (`h·X·D + d`), for the current `X`.
    kc_x: Handle,
    kn_x: Handle,
    vc_x: Handle,
    vn_x: Handle,
}

/// Decode buffers allocated once at [`FourierLayerCache::new`] (sized for the most splits the device gets).
///
/// The decode kernels' f32 buffers are regions of one buffer `work` (a kernel binds one f32 scratch: see
/// [`Work`]); the direct path's reconstruction goes into a per-call buffer of the same layout.
struct Scratch {
    /// Splits per segment (exact, middle) at most on the direct and spectral paths.
    seg_max: usize,
    /// Middle splits the partials have room for (`seg_max`, or the FFT path's blocks if more).
    s_mid: usize,
    /// The FFT path (`None` where its shared memory exceeds the device's).
    fft: Option<FftPlan>,
    work: Handle,
    at: Work,
    /// The transform's partial statistics for a middle formed at a decode step (`2N + 1` tokens).
    stats: Handle,
    stats_len: usize,
    /// `[B, 1, Hq, D]`: the output of every attend (overwritten by the next).
    out: DeviceTensor,
}

/// The FourierAttention cache of one layer on the device (see the module docs).
pub struct FourierLayerCache {
    client: Client,
    cfg: FourierLayerConfig,
    /// Host mirror of `state`.
    seqs: Vec<Seq>,
    /// `[2, ST_ROWS, B]` u32, double-buffered by step: the current half is `cur`.
    state: Handle,
    cur: usize,
    x_cap: usize,
    ek: Handle,
    ev: Handle,
    ck: Handle,
    cv: Handle,
    coef_k: Handle,
    coef_v: Handle,
    ab_k: Handle,
    ab_v: Handle,
    tab: Tables,
    scratch: Scratch,
    tile: usize,
    plane: bool,
    /// Column shares of the append's middle update per (sequence, head): about four rounds of the cube's threads
    /// each over the widest head's columns (fixed by the dim lists, so chosen once at `new`).
    append_parts: usize,
    /// Which kernel variants ran once (launch failures are checked at the first run of each): bit 0 append,
    /// bit 1 direct attend, bit 2 spectral attend, bit 3 FFT attend.
    checked: std::sync::atomic::AtomicU8,
}

/// Element offsets of the regions of the decode kernels' f32 scratch: the tile basis of
/// `kvsqueeze_kernels::fourier::fourier_basis_table` at 0 (`4·N·tile`), the spectral projections (`pc: [PCHUNKS,
/// B, Hq, 2N]`, then `qb: [PCHUNKS, B, Hq]` from `qb`), the split partials (`o`, `ml`, `sp`), the FFT path's
/// region ([`FftPlan`]), and the direct
/// path's reconstruction (`mkv`: K then V, `len − mkv` elements).
#[derive(Clone, Copy, Debug)]
struct Work {
    pq: usize,
    qb: usize,
    o: usize,
    ml: usize,
    sp: usize,
    /// The FFT path's region ([`FftPlan`]; empty without it).
    fft: usize,
    mkv: usize,
    len: usize,
}

impl Work {
    /// The layout for `splits = (all, middle)` split partials, with `pq` projection entries (0 on the direct
    /// path), an FFT region of `fft_len` elements and a reconstruction of `mkv_len` elements.
    #[allow(clippy::too_many_arguments)]
    fn new(basis: usize, pq_len: usize, qb_off: usize, b: usize, hkv: usize, g: usize, d: usize, n2: usize, splits: (usize, usize), fft_len: usize, mkv_len: usize) -> Self {
        let (s_all, s_mid) = splits;
        let pq = basis;
        let o = pq + pq_len;
        let ml = o + b * hkv * s_all * g * d;
        let sp = ml + b * hkv * s_all * g * 2;
        let fft = sp + b * hkv * s_mid * g * n2;
        let mkv = fft + fft_len;
        Work { pq, qb: pq + qb_off, o, ml, sp, fft, mkv, len: mkv + mkv_len }
    }
}

/// A device buffer of `bytes` (counted by [`crate::tensor::device_allocations`]).
fn alloc(client: &Client, bytes: usize) -> Handle {
    crate::tensor::count_allocation();
    client.empty(bytes.max(4))
}

impl FourierLayerCache {
    /// An empty cache (every slot live and empty); checks the configuration and the device. Allocates the
    /// cache and every buffer a decode step uses.
    pub fn new(client: &Client, cfg: FourierLayerConfig) -> Result<Self, Error> {
        crate::tensor::check_bindings(
            client,
            &[
                "fourier_append",
                "fourier_append_write",
                "fourier_split",
                "fourier_combine",
                "fourier_project",
                "fourier_reconstruct",
                "fourier_transform",
                "fourier_stats_partial",
                "fourier_stats_finalize",
                "fourier_gather",
                "fourier_gather_strided",
                "copy_range",
                "fourier_basis_table",
                "fourier_fft_prep",
                "fourier_fft_scores",
                "fourier_fft_moments",
            ],
        )?;
        let (hkv, d) = (cfg.dims.hkv, cfg.dims.d);
        if cfg.batch == 0 || hkv == 0 || cfg.hq == 0 || cfg.hq % hkv != 0 {
            return Err(Error::GqaRatio { hq: cfg.hq, hkv });
        }
        let g = cfg.hq / hkv;
        if !matches!(g, 1 | 2 | 4 | 8 | 16) {
            return Err(Error::Config("the GQA group size must be 1, 2, 4, 8 or 16"));
        }
        if d == 0 || d > 256 {
            return Err(Error::UnsupportedHeadDim { d });
        }
        if cfg.l_local == 0 {
            return Err(Error::Config("the local window must hold at least one token"));
        }
        check_window(cfg.n_freq, cfg.window)?;
        if cfg.l_init.checked_add(2 * cfg.n_freq).and_then(|x| x.checked_add(cfg.l_local)).and_then(|x| x.checked_add(1)).is_none() {
            return Err(Error::Config("l_init + 2N + l_local overflows"));
        }
        if !crate::attention::dtype_supported(client, cfg.dtype) || cfg.dtype == DType::U32 {
            return Err(Error::DtypeUnsupported { dtype: cfg.dtype, device: crate::attention::device_name(client) });
        }
        let hw = &client.properties().hardware;
        let tile = Self::tile(g, d);
        if crate::tensor::max_units_per_cube(client) < tile {
            return Err(Error::DeviceLimit(format!("needs {tile} units per cube")));
        }
        let smem = 4 * (2 * g * d + 2 * g * tile + g * 2 * cfg.n_freq).max(kvsqueeze_kernels::fourier::MAX_SPLITS + 2 * tile + 2 * cfg.n_freq);
        if smem > hw.max_shared_memory_size {
            return Err(Error::DeviceLimit(format!("needs {smem} B of shared memory, the device has {}", hw.max_shared_memory_size)));
        }
        let x_cap = cfg.trigger() + 1;
        let (kt, vt) = (cfg.dims.columns(&cfg.dims.k_crit), cfg.dims.columns(&cfg.dims.v_crit));
        let (ckn, cvn, ckc, cvc) = (kt.n_dim.len(), vt.n_dim.len(), kt.c_dim.len(), vt.c_dim.len());
        let e = cfg.dtype.size();
        let (b, n2, hq) = (cfg.batch, 2 * cfg.n_freq, cfg.hq);
        let sms = hw.num_streaming_multiprocessors.unwrap_or(16) as usize;
        let seg_max = (8 * sms).div_ceil(b * hkv).clamp(1, kvsqueeze_kernels::fourier::MAX_SPLITS / 2);
        let fft = FftPlan::new(cfg.n_freq, cfg.window, b * hq, hw.max_shared_memory_size, crate::tensor::max_units_per_cube(client));
        let s_mid = seg_max.max(fft.map_or(0, |f| f.blocks));
        let stats_len = (n2 + 1).div_ceil(TILE) * ckc.max(cvc) * 6;
        // Every buffer's size, checked for overflow and against the device before anything is allocated.
        let shapes = [
            vec![b, hkv, x_cap, d],
            vec![b, cfg.window, ckn.max(cvn)],
            vec![b, 2, cfg.n_freq, ckc.max(cvc)],
            vec![b, hkv, cfg.window, d],
            vec![b, hkv, seg_max + s_mid, g, d],
            vec![b, hkv, s_mid, g, n2],
            vec![fft.map_or(1, |f| f.len)],
            vec![PCHUNKS, b, hq, n2],
        ];
        for shape in &shapes {
            let (n, _) = crate::tensor::checked_size(client, "a FourierAttention cache buffer", shape, DType::F32)?;
            if n >= 1 << 32 {
                return Err(Error::DeviceLimit("buffers of 2^32 elements or more (the cache indexes with u32 offsets)".into()));
            }
        }
        let dmap = |t: &Columns| -> Vec<u32> {
            let mut m = vec![0u32; hkv * d];
            for (i, (&h, &dd)) in t.c_head.iter().zip(&t.c_dim).enumerate() {
                m[h as usize * d + dd as usize] = i as u32;
            }
            for (i, (&h, &dd)) in t.n_head.iter().zip(&t.n_dim).enumerate() {
                m[h as usize * d + dd as usize] = CRIT | i as u32;
            }
            m
        };
        let glob = |heads: &[u32], dims: &[u32]| -> Vec<u32> { heads.iter().zip(dims).map(|(&h, &dd)| h * d as u32 + dd).collect() };
        let widest = |t: &Columns| t.c_off.windows(2).chain(t.n_off.windows(2)).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let append_parts = (widest(&kt).max(widest(&vt)) * cfg.n_freq).div_ceil(4 * TILE).clamp(1, 64);
        let packed: Vec<u32> = [&kt, &vt].iter().flat_map(|t| t.c_off.iter().chain(&t.c_dim).chain(&t.n_off).chain(&t.n_dim).copied()).collect();
        let c = client;
        let tab = Tables {
            dmap_k: upload_u32(c, &dmap(&kt)),
            dmap_v: upload_u32(c, &dmap(&vt)),
            kc_glob: upload_u32(c, &glob(&kt.c_head, &kt.c_dim)),
            kn_glob: upload_u32(c, &glob(&kt.n_head, &kt.n_dim)),
            vc_glob: upload_u32(c, &glob(&vt.c_head, &vt.c_dim)),
            vn_glob: upload_u32(c, &glob(&vt.n_head, &vt.n_dim)),
            ident: upload_u32(c, &(0..d as u32).collect::<Vec<_>>()),
            packed,
            kc_x: upload_u32(c, &[]),
            kn_x: upload_u32(c, &[]),
            vc_x: upload_u32(c, &[]),
            vn_x: upload_u32(c, &[]),
            k: kt,
            v: vt,
        };
        let forced = crate::runtime::force_gpu_paths();
        let plane = (forced || client.features().plane.contains(cubecl::features::Plane::Ops)) && hw.plane_size_min == hw.plane_size_max && tile % hw.plane_size_max as usize == 0;
        let basis_len = 4 * cfg.n_freq * tile;
        let at = Work::new(basis_len, PCHUNKS * b * hq * (n2 + 1), PCHUNKS * b * hq * n2, b, hkv, g, d, n2, (seg_max + s_mid, s_mid), fft.map_or(0, |f| f.len), 0);
        if at.len >= 1 << 32 {
            return Err(Error::DeviceLimit("a decode scratch of 2^32 elements or more (the kernels index with u32 offsets)".into()));
        }
        let work = alloc(c, at.len * 4);
        crate::tensor::count_launches(1);
        // SAFETY: writes the `4·N·tile` entries of the table at the start of `work`.
        unsafe {
            fourier_basis_table::launch_unchecked(
                c,
                CubeCount::Static((cfg.n_freq * tile).div_ceil(256) as u32, 1, 1),
                CubeDim::new_1d(256),
                arg(&work, basis_len),
                cfg.n_freq,
                cfg.window as u32,
                tile,
            );
        }
        let out_shape = [b, 1, hq, d];
        if let Some(f) = &fft {
            let tables = f.tables(cfg.n_freq, cfg.window);
            crate::tensor::count_allocation();
            let h = c.create_from_slice(bytemuck::cast_slice(&tables));
            crate::tensor::count_launches(1);
            // SAFETY: copies the `f.ah` constant elements into the FFT region of `work`.
            unsafe {
                copy_range::launch_unchecked::<f32>(c, CubeCount::Static(f.ah.div_ceil(256).min(65535) as u32, 1, 1), CubeDim::new_1d(256), arg(&h, f.ah), arg(&work, at.len), 0, at.fft, f.ah);
            }
        }
        let scratch = Scratch { seg_max, s_mid, fft, work, at, stats: alloc(c, stats_len * 4), stats_len, out: DeviceTensor::empty(c, &out_shape, cfg.dtype)? };
        let mut cache = FourierLayerCache {
            tile,
            ek: alloc(c, b * hkv * x_cap * d * e),
            ev: alloc(c, b * hkv * x_cap * d * e),
            ck: alloc(c, b * cfg.window * ckn * e),
            cv: alloc(c, b * cfg.window * cvn * e),
            coef_k: zeros_f32(c, b * ckc * n2),
            coef_v: zeros_f32(c, b * cvc * n2),
            ab_k: zeros_f32(c, b * 2 * ckc),
            ab_v: zeros_f32(c, b * 2 * cvc),
            client: client.clone(),
            seqs: vec![Seq { active: true, ..Seq::default() }; b],
            state: upload_u32(c, &[]),
            cur: 0,
            x_cap,
            tab,
            scratch,
            plane,
            append_parts,
            checked: std::sync::atomic::AtomicU8::new(0),
            cfg,
        };
        cache.set_x_tables();
        cache.upload_state();
        Ok(cache)
    }

    /// Tokens per tile of the decode kernels (threads per cube).
    fn tile(g: usize, d: usize) -> usize {
        if g * d > 1024 {
            64
        } else {
            TILE
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FourierLayerConfig {
        &self.cfg
    }

    /// Tokens represented per sequence (init + middle + local; 0 for a retired slot).
    pub fn lens(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.count).collect()
    }

    /// Middle lengths per sequence (0 until formed).
    pub fn mid_lens(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.mid_len).collect()
    }

    /// Whether slot `b` holds a live sequence (`false` once retired, until a prefill admits a new one).
    pub fn is_active(&self, b: usize) -> bool {
        self.seqs.get(b).is_some_and(|s| s.active)
    }

    /// Bytes the device holds for the cache now (exact rows, critical columns, coefficients, stats; the small
    /// index tables and [`Self::scratch_bytes`] excluded). Equals [`FourierLayerConfig::formula_bytes`] once
    /// every live middle is formed.
    pub fn physical_bytes(&self) -> usize {
        let (hkv, d, e) = (self.cfg.dims.hkv, self.cfg.dims.d, self.cfg.dtype.size());
        let (t, b, n2) = (&self.tab, self.cfg.batch, 2 * self.cfg.n_freq);
        let (ckn, cvn, ckc, cvc) = (t.k.n_dim.len(), t.v.n_dim.len(), t.k.c_dim.len(), t.v.c_dim.len());
        b * (2 * hkv * self.x_cap * d * e + self.cfg.window * (ckn + cvn) * e + n2 * (ckc + cvc) * 4 + 2 * (ckc + cvc) * 4) + 4 * self.cfg.n_freq * self.tile * 4
    }

    /// Bytes of the decode buffers allocated at [`Self::new`] (split partials, projections, the FFT path's tables
    /// and per-row transforms and scores, the output); the direct path's reconstruction is a per-call scratch
    /// beyond these.
    pub fn scratch_bytes(&self) -> usize {
        let (hkv, d, hq, b, n2) = (self.cfg.dims.hkv, self.cfg.dims.d, self.cfg.hq, self.cfg.batch, 2 * self.cfg.n_freq);
        let (g, s) = (hq / hkv, &self.scratch);
        let fft = s.fft.map_or(0, |f| f.len);
        4 * (b * hkv * (s.seg_max + s.s_mid) * g * (d + 2) + b * hkv * s.s_mid * g * n2 + PCHUNKS * b * hq * (n2 + 1) + fft + s.stats_len) + b * hq * d * self.cfg.dtype.size()
    }

    /// The path [`crate::policy::CompressedKvCache::step`] attends by: [`FourierPath::Fft`] where the device holds
    /// its transform ([`Self::fft_size`]), else [`FourierPath::Spectral`]. (On an H100 at the paper's Llama-3.1-8B
    /// layer the FFT path took 0.31–0.62× the spectral path's time at B = 1 and 8, L = 8k–128k, except 1.03× at
    /// B = 1, L = 8k: README.)
    pub fn step_path(&self) -> FourierPath {
        if self.scratch.fft.is_some() {
            FourierPath::Fft
        } else {
            FourierPath::Spectral
        }
    }

    /// The FFT path's transform length `F` and tokens per block `Q = F − N + 1` (`None`: the device's shared
    /// memory cannot hold `F` complex values, and [`FourierPath::Fft`] returns [`Error::DeviceLimit`]).
    pub fn fft_size(&self) -> Option<(usize, usize)> {
        self.scratch.fft.map(|f| (f.cfg.size, f.q))
    }

    fn set_x_tables(&mut self) {
        let (d, x) = (self.cfg.dims.d as u32, self.x_cap as u32);
        let xo = |heads: &[u32], dims: &[u32]| -> Vec<u32> { heads.iter().zip(dims).map(|(&h, &dd)| h * x * d + dd).collect() };
        let c = &self.client;
        self.tab.kc_x = upload_u32(c, &xo(&self.tab.k.c_head, &self.tab.k.c_dim));
        self.tab.kn_x = upload_u32(c, &xo(&self.tab.k.n_head, &self.tab.k.n_dim));
        self.tab.vc_x = upload_u32(c, &xo(&self.tab.v.c_head, &self.tab.v.c_dim));
        self.tab.vn_x = upload_u32(c, &xo(&self.tab.v.n_head, &self.tab.v.n_dim));
    }

    /// Uploads the host mirror as the device state (both halves; after an admission, a retirement or a re-pack,
    /// never in a decode step).
    fn upload_state(&mut self) {
        let (bsz, li, ll) = (self.cfg.batch, self.cfg.l_init, self.cfg.l_local);
        let mut half = vec![0u32; ST_ROWS * bsz];
        for (b, s) in self.seqs.iter().enumerate() {
            for (r, w) in s.words(li, ll).into_iter().enumerate() {
                half[r * bsz + b] = w;
            }
        }
        let all: Vec<u32> = half.iter().chain(&half).chain(&self.tab.packed).copied().collect();
        self.state = upload_u32(&self.client, &all);
    }

    /// Elements of the `state` buffer: both halves of the state, then the packed column tables (from
    /// `2·ST_ROWS·B`).
    fn state_len(&self) -> usize {
        2 * ST_ROWS * self.cfg.batch + self.tab.packed.len()
    }

    /// Element offset of the current half of `state`.
    fn state_base(&self) -> usize {
        self.cur * ST_ROWS * self.cfg.batch
    }

    fn check_tensor(&self, name: &'static str, t: &DeviceTensor, shape: Vec<usize>) -> Result<(), Error> {
        if t.shape != shape {
            return Err(Error::ShapeMismatch { tensor: name, expected: shape, got: t.shape.clone() });
        }
        if t.dtype != self.cfg.dtype {
            return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: self.cfg.dtype });
        }
        if !t.is_contiguous() {
            return Err(Error::Layout { tensor: name, reason: "must be contiguous" });
        }
        t.check_in_buffer(name)?;
        if t.buffer_len >= 1 << 32 {
            return Err(Error::DeviceLimit(format!("`{name}` has 2^32 elements or more")));
        }
        Ok(())
    }

    /// `dst[dst_row[r] + w] = src[src_row[r] + col[w]]` (row tables uploaded: admissions and re-packs only).
    #[allow(clippy::too_many_arguments)]
    fn gather(&self, src: &Handle, src_len: usize, src_row: &[u32], col: &Handle, width: usize, dst: &Handle, dst_len: usize, dst_row: &[u32]) {
        if src_row.is_empty() || width == 0 {
            return;
        }
        let c = &self.client;
        let (sr, dr) = (upload_u32(c, src_row), upload_u32(c, dst_row));
        let count = CubeCount::Static(width.div_ceil(TILE) as u32, src_row.len() as u32, 1);
        crate::tensor::count_launches(1);
        // SAFETY: the host computed every row offset plus column offset inside its buffer.
        unsafe {
            with_float_type!(self.cfg.dtype, E => fourier_gather::launch_unchecked::<E>(c, count, CubeDim::new_1d(TILE as u32), arg(src, src_len), arg(&sr, src_row.len()), arg(col, width), arg(dst, dst_len), arg(&dr, dst_row.len()), width, TILE))
        }
    }

    /// Transform + stats of one of K/V for sequence `b`: the middle's columns are
    /// `x[x_base + col[c] + t·t_stride]`, `t < lmid`; `part` holds `⌈lmid/128⌉·cols·6` f32.
    #[allow(clippy::too_many_arguments)]
    fn compress(&self, b: usize, x: &Handle, x_len: usize, x_base: usize, t_stride: usize, lmid: usize, col: &Handle, cols: usize, coef: &Handle, ab: &Handle, part: &Handle) {
        if cols == 0 {
            return;
        }
        let c = &self.client;
        let (n, w) = (self.cfg.n_freq, self.cfg.window as u32);
        let blocks = lmid.div_ceil(TILE);
        let coef_len = self.cfg.batch * cols * 2 * n;
        let dim = CubeDim::new_1d(TILE as u32);
        crate::tensor::count_launches(3);
        // SAFETY: the host validated that the middle's rows lie inside `x`; outputs are sized for `cols`.
        unsafe {
            with_float_type!(self.cfg.dtype, E => {
                transform_kernel::launch_unchecked::<E>(c, CubeCount::Static(n.div_ceil(TILE) as u32, cols as u32, 1), dim, arg(x, x_len), arg(col, cols), arg(coef, coef_len), x_base, t_stride, lmid, b * cols * 2 * n, n, w, self.cfg.dc_weight(), TILE);
                fourier_stats_partial::launch_unchecked::<E>(c, CubeCount::Static(blocks as u32, cols as u32, 1), dim, arg(x, x_len), arg(col, cols), arg(coef, coef_len), arg(part, blocks * cols * 6), x_base, t_stride, lmid, cols, b * cols * 2 * n, n, w, TILE);
            });
            fourier_stats_finalize::launch_unchecked(
                c,
                CubeCount::Static(cols.div_ceil(TILE) as u32, 1, 1),
                dim,
                arg(part, blocks * cols * 6),
                arg(ab, self.cfg.batch * 2 * cols),
                blocks,
                cols,
                lmid,
                b * 2 * cols,
                self.cfg.ls_scale(),
                TILE,
            );
        }
    }

    /// Admits a sequence into slot `b` — a new cache's empty slot or a retired one — from its prompt's post-RoPE
    /// keys and values `k, v: [L, Hkv, D]` (token-major, contiguous from any offset), while every other sequence
    /// keeps its state (continuous batching). Forms the middle if `L > l_init + 2N + l_local`. Refused (typed,
    /// nothing launched, the cache unchanged) when `b` is beyond the batch, holds a live sequence with tokens,
    /// or the middle would exceed `T`. Admitting a prompt too short to form a middle into a re-packed cache
    /// re-grows the exact buffer (one allocation and gather); the step that forms the last middle re-packs it.
    pub fn prefill(&mut self, b: usize, k: &DeviceTensor, v: &DeviceTensor) -> Result<(), Error> {
        let (hkv, d) = (self.cfg.dims.hkv, self.cfg.dims.d);
        let (li, ll) = (self.cfg.l_init, self.cfg.l_local);
        let Some(&seq) = self.seqs.get(b) else {
            return Err(Error::Config("sequence index beyond the batch"));
        };
        if seq.active && seq.count > 0 {
            return Err(Error::Config("the slot holds a live sequence: retire it first"));
        }
        let l = k.shape.first().copied().unwrap_or(0);
        if l == 0 {
            return Err(Error::ZeroLength { batch: b });
        }
        self.check_tensor("k", k, vec![l, hkv, d])?;
        self.check_tensor("v", v, vec![l, hkv, d])?;
        crate::finite::check_inputs(&self.client, self.cfg.check_finite, &[("k", k), ("v", v)])?;
        let form = l > self.cfg.trigger();
        let lmid = if form { l - li - ll } else { 0 };
        if lmid > self.cfg.window {
            return Err(Error::LengthBeyondCapacity { batch: b, len: lmid, capacity: self.cfg.window });
        }
        if l > u32::MAX as usize / 2 {
            return Err(Error::Config("a sequence's length must stay below 2^31"));
        }
        if !form && self.x_cap <= self.cfg.trigger() {
            // It stays exact until it holds `trigger + 1` tokens.
            self.resize_exact(self.cfg.trigger() + 1);
        }
        let (x, e_len) = (self.x_cap, self.cfg.batch * hkv * self.x_cap * d);
        let n_exact = if form { li + ll } else { l };
        let (mut sr, mut dr) = (Vec::new(), Vec::new());
        for h in 0..hkv {
            for s in 0..n_exact {
                let ts = if s < li || !form { s } else { l - ll + (s - li) };
                sr.push((k.offset + (ts * hkv + h) * d) as u32);
                dr.push((((b * hkv + h) * x + s) * d) as u32);
            }
        }
        let sr_v: Vec<u32> = sr.iter().map(|&o| o - k.offset as u32 + v.offset as u32).collect();
        self.gather(&k.handle, k.buffer_len, &sr, &self.tab.ident, d, &self.ek, e_len, &dr);
        self.gather(&v.handle, v.buffer_len, &sr_v, &self.tab.ident, d, &self.ev, e_len, &dr);
        self.seqs[b] = Seq { active: true, count: l, ..Seq::default() };
        if form {
            let (t, tcap) = (&self.tab, self.cfg.window);
            let (ckn, cvn, ckc, cvc) = (t.k.n_dim.len(), t.v.n_dim.len(), t.k.c_dim.len(), t.v.c_dim.len());
            let rows = |off: usize| -> Vec<u32> { (0..lmid).map(|i| (off + (li + i) * hkv * d) as u32).collect() };
            let dst = |w: usize| -> Vec<u32> { (0..lmid).map(|i| ((b * tcap + i) * w) as u32).collect() };
            self.gather(&k.handle, k.buffer_len, &rows(k.offset), &t.kn_glob, ckn, &self.ck, self.cfg.batch * tcap * ckn, &dst(ckn));
            self.gather(&v.handle, v.buffer_len, &rows(v.offset), &t.vn_glob, cvn, &self.cv, self.cfg.batch * tcap * cvn, &dst(cvn));
            let part = alloc(&self.client, lmid.div_ceil(TILE) * ckc.max(cvc) * 6 * 4);
            self.compress(b, &k.handle, k.buffer_len, k.offset + li * hkv * d, hkv * d, lmid, &t.kc_glob, ckc, &self.coef_k, &self.ab_k, &part);
            self.compress(b, &v.handle, v.buffer_len, v.offset + li * hkv * d, hkv * d, lmid, &t.vc_glob, cvc, &self.coef_v, &self.ab_v, &part);
            self.seqs[b] = Seq { active: true, count: l, formed: true, mid_len: lmid, skip: 0, ring: 0 };
        }
        self.repack_if_due();
        self.upload_state();
        Ok(())
    }

    /// Retires sequence `b`: it stops stepping (its rows of an attend's output are zeros) and its slot can admit
    /// a new sequence with [`Self::prefill`]. Nothing is read back; a retired unformed sequence may let the exact
    /// buffer re-pack.
    pub fn retire(&mut self, b: usize) -> Result<(), Error> {
        if b >= self.cfg.batch {
            return Err(Error::Config("sequence index beyond the batch"));
        }
        self.seqs[b] = Seq::default();
        self.repack_if_due();
        self.upload_state();
        Ok(())
    }

    /// Appends one decode token per live sequence, `k, v: [B, Hkv, D]` (post-RoPE, contiguous from any offset):
    /// a formed sequence moves its oldest local token into the middle (rank-1 coefficient update, critical
    /// columns appended) and writes the new token into the freed slot; an unformed one keeps it exact and forms
    /// its middle when due. Two launches (the middle's update, then the write), no upload, no allocation, no read-back; a step that forms a middle adds
    /// the transform's launches for that sequence, and the one that forms the last live middle re-packs.
    pub fn append(&mut self, k: &DeviceTensor, v: &DeviceTensor) -> Result<(), Error> {
        let (bsz, hkv, d) = (self.cfg.batch, self.cfg.dims.hkv, self.cfg.dims.d);
        let (li, ll, tcap, trigger) = (self.cfg.l_init, self.cfg.l_local, self.cfg.window, self.cfg.trigger());
        self.check_tensor("k", k, vec![bsz, hkv, d])?;
        self.check_tensor("v", v, vec![bsz, hkv, d])?;
        for (b, s) in self.seqs.iter().enumerate() {
            let next = s.advanced(li, ll, trigger);
            if next.mid_len > tcap {
                return Err(Error::LengthBeyondCapacity { batch: b, len: next.mid_len, capacity: tcap });
            }
            if !next.formed && next.count > self.x_cap {
                return Err(Error::LengthBeyondCapacity { batch: b, len: next.count, capacity: self.x_cap });
            }
            if next.count > u32::MAX as usize / 2 {
                return Err(Error::Config("a sequence's length must stay below 2^31"));
            }
        }
        crate::finite::check_inputs(&self.client, self.cfg.check_finite, &[("k", k), ("v", v)])?;
        let x = self.x_cap;
        let e_len = bsz * hkv * x * d;
        let (ckn, cvn, ckc, cvc) = (self.tab.k.n_dim.len(), self.tab.v.n_dim.len(), self.tab.k.c_dim.len(), self.tab.v.c_dim.len());
        let c = self.client.clone();
        let n = self.cfg.n_freq;
        let (cur, next) = (self.state_base(), (1 - self.cur) * ST_ROWS * bsz);
        let parts = self.append_parts;
        crate::tensor::count_launches(2);
        // SAFETY: slots and middle rows are bounded by the state the host mirror validated above; the tables
        // were built from the validated dim lists. The write runs after the update (stream order).
        unsafe {
            with_float_type!(self.cfg.dtype, E => {
                fourier_append::launch_unchecked::<E>(&c, CubeCount::Static(hkv as u32, bsz as u32, parts as u32), CubeDim::new_1d(TILE as u32),
                    arg(&self.ek, e_len), arg(&self.ev, e_len),
                    arg(&self.ck, bsz * tcap * ckn), arg(&self.cv, bsz * tcap * cvn), arg(&self.coef_k, bsz * ckc * 2 * n), arg(&self.coef_v, bsz * cvc * 2 * n),
                    arg(&self.state, self.state_len()), 2 * ST_ROWS * bsz,
                    cur, next, bsz, hkv, x, tcap, li, ll, trigger, ckc, ckn, cvc, cvn, self.cfg.window as u32, self.cfg.dc_weight(), d, n, TILE);
                fourier_append_write::launch_unchecked::<E>(&c, CubeCount::Static(hkv as u32, bsz as u32, 1), CubeDim::new_1d(TILE as u32),
                    arg(&k.handle, k.buffer_len), arg(&v.handle, v.buffer_len), arg(&self.ek, e_len), arg(&self.ev, e_len), arg(&self.state, self.state_len()),
                    k.offset, v.offset, cur, bsz, hkv, x, li, d, TILE);
            })
        }
        if self.checked.load(std::sync::atomic::Ordering::Relaxed) & 1 == 0 {
            let st = DeviceTensor { handle: self.state.clone(), buffer_len: self.state_len(), shape: vec![self.state_len()], strides: vec![1], offset: 0, dtype: DType::U32 };
            crate::tensor::check_written(&c, &[&st])?;
            self.checked.fetch_or(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.cur = 1 - self.cur;
        for b in 0..bsz {
            let (was, now) = (self.seqs[b], self.seqs[b].advanced(li, ll, trigger));
            self.seqs[b] = now;
            if now.formed && !was.formed {
                // Form the middle from the exact rows [l_init, count − l_local) of this sequence.
                let base = b * hkv * x * d;
                let t = &self.tab;
                for (src, col, cols, dst) in [(&self.ek, &t.kn_x, ckn, &self.ck), (&self.ev, &t.vn_x, cvn, &self.cv)] {
                    if cols == 0 {
                        continue;
                    }
                    crate::tensor::count_launches(1);
                    // SAFETY: rows [l_init, l_init + mid) of sequence b's exact rows, into its first `mid` middle rows.
                    unsafe {
                        with_float_type!(self.cfg.dtype, E => fourier_gather_strided::launch_unchecked::<E>(&c, CubeCount::Static(cols.div_ceil(TILE) as u32, now.mid_len as u32, 1), CubeDim::new_1d(TILE as u32),
                            arg(src, e_len), arg(col, cols), arg(dst, bsz * tcap * cols), base + li * d, d, b * tcap * cols, cols, cols, TILE))
                    }
                }
                self.compress(b, &self.ek, e_len, base + li * d, d, now.mid_len, &t.kc_x, ckc, &self.coef_k, &self.ab_k, &self.scratch.stats);
                self.compress(b, &self.ev, e_len, base + li * d, d, now.mid_len, &t.vc_x, cvc, &self.coef_v, &self.ab_v, &self.scratch.stats);
            }
        }
        if self.repack_if_due() {
            self.upload_state();
        }
        Ok(())
    }

    /// Once every live sequence has formed its middle, re-packs the exact rows to `l_init + l_local` per head.
    /// Returns whether it did (the device state must then be uploaded).
    fn repack_if_due(&mut self) -> bool {
        let x_new = self.cfg.l_init + self.cfg.l_local;
        if self.x_cap == x_new || !self.seqs.iter().all(|s| s.formed || !s.active) {
            return false;
        }
        self.resize_exact(x_new);
        true
    }

    /// Moves the exact rows to a buffer of `x_new` rows per (sequence, head): a formed sequence's init and local
    /// rows to slots `0..l_init + l_local` (its ring then starts right after the init rows), an unformed one's
    /// rows unchanged. The caller uploads the state.
    fn resize_exact(&mut self, x_new: usize) {
        let (li, ll) = (self.cfg.l_init, self.cfg.l_local);
        let (bsz, hkv, d, e) = (self.cfg.batch, self.cfg.dims.hkv, self.cfg.dims.d, self.cfg.dtype.size());
        let (mut sr, mut dr) = (Vec::new(), Vec::new());
        for (b, s) in self.seqs.iter().enumerate().filter(|(_, s)| s.active) {
            let rows = if s.formed { li + ll } else { s.count };
            for h in 0..hkv {
                for sl in 0..rows {
                    let from = if s.formed && sl >= li { sl + s.skip } else { sl };
                    sr.push((((b * hkv + h) * self.x_cap + from) * d) as u32);
                    dr.push((((b * hkv + h) * x_new + sl) * d) as u32);
                }
            }
        }
        let (old_len, new_len) = (bsz * hkv * self.x_cap * d, bsz * hkv * x_new * d);
        let (nk, nv) = (alloc(&self.client, new_len * e), alloc(&self.client, new_len * e));
        self.gather(&self.ek, old_len, &sr, &self.tab.ident, d, &nk, new_len, &dr);
        self.gather(&self.ev, old_len, &sr, &self.tab.ident, d, &nv, new_len, &dr);
        self.ek = nk;
        self.ev = nv;
        self.x_cap = x_new;
        for s in &mut self.seqs {
            s.skip = 0;
        }
        self.set_x_tables();
    }

    /// **Benchmarks only**: puts every sequence in the formed state with `len` tokens (middle
    /// `len − l_init − l_local`) and fills the exact rows, critical columns, coefficients and stats with random
    /// values on the device, without the cost of a prefill transform. The shapes, lengths and bytes are those a
    /// real prefill would leave; the values are not (decode timing does not depend on them). Correctness is
    /// tested through [`Self::prefill`] and [`Self::append`].
    #[doc(hidden)]
    pub fn synthetic_formed(&mut self, len: usize, seed: u32) -> Result<(), Error> {
        let (li, ll, t) = (self.cfg.l_init, self.cfg.l_local, self.cfg.window);
        if len <= self.cfg.trigger() || len - li - ll > t {
            return Err(Error::LengthBeyondCapacity { batch: 0, len, capacity: t + li + ll });
        }
        let (bsz, hkv, d, dt) = (self.cfg.batch, self.cfg.dims.hkv, self.cfg.dims.d, self.cfg.dtype);
        let (ckn, cvn, ckc, cvc) = (self.tab.k.n_dim.len(), self.tab.v.n_dim.len(), self.tab.k.c_dim.len(), self.tab.v.c_dim.len());
        let n2 = 2 * self.cfg.n_freq;
        let c = &self.client;
        let rnd = |n: usize, dtype: DType, s: u32, amp: f32| crate::util::random(c, &[n.max(1)], dtype, seed.wrapping_mul(16).wrapping_add(s), amp).map(|t| t.handle);
        // Everything is allocated before anything is replaced, so a refusal leaves the cache as it was.
        let x_cap = li + ll;
        let fresh = [
            rnd(bsz * hkv * x_cap * d, dt, 1, 1.5)?,
            rnd(bsz * hkv * x_cap * d, dt, 2, 1.0)?,
            rnd(bsz * t * ckn, dt, 3, 1.5)?,
            rnd(bsz * t * cvn, dt, 4, 1.0)?,
            rnd(bsz * ckc * n2, DType::F32, 5, 1.0)?,
            rnd(bsz * cvc * n2, DType::F32, 6, 1.0)?,
            rnd(bsz * 2 * ckc, DType::F32, 7, 0.01)?,
            rnd(bsz * 2 * cvc, DType::F32, 8, 0.01)?,
        ];
        self.x_cap = x_cap;
        [self.ek, self.ev, self.ck, self.cv, self.coef_k, self.coef_v, self.ab_k, self.ab_v] = fresh;
        let mid = len - li - ll;
        self.seqs = vec![Seq { active: true, count: len, formed: true, mid_len: mid, skip: 0, ring: 0 }; bsz];
        self.set_x_tables();
        self.upload_state();
        Ok(())
    }

    /// Decode attention of one query token per sequence, `q: [B, 1, Hq, D]` (post-RoPE) → `o: [B, 1, Hq, D]`,
    /// `softmax(scale·q·K̃ᵀ)·Ṽ` over every token the cache represents (a retired slot's rows are zeros). The
    /// output is the cache's own buffer, overwritten by the next attend. Spectral: 3 launches (projection,
    /// split, combine), no allocation, no upload; FFT: 6 (projection, transform, scores, split, moments,
    /// combine), no allocation, no upload; direct: 5, with a per-call reconstruction scratch (and a copy of the
    /// basis into it). Before a middle is formed every path is the same exact attention.
    pub fn attend(&self, q: &DeviceTensor, scale: f32, path: FourierPath) -> Result<DeviceTensor, Error> {
        self.check_query(q)?;
        self.attend_checked(q, scale, path)
    }

    /// [`Self::attend`] of a query [`Self::check_query`] accepted.
    fn attend_checked(&self, q: &DeviceTensor, scale: f32, path: FourierPath) -> Result<DeviceTensor, Error> {
        let (bsz, hq, hkv, d) = (self.cfg.batch, self.cfg.hq, self.cfg.dims.hkv, self.cfg.dims.d);
        if !scale.is_finite() {
            return Err(Error::Config("the softmax scale must be finite"));
        }
        if let Some(b) = self.seqs.iter().position(|s| s.active && s.count == 0) {
            return Err(Error::ZeroLength { batch: b });
        }
        let c = &self.client;
        let g = hq / hkv;
        let (li, ll, n) = (self.cfg.l_init, self.cfg.l_local, self.cfg.n_freq);
        let tile = self.tile;
        let live = || self.seqs.iter().filter(|s| s.active);
        let max_x = live().map(|s| if s.formed { li + ll } else { s.count }).max().unwrap_or(0);
        let max_m = live().map(|s| s.mid_len).max().unwrap_or(0);
        let seg_max = self.scratch.seg_max;
        let split = |len: usize| -> (usize, usize) {
            if len == 0 {
                return (0, tile);
            }
            let want = seg_max.min(len.div_ceil(tile)).max(1);
            let chunk = len.div_ceil(want).div_ceil(tile) * tile;
            (len.div_ceil(chunk), chunk)
        };
        let (mut sx, chunk_x) = split(max_x);
        // The FFT path's middle splits are its blocks (the moments kernel turns each split's scores into the
        // split's frequency partials).
        let fft = match (path, self.scratch.fft) {
            (FourierPath::Fft, None) => {
                return Err(Error::DeviceLimit(format!(
                    "the FFT path needs 8·F bytes of shared memory for its transform length F ≥ 4N = {} (and at most 65535 query rows B·Hq); the device has {} B",
                    4 * n,
                    self.client.properties().hardware.max_shared_memory_size
                )))
            }
            (FourierPath::Fft, Some(f)) if max_m > 0 => Some(f),
            _ => None,
        };
        let (sm, chunk_m) = match fft {
            Some(f) => (max_m.div_ceil(f.q), f.q),
            None => split(max_m),
        };
        // At least one split, so that every query row is written (zeros when nothing is live).
        sx = sx.max(1);
        let st = sx + sm;
        let spectral = path != FourierPath::Direct && max_m > 0;
        let (ckn, cvn, ckc, cvc) = (self.tab.k.n_dim.len(), self.tab.v.n_dim.len(), self.tab.k.c_dim.len(), self.tab.v.c_dim.len());
        let (tcap, w) = (self.cfg.window, self.cfg.window as u32);
        let n2 = 2 * n;
        let e_len = bsz * hkv * self.x_cap * d;
        let fcfg = FlashConfig { d, g, tile, n_freq: n, spectral, fft: fft.is_some(), plane: self.plane };
        let dim = CubeDim::new_1d(tile as u32);
        let sb = self.state_base();
        let s = &self.scratch;
        // The f32 scratch: the cache's own (spectral), or on the direct path a per-call buffer of the same layout
        // with room for the reconstruction (K then V) and a copy of the basis.
        let tm = max_m.max(1);
        let basis_len = 4 * n * tile;
        let (work, at, mlen) = if max_m > 0 && !spectral {
            let mlen = bsz * hkv * tm * d;
            let at = Work::new(basis_len, 0, 0, bsz, hkv, g, d, n2, (s.seg_max + s.s_mid, s.s_mid), 0, 2 * mlen);
            let work = alloc(c, at.len * 4);
            crate::tensor::count_launches(1);
            // SAFETY: the basis is the first `basis_len` elements of both buffers.
            unsafe {
                copy_range::launch_unchecked::<f32>(
                    c,
                    CubeCount::Static(basis_len.div_ceil(256).min(65535) as u32, 1, 1),
                    CubeDim::new_1d(256),
                    arg(&s.work, s.at.len),
                    arg(&work, at.len),
                    0,
                    0,
                    basis_len,
                );
            }
            let count = CubeCount::Static(max_m.div_ceil(tile) as u32, (hkv * d) as u32, bsz as u32);
            for (crit, ncrit, coef, ab, dmap, cols, out_base) in
                [(&self.ck, ckn, &self.coef_k, &self.ab_k, &self.tab.dmap_k, ckc, at.mkv), (&self.cv, cvn, &self.coef_v, &self.ab_v, &self.tab.dmap_v, cvc, at.mkv + mlen)]
            {
                crate::tensor::count_launches(1);
                // SAFETY: tokens below each sequence's middle length, columns from the validated dim tables.
                unsafe {
                    with_float_type!(self.cfg.dtype, E => fourier_reconstruct::launch_unchecked::<E>(c, count.clone(), dim, arg(crit, bsz * tcap * ncrit), arg(coef, bsz * cols * n2), arg(ab, bsz * 2 * cols), arg(dmap, hkv * d), arg(&self.state, self.state_len()), arg(&work, at.len), sb + ST_MID * bsz, out_base, hkv, d, tcap, ncrit.max(1), tm, cols, n, w, tile))
                }
            }
            (work, at, mlen)
        } else {
            (s.work.clone(), s.at, 1)
        };
        let cols_at = 2 * ST_ROWS * bsz;
        if spectral {
            crate::tensor::count_launches(1);
            // SAFETY: reads the group's query rows and the head's compressed K columns; writes `[B, Hq, 2N]`, `[B, Hq]`.
            unsafe {
                with_float_type!(self.cfg.dtype, E => fourier_project::launch_unchecked::<E>(c, CubeCount::Static(n2.div_ceil(TILE) as u32, hkv as u32, (PCHUNKS * bsz) as u32), CubeDim::new_1d(TILE as u32), arg(&q.handle, q.buffer_len), arg(&self.coef_k, bsz * ckc * n2), arg(&self.ab_k, bsz * 2 * ckc), arg(&self.state, self.state_len()), arg(&work, at.len), cols_at, at.pq, at.qb, bsz, hkv, ckc, n, g, d, TILE))
            }
        }
        let (ff, sc_at, tq) = match fft {
            Some(f) => (at.fft, at.fft + f.sc, f.tq),
            None => (0, 0, 0),
        };
        if let Some(f) = fft {
            crate::tensor::count_launches(2);
            // SAFETY: row `r < B·Hq` of the projections; the transforms and blocks inside the FFT region (sized
            // for `B·Hq` rows and `blocks ≥ ⌈max_m/Q⌉`).
            unsafe {
                fourier_fft_prep::launch_unchecked(
                    c,
                    CubeCount::Static((bsz * hq) as u32, 1, 1),
                    CubeDim::new_1d(f.cfg.threads as u32),
                    arg(&work, at.len),
                    at.pq,
                    ff + f.ch,
                    ff + f.tw,
                    ff + f.ah,
                    bsz,
                    hq,
                    n,
                    f.cfg,
                );
                fourier_fft_scores::launch_unchecked(
                    c,
                    CubeCount::Static(sm as u32, (bsz * hq) as u32, 1),
                    CubeDim::new_1d(f.cfg.threads as u32),
                    arg(&work, at.len),
                    ff + f.ah,
                    ff + f.bh,
                    ff + f.ch,
                    ff + f.tw,
                    sc_at,
                    tq,
                    f.q,
                    n,
                    tcap,
                    f.cfg,
                );
            }
        }
        let out = &s.out;
        crate::tensor::count_launches(2);
        // SAFETY: every index is bounded by the per-sequence lengths in `state` (validated against the buffers'
        // capacities when tokens were added) and the partials (allocated for `2·seg_max` splits) by the grid.
        unsafe {
            with_float_type!(self.cfg.dtype, E => {
                fourier_split::launch_unchecked::<E>(c, CubeCount::Static(st as u32, hkv as u32, bsz as u32), dim,
                    arg(&q.handle, q.buffer_len), arg(&self.ek, e_len), arg(&self.ev, e_len), arg(&self.state, self.state_len()),
                    arg(&self.ck, bsz * tcap * ckn), arg(&self.cv, bsz * tcap * cvn), arg(&work, at.len),
                    sb, at.mkv, at.pq, at.o, at.ml, at.sp, mlen, cols_at + hkv + 1 + ckc, cols_at + 2 * (hkv + 1) + ckc + ckn + hkv + 1 + cvc, at.qb, sc_at, tq, bsz, hkv, li, self.x_cap, tcap, tm, ckn.max(1), cvn.max(1), chunk_x, chunk_m, sx, sm, w, scale, fcfg);
                if let Some(f) = fft {
                    crate::tensor::count_launches(1);
                    fourier_fft_moments::launch_unchecked(c, CubeCount::Static(sm as u32, (bsz * hq) as u32, 1), CubeDim::new_1d(f.cfg.threads as u32), arg(&work, at.len), arg(&self.state, self.state_len()),
                        sb + ST_MID * bsz, ff + f.cm, ff + f.ch, ff + f.tw, sc_at, at.ml, at.sp, tq, f.q, n, hq, g, sx, sm, f.cfg);
                }
                fourier_combine::launch_unchecked::<E>(c, CubeCount::Static(hkv as u32, (bsz * g) as u32, 1), dim,
                    arg(&work, at.len), arg(&self.coef_v, bsz * cvc * n2), arg(&self.ab_v, bsz * 2 * cvc), arg(&self.tab.dmap_v, hkv * d),
                    arg(&out.handle, out.buffer_len), at.o, at.ml, at.sp, hkv, sx, sm, cvc, fcfg);
            })
        }
        let bit = match (spectral, fft.is_some()) {
            (_, true) => 8,
            (true, false) => 4,
            _ => 2,
        };
        if self.checked.load(std::sync::atomic::Ordering::Relaxed) & bit == 0 || !spectral {
            crate::tensor::check_written(c, &[out])?;
            self.checked.fetch_or(bit, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(out.clone())
    }

    /// The query of [`FourierLayerCache::attend`]: `[B, 1, Hq, D]`, contiguous from its buffer's start (the decode
    /// kernels index it from there: a view with an offset is refused), finite when the config checks.
    fn check_query(&self, q: &DeviceTensor) -> Result<(), Error> {
        let (bsz, hq, d) = (self.cfg.batch, self.cfg.hq, self.cfg.dims.d);
        self.check_tensor("q", q, vec![bsz, 1, hq, d])?;
        if q.offset != 0 {
            return Err(Error::Layout { tensor: "q", reason: "must start at its buffer's start (offset 0)" });
        }
        crate::finite::check_inputs(&self.client, self.cfg.check_finite, &[("q", q)])
    }
}

/// The common cache interface: a step appends the token (post-RoPE keys) and attends with scale `1/√D` by
/// [`FourierLayerCache::step_path`] — the FFT path where the device holds its transform (eight launches: the
/// append's update and write, projection, transform, scores, split, moments, combine), else the spectral sums
/// (five) — with no allocation, upload or read-back once every live middle is formed; the output is the cache's
/// own buffer, overwritten by the next step. FourierAttention keeps every token, so the kept positions are all of
/// them and the capacity is `l_init + T + l_local` per sequence.
impl crate::policy::CompressedKvCache for FourierLayerCache {
    fn step(&mut self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Result<DeviceTensor, Error> {
        // Validate the query before the append so that a bad query leaves the cache unchanged.
        self.check_query(q)?;
        self.append(k, v)?;
        self.attend_checked(q, 1.0 / (self.cfg.dims.d as f32).sqrt(), self.step_path())
    }
    fn len(&self) -> usize {
        self.seqs.iter().map(|s| s.count).max().unwrap_or(0)
    }
    fn capacity(&self) -> usize {
        self.cfg.l_init + self.cfg.window + self.cfg.l_local
    }
    fn physical_bytes(&self) -> usize {
        FourierLayerCache::physical_bytes(self)
    }
    fn kept_positions(&self) -> Result<Vec<Vec<Vec<usize>>>, Error> {
        Ok(self.seqs.iter().map(|s| vec![(0..s.count).collect(); self.cfg.dims.hkv]).collect())
    }
}

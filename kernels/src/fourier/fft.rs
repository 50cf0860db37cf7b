//! FourierAttention's FFT spectral path (issue 16; reference `kvsqueeze_reference::fourier::fft`): the middle
//! tokens' compressed score parts and the value side's moments by Bluestein convolutions done as short FFTs in
//! shared memory, instead of evaluating the `N`-term trigonometric sums at every token.
//!
//! ## Math (`ω = 2π/T`, `w = e^{iω}`, chirp `ch(m) = w^{m²/2} = e^{iπ·(m² mod 2T)/T}`, exact in integers)
//! - Scores: `s_t = Σ_{n<N} X[n]·w^{nt}` with `X[n] = (pc[n] − i·ps[n])/N` (so `Re s_t = (1/N)Σ pc cos + ps sin`).
//!   `nt = (n² + t² − (t − n)²)/2` gives `s_t = ch(t)·Σ_n (X[n]·ch(n))·conj(ch(t − n))`: a convolution with the
//!   chirp. Block `j` of `Q = F − N + 1` outputs, `t = jQ + i`, needs the chirp at lags `jQ − N + 1 + k`,
//!   `k < F`: one circular convolution of length `F` (no wrap reaches the outputs `k ≥ N − 1`):
//!   `s_{jQ+i} = Re(ch(t)·y[i + N − 1])`, `y = IDFT(DFT(a)·B̂_j)/F`, `a[n] = X[n]·ch(n)`, `b_j[k] = conj(ch(jQ − N + 1 + k))`.
//! - Moments: `M[n] = Σ_t p_t·w^{−nt} = conj(ch(n))·Σ_t (p_t·conj(ch(t)))·ch(n − t)`. Block `j` of inputs
//!   `t = jQ + i`, `i < Q`, contributes to every `n < N` through lags `n − t`: `M_j[n] = conj(ch(n))·z[n + Q − 1]`,
//!   `z = IDFT(DFT(u)·Ĉ_j)/F`, `u[i] = p_t·conj(ch(t))`, `c_j[k] = ch(k − jQ − Q + 1)`. Then
//!   `(Σ p cos, Σ p sin)(ωnt) = (Re M, −Im M)`.
//! - The forward transforms run decimation-in-frequency (natural order in, bit-reversed out) and the inverses
//!   decimation-in-time (bit-reversed in, natural out), so no permutation is ever done: the host stores the chirp
//!   spectra `B̂_j/F`, `Ĉ_j/F` (f64, rounded once) in bit-reversed order, and every pointwise product pairs
//!   equal positions.
//!
//! ## Layout (regions of the decode scratch `work`, f32, element offsets passed as scalars)
//! `tw`: `(cos, sin)(2πj/F)`, `j < F/2`; `ch`: `ch(m)` for `m < max(T, N)` as `(re, im)` pairs; `bh`, `cm`:
//! `[blocks, F]` complex; `ah`: `DFT(a)` per query row `[B·Hq, F]` complex; `sc`: `[B·Hq, tq]` scores
//! (compressed part from [`fourier_fft_scores()`], the full score once [`super::fourier_split()`] has read it).

use super::PCHUNKS;
use cubecl::prelude::*;

/// Comptime shape of the FFT kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FftConfig {
    /// Transform length `F` (a power of two, at least 2).
    pub size: usize,
    /// Threads per cube.
    pub threads: usize,
}

impl FftConfig {
    fn stages(&self) -> usize {
        self.size.trailing_zeros() as usize
    }
}

/// In place over `F` complex values in shared memory: `X[k] = Σ_j x[j]·e^{−2πi·jk/F}`, natural order in,
/// bit-reversed order out (decimation in frequency, unnormalised). Ends with a cube barrier.
#[cube]
fn fft_dif(re: &mut Shared<[f32]>, im: &mut Shared<[f32]>, work: &mut [f32], tw_at: usize, #[comptime] cfg: FftConfig) {
    let t = UNIT_POS as usize;
    let half_f = comptime![cfg.size / 2];
    // `.runtime()`: a `let mut` initialised from a comptime value stays a comptime constant in cubecl 0.11, and its
    // updates in a runtime loop then fail validation ("Expected operand type cube.ptr, but found cube.index").
    let mut half = half_f.runtime();
    let mut step = 1usize.runtime();
    for _s in 0..comptime![cfg.stages()] {
        for r in 0..comptime![(cfg.size / 2).div_ceil(cfg.threads)] {
            let bi = r * comptime![cfg.threads] + t;
            if bi < half_f {
                let k = bi % half;
                let i0 = (bi - k) * 2 + k;
                let i1 = i0 + half;
                let ar = re[i0];
                let ai = im[i0];
                let br = re[i1];
                let bim = im[i1];
                re[i0] = ar + br;
                im[i0] = ai + bim;
                let dr = ar - br;
                let di = ai - bim;
                let j = k * step;
                let c = work[tw_at + 2 * j];
                let s = work[tw_at + 2 * j + 1];
                re[i1] = dr * c + di * s;
                im[i1] = di * c - dr * s;
            }
        }
        sync_cube();
        half /= 2;
        step *= 2;
    }
}

/// In place: `x[j] = Σ_k X[k]·e^{+2πi·jk/F}`, bit-reversed order in, natural order out (decimation in time,
/// unnormalised). Starts and ends with a cube barrier.
#[cube]
fn ifft_dit(re: &mut Shared<[f32]>, im: &mut Shared<[f32]>, work: &mut [f32], tw_at: usize, #[comptime] cfg: FftConfig) {
    let t = UNIT_POS as usize;
    let half_f = comptime![cfg.size / 2];
    let mut half = 1usize.runtime();
    let mut step = half_f.runtime();
    sync_cube();
    for _s in 0..comptime![cfg.stages()] {
        for r in 0..comptime![(cfg.size / 2).div_ceil(cfg.threads)] {
            let bi = r * comptime![cfg.threads] + t;
            if bi < half_f {
                let k = bi % half;
                let i0 = (bi - k) * 2 + k;
                let i1 = i0 + half;
                let j = k * step;
                let c = work[tw_at + 2 * j];
                let s = work[tw_at + 2 * j + 1];
                let br0 = re[i1];
                let bi0 = im[i1];
                let br = br0 * c - bi0 * s;
                let bim = br0 * s + bi0 * c;
                let ar = re[i0];
                let ai = im[i0];
                re[i0] = ar + br;
                im[i0] = ai + bim;
                re[i1] = ar - br;
                im[i1] = ai - bim;
            }
        }
        sync_cube();
        half *= 2;
        step /= 2;
    }
}

/// Score side, step 1: per query row `r = b·Hq + hq` (grid `(B·Hq)`), `ah[r] = DFT(a)` (bit-reversed) with
/// `a[n] = ch(n)·(pc[n] − i·ps[n])/N` for `n < N`, 0 up to `F`; `pc`, `ps` are the projections of
/// [`super::fourier_project()`] summed over its [`PCHUNKS`] column slices.
#[cube(launch_unchecked)]
pub fn fourier_fft_prep(work: &mut [f32], pq_at: usize, ch_at: usize, tw_at: usize, ah_at: usize, batch: usize, hq: usize, n_freq: usize, #[comptime] cfg: FftConfig) {
    let t = UNIT_POS as usize;
    let r = CUBE_POS_X as usize;
    let b = r / hq;
    let hi = r % hq;
    let mut re = Shared::<[f32]>::new_slice(cfg.size);
    let mut im = Shared::<[f32]>::new_slice(cfg.size);
    let inv_n = 1.0f32 / f32::cast_from(n_freq);
    for i in 0..comptime![cfg.size.div_ceil(cfg.threads)] {
        let n = i * comptime![cfg.threads] + t;
        if n < comptime![cfg.size] {
            let mut xr = 0.0f32.runtime();
            let mut xi = 0.0f32.runtime();
            if n < n_freq {
                let mut pc = 0.0f32.runtime();
                let mut ps = 0.0f32.runtime();
                #[unroll]
                for part in 0..PCHUNKS {
                    let row = ((part * batch + b) * hq + hi) * 2 * n_freq;
                    pc += work[pq_at + row + n];
                    ps += work[pq_at + row + n_freq + n];
                }
                let c = work[ch_at + 2 * n];
                let s = work[ch_at + 2 * n + 1];
                // (pc − i·ps)·(c + i·s)
                xr = (pc * c + ps * s) * inv_n;
                xi = (pc * s - ps * c) * inv_n;
            }
            re[n] = xr;
            im[n] = xi;
        }
    }
    sync_cube();
    fft_dif(&mut re, &mut im, work, tw_at, cfg);
    let base = ah_at + r * 2 * comptime![cfg.size];
    for i in 0..comptime![cfg.size.div_ceil(cfg.threads)] {
        let k = i * comptime![cfg.threads] + t;
        if k < comptime![cfg.size] {
            work[base + 2 * k] = re[k];
            work[base + 2 * k + 1] = im[k];
        }
    }
}

/// Score side, step 2: grid `(blocks, B·Hq)`; block `j` of row `r` writes the compressed score parts
/// `sc[r·tq + t] = Re(ch(t)·y[t − jQ + N − 1])`, `y = IDFT(ah[r]·bh[j])`, for `t = jQ + i < T`, `i < Q`.
#[cube(launch_unchecked)]
pub fn fourier_fft_scores(work: &mut [f32], ah_at: usize, bh_at: usize, ch_at: usize, tw_at: usize, sc_at: usize, tq: usize, q_len: usize, n_freq: usize, window: usize, #[comptime] cfg: FftConfig) {
    let t = UNIT_POS as usize;
    let j = CUBE_POS_X as usize;
    let r = CUBE_POS_Y as usize;
    let f = comptime![cfg.size];
    let mut re = Shared::<[f32]>::new_slice(cfg.size);
    let mut im = Shared::<[f32]>::new_slice(cfg.size);
    let abase = ah_at + r * 2 * f;
    let bbase = bh_at + j * 2 * f;
    for i in 0..comptime![cfg.size.div_ceil(cfg.threads)] {
        let k = i * comptime![cfg.threads] + t;
        if k < f {
            let ar = work[abase + 2 * k];
            let ai = work[abase + 2 * k + 1];
            let br = work[bbase + 2 * k];
            let bi = work[bbase + 2 * k + 1];
            re[k] = ar * br - ai * bi;
            im[k] = ar * bi + ai * br;
        }
    }
    ifft_dit(&mut re, &mut im, work, tw_at, cfg);
    for i in 0..comptime![cfg.size.div_ceil(cfg.threads)] {
        let k = i * comptime![cfg.threads] + t;
        let tt = j * q_len + k;
        if k < q_len && tt < window {
            let y = k + n_freq - 1;
            let c = work[ch_at + 2 * tt];
            let s = work[ch_at + 2 * tt + 1];
            work[sc_at + r * tq + tt] = c * re[y] - s * im[y];
        }
    }
}

/// Value side: grid `(S_m, B·Hq)`; middle split `j` (tokens `jQ..jQ + Q` of its sequence) of query row `r`
/// (`b`, KV head `h`, group member `gi`) turns its scores `sc` (full, written by [`super::fourier_split()`]) into
/// `p_t = exp(s_t − m_j)` with the split's maximum `m_j` from `ml_part`, and writes the split's moments
/// `sp_part[((b·Hkv + h)·S_m + j)·G + gi] = (Σ p cos(ωnt), Σ p sin(ωnt))`, `n < N`, the partials
/// [`super::fourier_combine()`] merges (zeros for a split past the sequence's middle).
#[cube(launch_unchecked)]
pub fn fourier_fft_moments(
    work: &mut [f32],
    ints: &[u32],
    mid_at: usize,
    cm_at: usize,
    ch_at: usize,
    tw_at: usize,
    sc_at: usize,
    ml_at: usize,
    sp_at: usize,
    tq: usize,
    q_len: usize,
    n_freq: usize,
    hq: usize,
    g: usize,
    sx: usize,
    sm: usize,
    #[comptime] cfg: FftConfig,
) {
    let t = UNIT_POS as usize;
    let j = CUBE_POS_X as usize;
    let r = CUBE_POS_Y as usize;
    let f = comptime![cfg.size];
    let b = r / hq;
    let hi = r % hq;
    let hkv = hq / g;
    let h = hi / g;
    let gi = hi % g;
    let len = ints[mid_at + b] as usize;
    let m = work[ml_at + (((b * hkv + h) * (sx + sm) + sx + j) * g + gi) * 2];
    let mut re = Shared::<[f32]>::new_slice(cfg.size);
    let mut im = Shared::<[f32]>::new_slice(cfg.size);
    for i in 0..comptime![cfg.size.div_ceil(cfg.threads)] {
        let k = i * comptime![cfg.threads] + t;
        if k < f {
            let tt = j * q_len + k;
            let mut ur = 0.0f32.runtime();
            let mut ui = 0.0f32.runtime();
            if k < q_len && tt < len {
                let p = f32::exp(work[sc_at + r * tq + tt] - m);
                // p·conj(ch(t))
                ur = p * work[ch_at + 2 * tt];
                ui = -p * work[ch_at + 2 * tt + 1];
            }
            re[k] = ur;
            im[k] = ui;
        }
    }
    sync_cube();
    fft_dif(&mut re, &mut im, work, tw_at, cfg);
    let cbase = cm_at + j * 2 * f;
    for i in 0..comptime![cfg.size.div_ceil(cfg.threads)] {
        let k = i * comptime![cfg.threads] + t;
        if k < f {
            let ar = re[k];
            let ai = im[k];
            let br = work[cbase + 2 * k];
            let bi = work[cbase + 2 * k + 1];
            re[k] = ar * br - ai * bi;
            im[k] = ar * bi + ai * br;
        }
    }
    ifft_dit(&mut re, &mut im, work, tw_at, cfg);
    let two_n = 2 * n_freq;
    let obase = sp_at + (((b * hkv + h) * sm + j) * g + gi) * two_n;
    for i in 0..comptime![cfg.size.div_ceil(cfg.threads)] {
        let n = i * comptime![cfg.threads] + t;
        if n < n_freq {
            let z = n + q_len - 1;
            let zr = re[z];
            let zi = im[z];
            let c = work[ch_at + 2 * n];
            let s = work[ch_at + 2 * n + 1];
            // conj(ch(n))·z = (c − i·s)(zr + i·zi)
            let mr = c * zr + s * zi;
            let mi = c * zi - s * zr;
            work[obase + n] = mr;
            work[obase + n_freq + n] = -mi;
        }
    }
}

//! The GGUF llama (SmolLM2-135M) as a burn model on burn's CubeCL backend, with every layer's attention through
//! one of our caches ([`CompressedKvCache::step`]) — the engine embedding of issue 14, on CUDA, wgpu or the CPU
//! runtime, whichever [`crate::runtime::device`] opened.
//!
//! Everything stays on the device: the token ids, the positions, the hidden states. A decode step is burn's
//! launches (embedding row, RMSNorm, projections, SwiGLU, output head) and the caches' own; q, k, v reach a cache
//! as [`from_burn`] views of burn's tensors and its output comes back through [`to_burn`], without a copy. Nothing
//! is read back by [`BurnModel::step`]: the caller decides what to read (the sampled tokens, a step's NLL) and
//! when (`generate` and the stream protocol read in blocks).
//!
//! ## Layout and RoPE
//! Weights are dequantized to f32 once at load and stored as `[in, out]` so that a projection is one matmul of
//! the `[B, in]` rows. The GGUF's Q/K rows pair dims `2i, 2i+1` (llama.cpp's permutation); here their rows are
//! reordered per head to `even dims, then odd dims`, the rotate-half layout our kernels use, so that one layout
//! serves both RoPE places (a consistent permutation of q and k leaves every score unchanged):
//! - the model rotates q and k at their true positions (a [`RopeTable`] segment of any base, e.g. LongLLaDA's
//!   NTK-scaled one) and the cache stores rotated keys — Full, H2O, TOVA;
//! - or q and k go unrotated (the table's identity segment) to a cache built `with_rope`, which rotates inside
//!   attention by cache rank — StreamingLLM, TreeKV, WeightedKV.
//!
//! Caches of different policies, budgets and RoPE places can share one batch ([`CacheGroup`]: consecutive rows
//! per cache): the model's launches are shared, which is what makes the stream protocol over every cache one
//! pass.
//!
//! The rotation is `q·cos + (q R)·sin` with `R` the rotate-half matrix folded into a second copy of the Q/K
//! weights at load (`W R`), so RoPE costs wider matmul columns and two multiplies instead of slices and a concat.
//! Q, Q R, K, K R and V are one matmul of the stacked weights, gate and up another.
//!
//! ## Launches
//! A plain step issues about 30 launches per layer, plus each cache's three or four. [`BurnModel::step_graphed`]
//! (and [`Stepper`]) replays a whole step — the model's launches and the caches' — from one device graph (two,
//! one per parity of the caches' double-buffered state) recorded at the first step.

use super::model::ModelConfig;
use crate::burn::{from_burn, to_burn};
use crate::policy::CompressedKvCache;
use crate::tensor::DType;
use crate::{DeviceTensor, Error};
use burn_backend::ops::BoolTensorOps;
use burn_backend::ops::{ActivationOps, FloatTensorOps, IntTensorOps};
use burn_backend::{BoolStore, FloatDType, IntDType, Scalar, Shape, Slice, TensorData};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend as Cb;
use candle_core::quantized::gguf_file::Content;
use cubecl::client::Graph;
use std::path::Path;

/// A burn tensor on the CubeCL backend (float or int).
pub type BTensor = CubeTensor;

/// One decoder layer. The RMSNorm weights are folded into the rows of the matmul that follows each norm
/// (`(x̂ ⊙ w) W = x̂ (diag(w) W)`), so a norm is only `x · (mean(x²) + ε)^(−1/2)`.
struct Layer {
    /// `[W_q | W_q R | W_k | W_k R | W_v]`, `[hidden, 2·q + 3·kv]`: the five projections in one matmul.
    qkv: BTensor,
    wo: BTensor,
    /// `[W_gate | W_up]`, `[hidden, 2·inter]`.
    gate_up: BTensor,
    down: BTensor,
}

/// SmolLM2 (any dense GGUF llama) on burn's CubeCL backend, f32 weights.
pub struct BurnModel {
    /// Its shape.
    pub cfg: ModelConfig,
    device: cubecl::Device,
    embed: BTensor,
    /// The output norm's weight folded in.
    head: BTensor,
    layers: Vec<Layer>,
}

/// cos and sin of every (segment, position, dim) for the rotate-half layout, `[segments·len, D]` f32 each, on the
/// device. A segment is one RoPE base, or the identity (cos 1, sin 0: q and k pass unrotated, for a cache that
/// rotates by rank itself); a row of the batch reads row `segment·len + position` (see [`BurnModel::step`]), so
/// that caches of different RoPE bases and places share one batch.
pub struct RopeTable {
    cos: BTensor,
    sin: BTensor,
    len: usize,
    segments: usize,
}

impl RopeTable {
    /// Positions per segment (`0..len`).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it covers no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The table row of `position` in `segment`, for the `rope_rows` of [`BurnModel::step`].
    pub fn row(&self, segment: usize, position: usize) -> Result<u32, Error> {
        if segment >= self.segments || position >= self.len {
            return Err(Error::Config("RoPE table row out of range"));
        }
        u32::try_from(segment * self.len + position).map_err(|_| Error::Config("RoPE table row beyond u32"))
    }
}

fn upload(device: &cubecl::Device, data: Vec<f32>, shape: &[usize]) -> BTensor {
    Cb::float_from_data(TensorData::new(data, shape.to_vec()), device)
}

/// Device int tensor (i32) of `data`.
pub fn upload_ids(device: &cubecl::Device, data: &[u32], shape: &[usize]) -> BTensor {
    Cb::int_from_data(TensorData::new(data.iter().map(|&x| x as i32).collect::<Vec<i32>>(), shape.to_vec()), device)
}

/// Reads a float tensor back (blocks until the device has computed it).
pub fn read_f32(t: BTensor) -> Result<Vec<f32>, Error> {
    let data = cubecl::future::block_on(Cb::float_into_data(t)).map_err(|e| Error::Device(format!("{e:?}")))?;
    Ok(data.as_slice::<f32>().map_err(|e| Error::Device(format!("{e:?}")))?.to_vec())
}

/// Reads an int tensor back as u32 (blocks).
pub fn read_ids(t: BTensor) -> Result<Vec<u32>, Error> {
    let data = cubecl::future::block_on(Cb::int_into_data(t)).map_err(|e| Error::Device(format!("{e:?}")))?;
    Ok(data.as_slice::<i32>().map_err(|e| Error::Device(format!("{e:?}")))?.iter().map(|&x| x as u32).collect())
}

/// `x [M, K] · w [K, N]` by cubek's plain unit routine (no tensor cores, f32 all through), not burn's
/// `float_matmul`, whose automatic choice takes cubek's tensor-core routine wherever the device has tensor cores and
/// may lower an f32 product to TF32. The unit routine is the one lavapipe runs, where the model equals candle's
/// forward; a decode step's matmuls are `M = B` rows against the weights: bandwidth-bound, little for tensor cores to
/// win. (The rows that came out wrong on the H100 at B ≥ 2, `data/bench/2026-12-07-h100-model-batch-rows.md`, were
/// not the matmul's doing but rows of q/k/v read as contiguous when they were not: see `pre`.)
///
/// A step's few rows (`M ≤` [`ROWS_MATMUL_MAX`]) go through our own [`crate::matmul::rows_matmul`] instead, written
/// for this matrix-vector shape: one pass over the weights with vector loads along their columns. (With the unit
/// routine the whole step took ~18 ms of GPU time at B = 8 on the H200 for ~590 MB of weights; whether the
/// matmuls were the cause is not yet measured.)
fn mm(x: &BTensor, w: &BTensor) -> Result<BTensor, Error> {
    let (m, n) = (x.meta.shape()[0], w.meta.shape()[1]);
    if m > ROWS_MATMUL_MAX {
        return unit_matmul(x, w, vec![m, n]);
    }
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::from(vec![m, n]), burn_backend::DType::F32);
    let x = into_contiguous(x.clone());
    crate::matmul::rows_matmul(&x.client, &from_burn(&x)?, &from_burn(w)?, &from_burn(&out)?)?;
    Ok(out)
}

/// The most rows [`mm`] sends to [`crate::matmul::rows_matmul`] (it reads the weights once per 4 rows).
const ROWS_MATMUL_MAX: usize = 64;

/// Batched `a [S, M, K] · b [S, K, N]` (contiguous) by the same unit routine as [`mm`].
fn bmm(a: &BTensor, b: &BTensor) -> Result<BTensor, Error> {
    unit_matmul(a, b, vec![a.meta.shape()[0], a.meta.shape()[1], b.meta.shape()[2]])
}

/// `a · b` into a fresh contiguous f32 tensor of `out_shape` by cubek's unit routine.
fn unit_matmul(a: &BTensor, b: &BTensor, out_shape: Vec<usize>) -> Result<BTensor, Error> {
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    use cubek::matmul::{multi_level, strategy::Strategy};
    // Contiguous rows: burn's own allocation (`float_empty`) may pitch rows on CUDA (see `pre`).
    let out = burn_cubecl::ops::numeric::empty_device_contiguous_dtype(a.client.clone(), a.device.clone(), Shape::from(out_shape), burn_backend::DType::F32);
    let st = burn_backend::cubecl::dtype_to_storage_type(burn_backend::DType::F32);
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: st, rhs: st, out: st });
    let strategy = Strategy::MultiLevel(multi_level::Strategy::SimpleUnit(Default::default()));
    let (lhs, rhs) = (cubek::std::InputBinding::new(a.clone().binding(), st), cubek::std::InputBinding::new(b.clone().binding(), st));
    cubek::matmul::launch::launch_ref(&strategy, &a.client, lhs, rhs, out.clone().binding(), &mut dtypes).map_err(|e| Error::Device(format!("matmul: {e:?}")))?;
    Ok(out)
}

fn reshape(x: BTensor, shape: &[usize]) -> BTensor {
    Cb::float_reshape(x, Shape::from(shape.to_vec()))
}

/// `W [out, in]` with column `i` scaled by `norm[i]`: the norm's weight moved into the matmul after it.
fn fold_norm(mut w: Vec<f32>, norm: &[f32]) -> Vec<f32> {
    for row in w.chunks_exact_mut(norm.len()) {
        for (x, n) in row.iter_mut().zip(norm) {
            *x *= n;
        }
    }
    w
}

/// `[out, in]` row-major → `[in, out]`.
fn transpose(w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = w[o * inp + i];
        }
    }
    t
}

/// Rows of a Q/K weight `[heads·D, in]`: per head, `even dims, then odd dims` (`rot = false`), or that layout
/// times the rotate-half matrix (`rot = true`: row `j < D/2` is minus row `j + D/2`, row `j ≥ D/2` is row
/// `j − D/2`, so that `x (W R)ᵀ = rotate_half(x Wᵀ)`).
fn halves_rows(w: &[f32], heads: usize, d: usize, inp: usize, rot: bool) -> Vec<f32> {
    let half = d / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..heads {
        for j in 0..d {
            // The halves-layout row j is the interleaved row src(j).
            let src = |j: usize| if j < half { 2 * j } else { 2 * (j - half) + 1 };
            let (row, sign) = match (rot, j < half) {
                (false, _) => (src(j), 1.0),
                (true, true) => (src(j + half), -1.0),
                (true, false) => (src(j - half), 1.0),
            };
            out.extend(w[(h * d + row) * inp..(h * d + row + 1) * inp].iter().map(|&x| sign * x));
        }
    }
    out
}

/// A GGUF tensor dequantized to f32 on the host: (data row-major, dims).
fn read_tensor(content: &Content, file: &mut std::fs::File, name: &str) -> Result<(Vec<f32>, Vec<usize>), String> {
    let cpu = candle_core::Device::Cpu;
    let t = content.tensor(file, name, &cpu).and_then(|q| q.dequantize(&cpu)).map_err(|e| format!("tensor {name}: {e}"))?;
    let dims = t.dims().to_vec();
    Ok((t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| format!("tensor {name}: {e}"))?, dims))
}

impl BurnModel {
    /// Loads the GGUF at `path` onto `device` (weights dequantized to f32 by candle on the host, once) and
    /// returns the model and the header (for the tokenizer).
    pub fn load(path: &Path, device: &cubecl::Device) -> Result<(BurnModel, Content), Error> {
        Self::load_str(path, device).map_err(Error::Model)
    }

    fn load_str(path: &Path, device: &cubecl::Device) -> Result<(BurnModel, Content), String> {
        let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let content = Content::read(&mut file).map_err(|e| format!("{}: not a GGUF file ({e})", path.display()))?;
        let cfg = ModelConfig::from_gguf(&content)?;
        if cfg.head_dim % 2 != 0 || cfg.heads % cfg.kv_heads != 0 {
            return Err(format!("head dim {} must be even and {} query heads a multiple of {} KV heads", cfg.head_dim, cfg.heads, cfg.kv_heads));
        }
        let (h, d) = (cfg.hidden, cfg.head_dim);
        let mut read = |name: &str| read_tensor(&content, &mut file, name);
        let mut linear = |name: &str, out: usize, inp: usize| -> Result<Vec<f32>, String> {
            let (w, dims) = read(name)?;
            // A vector (norm weight) is asked for as `[n, 1]`.
            if dims != [out, inp] && !(inp == 1 && dims == [out]) {
                return Err(format!("tensor {name}: shape {dims:?}, expected [{out}, {inp}]"));
            }
            Ok(w)
        };
        let embed_w = linear("token_embd.weight", cfg.vocab, h)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        let (qo, ko) = (cfg.heads * d, cfg.kv_heads * d);
        for l in 0..cfg.layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            let wq = linear(&n("attn_q"), qo, h)?;
            let wk = linear(&n("attn_k"), ko, h)?;
            let wv = linear(&n("attn_v"), ko, h)?;
            let wo = linear(&n("attn_output"), h, qo)?;
            let inter = content.tensor_infos.get(&n("ffn_gate")).ok_or("GGUF has no `ffn_gate`")?.shape.dims()[0];
            let gate = linear(&n("ffn_gate"), inter, h)?;
            let up = linear(&n("ffn_up"), inter, h)?;
            let down = linear(&n("ffn_down"), h, inter)?;
            let attn_norm = linear(&n("attn_norm"), h, 1)?;
            let ffn_norm = linear(&n("ffn_norm"), h, 1)?;
            let lin = |w: Vec<f32>, out: usize, inp: usize| upload(device, transpose(&w, out, inp), &[inp, out]);
            // Stacking `[out, in]` rows is stacking the outputs: one matmul gives all of them side by side.
            let qkv = [halves_rows(&wq, cfg.heads, d, h, false), halves_rows(&wq, cfg.heads, d, h, true), halves_rows(&wk, cfg.kv_heads, d, h, false), halves_rows(&wk, cfg.kv_heads, d, h, true), wv]
                .concat();
            let (qkv, gate_up) = (fold_norm(qkv, &attn_norm), fold_norm([gate, up].concat(), &ffn_norm));
            layers.push(Layer { qkv: lin(qkv, 2 * qo + 3 * ko, h), wo: lin(wo, h, qo), gate_up: lin(gate_up, 2 * inter, h), down: lin(down, h, inter) });
        }
        let norm = linear("output_norm.weight", h, 1)?;
        // Tied output head when the file has no `output.weight`.
        let head = if content.tensor_infos.contains_key("output.weight") { linear("output.weight", cfg.vocab, h)? } else { embed_w.clone() };
        let model =
            BurnModel { embed: upload(device, embed_w, &[cfg.vocab, h]), head: upload(device, transpose(&fold_norm(head, &norm), cfg.vocab, h), &[h, cfg.vocab]), layers, device: device.clone(), cfg };
        Ok((model, content))
    }

    /// The device the weights live on.
    pub fn device(&self) -> &cubecl::Device {
        &self.device
    }

    /// RoPE table of positions `0..len` for each segment: `Some(base)` rotates at that base (angles in f64, rounded
    /// once), `None` is the identity.
    pub fn rope_table(&self, segments: &[Option<f64>], len: usize) -> RopeTable {
        let d = self.cfg.head_dim;
        let half = d / 2;
        let n = segments.len() * len * d;
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for seg in segments {
            for p in 0..len {
                for j in 0..d {
                    let a = seg.map_or(0.0, |base| p as f64 * base.powf(-2.0 * (j % half) as f64 / d as f64));
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let rows = segments.len() * len;
        RopeTable { cos: upload(&self.device, cos, &[rows, d]), sin: upload(&self.device, sin, &[rows, d]), len, segments: segments.len() }
    }

    /// RMSNorm without its weight (folded into the next matmul): `x · (mean(x²) + ε)^(−1/2)` per row.
    fn rms(&self, x: BTensor) -> BTensor {
        let n = x.meta.shape()[1];
        let ms = Cb::float_mul_scalar(row_sum(Cb::float_mul(x.clone(), x.clone())), Scalar::from(1.0 / n as f32));
        Cb::float_mul(x, Cb::float_powf_scalar(Cb::float_add_scalar(ms, Scalar::from(self.cfg.eps as f32)), Scalar::from(-0.5f32)))
    }

    /// One decode step of every sequence: `tokens` `[B]` int (this step's input ids), `rope_rows` `[B]` int (each
    /// row's [`RopeTable::row`]: its segment and true position; values are not checked on the device), and the
    /// caches as groups of consecutive batch rows (`groups[i].rows` rows each, summing to `B`; `layers[l]` is layer
    /// `l`'s cache, of batch `rows`, this model's heads and head dim, dtype `dtype`). Returns the logits `[B, vocab]`
    /// f32. Launches only: no upload, no read-back; with several groups, one concatenation per layer of their
    /// outputs.
    pub fn step<C: CompressedKvCache>(&self, tokens: &BTensor, rope_rows: &BTensor, table: &RopeTable, groups: &mut [CacheGroup<C>], dtype: DType) -> Result<BTensor, Error> {
        self.forward(tokens, rope_rows, table, groups, dtype, &mut None)
    }

    /// [`BurnModel::step`], also returning every intermediate of the first `layers` layers, in order, named
    /// `(name, layer, tensor)`: `embed`, then per layer `attn_norm` (the normalized rows; the weight is in the
    /// matmul), `q_lin`, `q_rot_lin`, `k_lin`, `k_rot_lin`,
    /// `q`, `k`, `v`, `attn`, `attn_res`, `ffn_norm`, `gate`, `up`, `swiglu`, `ffn_res`. A diagnostic (it keeps
    /// every tensor alive, so burn cannot reuse their buffers in place): find the first op whose result is wrong
    /// on a device (`tests/burn_model.rs`, `batch_rows_stay_apart`).
    pub fn step_trace<C: CompressedKvCache>(
        &self,
        tokens: &BTensor,
        rope_rows: &BTensor,
        table: &RopeTable,
        groups: &mut [CacheGroup<C>],
        dtype: DType,
        layers: usize,
    ) -> Result<(BTensor, Trace), Error> {
        let mut trace = Some((layers, Vec::new()));
        let logits = self.forward(tokens, rope_rows, table, groups, dtype, &mut trace)?;
        Ok((logits, trace.map(|t| t.1).unwrap_or_default()))
    }

    /// Checks a step's arguments; returns the batch.
    fn check_step<C>(&self, tokens: &BTensor, rope_rows: &BTensor, groups: &[CacheGroup<C>], dtype: DType) -> Result<usize, Error> {
        let b = tokens.meta.shape()[0];
        if tokens.meta.shape().len() != 1 || rope_rows.meta.shape().to_vec() != vec![b] {
            return Err(Error::ShapeMismatch { tensor: "rope_rows", expected: vec![b], got: rope_rows.meta.shape().to_vec() });
        }
        if groups.iter().map(|g| g.rows).sum::<usize>() != b || groups.iter().any(|g| g.layers.len() != self.cfg.layers || g.rows == 0) {
            return Err(Error::Config("cache groups must cover the batch, one cache per layer each"));
        }
        if dtype == DType::U32 {
            return Err(Error::Config("a cache of u32 values"));
        }
        Ok(b)
    }

    /// Every row's cos and sin, `[B, 1, D]` each.
    fn trig(&self, table: &RopeTable, rope_rows: &BTensor) -> (BTensor, BTensor) {
        let (b, d) = (rope_rows.meta.shape()[0], self.cfg.head_dim);
        let trig = |tab: &BTensor| reshape(Cb::float_select(tab.clone(), 0, rope_rows.clone()), &[b, 1, d]);
        (trig(&table.cos), trig(&table.sin))
    }

    /// Layer `l` up to its cache: RMSNorm, the projections, RoPE → q `[B, 1, Hq, D]`, k and v `[B, Hkv, D]`,
    /// contiguous, in the caches' dtype.
    fn pre(&self, l: usize, x: &BTensor, cos: &BTensor, sin: &BTensor, dtype: DType, keep: Keep) -> Result<(BTensor, BTensor, BTensor), Error> {
        let h = self.rms(x.clone());
        keep("attn_norm", l, &h);
        let qkv = mm(&h, &self.layers[l].qkv)?;
        self.rotate(l, &qkv, cos, sin, dtype, keep)
    }

    /// The q, k, v of [`BurnModel::pre`] from the stacked projections `qkv` `[B, 2·q + 3·kv]`, rotated by `cos`
    /// and `sin` `[B, 1, D]`.
    fn rotate(&self, l: usize, qkv: &BTensor, cos: &BTensor, sin: &BTensor, dtype: DType, keep: Keep) -> Result<(BTensor, BTensor, BTensor), Error> {
        let (b, hq, hkv, d) = (qkv.meta.shape()[0], self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        // `x·cos + (x R)·sin` per head: `[B, heads·D]` twice → `[B, heads, D]`.
        let rotate = |a: BTensor, r: BTensor, heads: usize| Cb::float_add(Cb::float_mul(reshape(a, &[b, heads, d]), cos.clone()), Cb::float_mul(reshape(r, &[b, heads, d]), sin.clone()));
        let (qo, ko) = (hq * d, hkv * d);
        let qkv = qkv.clone();
        let (ql, qr, kl, kr, v) = (cols(&qkv, 0, qo), cols(&qkv, qo, qo), cols(&qkv, 2 * qo, ko), cols(&qkv, 2 * qo + ko, ko), cols(&qkv, 2 * qo + 2 * ko, ko));
        keep("q_lin", l, &ql);
        keep("q_rot_lin", l, &qr);
        keep("k_lin", l, &kl);
        keep("k_rot_lin", l, &kr);
        let q = reshape(rotate(ql, qr, hq), &[b, 1, hq, d]);
        let k = rotate(kl, kr, hkv);
        let v = reshape(v, &[b, hkv, d]);
        keep("q", l, &q);
        keep("k", l, &k);
        keep("v", l, &v);
        let (q, k, v) = if dtype == DType::F32 { (q, k, v) } else { (cast(q, dtype), cast(k, dtype), cast(v, dtype)) };
        // The caches take k and v contiguous (and q as any view). burn allocates a fresh tensor in the device's
        // preferred layout (cubecl's `Optimized`), which on CUDA may pitch rows (a row stride past the row's
        // length): on the H100, k of a batch of two came out not contiguous and the cache refused it.
        // `into_contiguous` copies only such a tensor and is free otherwise — with `mm`'s contiguous outputs and
        // burn's in-place elementwise ops, q, k and v are usually contiguous already.
        Ok((into_contiguous(q), into_contiguous(k), into_contiguous(v)))
    }

    /// Layer `l`'s caches, one step: each group reads its rows of q, k, v; returns each group's output.
    /// With `record`, the caches' launches of a step at that parity are issued instead (recording a graph) and
    /// nothing is returned: the graph reads their fixed output buffers, collected before the recording.
    fn attend<C: CompressedKvCache>(&self, l: usize, groups: &mut [CacheGroup<C>], q: &BTensor, k: &BTensor, v: &BTensor, record: Option<usize>) -> Result<Vec<DeviceTensor>, Error> {
        let (qd, kd, vd) = (from_burn(q)?, from_burn(k)?, from_burn(v)?);
        let mut outs = Vec::with_capacity(groups.len());
        let mut r0 = 0;
        for g in groups.iter_mut() {
            let n = g.rows;
            let c = &mut g.layers[l];
            let (q, k, v) = (rows(&qd, r0, n), rows(&kd, r0, n), rows(&vd, r0, n));
            match record {
                None => outs.push(c.step(&q, &k, &v)?),
                Some(p) => c.record_step(&q, &k, &v, p)?,
            }
            r0 += n;
        }
        Ok(outs)
    }

    /// Layer `l` from its caches' outputs: output projection and residual, RMSNorm, SwiGLU MLP and residual.
    fn post(&self, l: usize, x: BTensor, outs: &[DeviceTensor], dtype: DType, keep: Keep) -> Result<BTensor, Error> {
        let (b, hq, d) = (x.meta.shape()[0], self.cfg.heads, self.cfg.head_dim);
        let mut outs = outs.iter().map(|o| to_burn(&self.device, o)).collect::<Result<Vec<_>, _>>()?;
        let o = if outs.len() == 1 { outs.pop().expect("one group") } else { Cb::float_cat(outs, 0) };
        let o = if dtype == DType::F32 { o } else { cast(o, DType::F32) };
        keep("attn", l, &o);
        self.post_attn(l, x, reshape(o, &[b, hq * d]), keep)
    }

    /// Layer `l` from its attention output `o [N, Hq·D]` f32 (rows as `x`'s): output projection and residual,
    /// RMSNorm, SwiGLU MLP and residual.
    fn post_attn(&self, l: usize, x: BTensor, o: BTensor, keep: Keep) -> Result<BTensor, Error> {
        let w = &self.layers[l];
        let x = Cb::float_add(x, mm(&o, &w.wo)?);
        keep("attn_res", l, &x);
        let h = self.rms(x.clone());
        keep("ffn_norm", l, &h);
        let gu = mm(&h, &w.gate_up)?;
        let inter = gu.meta.shape()[1] / 2;
        let (g, u) = (cols(&gu, 0, inter), cols(&gu, inter, inter));
        keep("gate", l, &g);
        keep("up", l, &u);
        let ff = Cb::float_mul(Cb::float_mul(g.clone(), Cb::sigmoid(g)), u);
        keep("swiglu", l, &ff);
        let x = Cb::float_add(x, mm(&ff, &w.down)?);
        keep("ffn_res", l, &x);
        Ok(x)
    }

    fn forward<C: CompressedKvCache>(
        &self,
        tokens: &BTensor,
        rope_rows: &BTensor,
        table: &RopeTable,
        groups: &mut [CacheGroup<C>],
        dtype: DType,
        trace: &mut Option<(usize, Trace)>,
    ) -> Result<BTensor, Error> {
        self.check_step(tokens, rope_rows, groups, dtype)?;
        let (cos, sin) = self.trig(table, rope_rows);
        let mut keep = |name: &'static str, l: usize, t: &BTensor| {
            if let Some((n, v)) = trace.as_mut() {
                if l < *n {
                    v.push((name, l, t.clone()));
                }
            }
        };
        let mut x = Cb::float_select(self.embed.clone(), 0, tokens.clone()); // [B, H]
        keep("embed", 0, &x);
        for l in 0..self.layers.len() {
            let (q, k, v) = self.pre(l, &x, &cos, &sin, dtype, &mut keep)?;
            let outs = self.attend(l, groups, &q, &k, &v, None)?;
            x = self.post(l, x, &outs, dtype, &mut keep)?;
        }
        mm(&self.rms(x), &self.head)
    }

    /// Dense causal prefill of a prompt: `tokens` `[B, P]` row-major (`P ≥ 1`); per row, the [`RopeTable::row`] of
    /// position 0 the dense attention rotates q and k at (`attn_rows`: a segment of the row's base); positions
    /// `0..P` follow in the same segment. Every layer runs the prompt in one pass (causal attention in f32, one
    /// batch row at a time so that the `[Hq·P, P]` scores of one row are the largest buffer) and hands the layer's
    /// prompt to `admit(layer, prompts)`, once per entry of `views`: `views[i]` gives every row's first table row
    /// for `prompts[i]`'s q and k (as [`BurnModel::step`]'s `rope_rows`: the identity segment for a cache that
    /// rotates by rank, else the attention's own rows, which cost no second rotation). The caller admits its caches
    /// from them (the cache's own selection rule decides what it keeps) — several cache groups may take the same
    /// prompt rows. Returns the logits `[B, vocab]` at position `P − 1`. Uploads the ids and positions; reads
    /// nothing back. The arguments are checked before any launch; an error from `admit` (a cache refusing the
    /// prompt) comes back as is, with the earlier layers already admitted.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        tokens: &[u32],
        attn_rows: &[u32],
        views: &[&[u32]],
        table: &RopeTable,
        dtype: DType,
        admit: &mut dyn FnMut(usize, &[Prompt]) -> Result<(), Error>,
    ) -> Result<BTensor, Error> {
        let (b, hq, hkv, d) = (attn_rows.len(), self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim);
        if b == 0 || tokens.is_empty() || tokens.len() % b != 0 {
            return Err(Error::ShapeMismatch { tensor: "tokens", expected: vec![b, tokens.len() / b.max(1)], got: vec![tokens.len()] });
        }
        let p = tokens.len() / b;
        if let Some(v) = views.iter().find(|v| v.len() != b) {
            return Err(Error::ShapeMismatch { tensor: "views", expected: vec![b], got: vec![v.len()] });
        }
        if dtype == DType::U32 {
            return Err(Error::Config("a cache of u32 values"));
        }
        if views.iter().copied().chain([attn_rows]).flatten().any(|&r| r as usize / table.len.max(1) >= table.segments || r as usize % table.len + p > table.len) {
            return Err(Error::Config("a prompt's positions run past its RoPE table segment"));
        }
        if tokens.iter().any(|&t| t as usize >= self.cfg.vocab) {
            return Err(Error::Config("a token id beyond the vocabulary"));
        }
        let n = b * p;
        let ids = upload_ids(&self.device, tokens, &[n]);
        let trig = |first: &[u32]| {
            let pos: Vec<u32> = first.iter().flat_map(|&r| (0..p as u32).map(move |t| r + t)).collect();
            self.trig(table, &upload_ids(&self.device, &pos, &[n]))
        };
        let (cos, sin) = trig(attn_rows);
        // Each view's cos/sin, `None` where it is the attention's own.
        let view_trig: Vec<Option<(BTensor, BTensor)>> = views.iter().map(|&v| (v != attn_rows).then(|| trig(v))).collect();
        // Key j is masked for query i when j > i: `[1, 1, P, P]`, broadcast over heads.
        let i = Cb::int_reshape(Cb::int_arange(0..p as i64, &self.device, IntDType::I32), Shape::from(vec![p, 1]));
        let j = Cb::int_reshape(Cb::int_arange(0..p as i64, &self.device, IntDType::I32), Shape::from(vec![1, p]));
        let g = hq / hkv;
        let masked = Cb::bool_expand(Cb::bool_reshape(Cb::int_lower(i, j, BoolStore::U32), Shape::from(vec![1, 1, p, p])), Shape::from(vec![hkv, g, p, p]));
        let mut x = Cb::float_select(self.embed.clone(), 0, ids); // [B·P, H]
        for l in 0..self.layers.len() {
            let qkv = mm(&self.rms(x.clone()), &self.layers[l].qkv)?;
            // The attention's q and k (rotated at its rows), and each view's where they differ.
            let (qa, ka, v) = self.rotate(l, &qkv, &cos, &sin, DType::F32, &mut |_, _, _| {})?;
            let mut qk_views = Vec::with_capacity(views.len());
            for vt in &view_trig {
                qk_views.push(match vt {
                    Some((c, s)) => {
                        let (q, k, _) = self.rotate(l, &qkv, c, s, DType::F32, &mut |_, _, _| {})?;
                        (q, k)
                    }
                    None => (qa.clone(), ka.clone()),
                });
            }
            let (q, k, vr5) = (reshape(qa, &[b, p, hkv, g, d]), reshape(ka, &[b, p, hkv, d]), reshape(v.clone(), &[b, p, hkv, d]));
            let mut outs = Vec::with_capacity(b);
            for r in 0..b {
                let at = |t: &BTensor, rank: usize| {
                    let mut sl = vec![Slice { start: 0, end: None, step: 1 }; rank];
                    sl[0] = Slice { start: r as isize, end: Some(r as isize + 1), step: 1 };
                    Cb::float_slice(t.clone(), &sl)
                };
                // [P, Hkv, G, D] → [Hkv, G·P, D]; keys transposed [Hkv, D, P]; values [Hkv, P, D].
                let qr = into_contiguous(Cb::float_permute(reshape(at(&q, 5), &[p, hkv, g, d]), &[1, 2, 0, 3]));
                let kt = into_contiguous(Cb::float_permute(reshape(at(&k, 4), &[p, hkv, d]), &[1, 2, 0]));
                let vr = into_contiguous(Cb::float_permute(reshape(at(&vr5, 4), &[p, hkv, d]), &[1, 0, 2]));
                let sc = Cb::float_mul_scalar(bmm(&reshape(qr, &[hkv, g * p, d]), &kt)?, Scalar::from(1.0 / (d as f32).sqrt()));
                let sc = Cb::float_mask_fill(reshape(sc, &[hkv, g, p, p]), masked.clone(), Scalar::from(f32::NEG_INFINITY));
                let e = Cb::float_exp(Cb::float_sub(sc.clone(), Cb::float_max_dim(sc, 3)));
                let pr = Cb::float_div(e.clone(), Cb::float_sum_dim(e, 3));
                // [Hkv, G·P, D] → [P, Hkv, G, D] = [P, Hq·D] (query head h·G + g).
                let o = bmm(&reshape(pr, &[hkv, g * p, p]), &vr)?;
                outs.push(into_contiguous(Cb::float_permute(reshape(o, &[hkv, g, p, d]), &[2, 0, 1, 3])));
            }
            let o = reshape(if b == 1 { outs.pop().expect("one row") } else { Cb::float_cat(outs, 0) }, &[n, hq * d]);
            // The caches' prompts: q `[B, P, Hq, D]`, k and v head-major `[B, Hkv, P, D]`, in the caches' dtype.
            let c = |t: BTensor| if dtype == DType::F32 { t } else { cast(t, dtype) };
            let vd = from_burn(&into_contiguous(c(Cb::float_permute(reshape(v, &[b, p, hkv, d]), &[0, 2, 1, 3]))))?;
            let mut prompts = Vec::with_capacity(views.len());
            for (qc, kc) in qk_views {
                let qd = from_burn(&into_contiguous(c(reshape(qc, &[b, p, hq, d]))))?;
                let kd = from_burn(&into_contiguous(c(Cb::float_permute(reshape(kc, &[b, p, hkv, d]), &[0, 2, 1, 3]))))?;
                prompts.push(Prompt { q: qd, k: kd, v: vd.clone() });
            }
            admit(l, &prompts)?;
            x = self.post_attn(l, x, o, &mut |_, _, _| {})?;
        }
        let last = Cb::float_select(x, 0, upload_ids(&self.device, &(0..b as u32).map(|r| r * p as u32 + p as u32 - 1).collect::<Vec<_>>(), &[b]));
        mm(&self.rms(last), &self.head)
    }

    /// [`BurnModel::step`] replayed from device graphs (cubecl's graph capture: one dispatch per graph on CUDA,
    /// pre-resolved dispatches on wgpu). A graph holds a whole step — every layer's launches and its caches'
    /// ([`CompressedKvCache::record_step`]) — so a step is a few plain launches (the embedding row, cos and sin
    /// copied into the graph's inputs; the output head) and one replay. The caches' launches differ by the parity
    /// of their double-buffered state ([`CompressedKvCache::graph_parity`]), so two graphs are recorded, one per
    /// parity, and the caches' host bookkeeping follows each replay ([`CompressedKvCache::note_replayed`]).
    ///
    /// `graph` starts `None`: that call is a plain step (it also checks every cache's kernels) and then records
    /// both graphs into it; later calls replay them. A graph belongs to this batch, dtype and these caches (it
    /// reads their fixed output buffers, [`CompressedKvCache::step_output`], and steps their buffers): a call with
    /// other caches, with caches that cannot be recorded or at different parities, or with a step a cache would
    /// refuse (a Full cache at capacity) is refused with an error before any launch — record again from `None`
    /// for other caches. A replay that the device refuses leaves the caches' device state unknown.
    #[allow(clippy::too_many_arguments)]
    pub fn step_graphed<C: CompressedKvCache>(
        &self,
        tokens: &BTensor,
        rope_rows: &BTensor,
        table: &RopeTable,
        groups: &mut [CacheGroup<C>],
        dtype: DType,
        graph: &mut Option<StepGraph>,
    ) -> Result<BTensor, Error> {
        let b = self.check_step(tokens, rope_rows, groups, dtype)?;
        let Some(g) = graph.as_ref() else {
            // Everything recording needs is checked before the plain step launches anything.
            let mut outs = Vec::with_capacity(self.layers.len());
            for l in 0..self.layers.len() {
                let o = groups.iter().map(|g| g.layers[l].step_output().cloned().ok_or(Error::Config("a cache without one fixed output buffer cannot be read by a step graph")));
                outs.push(o.collect::<Result<Vec<_>, _>>()?);
            }
            parity(groups)?;
            let logits = self.forward(tokens, rope_rows, table, groups, dtype, &mut None)?;
            *graph = Some(self.record(b, dtype, outs, groups)?);
            return Ok(logits);
        };
        if g.rows != b || g.dtype != dtype {
            return Err(Error::Config("a step graph replays the batch and dtype it was recorded with"));
        }
        // The graphs step the recorded caches' buffers: refuse other caches before any launch.
        let same = |a: &DeviceTensor, b: &DeviceTensor| a.handle.memory.descriptor() == b.handle.memory.descriptor() && a.offset == b.offset && a.shape == b.shape && a.strides == b.strides;
        for (l, recorded) in g.outs.iter().enumerate() {
            if groups.len() != recorded.len() || groups.iter().zip(recorded).any(|(gr, r)| !gr.layers[l].step_output().is_some_and(|o| same(o, r))) {
                return Err(Error::Config("these caches are not the ones the step graph was recorded with"));
            }
        }
        let p = parity(groups)?;
        let client = &self.embed.client;
        let x0 = Cb::float_select(self.embed.clone(), 0, tokens.clone());
        let (cos, sin) = self.trig(table, rope_rows);
        for (src, dst) in [(x0, &g.x), (cos, &g.cos), (sin, &g.sin)] {
            cubecl::std::tensor::copy_into(client, src.binding(), dst.clone().binding(), burn_backend::cubecl::dtype_to_storage_type(burn_backend::DType::F32));
        }
        // SAFETY: every buffer the graph reads or writes is alive — its inputs, outputs and intermediates are held
        // by `g`, and the caches it steps were checked above to be the recorded ones (their buffers live as long
        // as they do; a cache never reallocates) — and is used by this thread's stream only.
        unsafe { g.steps[p].replay() }.map_err(|e| Error::Device(format!("graph replay: {e:?}")))?;
        for gr in groups.iter_mut() {
            for c in gr.layers.iter_mut() {
                c.note_replayed();
            }
        }
        mm(&self.rms(g.last[p].clone()), &self.head)
    }

    /// Records the two step graphs of [`BurnModel::step_graphed`] (cache parity 0 and 1); `outs` (`[layer][group]`)
    /// are the caches' fixed output buffers. Each recording follows a warm-up run of the model's launches alone
    /// (they write fresh buffers only: nothing observable changes), which leaves in the pools what the recording
    /// allocates from; the caches allocate nothing when they step.
    fn record<C: CompressedKvCache>(&self, b: usize, dtype: DType, outs: Vec<Vec<DeviceTensor>>, groups: &mut [CacheGroup<C>]) -> Result<StepGraph, Error> {
        let (h, d) = (self.cfg.hidden, self.cfg.head_dim);
        let client = self.embed.client.clone();
        let fixed = |shape: &[usize]| burn_cubecl::ops::numeric::empty_device_contiguous_dtype(client.clone(), self.device.clone(), Shape::from(shape.to_vec()), burn_backend::DType::F32);
        let (x, cos, sin) = (fixed(&[b, h]), fixed(&[b, 1, d]), fixed(&[b, 1, d]));
        let mut held = Vec::new();
        let mut steps = Vec::with_capacity(2);
        let mut last = Vec::with_capacity(2);
        for parity in 0..2 {
            let dev = |e: cubecl::server::ServerError| Error::Device(format!("graph capture: {e:?}"));
            client.graph_prepare().map_err(dev)?;
            // The warm-up's tensors are dropped before the window opens: the recording reuses their memory (held,
            // it would need a second set of pages, which the window may not add).
            let warm = self.chain(&x, &cos, &sin, dtype, &outs, groups, None).map(|_| ());
            let started = warm.is_ok() && client.start_capture().is_ok();
            let recorded =
                if started { self.chain(&x, &cos, &sin, dtype, &outs, groups, Some(parity)) } else { warm.and(Err(Error::Device("graph capture: the stream refused to start recording".into()))) };
            // The capture ends whatever happened inside it.
            let graph = client.stop_capture().map_err(dev);
            let (out, mut kept) = recorded?;
            steps.push(graph?);
            last.push(out);
            held.append(&mut kept);
        }
        let (steps, last) = (steps.try_into().map_err(|_| Error::Config("two graphs"))?, last.try_into().map_err(|_| Error::Config("two graphs"))?);
        Ok(StepGraph { rows: b, dtype, x, cos, sin, steps, last, outs, _held: held })
    }

    /// A step's layers from the hidden rows `x`: the model's launches, and with `parity` the caches' launches at
    /// that parity ([`CompressedKvCache::record_step`]: only while recording). Returns the last layer's output
    /// and every intermediate.
    #[allow(clippy::too_many_arguments)]
    fn chain<C: CompressedKvCache>(
        &self,
        x: &BTensor,
        cos: &BTensor,
        sin: &BTensor,
        dtype: DType,
        outs: &[Vec<DeviceTensor>],
        groups: &mut [CacheGroup<C>],
        parity: Option<usize>,
    ) -> Result<(BTensor, Vec<BTensor>), Error> {
        let mut x = x.clone();
        let mut held = Vec::new();
        for (l, o) in outs.iter().enumerate() {
            let (q, k, v) = self.pre(l, &x, cos, sin, dtype, &mut |_, _, _| {})?;
            if let Some(p) = parity {
                self.attend(l, groups, &q, &k, &v, Some(p))?;
            }
            held.extend([q, k, v, x.clone()]);
            x = self.post(l, x, o, dtype, &mut |_, _, _| {})?;
        }
        Ok((x, held))
    }
}

/// Rows `r0..r0 + n` of a `[B, …]` tensor, as a view `[n, …]` with its strides.
pub fn rows(x: &DeviceTensor, r0: usize, n: usize) -> DeviceTensor {
    let mut sh = x.shape.clone();
    sh[0] = n;
    x.view(&sh, &x.strides, x.offset + r0 * x.strides[0])
}

/// The step parity shared by every cache of `groups` ([`CompressedKvCache::graph_parity`]).
fn parity<C: CompressedKvCache>(groups: &[CacheGroup<C>]) -> Result<usize, Error> {
    let mut all = groups.iter().flat_map(|g| g.layers.iter()).map(|c| c.graph_parity());
    let first = all.next().ok_or(Error::Config("no caches"))??;
    for p in all {
        if p? != first {
            return Err(Error::Config("a step graph steps caches that share one parity (they have taken different numbers of steps)"));
        }
    }
    Ok(first)
}

/// How a decode loop steps the model: plainly ([`BurnModel::step`]) or from device graphs recorded at its first
/// step ([`BurnModel::step_graphed`]). One per loop, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Stepper {
    /// Every launch issued every step.
    Plain,
    /// Whole steps replayed from device graphs (recorded by the first step).
    Graphed(Option<StepGraph>),
}

impl Stepper {
    /// `Graphed` when `graph`, else `Plain`.
    pub fn new(graph: bool) -> Self {
        if graph {
            Stepper::Graphed(None)
        } else {
            Stepper::Plain
        }
    }

    /// One step of `model` (see [`BurnModel::step`]).
    pub fn step<C: CompressedKvCache>(&mut self, model: &BurnModel, tokens: &BTensor, rope_rows: &BTensor, table: &RopeTable, groups: &mut [CacheGroup<C>], dtype: DType) -> Result<BTensor, Error> {
        match self {
            Stepper::Plain => model.step(tokens, rope_rows, table, groups, dtype),
            Stepper::Graphed(g) => model.step_graphed(tokens, rope_rows, table, groups, dtype, g),
        }
    }
}

/// The device graphs of [`BurnModel::step_graphed`] and the buffers they read and write.
pub struct StepGraph {
    rows: usize,
    dtype: DType,
    /// The embedding rows, cos and sin: written before each replay by a copy.
    x: BTensor,
    cos: BTensor,
    sin: BTensor,
    /// A whole step at cache parity 0 and 1.
    steps: [Graph; 2],
    /// Each graph's last layer output.
    last: [BTensor; 2],
    /// The caches' fixed output buffers the graphs read, `[layer][group]`.
    outs: Vec<Vec<DeviceTensor>>,
    /// The recordings' intermediates (q, k, v, hidden rows), held as long as the graphs.
    _held: Vec<BTensor>,
}

type Keep<'a> = &'a mut dyn FnMut(&'static str, usize, &BTensor);

/// Intermediates of [`BurnModel::step_trace`]: `(name, layer, tensor)` in order.
pub type Trace = Vec<(&'static str, usize, BTensor)>;

fn cast(x: BTensor, to: DType) -> BTensor {
    match to {
        DType::F16 => Cb::float_cast(x, FloatDType::F16),
        DType::BF16 => Cb::float_cast(x, FloatDType::BF16),
        _ => Cb::float_cast(x, FloatDType::F32),
    }
}

/// Columns `c0..c0 + n` of a `[B, N]` tensor: a view (no launch).
fn cols(x: &BTensor, c0: usize, n: usize) -> BTensor {
    let all = Slice { start: 0, end: None, step: 1 };
    Cb::float_slice(x.clone(), &[all, Slice { start: c0 as isize, end: Some((c0 + n) as isize), step: 1 }])
}

/// One layer's prompt in one RoPE view ([`BurnModel::prefill`]), in the caches' dtype: q `[B, P, Hq, D]` (rotated
/// as the view's rows say: not at all for a rank-RoPE cache), k and v `[B, Hkv, P, D]`; [`rows`] cuts a cache
/// group's rows out of it (a view, no copy).
pub struct Prompt {
    /// Queries.
    pub q: DeviceTensor,
    /// Keys.
    pub k: DeviceTensor,
    /// Values.
    pub v: DeviceTensor,
}

/// The caches of `rows` consecutive batch rows of [`BurnModel::step`]: one per layer.
pub struct CacheGroup<C> {
    /// Batch rows (the caches' batch).
    pub rows: usize,
    /// `layers[l]`: layer `l`'s cache.
    pub layers: Vec<C>,
}

/// The chunk count of a two-stage row reduction over `n` columns: the divisor of `n` nearest below `√n` (1 when
/// `n` is prime: one stage).
fn chunks(n: usize) -> usize {
    let mut c = (n as f64).sqrt() as usize;
    while c > 1 && n % c != 0 {
        c -= 1;
    }
    c.max(1)
}

/// `x [B, N]` as `[B, c, N/c]` ([`chunks`]): a long row reduced in two stages — burn's reduction gives each output
/// one cube, so the `B` rows of the logits (`N` = 49 152) would run on `B` cubes (one argmax over `[8, 49152]`:
/// 2.4 ms on an H100 under ncu, 12 % of a decode step), and the first stage gives it `B·c`.
fn split_rows(x: BTensor) -> (BTensor, usize) {
    let (b, n) = (x.meta.shape()[0], x.meta.shape()[1]);
    let c = chunks(n);
    (Cb::float_reshape(x, Shape::from(vec![b, c, n / c])), n / c)
}

/// Row sums of `x [B, N]` → `[B, 1]` (two stages, [`split_rows`]).
pub fn row_sum(x: BTensor) -> BTensor {
    let b = x.meta.shape()[0];
    let (xr, _) = split_rows(x);
    Cb::float_reshape(Cb::float_sum_dim(Cb::float_sum_dim(xr, 2), 1), Shape::from(vec![b, 1]))
}

/// Row maxima of `x [B, N]` → `[B, 1]` (two stages, [`split_rows`]).
pub fn row_max(x: BTensor) -> BTensor {
    let b = x.meta.shape()[0];
    let (xr, _) = split_rows(x);
    Cb::float_reshape(Cb::float_max_dim(Cb::float_max_dim(xr, 2), 1), Shape::from(vec![b, 1]))
}

/// Greedy choice: `logits [B, V]` → `[B]` int ids (the first maximum of each row), on the device, in two stages
/// ([`split_rows`]): each chunk's first maximum, then the first chunk holding the row's maximum.
pub fn argmax(logits: BTensor) -> BTensor {
    let b = logits.meta.shape()[0];
    let (xr, len) = split_rows(logits);
    let within = Cb::float_argmax(xr.clone(), 2, IntDType::I32); // [B, c, 1]
    let best = Cb::float_argmax(Cb::float_max_dim(xr, 2), 1, IntDType::I32); // [B, 1, 1]
    let at = Cb::int_gather(1, within, best.clone());
    Cb::int_reshape(Cb::int_add(Cb::int_mul_scalar(best, Scalar::from(len as i32)), at), Shape::from(vec![b]))
}

/// `log softmax` of each row of `logits [B, V]`, on the device (max-shifted; two-stage row reductions).
pub fn log_softmax(logits: BTensor) -> BTensor {
    let z = Cb::float_sub(logits.clone(), row_max(logits));
    Cb::float_sub(z.clone(), Cb::float_log(row_sum(Cb::float_exp(z))))
}

/// `−log softmax(logits)[target]` per row: `logits [B, V]`, `target [B, 1]` int → `[B, 1]`, on the device.
pub fn nll(logits: BTensor, target: &BTensor) -> BTensor {
    Cb::float_neg(Cb::float_gather(1, log_softmax(logits), target.clone()))
}

/// Row `i` of a `[rows, B]` int tensor as `[B]` (a view, no launch).
pub fn row(ids: &BTensor, i: usize) -> BTensor {
    let b = ids.meta.shape()[1];
    let s = [Slice { start: i as isize, end: Some(i as isize + 1), step: 1 }, Slice { start: 0, end: None, step: 1 }];
    Cb::int_reshape(Cb::int_slice(ids.clone(), &s), Shape::from(vec![b]))
}

/// `pos + 1`, on the device.
pub fn advance(pos: &BTensor) -> BTensor {
    Cb::int_add_scalar(pos.clone(), Scalar::from(1i32))
}

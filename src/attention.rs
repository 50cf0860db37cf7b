//! Dense decode attention with GQA, split-KV (flash-decoding), and the optional per-slot attention mass.
//!
//! [`decode_attention`] validates everything, then launches (crate-private, "assumes validated")
//! `launch_unchecked`. Shapes:
//! - `q`: `[B, Lq, Hq, D]`, any strides with a unit innermost stride and any element offset (a view of a fused
//!   QKV projection is fine); query row `i` of sequence `b` sits at position `lens[b] − Lq + i` and
//!   attends keys `0..=lens[b] − Lq + i` (causal offset; `Lq = 1` is plain decode);
//! - `k`, `v`: `[B, Hkv, L_cap, D]`, any strides with a unit innermost stride (views of a larger cache buffer
//!   are fine), same dtype as `q`; `lens: [B]` with `Lq ≤ lens[b] ≤ L_cap`;
//! - outputs: `o: [B, Lq, Hq, D]` (the storage dtype), `lse: [B, Lq, Hq]` (f32, natural log of the softmax
//!   denominator with the scale applied), `mass: [B, Hkv, Lq, L_cap]` (f32): the softmax probability of every
//!   slot averaged over the `G = Hq/Hkv` query heads of its group; slots at or past `lens[b]` and in a row's
//!   causal future are exactly 0.
//!
//! Views: every tensor's element offset is honoured (outputs are contiguous from their offset, RoPE positions
//! likewise); a view that reaches past its buffer, or whose strides overflow, is refused with a typed
//! [`Error::Layout`]. A failed allocation or launch is an `Err` of this call ([`Error::Device`]).
//!
//! Bindings: every kernel binds at most 7 storage buffers (WebGPU's default limit of 8 per stage, less the one
//! cubecl keeps for scalars), so the u32 inputs — the lengths and, with RoPE, the positions — are read from one
//! buffer. [`DecodePlan::run`] binds the caller's buffer when `lens`, `q_pos` and `k_pos` are views of one
//! buffer (as the caches pass them); otherwise it first copies them into a buffer of the plan (one small launch
//! each, counted by [`crate::tensor::device_launches`]). The single-split launch writes `o` and at most one of
//! `lse` and `mass`; a request for both takes the split path (two or three launches).
//!
//! Storage dtypes f32 / f16 / bf16; all arithmetic accumulates in f32. Head dims: any positive multiple of 8 up
//! to 256 (64, 96 and 128 are the tested ones). The split count, tile and rows per cube are chosen from the
//! problem and the device ([`Plan`], returned with the outputs so that benches can print what ran).

use crate::finite::check_finite;
use crate::rope::{angle_table, RopeConfig};
use crate::tensor::{check_written, with_float_type, DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::features::{Plane, TypeUsage};
use cubecl::ir::AddressType;
use cubecl::prelude::*;
use kvsqueeze_kernels::attention::{decode_combine, decode_split, mass_finalize, SplitConfig, MAX_SPLITS};
use kvsqueeze_kernels::util::copy_range;

/// Options of [`decode_attention`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct DecodeConfig {
    /// Softmax scale; `None` is `1/√D`.
    pub scale: Option<f32>,
    /// Also return the log-sum-exp per query head.
    pub lse: bool,
    /// Also return the per-slot attention mass averaged over the GQA group.
    pub mass: bool,
    /// Force the number of KV splits (`None`: chosen from the problem size and the device).
    pub splits: Option<usize>,
    /// Rotate the pre-RoPE query and keys inside the kernel (see [`crate::rope`]).
    pub rope: Option<RopeConfig>,
    /// Refuse non-finite `q`, or `k`/`v` in a valid slot, with [`Error::NonFinite`] before launching
    /// ([`crate::finite`]; costs a scan of K/V and a device round trip).
    pub check_finite: bool,
}

impl DecodeConfig {
    /// The defaults: scale `1/√D`, output only, automatic splits.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the scale.
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
    /// Requests the log-sum-exp.
    pub fn with_lse(mut self, on: bool) -> Self {
        self.lse = on;
        self
    }
    /// Requests the attention mass.
    pub fn with_mass(mut self, on: bool) -> Self {
        self.mass = on;
        self
    }
    /// Forces the split count.
    pub fn with_splits(mut self, n: usize) -> Self {
        self.splits = Some(n);
        self
    }
    /// Applies RoPE inside the kernel.
    pub fn with_rope(mut self, rope: RopeConfig) -> Self {
        self.rope = Some(rope);
        self
    }
    /// Checks the inputs for NaN/±∞ first ([`crate::finite`]).
    pub fn with_check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }
}

/// What a launch did: the choices made for the problem and device (all zero before a launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    /// KV splits.
    pub n_splits: usize,
    /// Keys per split.
    pub chunk: usize,
    /// Query rows per cube.
    pub rows: usize,
    /// Row blocks per (sequence, KV head).
    pub n_row_blocks: usize,
    /// Vector width of K/V loads.
    pub vec: usize,
    /// Threads per cube = keys per tile.
    pub tile: usize,
    /// Plane reductions in use.
    pub plane: bool,
    /// Load loops unrolled (devices that advertise plane ops, i.e. GPUs).
    pub unroll: bool,
    /// K tiles staged through shared memory (GPUs, when it fits).
    pub stage_k: bool,
    /// Each tile's V loads issued with its K loads (see [`crate::runtime::DecodeTuning`]).
    pub early_v: bool,
    /// Kernel launches (1 to 3).
    pub launches: usize,
    /// Index width: 32-bit unless some buffer holds 2³² elements or more.
    pub address: AddressType,
}

/// The outputs of [`decode_attention`] (or caller-owned buffers for [`decode_attention_into`]).
#[derive(Clone, Debug)]
pub struct DecodeOutput {
    /// `[B, Lq, Hq, D]`, storage dtype.
    pub o: DeviceTensor,
    /// `[B, Lq, Hq]`, f32, if requested.
    pub lse: Option<DeviceTensor>,
    /// `[B, Hkv, Lq, L_cap]`, f32, if requested.
    pub mass: Option<DeviceTensor>,
    /// What ran.
    pub plan: Plan,
}

impl DecodeOutput {
    /// Caller-owned output buffers for [`decode_attention_into`]; the plan is filled in by the launch.
    pub fn new(o: DeviceTensor, lse: Option<DeviceTensor>, mass: Option<DeviceTensor>) -> Self {
        DecodeOutput { o, lse, mass, plan: Plan::default() }
    }
}

/// Validated problem sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub b: usize,
    pub lq: usize,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub lcap: usize,
    pub max_len: usize,
    pub dtype: DType,
}

const TILE: usize = 128;

/// Whether `dtype` can be a storage dtype on this device (buffers and conversion to f32).
pub fn dtype_supported(client: &Client, dtype: DType) -> bool {
    let need = TypeUsage::Buffer | TypeUsage::Conversion;
    let uses = match dtype {
        DType::F32 => return true,
        DType::U32 => return false,
        DType::F16 => half::f16::supported_uses(client),
        DType::BF16 => half::bf16::supported_uses(client),
    };
    uses.is_superset(need)
}

/// The kernels decode attention launches.
pub(crate) const KERNELS: [&str; 4] = ["decode_split", "decode_combine", "mass_finalize", "copy_range"];

/// Checks every input (see the module docs for the contract); nothing is launched.
pub(crate) fn validate(client: &Client, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, lens: &[u32]) -> Result<Problem, Error> {
    crate::tensor::check_bindings(client, &KERNELS)?;
    // Layout first: a tensor whose strides do not match its rank is refused before any stride is read.
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        t.check_in_buffer(name)?;
    }
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.shape.len() != 4 {
            return Err(Error::Rank { tensor: name, expected: 4, got: t.shape.len() });
        }
    }
    let (b, lq, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (hkv, lcap) = (k.shape[1], k.shape[2]);
    if k.shape[0] != b || k.shape[3] != d {
        return Err(Error::ShapeMismatch { tensor: "k", expected: vec![b, hkv, lcap, d], got: k.shape.clone() });
    }
    if v.shape != k.shape {
        return Err(Error::ShapeMismatch { tensor: "v", expected: k.shape.clone(), got: v.shape.clone() });
    }
    if lens.len() != b {
        return Err(Error::ShapeMismatch { tensor: "lens", expected: vec![b], got: vec![lens.len()] });
    }
    let p = problem_of(client, b, lq, hq, hkv, d, lcap, q.dtype)?;
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dtype != q.dtype {
            return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: q.dtype });
        }
        if t.strides[3] != 1 {
            return Err(Error::Layout { tensor: name, reason: "the head dim must have unit stride" });
        }
    }
    for (batch, &len) in lens.iter().enumerate() {
        let len = len as usize;
        if len == 0 || len < lq {
            return Err(Error::ZeroLength { batch });
        }
        if len > lcap {
            return Err(Error::LengthBeyondCapacity { batch, len, capacity: lcap });
        }
    }
    let max_len = lens.iter().map(|&l| l as usize).max().unwrap_or(0);
    Ok(Problem { max_len, ..p })
}

/// The checks that depend on the sizes and dtype only; the problem at full length (`max_len = L_cap`).
#[allow(clippy::too_many_arguments)]
fn problem_of(client: &Client, b: usize, lq: usize, hq: usize, hkv: usize, d: usize, lcap: usize, dtype: DType) -> Result<Problem, Error> {
    if b == 0 || lq == 0 {
        return Err(Error::ShapeMismatch { tensor: "q", expected: vec![b.max(1), lq.max(1), hq, d], got: vec![b, lq, hq, d] });
    }
    if hkv == 0 || hq == 0 || hq % hkv != 0 {
        return Err(Error::GqaRatio { hq, hkv });
    }
    if d == 0 || d % 8 != 0 || d > 256 {
        return Err(Error::UnsupportedHeadDim { d });
    }
    if !dtype_supported(client, dtype) {
        return Err(Error::DtypeUnsupported { dtype, device: device_name(client) });
    }
    let units = crate::tensor::max_units_per_cube(client);
    if units < TILE {
        return Err(Error::DeviceLimit(format!("needs {TILE} units per cube, the device has {units}")));
    }
    Ok(Problem { b, lq, hq, hkv, d, lcap, max_len: lcap, dtype })
}

/// The device's name as tests and benches print it.
pub fn device_name(client: &Client) -> String {
    format!("{} | {}", client.name(), client.properties().identity.name)
}

/// Widest vector (≤ 16 bytes) dividing D (D/2 with RoPE), every K/V stride and offset.
fn vector_width(p: &Problem, kv: &KvLayout, rope: bool) -> usize {
    let max = 16 / p.dtype.size();
    let mut w = max;
    let dim = if rope { p.d / 2 } else { p.d };
    while w > 1 {
        if dim % w == 0 && kv.align % w == 0 {
            break;
        }
        w /= 2;
    }
    w
}

/// What the plan needs of the inputs' layout: the largest buffer any input lives in (index width) and the
/// greatest common divisor of the K/V offsets and outer strides (vector width; 0 when they are all 0).
pub(crate) struct KvLayout {
    largest: usize,
    align: usize,
}

impl KvLayout {
    fn of(q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor) -> Self {
        fn gcd(a: usize, b: usize) -> usize {
            if b == 0 {
                a
            } else {
                gcd(b, a % b)
            }
        }
        let align = [k, v].iter().flat_map(|t| std::iter::once(t.offset).chain(t.strides[..3].iter().copied())).fold(0, gcd);
        KvLayout { largest: q.buffer_len.max(k.buffer_len).max(v.buffer_len), align }
    }
}

/// The launch for `p` on this device; `rope`: the keys are rotated in the kernel (the vector width divides `D/2`,
/// and the angle table is staged in shared memory).
fn plan(client: &Client, p: &Problem, kv: &KvLayout, cfg: &DecodeConfig, rope: bool) -> Result<Plan, Error> {
    let hw = &client.properties().hardware;
    let r_total = p.hq / p.hkv * p.lq;
    let vec = vector_width(p, kv, rope);
    // Plane reductions and unrolled loads where cubecl advertises plane ops, or when forced for testing
    // ([`crate::runtime::force_gpu_paths`]).
    let forced = crate::runtime::force_gpu_paths();
    let plane_ops = forced || client.features().plane.contains(Plane::Ops);
    let plane_size = hw.plane_size_max as usize;
    let fixed_plane = hw.plane_size_min == hw.plane_size_max;
    let tab = if rope { p.d / 2 * 6 } else { 0 };
    let sms = hw.num_streaming_multiprocessors.unwrap_or(16) as usize;
    let tune = crate::runtime::decode_tuning();
    let mut rows = r_total.next_power_of_two().min(16);
    // Shared memory: q and the lane reduction (rows·D each), the probabilities and the max reduction
    // (rows·tile each), two small vectors, and with RoPE the angle table (`D/2·6`).
    let smem = |rows: usize| 4 * (2 * rows * p.d + 2 * rows * TILE + 2 * rows + tab);
    while rows > 1 && smem(rows) > hw.max_shared_memory_size {
        rows /= 2;
    }
    if smem(rows) > hw.max_shared_memory_size {
        return Err(Error::DeviceLimit(format!("needs {} B of shared memory, the device has {}", smem(rows), hw.max_shared_memory_size)));
    }
    let n_rb = r_total.div_ceil(rows);
    // Several cubes per SM (memory latency needs many loads in flight; `DecodeTuning::cubes_per_sm`), but never
    // splits shorter than two tiles.
    let n_splits = split_count(cfg, p, p.b * p.hkv * n_rb, tune.cubes_per_sm * sms, 2 * TILE, TILE)?;
    let chunk = p.max_len.div_ceil(n_splits).div_ceil(TILE) * TILE;
    let n_splits = p.max_len.div_ceil(chunk);
    let plane = plane_ops && fixed_plane && TILE % plane_size == 0;
    // One launch writes `o` and at most one f32 output (the binding limit, see the module docs).
    let single = n_splits == 1 && (!cfg.mass || n_rb == 1) && !(cfg.mass && cfg.lse);
    let launches = if single { 1 } else { 2 + cfg.mass as usize };
    let address = address_of(client, p, kv, n_splits, single, cfg.mass, rope)?;
    let unroll = plane_ops;
    let staged = TILE * (p.d / vec + 1) * vec * p.dtype.size();
    let stage_k = unroll && tune.stage_k && smem(rows) + staged <= hw.max_shared_memory_size;
    let early_v = unroll && tune.early_v.unwrap_or(n_splits * p.b * p.hkv * n_rb <= 2 * sms);
    Ok(Plan { n_splits, chunk, rows, n_row_blocks: n_rb, vec, tile: TILE, plane, unroll, stage_k, early_v, launches, address })
}

/// The split count: `cfg.splits` (at most one split per `grain` keys, the kernel's step), or enough splits for
/// `target` cubes over `base` cubes per split, never shorter than `min_chunk` keys; at most [`MAX_SPLITS`].
fn split_count(cfg: &DecodeConfig, p: &Problem, base: usize, target: usize, min_chunk: usize, grain: usize) -> Result<usize, Error> {
    match cfg.splits {
        Some(0) => Err(Error::Config("splits must be at least 1")),
        Some(n) => Ok(n.min(p.max_len.div_ceil(grain)).clamp(1, MAX_SPLITS)),
        None => Ok(target.div_ceil(base).min(p.max_len.div_ceil(min_chunk)).clamp(1, MAX_SPLITS)),
    }
}

/// The index width for the inputs' buffers and the scratch (scores, partials, packed positions).
fn address_of(client: &Client, p: &Problem, kv: &KvLayout, n_splits: usize, single: bool, mass: bool, rope: bool) -> Result<AddressType, Error> {
    let work = WorkLayout::new(p, n_splits, single, mass, rope).len;
    let packed = if rope { p.b * (1 + p.lq + p.hkv * p.lcap) } else { 0 };
    let largest = kv.largest.max(work).max(packed);
    let address = AddressType::from_len(largest);
    if !client.features().supports_address(address) {
        return Err(Error::DeviceLimit(format!("{largest} elements need {address} indexing, which this device lacks")));
    }
    Ok(address)
}

/// Dense decode attention over a (possibly ragged, possibly strided) batch, allocating the outputs; see the
/// module docs.
pub fn decode_attention(client: &Client, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, lens: &[u32], cfg: &DecodeConfig) -> Result<DecodeOutput, Error> {
    let p = validate(client, q, k, v, lens)?;
    let empty = |shape: &[usize], dtype: DType| DeviceTensor::empty(client, shape, dtype);
    let mut out = DecodeOutput::new(
        empty(&[p.b, p.lq, p.hq, p.d], p.dtype)?,
        cfg.lse.then(|| empty(&[p.b, p.lq, p.hq], DType::F32)).transpose()?,
        cfg.mass.then(|| empty(&[p.b, p.hkv, p.lq, p.lcap], DType::F32)).transpose()?,
    );
    run(client, &p, q, k, v, lens, cfg, &mut out)?;
    Ok(out)
}

/// Like [`decode_attention`], writing into caller-owned outputs (an engine's preallocated buffers): `out.o`
/// must be a `[B, Lq, Hq, D]` tensor of the query's dtype, `out.lse` / `out.mass` f32 tensors of their shapes,
/// each contiguous from its own element offset (views of a larger buffer are written in place, nothing around
/// them), present exactly when `cfg` requests them. `out.plan` is set to what ran. On error
/// nothing is launched and the outputs are untouched.
pub fn decode_attention_into(client: &Client, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, lens: &[u32], cfg: &DecodeConfig, out: &mut DecodeOutput) -> Result<(), Error> {
    let p = validate(client, q, k, v, lens)?;
    run(client, &p, q, k, v, lens, cfg, out)
}

/// The config's scalar checks (scale; RoPE positions against the problem).
fn check_config(p: &Problem, cfg: &DecodeConfig) -> Result<(), Error> {
    if let Some(s) = cfg.scale {
        if !s.is_finite() {
            return Err(Error::Config("scale must be finite"));
        }
    }
    if let Some(rope) = &cfg.rope {
        crate::rope::validate(rope, p.b, p.lq, p.hkv, p.lcap)?;
    }
    Ok(())
}

/// Checks caller-owned outputs against the problem: present exactly when requested, their shapes and dtypes,
/// contiguous from their offset, inside their buffers.
fn check_outputs(p: &Problem, lse: bool, mass: bool, out: &DecodeOutput) -> Result<(), Error> {
    let check_out = |t: Option<&DeviceTensor>, name: &'static str, want: bool, shape: Vec<usize>, dtype: DType| -> Result<(), Error> {
        match (t, want) {
            (None, false) => Ok(()),
            (Some(_), false) => Err(Error::Config("an output was given that the config does not request")),
            (None, true) => Err(Error::Config("the config requests an output that was not given")),
            (Some(t), true) => {
                t.check_in_buffer(name)?;
                if t.shape != shape {
                    return Err(Error::ShapeMismatch { tensor: name, expected: shape, got: t.shape.clone() });
                }
                if t.dtype != dtype {
                    return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: dtype });
                }
                if !t.is_contiguous() {
                    return Err(Error::Layout { tensor: name, reason: "outputs must be contiguous" });
                }
                Ok(())
            }
        }
    };
    check_out(Some(&out.o), "o", true, vec![p.b, p.lq, p.hq, p.d], p.dtype)?;
    check_out(out.lse.as_ref(), "lse", lse, vec![p.b, p.lq, p.hq], DType::F32)?;
    check_out(out.mass.as_ref(), "mass", mass, vec![p.b, p.hkv, p.lq, p.lcap], DType::F32)
}

/// The checks that depend on the config and the outputs, then the launch (inputs already validated into `p`).
#[allow(clippy::too_many_arguments)]
fn run(client: &Client, p: &Problem, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, lens: &[u32], cfg: &DecodeConfig, out: &mut DecodeOutput) -> Result<(), Error> {
    check_config(p, cfg)?;
    check_outputs(p, cfg.lse, cfg.mass, out)?;
    let plan = plan(client, p, &KvLayout::of(q, k, v), cfg, cfg.rope.is_some())?;
    if cfg.check_finite {
        check_finite(client, "q", q, None)?;
        check_finite(client, "k", k, Some(lens))?;
        check_finite(client, "v", v, Some(lens))?;
    }
    let scratch = Scratch::new(client, p, &plan, cfg.mass, cfg.rope.as_ref().map(|r| r.base))?;
    let lens_t = DeviceTensor::from_host(client, lens, &[lens.len()])?;
    let rope = cfg.rope.as_ref().map(|r| (&r.q_pos, &r.k_pos));
    let ints = Ints::of(client, p, &lens_t, rope, scratch.ints.as_ref())?;
    launch_unchecked(client, p, &plan, &scratch, q, k, v, &ints, cfg.scale, out);
    out.plan = plan;
    let mut written = vec![&out.o];
    written.extend(out.lse.iter().chain(out.mass.iter()));
    check_written(client, &written)
}

/// The shape of a [`DecodePlan`]: `q: [batch, lq, hq, d]` against `k, v: [batch, hkv, l_cap, d]`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct DecodeShape {
    /// Sequences.
    pub batch: usize,
    /// Query tokens per sequence.
    pub lq: usize,
    /// Query heads.
    pub hq: usize,
    /// KV heads.
    pub hkv: usize,
    /// Head dim.
    pub d: usize,
    /// K/V capacity per sequence (dim 2 of K/V); lengths may be anything up to it.
    pub l_cap: usize,
    /// Storage dtype of q, K, V and o.
    pub dtype: DType,
    /// RoPE inside the kernel with this base (positions come with each run); `None`: no rotation.
    pub rope_base: Option<f64>,
}

impl DecodeShape {
    /// A shape without RoPE.
    pub fn new(batch: usize, lq: usize, hq: usize, hkv: usize, d: usize, l_cap: usize, dtype: DType) -> Self {
        DecodeShape { batch, lq, hq, hkv, d, l_cap, dtype, rope_base: None }
    }
    /// Rotates q and K inside the kernel with this base.
    pub fn with_rope(mut self, base: f64) -> Self {
        self.rope_base = Some(base);
        self
    }
}

/// Decode attention planned once and run many times (FlashInfer's plan/run split): [`DecodePlan::new`] validates
/// the shape, chooses the launch ([`Plan`]), allocates the outputs and every scratch buffer and uploads the RoPE
/// table; [`DecodePlan::run`] is a shape check plus launches — no allocation, no host→device upload, no
/// read-back — so an engine can call (or capture) it on every step. Lengths live on the device
/// (`lens: [B]` u32), so the plan covers any lengths up to `l_cap`: the split count is chosen for `l_cap`, and
/// splits past a sequence's length do no work. A length outside `[lq, l_cap]` (an inactive slot) gives a
/// zero output row and zero mass; the kernels never read past `l_cap`.
pub struct DecodePlan {
    client: Client,
    p: Problem,
    plan: Plan,
    shape: DecodeShape,
    scale: Option<f32>,
    scratch: Scratch,
    out: DecodeOutput,
}

impl DecodePlan {
    /// Plans `shape` with `cfg`'s scale, outputs (lse, mass) and splits; `cfg.rope` must be `None` (the base is
    /// `shape.rope_base`, the positions come with each run) and `cfg.check_finite` off (a check reads back).
    pub fn new(client: &Client, shape: DecodeShape, cfg: &DecodeConfig) -> Result<Self, Error> {
        crate::tensor::check_bindings(client, &KERNELS)?;
        if cfg.rope.is_some() || cfg.check_finite {
            return Err(Error::Config("a plan takes its RoPE base from the shape and cannot check values (no read-back)"));
        }
        let DecodeShape { batch: b, lq, hq, hkv, d, l_cap, dtype, rope_base } = shape;
        if rope_base.is_some_and(|x| !x.is_finite() || x <= 1.0) {
            return Err(Error::Config("RoPE base must be finite and > 1"));
        }
        if l_cap == 0 || l_cap >= u32::MAX as usize {
            return Err(Error::Config("l_cap must be at least 1 and fit u32 lengths"));
        }
        let p = problem_of(client, b, lq, hq, hkv, d, l_cap, dtype)?;
        // Contiguous K/V of this shape: its buffer's length bounds the index width, and every vector width fits.
        let (_, kv_bytes) = crate::tensor::checked_size(client, "K/V of the plan", &[b, hkv, l_cap, d], dtype)?;
        let layout = KvLayout { largest: (kv_bytes / dtype.size()).max(b * lq * hq * d), align: 0 };
        let plan_cfg = DecodeConfig { rope: None, ..cfg.clone() };
        let plan = plan(client, &p, &layout, &plan_cfg, rope_base.is_some())?;
        check_config(&p, &plan_cfg)?;
        let scratch = Scratch::new(client, &p, &plan, cfg.mass, rope_base)?;
        let out = DecodeOutput {
            o: DeviceTensor::empty(client, &[b, lq, hq, d], dtype)?,
            lse: cfg.lse.then(|| DeviceTensor::empty(client, &[b, lq, hq], DType::F32)).transpose()?,
            mass: cfg.mass.then(|| DeviceTensor::empty(client, &[b, hkv, lq, l_cap], DType::F32)).transpose()?,
            plan,
        };
        check_written(client, &[&out.o])?;
        Ok(DecodePlan { client: client.clone(), p, plan, shape, scale: cfg.scale, scratch, out })
    }

    /// The shape planned.
    pub fn shape(&self) -> &DecodeShape {
        &self.shape
    }

    /// The plan's outputs (written by [`DecodePlan::run`]; valid until the next run).
    pub fn output(&self) -> &DecodeOutput {
        &self.out
    }

    /// Runs the plan: `q: [B, Lq, Hq, D]` (any strides with a unit innermost one, any offset), `k, v: [B, Hkv,
    /// L_cap, D]` (unit innermost stride; other strides and offset multiples of the planned vector width), `lens:
    /// [B]` u32 on the device, and with RoPE `positions = (q_pos: [B, Lq], k_pos: [B, L_cap] or [B, Hkv, L_cap])`
    /// u32. Checks shapes, dtypes and layouts (host metadata only), then launches; returns the outputs.
    pub fn run(&mut self, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, lens: &DeviceTensor, positions: Option<(&DeviceTensor, &DeviceTensor)>) -> Result<&DecodeOutput, Error> {
        let p = &self.p;
        let want_q = [p.b, p.lq, p.hq, p.d];
        let want_kv = [p.b, p.hkv, p.lcap, p.d];
        for (name, t, shape) in [("q", q, &want_q), ("k", k, &want_kv), ("v", v, &want_kv)] {
            t.check_in_buffer(name)?;
            if t.shape != shape {
                return Err(Error::ShapeMismatch { tensor: name, expected: shape.to_vec(), got: t.shape.clone() });
            }
            if t.dtype != p.dtype {
                return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: p.dtype });
            }
            if t.strides[3] != 1 {
                return Err(Error::Layout { tensor: name, reason: "the head dim must have unit stride" });
            }
            if AddressType::from_len(t.buffer_len) > self.plan.address {
                return Err(Error::Layout { tensor: name, reason: "buffer larger than the plan's index width" });
            }
        }
        let w = self.plan.vec;
        for (name, t) in [("k", k), ("v", v)] {
            if t.offset % w != 0 || t.strides[..3].iter().any(|s| s % w != 0) {
                return Err(Error::Layout { tensor: name, reason: "offset and strides must be multiples of the plan's vector width" });
            }
        }
        lens.check_in_buffer("lens")?;
        if lens.shape != [p.b] || lens.dtype != DType::U32 {
            return Err(Error::ShapeMismatch { tensor: "lens", expected: vec![p.b], got: lens.shape.clone() });
        }
        match (positions, self.shape.rope_base) {
            (None, None) => {}
            (Some((q_pos, k_pos)), Some(base)) => {
                crate::rope::validate(&RopeConfig { base, q_pos: q_pos.clone(), k_pos: k_pos.clone() }, p.b, p.lq, p.hkv, p.lcap)?;
            }
            _ => return Err(Error::Config("RoPE positions are given exactly when the plan has a RoPE base")),
        }
        for (name, t) in [("lens", Some(lens)), ("q_pos", positions.map(|x| x.0)), ("k_pos", positions.map(|x| x.1))] {
            if t.is_some_and(|t| AddressType::from_len(t.buffer_len) > self.plan.address) {
                return Err(Error::Layout { tensor: name, reason: "buffer larger than the plan's index width" });
            }
        }
        let ints = Ints::of(&self.client, p, lens, positions, self.scratch.ints.as_ref())?;
        launch_unchecked(&self.client, p, &self.plan, &self.scratch, q, k, v, &ints, self.scale, &self.out);
        Ok(&self.out)
    }
}

/// Where the f32 scratch of one launch keeps its regions (element offsets into one buffer): the RoPE table at 0,
/// the scores for the mass, the split partials and the rows' `(m, l)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WorkLayout {
    sc: usize,
    op: usize,
    ml: usize,
    rml: usize,
    len: usize,
}

impl WorkLayout {
    fn new(p: &Problem, n_splits: usize, single: bool, mass: bool, rope: bool) -> Self {
        let rows = p.b * p.hkv * (p.hq / p.hkv * p.lq);
        let tab = if rope { p.d / 2 * 6 } else { 0 };
        let scores = if mass { rows * p.lcap } else { 0 };
        let (parts, mls, rml) = if single { (0, 0, 0) } else { (rows * n_splits * p.d, rows * n_splits * 2, rows * 2) };
        let sc = tab;
        let op = sc + scores;
        let ml = op + parts;
        let rml_at = ml + mls;
        WorkLayout { sc, op, ml, rml: rml_at, len: (rml_at + rml).max(1) }
    }
}

/// Scratch of one planned launch: `work` (see [`WorkLayout`]; the RoPE table is written at planning), a
/// one-element stand-in for the buffers a variant does not use, and, with RoPE, the buffer `DecodePlan::run`
/// packs the lengths and positions into when the caller's are not views of one buffer. Every other element a
/// kernel reads is written by an earlier kernel of the same launch sequence, so nothing else is initialised.
pub(crate) struct Scratch {
    dummy: DeviceTensor,
    work: DeviceTensor,
    at: WorkLayout,
    /// `[B | B·Lq | B·Hkv·L_cap]` u32 (RoPE plans only).
    ints: Option<DeviceTensor>,
}

impl Scratch {
    fn new(client: &Client, p: &Problem, plan: &Plan, mass: bool, rope_base: Option<f64>) -> Result<Self, Error> {
        let at = WorkLayout::new(p, plan.n_splits, plan.launches == 1, mass, rope_base.is_some());
        let work = DeviceTensor::empty(client, &[at.len], DType::F32)?;
        let dummy = DeviceTensor::empty(client, &[1], DType::F32)?;
        let mut ints = None;
        if let Some(base) = rope_base {
            let tab = angle_table(base, p.d);
            let t = DeviceTensor::from_host(client, &tab, &[tab.len()])?;
            copy_into(client, &t, &work, 0);
            ints = Some(DeviceTensor::empty(client, &[p.b * (1 + p.lq + p.hkv * p.lcap)], DType::U32)?);
        }
        Ok(Scratch { dummy, work, at, ints })
    }
}

/// Copies the elements of contiguous `src` into `dst` from element `at` (one launch).
fn copy_into(client: &Client, src: &DeviceTensor, dst: &DeviceTensor, at: usize) {
    let n: usize = src.shape.iter().product();
    crate::tensor::count_launches(1);
    // SAFETY: the caller sizes `dst` to hold `at + n` elements of `src`'s dtype; `src` is a checked view.
    unsafe {
        let count = CubeCount::Static(n.div_ceil(256).clamp(1, 1024) as u32, 1, 1);
        match src.dtype {
            DType::U32 => copy_range::launch_unchecked::<u32>(client, count, CubeDim::new_1d(256), buf(src), buf(dst), src.offset, at, n),
            _ => copy_range::launch_unchecked::<f32>(client, count, CubeDim::new_1d(256), buf(src), buf(dst), src.offset, at, n),
        }
    }
}

/// Where the kernels read the lengths and positions: one u32 buffer and the element offsets of `lens`, `q_pos`
/// and `k_pos` in it (with the strides of `k_pos` over batch and KV head).
pub(crate) struct Ints<'a> {
    buf: &'a DeviceTensor,
    lens: usize,
    q_pos: usize,
    k_pos: usize,
    kp_strides: (usize, usize),
}

impl<'a> Ints<'a> {
    /// `lens` and, with RoPE, the positions: bound as they are when they share a buffer; otherwise copied into
    /// `pack` (sized `B + B·Lq + B·Hkv·L_cap`).
    fn of(client: &Client, p: &Problem, lens: &'a DeviceTensor, rope: Option<(&'a DeviceTensor, &'a DeviceTensor)>, pack: Option<&'a DeviceTensor>) -> Result<Self, Error> {
        let Some((qp, kp)) = rope else {
            return Ok(Ints { buf: lens, lens: lens.offset, q_pos: 0, k_pos: 0, kp_strides: (0, 0) });
        };
        let kp_strides = if kp.shape.len() == 3 { (p.hkv * p.lcap, p.lcap) } else { (p.lcap, 0) };
        if lens.same_buffer(qp) && lens.same_buffer(kp) {
            return Ok(Ints { buf: lens, lens: lens.offset, q_pos: qp.offset, k_pos: kp.offset, kp_strides });
        }
        let pack = pack.ok_or(Error::Config("RoPE positions need a plan with a RoPE base"))?;
        // The copy indexes with 32 bits.
        for (name, t) in [("lens", lens), ("q_pos", qp), ("k_pos", kp)] {
            if t.buffer_len >= u32::MAX as usize {
                return Err(Error::Layout { tensor: name, reason: "a buffer of 2^32 elements or more cannot be copied into the plan: pass lens and positions as views of one buffer" });
            }
        }
        let (at_q, at_k) = (p.b, p.b + p.b * p.lq);
        copy_into(client, lens, pack, 0);
        copy_into(client, qp, pack, at_q);
        copy_into(client, kp, pack, at_k);
        Ok(Ints { buf: pack, lens: 0, q_pos: at_q, k_pos: at_k, kp_strides })
    }
}

/// Launches with validated inputs (assumes [`validate`], [`plan`] and the output checks accepted them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_unchecked(client: &Client, p: &Problem, plan: &Plan, sc: &Scratch, q: &DeviceTensor, k: &DeviceTensor, v: &DeviceTensor, ints: &Ints<'_>, scale: Option<f32>, out: &DecodeOutput) {
    with_float_type!(p.dtype, E => launch_typed::<E>(client, p, plan, sc, q, k, v, ints, scale, out))
}

fn buf(t: &DeviceTensor) -> BufferArg {
    // SAFETY: the length is the buffer's element count, so the kernel's accesses (validated views) are in bounds.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), t.buffer_len) }
}

#[allow(clippy::too_many_arguments)]
fn launch_typed<E: Float + CubeElement>(
    client: &Client,
    p: &Problem,
    plan: &Plan,
    sc: &Scratch,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    ints: &Ints<'_>,
    scale: Option<f32>,
    out: &DecodeOutput,
) {
    let g = p.hq / p.hkv;
    let r_total = g * p.lq;
    let dummy = &sc.dummy;
    let (o, lse, mass) = (&out.o, out.lse.as_ref(), out.mass.as_ref());
    let single = plan.launches == 1;
    let at = sc.at;
    let work = &sc.work;
    let vw = plan.vec;
    let rope = sc.ints.is_some();
    let scfg = SplitConfig {
        d: p.d,
        vec: vw,
        tile: plan.tile,
        rows: plan.rows,
        single,
        lse: single && lse.is_some(),
        mass: mass.is_some(),
        plane: plan.plane,
        unroll: plan.unroll,
        stage_k: plan.stage_k,
        rope,
        early_v: plan.early_v,
    };
    let scale = scale.unwrap_or(1.0 / (p.d as f32).sqrt());
    // The single launch's f32 output: the lse or the mass (the plan never makes one launch write both).
    let stat = if single { lse.or(mass) } else { None };
    let count = CubeCount::Static(plan.n_splits as u32, p.hkv as u32, (p.b * plan.n_row_blocks) as u32);
    let finalize = !single && mass.is_some();
    crate::tensor::count_launches(if single { 1 } else { 2 + usize::from(finalize) });
    // SAFETY: every index the kernels form is inside a validated view or an allocation sized above.
    unsafe {
        decode_split::launch_unchecked::<E>(
            client,
            count,
            CubeDim::new_1d(plan.tile as u32),
            plan.address,
            vw,
            buf(q),
            buf(k),
            buf(v),
            buf(ints.buf),
            if single { buf(o) } else { buf(dummy) },
            buf(stat.unwrap_or(dummy)),
            buf(work),
            ints.lens,
            ints.q_pos,
            ints.k_pos,
            ints.kp_strides.0,
            ints.kp_strides.1,
            q.offset,
            q.strides[0],
            q.strides[1],
            q.strides[2],
            o.offset,
            stat.map_or(0, |t| t.offset),
            at.sc,
            at.op,
            at.ml,
            k.offset / vw,
            k.strides[0] / vw,
            k.strides[1] / vw,
            k.strides[2] / vw,
            v.offset / vw,
            v.strides[0] / vw,
            v.strides[1] / vw,
            v.strides[2] / vw,
            p.hkv,
            g,
            p.lq,
            p.lcap,
            plan.chunk,
            plan.n_splits,
            plan.n_row_blocks,
            scale,
            scfg,
        );
        if !single {
            decode_combine::launch_unchecked::<E>(
                client,
                CubeCount::Static((p.hkv * r_total) as u32, p.b as u32, 1),
                CubeDim::new_1d(p.d as u32),
                plan.address,
                buf(work),
                buf(o),
                buf(lse.unwrap_or(dummy)),
                at.op,
                at.ml,
                at.rml,
                o.offset,
                lse.map_or(0, |t| t.offset),
                p.hkv,
                g,
                p.lq,
                plan.n_splits,
                p.d,
                lse.is_some(),
            );
            if let Some(mass) = mass {
                mass_finalize::launch_unchecked(
                    client,
                    CubeCount::Static(p.lcap.div_ceil(plan.tile) as u32, (p.hkv * p.lq) as u32, p.b as u32),
                    CubeDim::new_1d(plan.tile as u32),
                    plan.address,
                    buf(work),
                    buf(ints.buf),
                    buf(mass),
                    at.sc,
                    at.rml,
                    ints.lens,
                    mass.offset,
                    p.hkv,
                    g,
                    p.lq,
                    p.lcap,
                    plan.tile,
                );
            }
        }
    }
}

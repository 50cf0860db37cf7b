//! `kvsqueeze replay`: runs a recorded decode stream through one policy cache on the device and records, per
//! step, the attention output and the kept original positions — so researchers can check their own
//! implementation against ours.
//!
//! Trace (safetensors): `q: [steps, Hq, D]`, `k: [steps, Hkv, D]`, `v: [steps, Hkv, D]`, all f32, f16 or bf16
//! (the same dtype; it is the cache's storage dtype). Keys pre-RoPE if `--rope` is given.
//! Output (safetensors): `o: [steps, Hq, D]` f32 and `kept: [steps, Hkv, budget]` i32, each row the kept
//! original positions in cache order, padded with −1 while the cache is filling.

use crate::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use crate::tensor::{DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

/// What to replay with.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The policy.
    pub policy: Policy,
    /// Its layout (capacity = budget).
    pub layout: Layout,
    /// RoPE base (keys rotated by cache rank), if any.
    pub rope: Option<f64>,
}

/// The result of a replay.
#[derive(Clone, Debug)]
pub struct ReplayOutput {
    /// `[steps, Hq, D]`.
    pub o: Vec<f32>,
    /// `[steps, Hkv, budget]`, −1 padded.
    pub kept: Vec<i32>,
    /// `(steps, Hq, Hkv, D)`.
    pub dims: (usize, usize, usize, usize),
}

/// Parses a policy name: `full`, `streaming-llm`, `h2o`, `tova`, `treekv`, `treekv-select-left`, `weightedkv`.
pub fn parse_policy(name: &str) -> Option<Policy> {
    Some(match name {
        "full" => Policy::Full,
        "streaming-llm" | "streamingllm" => Policy::StreamingLlm,
        "h2o" => Policy::H2o,
        "tova" => Policy::Tova,
        "treekv" => Policy::TreeKv { select_left: false },
        "treekv-select-left" => Policy::TreeKv { select_left: true },
        "weightedkv" => Policy::WeightedKv,
        _ => return None,
    })
}

fn dtype_of(d: StDtype) -> Result<DType, Error> {
    match d {
        StDtype::F32 => Ok(DType::F32),
        StDtype::F16 => Ok(DType::F16),
        StDtype::BF16 => Ok(DType::BF16),
        _ => Err(Error::Config("trace tensors must be f32, f16 or bf16")),
    }
}

/// Replays `trace` (the bytes of a safetensors file) on `client`.
pub fn replay(client: &Client, trace: &[u8], opts: &ReplayOptions) -> Result<ReplayOutput, Error> {
    let st = SafeTensors::deserialize(trace).map_err(|_| Error::Config("not a safetensors file"))?;
    let get = |name: &'static str| st.tensor(name).map_err(|_| Error::ShapeMismatch { tensor: name, expected: vec![0, 0, 0], got: vec![] });
    let (q, k, v) = (get("q")?, get("k")?, get("v")?);
    let dtype = dtype_of(q.dtype())?;
    for (name, t) in [("k", &k), ("v", &v)] {
        if dtype_of(t.dtype())? != dtype {
            return Err(Error::DtypeMismatch { tensor: name, got: dtype_of(t.dtype())?, expected: dtype });
        }
    }
    if q.shape().len() != 3 || k.shape().len() != 3 || k.shape() != v.shape() || q.shape()[0] != k.shape()[0] || q.shape()[2] != k.shape()[2] {
        return Err(Error::ShapeMismatch { tensor: "k", expected: vec![q.shape()[0], 0, *q.shape().last().unwrap_or(&0)], got: k.shape().to_vec() });
    }
    let (steps, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let hkv = k.shape()[1];
    let mut cfg = PolicyCacheConfig::new(opts.policy, opts.layout, 1, hq, hkv, d, dtype);
    if let Some(base) = opts.rope {
        cfg = cfg.with_rope(base);
    }
    let mut cache = PolicyCache::new(client, cfg)?;
    let budget = opts.layout.capacity();
    let es = dtype.size();
    let upload = |bytes: &[u8], shape: &[usize]| DeviceTensor {
        handle: client.create_from_slice(bytes),
        buffer_len: shape.iter().product(),
        shape: shape.to_vec(),
        strides: crate::tensor::contiguous_strides(shape),
        offset: 0,
        dtype,
    };
    let mut out = ReplayOutput { o: Vec::with_capacity(steps * hq * d), kept: Vec::with_capacity(steps * hkv * budget), dims: (steps, hq, hkv, d) };
    for t in 0..steps {
        let qt = upload(&q.data()[t * hq * d * es..][..hq * d * es], &[1, 1, hq, d]);
        let kt = upload(&k.data()[t * hkv * d * es..][..hkv * d * es], &[1, hkv, d]);
        let vt = upload(&v.data()[t * hkv * d * es..][..hkv * d * es], &[1, hkv, d]);
        let o = cache.step(&qt, &kt, &vt)?;
        out.o.extend(o.to_host_f64(client)?.into_iter().map(|x| x as f32));
        for head in &cache.kept_positions()?[0] {
            out.kept.extend(head.iter().map(|&p| p as i32));
            out.kept.extend(std::iter::repeat_n(-1, budget - head.len()));
        }
    }
    Ok(out)
}

/// Serialises a replay as safetensors (`o` f32, `kept` i32).
pub fn to_safetensors(out: &ReplayOutput, budget: usize) -> Result<Vec<u8>, Error> {
    let (steps, hq, hkv, d) = out.dims;
    let o_bytes: &[u8] = bytemuck::cast_slice(&out.o);
    let k_bytes: &[u8] = bytemuck::cast_slice(&out.kept);
    let o = TensorView::new(StDtype::F32, vec![steps, hq, d], o_bytes).map_err(|_| Error::Config("output shape"))?;
    let kept = TensorView::new(StDtype::I32, vec![steps, hkv, budget], k_bytes).map_err(|_| Error::Config("output shape"))?;
    safetensors::serialize(vec![("o", o), ("kept", kept)], None).map_err(|_| Error::Config("serialise"))
}

//! `kvsqueeze replay`: runs a recorded decode stream through one policy cache on the device and records, per
//! step, the attention output and the kept original positions — so researchers can check their own
//! implementation against ours.
//!
//! Trace (safetensors): `q: [steps, Hq, D]`, `k: [steps, Hkv, D]`, `v: [steps, Hkv, D]`, all f32, f16 or bf16
//! (the same dtype; it is the cache's storage dtype). Keys pre-RoPE if `--rope` is given.
//! Output (safetensors): `o: [steps, Hq, D]` f32 and `kept: [steps, Hkv, budget]` i32, each row the kept
//! original positions in cache order, padded with −1 while the cache is filling.

use crate::output::AtomicFile;
use crate::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use crate::tensor::{DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

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

/// The sizes of a replay: `(steps, Hq, Hkv, D)`.
pub type ReplayDims = (usize, usize, usize, usize);

fn dtype_of(d: StDtype) -> Result<DType, Error> {
    match d {
        StDtype::F32 => Ok(DType::F32),
        StDtype::F16 => Ok(DType::F16),
        StDtype::BF16 => Ok(DType::BF16),
        other => Err(Error::BadInput(format!("trace tensors must be f32, f16 or bf16, not {other:?}"))),
    }
}

fn st_err(e: safetensors::SafeTensorError) -> Error {
    Error::BadInput(format!("not a readable safetensors trace: {e}"))
}

/// Validates a trace's tensors and returns them with their sizes.
fn trace_tensors<'a>(st: &'a SafeTensors<'a>) -> Result<([TensorView<'a>; 3], DType, ReplayDims), Error> {
    let get = |name: &str| st.tensor(name).map_err(|_| Error::BadInput(format!("the trace has no tensor `{name}` (it needs q [steps, Hq, D], k and v [steps, Hkv, D])")));
    let (q, k, v) = (get("q")?, get("k")?, get("v")?);
    let dtype = dtype_of(q.dtype())?;
    for (name, t) in [("k", &k), ("v", &v)] {
        if dtype_of(t.dtype())? != dtype {
            return Err(Error::DtypeMismatch { tensor: name, got: dtype_of(t.dtype())?, expected: dtype });
        }
    }
    let [steps, hq, d] = *q.shape() else {
        return Err(Error::BadInput(format!("`q` has shape {:?}; it must be [steps, Hq, D]", q.shape())));
    };
    let [ks, hkv, kd] = *k.shape() else {
        return Err(Error::BadInput(format!("`k` has shape {:?}; it must be [steps, Hkv, D]", k.shape())));
    };
    if ks != steps || kd != d {
        return Err(Error::ShapeMismatch { tensor: "k", expected: vec![steps, hkv, d], got: k.shape().to_vec() });
    }
    if v.shape() != k.shape() {
        return Err(Error::ShapeMismatch { tensor: "v", expected: k.shape().to_vec(), got: v.shape().to_vec() });
    }
    if steps == 0 {
        return Err(Error::BadInput("the trace has no steps".into()));
    }
    Ok(([q, k, v], dtype, (steps, hq, hkv, d)))
}

/// Reads a trace's sizes without running it (so a command can size and create its output first).
pub fn trace_dims(trace: &[u8]) -> Result<ReplayDims, Error> {
    let st = SafeTensors::deserialize(trace).map_err(st_err)?;
    Ok(trace_tensors(&st)?.2)
}

/// Replays `trace` (the bytes of a safetensors file) on `client`, handing every step's output `o: [Hq, D]` (f32)
/// and kept positions `kept: [Hkv, budget]` (−1 padded) to `sink` as it goes (nothing is accumulated), and
/// `(done, total)` to `progress`. The cache checks every input for NaN/±∞ ([`crate::finite`]): a non-finite
/// trace is refused at the step that holds it. Returns the sizes.
pub fn replay(
    client: &Client,
    trace: &[u8],
    opts: &ReplayOptions,
    sink: &mut dyn FnMut(usize, &[f32], &[i32]) -> Result<(), Error>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ReplayDims, Error> {
    let st = SafeTensors::deserialize(trace).map_err(st_err)?;
    let ([q, k, v], dtype, dims) = trace_tensors(&st)?;
    let (steps, hq, hkv, d) = dims;
    let mut cfg = PolicyCacheConfig::new(opts.policy, opts.layout, 1, hq, hkv, d, dtype).with_check_finite(true);
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
    let mut kept = Vec::with_capacity(hkv * budget);
    for t in 0..steps {
        let qt = upload(&q.data()[t * hq * d * es..][..hq * d * es], &[1, 1, hq, d]);
        let kt = upload(&k.data()[t * hkv * d * es..][..hkv * d * es], &[1, hkv, d]);
        let vt = upload(&v.data()[t * hkv * d * es..][..hkv * d * es], &[1, hkv, d]);
        let o: Vec<f32> = cache.step(&qt, &kt, &vt)?.to_host_f64(client)?.into_iter().map(|x| x as f32).collect();
        kept.clear();
        for head in &cache.kept_positions()?[0] {
            kept.extend(head.iter().map(|&p| p as i32));
            kept.extend(std::iter::repeat_n(-1, budget - head.len()));
        }
        sink(t, &o, &kept)?;
        progress(t + 1, steps);
    }
    Ok(dims)
}

/// A replay's output file, written as the replay streams: the safetensors header first (`o: [steps, Hq, D]` f32,
/// then `kept: [steps, Hkv, budget]` i32), then each step's rows at their offsets; memory stays one step's rows.
/// Created exclusively beside the destination and renamed over it by [`ReplayWriter::finish`] ([`AtomicFile`]).
pub struct ReplayWriter {
    file: AtomicFile,
    data_start: u64,
    o_row: usize,
    kept_row: usize,
    steps: usize,
}

impl ReplayWriter {
    /// Creates the output for a replay of `dims` at `budget` (before the run: a bad destination fails here).
    pub fn create(dest: &Path, dims: ReplayDims, budget: usize) -> Result<Self, Error> {
        let (steps, hq, hkv, d) = dims;
        let o_row = hq.checked_mul(d).and_then(|x| x.checked_mul(4)).ok_or(Error::BadInput("trace sizes overflow".into()))?;
        let kept_row = hkv.checked_mul(budget).and_then(|x| x.checked_mul(4)).ok_or(Error::BadInput("output sizes overflow".into()))?;
        let o_bytes = o_row.checked_mul(steps).ok_or(Error::BadInput("output sizes overflow".into()))?;
        let kept_bytes = kept_row.checked_mul(steps).ok_or(Error::BadInput("output sizes overflow".into()))?;
        let total = o_bytes.checked_add(kept_bytes).ok_or(Error::BadInput("output sizes overflow".into()))?;
        let header = serde_json::json!({
            "o": {"dtype": "F32", "shape": [steps, hq, d], "data_offsets": [0, o_bytes]},
            "kept": {"dtype": "I32", "shape": [steps, hkv, budget], "data_offsets": [o_bytes, total]},
        });
        let mut text = serde_json::to_string(&header).map_err(|e| Error::BadInput(e.to_string()))?.into_bytes();
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let mut file = AtomicFile::create(dest)?;
        let path = dest.display().to_string();
        let io = |e: std::io::Error| Error::Io { path: path.clone(), reason: e.to_string() };
        let f = file.file();
        f.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
        f.write_all(&text).map_err(io)?;
        // The full length up front: a sparse file the steps fill in.
        f.set_len(8 + text.len() as u64 + total as u64).map_err(io)?;
        Ok(ReplayWriter { file, data_start: 8 + text.len() as u64, o_row, kept_row, steps })
    }

    /// Writes step `t`'s rows.
    pub fn write_step(&mut self, t: usize, o: &[f32], kept: &[i32]) -> Result<(), Error> {
        if t >= self.steps || o.len() * 4 != self.o_row || kept.len() * 4 != self.kept_row {
            return Err(Error::BadInput("a step's rows do not match the output's shape".into()));
        }
        let path = self.file.dest().display().to_string();
        let io = |e: std::io::Error| Error::Io { path: path.clone(), reason: e.to_string() };
        let (o_at, kept_at) = (self.data_start + (t * self.o_row) as u64, self.data_start + (self.steps * self.o_row + t * self.kept_row) as u64);
        let f = self.file.file();
        f.seek(SeekFrom::Start(o_at)).map_err(io)?;
        f.write_all(bytemuck::cast_slice(o)).map_err(io)?;
        f.seek(SeekFrom::Start(kept_at)).map_err(io)?;
        f.write_all(bytemuck::cast_slice(kept)).map_err(io)
    }

    /// Commits the file (renames it over the destination).
    pub fn finish(self) -> Result<(), Error> {
        self.file.commit()
    }
}

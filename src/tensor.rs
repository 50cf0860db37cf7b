//! A minimal device tensor: a cubecl buffer handle with a shape, element strides, an element offset and a
//! dtype. Views of a larger buffer (a cache with spare capacity, one layer of a stacked cache) are tensors
//! with the same handle and other strides/offset.

use crate::Error;
use cubecl::client::Client;
use cubecl::server::Handle;
use half::{bf16, f16};

/// Runs `$body` with the type alias `$e` bound to the host type of a float storage dtype (the one place that
/// maps a runtime [`DType`] to a kernel's generic element). Integer dtypes are a bug in the caller's
/// validation.
macro_rules! with_float_type {
    ($dtype:expr, $e:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $e = f32;
                $body
            }
            $crate::tensor::DType::F16 => {
                type $e = half::f16;
                $body
            }
            $crate::tensor::DType::BF16 => {
                type $e = half::bf16;
                $body
            }
            $crate::tensor::DType::U32 => unreachable!("validation admits float storage only"),
        }
    };
}
pub(crate) use with_float_type;

/// Storage dtypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Unsigned 32-bit integers (positions).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Machine epsilon of the storage format (0 for `U32`): the unit of design.md §5's tolerances.
    pub fn eps(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64,
            DType::F16 => 9.765625e-4,
            DType::BF16 => 7.8125e-3,
            DType::U32 => 0.0,
        }
    }
}

/// Host element types that can be uploaded.
pub trait HostElement: bytemuck::Pod + Copy + Send + Sync + 'static {
    /// Its dtype.
    const DTYPE: DType;
    /// From f64, rounding to nearest.
    fn from_f64(x: f64) -> Self;
    /// To f64, exactly.
    fn to_f64(self) -> f64;
}

impl HostElement for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl HostElement for u32 {
    const DTYPE: DType = DType::U32;
    fn from_f64(x: f64) -> Self {
        x as u32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl HostElement for f16 {
    const DTYPE: DType = DType::F16;
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}
impl HostElement for bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

/// A tensor on the device.
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    /// The buffer.
    pub handle: Handle,
    /// Elements in the buffer (for bounds validation of views).
    pub buffer_len: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub strides: Vec<usize>,
    /// Offset of element `[0, …, 0]` in elements.
    pub offset: usize,
    /// dtype.
    pub dtype: DType,
}

/// Elements and bytes of a fresh contiguous buffer of `shape`, checked: no overflow, and at most what the
/// device allocates in one buffer (`max_page_size`). At least 4 bytes (some backends refuse empty buffers).
pub(crate) fn checked_size(client: &Client, name: &'static str, shape: &[usize], dtype: DType) -> Result<(usize, usize), Error> {
    let n = shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
    let bytes = n.and_then(|n| n.checked_mul(dtype.size()));
    let (Some(n), Some(bytes)) = (n, bytes) else {
        return Err(Error::DeviceLimit(format!("{name} ({dtype:?} {shape:?}) overflows the address range")));
    };
    let max = client.properties().memory.max_page_size;
    if bytes as u64 > max {
        return Err(Error::DeviceLimit(format!("{name} ({dtype:?} {shape:?}) needs {bytes} B in one buffer; the device allocates at most {max} B")));
    }
    Ok((n, bytes.max(4)))
}

/// Device buffers allocated or uploaded so far by the calling thread: through [`DeviceTensor::from_host`],
/// [`DeviceTensor::filled`], [`DeviceTensor::empty`] and FourierAttention's own helpers. Decode attention,
/// [`crate::finite`], the policy caches and FourierAttention allocate and upload only through these, so a test can
/// prove their hot path allocates and uploads nothing by reading it before and after many steps (per thread, so tests running in parallel do not disturb it).
pub fn device_allocations() -> usize {
    ALLOCATIONS.with(|c| c.get())
}

thread_local! {
    static ALLOCATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Kernel launches issued so far by the calling thread through this crate's ops (every launch site counts
/// itself), for tests and benches that report launches per step.
pub fn device_launches() -> usize {
    LAUNCHES.with(|c| c.get())
}

thread_local! {
    static LAUNCHES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

pub(crate) fn count_launches(n: usize) {
    LAUNCHES.with(|c| c.set(c.get() + n));
}

pub(crate) fn count_allocation() {
    ALLOCATIONS.with(|c| c.set(c.get() + 1));
}

/// Refuses kernels that bind more storage buffers than a device with `max_bindings` free bindings allows (cubecl's
/// `HardwareProperties::max_bindings`: the adapter's storage-buffer limit less the one cubecl keeps for launch
/// scalars): `Error::DeviceLimit` naming the first such kernel, its count and the limit.
pub fn check_bindings_against(max_bindings: u32, kernels: &[&str]) -> Result<(), Error> {
    match kernels.iter().map(|&k| (k, kvsqueeze_kernels::bindings(k))).find(|&(_, n)| n > max_bindings) {
        Some((k, n)) => Err(Error::DeviceLimit(format!("kernel `{k}` binds {} storage buffers (with its scalars) and this adapter allows {} per shader stage", n + 1, max_bindings.saturating_add(1)))),
        None => Ok(()),
    }
}

/// Invocations per cube this device runs: cubecl's `HardwareProperties::max_units_per_cube`, capped by the
/// limit of a wgpu device opened at WebGPU's defaults (`KVSQUEEZE_WGPU_LIMITS=webgpu`: 256), which cubecl 0.11
/// reports from the adapter's limits rather than the device's.
pub(crate) fn max_units_per_cube(client: &Client) -> usize {
    let hw = client.properties().hardware.max_units_per_cube as usize;
    match crate::runtime::units_cap() {
        Some(cap) if client.name().starts_with("wgpu") => hw.min(cap),
        _ => hw,
    }
}

/// [`check_bindings_against`] this device's limit: run by every op and cache constructor before anything is
/// allocated or launched, so an adapter that cannot bind a kernel is reported in one line up front.
pub(crate) fn check_bindings(client: &Client, kernels: &[&str]) -> Result<(), Error> {
    check_bindings_against(client.properties().hardware.max_bindings, kernels)
}

/// Makes a failure of the launches that wrote `outputs` (an allocation the device refused, a kernel it could
/// not compile or bind) an `Err` of the call that launched them. No barrier: a lookup on the device's queue.
pub(crate) fn check_written(client: &Client, outputs: &[&DeviceTensor]) -> Result<(), Error> {
    client.check(outputs.iter().map(|t| &t.handle)).map_err(|e| Error::Device(format!("{e}")))
}

/// Row-major contiguous strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `x` rounded to `dtype` and uploaded as `shape`; also returns the rounded values (what the device holds), for
/// tests and tools that compare against a reference.
pub fn upload_f64(client: &Client, x: &[f64], shape: &[usize], dtype: DType) -> Result<(DeviceTensor, Vec<f64>), Error> {
    fn go<T: HostElement>(c: &Client, x: &[f64], shape: &[usize]) -> Result<(DeviceTensor, Vec<f64>), Error> {
        let h: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
        let back = h.iter().map(|v| v.to_f64()).collect();
        Ok((DeviceTensor::from_host(c, &h, shape)?, back))
    }
    match dtype {
        DType::F32 => go::<f32>(client, x, shape),
        DType::F16 => go::<f16>(client, x, shape),
        DType::BF16 => go::<bf16>(client, x, shape),
        DType::U32 => go::<u32>(client, x, shape),
    }
}

impl DeviceTensor {
    /// Uploads `data` (row-major, `shape`).
    pub fn from_host<T: HostElement>(client: &Client, data: &[T], shape: &[usize]) -> Result<Self, Error> {
        let (n, _) = checked_size(client, "an upload", shape, T::DTYPE)?;
        if n != data.len() {
            return Err(Error::ShapeMismatch { tensor: "host data", expected: shape.to_vec(), got: vec![data.len()] });
        }
        count_allocation();
        let handle = client.create_from_slice(bytemuck::cast_slice(data));
        Ok(DeviceTensor { handle, buffer_len: n, shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0, dtype: T::DTYPE })
    }

    /// A fresh contiguous tensor, every byte set to `fill` (so tests can detect unwritten elements). Refuses
    /// (typed, before allocating) a size that overflows or that the device cannot hold in one buffer.
    pub fn filled(client: &Client, shape: &[usize], dtype: DType, fill: u8) -> Result<Self, Error> {
        let (n, bytes) = checked_size(client, "a buffer", shape, dtype)?;
        count_allocation();
        let handle = client.create_from_slice(&vec![fill; bytes]);
        Ok(DeviceTensor { handle, buffer_len: n, shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0, dtype })
    }

    /// A fresh contiguous tensor with unspecified contents (outputs and scratch that a kernel writes before
    /// anything reads them). Refuses, as [`DeviceTensor::filled`], what the device cannot hold.
    pub fn empty(client: &Client, shape: &[usize], dtype: DType) -> Result<Self, Error> {
        let (n, bytes) = checked_size(client, "a buffer", shape, dtype)?;
        count_allocation();
        Ok(DeviceTensor { handle: client.empty(bytes), buffer_len: n, shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0, dtype })
    }

    /// A view with another shape/strides/offset over the same buffer (validated by the op that uses it).
    pub fn view(&self, shape: &[usize], strides: &[usize], offset: usize) -> Self {
        DeviceTensor { shape: shape.to_vec(), strides: strides.to_vec(), offset, ..self.clone() }
    }

    /// Checks that the view is well formed and lies inside its buffer (every op's layout check). All index
    /// arithmetic is checked: a stride or offset whose span overflows is refused, never wrapped.
    pub fn check_in_buffer(&self, name: &'static str) -> Result<(), Error> {
        if self.shape.len() != self.strides.len() {
            return Err(Error::Layout { tensor: name, reason: "strides and shape differ in rank" });
        }
        if self.shape.contains(&0) {
            return Ok(());
        }
        let span = self.shape.iter().zip(&self.strides).try_fold(self.offset, |acc, (&n, &s)| (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
        match span {
            Some(last) if last < self.buffer_len => Ok(()),
            Some(_) => Err(Error::Layout { tensor: name, reason: "view reaches past the end of its buffer" }),
            None => Err(Error::Layout { tensor: name, reason: "view's offset and strides overflow the index range" }),
        }
    }

    /// Whether `self` and `other` are views of the same device buffer.
    pub fn same_buffer(&self, other: &DeviceTensor) -> bool {
        let (a, b) = (&self.handle, &other.handle);
        a.memory.descriptor() == b.memory.descriptor() && a.service == b.service && a.offset_start == b.offset_start && a.offset_end == b.offset_end
    }

    /// Whether the tensor is row-major contiguous from its offset.
    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }

    /// Reads the whole buffer back as f64 (the tensor's own elements only, in row-major order).
    pub fn to_host_f64(&self, client: &Client) -> Result<Vec<f64>, Error> {
        let bytes = client.read_one(self.handle.clone()).map_err(|e| Error::Device(format!("{e:?}")))?;
        let all: Vec<f64> = match self.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(&bytes).into_iter().map(|x| x as f64).collect(),
            DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(&bytes).into_iter().map(f16::to_f64).collect(),
            DType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(&bytes).into_iter().map(bf16::to_f64).collect(),
            DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(&bytes).into_iter().map(|x| x as f64).collect(),
        };
        let n: usize = self.shape.iter().product();
        let mut out = Vec::with_capacity(n);
        let mut idx = vec![0usize; self.shape.len()];
        for _ in 0..n {
            let at = self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>();
            out.push(all[at]);
            for dim in (0..idx.len()).rev() {
                idx[dim] += 1;
                if idx[dim] < self.shape[dim] {
                    break;
                }
                idx[dim] = 0;
            }
        }
        Ok(out)
    }
}

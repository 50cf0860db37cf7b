//! Tensors shared with burn's CubeCL backends, without a copy (feature `burn`; burn 0.22 is on cubecl 0.11, as
//! we are).
//!
//! burn's CubeCL backends (`burn-cubecl`: CUDA, wgpu, CPU) hold a tensor as a [`CubeTensor`]: a cubecl buffer
//! handle, shape and strides, a dtype, the [`cubecl::Device`] it lives on and that device's client. [`from_burn`]
//! views such a tensor as a [`DeviceTensor`]; [`to_burn`] hands a [`DeviceTensor`] (a cache's output, a view of
//! a cache buffer) to burn. Both share the buffer: nothing is copied, allocated or launched, so burn's layers and
//! our caches run on one client and one stream, in submission order.
//!
//! ## Contract
//! - dtypes f32, f16, bf16 and u32 (burn's `U32`); any other is refused with [`Error::Layout`];
//! - [`from_burn`]: the view is burn's shape and strides over the handle's bytes (a burn slice whose handle starts
//!   at a byte offset is bound from there); a tiled layout or a view that reaches past the handle is refused;
//!   launch our ops with `tensor.client` (the client burn launched on);
//! - [`to_burn`]: the element offset of a view becomes a byte offset of the handle, which the device must accept
//!   as a binding offset (`alignment` of its memory properties: 256 bytes on wgpu/Vulkan, less on CUDA), else
//!   [`Error::Layout`] — pass a view from an aligned offset, or the whole buffer;
//! - ownership: both sides hold the same reference-counted handle; writes through either are seen by the other
//!   in launch order, as between any two cubecl kernels on one client.

use crate::tensor::{DType, DeviceTensor};
use crate::Error;
use burn_backend::DType as BurnDType;
use burn_cubecl::tensor::CubeTensor;
use cubecl::zspace::metadata::Metadata;

fn dtype_from_burn(d: BurnDType) -> Option<DType> {
    match d {
        BurnDType::F32 => Some(DType::F32),
        BurnDType::F16 => Some(DType::F16),
        BurnDType::BF16 => Some(DType::BF16),
        BurnDType::U32 => Some(DType::U32),
        _ => None,
    }
}

fn dtype_to_burn(d: DType) -> BurnDType {
    match d {
        DType::F32 => BurnDType::F32,
        DType::F16 => BurnDType::F16,
        DType::BF16 => BurnDType::BF16,
        DType::U32 => BurnDType::U32,
    }
}

/// burn's tensor as a [`DeviceTensor`] over the same buffer (see the module docs); launch with `t.client`.
pub fn from_burn(t: &CubeTensor) -> Result<DeviceTensor, Error> {
    let dtype = dtype_from_burn(t.dtype).ok_or(Error::Layout { tensor: "burn tensor", reason: "dtype is not f32, f16, bf16 or u32" })?;
    if t.meta.is_tiled() {
        return Err(Error::Layout { tensor: "burn tensor", reason: "a tiled layout has no strided view" });
    }
    let bytes = t.handle.size_in_used();
    let size = dtype.size() as u64;
    if bytes % size != 0 {
        return Err(Error::Layout { tensor: "burn tensor", reason: "the handle is not a whole number of elements" });
    }
    let view = DeviceTensor { handle: t.handle.clone(), buffer_len: (bytes / size) as usize, shape: t.meta.shape().to_vec(), strides: t.meta.strides().to_vec(), offset: 0, dtype };
    view.check_in_buffer("burn tensor")?;
    Ok(view)
}

/// A [`DeviceTensor`] as burn's tensor on `device` over the same buffer (see the module docs).
pub fn to_burn(device: &cubecl::Device, t: &DeviceTensor) -> Result<CubeTensor, Error> {
    t.check_in_buffer("tensor")?;
    let client = device.client();
    let mut handle = t.handle.clone();
    if t.offset > 0 {
        let bytes = (t.offset * t.dtype.size()) as u64;
        let align = client.properties().memory.alignment.max(1);
        if bytes % align != 0 {
            return Err(Error::Layout { tensor: "tensor", reason: "its offset is not a binding offset this device accepts (memory alignment)" });
        }
        handle = handle.offset_start(bytes);
    }
    let meta = Metadata::new(t.shape.clone(), t.strides.clone());
    Ok(CubeTensor::new(client, handle, meta, device.clone(), dtype_to_burn(t.dtype)))
}

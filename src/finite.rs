//! The non-finite policy: an optional device-side check that a tensor holds no NaN or ±∞.
//!
//! Decode attention and the caches do not look at values: a NaN in a key propagates into every output that
//! attends to it, and an eviction rule that compares a NaN score decides arbitrarily. So that this never happens
//! silently, [`check_finite`] scans a tensor on the device and returns [`Error::NonFinite`] naming the tensor and
//! the first bad element (row-major index over its shape). The caches run it on every input before any launch
//! when their config asks for it ([`crate::policy::PolicyCacheConfig::with_check_finite`],
//! [`crate::fourier::FourierLayerConfig::with_check_finite`]; [`crate::attention::DecodeConfig::with_check_finite`]
//! for the bare op): a refused step leaves the cache exactly as it was. It is off by default in the library —
//! it costs one small launch per tensor and a read-back of one u32 (a device round trip) — and on in the CLI.

use crate::tensor::{with_float_type, DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::ir::AddressType;
use cubecl::prelude::*;
use kvsqueeze_kernels::util::find_non_finite;

/// Scans `t` (any view of up to 4 dims, float dtype) for NaN/±∞; with `lens = Some(lens)` and a 4-D `t` of shape
/// `[B, H, L, D]`, only rows `j < lens[b]` are looked at (a cache with spare capacity). `Ok(())` when every
/// element looked at is finite, [`Error::NonFinite`] with the first bad element otherwise. Waits for the device.
pub fn check_finite(client: &Client, name: &'static str, t: &DeviceTensor, lens: Option<&[u32]>) -> Result<(), Error> {
    t.check_in_buffer(name)?;
    if t.dtype == DType::U32 {
        return Ok(());
    }
    if t.shape.is_empty() || t.shape.len() > 4 {
        return Err(Error::Layout { tensor: name, reason: "the finite check takes 1 to 4 dims" });
    }
    // Pad to 4 dims at the front: (n0, n1, n2, n3) with their strides.
    let pad = 4 - t.shape.len();
    let mut n = [1usize; 4];
    let mut s = [0usize; 4];
    n[pad..].copy_from_slice(&t.shape);
    s[pad..].copy_from_slice(&t.strides);
    let total = n.iter().try_fold(1usize, |a, &x| a.checked_mul(x)).filter(|&x| x < u32::MAX as usize);
    let Some(total) = total else {
        return Err(Error::DeviceLimit(format!("`{name}`: the finite check counts elements in u32")));
    };
    if total == 0 {
        return Ok(());
    }
    let lens_t = match lens {
        Some(l) => {
            if t.shape.len() != 4 || l.len() != n[0] {
                return Err(Error::ShapeMismatch { tensor: "lens", expected: vec![n[0]], got: vec![l.len()] });
            }
            DeviceTensor::from_host(client, l, &[l.len()])?
        }
        None => DeviceTensor::from_host(client, &[0u32], &[1])?,
    };
    let first = DeviceTensor::from_host(client, &[u32::MAX], &[1])?;
    let cubes = total.div_ceil(256).clamp(1, 4096);
    let address = AddressType::from_len(t.buffer_len);
    if !client.features().supports_address(address) {
        return Err(Error::DeviceLimit(format!("`{name}` needs {address} indexing, which this device lacks")));
    }
    crate::tensor::count_launches(1);
    // SAFETY: every index is inside the view, which `check_in_buffer` placed inside its buffer; `first` holds one u32.
    unsafe {
        let arg = |x: &DeviceTensor| BufferArg::from_raw_parts(x.handle.clone(), x.buffer_len.max(1));
        with_float_type!(t.dtype, E => find_non_finite::launch_unchecked::<E>(client, CubeCount::Static(cubes as u32, 1, 1), CubeDim::new_1d(256), address, arg(t), arg(&lens_t), arg(&first), t.offset, n[0], n[1], n[2], n[3], s[0], s[1], s[2], s[3], lens.is_some()));
    }
    let at = first.to_host_f64(client)?[0] as u64;
    if at == u32::MAX as u64 {
        return Ok(());
    }
    let mut index = vec![0usize; t.shape.len()];
    let mut rest = at as usize;
    for (i, &dim) in t.shape.iter().enumerate().rev() {
        index[i] = rest % dim;
        rest /= dim;
    }
    Err(Error::NonFinite { tensor: name, index })
}

/// [`check_finite`] on every `(name, tensor)` when `on` (the caches' `check_finite` setting); nothing otherwise.
pub(crate) fn check_inputs(client: &Client, on: bool, inputs: &[(&'static str, &DeviceTensor)]) -> Result<(), Error> {
    if on {
        for &(name, t) in inputs {
            check_finite(client, name, t, None)?;
        }
    }
    Ok(())
}

//! FourierAttention on the device (spec §1; reference `kvsqueeze-reference::fourier`). This first part holds
//! the compression kernels: the prefill transform of the middle segment's compressed columns and the rank-1
//! decode update; FlashFourierAttention (direct and spectral) is the follow-up.
//!
//! Shapes: `x: [L_mid, C]` (any row stride, unit column stride — e.g. a view of the compressed columns of the
//! middle tokens), the coefficients `[2N, C]` f32 (cosine rows then sine rows). Angles `2π·((n·t) mod T)/T` are
//! reduced exactly in u32 arithmetic, so `N·T < 2³²` is required; `L_mid ≤ T` (a longer middle would alias).

use crate::tensor::{contiguous_strides, with_float_type, DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::prelude::*;
use kvsqueeze_kernels::fourier::{fourier_transform as transform_kernel, fourier_update as update_kernel};

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

fn check_float(client: &Client, t: &DeviceTensor, name: &'static str) -> Result<(), Error> {
    if !crate::attention::dtype_supported(client, t.dtype) {
        return Err(Error::DtypeUnsupported { dtype: t.dtype, device: crate::attention::device_name(client) });
    }
    if t.shape.iter().any(|&s| s == 0) {
        return Err(Error::ShapeMismatch { tensor: name, expected: vec![1, 1], got: t.shape.clone() });
    }
    if *t.strides.last().unwrap_or(&0) != 1 {
        return Err(Error::Layout { tensor: name, reason: "needs a unit column stride" });
    }
    t.check_in_buffer(name)
}

/// The prefill transform (spec §1.3 step 1) of `x: [L_mid, C]`: returns `[2N, C]` f32 coefficients.
pub fn fourier_transform(client: &Client, x: &DeviceTensor, n_freq: usize, window: usize) -> Result<DeviceTensor, Error> {
    if x.shape.len() != 2 {
        return Err(Error::ShapeMismatch { tensor: "x", expected: vec![0, 0], got: x.shape.clone() });
    }
    check_float(client, x, "x")?;
    check_window(n_freq, window)?;
    let (lmid, cols) = (x.shape[0], x.shape[1]);
    if x.offset != 0 {
        return Err(Error::Layout { tensor: "x", reason: "views with an offset are not supported yet" });
    }
    if lmid > window {
        return Err(Error::LengthBeyondCapacity { batch: 0, len: lmid, capacity: window });
    }
    let shape = [2 * n_freq, cols];
    let coef = DeviceTensor { handle: client.empty(2 * n_freq * cols * 4), buffer_len: 2 * n_freq * cols, shape: shape.to_vec(), strides: contiguous_strides(&shape), offset: 0, dtype: DType::F32 };
    let count = CubeCount::Static(cols.div_ceil(TILE) as u32, n_freq as u32, 1);
    // SAFETY: the kernel reads rows `< L_mid` of the validated view and writes the `2N·C` coefficients.
    unsafe {
        let xa = BufferArg::from_raw_parts(x.handle.clone(), x.buffer_len);
        let ca = BufferArg::from_raw_parts(coef.handle.clone(), coef.buffer_len);
        with_float_type!(x.dtype, E => transform_kernel::launch_unchecked::<E>(client, count, CubeDim::new_1d(TILE as u32), xa, ca, lmid, cols, x.strides[0], n_freq, window as u32, TILE))
    }
    Ok(coef)
}

/// The decode update (spec §1.3 step 2): adds `x: [C]` (one token's compressed columns) at middle index `p`.
pub fn fourier_update(client: &Client, x: &DeviceTensor, coef: &DeviceTensor, p: usize, window: usize) -> Result<(), Error> {
    if x.shape.len() != 1 {
        return Err(Error::ShapeMismatch { tensor: "x", expected: vec![0], got: x.shape.clone() });
    }
    check_float(client, x, "x")?;
    let cols = x.shape[0];
    if coef.shape.len() != 2 || coef.shape[1] != cols || coef.shape[0] % 2 != 0 || coef.shape[0] == 0 {
        return Err(Error::ShapeMismatch { tensor: "coef", expected: vec![0, cols], got: coef.shape.clone() });
    }
    if coef.dtype != DType::F32 || !coef.is_contiguous() || coef.offset != 0 || x.offset != 0 {
        return Err(Error::Layout { tensor: "coef", reason: "coefficients are a contiguous f32 [2N, C] tensor" });
    }
    let n_freq = coef.shape[0] / 2;
    check_window(n_freq, window)?;
    if p >= window {
        return Err(Error::LengthBeyondCapacity { batch: 0, len: p + 1, capacity: window });
    }
    let count = CubeCount::Static(cols.div_ceil(TILE) as u32, n_freq as u32, 1);
    // SAFETY: reads `C` elements of `x`, updates the `2N·C` coefficients.
    unsafe {
        let xa = BufferArg::from_raw_parts(x.handle.clone(), x.buffer_len);
        let ca = BufferArg::from_raw_parts(coef.handle.clone(), coef.buffer_len);
        with_float_type!(x.dtype, E => update_kernel::launch_unchecked::<E>(client, count, CubeDim::new_1d(TILE as u32), xa, ca, cols, n_freq, p as u32, window as u32, TILE))
    }
    Ok(())
}

//! The decode step's projections: `out = x · w` for a few rows `x` against a weight matrix `w` (the burn model's
//! `M = B` hidden rows), bandwidth-bound by vector loads of `w` along its columns
//! (`kvsqueeze_kernels::matmul::rows_matmul`; reference `kvsqueeze_reference::matmul::rows_matmul`).

use crate::tensor::{DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::ir::AddressType;
use cubecl::prelude::*;
use kvsqueeze_kernels::matmul::{rows_matmul as kernel, LANES};

/// Rows per cube (the kernel's per-unit accumulators: `ROWS · vec` floats).
const ROWS: usize = 4;
/// Unit rows per cube splitting `K` (the cube is `LANES × SPLITS` = 256 units, WebGPU's default maximum; shared
/// memory `SPLITS·ROWS·4·LANES` f32 = 16 KiB, WebGPU's default maximum; `SPLITS ≥ ROWS·4` for the final sums).
const SPLITS: usize = 32;

/// `out = x · w`: `x [M, K]`, `w [K, N]`, `out [M, N]`, f32, each a row-major view from any element offset with
/// unit column stride and any row stride of at least its columns (a pitched allocation, as burn makes on CUDA,
/// included); `w` is read in vectors of the largest of 4, 2, 1 dividing `N`, its offset and its row stride.
/// `out` must not share a buffer with `x` or `w`. One launch; errors (before it) on shapes, dtypes, layouts, an aliased output, or a grid the
/// device cannot launch (`M > 4·65535`).
pub fn rows_matmul(client: &Client, x: &DeviceTensor, w: &DeviceTensor, out: &DeviceTensor) -> Result<(), Error> {
    crate::tensor::check_bindings(client, &["rows_matmul"])?;
    for (name, t) in [("x", x), ("w", w), ("out", out)] {
        t.check_in_buffer(name)?;
        if t.dtype != DType::F32 {
            return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: DType::F32 });
        }
        if t.shape.len() != 2 || (t.shape[1] > 1 && t.strides[1] != 1) || (t.shape[0] > 1 && t.strides[0] < t.shape[1]) {
            return Err(Error::Layout { tensor: name, reason: "must be a matrix with unit column stride and a row stride of at least its columns" });
        }
    }
    let (m, k, n) = (x.shape[0], x.shape[1], w.shape[1]);
    if w.shape[0] != k {
        return Err(Error::ShapeMismatch { tensor: "w", expected: vec![k, n], got: w.shape.clone() });
    }
    if out.shape != [m, n] {
        return Err(Error::ShapeMismatch { tensor: "out", expected: vec![m, n], got: out.shape.clone() });
    }
    if out.same_buffer(x) || out.same_buffer(w) {
        return Err(Error::Layout { tensor: "out", reason: "must not share a buffer with an input" });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // A row stride (a single row's is its width: never used).
    let rs = |t: &DeviceTensor| if t.shape[0] > 1 { t.strides[0] } else { t.shape[1] };
    let vec = [4, 2, 1].into_iter().find(|v| n % v == 0 && w.offset % v == 0 && rs(w) % v == 0).unwrap_or(1);
    let nv = n / vec;
    let (gx, gy) = (nv.div_ceil(LANES), m.div_ceil(ROWS));
    if gx > 65535 || gy > 65535 {
        return Err(Error::Config("rows_matmul: too many rows or columns for one launch grid"));
    }
    let addr = [x, w, out].iter().map(|t| AddressType::from_len(t.buffer_len)).max().unwrap_or(AddressType::U32);
    crate::tensor::count_launches(1);
    // SAFETY: shapes, offsets and buffer extents were checked above; the grid covers `nv` column vectors and `m`
    // rows, and the kernel skips what lies past them.
    unsafe {
        kernel::launch_unchecked(
            client,
            CubeCount::Static(gx as u32, gy as u32, 1),
            CubeDim::new_2d(LANES as u32, SPLITS as u32),
            addr,
            vec,
            BufferArg::from_raw_parts(x.handle.clone(), x.buffer_len),
            BufferArg::from_raw_parts(w.handle.clone(), w.buffer_len),
            BufferArg::from_raw_parts(out.handle.clone(), out.buffer_len),
            x.offset,
            w.offset / vec,
            out.offset,
            rs(x),
            rs(w) / vec,
            rs(out),
            m,
            k,
            nv,
            ROWS,
            vec,
            SPLITS,
        );
    }
    Ok(())
}

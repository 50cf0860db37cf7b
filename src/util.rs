//! Device helpers for benches, tests and the CLI: random fills without a host upload, and the measured copy
//! bandwidth that benches report as their ceiling.

use crate::tensor::{with_float_type, DType, DeviceTensor};
use crate::Error;
use cubecl::client::Client;
use cubecl::ir::AddressType;
use cubecl::prelude::*;
use kvsqueeze_kernels::util::{copy, fill_hash};
use std::time::Instant;

/// A contiguous tensor of `shape` filled on the device with values uniform in `[-amp, amp)` (never 0). Refuses
/// a size the device cannot hold (checked before allocating) and an integer dtype.
pub fn random(client: &Client, shape: &[usize], dtype: DType, seed: u32, amp: f32) -> Result<DeviceTensor, Error> {
    if dtype == DType::U32 {
        return Err(Error::Config("random() fills float tensors only"));
    }
    let t = DeviceTensor::empty(client, shape, dtype)?;
    let n = t.buffer_len;
    let (count, dim) = grid(n);
    let at = AddressType::from_len(n);
    crate::tensor::count_launches(1);
    // SAFETY: the kernel writes exactly the `n` elements of the buffer it is given.
    unsafe {
        let arg = BufferArg::from_raw_parts(t.handle.clone(), n);
        with_float_type!(dtype, E => fill_hash::launch_unchecked::<E>(client, count, dim, at, arg, n, seed, amp))
    }
    crate::tensor::check_written(client, &[&t])?;
    Ok(t)
}

fn grid(n: usize) -> (CubeCount, CubeDim) {
    let cubes = n.div_ceil(256).clamp(1, 65_535);
    (CubeCount::Static(cubes as u32, 1, 1), CubeDim::new_1d(256))
}

/// Waits for every queued launch.
pub fn sync(client: &Client) -> Result<(), Error> {
    cubecl::future::block_on(client.sync()).map_err(|e| Error::Device(format!("{e:?}")))
}

/// Device-to-device copy bandwidth (bytes read + written per second) over a `bytes`-sized f32 buffer, the
/// median of `reps` timed copies after one warm-up.
pub fn copy_bandwidth(client: &Client, bytes: usize, reps: usize) -> Result<f64, Error> {
    let n = bytes / 16; // vectors of 4 f32
    let src = random(client, &[n * 4], DType::F32, 7, 1.0)?;
    let dst = client.empty(n * 16);
    let run = || {
        let (count, dim) = grid(n);
        crate::tensor::count_launches(1);
        // SAFETY: both buffers hold `n` vectors of 4 f32.
        unsafe {
            copy::launch_unchecked::<f32>(client, count, dim, AddressType::from_len(n * 4), 4, BufferArg::from_raw_parts(src.handle.clone(), n * 4), BufferArg::from_raw_parts(dst.clone(), n * 4), n);
        }
    };
    run();
    sync(client)?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        run();
        sync(client)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(2.0 * (n * 16) as f64 / times[times.len() / 2])
}

/// How far above the measured copy ceiling a bench figure may be before it is refused: read-mostly kernels pass a
/// read + write copy by some 10% (cuDNN's decode on an H100: 3.0–3.1 TB/s against a 2.83 TB/s copy), so a figure
/// beyond 1.25× means the timed work did not happen (a failed allocation or launch).
pub const CEILING_MARGIN: f64 = 1.25;

/// Refuses a bandwidth figure (bytes per second) above [`CEILING_MARGIN`] × the measured copy `ceiling`.
pub fn check_plausible(what: &str, bytes_per_sec: f64, ceiling: f64) -> Result<(), Error> {
    if !(bytes_per_sec.is_finite() && bytes_per_sec <= CEILING_MARGIN * ceiling) {
        return Err(Error::Device(format!(
            "{what}: {:.1} GB/s is above {CEILING_MARGIN}× the measured copy ceiling ({:.1} GB/s); the measurement is not trustworthy",
            bytes_per_sec / 1e9,
            ceiling / 1e9
        )));
    }
    Ok(())
}

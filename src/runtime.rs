//! Runtime discovery: which cubecl backend a test, bench or the CLI runs on.
//!
//! [`client`] picks CUDA when it is compiled in and a GPU is present, otherwise wgpu (any Vulkan/Metal/DX12
//! adapter; Mesa's lavapipe in CI), otherwise the CPU runtime. `KVSQUEEZE_DEVICE=cuda|wgpu|cpu` forces one.
//! [`require_all`] reads `KVSQUEEZE_REQUIRE_ALL=1`, which GPU runs set so that a feature skip (bf16, plane
//! ops) becomes a failure instead. `KVSQUEEZE_WGPU_LIMITS=webgpu` opens the wgpu device at WebGPU's default
//! limits (8 storage buffers per shader stage, 16 KiB of workgroup storage, 256 invocations per workgroup)
//! instead of the adapter's own, so that a run on a desktop adapter shows what a browser would accept.

use crate::Error;
use cubecl::client::Client;
use cubecl::device::WgpuDeviceKind;
use cubecl::Device;

/// The backend features this build was compiled with.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "cuda") {
        v.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "cpu") {
        v.push("cpu");
    }
    v
}

/// Opens the device named by `KVSQUEEZE_DEVICE`, or the best one available.
pub fn device() -> Result<Device, Error> {
    let forced = std::env::var("KVSQUEEZE_DEVICE").ok();
    let open = |name: &str| -> Result<Device, String> {
        match name {
            "cuda" => Device::cuda(0).map_err(|e| e.to_string()),
            "wgpu" => open_wgpu(),
            "cpu" => Device::cpu().map_err(|e| e.to_string()),
            other => Err(format!("unknown KVSQUEEZE_DEVICE `{other}` (cuda, wgpu or cpu)")),
        }
    };
    if let Some(name) = forced {
        return open(&name).map_err(Error::NoDevice);
    }
    let mut why = Vec::new();
    for name in ["cuda", "wgpu", "cpu"] {
        match open(name) {
            Ok(d) => return Ok(d),
            Err(e) => why.push(format!("{name}: {e}")),
        }
    }
    Err(Error::NoDevice(why.join("; ")))
}

/// The default wgpu adapter, at its own limits or (`KVSQUEEZE_WGPU_LIMITS=webgpu`) at WebGPU's defaults.
fn open_wgpu() -> Result<Device, String> {
    match std::env::var("KVSQUEEZE_WGPU_LIMITS").as_deref() {
        Err(_) | Ok("adapter") => Device::wgpu(WgpuDeviceKind::default()).map_err(|e| e.to_string()),
        Ok("webgpu") => {
            // One device per process: every client of the run shares it (as `Device::wgpu` does).
            static DEVICE: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
            DEVICE.get_or_init(wgpu_at_webgpu_limits).clone()
        }
        Ok(other) => Err(format!("unknown KVSQUEEZE_WGPU_LIMITS `{other}` (adapter or webgpu)")),
    }
}

/// The invocations-per-workgroup limit of the wgpu device opened at WebGPU's defaults, once opened (cubecl reports
/// the adapter's instead; see [`crate::tensor`]).
static UNITS_CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

pub(crate) fn units_cap() -> Option<usize> {
    UNITS_CAP.get().copied()
}

#[cfg(feature = "wgpu")]
fn wgpu_at_webgpu_limits() -> Result<Device, String> {
    use cubecl::wgpu::{wgpu, RuntimeOptions, WgpuSetup};
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter = cubecl::future::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).map_err(|e| e.to_string())?;
    let desc = wgpu::DeviceDescriptor {
        label: Some("kvsqueeze at WebGPU default limits"),
        required_features: adapter.features().difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
        required_limits: wgpu::Limits::default(),
        ..Default::default()
    };
    let (device, queue) = cubecl::future::block_on(adapter.request_device(&desc)).map_err(|e| e.to_string())?;
    let _ = UNITS_CAP.set(device.limits().max_compute_invocations_per_workgroup as usize);
    let backend = adapter.get_info().backend;
    let setup = WgpuSetup { instance, adapter, device, queue, backend };
    cubecl::wgpu::try_init_device(setup, RuntimeOptions::default()).map(Device::from).map_err(|e| format!("{e:?}"))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_at_webgpu_limits() -> Result<Device, String> {
    Err("the wgpu backend is not compiled in".into())
}

/// A client on the named backend: `auto` (as [`device`]), `cuda`, `wgpu` or `cpu`. The error says what is
/// missing and what to do (a backend not compiled in, or no such device).
pub fn client_for(backend: &str) -> Result<Client, Error> {
    device_for(backend).map(|d| d.client())
}

/// The device of [`client_for`] (for burn, whose tensors name their device).
pub fn device_for(backend: &str) -> Result<Device, Error> {
    match backend {
        "auto" => device(),
        "cuda" | "wgpu" | "cpu" => {
            if !compiled_backends().contains(&backend) {
                return Err(Error::NoDevice(format!("backend `{backend}` is not compiled into this binary: rebuild with `--features {backend}` (compiled: {:?})", compiled_backends())));
            }
            let dev = match backend {
                "cuda" => Device::cuda(0).map_err(|e| e.to_string()),
                "wgpu" => open_wgpu(),
                _ => Device::cpu().map_err(|e| e.to_string()),
            };
            dev.map_err(|e| Error::NoDevice(format!("backend `{backend}` found no device: {e}")))
        }
        other => Err(Error::NoDevice(format!("unknown backend `{other}`: use cuda, wgpu, cpu or auto"))),
    }
}

/// A client on [`device`].
pub fn client() -> Result<Client, Error> {
    device().map(|d| d.client())
}

/// Whether `KVSQUEEZE_FORCE_GPU_PATHS=1` asks for the GPU code paths (plane reductions, unrolled loads, staged
/// K) where cubecl does not advertise plane ops (it turns them off for every CPU-type adapter; lavapipe runs them
/// correctly) — for testing those paths without a GPU. Read once per process (plans consult it; no environment
/// lookup per call).
pub fn force_gpu_paths() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("KVSQUEEZE_FORCE_GPU_PATHS").is_ok_and(|v| v == "1"))
}

/// Launch choices of the decode kernel that only a run on the device can settle ([`crate::attention::Plan`] prints
/// what ran).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeTuning {
    /// Cubes per SM the split count aims at (more: smaller splits, a smaller last partial wave).
    pub cubes_per_sm: usize,
    /// Stage K tiles through shared memory where it fits (GPU paths only).
    pub stage_k: bool,
    /// Issue each tile's V loads with its K loads (GPU paths only). `None`: on where the grid is at most two
    /// cubes per SM (latency-bound problems, e.g. B = 1 at 4k), off elsewhere.
    pub early_v: Option<bool>,
}

/// The defaults, from a sweep on an H100 (bf16, Hq 32 / Hkv 8, D 128; README, issue 15): 32 cubes per SM took
/// 10% off B = 8 at 32k and 128k against 8 (+3% at B = 32, 32k); early V loads took 27% off B = 1 at 4k and cost
/// 6–21% on every grid of several waves; K staging on.
impl Default for DecodeTuning {
    fn default() -> Self {
        DecodeTuning { cubes_per_sm: 32, stage_k: true, early_v: None }
    }
}

/// `KVSQUEEZE_DECODE_TUNE=cubes,stage_k,early_v` (e.g. `8,1,0`; `early_v` 0 off, 1 on, 2 automatic) overrides
/// [`DecodeTuning::default`] — for tuning runs on a new device. Read once per process; a malformed value is
/// ignored.
pub fn decode_tuning() -> DecodeTuning {
    static TUNE: std::sync::OnceLock<DecodeTuning> = std::sync::OnceLock::new();
    *TUNE.get_or_init(|| {
        let parse = || -> Option<DecodeTuning> {
            let v = std::env::var("KVSQUEEZE_DECODE_TUNE").ok()?;
            let n: Vec<usize> = v.split(',').map(|x| x.trim().parse().ok()).collect::<Option<_>>()?;
            match n[..] {
                [cubes, stage, early] if (1..=256).contains(&cubes) && stage <= 1 && early <= 2 => {
                    Some(DecodeTuning { cubes_per_sm: cubes, stage_k: stage == 1, early_v: (early < 2).then_some(early == 1) })
                }
                _ => None,
            }
        };
        parse().unwrap_or_default()
    })
}

/// Whether skips must fail (`KVSQUEEZE_REQUIRE_ALL=1`, set on GPU runs).
pub fn require_all() -> bool {
    std::env::var("KVSQUEEZE_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Prints the compiled backends and the device that would be used.
pub fn print_devices() {
    println!("compiled backends: {:?}", compiled_backends());
    match client() {
        Ok(c) => {
            let hw = &c.properties().hardware;
            println!(
                "device: {} | plane ops: {} (size {}..{}) | units/cube {} | shared {} B",
                crate::attention::device_name(&c),
                c.features().plane.contains(cubecl::features::Plane::Ops),
                hw.plane_size_min,
                hw.plane_size_max,
                hw.max_units_per_cube,
                hw.max_shared_memory_size
            );
        }
        Err(e) => println!("no device: {e}"),
    }
}

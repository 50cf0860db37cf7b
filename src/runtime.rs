//! Runtime discovery: which cubecl backend a test, bench or the CLI runs on.
//!
//! [`client`] picks CUDA when it is compiled in and a GPU is present, otherwise wgpu (any Vulkan/Metal/DX12
//! adapter; Mesa's lavapipe in CI), otherwise the CPU runtime. `KVSQUEEZE_DEVICE=cuda|wgpu|cpu` forces one.
//! [`require_all`] reads `KVSQUEEZE_REQUIRE_ALL=1`, which GPU runs set so that a feature skip (bf16, plane
//! ops) becomes a failure instead.

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
            "wgpu" => Device::wgpu(WgpuDeviceKind::default()).map_err(|e| e.to_string()),
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

/// A client on the named backend: `auto` (as [`device`]), `cuda`, `wgpu` or `cpu`. The error says what is
/// missing and what to do (a backend not compiled in, or no such device).
pub fn client_for(backend: &str) -> Result<Client, Error> {
    match backend {
        "auto" => client(),
        "cuda" | "wgpu" | "cpu" => {
            if !compiled_backends().contains(&backend) {
                return Err(Error::NoDevice(format!("backend `{backend}` is not compiled into this binary: rebuild with `--features {backend}` (compiled: {:?})", compiled_backends())));
            }
            let dev = match backend {
                "cuda" => Device::cuda(0).map_err(|e| e.to_string()),
                "wgpu" => Device::wgpu(WgpuDeviceKind::default()).map_err(|e| e.to_string()),
                _ => Device::cpu().map_err(|e| e.to_string()),
            };
            dev.map(|d| d.client()).map_err(|e| Error::NoDevice(format!("backend `{backend}` found no device: {e}")))
        }
        other => Err(Error::NoDevice(format!("unknown backend `{other}`: use cuda, wgpu, cpu or auto"))),
    }
}

/// A client on [`device`].
pub fn client() -> Result<Client, Error> {
    device().map(|d| d.client())
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

//! Runtime discovery: which cubecl backends are compiled in and which device a test, bench or the CLI uses.

/// Prints every device the compiled-in backends can open.
pub fn print_devices() {
    println!("compiled backends: {:?}", compiled_backends());
}

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

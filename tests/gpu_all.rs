//! Every integration test of `tests/` compiled into one binary, for the GPU machine only (`--features cuda`):
//! binaries link LLVM and are large, and the device run can carry only a few. CI runs the files separately.
//! `tests/replay.rs` is left out and `robustness::cli_probes` must be skipped there (`--skip cli_probes`): they
//! drive the `kvsqueeze` binary, which the GPU machine does not carry.

#[path = "attention.rs"]
mod attention;
#[path = "fourier.rs"]
mod fourier;
#[path = "matmul.rs"]
mod matmul;
#[path = "policy.rs"]
mod policy;
#[path = "robustness.rs"]
mod robustness;

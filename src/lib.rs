//! # kvsqueeze
//!
//! GPU kernels, written once in CubeCL, that shrink the KV cache of LLM inference and attend over the shrunken
//! cache on CUDA, wgpu (Vulkan/Metal/WebGPU) and CPU. See README.md for the methods and the layout:
//! `kvsqueeze-kernels` holds the `#[cube]` device code, `kvsqueeze-reference` the plain-Rust specification,
//! and this crate the validating host API: every public op checks its inputs and returns an [`Error`] before
//! anything is launched.
#![warn(missing_docs)]

pub use kvsqueeze_kernels as kernels;
pub use kvsqueeze_reference as reference;

pub mod attention;
#[cfg(feature = "burn")]
pub mod burn;
mod error;
#[cfg(feature = "eval")]
pub mod eval;
pub mod finite;
pub mod fourier;
pub mod matmul;
pub mod output;
pub mod policy;
pub mod replay;
pub mod rope;
pub mod runtime;
pub mod tensor;
pub mod util;

pub use error::Error;
pub use tensor::{DType, DeviceTensor, HostElement};

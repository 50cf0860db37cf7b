//! # kvsqueeze
//!
//! GPU kernels, written once in CubeCL, that shrink the KV cache of LLM inference and attend over the shrunken
//! cache on CUDA, wgpu (Vulkan/Metal/WebGPU) and CPU. See README.md for the methods and the layout:
//! `kvsqueeze-kernels` holds the `#[cube]` device code, `kvsqueeze-reference` the plain-Rust specification,
//! and this crate the validating host API.
#![warn(missing_docs)]

pub use kvsqueeze_kernels as kernels;

pub mod runtime;

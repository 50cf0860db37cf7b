//! # kvsqueeze-kernels — device code only
//!
//! `#[cube]` functions and their comptime configuration; no validation, no allocation policy (that is the
//! host API's job, in the `kvsqueeze` crate). Every kernel here has a plain-Rust definition in
//! `kvsqueeze-reference` under the same module name, and is tested against it.
//!
//! Comptime parameters are kept to what changes control flow or register/shared-memory sizes (dtype, vector
//! width, head dim, tile, rows per cube, output flags); sequence lengths, batch and head counts are runtime
//! scalars so that property tests over shapes do not recompile.

pub mod attention;
pub mod fourier;
pub mod policy;
pub mod rope;
pub mod util;

//! # kvsqueeze-kernels — device code only
//!
//! `#[cube]` functions and their comptime configuration; no validation, no allocation policy (that is the
//! host API's job, in the `kvsqueeze` crate). Every kernel here has a plain-Rust definition in
//! `kvsqueeze-reference` under the same module name, and is tested against it.
//!
//! Comptime parameters are kept to what changes control flow or register/shared-memory sizes (dtype, vector
//! width, head dim, tile, rows per cube, output flags); sequence lengths, batch and head counts are runtime
//! scalars so that property tests over shapes do not recompile.

// `#[cube]` code is expanded by CubeCL's macro, which takes integer arithmetic and comparisons as written (no
// `div_ceil`/`is_multiple_of` on runtime values, NaN-aware negated comparisons kept deliberately), and indexes
// shared arrays by loop counters.
#![allow(
    clippy::manual_div_ceil,
    clippy::manual_is_multiple_of,
    clippy::collapsible_if,
    clippy::collapsible_else_if,
    clippy::nonminimal_bool,
    clippy::needless_range_loop,
    clippy::unnecessary_cast,
    clippy::neg_cmp_op_on_partial_ord,
    clippy::identity_op,
    clippy::let_and_return,
    clippy::too_many_arguments
)]

pub mod attention;
pub mod baselines;
pub mod fourier;
pub mod matmul;
pub mod policy;
pub mod rope;
pub mod treekv;
pub mod util;
pub mod weightedkv;

/// Storage buffers each launchable kernel binds (its slice parameters; cubecl binds the launch scalars as one
/// more). The host refuses, before any launch, an op whose kernels bind more than the device allows
/// (`HardwareProperties::max_bindings`: WebGPU's default adapter limit of 8 leaves 7, Mesa's OpenGL 15). Checked
/// against the kernel signatures by `tests/bindings.rs`.
pub const BINDINGS: &[(&str, u32)] = &[
    ("decode_split", 7),
    ("decode_combine", 3),
    ("mass_finalize", 3),
    ("fourier_transform", 3),
    ("fourier_stats_partial", 4),
    ("fourier_stats_finalize", 2),
    ("fourier_append", 7),
    ("fourier_append_write", 5),
    ("fourier_gather_strided", 3),
    ("fourier_gather", 5),
    ("fourier_reconstruct", 6),
    ("fourier_basis_table", 1),
    ("fourier_project", 5),
    ("fourier_split", 7),
    ("fourier_combine", 5),
    ("fourier_fft_prep", 1),
    ("fourier_fft_scores", 1),
    ("fourier_fft_moments", 2),
    ("policy_append", 6),
    ("policy_step", 4),
    ("treekv_block_scores", 2),
    ("treekv_block_scan", 3),
    ("policy_install", 7),
    ("policy_retire", 1),
    ("snapkv_scores", 2),
    ("snapkv_topk", 2),
    ("copy", 2),
    ("copy_range", 2),
    ("fill_hash", 1),
    ("find_non_finite", 3),
    ("rows_matmul", 3),
];

/// The storage buffers kernel `name` binds (0 for a name not in [`BINDINGS`]).
pub fn bindings(name: &str) -> u32 {
    BINDINGS.iter().find(|(n, _)| *n == name).map_or(0, |&(_, b)| b)
}

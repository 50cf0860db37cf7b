//! The command line's jobs that are not library API: `compare` (the main job) and `check` (every kernel against
//! the reference on the device at hand), `generate` and `stream` (the burn model, feature `eval`). They use only the public API of the `kvsqueeze` library.

pub mod check;
pub mod compare;
#[cfg(feature = "eval")]
pub mod model;

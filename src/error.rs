//! The typed error every public op returns before it launches anything.

use core::fmt;

/// Why an op refused to run. Returned before any launch: a refused op has not touched the device.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A tensor's shape does not match what the op requires.
    ShapeMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// The shape the op expected (with the other inputs' sizes filled in).
        expected: Vec<usize>,
        /// The shape it got.
        got: Vec<usize>,
    },
    /// A tensor has the wrong number of dimensions.
    Rank {
        /// Which tensor.
        tensor: &'static str,
        /// The dimensions the op expects.
        expected: usize,
        /// The dimensions it got.
        got: usize,
    },
    /// `Hq` is not a positive multiple of `Hkv`.
    GqaRatio {
        /// Query heads.
        hq: usize,
        /// KV heads.
        hkv: usize,
    },
    /// A sequence has length zero, or fewer keys than query tokens.
    ZeroLength {
        /// The sequence.
        batch: usize,
    },
    /// A sequence length exceeds the cache capacity.
    LengthBeyondCapacity {
        /// The sequence.
        batch: usize,
        /// Its length.
        len: usize,
        /// The capacity (`L_cap`, dim 2 of K/V).
        capacity: usize,
    },
    /// Head dimension not supported (must be a positive multiple of 8, at most 256).
    UnsupportedHeadDim {
        /// The head dimension.
        d: usize,
    },
    /// The storage dtype is not supported on this device (e.g. bf16 on lavapipe).
    DtypeUnsupported {
        /// The dtype.
        dtype: crate::DType,
        /// The device's name.
        device: String,
    },
    /// Inputs of one op have different dtypes.
    DtypeMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// Its dtype.
        got: crate::DType,
        /// The dtype of the query.
        expected: crate::DType,
    },
    /// A tensor's layout is not one the op accepts (non-unit innermost stride, overlapping or out-of-buffer
    /// view, non-contiguous where contiguity is required).
    Layout {
        /// Which tensor.
        tensor: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A configuration value is out of range.
    Config(&'static str),
    /// The device cannot run this op at all (cube size or shared memory too small).
    DeviceLimit(String),
    /// The device reported an error (an allocation it refused, a compile, launch or read failure).
    Device(String),
    /// No device could be opened: a backend not compiled in, none present, or an unknown backend name (what was
    /// tried and why).
    NoDevice(String),
    /// The real-model harness (`eval`) could not use a model, tokenizer or text (what and why).
    Model(String),
    /// A file could not be read or written.
    Io {
        /// The path.
        path: String,
        /// What the system said.
        reason: String,
    },
    /// An input file (a trace) is malformed.
    BadInput(String),
    /// A tensor holds NaN or ±∞ where the op was asked to check ([`crate::finite`]).
    NonFinite {
        /// Which tensor.
        tensor: &'static str,
        /// The first non-finite element (row-major over the tensor's shape).
        index: Vec<usize>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch { tensor, expected, got } => {
                write!(f, "`{tensor}` has shape {got:?}, expected {expected:?}")
            }
            Error::Rank { tensor, expected, got } => write!(f, "`{tensor}` has {got} dims, expected {expected}"),
            Error::GqaRatio { hq, hkv } => write!(f, "{hq} query heads are not a multiple of {hkv} KV heads"),
            Error::ZeroLength { batch } => write!(f, "sequence {batch} is empty or shorter than its query"),
            Error::LengthBeyondCapacity { batch, len, capacity } => {
                write!(f, "sequence {batch} has length {len} beyond the capacity {capacity}")
            }
            Error::UnsupportedHeadDim { d } => write!(f, "head dim {d} is not a positive multiple of 8 up to 256"),
            Error::DtypeUnsupported { dtype, device } => write!(f, "{dtype:?} is not supported on {device}"),
            Error::DtypeMismatch { tensor, got, expected } => {
                write!(f, "`{tensor}` is {got:?} but the query is {expected:?}")
            }
            Error::Layout { tensor, reason } => write!(f, "`{tensor}`: {reason}"),
            Error::Config(why) => write!(f, "bad configuration: {why}"),
            Error::DeviceLimit(why) => write!(f, "device limit: {why}"),
            Error::Device(why) => write!(f, "device error: {why}"),
            Error::NoDevice(why) => write!(f, "no device: {why}"),
            Error::Model(why) => write!(f, "model: {why}"),
            Error::Io { path, reason } => write!(f, "{path}: {reason}"),
            Error::BadInput(why) => write!(f, "bad input: {why}"),
            Error::NonFinite { tensor, index } => write!(f, "`{tensor}` holds a NaN or infinity at {index:?}"),
        }
    }
}

impl std::error::Error for Error {}

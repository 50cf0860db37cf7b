//! RoPE inside the attention kernels: keys stored pre-RoPE are rotated (rotate-half layout) at attention time
//! with a per-slot position — the cache rank for StreamingLLM/TreeKV-style caches, the true position
//! otherwise — and the query with its own position. The base may be NTK-scaled ([`ntk_scaled_base`],
//! LongLLaDA's rule, spec §4.1).
//!
//! Angles are exact to about 3e-7 turns (≈ 2e-6 rad) for every u32 position (see `kvsqueeze_kernels::rope`);
//! a plain f32 `pos·θ` is off by up to 8e-3 rad at position 128k.

use crate::tensor::{DType, DeviceTensor};
pub use kvsqueeze_reference::rope::{ntk_scale_factor, ntk_scaled_base};

/// The documented bound on the kernels' RoPE angle error, in radians (tests derive their tolerance from it).
pub const ANGLE_ERROR_RAD: f64 = 2.5e-6;

/// RoPE applied inside decode attention.
#[derive(Clone, Debug)]
pub struct RopeConfig {
    /// The base `β` (Llama-3: 500 000), possibly NTK-scaled.
    pub base: f64,
    /// `[B, Lq]` u32: each query token's position (contiguous from its element offset, which is honoured).
    pub q_pos: DeviceTensor,
    /// `[B, L_cap]` u32: each cache slot's position, shared by the KV heads; or `[B, Hkv, L_cap]`: per KV head
    /// (caches that evict per head, positions = cache rank).
    pub k_pos: DeviceTensor,
}

/// The angle table of `kvsqueeze_kernels::rope` for head dim `d`: `[d/2, 6]` f32.
pub fn angle_table(base: f64, d: usize) -> Vec<f32> {
    let mut tab = Vec::with_capacity(d / 2 * 6);
    for i in 0..d / 2 {
        let f = base.powf(-2.0 * i as f64 / d as f64) / (2.0 * std::f64::consts::PI);
        for c in 0..3 {
            let m = (f * (1u64 << (10 * c)) as f64).fract();
            let hi = (m * 4096.0).floor() / 4096.0;
            tab.push(hi as f32);
            tab.push((m - hi) as f32);
        }
    }
    tab
}

/// Checks the positions; returns the strides of `k_pos` over `(batch, KV head)` in elements.
pub(crate) fn validate(rope: &RopeConfig, b: usize, lq: usize, hkv: usize, lcap: usize) -> Result<(usize, usize), crate::Error> {
    use crate::Error;
    if !rope.base.is_finite() || rope.base <= 1.0 {
        return Err(Error::Config("RoPE base must be finite and > 1"));
    }
    let per_head = rope.k_pos.shape.len() == 3;
    let k_shape = if per_head { vec![b, hkv, lcap] } else { vec![b, lcap] };
    for (name, t, shape) in [("q_pos", &rope.q_pos, vec![b, lq]), ("k_pos", &rope.k_pos, k_shape)] {
        if t.shape != shape {
            return Err(Error::ShapeMismatch { tensor: name, expected: shape, got: t.shape.clone() });
        }
        if t.dtype != DType::U32 {
            return Err(Error::DtypeMismatch { tensor: name, got: t.dtype, expected: DType::U32 });
        }
        t.check_in_buffer(name)?;
        if !t.is_contiguous() {
            return Err(Error::Layout { tensor: name, reason: "positions must be contiguous (from any element offset)" });
        }
    }
    Ok(if per_head { (hkv * lcap, lcap) } else { (lcap, 0) })
}

//! Small device utilities for benches and tests: a vectorised copy (the bandwidth ceiling benches report
//! against) and a hash-based fill, so large inputs are random without a host upload.

use cubecl::prelude::*;

/// `dst[i] = src[i]` over `len` vectors, grid-stride.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn copy<E: Float, N: Size>(src: &[Vector<E, N>], dst: &mut [Vector<E, N>], len: usize) {
    let stride = (CUBE_COUNT as usize) * (CUBE_DIM as usize);
    let mut i = ABSOLUTE_POS;
    while i < len {
        dst[i] = src[i];
        i += stride;
    }
}

/// Fills `n` elements with values uniform in `[-amp, amp)` from a 32-bit integer hash of `(i, seed)`, never 0.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn fill_hash<E: Float>(dst: &mut [E], n: usize, seed: u32, amp: f32) {
    let stride = (CUBE_COUNT as usize) * (CUBE_DIM as usize);
    let mut i = ABSOLUTE_POS;
    while i < n {
        // A murmur3-style finaliser of the index mixed with the seed.
        let mut h = u32::cast_from(i) ^ seed;
        h ^= h >> 16;
        h *= 0x85eb_ca6b;
        h ^= h >> 13;
        h *= 0xc2b2_ae35;
        h ^= h >> 16;
        let unit = f32::cast_from(h >> 8) / 16_777_216.0; // [0, 1)
        let mut x = (unit * 2.0 - 1.0) * amp;
        if x == 0.0 {
            x = amp * 0.5;
        }
        dst[i] = E::cast_from(x);
        i += stride;
    }
}

/// The first non-finite element of a 4-D view: `first[0] = min(first[0], i)` over the row-major logical index
/// `i` of every element `(a, b, c, d)` (at `off + a·s0 + b·s1 + c·s2 + d·s3`) that is NaN or ±∞. With `ragged`,
/// only `c < lens[a]` is looked at (the valid rows of a cache with spare capacity). `first[0]` starts at
/// `u32::MAX`, which means "all finite"; the view has fewer than 2³² elements (the host checks).
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn find_non_finite<E: Float>(
    x: &[E],
    lens: &[u32],
    first: &mut [Atomic<u32>],
    off: usize,
    n0: usize,
    n1: usize,
    n2: usize,
    n3: usize,
    s0: usize,
    s1: usize,
    s2: usize,
    s3: usize,
    #[comptime] ragged: bool,
) {
    let stride = (CUBE_COUNT as usize) * (CUBE_DIM as usize);
    let total = n0 * n1 * n2 * n3;
    let mut i = ABSOLUTE_POS;
    while i < total {
        let d = i % n3;
        let c = (i / n3) % n2;
        let b = (i / (n3 * n2)) % n1;
        let a = i / (n3 * n2 * n1);
        let mut live = true;
        if comptime![ragged] {
            live = c < lens[a] as usize;
        }
        if live {
            // f16/bf16 widen exactly, so NaN and ±∞ survive the cast.
            let v = f32::cast_from(x[off + a * s0 + b * s1 + c * s2 + d * s3]);
            if v.is_nan() || v.is_inf() {
                first[0].fetch_min(u32::cast_from(i));
            }
        }
        i += stride;
    }
}

/// `dst[dst_off + i] = src[src_off + i]` for `i < n`, grid-stride: gathers small inputs (lengths, positions, a
/// table) into one packed buffer, so that a kernel binds one buffer for them.
#[cube(launch_unchecked)]
pub fn copy_range<T: Numeric>(src: &[T], dst: &mut [T], src_off: usize, dst_off: usize, n: usize) {
    let stride = (CUBE_COUNT as usize) * (CUBE_DIM as usize);
    let mut i = ABSOLUTE_POS;
    while i < n {
        dst[dst_off + i] = src[src_off + i];
        i += stride;
    }
}

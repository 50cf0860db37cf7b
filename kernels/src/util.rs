//! Small device utilities for benches and tests: a vectorised copy (the bandwidth ceiling benches report
//! against) and a hash-based fill, so large inputs are random without a host upload.

use cubecl::prelude::*;

/// `dst[i] = src[i]` over `n` vectors, grid-stride.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn copy<E: Float, N: Size>(src: &[Vector<E, N>], dst: &mut [Vector<E, N>], n: usize) {
    let stride = (CUBE_COUNT as usize) * (CUBE_DIM as usize);
    let mut i = ABSOLUTE_POS;
    while i < n {
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

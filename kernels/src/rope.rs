//! RoPE angles on the device, accurate for any u32 position.
//!
//! `θ_i = base^(−2i/D)`; in turns `f_i = θ_i/2π`. A position `p < 2³²` is split into three 10/10/12-bit chunks
//! `p = p₂·2²⁰ + p₁·2¹⁰ + p₀`; the host tabulates, per frequency and chunk `c`, `m_c = frac(2^(10c)·f_i)` split
//! as `hi + lo` with `hi` holding 12 significant bits, so `p_c·hi` is exact in f32 and `frac` of it is exact;
//! `p_c·lo` is small. Then `turns = frac(Σ_c frac(p_c·hi_c) + p_c·lo_c)` is within ~1e-7 turns of the exact
//! value, where a plain f32 `p·θ` would be off by ~1e-2 rad at p = 128k. Table layout: `[D/2, 6]`
//! (`hi₀, lo₀, hi₁, lo₁, hi₂, lo₂`).

use cubecl::prelude::*;

/// `(cos, sin)` of the RoPE angle of frequency `i` at position `pos`, from the table staged in shared memory.
#[cube]
pub fn rope_cos_sin(tab: &Shared<[f32]>, i: usize, pos: u32) -> (f32, f32) {
    let p0 = f32::cast_from(pos & 1023);
    let p1 = f32::cast_from((pos >> 10) & 1023);
    let p2 = f32::cast_from(pos >> 20);
    let a0 = p0 * tab[i * 6];
    let a1 = p1 * tab[i * 6 + 2];
    let a2 = p2 * tab[i * 6 + 4];
    let mut t = (a0 - f32::floor(a0)) + (a1 - f32::floor(a1)) + (a2 - f32::floor(a2));
    t += p0 * tab[i * 6 + 1] + p1 * tab[i * 6 + 3] + p2 * tab[i * 6 + 5];
    t -= f32::floor(t);
    let angle = t * 6.283_185_5;
    (f32::cos(angle), f32::sin(angle))
}

//! Embedding kvsqueeze caches in an engine's decode loop (one attention layer, a continuous batch of 4 slots):
//! a TreeKV cache with in-kernel RoPE by cache rank, and a FourierAttention cache, each admitting, stepping and
//! retiring sequences while the others keep their state. Random tensors stand in for the model's q/k/v
//! projections; an engine passes views of its own buffers (`DeviceTensor` wraps a cubecl handle). (On i.i.d.
//! noise FourierAttention's reconstructed middle is poor — it compresses smooth per-dim series — so its output
//! norms here say nothing about its fidelity; `kvsqueeze eval` measures that on a real model.)
//!
//! `cargo run --release --example decode_loop` (any device: CUDA with `--features cuda`, else wgpu).

use kvsqueeze::fourier::{FourierDims, FourierLayerCache, FourierLayerConfig};
use kvsqueeze::policy::{Admission, CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use kvsqueeze::util::random;
use kvsqueeze::DType;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = kvsqueeze::runtime::client()?;
    let (slots, hq, hkv, d, dtype) = (4usize, 8usize, 2usize, 64usize, DType::F32);
    let rnd = |shape: &[usize], seed: u32| random(&client, shape, dtype, seed, 1.0);

    // TreeKV at a budget of 128 entries per KV head: 4 sinks, 60 for TreeKV's pairs, 64 recent.
    let layout = Layout { sinks: 4, middle: 60, recent: 64 };
    let cfg = PolicyCacheConfig::new(Policy::TreeKv { select_left: false }, layout, slots, hq, hkv, d, dtype).with_rope(10_000.0);
    let mut tree = PolicyCache::new(&client, cfg)?; // every slot live and empty
    tree.retire(2)?;
    tree.retire(3)?;

    // FourierAttention: 4 exact leading tokens, 64 exact recent ones, N = 16 frequencies, a middle of up to 2k
    // tokens, a quarter of every head's dims kept exact.
    let crit: Vec<usize> = (0..d).filter(|j| j % 4 == 0).collect();
    let dims = FourierDims::uniform(hkv, d, &crit, &crit)?;
    let mut fourier = FourierLayerCache::new(&client, FourierLayerConfig::new(slots, hq, dtype, 4, 64, 16, 2048, dims))?;
    for b in 0..slots {
        // Each request's prompt (post-RoPE keys, [L, Hkv, D]) — ragged lengths.
        let l = 200 + 50 * b;
        fourier.prefill(b, &rnd(&[l, hkv, d], 100 + b as u32)?, &rnd(&[l, hkv, d], 200 + b as u32)?)?;
    }

    for step in 0..300u32 {
        if step == 50 {
            // A request arrives in slot 2: its prompt's keys and values, [1, Hkv, L, D] (pre-RoPE: the cache rotates),
            // and the queries of its last block, [1, w, Hq, D] with w = L − block·⌊(L − 1)/block⌋ = 16 here, selected
            // by TreeKV's block prefill.
            let (k, v, q_obs) = (rnd(&[1, hkv, 400, d], 7)?, rnd(&[1, hkv, 400, d], 8)?, rnd(&[1, 16, hq, d], 9)?);
            tree.admit(2, Admission::TreeKv { q_obs: &q_obs, k: &k, v: &v, block: 32 })?;
        }
        if step == 150 {
            // Slot 0's request finished; the FourierAttention batch retires one too and admits a new one.
            tree.retire(0)?;
            fourier.retire(1)?;
            fourier.prefill(1, &rnd(&[30, hkv, d], 9)?, &rnd(&[30, hkv, d], 10)?)?;
        }
        // This step's projections of the new token of every slot (rows of retired slots are ignored).
        let (q, k, v) = (rnd(&[slots, 1, hq, d], 1000 + step)?, rnd(&[slots, hkv, d], 2000 + step)?, rnd(&[slots, hkv, d], 3000 + step)?);
        let o_tree = tree.step(&q, &k, &v)?; // [slots, 1, Hq, D], the cache's own buffer until the next step
        let o_fourier = fourier.step(&q, &k, &v)?;
        if step % 100 == 99 {
            let norm = |o: Vec<f64>| -> Vec<String> { o.chunks(hq * d).map(|r| format!("{:.3}", r.iter().map(|x| x * x).sum::<f64>().sqrt())).collect() };
            println!("step {step}: TreeKV entries per slot {:?}, |o| per slot {:?}", (0..slots).map(|b| tree.seq_len(b)).collect::<Vec<_>>(), norm(o_tree.to_host_f64(&client)?));
            println!("          FourierAttention tokens per slot {:?}, |o| per slot {:?}", fourier.lens(), norm(o_fourier.to_host_f64(&client)?));
        }
    }
    Ok(())
}

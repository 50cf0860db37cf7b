//! A decode step of the fixed-budget caches (append + decode attention with mass + policy step) at budgets
//! 1k/4k/8k for B 1/8/32, in steady state (the cache is full, so every step evicts), against dense decode
//! attention over a full 128k cache measured in the same run. Hq 32 / Hkv 8, D 128, bf16 where supported.
//! `KVSQUEEZE_BENCH=quick` (the default off CUDA) runs a small grid.

use kvsqueeze::attention::{decode_attention, decode_attention_into, DecodeConfig};
use kvsqueeze::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use kvsqueeze::util::{random, sync};
use kvsqueeze::DType;
use std::time::Instant;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn main() {
    let client = kvsqueeze::runtime::client().expect("a device");
    let full = std::env::var("KVSQUEEZE_BENCH").map(|v| v == "full").unwrap_or(client.name().contains("cuda"));
    let dtype = [DType::BF16, DType::F16, DType::F32].into_iter().find(|&t| kvsqueeze::attention::dtype_supported(&client, t)).unwrap();
    println!("device: {}; dtype {dtype:?}", kvsqueeze::attention::device_name(&client));
    let (batches, budgets, dense_len): (Vec<usize>, Vec<usize>, usize) =
        if full { (vec![1, 8, 32], vec![1024, 4096, 8192], 131072) } else { (vec![1], vec![64], 2048) };
    println!("| B | budget | policy | step µs | attention part µs | policy part | dense {dense_len} µs | dense / step |");
    println!("|---|---|---|---|---|---|---|---|");
    for &b in &batches {
        // Dense decode attention over the full cache, the baseline of this row.
        let (q, kd, vd) = (random(&client, &[b, 1, HQ, D], dtype, 1, 1.5).expect("a bench-sized buffer"), random(&client, &[b, HKV, dense_len, D], dtype, 2, 1.5).expect("a bench-sized buffer"), random(&client, &[b, HKV, dense_len, D], dtype, 3, 1.0).expect("a bench-sized buffer"));
        let lens = vec![dense_len as u32; b];
        let cfg = DecodeConfig::new();
        let mut out = decode_attention(&client, &q, &kd, &vd, &lens, &cfg).unwrap();
        let time = |f: &mut dyn FnMut()| {
            f();
            sync(&client).unwrap();
            let reps = 20;
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            sync(&client).unwrap();
            t.elapsed().as_secs_f64() / reps as f64
        };
        let dense = time(&mut || decode_attention_into(&client, &q, &kd, &vd, &lens, &cfg, &mut out).unwrap());
        drop((kd, vd));
        for &budget in &budgets {
            for policy in [Policy::TreeKv { select_left: false }, Policy::WeightedKv, Policy::StreamingLlm, Policy::H2o, Policy::Tova] {
                let layout = Layout { sinks: 4, middle: budget / 2 - 4, recent: budget / 2 };
                let mut cache = PolicyCache::new(&client, PolicyCacheConfig::new(policy, layout, b, HQ, HKV, D, dtype)).unwrap();
                let (k1, v1) = (random(&client, &[b, HKV, D], dtype, 4, 1.5).expect("a bench-sized buffer"), random(&client, &[b, HKV, D], dtype, 5, 1.0).expect("a bench-sized buffer"));
                // Fill to steady state (every later step evicts).
                for _ in 0..budget + 1 {
                    cache.step(&q, &k1, &v1).unwrap();
                }
                let step = time(&mut || {
                    cache.step(&q, &k1, &v1).unwrap();
                });
                // The attention part alone: decode attention with mass over the same c + 1 slots.
                let (ka, va) = (random(&client, &[b, HKV, budget + 1, D], dtype, 6, 1.5).expect("a bench-sized buffer"), random(&client, &[b, HKV, budget + 1, D], dtype, 7, 1.0).expect("a bench-sized buffer"));
                let acfg = DecodeConfig::new().with_mass(true);
                let alens = vec![budget as u32 + 1; b];
                let mut aout = decode_attention(&client, &q, &ka, &va, &alens, &acfg).unwrap();
                let att = time(&mut || decode_attention_into(&client, &q, &ka, &va, &alens, &acfg, &mut aout).unwrap());
                let name = match policy {
                    Policy::TreeKv { .. } => "treekv",
                    Policy::WeightedKv => "weightedkv",
                    Policy::H2o => "h2o",
                    Policy::Tova => "tova",
                    _ => "streaming-llm",
                };
                println!(
                    "| {b} | {budget} | {name} | {:.1} | {:.1} | {:.0}% | {:.1} | {:.1}× |",
                    step * 1e6,
                    att * 1e6,
                    100.0 * (step - att).max(0.0) / step,
                    dense * 1e6,
                    dense / step
                );
            }
        }
    }
}

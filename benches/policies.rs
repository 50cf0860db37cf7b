//! A decode step of the fixed-budget caches (append + decode attention with mass + policy step) at budgets
//! 1k/4k/8k for B 1/8/32, in steady state (the cache is full, so every step evicts), against dense decode
//! attention over a full 128k cache and PyTorch SDPA (`KVSQUEEZE_SDPA_JSON`, the same run) over the same dense
//! cache. Hq 32 / Hkv 8, D 128, bf16 where supported. Per row: launches and device allocations + uploads per step
//! (the crate's counter over the timed steps), the step time, its attention part (the same planned decode
//! attention alone) and the rest. `KVSQUEEZE_BENCH=quick` (the default off CUDA) runs a small grid.

mod common;

use kvsqueeze::attention::{decode_attention, decode_attention_into, DecodeConfig, DecodePlan, DecodeShape};
use kvsqueeze::policy::{CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use kvsqueeze::tensor::{device_allocations, device_launches};
use kvsqueeze::util::{random, sync};
use kvsqueeze::{DType, DeviceTensor};
use std::time::Instant;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const REPS: usize = 50;

fn main() {
    let client = kvsqueeze::runtime::client().expect("a device");
    let full = std::env::var("KVSQUEEZE_BENCH").map(|v| v == "full").unwrap_or(client.name().contains("cuda"));
    let dtype = [DType::BF16, DType::F16, DType::F32].into_iter().find(|&t| kvsqueeze::attention::dtype_supported(&client, t)).unwrap();
    println!("device: {}; dtype {dtype:?}", kvsqueeze::attention::device_name(&client));
    let (batches, budgets, dense_len): (Vec<usize>, Vec<usize>, usize) = if full { (vec![1, 8, 32], vec![1024, 4096, 8192], 131072) } else { (vec![1], vec![64], 2048) };
    let buf = |shape: &[usize], seed: u32, amp: f32| random(&client, shape, dtype, seed, amp).expect("a bench-sized buffer");
    // Mean seconds per call over REPS calls after a warm-up, the device synced before each clock read.
    let time = |f: &mut dyn FnMut()| {
        f();
        sync(&client).unwrap();
        let t = Instant::now();
        for _ in 0..REPS {
            f();
        }
        sync(&client).unwrap();
        t.elapsed().as_secs_f64() / REPS as f64
    };
    println!("| B | budget | policy | launches/step | allocs+uploads/step | step µs | attention part µs | rest | dense {dense_len} µs (ours) | SDPA {dense_len} µs (best) | dense / step |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &b in &batches {
        // Dense decode attention over the full cache, the baseline of this row.
        let (q, kd, vd) = (buf(&[b, 1, HQ, D], 1, 1.5), buf(&[b, HKV, dense_len, D], 2, 1.5), buf(&[b, HKV, dense_len, D], 3, 1.0));
        let lens = vec![dense_len as u32; b];
        let cfg = DecodeConfig::new();
        let mut out = decode_attention(&client, &q, &kd, &vd, &lens, &cfg).unwrap();
        let dense = time(&mut || decode_attention_into(&client, &q, &kd, &vd, &lens, &cfg, &mut out).unwrap());
        drop((kd, vd));
        let sdpa = common::sdpa_best(b, dense_len).map_or("not measured".to_string(), |(k, s)| format!("{:.1} ({k})", s * 1e6));
        for &budget in &budgets {
            // The attention part alone: the planned decode attention with mass over the same c + 1 slots, lengths
            // on the device (what the step launches).
            let (ka, va) = (buf(&[b, HKV, budget + 1, D], 6, 1.5), buf(&[b, HKV, budget + 1, D], 7, 1.0));
            let alens = DeviceTensor::from_host(&client, &vec![budget as u32 + 1; b], &[b]).unwrap();
            let mut plan = DecodePlan::new(&client, DecodeShape::new(b, 1, HQ, HKV, D, budget + 1, dtype), &DecodeConfig::new().with_mass(true)).unwrap();
            let att = time(&mut || {
                plan.run(&q, &ka, &va, &alens, None).unwrap();
            });
            drop((ka, va));
            for policy in [Policy::TreeKv { select_left: false }, Policy::WeightedKv, Policy::StreamingLlm, Policy::H2o, Policy::Tova] {
                let layout = Layout { sinks: 4, middle: budget / 2 - 4, recent: budget / 2 };
                let mut cache = PolicyCache::new(&client, PolicyCacheConfig::new(policy, layout, b, HQ, HKV, D, dtype)).unwrap();
                let (k1, v1) = (buf(&[b, HKV, D], 4, 1.5), buf(&[b, HKV, D], 5, 1.0));
                // Fill to steady state (every later step evicts).
                for _ in 0..budget + 1 {
                    cache.step(&q, &k1, &v1).unwrap();
                }
                let (before, l0) = (device_allocations(), device_launches());
                let step = time(&mut || {
                    cache.step(&q, &k1, &v1).unwrap();
                });
                let allocs = (device_allocations() - before) as f64 / (REPS + 1) as f64;
                let launches = (device_launches() - l0) as f64 / (REPS + 1) as f64;
                let name = match policy {
                    Policy::TreeKv { .. } => "treekv",
                    Policy::WeightedKv => "weightedkv",
                    Policy::H2o => "h2o",
                    Policy::Tova => "tova",
                    _ => "streaming-llm",
                };
                println!(
                    "| {b} | {budget} | {name} | {launches} | {allocs} | {:.1} | {:.1} | {:.0}% | {:.1} | {sdpa} | {:.1}× |",
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

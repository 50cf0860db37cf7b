//! FlashFourierAttention decode (all three paths: FFT, spectral sums, direct reconstruction) against dense decode attention over the full cache in the same run,
//! at the paper's Llama-3.1-8B-like setting: Hq 32 / Hkv 8, D 128, N 512, init 4 + local 1020, the dim lists
//! of layer 10 of the paper's file (80% of K and V columns compressed), f16 storage. Also: the prefill of one
//! 32k-token sequence (copy + transform + stats).
//!
//! The decode rows use [`FourierLayerCache::synthetic_formed`] (random contents of the formed state's exact
//! shapes, so a 128k-token cache does not need its prefill transform first); a gate before any timing checks the
//! two paths against each other on a cache built by a real prefill and decode steps (the kernels' agreement with
//! the f64 reference is the test suite's job, `tests/fourier.rs`).
//!
//! Columns: the bytes the cache holds (what a decode step must read at least), µs per call of each path, the FFT
//! path's bytes/time as bandwidth and as % of a device copy's bandwidth measured first (the floor: the time a
//! decode step needs to read the cache once at that bandwidth), a whole decode step (append + attend by
//! `step_path`: FFT where the device holds its transform)
//! with the launches and device allocations + uploads it makes, dense decode over the full cache (our kernel
//! and, when `KVSQUEEZE_SDPA_JSON` holds `benches/baselines/sdpa_decode.py`'s output of the same run, PyTorch's
//! best SDPA backend; that script times bf16, the same bytes as f16), and the ratios. `KVSQUEEZE_BENCH=quick`
//! (the default off CUDA) runs a small grid.

use kvsqueeze::attention::{decode_attention, decode_attention_into, DecodeConfig};
use kvsqueeze::fourier::{FourierDims, FourierLayerCache, FourierLayerConfig, FourierPath};
use kvsqueeze::policy::CompressedKvCache;
use kvsqueeze::tensor::{device_allocations, device_launches};
use kvsqueeze::util::{copy_bandwidth, random, sync};
use kvsqueeze::DType;
use std::time::Instant;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn time(client: &cubecl::client::Client, reps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    sync(client).unwrap();
    let mut best = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        sync(client).unwrap();
        best.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    best.sort_by(|a, b| a.total_cmp(b));
    best[1]
}

mod common;

fn sdpa(b: usize, l: usize) -> Option<f64> {
    common::sdpa_best(b, l).map(|(_, secs)| secs)
}

fn main() {
    let client = kvsqueeze::runtime::client().expect("a device");
    let full = std::env::var("KVSQUEEZE_BENCH").map(|v| v == "full").unwrap_or(client.name().contains("cuda"));
    let dtype = [DType::F16, DType::F32].into_iter().find(|&t| kvsqueeze::attention::dtype_supported(&client, t)).unwrap();
    println!("device: {}; dtype {dtype:?}; grid {}", kvsqueeze::attention::device_name(&client), if full { "full" } else { "quick" });
    let text = std::fs::read_to_string("benches/data/llama3.1-8b-layer10-dims.json")
        .or_else(|_| std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/llama3.1-8b-layer10-dims.json")))
        .expect("layer 10 dims");
    let dims = FourierDims::from_official_json(&text, 10, HKV, D).expect("dims");
    let (fk, fv) = dims.compressed_fraction();
    let (l_init, l_local, n) = if full { (4, 1020, 512) } else { (4, 60, 32) };
    println!("setting: Hq {HQ} / Hkv {HKV}, D {D}, N {n}, init {l_init} + local {l_local}, layer 10 dims: {:.1}% of K, {:.1}% of V compressed", 100.0 * fk, 100.0 * fv);
    let scale = 1.0 / (D as f32).sqrt();

    // Gate: a real prefill (formed) and decode steps, then spectral == direct and FFT == direct.
    {
        let l = if full { 3000 } else { 400 };
        let cfg = FourierLayerConfig::new(1, HQ, dtype, l_init, l_local, n, l + 64, dims.clone());
        let mut cache = FourierLayerCache::new(&client, cfg).unwrap();
        cache.prefill(0, &random(&client, &[l, HKV, D], dtype, 11, 1.5).expect("a bench-sized buffer"), &random(&client, &[l, HKV, D], dtype, 12, 1.0).expect("a bench-sized buffer")).unwrap();
        for s in 0..8u32 {
            cache.append(&random(&client, &[1, HKV, D], dtype, 20 + s, 1.5).expect("a bench-sized buffer"), &random(&client, &[1, HKV, D], dtype, 40 + s, 1.0).expect("a bench-sized buffer")).unwrap();
        }
        let q = random(&client, &[1, 1, HQ, D], dtype, 13, 1.5).expect("a bench-sized buffer");
        let a = cache.attend(&q, scale, FourierPath::Direct).unwrap().to_host_f64(&client).unwrap();
        let mag = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let tol = 8.0 * 9.8e-4 * mag.max(1e-3);
        for path in [FourierPath::Spectral, FourierPath::Fft] {
            let b = cache.attend(&q, scale, path).unwrap().to_host_f64(&client).unwrap();
            let err = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= tol, "gate: {path:?} vs direct max error {err:.3e} > {tol:.1e}");
            println!("gate ok: {path:?} vs direct after prefill {l} + 8 steps: max |Δ| {err:.2e} (max |o| {mag:.2e})");
        }
        println!("FFT path: (F, Q) = {:?}", cache.fft_size());
    }

    let ceiling = copy_bandwidth(&client, if full { 2 << 30 } else { 64 << 20 }, 10).expect("copy");
    println!("copy ceiling (read+write): {:.3} TB/s", ceiling / 1e12);
    let grid: Vec<(usize, usize)> = if full { [1, 8].iter().flat_map(|&b| [8192, 32768, 131072].map(move |l| (b, l))).collect() } else { vec![(1, 1200), (2, 3000)] };
    println!("\n| B | L | cache MB (dense MB) | FFT µs | FFT GB/s (% ceiling) | floor µs | spectral µs | direct µs | decode step µs (launches, allocs+uploads) | dense µs (ours) | dense SDPA µs | SDPA / FFT | SDPA / spectral | dense (ours) / FFT |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // KVSQUEEZE_ROWS=B1_L32768,B8_L8192 limits the grid (for profiling one row).
    let only = std::env::var("KVSQUEEZE_ROWS").ok();
    for &(b, l) in &grid {
        if only.as_ref().is_some_and(|o| !o.split(',').any(|r| r == format!("B{b}_L{l}"))) {
            continue;
        }
        // Room for the decode steps the step row times (the window's critical columns count in the bytes).
        let window = l - l_init - l_local + 512;
        let cfg = FourierLayerConfig::new(b, HQ, dtype, l_init, l_local, n, window, dims.clone());
        let mut cache = FourierLayerCache::new(&client, cfg).unwrap();
        cache.synthetic_formed(l, 7).unwrap();
        let q = random(&client, &[b, 1, HQ, D], dtype, 3, 1.5).expect("a bench-sized buffer");
        let bytes = cache.physical_bytes();
        let dense_bytes = 2 * b * HKV * l * D * dtype.size();
        let reps = (2e-2 / (bytes as f64 / ceiling)).clamp(5.0, 100.0) as usize;
        let spectral = time(&client, reps, &mut || {
            cache.attend(&q, scale, FourierPath::Spectral).unwrap();
        });
        let fft = time(&client, reps, &mut || {
            cache.attend(&q, scale, FourierPath::Fft).unwrap();
        });
        // A whole decode step (append + attend by `step_path`, `CompressedKvCache::step`), with what it launches and
        // allocates or uploads, counted over 10 steps.
        let (k1, v1) = (random(&client, &[b, HKV, D], dtype, 21, 1.5).expect("a bench-sized buffer"), random(&client, &[b, HKV, D], dtype, 22, 1.0).expect("a bench-sized buffer"));
        let (l0, a0) = (device_launches(), device_allocations());
        for _ in 0..10 {
            cache.step(&q, &k1, &v1).unwrap();
        }
        let (launches, allocs) = ((device_launches() - l0) as f64 / 10.0, (device_allocations() - a0) as f64 / 10.0);
        let step = time(&client, reps.min(100), &mut || {
            cache.step(&q, &k1, &v1).unwrap();
        });
        let direct = if l <= 32768 {
            let r = if full { 3 } else { 5 };
            Some(time(&client, r, &mut || {
                cache.attend(&q, scale, FourierPath::Direct).unwrap();
            }))
        } else {
            None
        };
        drop(cache);
        let (kd, vd) = (random(&client, &[b, HKV, l, D], dtype, 4, 1.5).expect("a bench-sized buffer"), random(&client, &[b, HKV, l, D], dtype, 5, 1.0).expect("a bench-sized buffer"));
        let lens = vec![l as u32; b];
        let dcfg = DecodeConfig::new();
        let mut out = decode_attention(&client, &q, &kd, &vd, &lens, &dcfg).unwrap();
        let dense = time(&client, reps, &mut || decode_attention_into(&client, &q, &kd, &vd, &lens, &dcfg, &mut out).unwrap());
        let sd = sdpa(b, l);
        let bw = bytes as f64 / fft;
        kvsqueeze::util::check_plausible(&format!("FFT B{b} L{l}"), bw, ceiling).expect("a plausible figure");
        println!(
            "| {b} | {l} | {:.1} ({:.1}) | {:.1} | {:.0} ({:.0}%) | {:.1} | {:.1} | {} | {:.1} ({launches}, {allocs}) | {:.1} | {} | {} | {} | {:.2} |",
            bytes as f64 / 1e6,
            dense_bytes as f64 / 1e6,
            fft * 1e6,
            bw / 1e9,
            100.0 * bw / ceiling,
            bytes as f64 / ceiling * 1e6,
            spectral * 1e6,
            direct.map_or("—".into(), |t| format!("{:.1}", t * 1e6)),
            step * 1e6,
            dense * 1e6,
            sd.map_or("not measured".into(), |t| format!("{:.1}", t * 1e6)),
            sd.map_or("—".into(), |t| format!("{:.2}", t / fft)),
            sd.map_or("—".into(), |t| format!("{:.2}", t / spectral)),
            dense / fft,
        );
    }
    // Prefill of one sequence: copy of init/local, critical columns, transform and stats of K and V.
    let l = if full { 32768 } else { 2048 };
    let cfg = FourierLayerConfig::new(1, HQ, dtype, l_init, l_local, n, l, dims.clone());
    let (k, v) = (random(&client, &[l, HKV, D], dtype, 8, 1.5).expect("a bench-sized buffer"), random(&client, &[l, HKV, D], dtype, 9, 1.0).expect("a bench-sized buffer"));
    let mut once = || {
        let mut cache = FourierLayerCache::new(&client, cfg.clone()).unwrap();
        cache.prefill(0, &k, &v).unwrap();
    };
    let secs = time(&client, 1, &mut once);
    println!("\nprefill of {l} tokens (middle {}): {:.2} ms ({:.2} M tokens/s)", l - l_init - l_local, secs * 1e3, l as f64 / secs / 1e6);
    println!("(the paper's Triton kernel on an H200 at this setting, from the issue: 18.7 ms at B=1, L=32k and 155.7 ms at B=8; not measured here)");
}

//! Decode attention on the device: time per call, bytes moved, achieved bandwidth, % of the copy ceiling
//! measured in the same run, the cost of the attention-mass output, and (when `KVSQUEEZE_SDPA_JSON` names the
//! output of `benches/baselines/sdpa_decode.py` from the same machine) the ratio to PyTorch SDPA.
//!
//! Timed through [`DecodePlan::run`] (planned once; lengths and positions on the device, one buffer, as the
//! caches pass them): no allocation, upload or read-back per call, as an engine runs it. `KVSQUEEZE_BENCH=full` (the default on CUDA) runs B ∈ {1, 8, 32} × L ∈ {4k, 16k, 32k, 128k}, Hq 32 / Hkv 8,
//! D 128, bf16; `quick` (the default elsewhere) a small smoke grid in f16/f32. A correctness gate against the
//! f64 reference runs before any timing. Small working sets rotate over several copies of the cache so that
//! every call streams from DRAM, not L2.

use criterion::{Criterion, Throughput};
use kvsqueeze::attention::{decode_attention, DecodeConfig, DecodePlan, DecodeShape};
use kvsqueeze::reference::attention::{attention, Dims};
use kvsqueeze::util::{copy_bandwidth, random, sync};
use kvsqueeze::{DType, DeviceTensor};
use std::time::{Duration, Instant};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

struct Inputs {
    q: DeviceTensor,
    kv: Vec<(DeviceTensor, DeviceTensor)>,
    lens: Vec<u32>,
    /// One u32 buffer: `lens: [B]`, then RoPE positions `q_pos: [B, 1]` (the last token) and `k_pos: [B, L]`.
    ints: DeviceTensor,
}

impl Inputs {
    fn lens(&self) -> DeviceTensor {
        self.ints.view(&[self.lens.len()], &[1], 0)
    }
    fn positions(&self) -> (DeviceTensor, DeviceTensor) {
        let (b, l) = (self.lens.len(), self.lens[0] as usize);
        (self.ints.view(&[b, 1], &[1, 1], b), self.ints.view(&[b, l], &[l, 1], 2 * b))
    }
}

fn inputs(client: &cubecl::client::Client, b: usize, l: usize, dtype: DType) -> Inputs {
    let bytes = 2 * b * HKV * l * D * dtype.size();
    let copies = (512usize << 20).div_ceil(bytes).clamp(1, 64);
    let kv = (0..copies)
        .map(|c| {
            let shape = [b, HKV, l, D];
            (random(client, &shape, dtype, 2 * c as u32 + 1, 1.5).expect("a bench-sized buffer"), random(client, &shape, dtype, 2 * c as u32 + 2, 1.0).expect("a bench-sized buffer"))
        })
        .collect();
    let ints: Vec<u32> = std::iter::repeat_n(l as u32, b).chain(std::iter::repeat_n(l as u32 - 1, b)).chain((0..b * l).map(|i| (i % l) as u32)).collect();
    let ints = DeviceTensor::from_host(client, &ints, &[ints.len()]).expect("a bench-sized buffer");
    Inputs { q: random(client, &[b, 1, HQ, D], dtype, 99, 1.5).expect("a bench-sized buffer"), kv, lens: vec![l as u32; b], ints }
}

/// Seconds per call: median over 5 batches of `reps` back-to-back calls, synchronised at the end of a batch.
fn time_calls(client: &cubecl::client::Client, x: &Inputs, plan: &mut DecodePlan, rope: bool, reps: usize) -> f64 {
    let (lens, (qp, kp)) = (x.lens(), x.positions());
    let mut batches = Vec::new();
    for batch in 0..6 {
        let t = Instant::now();
        for i in 0..reps {
            let (k, v) = &x.kv[i % x.kv.len()];
            plan.run(&x.q, k, v, &lens, rope.then_some((&qp, &kp))).expect("validated shapes");
        }
        sync(client).expect("device ok");
        if batch > 0 {
            batches.push(t.elapsed().as_secs_f64() / reps as f64);
        }
    }
    batches.sort_by(|a, b| a.total_cmp(b));
    batches[batches.len() / 2]
}

/// Correctness gate: the bench's own kernel variants (one split and several) against the f64 reference.
fn gate(client: &cubecl::client::Client, dtype: DType) {
    let (b, l) = (2, 1000);
    let x = inputs(client, b, l, dtype);
    let read = |t: &DeviceTensor| t.to_host_f64(client).expect("read back");
    let (q, k, v) = (read(&x.q), read(&x.kv[0].0), read(&x.kv[0].1));
    for splits in [Some(1), None] {
        let mut cfg = DecodeConfig::new().with_mass(true);
        if let Some(s) = splits {
            cfg = cfg.with_splits(s);
        }
        let out = decode_attention(client, &x.q, &x.kv[0].0, &x.kv[0].1, &x.lens, &cfg).expect("gate launch");
        let (o, mass) = (read(&out.o), read(out.mass.as_ref().unwrap()));
        let mut worst: f64 = 0.0;
        for bi in 0..b {
            let tok = |src: &[f64]| -> Vec<f64> { (0..l).flat_map(|j| (0..HKV).flat_map(move |h| (0..D).map(move |dd| ((bi * HKV + h) * l + j) * D + dd))).map(|i| src[i]).collect() };
            let r = attention(&q[bi * HQ * D..][..HQ * D], &tok(&k), &tok(&v), Dims { lq: 1, l, hq: HQ, hkv: HKV, d: D }, l - 1, 1.0 / (D as f64).sqrt());
            for (a, e) in o[bi * HQ * D..][..HQ * D].iter().zip(&r.o) {
                worst = worst.max((a - e).abs());
            }
            for h in 0..HKV {
                for j in 0..l {
                    worst = worst.max((mass[(bi * HKV + h) * l + j] - r.group_mean[h * l + j]).abs());
                }
            }
        }
        let bound = 4.0
            * match dtype {
                DType::BF16 => 7.8e-3,
                DType::F16 => 9.8e-4,
                DType::F32 | DType::U32 => 1.2e-6,
            };
        assert!(worst <= bound, "correctness gate failed ({splits:?} splits): max error {worst:.3e} > {bound:.1e}");
        eprintln!("gate ok: {:?}, plan {:?}, max error {worst:.2e}", dtype, out.plan);
    }
}

mod common;

fn main() {
    let client = kvsqueeze::runtime::client().expect("a device");
    let name = kvsqueeze::attention::device_name(&client);
    let full = std::env::var("KVSQUEEZE_BENCH").map(|v| v == "full").unwrap_or(client.name().contains("cuda"));
    let dtype = [DType::BF16, DType::F16, DType::F32].into_iter().find(|&t| kvsqueeze::attention::dtype_supported(&client, t)).unwrap();
    println!("device: {name}; dtype {dtype:?}; grid {}", if full { "full" } else { "quick" });
    // `KVSQUEEZE_BENCH_SHAPES=1x4096,8x32768` restricts the grid; with `KVSQUEEZE_BENCH_PROFILE=1` each shape's plan
    // (no mass, no RoPE) just runs three times — for a profiler (`ncu -k regex:decode_split`), nothing timed.
    let only: Option<Vec<(usize, usize)>> = std::env::var("KVSQUEEZE_BENCH_SHAPES")
        .ok()
        .map(|v| v.split(',').map(|bl| bl.split_once('x').and_then(|(b, l)| Some((b.parse().ok()?, l.parse().ok()?))).expect("shapes as BxL,BxL")).collect());
    if std::env::var("KVSQUEEZE_BENCH_PROFILE").is_ok_and(|v| v == "1") {
        for &(b, l) in only.as_deref().unwrap_or(&[(1, 4096)]) {
            let x = inputs(&client, b, l, dtype);
            let mut plan = DecodePlan::new(&client, DecodeShape::new(b, 1, HQ, HKV, D, l, dtype), &DecodeConfig::new()).expect("a plan");
            for _ in 0..3 {
                plan.run(&x.q, &x.kv[0].0, &x.kv[0].1, &x.lens(), None).expect("validated shapes");
            }
            sync(&client).expect("device ok");
            println!("profiled B={b} L={l}: plan {:?}", plan.output().plan);
        }
        return;
    }
    gate(&client, dtype);
    let ceiling = copy_bandwidth(&client, if full { 2 << 30 } else { 64 << 20 }, 10).expect("copy");
    println!("copy ceiling (read+write): {:.3} TB/s", ceiling / 1e12);
    let shapes: Vec<(usize, usize)> = if let Some(only) = only {
        only
    } else if full {
        [1, 8, 32].iter().flat_map(|&b| [4096, 16384, 32768, 131072].map(move |l| (b, l))).collect()
    } else {
        vec![(1, 1024), (2, 4096)]
    };
    let mut criterion = Criterion::default().configure_from_args().sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(if full { 1 } else { 2 }));
    let mut rows = Vec::new();
    for &(b, l) in &shapes {
        let x = inputs(&client, b, l, dtype);
        let kv_bytes = 2 * b * HKV * l * D * dtype.size();
        let io_bytes = 2 * b * HQ * D * dtype.size();
        let mut t = [0.0f64; 2];
        for (mi, mass) in [false, true].into_iter().enumerate() {
            let cfg = DecodeConfig::new().with_mass(mass);
            let mut plan = DecodePlan::new(&client, DecodeShape::new(b, 1, HQ, HKV, D, l, dtype), &cfg).expect("a plan");
            let bytes = kv_bytes + io_bytes + if mass { b * HKV * l * 4 } else { 0 };
            let reps = (2e-2 / (bytes as f64 / ceiling)).clamp(5.0, 200.0) as usize;
            t[mi] = time_calls(&client, &x, &mut plan, false, reps);
            let lens = x.lens();
            let mut group = criterion.benchmark_group("decode_attention");
            group.throughput(Throughput::Bytes(bytes as u64));
            let id = format!("B{b}_L{l}{}", if mass { "_mass" } else { "" });
            group.bench_function(&id, |bench| {
                bench.iter_custom(|iters| {
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        let (k, v) = &x.kv[i % x.kv.len()];
                        plan.run(&x.q, k, v, &lens, None).unwrap();
                    }
                    sync(&client).unwrap();
                    start.elapsed()
                })
            });
            group.finish();
            rows.push((b, l, mass, t[mi], bytes, plan.output().plan));
        }
        let _ = t;
    }
    // The cost of RoPE inside the kernel (cache-rank positions), at one shape.
    let rope_row = shapes.iter().copied().find(|&(b, l)| b == 8 && l == 32768).or(shapes.last().copied()).map(|(b, l)| {
        let x = inputs(&client, b, l, dtype);
        let mut secs = [0.0; 2];
        for (i, rope) in [false, true].into_iter().enumerate() {
            let mut shape = DecodeShape::new(b, 1, HQ, HKV, D, l, dtype);
            if rope {
                shape = shape.with_rope(500_000.0);
            }
            let mut plan = DecodePlan::new(&client, shape, &DecodeConfig::new()).expect("a plan");
            secs[i] = time_calls(&client, &x, &mut plan, rope, 20);
        }
        (b, l, secs)
    });
    println!("\n| B | L | mass | µs/call | GB moved | TB/s | % copy ceiling | mass overhead | SDPA best µs (backend) | SDPA / ours | plan (splits, rows, launches) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, &(b, l, mass, secs, bytes, plan)) in rows.iter().enumerate() {
        let bw = bytes as f64 / secs;
        kvsqueeze::util::check_plausible(&format!("B{b} L{l}"), bw, ceiling).expect("a plausible figure");
        let overhead = if mass { format!("{:+.1}%", (secs / rows[i - 1].3 - 1.0) * 100.0) } else { "—".into() };
        let (sdpa_us, ratio) = match common::sdpa_best(b, l) {
            Some((k, s)) => (format!("{:.1} ({k})", s * 1e6), format!("{:.2}", s / secs)),
            None => ("not measured".into(), "—".into()),
        };
        println!(
            "| {b} | {l} | {} | {:.1} | {:.3} | {:.2} | {:.0}% | {overhead} | {sdpa_us} | {ratio} | {}, {}, {} |",
            if mass { "yes" } else { "no" },
            secs * 1e6,
            bytes as f64 / 1e9,
            bw / 1e12,
            100.0 * bw / (ceiling / 1.0),
            plan.n_splits,
            plan.rows,
            plan.launches
        );
    }
    println!("(copy ceiling {:.3} TB/s = bytes read + written per second by a device copy in this run)", ceiling / 1e12);
    if let Some((b, l, [plain, rope])) = rope_row {
        println!("RoPE in kernel at B={b} L={l}: {:.1} µs vs {:.1} µs without ({:+.1}%)", rope * 1e6, plain * 1e6, (rope / plain - 1.0) * 100.0);
    }
}

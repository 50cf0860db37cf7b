//! Replaying a recorded decode stream through a policy cache (what `kvsqueeze replay` does), from the library:
//! builds a small trace in memory — `q: [steps, Hq, D]`, `k, v: [steps, Hkv, D]` f32 in safetensors — runs it
//! through H2O at a budget of 32 and prints the kept original positions of the last step. A researcher checks
//! their own implementation against these outputs.
//!
//! `cargo run --release --example replay_trace`

use kvsqueeze::policy::{Layout, Policy};
use kvsqueeze::reference::testing::Rng;
use kvsqueeze::replay::{replay, ReplayOptions};
use safetensors::tensor::{Dtype, TensorView};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = kvsqueeze::runtime::client()?;
    let (steps, hq, hkv, d) = (100usize, 4usize, 2usize, 32usize);
    let mut rng = Rng(1);
    let bytes = |n: usize, rng: &mut Rng| -> Vec<u8> { rng.vec(n, 1.0).into_iter().flat_map(|x| (x as f32).to_le_bytes()).collect() };
    let (q, k, v) = (bytes(steps * hq * d, &mut rng), bytes(steps * hkv * d, &mut rng), bytes(steps * hkv * d, &mut rng));
    let trace = safetensors::serialize(
        [("q", TensorView::new(Dtype::F32, vec![steps, hq, d], &q)?), ("k", TensorView::new(Dtype::F32, vec![steps, hkv, d], &k)?), ("v", TensorView::new(Dtype::F32, vec![steps, hkv, d], &v)?)],
        None,
    )?;
    let opts = ReplayOptions { policy: Policy::H2o, layout: Layout { sinks: 4, middle: 12, recent: 16 }, rope: None };
    let mut last = Vec::new();
    let mut sink = |t: usize, _o: &[f32], kept: &[i32]| {
        if t + 1 == steps {
            last = kept.to_vec();
        }
        Ok(())
    };
    let dims = replay(&client, &trace, &opts, &mut sink, &mut |_, _| {})?;
    println!("replayed {} steps (Hq {}, Hkv {}, D {})", dims.0, dims.1, dims.2, dims.3);
    for (h, row) in last.chunks(32).enumerate() {
        println!("KV head {h} keeps {:?}", row);
    }
    Ok(())
}

//! `kvsqueeze replay` end to end: a trace written here, replayed by the binary, checked against the reference
//! state machine on the same stream (f64); and its usage errors.

mod common;

use common::Rng;
use kvsqueeze::reference::policy::{Layout, Policy, PolicyCache, PolicyConfig, Positions};
use kvsqueeze::reference::rope::Rope;
use safetensors::tensor::{Dtype, TensorView};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvsqueeze"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

#[test]
fn replay_matches_reference() {
    let (steps, hq, hkv, d) = (150usize, 4usize, 2usize, 16usize);
    let mut rng = Rng(2024);
    let f32s = |rng: &mut Rng, n: usize| rng.vec(n, 1.5).into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let (q, k, v) = (f32s(&mut rng, steps * hq * d), f32s(&mut rng, steps * hkv * d), f32s(&mut rng, steps * hkv * d));
    fn view(x: &[f32], shape: Vec<usize>) -> TensorView<'_> {
        TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(x)).unwrap()
    }
    let bytes = safetensors::serialize(vec![("q", view(&q, vec![steps, hq, d])), ("k", view(&k, vec![steps, hkv, d])), ("v", view(&v, vec![steps, hkv, d]))], None).unwrap();
    let dir = std::env::temp_dir().join(format!("kvsqueeze-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (trace, out) = (dir.join("trace.safetensors"), dir.join("out.safetensors"));
    std::fs::write(&trace, &bytes).unwrap();
    let budget = 24;
    let layout = Layout { sinks: 4, middle: budget - 4 - 12, recent: 12 };
    for (name, policy) in [("treekv", Policy::TreeKv { select_left: false }), ("weightedkv", Policy::WeightedKv), ("h2o", Policy::H2o)] {
        let status = bin().args(["replay", "--policy", name, "--budget", "24", "--recent", "12", "--rope", "10000", "--trace"]).arg(&trace).arg("--out").arg(&out).status().unwrap();
        assert!(status.success(), "{name}: {status}");
        let written = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&written).unwrap();
        let o: Vec<f32> = bytemuck::pod_collect_to_vec(st.tensor("o").unwrap().data());
        let kept: Vec<i32> = bytemuck::pod_collect_to_vec(st.tensor("kept").unwrap().data());
        assert_eq!(st.tensor("kept").unwrap().shape(), &[steps, hkv, budget]);
        let cfg = PolicyConfig { policy, layout, rope: Some(Rope { base: 10_000.0 }), positions: Positions::CacheRank, scale: 1.0 / (d as f64).sqrt() };
        let mut refs: Vec<PolicyCache<f64>> = (0..hkv).map(|_| PolicyCache::new(cfg, d)).collect();
        let g = hq / hkv;
        for t in 0..steps {
            for (h, r) in refs.iter_mut().enumerate() {
                let qs: Vec<f64> = q[(t * hq + h * g) * d..][..g * d].iter().map(|&x| x as f64).collect();
                let ks: Vec<f64> = k[(t * hkv + h) * d..][..d].iter().map(|&x| x as f64).collect();
                let vs: Vec<f64> = v[(t * hkv + h) * d..][..d].iter().map(|&x| x as f64).collect();
                let want = r.step(&qs, &ks, &vs).o;
                let got = &o[(t * hq + h * g) * d..][..g * d];
                for (a, b) in got.iter().zip(&want) {
                    assert!((*a as f64 - b).abs() < 1e-4, "{name} step {t}: o {a} vs {b}");
                }
                let row: Vec<usize> = kept[(t * hkv + h) * budget..][..budget].iter().filter(|&&p| p >= 0).map(|&p| p as usize).collect();
                assert_eq!(row, r.kept_positions(), "{name} step {t} head {h}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn replay_usage_errors() {
    let code = |args: &[&str]| bin().args(args).output().unwrap().status.code();
    assert_eq!(code(&["replay", "--policy", "lru", "--budget", "8", "--trace", "x"]), Some(2));
    assert_eq!(code(&["replay", "--policy", "h2o", "--trace", "x"]), Some(2));
    assert_eq!(code(&["replay", "--policy", "h2o", "--budget", "8", "--sinks", "6", "--recent", "4", "--trace", "x"]), Some(2));
    assert_eq!(code(&["replay", "--policy", "h2o", "--budget", "8", "--trace", "/nonexistent/trace.safetensors"]), Some(1));
    assert_eq!(code(&["frobnicate"]), Some(2));
}

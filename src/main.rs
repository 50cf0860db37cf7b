//! `kvsqueeze` — command-line entry point. Until the CLI issue lands this runs the reference demo: a random
//! stream through every policy of the executable specification, printing the kept set and the fidelity of the
//! decode output against dense attention. Kernel device discovery is printed by `kvsqueeze devices`.

use kvsqueeze_reference::attention::default_scale;
use kvsqueeze_reference::fourier::{FourierCache, FourierConfig};
use kvsqueeze_reference::metrics::{cosine, relative_l2};
use kvsqueeze_reference::policy::{Layout, Policy, PolicyCache, PolicyConfig, Positions};
use kvsqueeze_reference::rope::Rope;

fn lcg(state: &mut u64) -> f64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    match arg.as_str() {
        "devices" => kvsqueeze::runtime::print_devices(),
        "" | "demo" => demo(),
        other => {
            eprintln!("unknown command `{other}`; try `kvsqueeze demo` or `kvsqueeze devices`");
            std::process::exit(2);
        }
    }
}

fn demo() {
    let (d, g, steps) = (64, 4, 2000);
    let layout = Layout { sinks: 4, middle: 124, recent: 128 };
    println!("reference demo: {steps} decode steps, one KV head, G = {g}, D = {d}, budget {}", layout.capacity());
    println!("{:<22} {:>6} {:>12} {:>10}", "policy", "kept", "rel-L2(o)", "cosine");
    let policies = [
        ("full", Policy::Full),
        ("streaming-llm", Policy::StreamingLlm),
        ("h2o", Policy::H2o),
        ("tova", Policy::Tova),
        ("treekv", Policy::TreeKv { select_left: false }),
        ("treekv-select-left", Policy::TreeKv { select_left: true }),
        ("weightedkv", Policy::WeightedKv),
    ];
    let rope = Some(Rope { base: 10_000.0 });
    let mk = |policy| PolicyConfig { policy, layout, rope, positions: Positions::CacheRank, scale: default_scale(d) };
    let mut caches: Vec<PolicyCache<f64>> = policies.iter().map(|&(_, p)| PolicyCache::new(mk(p), d)).collect();
    let (mut ref_o, mut outs) = (Vec::new(), vec![Vec::new(); caches.len()]);
    let mut seed = 2026u64;
    // A slowly drifting key direction makes attention non-uniform, so the policies differ.
    let drift: Vec<f64> = (0..d).map(|_| lcg(&mut seed)).collect();
    for t in 0..steps {
        let q: Vec<f64> = (0..g * d).map(|i| drift[i % d] * 2.0 + lcg(&mut seed)).collect();
        let k: Vec<f64> = (0..d).map(|i| drift[i] * ((t as f64) * 0.01).sin() + lcg(&mut seed)).collect();
        let v: Vec<f64> = (0..d).map(|_| lcg(&mut seed)).collect();
        for (i, c) in caches.iter_mut().enumerate() {
            let o = c.step(&q, &k, &v).o;
            if i == 0 {
                ref_o.extend_from_slice(&o);
            }
            outs[i].extend(o);
        }
    }
    for ((name, _), (c, o)) in policies.iter().zip(caches.iter().zip(&outs)) {
        println!("{name:<22} {:>6} {:>12.4e} {:>10.6}", c.len(), relative_l2(o, &ref_o), cosine(o, &ref_o));
    }
    let cfg = FourierConfig { d, l_init: 4, l_local: 128, n_freq: 64, window: steps, k_crit: (32..64).collect(), v_crit: (0..16).collect() };
    let mut fc = FourierCache::<f64>::new(cfg).expect("valid config");
    let (k, v): (Vec<f64>, Vec<f64>) = (0..steps * d).map(|i| ((i / d) as f64 * 0.003 * (1 + i % d) as f64).sin()).map(|x| (x, -x)).unzip();
    fc.prefill(&k, &v).expect("fits the window");
    let q: Vec<f64> = (0..g * d).map(|_| lcg(&mut seed)).collect();
    let (direct, spectral) = (fc.attend_direct(&q, default_scale(d)), fc.attend_spectral(&q, default_scale(d)));
    println!("fourier: {steps} tokens, middle {} tokens, spectral vs direct rel-L2 {:.2e}", fc.mid_len(), relative_l2(&spectral, &direct));
}

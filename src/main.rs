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

const USAGE: &str = "usage:
  kvsqueeze demo                      the reference demo of every policy
  kvsqueeze devices                   compiled backends and the device found
  kvsqueeze replay --policy NAME --budget N --trace IN.safetensors [--out OUT.safetensors]
                   [--sinks S (4)] [--recent R (budget/2)] [--rope BASE]
      NAME: full, streaming-llm, h2o, tova, treekv, treekv-select-left, weightedkv
      IN: q [steps, Hq, D], k and v [steps, Hkv, D] (f32/f16/bf16); OUT: o [steps, Hq, D] f32,
      kept [steps, Hkv, budget] i32 (original positions in cache order, -1 padded)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str).unwrap_or("") {
        "devices" => kvsqueeze::runtime::print_devices(),
        "" | "demo" => demo(),
        "replay" => std::process::exit(replay(&args[1..])),
        "-h" | "--help" | "help" => println!("{USAGE}"),
        other => {
            eprintln!("unknown command `{other}`\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// `kvsqueeze replay`; returns the exit code (2: usage, 1: refused or failed).
fn replay(args: &[String]) -> i32 {
    use kvsqueeze::policy::Layout;
    use kvsqueeze::replay::{parse_policy, replay, to_safetensors, ReplayOptions};
    let mut flags = std::collections::HashMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.strip_prefix("--"), it.next()) {
            (Some(name), Some(value)) => {
                flags.insert(name.to_string(), value.clone());
            }
            _ => {
                eprintln!("expected `--flag value` pairs, got `{a}`\n{USAGE}");
                return 2;
            }
        }
    }
    let num = |name: &str| flags.get(name).map(|v| v.parse::<usize>().map_err(|_| format!("--{name} wants a number, got `{v}`")));
    let parsed = (|| -> Result<(ReplayOptions, String, Option<String>), String> {
        let policy = flags.get("policy").ok_or("--policy is required")?;
        let policy = parse_policy(policy).ok_or(format!("unknown policy `{policy}`"))?;
        let budget = num("budget").ok_or("--budget is required")??;
        let sinks = num("sinks").transpose()?.unwrap_or(4.min(budget));
        let recent = num("recent").transpose()?.unwrap_or(budget / 2);
        if sinks + recent > budget {
            return Err(format!("--sinks {sinks} + --recent {recent} exceed --budget {budget}"));
        }
        let rope = flags.get("rope").map(|v| v.parse::<f64>().map_err(|_| format!("--rope wants a number, got `{v}`"))).transpose()?;
        let trace = flags.get("trace").ok_or("--trace is required")?.clone();
        let layout = Layout { sinks, middle: budget - sinks - recent, recent };
        Ok((ReplayOptions { policy, layout, rope }, trace, flags.get("out").cloned()))
    })();
    let (opts, trace, out) = match parsed {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return 2;
        }
    };
    let bytes = match std::fs::read(&trace) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cannot read {trace}: {e}");
            return 1;
        }
    };
    let client = match kvsqueeze::runtime::client() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("no device: {e}");
            return 1;
        }
    };
    eprintln!("device: {}", kvsqueeze::attention::device_name(&client));
    match replay(&client, &bytes, &opts).and_then(|r| to_safetensors(&r, opts.layout.capacity()).map(|b| (r, b))) {
        Ok((r, b)) => {
            let (steps, hq, hkv, d) = r.dims;
            println!("replayed {steps} steps (Hq {hq}, Hkv {hkv}, D {d}) with {:?}, layout {:?}", opts.policy, opts.layout);
            if let Some(path) = out {
                if let Err(e) = std::fs::write(&path, b) {
                    eprintln!("cannot write {path}: {e}");
                    return 1;
                }
                println!("wrote {path}");
            }
            0
        }
        Err(e) => {
            eprintln!("replay refused: {e}");
            1
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

//! `kvsqueeze` — the command line. `compare` is the main job (every cache on one decode stream, one table);
//! `check` runs every kernel against the reference on this device; `bench` the decode-step microbenchmarks;
//! `replay` a recorded trace through one policy; `devices` what was compiled in and found; `demo` the
//! reference-only demo. Every command accepts `--backend cuda|wgpu|cpu|auto` and prints the device it ran on.
//! Errors are one line on stderr with what to do, exit code 2 for usage and 1 for refusals; no partial output
//! file is ever left behind.

use kvsqueeze::compare::{compare, CompareOptions, Stream};
use kvsqueeze::DType;
use kvsqueeze_reference::attention::default_scale;
use kvsqueeze_reference::metrics::{cosine, relative_l2};
use kvsqueeze_reference::policy::{Layout, Policy, PolicyCache, PolicyConfig, Positions};
use kvsqueeze_reference::rope::Rope;
use kvsqueeze_reference::testing::Rng;
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

const USAGE: &str = "usage: kvsqueeze <command> [--backend cuda|wgpu|cpu|auto] [flags]
  compare   the main job: one structured decode stream through every cache, one table
            [--steps N (1024)] [--budgets B1,B2 (128,512)] [--policies P1,P2 (all)] [--dtype f32|f16|bf16 (f32)]
            [--hq 8] [--hkv 2] [--d 64] [--seed 1] [--json]
            policies: full, streaming-llm, h2o, tova, treekv, treekv-select-left, weightedkv, fourier
  check     every kernel against the reference on this device, PASS/FAIL per line
  bench     decode-step microbenchmarks: bytes moved, bandwidth, % of a copy ceiling measured first
            [--len L (4096 on CPU-class devices, 32768 on GPUs)] [--batch B (1)]
  replay    --policy NAME --budget N --trace IN.safetensors [--out OUT.safetensors]
            [--sinks S (4)] [--recent R (budget/2)] [--rope BASE]
            IN: q [steps, Hq, D], k and v [steps, Hkv, D] (f32/f16/bf16); OUT: o [steps, Hq, D] f32,
            kept [steps, Hkv, budget] i32 (original positions in cache order, -1 padded)
  eval      a real LLM (SmolLM2-135M, candle on the CPU) with every layer's attention through each cache, on real
            text; needs `--features eval` [--gguf PATH] [--text NAME=PATH ...] [--prefix 2048] [--scored 512]
            [--windows 4] [--budgets 1/4,1/16 (fractions of the prefix or counts)] [--policies P1,P2 (all)]
            [--prefill select|stream (select)] [--dtype f32] [--attn-every 16] [--json OUT.json] [--svg OUT.svg]
            --replot IN.json --svg OUT.svg: the plot of a saved run
            texts default to data/texts/prideprejudice.txt and sensesensibility.txt
  devices   compiled backends and the device found
  demo      the reference-only demo (no device)";

/// A usage error (exit 2) or a refusal (exit 1).
enum Fail {
    Usage(String),
    Refused(String),
}

type Flags = HashMap<String, String>;

fn parse_flags(args: &[String], switches: &[&str]) -> Result<Flags, Fail> {
    let mut flags = Flags::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            return Err(Fail::Usage(format!("unexpected argument `{a}` (flags are `--name value`)")));
        };
        if switches.contains(&name) {
            flags.insert(name.to_string(), "1".into());
            continue;
        }
        match it.next() {
            Some(v) => {
                flags.insert(name.to_string(), v.clone());
            }
            None => return Err(Fail::Usage(format!("--{name} needs a value"))),
        }
    }
    Ok(flags)
}

fn num(flags: &Flags, name: &str, default: usize) -> Result<usize, Fail> {
    match flags.get(name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| Fail::Usage(format!("--{name} wants a whole number, got `{v}`"))),
    }
}

fn check_known(flags: &Flags, known: &[&str]) -> Result<(), Fail> {
    match flags.keys().find(|k| !known.contains(&k.as_str()) && k.as_str() != "backend") {
        Some(k) => Err(Fail::Usage(format!("unknown flag --{k}"))),
        None => Ok(()),
    }
}

fn client(flags: &Flags) -> Result<cubecl::client::Client, Fail> {
    let backend = flags.get("backend").map(String::as_str).unwrap_or("auto");
    let c = kvsqueeze::runtime::client_for(backend).map_err(|e| {
        Fail::Refused(if backend == "auto" { format!("no device found ({e}); install a Vulkan driver (e.g. `apt-get install mesa-vulkan-drivers`) or build with `--features cpu`") } else { e })
    })?;
    eprintln!("device: {}", kvsqueeze::attention::device_name(&c));
    Ok(c)
}

/// A progress bar on stderr: redrawn in place on a terminal, a line per tenth otherwise.
struct Progress {
    start: Instant,
    last: Instant,
    tenth: usize,
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        Progress { start: Instant::now(), last: Instant::now(), tenth: 0, tty: std::io::stderr().is_terminal() }
    }
    fn update(&mut self, done: usize, total: usize, label: &str) {
        let frac = done as f64 / total.max(1) as f64;
        if self.tty {
            if self.last.elapsed().as_millis() < 100 && done < total {
                return;
            }
            self.last = Instant::now();
            let w = 30;
            let filled = (frac * w as f64) as usize;
            let el = self.start.elapsed().as_secs_f64();
            let eta = if frac > 0.0 { el / frac - el } else { 0.0 };
            eprint!("\r[{}{}] {:>3.0}% eta {:>4.0}s {label:<32}", "#".repeat(filled), ".".repeat(w - filled), frac * 100.0, eta);
            if done >= total {
                eprintln!();
            }
            let _ = std::io::stderr().flush();
        } else if (frac * 10.0) as usize > self.tenth || done >= total {
            self.tenth = (frac * 10.0) as usize;
            eprintln!("progress {:>3.0}% ({label}, {:.0}s)", frac * 100.0, self.start.elapsed().as_secs_f64());
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]);
    let result = match args.first().map(String::as_str).unwrap_or("") {
        "compare" => cmd_compare(rest),
        "check" => cmd_check(rest),
        "bench" => cmd_bench(rest),
        "replay" => cmd_replay(rest),
        "eval" => cmd_eval(rest),
        "devices" => {
            kvsqueeze::runtime::print_devices();
            Ok(())
        }
        "demo" => {
            demo();
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        "" => Err(Fail::Usage("no command given".into())),
        other => Err(Fail::Usage(format!("unknown command `{other}`"))),
    };
    match result {
        Ok(()) => {}
        Err(Fail::Usage(e)) => {
            eprintln!("error: {e} (usage: `kvsqueeze help`)");
            std::process::exit(2);
        }
        Err(Fail::Refused(e)) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn parse_dtype(s: &str) -> Result<DType, Fail> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Fail::Usage(format!("--dtype `{other}`: use f32, f16 or bf16"))),
    }
}

const ALL_POLICIES: [&str; 8] = ["full", "streaming-llm", "h2o", "tova", "treekv", "treekv-select-left", "weightedkv", "fourier"];

fn cmd_compare(args: &[String]) -> Result<(), Fail> {
    let flags = parse_flags(args, &["json"])?;
    check_known(&flags, &["steps", "budgets", "policies", "dtype", "hq", "hkv", "d", "seed", "json"])?;
    let steps = num(&flags, "steps", 1024)?;
    let (hq, hkv, d) = (num(&flags, "hq", 8)?, num(&flags, "hkv", 2)?, num(&flags, "d", 64)?);
    let seed = num(&flags, "seed", 1)? as u64;
    let budgets: Vec<usize> = match flags.get("budgets") {
        None => vec![128, 512],
        Some(v) => v.split(',').map(|b| b.trim().parse::<usize>().map_err(|_| Fail::Usage(format!("--budgets wants numbers like 128,512, got `{v}`")))).collect::<Result<_, _>>()?,
    };
    let policies: Vec<String> = match flags.get("policies") {
        None => ALL_POLICIES.iter().map(|s| s.to_string()).collect(),
        Some(v) => v.split(',').map(|p| p.trim().to_string()).collect(),
    };
    if let Some(p) = policies.iter().find(|p| !ALL_POLICIES.contains(&p.as_str())) {
        return Err(Fail::Usage(format!("unknown policy `{p}`: use {}", ALL_POLICIES.join(", "))));
    }
    if steps < 2 {
        return Err(Fail::Usage("--steps must be at least 2".into()));
    }
    if let Some(&b) = budgets.iter().find(|&&b| b == 0) {
        return Err(Fail::Usage(format!("budget {b}: a cache needs at least one token")));
    }
    if let Some(&b) = budgets.iter().find(|&&b| b >= steps) {
        return Err(Fail::Usage(format!("budget {b} ≥ the stream's {steps} tokens: nothing to compress; use budgets below --steps")));
    }
    if hkv == 0 || hq == 0 || hq % hkv != 0 || d == 0 || d % 8 != 0 {
        return Err(Fail::Usage("--hq must be a multiple of --hkv, and --d a multiple of 8".into()));
    }
    let dtype = parse_dtype(flags.get("dtype").map(String::as_str).unwrap_or("f32"))?;
    let c = client(&flags)?;
    if !kvsqueeze::attention::dtype_supported(&c, dtype) {
        return Err(Fail::Refused(format!("{dtype:?} is not supported on this device; use --dtype f32")));
    }
    let stream = Stream::synthetic(steps, hq, hkv, d, seed);
    let opts = CompareOptions { budgets, policies, dtype };
    let mut bar = Progress::new();
    let rows = compare(&c, &stream, &opts, &mut |a, b, l| bar.update(a, b, l)).map_err(|e| Fail::Refused(e.to_string()))?;
    if flags.contains_key("json") {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| serde_json::json!({"policy": r.policy, "budget": r.budget, "physical_bytes": r.physical_bytes, "ratio_to_full": r.ratio_to_full,
                "rel_l2": r.rel_l2, "kl": r.kl, "jaccard_vs_reference": r.jaccard, "step_us": r.step_us}))
            .collect();
        let out = serde_json::json!({"device": kvsqueeze::attention::device_name(&c), "steps": steps, "hq": hq, "hkv": hkv, "d": d, "dtype": format!("{dtype:?}"), "rows": v});
        println!("{}", serde_json::to_string_pretty(&out).expect("serialisable"));
        return Ok(());
    }
    println!("stream: {steps} tokens, Hq {hq} / Hkv {hkv}, D {d}, {dtype:?}; dense cache {} KB", 2 * hkv * steps * d * dtype.size() / 1024);
    println!("| policy | budget | bytes | / full | rel-L2(o) vs dense | KL(cache‖dense) | kept Jaccard vs f64 ref | step µs |");
    println!("|---|---|---|---|---|---|---|---|");
    let opt = |x: Option<f64>, p: usize| x.map_or("—".to_string(), |v| format!("{v:.p$}"));
    for r in &rows {
        println!("| {} | {} | {} | {:.3} | {:.3e} | {} | {} | {:.0} |", r.policy, r.budget, r.physical_bytes, r.ratio_to_full, r.rel_l2, opt(r.kl, 4), opt(r.jaccard, 3), r.step_us);
    }
    Ok(())
}

fn cmd_check(args: &[String]) -> Result<(), Fail> {
    let flags = parse_flags(args, &[])?;
    check_known(&flags, &[])?;
    let c = client(&flags)?;
    let mut bar = Progress::new();
    let results = kvsqueeze::check::run_checks(&c, &mut |a, b, l| bar.update(a, b, l));
    let mut failed = 0;
    for r in &results {
        println!("{} {}: error {:.2e} (tolerance {:.2e}){}", if r.pass { "PASS" } else { "FAIL" }, r.name, r.error, r.tolerance, if r.note.is_empty() { String::new() } else { format!(" — {}", r.note) });
        failed += !r.pass as usize;
    }
    if failed > 0 {
        return Err(Fail::Refused(format!("{failed} of {} checks failed", results.len())));
    }
    println!("all {} checks passed", results.len());
    Ok(())
}

fn cmd_bench(args: &[String]) -> Result<(), Fail> {
    use kvsqueeze::attention::{decode_attention, decode_attention_into, DecodeConfig};
    use kvsqueeze::fourier::{FourierDims, FourierLayerCache, FourierLayerConfig, FourierPath};
    use kvsqueeze::policy::{CompressedKvCache, PolicyCache, PolicyCacheConfig};
    use kvsqueeze::util::{copy_bandwidth, random, sync};
    let flags = parse_flags(args, &[])?;
    check_known(&flags, &["len", "batch"])?;
    let c = client(&flags)?;
    let gpu = c.features().plane.contains(cubecl::features::Plane::Ops);
    let (l, b) = (num(&flags, "len", if gpu { 32768 } else { 4096 })?, num(&flags, "batch", 1)?);
    let (hq, hkv, d) = (32, 8, 128);
    if l < 2048 || b == 0 {
        return Err(Fail::Usage("--len must be at least 2048 and --batch at least 1".into()));
    }
    let dtype = [DType::BF16, DType::F16, DType::F32].into_iter().find(|&t| kvsqueeze::attention::dtype_supported(&c, t)).expect("f32 is always supported");
    let ceiling = copy_bandwidth(&c, if gpu { 1 << 30 } else { 32 << 20 }, 5).map_err(|e| Fail::Refused(e.to_string()))?;
    println!("B {b}, L {l}, Hq {hq} / Hkv {hkv}, D {d}, {dtype:?}; copy ceiling {:.1} GB/s (read + write)", ceiling / 1e9);
    let fail = |e: kvsqueeze::Error| Fail::Refused(e.to_string());
    // Every timed call is checked (an `Err` stops the bench), and the device is synced before the clock is read.
    let time = |f: &mut dyn FnMut() -> Result<(), kvsqueeze::Error>| -> Result<f64, Fail> {
        f().map_err(fail)?;
        sync(&c).map_err(fail)?;
        let reps = if gpu { 20 } else { 3 };
        let t = Instant::now();
        for _ in 0..reps {
            f().map_err(fail)?;
        }
        sync(&c).map_err(fail)?;
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    };
    println!("| op | µs | MB read | GB/s | % ceiling | vs dense |");
    println!("|---|---|---|---|---|---|");
    let q = random(&c, &[b, 1, hq, d], dtype, 1, 1.5).map_err(fail)?;
    let (k, v) = (random(&c, &[b, hkv, l, d], dtype, 2, 1.5).map_err(fail)?, random(&c, &[b, hkv, l, d], dtype, 3, 1.0).map_err(fail)?);
    let lens = vec![l as u32; b];
    let cfg = DecodeConfig::new();
    let mut out = decode_attention(&c, &q, &k, &v, &lens, &cfg).map_err(fail)?;
    let dense = time(&mut || decode_attention_into(&c, &q, &k, &v, &lens, &cfg, &mut out))?;
    drop((k, v));
    // A figure far above the copy ceiling means the work did not happen (a failed launch or allocation): refused.
    let row = |name: &str, secs: f64, bytes: usize| -> Result<(), Fail> {
        let bw = bytes as f64 / secs;
        kvsqueeze::util::check_plausible(name, bw, ceiling).map_err(fail)?;
        println!("| {name} | {:.1} | {:.1} | {:.1} | {:.0}% | {:.2}× |", secs * 1e6, bytes as f64 / 1e6, bw / 1e9, 100.0 * bw / ceiling, dense / secs);
        Ok(())
    };
    row(&format!("dense decode attention, L {l}"), dense, 2 * b * hkv * l * d * dtype.size())?;
    let budget = (l / 16).max(64);
    let layout = Layout { sinks: 4, middle: budget / 2 - 4, recent: budget / 2 };
    let mut cache = PolicyCache::new(&c, PolicyCacheConfig::new(Policy::TreeKv { select_left: false }, layout, b, hq, hkv, d, dtype)).map_err(fail)?;
    let (k1, v1) = (random(&c, &[b, hkv, d], dtype, 4, 1.5).map_err(fail)?, random(&c, &[b, hkv, d], dtype, 5, 1.0).map_err(fail)?);
    for _ in 0..budget + 1 {
        cache.step(&q, &k1, &v1).map_err(fail)?;
    }
    let step = time(&mut || cache.step(&q, &k1, &v1).map(drop))?;
    row(&format!("TreeKV step, budget {budget} (L/16)"), step, cache.physical_bytes())?;
    let fdtype = if dtype == DType::BF16 { DType::F16 } else { dtype };
    let crit: Vec<usize> = (0..d).filter(|j| j % 5 == 0).collect();
    let dims = FourierDims::uniform(hkv, d, &crit, &crit).map_err(fail)?;
    let (n, li, ll) = if gpu { (512, 4, 1020) } else { (64, 4, 252) };
    let mut fc = FourierLayerCache::new(&c, FourierLayerConfig::new(b, hq, fdtype, li, ll, n, l, dims)).map_err(fail)?;
    fc.synthetic_formed(l, 9).map_err(fail)?;
    let qf = random(&c, &[b, 1, hq, d], fdtype, 6, 1.5).map_err(fail)?;
    let spectral = time(&mut || fc.attend(&qf, 0.088, FourierPath::Spectral).map(drop))?;
    row(&format!("FlashFourier spectral, N {n}, 80% compressed"), spectral, fc.physical_bytes())?;
    Ok(())
}

#[cfg(not(feature = "eval"))]
fn cmd_eval(_args: &[String]) -> Result<(), Fail> {
    Err(Fail::Refused("this binary was built without the `eval` feature: `cargo run --release --features eval -- eval`".into()))
}

#[cfg(feature = "eval")]
fn cmd_eval(args: &[String]) -> Result<(), Fail> {
    use kvsqueeze::eval::{evaluate_text, find_gguf, model::Model, svg, table, to_json, tokenizer::Tokenizer, Budget, EvalOptions, Prefill};
    // `--text` may repeat: collect those first.
    let mut texts: Vec<(String, std::path::PathBuf)> = Vec::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--text" {
            let v = it.next().ok_or_else(|| Fail::Usage("--text needs NAME=PATH".into()))?;
            let (name, path) = v.split_once('=').ok_or_else(|| Fail::Usage(format!("--text wants NAME=PATH, got `{v}`")))?;
            texts.push((name.to_string(), path.into()));
        } else {
            rest.push(a.clone());
        }
    }
    let flags = parse_flags(&rest, &[])?;
    check_known(&flags, &["gguf", "prefix", "scored", "windows", "budgets", "policies", "dtype", "attn-every", "prefill", "json", "svg", "replot"])?;
    if let Some(inp) = flags.get("replot") {
        // Re-plot a saved run: `--replot IN.json --svg OUT.svg` (no model, no device).
        let out = flags.get("svg").ok_or_else(|| Fail::Usage("--replot needs --svg OUT.svg".into()))?;
        let text = std::fs::read_to_string(inp).map_err(|e| Fail::Refused(format!("{inp}: {e}")))?;
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| Fail::Refused(format!("{inp}: {e}")))?;
        let rows = kvsqueeze::eval::rows_from_json(&doc["rows"]).ok_or_else(|| Fail::Refused(format!("{inp}: not a `kvsqueeze eval --json` file")))?;
        return kvsqueeze::output::AtomicFile::create(std::path::Path::new(out)).and_then(|f| f.write_all_and_commit(svg(&rows).as_bytes())).map_err(|e| Fail::Refused(e.to_string()));
    }
    let mut opts = EvalOptions::default();
    opts.prefix = num(&flags, "prefix", opts.prefix)?;
    opts.scored = num(&flags, "scored", opts.scored)?;
    opts.windows = num(&flags, "windows", opts.windows)?;
    opts.attn_every = num(&flags, "attn-every", opts.attn_every)?;
    if let Some(v) = flags.get("budgets") {
        opts.budgets = v.split(',').map(|b| Budget::parse(b.trim()).ok_or_else(|| Fail::Usage(format!("--budgets wants fractions or counts like 1/4,256, got `{b}`")))).collect::<Result<_, _>>()?;
    }
    if let Some(v) = flags.get("policies") {
        opts.policies = v.split(',').map(|p| p.trim().to_string()).collect();
    }
    for p in &opts.policies {
        if !matches!(p.as_str(), "full" | "full-rank" | "fourier") && kvsqueeze::replay::parse_policy(p).is_none() {
            return Err(Fail::Usage(format!("unknown policy `{p}` (full, streaming-llm, h2o, tova, treekv, treekv-select-left, weightedkv, fourier)")));
        }
    }
    if let Some(d) = flags.get("dtype") {
        opts.dtype = parse_dtype(d)?;
    }
    opts.prefill = match flags.get("prefill").map(String::as_str) {
        None | Some("select") => Prefill::Select,
        Some("stream") => Prefill::Stream,
        Some(o) => return Err(Fail::Usage(format!("--prefill `{o}`: use select or stream"))),
    };
    if texts.is_empty() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/texts");
        for name in ["prideprejudice", "sensesensibility"] {
            let local = std::path::Path::new("data/texts").join(format!("{name}.txt"));
            texts.push((name.to_string(), if local.is_file() { local } else { root.join(format!("{name}.txt")) }));
        }
    }
    let gguf = find_gguf(flags.get("gguf").map(std::path::Path::new)).map_err(Fail::Refused)?;
    // Output destinations are checked (and created exclusively) before the long run.
    let create = |flag: &str| flags.get(flag).map(|p| kvsqueeze::output::AtomicFile::create(std::path::Path::new(p))).transpose().map_err(|e| Fail::Refused(e.to_string()));
    let (json_out, svg_out) = (create("json")?, create("svg")?);
    let contents: Vec<(String, String)> = texts.iter().map(|(n, p)| std::fs::read_to_string(p).map(|t| (n.clone(), t)).map_err(|e| Fail::Refused(format!("{}: {e}", p.display())))).collect::<Result<_, _>>()?;
    let c = client(&flags)?;
    let t0 = Instant::now();
    let (model, content) = Model::load(&gguf).map_err(Fail::Refused)?;
    let tok = Tokenizer::from_gguf(&content).map_err(Fail::Refused)?;
    eprintln!("model: {} ({} layers, {}/{} heads, D {}), loaded in {:.1} s", gguf.display(), model.cfg.layers, model.cfg.heads, model.cfg.kv_heads, model.cfg.head_dim, t0.elapsed().as_secs_f64());
    let mut rows = Vec::new();
    for (name, text) in &contents {
        let ids = tok.encode(text).map_err(Fail::Refused)?;
        eprintln!("{name}: {} tokens", ids.len());
        rows.extend(evaluate_text(&c, &model, name, &ids, &opts, &mut |line| eprintln!("{line}")).map_err(Fail::Refused)?);
    }
    println!("settings: prefix {}, scored {}, windows {}, prefill {:?}, dtype {:?}, device {}", opts.prefix, opts.scored, opts.windows, opts.prefill, opts.dtype, kvsqueeze::attention::device_name(&c));
    print!("{}", table(&rows));
    let write = |file: Option<kvsqueeze::output::AtomicFile>, body: String| -> Result<(), Fail> { file.map_or(Ok(()), |f| f.write_all_and_commit(body.as_bytes())).map_err(|e| Fail::Refused(e.to_string())) };
    if flags.contains_key("json") {
        let doc = serde_json::json!({"settings": {"prefix": opts.prefix, "scored": opts.scored, "windows": opts.windows, "prefill": format!("{:?}", opts.prefill), "dtype": format!("{:?}", opts.dtype), "device": kvsqueeze::attention::device_name(&c), "gguf": gguf.display().to_string()}, "rows": to_json(&rows)});
        write(json_out, serde_json::to_string_pretty(&doc).expect("json"))?;
    }
    write(svg_out, svg(&rows))?;
    Ok(())
}

fn cmd_replay(args: &[String]) -> Result<(), Fail> {
    use kvsqueeze::replay::{parse_policy, replay, trace_dims, ReplayOptions, ReplayWriter};
    let flags = parse_flags(args, &[])?;
    check_known(&flags, &["policy", "budget", "trace", "out", "sinks", "recent", "rope"])?;
    let policy = flags.get("policy").ok_or(Fail::Usage("--policy is required".into()))?;
    let policy = parse_policy(policy).ok_or(Fail::Usage(format!("unknown policy `{policy}`")))?;
    if !flags.contains_key("budget") {
        return Err(Fail::Usage("--budget is required".into()));
    }
    let budget = num(&flags, "budget", 0)?;
    if budget == 0 {
        return Err(Fail::Usage("--budget must be at least 1".into()));
    }
    let sinks = num(&flags, "sinks", 4.min(budget))?;
    let recent = num(&flags, "recent", budget / 2)?;
    if sinks.checked_add(recent).is_none_or(|sr| sr > budget) {
        return Err(Fail::Usage(format!("--sinks {sinks} + --recent {recent} exceed --budget {budget}")));
    }
    let rope = flags.get("rope").map(|v| v.parse::<f64>().map_err(|_| Fail::Usage(format!("--rope wants a number, got `{v}`")))).transpose()?;
    let trace = flags.get("trace").ok_or(Fail::Usage("--trace is required".into()))?;
    let layout = Layout { sinks, middle: budget - sinks - recent, recent };
    let opts = ReplayOptions { policy, layout, rope };
    let refused = |e: kvsqueeze::Error| Fail::Refused(format!("replay refused: {e}"));
    let bytes = std::fs::read(trace).map_err(|e| Fail::Refused(format!("cannot read the trace {trace}: {e}")))?;
    let dims = trace_dims(&bytes).map_err(refused)?;
    // The destination is checked (and the file created exclusively) before the run.
    let mut writer = flags.get("out").map(|p| ReplayWriter::create(std::path::Path::new(p), dims, budget)).transpose().map_err(refused)?;
    let c = client(&flags)?;
    let mut bar = Progress::new();
    let mut sink = |t: usize, o: &[f32], kept: &[i32]| writer.as_mut().map_or(Ok(()), |w| w.write_step(t, o, kept));
    let (steps, hq, hkv, d) = replay(&c, &bytes, &opts, &mut sink, &mut |a, b| bar.update(a, b, "replay")).map_err(refused)?;
    println!("replayed {steps} steps (Hq {hq}, Hkv {hkv}, D {d}) with {:?}, layout {:?}", opts.policy, opts.layout);
    if let (Some(w), Some(path)) = (writer, flags.get("out")) {
        w.finish().map_err(refused)?;
        println!("wrote {path}");
    }
    Ok(())
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
    let mut rng = Rng(2026);
    let drift: Vec<f64> = rng.vec(d, 1.0);
    for t in 0..steps {
        let q: Vec<f64> = (0..g * d).map(|i| drift[i % d] * 2.0 + rng.uniform()).collect();
        let k: Vec<f64> = (0..d).map(|i| drift[i] * ((t as f64) * 0.01).sin() + rng.uniform()).collect();
        let v: Vec<f64> = rng.vec(d, 1.0);
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
}

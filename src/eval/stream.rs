//! Generation and the long-context stream protocol on the burn model ([`super::burn_model`]), every layer's
//! attention through one of our caches; everything on the device.
//!
//! **Stream protocol** (issue 14; TreeKV's PG19 setting): each text is streamed through the cache token by token
//! from its first token — no prefix selected at once — and the NLL of every next token is kept; perplexity is
//! reported over the whole stream and per bucket of `bucket` tokens. The texts run as one batch (one sequence
//! each). Caches: `full` (true positions; the model's RoPE base, or `full-ntk`: LongLLaDA's NTK-scaled base for
//! the stream's length, spec §4.1) and the policy caches at a budget (StreamingLLM, TreeKV and WeightedKV rotate
//! keys by cache rank inside attention; H2O and TOVA keep true positions, `h2o-rank` and `tova-rank` rotate by cache
//! rank — [`super::policy_caches`]). Past the
//! model's trained context (8192 for SmolLM2) Full at true positions sees positions it was never trained on.
//!
//! Per step nothing is read back: the NLLs stay on the device and are read every [`READ_EVERY`] tokens.

use super::burn_model::{advance, argmax, nll, read_f32, read_ids, row, upload_ids, BTensor, BurnModel, CacheGroup, Prompt, RopeTable, Stepper};
use super::{policy_caches, prompt_window, select_prompt, Prefill};
use crate::policy::{CompressedKvCache, Policy, PolicyCache};
use crate::tensor::DType;
use crate::Error;
use burn_backend::ops::{FloatTensorOps, IntTensorOps};
use burn_backend::{Backend, Distribution, FloatDType, Scalar, Shape};
use burn_cubecl::CubeBackend as Cb;
use cubecl::client::Client;
use std::time::Instant;

/// Steps between two read-backs of the stream's NLLs.
pub const READ_EVERY: usize = 256;

/// One cache of a stream run or a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSpec {
    /// A [`crate::policy::CACHE_NAMES`] policy (not `fourier`), `full-rank`, or `full-ntk` (Full at an NTK-scaled base).
    pub name: String,
    /// Entries per KV head; `None` for Full (it holds the whole stream).
    pub budget: Option<usize>,
    /// RoPE base instead of the one [`rope_base`] picks.
    pub rope_base: Option<f64>,
}

impl CacheSpec {
    /// A cache by name, with a budget (`None` for Full) and the default RoPE base.
    pub fn new(name: &str, budget: Option<usize>) -> Self {
        CacheSpec { name: name.to_string(), budget, rope_base: None }
    }

    /// `name`, `name@budget`, and `/base=B` when the base is set.
    pub fn label(&self) -> String {
        let mut s = match self.budget {
            Some(b) => format!("{}@{b}", self.name),
            None => self.name.clone(),
        };
        if let Some(b) = self.rope_base {
            s += &format!("/base={b}");
        }
        s
    }
}

/// The RoPE base a cache runs at for a stream of `len` tokens: `spec.rope_base` when set, else the model's, or for
/// `full-ntk` LongLLaDA's `λ·β0` with the model's trained context as `T_train` (unchanged when `len` is within it).
pub fn rope_base(model: &BurnModel, spec: &CacheSpec, len: usize) -> f64 {
    let c = &model.cfg;
    if let Some(b) = spec.rope_base {
        b
    } else if spec.name == "full-ntk" && len > c.context {
        crate::rope::ntk_scaled_base(c.head_dim, c.rope_base, c.context, len)
    } else {
        c.rope_base
    }
}

/// Each spec's caches (one per layer, batch `b`) for a stream of `len` tokens, as consecutive row groups, with the
/// RoPE table they share and every row's first table rows ([`Setup`]).
pub(super) fn setup(client: &Client, model: &BurnModel, specs: &[CacheSpec], b: usize, len: usize, dtype: DType) -> Result<Setup, Error> {
    let mut segments: Vec<Option<f64>> = Vec::new();
    let mut groups = Vec::with_capacity(specs.len());
    let mut seg_of = Vec::with_capacity(specs.len());
    let mut attn_seg_of = Vec::with_capacity(specs.len());
    let mut policies = Vec::with_capacity(specs.len());
    let mut bases = Vec::with_capacity(specs.len());
    for spec in specs {
        let base = rope_base(model, spec, len);
        if !(base.is_finite() && base > 1.0) {
            return Err(Error::Config("RoPE base must be finite and > 1"));
        }
        let name = if spec.name == "full-ntk" { "full" } else { spec.name.as_str() };
        let cap = match (name.starts_with("full"), spec.budget) {
            (true, None) => len,
            (false, Some(c)) => c,
            (true, Some(_)) => return Err(Error::Config("Full takes no budget (it holds the whole stream)")),
            (false, None) => return Err(Error::Config("an evicting cache needs a budget")),
        };
        let (policy, rank, layers) = policy_caches(client, &model.cfg, name, b, cap, dtype, base).map_err(Error::Model)?;
        // A rank-RoPE cache rotates q and k itself: its rows read the identity segment (and a prefill's dense
        // attention the base's).
        let mut segment = |seg: Option<f64>| {
            segments.iter().position(|s| *s == seg).unwrap_or_else(|| {
                segments.push(seg);
                segments.len() - 1
            })
        };
        seg_of.push(segment(if rank { None } else { Some(base) }));
        attn_seg_of.push(segment(Some(base)));
        policies.push((policy, cap));
        bases.push(base);
        groups.push(CacheGroup { rows: b, layers });
    }
    let table = model.rope_table(&segments, len);
    let rows = |of: &[usize]| -> Result<Vec<u32>, Error> {
        let mut rows = Vec::with_capacity(b * specs.len());
        for &k in of {
            rows.extend(std::iter::repeat_n(table.row(k, 0)?, b));
        }
        Ok(rows)
    };
    let (rope_rows, attn_rows) = (rows(&seg_of)?, rows(&attn_seg_of)?);
    Ok(Setup { groups, table, rope_rows, attn_rows, bases, policies })
}

/// What [`setup`] makes: the cache groups, the RoPE table, every row's first table row for the caches and for a
/// prefill's dense attention, each spec's base and (policy, budget).
pub(super) struct Setup {
    pub(super) groups: Vec<CacheGroup<PolicyCache>>,
    pub(super) table: RopeTable,
    pub(super) rope_rows: Vec<u32>,
    pub(super) attn_rows: Vec<u32>,
    pub(super) bases: Vec<f64>,
    pub(super) policies: Vec<(Policy, usize)>,
}

/// What one cache did over the streams.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamRun {
    /// The cache.
    pub spec: CacheSpec,
    /// RoPE base used.
    pub rope_base: f64,
    /// Per stream, the NLL (nats) of tokens `1..=len` given their past.
    pub nll: Vec<Vec<f32>>,
    /// Bytes the device holds for the caches (all layers).
    pub physical_bytes: usize,
    /// Wall seconds of the stream (steps and read-backs).
    pub secs: f64,
}

impl StreamRun {
    /// Perplexity of every stream's tokens `from..to` (0-based among the scored tokens), pooled over streams.
    pub fn ppl(&self, from: usize, to: usize) -> f64 {
        let (mut s, mut n) = (0.0, 0usize);
        for v in &self.nll {
            for &x in &v[from.min(v.len())..to.min(v.len())] {
                s += x as f64;
                n += 1;
            }
        }
        (s / n.max(1) as f64).exp()
    }
}

/// Streams `streams` (equal lengths `len + 1` token ids; one sequence each) through the model once per spec —
/// all specs in one batch (`specs.len() · streams.len()` rows: the model's launches are shared) — and returns a run
/// per spec (see the module docs); `progress` gets a line every [`READ_EVERY`] steps. `secs` of every run is the
/// whole batch's time. `graph`: the model's launches replayed from device graphs ([`Stepper::Graphed`]).
/// `max_secs`: stop at the first read-back past that many seconds; the runs then hold the NLLs of the tokens
/// streamed so far (every row the same count, a multiple of [`READ_EVERY`]) — the caller sees it by their length.
#[allow(clippy::too_many_arguments)]
pub fn stream(
    client: &Client,
    model: &BurnModel,
    specs: &[CacheSpec],
    streams: &[Vec<u32>],
    dtype: DType,
    graph: bool,
    max_secs: Option<f64>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<StreamRun>, Error> {
    let n_s = streams.len();
    let total = streams.first().map(Vec::len).unwrap_or(0);
    if n_s == 0 || specs.is_empty() || total < 2 || streams.iter().any(|s| s.len() != total) {
        return Err(Error::Config("a stream run needs caches and streams of equal lengths ≥ 2"));
    }
    let len = total - 1;
    let Setup { mut groups, table, rope_rows, bases, .. } = setup(client, model, specs, n_s, len, dtype)?;
    let b = n_s * specs.len();
    let device = model.device();
    // Token ids as `[len + 1, B]`: step t reads row t (inputs) and row t + 1 (targets), views without a launch.
    let ids: Vec<u32> = (0..total).flat_map(|t| (0..specs.len()).flat_map(move |_| streams.iter().map(move |s| s[t]))).collect();
    let ids = upload_ids(device, &ids, &[total, b]);
    let mut rope_rows = upload_ids(device, &rope_rows, &[b]);
    let mut nlls = vec![Vec::with_capacity(len); b];
    let mut pending: Vec<BTensor> = Vec::with_capacity(READ_EVERY);
    let mut stepper = Stepper::new(graph);
    let t0 = Instant::now();
    for t in 0..len {
        let logits = stepper.step(model, &row(&ids, t), &rope_rows, &table, &mut groups, dtype)?;
        let target = Cb::int_reshape(row(&ids, t + 1), Shape::from(vec![b, 1]));
        pending.push(nll(logits, &target));
        rope_rows = advance(&rope_rows);
        if pending.len() == READ_EVERY || t + 1 == len {
            let k = pending.len();
            let got = read_f32(Cb::float_cat(std::mem::take(&mut pending), 1))?; // [B, k]
            for (r, out) in nlls.iter_mut().enumerate() {
                out.extend_from_slice(&got[r * k..(r + 1) * k]);
            }
            let done = t + 1;
            let mut line = format!("{done}/{len} tokens, {:.1} steps/s; last {k} ppl:", done as f64 / t0.elapsed().as_secs_f64());
            for (i, spec) in specs.iter().enumerate() {
                let s: f64 = nlls[i * n_s..(i + 1) * n_s].iter().map(|v| v[v.len() - k..].iter().map(|&x| x as f64).sum::<f64>()).sum();
                line += &format!(" {} {:.2}", spec.label(), (s / (k * n_s) as f64).exp());
            }
            progress(&line);
            if max_secs.is_some_and(|m| t0.elapsed().as_secs_f64() > m) && done < len {
                progress(&format!("stopped after {done} of {len} tokens: past --max-secs"));
                break;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut nlls = nlls.into_iter();
    Ok(specs
        .iter()
        .zip(groups)
        .zip(bases)
        .map(|((spec, g), rope_base)| StreamRun {
            spec: spec.clone(),
            rope_base,
            nll: nlls.by_ref().take(n_s).collect(),
            physical_bytes: g.layers.iter().map(CompressedKvCache::physical_bytes).sum(),
            secs,
        })
        .collect())
}

/// A generation's tokens and timings.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Per sequence, the generated ids (the prompt excluded).
    pub tokens: Vec<Vec<u32>>,
    /// Seconds to feed the prompt (token by token through the caches, or one prefill), to the last prompt token's
    /// logits.
    pub prompt_secs: f64,
    /// Seconds of the first decode step, to its token read back: it compiles the kernels the prompt did not use and,
    /// with `graph`, records the step graphs — one-time costs kept out of [`Generation::decode_secs`].
    pub first_step_secs: f64,
    /// Decode steps in [`Generation::decode_secs`]: all but the first (`new_tokens − 2`; the first token comes from
    /// the prompt's logits).
    pub decode_steps: usize,
    /// Seconds of the timed decode steps (from after the first decode step to the last token read back).
    pub decode_secs: f64,
    /// Bytes the device holds for the caches (all layers) at the end.
    pub physical_bytes: usize,
    /// RoPE base used.
    pub rope_base: f64,
}

impl Generation {
    /// Tokens per second over all sequences in the timed decode steps (NaN when none was timed: fewer than 3 new
    /// tokens).
    pub fn tokens_per_s(&self) -> f64 {
        if self.decode_steps == 0 {
            return f64::NAN;
        }
        (self.tokens.len() * self.decode_steps) as f64 / self.decode_secs.max(1e-12)
    }

    /// Milliseconds per timed decode step (NaN when none was timed).
    pub fn ms_per_step(&self) -> f64 {
        if self.decode_steps == 0 {
            return f64::NAN;
        }
        1e3 * self.decode_secs / self.decode_steps as f64
    }
}

/// How [`generate`] picks each next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (argmax of the logits).
    Greedy,
    /// A draw from `softmax(logits / temperature)`, by the Gumbel-max trick on the device — the argmax of
    /// `logits / temperature + g` with `g = −ln(−ln u)`, `u` uniform — so no probabilities are read back and no
    /// host random number is drawn per step; `seed` seeds the device generator once (cubek's, process-wide).
    Temperature {
        /// `> 0`; towards 0 it is greedy.
        temperature: f64,
        /// Seed of the device generator.
        seed: u64,
    },
}

/// The next token of every row, `[B]` int, on the device.
fn choose(logits: BTensor, sampling: Sampling) -> BTensor {
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Temperature { temperature, .. } => {
            let u = Cb::float_random(logits.meta.shape().clone(), Distribution::Uniform(0.0, 1.0), &logits.device, FloatDType::F32);
            // u = 0 gives g = −∞ (never chosen), never a NaN.
            let g = Cb::float_neg(Cb::float_log(Cb::float_neg(Cb::float_log(u))));
            argmax(Cb::float_add(Cb::float_mul_scalar(logits, Scalar::from((1.0 / temperature) as f32)), g))
        }
    }
}

/// Generation: `prompt` (one for every one of `batch` sequences) goes into `spec`'s caches as `prefill` says —
/// token by token through the model and the caches' decode steps ([`Prefill::Stream`]), or in one dense causal
/// pass whose keys and values each cache selects from by its prompt rule ([`Prefill::Select`],
/// [`BurnModel::prefill`], [`super::select_prompt`]) — then `new_tokens` tokens are generated, each chosen from
/// the last logits by `sampling` and fed back on the device (read back once at the end). `graph`: as for
/// [`stream`] (the decode steps; a prefill is one pass).
#[allow(clippy::too_many_arguments)]
pub fn generate(
    client: &Client,
    model: &BurnModel,
    spec: &CacheSpec,
    prompt: &[u32],
    batch: usize,
    new_tokens: usize,
    sampling: Sampling,
    dtype: DType,
    graph: bool,
    prefill: Prefill,
) -> Result<Generation, Error> {
    if prompt.is_empty() || batch == 0 || new_tokens == 0 {
        return Err(Error::Config("a generation needs a prompt, a batch and at least one new token"));
    }
    if let Sampling::Temperature { temperature, seed } = sampling {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::Config("temperature must be finite and > 0"));
        }
        Cb::seed(model.device(), seed);
    }
    let len = prompt.len() + new_tokens;
    let Setup { mut groups, table, rope_rows, attn_rows, bases, policies } = setup(client, model, std::slice::from_ref(spec), batch, len, dtype)?;
    let device = model.device();
    let ids: Vec<u32> = prompt.iter().flat_map(|&t| std::iter::repeat_n(t, batch)).collect();
    let ids = upload_ids(device, &ids, &[prompt.len(), batch]);
    let mut pos = upload_ids(device, &rope_rows, &[batch]);
    let mut stepper = Stepper::new(graph);
    let t0 = Instant::now();
    let mut logits = None;
    match prefill {
        Prefill::Stream => {
            for t in 0..prompt.len() {
                logits = Some(stepper.step(model, &row(&ids, t), &pos, &table, &mut groups, dtype)?);
                pos = advance(&pos);
            }
        }
        Prefill::Select => {
            let (policy, cap) = policies[0];
            let tokens: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
            logits = Some(model.prefill(&tokens, &attn_rows, &[&rope_rows], &table, dtype, &mut |l, pr| admit_prompt(&mut groups[0].layers[l], policy, cap, &pr[0]))?);
            let at: Vec<u32> = rope_rows.iter().map(|&r| r + prompt.len() as u32).collect();
            pos = upload_ids(device, &at, &[batch]);
        }
    }
    let mut next = choose(logits.expect("a prompt token"), sampling);
    // Wait for the prompt (one id read back) so that the decode timing starts from an idle queue.
    read_ids(next.clone())?;
    let prompt_secs = t0.elapsed().as_secs_f64();
    let mut t1 = Instant::now();
    let (mut first_step_secs, mut decode_steps) = (0.0, 0);
    let mut out = vec![next.clone()];
    for i in 1..new_tokens {
        let logits = stepper.step(model, &next, &pos, &table, &mut groups, dtype)?;
        pos = advance(&pos);
        next = choose(logits, sampling);
        out.push(next.clone());
        if i == 1 {
            // One-time costs (compilation, the graphs' recording) stay out of the timed steps.
            read_ids(next.clone())?;
            first_step_secs = t1.elapsed().as_secs_f64();
            t1 = Instant::now();
        } else {
            decode_steps += 1;
        }
    }
    let k = out.len();
    let cat = Cb::int_cat(out.into_iter().map(|t| Cb::int_reshape(t, Shape::from(vec![1, batch]))).collect(), 0); // [k, B]
    let flat = read_ids(cat)?;
    let decode_secs = if decode_steps > 0 { t1.elapsed().as_secs_f64() } else { 0.0 };
    let tokens = (0..batch).map(|s| (0..k).map(|t| flat[t * batch + s]).collect()).collect();
    let physical_bytes = groups[0].layers.iter().map(CompressedKvCache::physical_bytes).sum();
    Ok(Generation { tokens, prompt_secs, first_step_secs, decode_steps, decode_secs, physical_bytes, rope_base: bases[0] })
}

/// Admits a prefill's prompt ([`BurnModel::prefill`]) into `cache` (a `[B]`-row cache of `policy` holding `cap`
/// entries) by the eval's prompt rule ([`prompt_window`], [`select_prompt`]): the last `w` queries as the
/// observation window.
pub fn admit_prompt(cache: &mut PolicyCache, policy: Policy, cap: usize, pr: &Prompt) -> Result<(), Error> {
    let p = pr.k.shape[2];
    let (w, block) = prompt_window(policy, cap, p);
    let q = pr.q.view(&[pr.q.shape[0], w, pr.q.shape[2], pr.q.shape[3]], &pr.q.strides, pr.q.offset + (p - w) * pr.q.strides[1]);
    select_prompt(cache, policy, (w > 0).then_some(&q), &pr.k, &pr.v, block)
}

/// The buckets of a table over `len` tokens: `[0, b)`, `[b, 2b)`, then doubling (`[2b, 4b)`, …) up to `len`.
pub fn table_ranges(len: usize, b: usize) -> Vec<(usize, usize)> {
    let mut r = vec![(0, b.min(len))];
    let mut lo = b;
    while lo < len {
        let hi = if lo == b { 2 * b } else { 2 * lo };
        r.push((lo, hi.min(len)));
        lo = hi;
    }
    r
}

/// Markdown table: per run, bytes, perplexity over the stream and over [`table_ranges`], tokens/s.
pub fn table(runs: &[StreamRun], bucket: usize) -> String {
    let len = runs.iter().map(|r| r.nll.first().map_or(0, Vec::len)).max().unwrap_or(0);
    let ranges = table_ranges(len, bucket);
    let mut s = String::from("| cache | RoPE base | cache MB | PPL (all) |");
    for (a, b) in &ranges {
        s += &format!(" PPL {a}–{b} |");
    }
    s += "\n|---|---|---|---|";
    s += &"---|".repeat(ranges.len());
    s += "\n";
    for r in runs {
        let n = r.nll.first().map_or(0, Vec::len);
        s += &format!("| {} | {} | {:.1} | {:.2} |", r.spec.label(), r.rope_base, r.physical_bytes as f64 / 1e6, r.ppl(0, n));
        for &(a, b) in &ranges {
            s += &format!(" {:.2} |", r.ppl(a, b));
        }
        s += "\n";
    }
    s
}

/// JSON: every run with its per-bucket perplexity (`bucket` tokens) and per-stream NLL sums per bucket.
pub fn to_json(runs: &[StreamRun], bucket: usize) -> serde_json::Value {
    serde_json::Value::Array(
        runs.iter()
            .map(|r| {
                let n = r.nll.first().map_or(0, Vec::len);
                let buckets: Vec<f64> = (0..n.div_ceil(bucket)).map(|i| r.ppl(i * bucket, (i + 1) * bucket)).collect();
                serde_json::json!({
                    "cache": r.spec.name, "budget": r.spec.budget, "label": r.spec.label(), "rope_base": r.rope_base,
                    "physical_bytes": r.physical_bytes, "tokens": n, "streams": r.nll.len(), "secs": r.secs,
                    "ppl": r.ppl(0, n), "bucket": bucket, "ppl_per_bucket": buckets,
                })
            })
            .collect(),
    )
}

/// A plot (SVG): perplexity per bucket against the position in the stream (log scale), one panel per budget
/// (the budget-free caches — Full, Full-NTK — drawn in every panel), a line per cache; a dashed line at the
/// model's trained context.
pub fn svg(runs: &[StreamRun], bucket: usize, trained: usize) -> String {
    let mut budgets: Vec<usize> = runs.iter().filter_map(|r| r.spec.budget).collect();
    budgets.sort();
    budgets.dedup();
    if budgets.is_empty() {
        budgets.push(0);
    }
    let mut names: Vec<String> = runs.iter().map(|r| r.spec.name.clone()).collect();
    names.dedup();
    let colors = ["#000000", "#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];
    let (pw, ph, m) = (480.0, 300.0, 70.0);
    let len = runs.iter().map(|r| r.nll.first().map_or(0, Vec::len)).max().unwrap_or(1).max(1);
    let series = |r: &StreamRun| -> Vec<(f64, f64)> { (0..len.div_ceil(bucket)).map(|i| (((i as f64) + 0.5) * bucket as f64, r.ppl(i * bucket, (i + 1) * bucket))).collect() };
    let all: Vec<f64> = runs.iter().flat_map(|r| series(r).into_iter().map(|p| p.1.max(1.0).log10())).filter(|v| v.is_finite()).collect();
    let lo = all.iter().cloned().fold(f64::MAX, f64::min).min(1.0) - 0.05;
    let hi = all.iter().cloned().fold(lo + 0.1, f64::max) + 0.05;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        budgets.len() as f64 * (pw + m) + m + 150.0,
        ph + 2.0 * m
    );
    for (pi, &bgt) in budgets.iter().enumerate() {
        let (x0, y0) = (m + pi as f64 * (pw + m), 30.0);
        let px = |t: f64| x0 + t / len as f64 * pw;
        let py = |v: f64| y0 + ph - (v.max(1.0).log10() - lo) / (hi - lo) * ph;
        out += &format!("<rect x=\"{x0}\" y=\"{y0}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>\n");
        let title = if bgt == 0 { "perplexity per bucket".to_string() } else { format!("budget {bgt} entries per head: perplexity per {bucket}-token bucket") };
        out += &format!("<text x=\"{x0}\" y=\"{}\">{title} (log scale)</text>\n", y0 - 8.0);
        for k in 0..=4 {
            let v = 10f64.powf(lo + (hi - lo) * k as f64 / 4.0);
            out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.1}</text>\n", x0 - 3.0, py(v) + 4.0);
        }
        for k in 0..=4 {
            let t = len as f64 * k as f64 / 4.0;
            out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{:.0}k</text>\n", px(t), y0 + ph + 14.0, t / 1000.0);
        }
        out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">position in the stream (tokens)</text>\n", x0 + pw / 2.0, y0 + ph + 30.0);
        if trained < len {
            out += &format!(
                "<line x1=\"{0:.1}\" y1=\"{y0}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/><text x=\"{2:.1}\" y=\"{3}\" fill=\"#666\">trained context</text>\n",
                px(trained as f64),
                y0 + ph,
                px(trained as f64) + 3.0,
                y0 + 12.0
            );
        }
        for r in runs.iter().filter(|r| r.spec.budget.is_none() || r.spec.budget == Some(bgt)) {
            let ci = names.iter().position(|n| *n == r.spec.name).unwrap_or(0);
            let pts: Vec<String> = series(r).iter().map(|&(t, v)| format!("{:.1},{:.1}", px(t), py(v))).collect();
            out += &format!("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>\n", pts.join(" "), colors[ci % colors.len()]);
        }
    }
    let lx = budgets.len() as f64 * (pw + m) + m;
    for (ci, n) in names.iter().enumerate() {
        let y = 40.0 + 16.0 * ci as f64;
        out += &format!("<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{n}</text>\n", y - 4.0, colors[ci % colors.len()], lx + 16.0, y);
    }
    out + "</svg>\n"
}

//! The burn model (feature `eval`, `kvsqueeze::eval::burn_model`): SmolLM2 on burn's CubeCL backend with every
//! layer's attention through our caches equals candle's CPU forward (an independent implementation, checked
//! against llama.cpp's perplexity), token by token; greedy generation picks candle's argmax; the batch rows are
//! independent sequences. Needs the GGUF (`scripts/fetch_eval_assets.sh`): a missing model fails, never skips.
#![cfg(feature = "eval")]

mod common;

use candle_core::{Device, Tensor};
use kvsqueeze::eval::burn_model::BurnModel;
use kvsqueeze::eval::model::{log_softmax, DenseHook, Model};
use kvsqueeze::eval::stream::{generate, stream, CacheSpec, Sampling};
use kvsqueeze::eval::tokenizer::Tokenizer;
use kvsqueeze::eval::{find_gguf, Prefill};
use kvsqueeze::DType;
use std::sync::OnceLock;

struct Models {
    candle: Model,
    burn: BurnModel,
    tok: Tokenizer,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let path = find_gguf(None).unwrap_or_else(|e| panic!("{e}"));
        let (candle, content) = Model::load(&path).unwrap();
        let device = kvsqueeze::runtime::device().unwrap();
        let (burn, _) = BurnModel::load(&path, &device).unwrap();
        assert_eq!(burn.cfg, candle.cfg);
        Models { candle, burn, tok: Tokenizer::from_gguf(&content).unwrap() }
    })
}

fn text_ids(file: &str, skip_chars: usize, n: usize) -> Vec<u32> {
    let t = std::fs::read_to_string(format!("{}/data/texts/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let ids = models().tok.encode(&t[skip_chars..skip_chars + 8 * n]).unwrap();
    assert!(ids.len() > n, "text too short");
    ids[..n].to_vec()
}

/// candle's logits `[T][V]` for `ids` in one dense forward pass from position 0.
fn candle_logits(ids: &[u32]) -> Vec<Vec<f32>> {
    let m = &models().candle;
    let t = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let lp = log_softmax(&m.forward(&t, 0, &mut DenseHook::default(), 0).unwrap()).unwrap();
    lp.squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

/// Streaming two texts (one sequence each) gives candle's NLL for every token through: Full at true positions
/// (the model's RoPE), Full with the kernels' RoPE by cache rank (`full-rank`, = the true position for Full), and
/// H2O (true positions), StreamingLLM and TOVA by cache rank (`tova-rank`) at budgets that hold the whole stream
/// (nothing evicted: rank = position) — all five in one batch, so rows of other caches must not leak into a cache's
/// rows.
/// Tolerance: f32 on both sides, sums in other orders (matmul tiles, attention splits), compounded over 30 layers:
/// the cache-path test of `tests/eval.rs` bounds the same compounding at 1e-4 of the perplexity; per token we
/// allow 2e-3 nats (the rank-RoPE path adds the kernels' documented angle error, 2.5e-6 rad).
#[test]
fn burn_model_streams_like_candle() {
    let ms = models();
    let n = 24;
    let streams = [text_ids("prideprejudice.txt", 20_000, n + 1), text_ids("sensesensibility.txt", 30_000, n + 1)];
    let want: Vec<Vec<f32>> = streams
        .iter()
        .map(|s| {
            let lp = candle_logits(s);
            (0..n).map(|t| -lp[t][s[t + 1] as usize]).collect()
        })
        .collect();
    let specs =
        [CacheSpec::new("full", None), CacheSpec::new("full-rank", None), CacheSpec::new("h2o", Some(n + 8)), CacheSpec::new("streaming-llm", Some(n + 8)), CacheSpec::new("tova-rank", Some(n + 8))];
    let refused = kvsqueeze::eval::policy_caches(common::client(), &ms.burn.cfg, "treekv-rank", 1, 8, DType::F32, ms.burn.cfg.rope_base);
    assert!(refused.is_err(), "TreeKV rotates by rank already: `treekv-rank` is no cache");
    let runs = stream(common::client(), &ms.burn, &specs, &streams, DType::F32, false, None, &mut |_| {}).unwrap();
    assert_eq!(runs.len(), specs.len());
    for run in &runs {
        let name = run.spec.label();
        assert_eq!(run.nll.len(), 2);
        let mut worst: f32 = 0.0;
        for (s, (got, want)) in run.nll.iter().zip(&want).enumerate() {
            assert_eq!(got.len(), n);
            for t in 0..n {
                let d = (got[t] - want[t]).abs();
                assert!(d <= 2e-3, "{name}, stream {s}, token {t}: NLL {} vs candle {}", got[t], want[t]);
                worst = worst.max(d);
            }
        }
        let ppl_want = (want.iter().flatten().map(|&x| x as f64).sum::<f64>() / (2 * n) as f64).exp();
        let rel = (run.ppl(0, n) - ppl_want).abs() / ppl_want;
        eprintln!("{name}: worst |ΔNLL| {worst:.2e}, ppl {:.4} vs candle {ppl_want:.4} (relative {rel:.1e})", run.ppl(0, n));
        assert!(rel < 1e-4, "{name}: ppl {} vs candle {ppl_want}", run.ppl(0, n));
        assert!(run.ppl(0, n) > 1.5 && run.ppl(0, n) < 200.0, "a real text's perplexity");
    }
}

/// Greedy generation through Full picks, at every step, candle's argmax given the prompt and the tokens generated
/// so far (unless candle's top two are within 1e-3 nats — a tie that f32 order may break either way); both batch
/// rows generate the same; an evicting cache smaller than the prompt generates valid ids of the vocabulary.
#[test]
fn greedy_generation_follows_candle() {
    let ms = models();
    let prompt = text_ids("prideprejudice.txt", 50_000, 16);
    let g = generate(common::client(), &ms.burn, &CacheSpec::new("full", None), &prompt, 2, 6, Sampling::Greedy, DType::F32, false, Prefill::Stream).unwrap();
    assert_eq!(g.tokens[0], g.tokens[1], "the batch rows are the same sequence");
    let all: Vec<u32> = prompt.iter().chain(&g.tokens[0]).copied().collect();
    let lp = candle_logits(&all);
    for (i, &tok) in g.tokens[0].iter().enumerate() {
        let row = &lp[prompt.len() - 1 + i];
        let best = row.iter().cloned().fold(f32::MIN, f32::max);
        assert!(best - row[tok as usize] <= 1e-3, "step {i}: generated {tok} at {} nats below candle's best", best - row[tok as usize]);
    }
    eprintln!("prompt …{:?} → {:?}", ms.tok.decode(&prompt[8..]).unwrap(), ms.tok.decode(&g.tokens[0]).unwrap());
    let small = generate(common::client(), &ms.burn, &CacheSpec::new("streaming-llm", Some(8)), &prompt, 1, 4, Sampling::Greedy, DType::F32, false, Prefill::Stream).unwrap();
    assert!(small.tokens[0].len() == 4 && small.tokens[0].iter().all(|&t| (t as usize) < ms.burn.cfg.vocab));
    assert!(small.physical_bytes < g.physical_bytes);
}

/// Sampling by Gumbel-max on the device: at a temperature of 1e-6 the logits' gaps (≥ 1e-3 nats between candle's
/// top two above) scale past any Gumbel noise (|g| < 20 in f32), so it is greedy; at temperature 1 the same seed
/// draws the same tokens, every one an id of the vocabulary, and 8 rows (independent noise) do not all follow the
/// greedy path; a bad temperature is refused.
#[test]
fn sampling_is_seeded_and_greedy_when_cold() {
    let ms = models();
    let prompt = text_ids("prideprejudice.txt", 50_000, 8);
    let full = CacheSpec::new("full", None);
    let gen = |b: usize, s: Sampling| generate(common::client(), &ms.burn, &full, &prompt, b, 4, s, DType::F32, false, Prefill::Stream).unwrap().tokens;
    let greedy = gen(1, Sampling::Greedy).remove(0);
    assert_eq!(gen(1, Sampling::Temperature { temperature: 1e-6, seed: 7 })[0], greedy);
    let (a, b) = (gen(8, Sampling::Temperature { temperature: 1.0, seed: 11 }), gen(8, Sampling::Temperature { temperature: 1.0, seed: 11 }));
    assert_eq!(a, b, "the same seed draws the same tokens");
    assert!(a.iter().flatten().all(|&t| (t as usize) < ms.burn.cfg.vocab));
    assert!(a.iter().any(|row| *row != greedy), "8 rows sampled at T = 1 all followed the greedy path");
    eprintln!("greedy {greedy:?}, sampled at T = 1: {a:?}");
    for t in [0.0, -1.0, f64::NAN] {
        let r = generate(common::client(), &ms.burn, &full, &prompt, 1, 2, Sampling::Temperature { temperature: t, seed: 0 }, DType::F32, false, Prefill::Stream);
        assert!(matches!(r, Err(kvsqueeze::Error::Config(_))), "temperature {t} accepted");
    }
}

/// The rows of a batch are independent sequences, op by op: the same tokens in both rows of a batch of two give
/// the same value in both rows at every intermediate of the first layers ([`BurnModel::step_trace`]) and in the
/// logits, and row 0 equals a batch of one — over a few decode steps through Full (so that attention covers more
/// than one key). On a failure, the message names the first op whose rows part. Tolerance: both rows run the same
/// kernels on the same inputs; only a routine that tiles a batch of one and of two differently may sum in another
/// order — f32 rounding over sums of ≤ 1 536 terms, far below 1e-4 of a tensor's largest value (the logits, after
/// all 30 layers, get 1e-3).
#[test]
fn batch_rows_stay_apart() {
    use kvsqueeze::eval::burn_model::{read_f32, upload_ids, CacheGroup};
    let m = &models().burn;
    let ids = text_ids("prideprejudice.txt", 20_000, 4);
    let (steps, traced) = (3, 2);
    let table = m.rope_table(&[Some(m.cfg.rope_base)], 16);
    let run = |b: usize| -> Vec<Vec<(String, Vec<f32>)>> {
        let (_, _, layers) = kvsqueeze::eval::policy_caches(common::client(), &m.cfg, "full", b, 16, DType::F32, m.cfg.rope_base).unwrap();
        let mut groups = [CacheGroup { rows: b, layers }];
        (0..steps)
            .map(|t| {
                let tokens = upload_ids(m.device(), &vec![ids[t]; b], &[b]);
                let rows = upload_ids(m.device(), &vec![table.row(0, t).unwrap(); b], &[b]);
                let (logits, trace) = m.step_trace(&tokens, &rows, &table, &mut groups, DType::F32, traced).unwrap();
                let mut out: Vec<(String, Vec<f32>)> = trace.into_iter().map(|(name, l, x)| (format!("layer {l} {name}"), read_f32(x).unwrap())).collect();
                out.push(("logits".into(), read_f32(logits).unwrap()));
                out
            })
            .collect()
    };
    let (one, two) = (run(1), run(2));
    let mut failures = Vec::new();
    for t in 0..steps {
        assert_eq!(one[t].len(), two[t].len());
        assert_eq!(one[t].len(), 1 + traced * 15 + 1, "every traced intermediate");
        for ((name, a), (_, pair)) in one[t].iter().zip(&two[t]) {
            let n = a.len();
            assert_eq!(pair.len(), 2 * n, "{name}: batch of two");
            let scale = a.iter().fold(0f32, |s, x| s.max(x.abs())).max(1e-6);
            assert!(a.iter().chain(pair).all(|x| x.is_finite()), "step {t} {name}: not finite");
            let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).fold(0f32, |s, (p, q)| s.max((p - q).abs()));
            let (apart, off_one) = (diff(&pair[..n], &pair[n..]), diff(&pair[..n], a));
            let tol = if name == "logits" { 1e-3 } else { 1e-4 } * scale;
            eprintln!("step {t} {name:<22} scale {scale:>9.3e}  row0-row1 {apart:>9.3e}  row0-batch1 {off_one:>9.3e}");
            if apart > tol || off_one > tol {
                failures.push(format!("step {t} {name}: rows differ by {apart:.3e}, row 0 from a batch of one by {off_one:.3e} (tolerance {tol:.3e})"));
            }
        }
    }
    assert!(failures.is_empty(), "batch rows part, first at {}", failures.join("\n"));
}

/// A step replayed from device graphs (`BurnModel::step_graphed`) gives the plain step's logits, step after step,
/// with two cache groups (so the graphs hold the concatenation of the groups' outputs) and an evicting cache
/// whose state changes every step (budget below the stream). The graphs replay the same kernels on the same
/// values: the logits must agree to the last bits (bound 1e-5 of their largest magnitude).
#[test]
fn graphed_steps_equal_plain_steps() {
    use kvsqueeze::eval::burn_model::{read_f32, upload_ids, CacheGroup};
    let m = &models().burn;
    let (n, rows) = (10, 2);
    let texts = [text_ids("prideprejudice.txt", 20_000, n), text_ids("sensesensibility.txt", 30_000, n)];
    let table = m.rope_table(&[Some(m.cfg.rope_base)], 16);
    let groups = || {
        ["full", "h2o"]
            .iter()
            .map(|name| {
                let cap = if *name == "full" { 16 } else { 6 };
                let (_, _, layers) = kvsqueeze::eval::policy_caches(common::client(), &m.cfg, name, rows, cap, DType::F32, m.cfg.rope_base).unwrap();
                CacheGroup { rows, layers }
            })
            .collect::<Vec<_>>()
    };
    let (mut plain, mut graphed) = (groups(), groups());
    let mut graph = None;
    for t in 0..n {
        let ids: Vec<u32> = (0..2 * rows).map(|r| texts[r % 2][t]).collect();
        let tokens = upload_ids(m.device(), &ids, &[2 * rows]);
        let pos = upload_ids(m.device(), &vec![table.row(0, t).unwrap(); 2 * rows], &[2 * rows]);
        let want = read_f32(m.step(&tokens, &pos, &table, &mut plain, DType::F32).unwrap()).unwrap();
        let got = read_f32(m.step_graphed(&tokens, &pos, &table, &mut graphed, DType::F32, &mut graph).unwrap()).unwrap();
        assert!(graph.is_some(), "the first call records the graphs");
        let scale = want.iter().fold(0f32, |s, x| s.max(x.abs()));
        let diff = want.iter().zip(&got).fold(0f32, |s, (a, b)| s.max((a - b).abs()));
        assert!(got.iter().all(|x| x.is_finite()) && diff <= 1e-5 * scale, "step {t}: graphed logits off by {diff:e} (scale {scale})");
    }
    // The replayed steps kept the caches' host bookkeeping with their device state: lengths and kept positions
    // (read from the device) equal the plain path's.
    use kvsqueeze::policy::CompressedKvCache;
    for (p, g) in plain.iter().zip(&graphed) {
        for (a, b) in p.layers.iter().zip(&g.layers) {
            assert_eq!((a.len(), a.kept_positions().unwrap()), (b.len(), b.kept_positions().unwrap()));
        }
    }
    // Other caches have other output buffers: the graphs (which read the recorded caches' buffers) refuse them
    // before any cache steps.
    let mut other = groups();
    let tokens = upload_ids(m.device(), &vec![texts[0][0]; 2 * rows], &[2 * rows]);
    let pos = upload_ids(m.device(), &vec![table.row(0, 0).unwrap(); 2 * rows], &[2 * rows]);
    assert!(m.step_graphed(&tokens, &pos, &table, &mut other, DType::F32, &mut graph).is_err());
    assert!(other.iter().all(|g| g.layers.iter().all(CompressedKvCache::is_empty)), "a refused step left the other caches untouched");
    // A graph replays its own batch and dtype only.
    let (_, _, layers) = kvsqueeze::eval::policy_caches(common::client(), &m.cfg, "full", 1, 16, DType::F32, m.cfg.rope_base).unwrap();
    let one = |x: u32| upload_ids(m.device(), &[x], &[1]);
    assert!(m.step_graphed(&one(texts[0][0]), &one(table.row(0, 0).unwrap()), &table, &mut [CacheGroup { rows: 1, layers }], DType::F32, &mut graph).is_err());
}

/// A dense causal prefill (`BurnModel::prefill`) gives candle's next-token NLL at the prompt's last position for
/// every row — two texts, each through Full (true positions) and TreeKV (its caches take q and k unrotated and
/// rotate by rank; the prefill's attention rotates at the base) in one batch of four — and hands each cache the
/// prompt by its selection rule (`select_prompt`): Full holds the whole prompt and then decodes the following
/// tokens with candle's NLL, TreeKV holds its budget. Tolerance as `burn_model_streams_like_candle`.
#[test]
fn prefill_follows_candle() {
    use kvsqueeze::eval::burn_model::{read_f32, upload_ids, CacheGroup};
    use kvsqueeze::eval::policy_caches;
    use kvsqueeze::eval::stream::admit_prompt;
    use kvsqueeze::policy::{CompressedKvCache, Policy};
    let m = &models().burn;
    let (p, n, budget) = (20, 6, 8);
    let texts = [text_ids("prideprejudice.txt", 20_000, p + n + 1), text_ids("sensesensibility.txt", 30_000, p + n + 1)];
    let want: Vec<Vec<Vec<f32>>> = texts.iter().map(|t| candle_logits(t)).collect();
    let base = m.cfg.rope_base;
    let table = m.rope_table(&[Some(base), None], p + n + 1);
    let caches = |name: &str, cap: usize| policy_caches(common::client(), &m.cfg, name, 2, cap, DType::F32, base).unwrap().2;
    let mut groups = vec![CacheGroup { rows: 2, layers: caches("full", p + n + 1) }, CacheGroup { rows: 2, layers: caches("treekv", budget) }];
    let policies = [(Policy::Full, p + n + 1), (Policy::TreeKv { select_left: false }, budget)];
    let text_of = [0, 1, 0, 1];
    // One prefill of the two texts; both groups take it: Full at the model's base (the attention's own q/k),
    // TreeKV unrotated (its rank RoPE rotates inside attention).
    let tokens: Vec<u32> = texts.iter().flat_map(|t| t[..p].to_vec()).collect();
    let (model_row, rank_row) = (table.row(0, 0).unwrap(), table.row(1, 0).unwrap());
    let rope_rows = [model_row, model_row, rank_row, rank_row];
    let logits = m
        .prefill(&tokens, &[model_row; 2], &[&[model_row; 2], &[rank_row; 2]], &table, DType::F32, &mut |l, prompts| {
            for (gi, (g, pr)) in groups.iter_mut().zip(prompts).enumerate() {
                let (policy, cap) = policies[gi];
                admit_prompt(&mut g.layers[l], policy, cap, pr)?;
            }
            Ok(())
        })
        .unwrap();
    // NLL of `target` from a row of logits, on the host in f64.
    let nll = |row: &[f32], target: u32| {
        let mx = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        lse - row[target as usize] as f64
    };
    let check = |logits: Vec<f32>, t: usize, rows: &[usize]| {
        let v = m.cfg.vocab;
        for &r in rows {
            let (got, exp) = (nll(&logits[r * v..(r + 1) * v], texts[text_of[r]][t + 1]), -want[text_of[r]][t][texts[text_of[r]][t + 1] as usize] as f64);
            assert!((got - exp).abs() <= 2e-3, "row {r}, position {t}: NLL {got} vs candle {exp}");
        }
    };
    check(read_f32(logits).unwrap(), p - 1, &[0, 1]);
    for (g, want_len) in groups.iter().zip([p, budget]) {
        assert!(g.layers.iter().all(|c| c.len() == want_len), "a cache holds {want_len} prompt entries");
    }
    // Decoding on from the prefilled caches: Full follows candle.
    for t in p..p + n {
        let ids: Vec<u32> = text_of.iter().map(|&r| texts[r][t]).collect();
        let pos: Vec<u32> = rope_rows.iter().map(|&r| r + t as u32).collect();
        let logits = m.step(&upload_ids(m.device(), &ids, &[4]), &upload_ids(m.device(), &pos, &[4]), &table, &mut groups, DType::F32).unwrap();
        let got = read_f32(logits).unwrap();
        assert!(got.iter().all(|x| x.is_finite()));
        check(got, t, &[0, 1]);
    }
}

/// The eval protocol on burn (`kvsqueeze::eval::burn_eval`: one dense prefill shared by every cache, then all
/// caches in one batch) gives the candle eval's rows: per policy and budget, perplexity, `KL(full ‖ cache)` and
/// top-1 agreement over 2 windows × 8 scored tokens. Budgets `8` and `1/3` (of a 24-token prefix) are the same 8
/// entries: the burn eval runs them once. Tolerances: the per-token 2e-3 nats of `burn_model_streams_like_candle`
/// (perplexity to 2e-3 relative, KL to 2e-3 nats); top-1 may flip on one near-tie token of the 16.
#[test]
fn eval_on_burn_follows_candle_eval() {
    use kvsqueeze::eval::{burn_eval, evaluate_text, Budget, EvalOptions};
    let ms = models();
    let (p, n) = (24, 8);
    let ids = text_ids("prideprejudice.txt", 40_000, 2 * (p + n + 1));
    let opts = EvalOptions {
        prefix: p,
        scored: n,
        windows: 2,
        budgets: vec![Budget::Tokens(8), Budget::Fraction(3)],
        policies: ["streaming-llm", "h2o", "treekv"].map(String::from).to_vec(),
        ..EvalOptions::default()
    };
    let want = evaluate_text(common::client(), &ms.candle, "pp", &ids, &opts, &mut |_| {}).unwrap();
    let got = burn_eval::evaluate_text(common::client(), &ms.burn, "pp", &ids, &opts, false, &mut |_| {}).unwrap();
    assert_eq!(got.len(), 4, "Full and three policies, one budget each");
    assert_eq!((got[0].policy.as_str(), got[0].kl, got[0].top1), ("full", 0.0, 1.0));
    for g in &got {
        let w = want.iter().find(|w| w.policy == g.policy && w.budget == g.budget).unwrap_or_else(|| panic!("{} at {}", g.policy, g.budget));
        let ctx = format!("{} @ {}: burn {g:?}\ncandle {w:?}", g.policy, g.budget);
        assert!((g.ppl / w.ppl - 1.0).abs() <= 2e-3, "perplexity, {ctx}");
        assert!((g.kl - w.kl).abs() <= 2e-3, "KL, {ctx}");
        assert!((g.top1 - w.top1).abs() <= 1.0 / 16.0 + 1e-9, "top-1, {ctx}");
        assert_eq!((g.physical_bytes, g.max_len), (w.physical_bytes, w.max_len), "{ctx}");
    }
    assert!(got.iter().any(|g| g.kl > 1e-3), "some policy departs from Full (the comparison is not vacuous)");
}

//! The eval protocol ([`super`]'s module docs) on the burn model, everything on the device (issue 14): the same
//! windows, prefix selection and scores as the candle eval, in one batch for all caches.
//!
//! Per text: `windows` windows of `prefix + scored + 1` tokens. The prefixes go through the model once, densely
//! ([`BurnModel::prefill`], one batch row per window), and every cache group takes the same prompt by the eval's
//! prompt rule ([`super::prompt_window`], [`super::select_prompt`]); rank-RoPE caches take it unrotated. Then the
//! `scored` tokens are decoded, teacher-forced, through every cache at once: `(1 + caches) · windows` rows, Full's
//! rows first. Per step, on the device: each row's NLL of the true next token, `KL(full ‖ cache)` of the next-token
//! distributions against Full's row of the same window, and top-1 agreement with it; read back every
//! [`super::stream::READ_EVERY`] steps.
//!
//! Not measured here (the candle eval has them): the attention-output error (it needs dense attention over each
//! row's own history at every layer) and the per-cache time (one batch steps every cache) — `NaN` in the rows.
//! FourierAttention is not a [`crate::policy::PolicyCache`] and runs on the candle eval only; `Prefill::Stream`
//! (the prefix through each cache's decode step) too — `kvsqueeze stream` is the streamed protocol on this path.

use super::burn_model::{advance, argmax, log_softmax, read_f32, row, row_sum, upload_ids, BTensor, BurnModel, Stepper};
use super::stream::{admit_prompt, setup, CacheSpec, Setup, READ_EVERY};
use super::{EvalOptions, EvalRow, Prefill};
use crate::policy::CompressedKvCache;
use crate::Error;
use burn_backend::ops::{BoolTensorOps, FloatTensorOps, IntTensorOps};
use burn_backend::{BoolStore, FloatDType, Shape, Slice};
use burn_cubecl::CubeBackend as Cb;
use cubecl::client::Client;
use std::time::Instant;

/// The caches of one eval: Full first (it holds prefix and scored tokens), then each policy at each budget — a
/// budget that comes to the same entry count as an earlier one (`1/4` and `1024` at a 4096-token prefix) runs once,
/// under the first label.
pub fn eval_specs(opts: &EvalOptions) -> Result<Vec<(CacheSpec, String)>, Error> {
    let mut specs = vec![(CacheSpec::new("full", None), "all".to_string())];
    for name in opts.policies.iter().filter(|x| x.as_str() != "full") {
        if name.starts_with("fourier") {
            return Err(Error::Config("FourierAttention runs on the candle eval only (`kvsqueeze eval --engine candle`)"));
        }
        if name == "full-rank" {
            specs.push((CacheSpec::new(name, None), "all".to_string()));
            continue;
        }
        let mut seen: Vec<usize> = Vec::new();
        for &budget in &opts.budgets {
            let c = budget.tokens(opts.prefix);
            if c == 0 {
                return Err(Error::Config("a budget of 0 entries"));
            }
            if !seen.contains(&c) {
                seen.push(c);
                specs.push((CacheSpec::new(name, Some(c)), budget.label()));
            }
        }
    }
    Ok(specs)
}

/// Runs every cache of `opts` on one text on the burn model (see the module docs); `graph` replays whole steps
/// from device graphs ([`Stepper`]); `progress` gets a line after the prefill and every [`READ_EVERY`] steps.
pub fn evaluate_text(client: &Client, model: &BurnModel, text: &str, tokens: &[u32], opts: &EvalOptions, graph: bool, progress: &mut dyn FnMut(&str)) -> Result<Vec<EvalRow>, Error> {
    let c = &model.cfg;
    let (p, n, nw) = (opts.prefix, opts.scored, opts.windows);
    if p == 0 || n == 0 || nw == 0 {
        return Err(Error::Config("prefix, scored tokens and windows must each be at least 1"));
    }
    if p + n > c.context {
        return Err(Error::Config("prefix + scored tokens exceed the model's trained context"));
    }
    if opts.prefill != Prefill::Select {
        return Err(Error::Config("the burn eval takes the prefix by selection (`--prefill select`); `kvsqueeze stream` streams a text through the caches"));
    }
    let need = p + n + 1;
    if tokens.len() < nw * need {
        return Err(Error::Config("the text is shorter than its windows"));
    }
    let stride = tokens.len() / nw;
    let win: Vec<&[u32]> = (0..nw).map(|w| &tokens[w * stride..][..need]).collect();
    let specs = eval_specs(opts)?;
    let ns = specs.len();
    let cache_specs: Vec<CacheSpec> = specs.iter().map(|(s, _)| s.clone()).collect();
    let Setup { mut groups, table, rope_rows, attn_rows, policies, .. } = setup(client, model, &cache_specs, nw, p + n, opts.dtype)?;
    let device = model.device();

    // The prefill: one dense pass over the windows' prefixes; each group takes it in its RoPE view.
    let t0 = Instant::now();
    let mut views: Vec<Vec<u32>> = Vec::new();
    let mut view_of = Vec::with_capacity(ns);
    for gi in 0..ns {
        let v = rope_rows[gi * nw..(gi + 1) * nw].to_vec();
        view_of.push(views.iter().position(|x| *x == v).unwrap_or_else(|| {
            views.push(v);
            views.len() - 1
        }));
    }
    let view_refs: Vec<&[u32]> = views.iter().map(Vec::as_slice).collect();
    let prompt: Vec<u32> = win.iter().flat_map(|w| w[..p].iter().copied()).collect();
    model.prefill(&prompt, &attn_rows[..nw], &view_refs, &table, opts.dtype, &mut |l, prompts| {
        for (gi, g) in groups.iter_mut().enumerate() {
            let (policy, cap) = policies[gi];
            admit_prompt(&mut g.layers[l], policy, cap, &prompts[view_of[gi]])?;
        }
        Ok(())
    })?;
    let b = ns * nw;
    // Token ids as `[n + 1, B]` (row i: the inputs of step i; row i + 1 its targets), positions from `p`.
    let mut ids = Vec::with_capacity((n + 1) * b);
    for i in 0..=n {
        for _ in 0..ns {
            ids.extend(win.iter().map(|w| w[p + i]));
        }
    }
    let ids = upload_ids(device, &ids, &[n + 1, b]);
    let at: Vec<u32> = rope_rows.iter().map(|&r| r + p as u32).collect();
    let mut pos = upload_ids(device, &at, &[b]);
    // A read-back waits for the prefill, so the decode timing starts from an idle queue.
    read_f32(Cb::float_zeros(Shape::from(vec![1]), device, FloatDType::F32))?;
    progress(&format!("{text}: prefix of {nw}×{p} tokens through the model into {ns} caches ({:.1} s)", t0.elapsed().as_secs_f64()));

    // Teacher-forced decode; per step `[B, 3]` (NLL, KL against Full, top-1 agreement) stays on the device.
    let mut stepper = Stepper::new(graph);
    let mut sums = vec![[0f64; 3]; b];
    let mut pending: Vec<BTensor> = Vec::with_capacity(READ_EVERY);
    let t1 = Instant::now();
    for i in 0..n {
        let logits = stepper.step(model, &row(&ids, i), &pos, &table, &mut groups, opts.dtype)?;
        pos = advance(&pos);
        let target = Cb::int_reshape(row(&ids, i + 1), Shape::from(vec![b, 1]));
        pending.push(scores(logits, &target, ns, nw));
        if pending.len() == READ_EVERY || i + 1 == n {
            let k = pending.len();
            let got = read_f32(Cb::float_cat(std::mem::take(&mut pending), 1))?; // [B, 3k]
            for (r, s) in sums.iter_mut().enumerate() {
                for j in 0..k {
                    for (m, acc) in s.iter_mut().enumerate() {
                        *acc += got[r * 3 * k + 3 * j + m] as f64;
                    }
                }
            }
            progress(&format!("{text}: scored {}/{n} steps of {b} rows ({:.1} steps/s)", i + 1, (i + 1) as f64 / t1.elapsed().as_secs_f64()));
        }
    }
    let count = (n * nw) as f64;
    let pooled = |gi: usize, m: usize| sums[gi * nw..(gi + 1) * nw].iter().map(|s| s[m]).sum::<f64>() / count;
    let full_bytes: usize = groups[0].layers.iter().map(CompressedKvCache::physical_bytes).sum();
    let full_ppl = pooled(0, 0).exp();
    Ok(specs
        .iter()
        .zip(&groups)
        .enumerate()
        .map(|(gi, ((spec, label), g))| {
            let bytes: usize = g.layers.iter().map(CompressedKvCache::physical_bytes).sum();
            let ppl = pooled(gi, 0).exp();
            EvalRow {
                text: text.to_string(),
                policy: spec.name.clone(),
                budget_label: label.clone(),
                budget: policies[gi].1,
                max_len: g.layers.iter().map(CompressedKvCache::len).max().unwrap_or(0),
                physical_bytes: bytes,
                bytes_ratio: bytes as f64 / full_bytes as f64,
                ppl,
                ppl_ratio: ppl / full_ppl,
                kl: pooled(gi, 1),
                top1: pooled(gi, 2),
                attn_err: Vec::new(),
                attn_err_mean: f64::NAN,
                cache_ms: f64::NAN,
            }
        })
        .collect())
}

/// Per row of `logits [ns·nw, V]` (cache-major: rows `0..nw` are Full's): NLL of `target [B, 1]`,
/// `KL(full ‖ row)` against Full's row of the same window, and 1 where its argmax is Full's — `[B, 3]`.
fn scores(logits: BTensor, target: &BTensor, ns: usize, nw: usize) -> BTensor {
    let b = ns * nw;
    let v = logits.meta.shape()[1];
    let lp = log_softmax(logits);
    let nll = Cb::float_neg(Cb::float_gather(1, lp.clone(), target.clone()));
    let full = Cb::float_slice(lp.clone(), &[Slice { start: 0, end: Some(nw as isize), step: 1 }, Slice { start: 0, end: None, step: 1 }]); // [nw, V]
    let tiled = |x: BTensor, last: usize| Cb::float_expand(Cb::float_reshape(x, Shape::from(vec![1, nw, last])), Shape::from(vec![ns, nw, last]));
    let full_all = tiled(full.clone(), v);
    let terms = Cb::float_mul(Cb::float_exp(full_all.clone()), Cb::float_sub(full_all, Cb::float_reshape(lp.clone(), Shape::from(vec![ns, nw, v]))));
    let kl = row_sum(Cb::float_reshape(terms, Shape::from(vec![b, v])));
    let top_full = Cb::int_expand(Cb::int_reshape(argmax(full), Shape::from(vec![1, nw])), Shape::from(vec![ns, nw]));
    let agree = Cb::bool_into_float(Cb::int_equal(Cb::int_reshape(argmax(lp), Shape::from(vec![ns, nw])), top_full, BoolStore::U32), FloatDType::F32);
    Cb::float_cat(vec![nll, kl, Cb::float_reshape(agree, Shape::from(vec![b, 1]))], 1)
}

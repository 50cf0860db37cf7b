//! Why FourierAttention loses SmolLM2 at equal bytes (issue 16's fidelity study): per column of K (after and
//! before RoPE) and V, how well the compressed middle reproduces the real series, in the f64 reference.
//!
//! One window of a development text goes through the model (dense attention, candle on the CPU); for every layer
//! and KV head the eval's FourierAttention layout is simulated on the captured series: `l_init` 4, local window
//! `c/4` (c = a quarter of the prefix), the middle formed from the prefix (stats frozen then) and then grown by
//! the decoded tokens to the window `T`, every column compressed with `N` frequencies. Per column it reports the
//! error of the paper's reconstruction (`1/N` inverse, frozen mean / max-deviation renormalisation) and of the
//! plain least-squares truncated Fourier series of the same `N` frequencies (`(1/T)(C₀ + 2Σ…)`, no
//! renormalisation), as `‖x̃ − x‖ / ‖x − mean x‖` over the middle (1 = no better than the column's mean), and the
//! renormalisation's scale `dev_u/dev_d`; grouped by RoPE band (the pair `2i, 2i+1` turns `base^{−2i/D}` radians
//! per token) and by layer.
//!
//! `cargo run --release --features eval --example fourier_study [-- PREFIX SCORED N]` (default 1024 64 94).

use candle_core::{Device, Tensor};
use kvsqueeze::eval::find_gguf;
use kvsqueeze::eval::model::{AttentionHook, AttentionInputs, DenseHook, Model};
use kvsqueeze::eval::tokenizer::Tokenizer;
use kvsqueeze_reference::fourier::{transform, Spectrum};

struct Capture {
    dense: DenseHook,
    k_pre: Vec<Tensor>,
}

impl AttentionHook for Capture {
    fn attend(&mut self, layer: usize, x: &AttentionInputs) -> candle_core::Result<Tensor> {
        self.k_pre.push(x.k_pre.clone());
        self.dense.attend(layer, x)
    }
}

/// `[H][S][D]` of a `(1, H, S, D)` tensor.
fn heads(t: &Tensor) -> Vec<Vec<Vec<f64>>> {
    let t = t.squeeze(0).unwrap().to_dtype(candle_core::DType::F64).unwrap();
    t.to_vec3::<f64>().unwrap()
}

/// Per column: (error of the paper's reconstruction, error of the least-squares series, renorm scale).
fn columns(x: &[Vec<f64>], formed: usize, n: usize, window: usize) -> Vec<(f64, f64, f64)> {
    let d = x[0].len();
    let cols: Vec<usize> = (0..d).collect();
    let first = transform(&x[..formed], cols.clone(), n, window);
    let all = transform(x, cols, n, window);
    let paper = Spectrum { coef: all.coef.clone(), ..first.clone() };
    let scale = first.scale();
    let mut out = Vec::with_capacity(d);
    let rows_paper: Vec<Vec<f64>> = (0..x.len()).map(|t| paper.reconstruct(t, n, window)).collect();
    let rows_raw: Vec<Vec<f64>> = (0..x.len()).map(|t| all.raw(t, n, window)).collect();
    for j in 0..d {
        let mean = x.iter().map(|r| r[j]).sum::<f64>() / x.len() as f64;
        let var: f64 = x.iter().map(|r| (r[j] - mean).powi(2)).sum();
        let c0 = all.coef[j];
        let (mut ep, mut el) = (0.0, 0.0);
        for (t, r) in x.iter().enumerate() {
            ep += (rows_paper[t][j] - r[j]).powi(2);
            // raw = (1/N)(C₀ + Σ_{n≥1} …)  ⇒  LS = (1/T)(C₀ + 2Σ_{n≥1} …) = (2N/T)·raw − C₀/T.
            let ls = 2.0 * n as f64 / window as f64 * rows_raw[t][j] - c0 / window as f64;
            el += (ls - r[j]).powi(2);
        }
        let den = var.max(1e-300);
        out.push(((ep / den).sqrt(), (el / den).sqrt(), scale[j]));
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("PREFIX SCORED N")).collect();
    let (prefix, scored, n) = (args.first().copied().unwrap_or(1024), args.get(1).copied().unwrap_or(64), args.get(2).copied().unwrap_or(94));
    let (model, content) = Model::load(&find_gguf(None)?)?;
    let tok = Tokenizer::from_gguf(&content)?;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/texts/prideprejudice.txt"))?;
    let ids = tok.encode(&text)?;
    let total = prefix + scored;
    let tokens = Tensor::from_vec(ids[..total].to_vec(), (1, total), &Device::Cpu)?;
    let mut cap = Capture { dense: DenseHook::default(), k_pre: Vec::new() };
    model.forward(&tokens, 0, &mut cap, total)?;
    let c = &model.cfg;
    let cbud = prefix / 4;
    let (l_init, l_local) = (4usize.min(cbud / 4), cbud / 4);
    let window = total - l_init - l_local;
    let formed = prefix - l_init - l_local;
    println!("prefix {prefix} + {scored} decoded, budget 1/4 = {cbud}: init {l_init}, local {l_local}, middle formed at {formed}, grown to T = {window}; N = {n}; RoPE base {}", c.rope_base);
    let half = c.head_dim / 2;
    // [kind][band] → per-column triples; [kind][layer] → triples.
    let kinds = ["K after RoPE", "K before RoPE", "V"];
    let mut by_band = vec![vec![Vec::new(); half]; 3];
    let mut by_layer = vec![vec![Vec::new(); c.layers]; 3];
    for l in 0..c.layers {
        let (k, v) = cap.dense.cache[l].clone().expect("every layer attended");
        let kp = cap.k_pre[l].contiguous()?;
        for (kind, t) in [heads(&k), heads(&kp), heads(&v)].iter().enumerate() {
            for h in t {
                let mid = &h[l_init..l_init + window];
                for (j, e) in columns(mid, formed, n, window).into_iter().enumerate() {
                    by_band[kind][j / 2].push(e);
                    by_layer[kind][l].push(e);
                }
            }
        }
    }
    let summary = |v: &[(f64, f64, f64)]| -> (f64, f64, f64, f64) {
        (median(v.iter().map(|e| e.0).collect()), median(v.iter().map(|e| e.1).collect()), median(v.iter().map(|e| e.2).collect()), v.iter().map(|e| e.2).fold(0.0, f64::max))
    };
    for (kind, name) in kinds.iter().enumerate() {
        println!("\n{name}, by RoPE band (pair 2i, 2i+1; period 2π/θ_i tokens): medians over layers × heads × the pair");
        println!("| i | period (tokens) | paper err | LS err | renorm scale | max scale |");
        println!("|---|---|---|---|---|---|");
        for (i, v) in by_band[kind].iter().enumerate() {
            let period = 2.0 * std::f64::consts::PI * c.rope_base.powf(2.0 * i as f64 / c.head_dim as f64);
            let (p, ls, s, smax) = summary(v);
            println!("| {i} | {period:.1} | {p:.3} | {ls:.3} | {s:.2} | {smax:.1} |");
        }
    }
    println!("\nby layer (medians over heads × columns): paper err / LS err / renorm scale");
    println!("| layer | K after RoPE | K before RoPE | V |");
    println!("|---|---|---|---|");
    for l in 0..c.layers {
        let cell = |kind: usize| {
            let (p, ls, s, _) = summary(&by_layer[kind][l]);
            format!("{p:.2} / {ls:.2} / {s:.1}")
        };
        println!("| {l} | {} | {} | {} |", cell(0), cell(1), cell(2));
    }
    Ok(())
}

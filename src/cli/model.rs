//! `kvsqueeze generate` and `kvsqueeze stream` (feature `eval`): the burn model on the device with every layer's
//! attention through our caches (`kvsqueeze::eval::burn_model`, `kvsqueeze::eval::stream`).

use kvsqueeze::eval::burn_model::BurnModel;
use kvsqueeze::eval::stream::{generate, stream, svg, table, to_json, CacheSpec, Sampling, StreamRun};
use kvsqueeze::eval::tokenizer::Tokenizer;
use kvsqueeze::DType;
use std::path::PathBuf;
use std::time::Instant;

/// What `generate` does.
pub struct GenerateOptions {
    pub gguf: Option<PathBuf>,
    pub caches: Vec<CacheSpec>,
    pub prompt: String,
    /// Feed the first `context` tokens of this text as the prompt instead of `prompt`.
    pub context: Option<(PathBuf, usize)>,
    pub tokens: usize,
    pub batch: usize,
    /// RoPE base = this × the model's, for every cache (LongLLaDA's λ).
    pub ntk_factor: Option<f64>,
    pub sampling: Sampling,
    pub dtype: DType,
    /// Replay whole steps (model and caches) from device graphs.
    pub graph: bool,
    /// How the prompt enters the caches.
    pub prefill: kvsqueeze::eval::Prefill,
}

/// What `stream` does.
pub struct StreamOptions {
    pub gguf: Option<PathBuf>,
    pub caches: Vec<CacheSpec>,
    pub texts: Vec<PathBuf>,
    pub tokens: usize,
    pub bucket: usize,
    pub dtype: DType,
    /// Replay whole steps (model and caches) from device graphs.
    pub graph: bool,
    /// Stop at the first read-back past this many seconds (the output says so and covers the tokens streamed).
    pub max_secs: Option<f64>,
    pub json: Option<PathBuf>,
    pub svg: Option<PathBuf>,
}

pub fn load(backend: &str, gguf: Option<&std::path::Path>) -> Result<(cubecl::client::Client, BurnModel, Tokenizer), String> {
    let path = kvsqueeze::eval::find_gguf(gguf).map_err(|e| e.to_string())?;
    let device = kvsqueeze::runtime::device_for(backend).map_err(|e| e.to_string())?;
    let client = device.client();
    eprintln!("device: {}", kvsqueeze::attention::device_name(&client));
    let t0 = Instant::now();
    let (model, content) = BurnModel::load(&path, &device).map_err(|e| e.to_string())?;
    let tok = Tokenizer::from_gguf(&content).map_err(|e| e.to_string())?;
    let c = &model.cfg;
    eprintln!(
        "model: {} ({} layers, {}/{} heads, D {}, trained context {}), on the device in {:.1} s",
        path.display(),
        c.layers,
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.context,
        t0.elapsed().as_secs_f64()
    );
    Ok((client, model, tok))
}

/// Greedy generation through each cache; prints sequence 0's text and the timing table.
pub fn run_generate(backend: &str, o: &GenerateOptions) -> Result<(), String> {
    let (client, model, tok) = load(backend, o.gguf.as_deref())?;
    let prompt = match &o.context {
        Some((path, n)) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let ids = tok.encode(&text).map_err(|e| e.to_string())?;
            if ids.len() < *n {
                return Err(format!("{}: {} tokens, fewer than --context {n}", path.display(), ids.len()));
            }
            ids[..*n].to_vec()
        }
        None => tok.encode(&o.prompt).map_err(|e| e.to_string())?,
    };
    println!("sampling: {:?}", o.sampling);
    println!("| cache | RoPE base | cache MB | prompt tokens | prompt s | generated (B × n) | first step s | timed steps | decode s | tokens/s | ms per step |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut texts = Vec::new();
    for spec in &o.caches {
        let mut spec = spec.clone();
        if let Some(f) = o.ntk_factor {
            spec.rope_base = Some(f * model.cfg.rope_base);
        }
        let spec = &spec;
        let g = generate(&client, &model, spec, &prompt, o.batch, o.tokens, o.sampling, o.dtype, o.graph, o.prefill).map_err(|e| format!("{}: {e}", spec.label()))?;
        println!(
            "| {} | {} | {:.1} | {} | {:.2} | {} × {} | {:.3} | {} | {:.3} | {:.1} | {:.2} |",
            spec.label(),
            g.rope_base,
            g.physical_bytes as f64 / 1e6,
            prompt.len(),
            g.prompt_secs,
            o.batch,
            o.tokens,
            g.first_step_secs,
            g.decode_steps,
            g.decode_secs,
            g.tokens_per_s(),
            g.ms_per_step()
        );
        texts.push((spec.label(), tok.decode(&g.tokens[0]).map_err(|e| e.to_string())?));
    }
    let tail = &prompt[prompt.len().saturating_sub(24)..];
    println!("\nprompt (last {} tokens): {:?}", tail.len(), tok.decode(tail).map_err(|e| e.to_string())?);
    for (label, text) in texts {
        println!("{label}: {text:?}");
    }
    Ok(())
}

/// The stream protocol over every cache; prints the table, writes JSON and the plot.
pub fn run_stream(backend: &str, o: &StreamOptions) -> Result<(), String> {
    // Output destinations are checked (and created exclusively) before the long run.
    let create = |p: &Option<PathBuf>| p.as_ref().map(|p| kvsqueeze::output::AtomicFile::create(p)).transpose().map_err(|e| e.to_string());
    let (json_out, svg_out) = (create(&o.json)?, create(&o.svg)?);
    let (client, model, tok) = load(backend, o.gguf.as_deref())?;
    let mut streams = Vec::new();
    for path in &o.texts {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let ids = tok.encode(&text).map_err(|e| e.to_string())?;
        if ids.len() < o.tokens + 1 {
            return Err(format!("{}: {} tokens, fewer than --tokens {} + 1 (pass a longer text, or several concatenated into one file)", path.display(), ids.len(), o.tokens));
        }
        streams.push(ids[..o.tokens + 1].to_vec());
    }
    let runs: Vec<StreamRun> = stream(&client, &model, &o.caches, &streams, o.dtype, o.graph, o.max_secs, &mut |line| eprintln!("{line}")).map_err(|e| e.to_string())?;
    let secs = runs.first().map_or(0.0, |r| r.secs);
    let streamed = runs.first().and_then(|r| r.nll.first()).map_or(0, Vec::len);
    let names: Vec<String> = o.texts.iter().map(|p| p.file_stem().map_or_else(|| p.display().to_string(), |s| s.to_string_lossy().into_owned())).collect();
    if streamed < o.tokens {
        println!("STOPPED EARLY: {streamed} of --tokens {} streamed before --max-secs; every number below covers those {streamed}", o.tokens);
    }
    println!(
        "stream: {} tokens of {} from their first token, every cache in one batch of {} sequences ({:.1} s, {:.1} steps/s), dtype {:?}, device {}, model trained to {}",
        streamed,
        names.join(" + "),
        runs.len() * streams.len(),
        secs,
        streamed as f64 / secs.max(1e-12),
        o.dtype,
        kvsqueeze::attention::device_name(&client),
        model.cfg.context
    );
    print!("{}", table(&runs, o.bucket));
    if let Some(f) = json_out {
        let doc = serde_json::json!({"settings": {"tokens": o.tokens, "streamed": streamed, "stopped_early": streamed < o.tokens, "texts": names, "dtype": format!("{:?}", o.dtype), "device": kvsqueeze::attention::device_name(&client), "trained_context": model.cfg.context}, "runs": to_json(&runs, o.bucket)});
        f.write_all_and_commit(serde_json::to_string_pretty(&doc).expect("json").as_bytes()).map_err(|e| e.to_string())?;
    }
    if let Some(f) = svg_out {
        f.write_all_and_commit(svg(&runs, o.bucket, model.cfg.context).as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

//! What the benches share: the PyTorch SDPA baseline of the same run (`benches/baselines/sdpa_decode.py` writes
//! `{"B8_L4096": {"cudnn": ms, "flash": ms, ...}, ...}`; benches/gpu-run.sh passes its path in
//! `KVSQUEEZE_SDPA_JSON`).

#![allow(dead_code)]

/// The fastest SDPA backend at batch `b`, length `l`: its name and seconds per call, if the run measured it.
pub fn sdpa_best(b: usize, l: usize) -> Option<(String, f64)> {
    let text = std::fs::read_to_string(std::env::var("KVSQUEEZE_SDPA_JSON").ok()?).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let entry = v.get(format!("B{b}_L{l}"))?.as_object()?;
    entry.iter().filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).filter(|(_, ms)| *ms > 0.0).min_by(|a, b| a.1.total_cmp(&b.1)).map(|(k, ms)| (k, ms * 1e-3))
}

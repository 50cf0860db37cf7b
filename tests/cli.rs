//! The command line as a new user meets it: `compare` (the main job) on a small stream with `--json`, `check`
//! on this device, and every error path of the CLI boundary — unknown policy, budget 0, budget ≥ context,
//! trace missing or malformed, backend not available, unknown flag — each one line on stderr, a non-zero exit,
//! no panic and no partial output file.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvsqueeze")).args(args).env("XDG_RUNTIME_DIR", std::env::temp_dir()).output().expect("the binary runs")
}

/// Exit code and stderr; asserts there was no panic and the error is one `error:` line.
fn fails(args: &[&str]) -> (i32, String) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one error line expected, got: {err}");
    (out.status.code().expect("exited"), lines[0].to_string())
}

#[test]
fn compare_runs_and_reports() {
    let out = run(&["compare", "--steps", "96", "--budgets", "16,32", "--policies", "full,streaming-llm,h2o,treekv,weightedkv,fourier", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 4 * 2 + 2, "full once, four policies and fourier at two budgets each");
    for r in rows {
        let name = r["policy"].as_str().unwrap();
        let rel = r["rel_l2"].as_f64().unwrap();
        assert!(rel.is_finite() && rel >= 0.0, "{name}: rel-L2 {rel}");
        if name == "full" {
            assert!(rel < 1e-5, "full must equal dense attention: {rel}");
            assert!(r["kl"].as_f64().unwrap() < 1e-12);
        } else if !name.starts_with("fourier") {
            assert!(r["ratio_to_full"].as_f64().unwrap() < 0.5, "{name} holds its budget");
            assert_eq!(r["jaccard_vs_reference"].as_f64(), Some(1.0), "{name}: the device keeps the reference's tokens");
            assert!(r["kl"].as_f64().unwrap() >= 0.0);
        }
    }
}

#[test]
fn check_passes_on_this_device() {
    let out = run(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().filter(|l| l.starts_with("PASS")).count() >= 10, "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn cli_errors_are_one_line_and_exit_non_zero() {
    assert_eq!(fails(&["compare", "--policies", "lru"]).0, 2);
    assert_eq!(fails(&["compare", "--budgets", "0"]).0, 2);
    let (code, line) = fails(&["compare", "--steps", "100", "--budgets", "100"]);
    assert!(code == 2 && line.contains("below --steps"), "{line}");
    assert_eq!(fails(&["compare", "--frobs", "1"]).0, 2);
    assert_eq!(fails(&["compare", "--steps", "x"]).0, 2);
    assert_eq!(fails(&["frobnicate"]).0, 2);
    assert_eq!(fails(&["replay", "--policy", "lru", "--budget", "8", "--trace", "x"]).0, 2);
    assert_eq!(fails(&["replay", "--policy", "h2o", "--budget", "0", "--trace", "x"]).0, 2);
    // Backends: one not compiled in (CI builds wgpu only) or unknown.
    if !cfg!(feature = "cuda") {
        let (code, line) = fails(&["check", "--backend", "cuda"]);
        assert!(code == 1 && line.contains("--features cuda"), "{line}");
    }
    // An unknown backend is a usage error (typed values).
    assert_eq!(fails(&["check", "--backend", "metal2"]).0, 2);
    assert_eq!(fails(&["devices", "--frob"]).0, 2);
    assert_eq!(fails(&["compare", "--dtype", "f64"]).0, 2);
    // The burn model's commands: bad caches and missing budgets are usage errors before any model is loaded.
    if cfg!(feature = "eval") {
        for args in [
            &["generate", "--policy", "lru"][..],
            &["generate", "--policy", "h2o"],
            &["generate", "--policy", "fourier", "--budget", "8"],
            &["generate", "--tokens", "0"],
            &["generate", "--rope-base", "1e6", "--ntk-factor", "4"],
            &["generate", "--temperature", "0"],
            &["generate", "--seed", "3"],
            &["stream", "--caches", "full,fourier"],
            &["stream", "--budgets", "0"],
            &["stream", "--tokens", "0"],
        ] {
            let (code, line) = fails(args);
            assert!(code == 2, "{args:?}: {code} {line}");
        }
    } else {
        let (code, line) = fails(&["generate"]);
        assert!(code == 1 && line.contains("--features eval"), "{line}");
    }
    // Help on every subcommand, long and short, on stdout with exit 0.
    for cmd in ["compare", "check", "bench", "replay", "eval", "generate", "stream", "devices", "demo"] {
        for flag in ["--help", "-h"] {
            let out = run(&[cmd, flag]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && text.contains("Usage: kvsqueeze"), "{cmd} {flag}: {text}");
        }
    }

    // Trace missing, and malformed: refused, and no output file is left behind.
    let dir = std::env::temp_dir().join(format!("kvsqueeze-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.safetensors");
    let missing = dir.join("missing.safetensors");
    let (code, line) = fails(&["replay", "--policy", "h2o", "--budget", "8", "--trace", missing.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(code == 1 && line.contains("cannot read"), "{line}");
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let (code, line) = fails(&["replay", "--policy", "h2o", "--budget", "8", "--trace", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(code == 1 && line.contains("replay refused"), "{line}");
    assert!(!out.exists() && !dir.join("out.safetensors.partial").exists(), "no partial output");
    std::fs::remove_dir_all(&dir).ok();
}

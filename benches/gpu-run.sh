#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there): the CUDA test binaries and the bench carried in carry/, and the
# PyTorch SDPA baseline at the same shapes; logs under $OUT, a short summary last.
# Build the binaries first on the Rust machine with benches/gpu-build.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda} KVSQUEEZE_DEVICE=cuda KVSQUEEZE_REQUIRE_ALL=1
BIN=/tmp/kvsqueeze-bin; mkdir -p "$BIN"
for f in carry/*${ONLY:-}*.xz; do n=$(basename "$f" .xz); xz -dc "$f" > "$BIN/$n" && chmod +x "$BIN/$n"; done
# ONLY=substring runs just the binaries whose name contains it.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
summary=()
for t in $([ "${SKIP_TESTS:-0}" = 1 ] || echo "$BIN"/test-*); do
  name=$(basename "$t")
  "$t" --test-threads=1 > "$OUT/$name.log" 2>&1; rc=$?
  summary+=("$name rc=$rc: $(grep -E '^test result' "$OUT/$name.log" | tail -1)")
done
if [ "${SKIP_SDPA:-0}" != 1 ] && ls "$BIN"/bench-attention >/dev/null 2>&1; then
  python3 benches/baselines/sdpa_decode.py "$OUT/sdpa.json" ${QUICK:+quick} > "$OUT/sdpa.log" 2>&1 || echo "sdpa failed" >> "$OUT/sdpa.log"
elif [ -f carry/sdpa-prev.json ]; then
  cp carry/sdpa-prev.json "$OUT/sdpa.json"; echo "SDPA: NOT measured in this run (earlier run's numbers)"
fi
for b in "$BIN"/bench-*; do
  name=$(basename "$b")
  KVSQUEEZE_SDPA_JSON="$OUT/sdpa.json" ${QUICK:+KVSQUEEZE_BENCH=quick} "$b" --bench > "$OUT/$name.log" 2>&1
  summary+=("$name rc=$?")
done
echo "=== summary ==="
for s in "${summary[@]}"; do echo "$s"; done
grep -h -E "^(device|gate|copy)" "$OUT"/bench-*.log
grep -h -E "^\|" "$OUT"/bench-*.log
grep -h -E "SKIP|panicked|FAILED" "$OUT"/test-*.log | head -20

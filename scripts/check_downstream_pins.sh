#!/usr/bin/env bash
# Resolves a fresh lockfile for a crate that depends on kvsqueeze (this checkout, by path) and checks that every
# cubecl crate stays at the version kvsqueeze pins (a downstream user would otherwise mix 0.11.x releases).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
want=$(sed -n 's/^cubecl = { version = "=\([0-9.]*\)".*/\1/p' "$root/Cargo.toml")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src"; echo 'fn main() {}' > "$tmp/src/main.rs"
printf '[package]\nname = "downstream"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\nkvsqueeze = { path = "%s" }\n' "$root" > "$tmp/Cargo.toml"
(cd "$tmp" && cargo generate-lockfile -q)
bad=$(awk '/^name = "cubecl/ {n=$3} /^version = / && n {print n, $3; n=""}' "$tmp/Cargo.lock" | grep -v "\"$want\"" | grep -v '"cubecl-hip-sys"' || true)
if [ -n "$bad" ]; then echo "downstream lockfile leaves the cubecl $want pin:"; echo "$bad"; exit 1; fi
echo "downstream lockfile: every cubecl crate at $want"

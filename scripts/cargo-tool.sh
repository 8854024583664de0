#!/usr/bin/env bash
# Prints the path of a cargo-installed tool, building it first (`cargo install --locked`, the
# versions its own Cargo.lock pins) when it is not cached in ~/.cache/sagamesh/tools/.
# Usage: scripts/cargo-tool.sh <crate> <version> [binary]    e.g. cargo-deny 0.18.3
set -euo pipefail
crate="$1" version="$2" bin="${3:-$1}"
root="${SAGAMESH_CACHE:-$HOME/.cache/sagamesh}/tools/$crate-$version"
exe="$root/bin/$bin"
if [[ ! -x "$exe" ]]; then
  mkdir -p "$root"
  # One build at a time.
  exec 9>"$root.lock"
  flock 9
fi
if [[ ! -x "$exe" ]]; then
  echo "[cargo-tool] building $crate $version (once; cached in $root)" >&2
  # A scratch target dir, removed afterwards: only the binary is kept.
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  CARGO_TARGET_DIR="$scratch" cargo install --quiet --locked --root "$root" "$crate" --version "$version" >&2
fi
echo "$exe"

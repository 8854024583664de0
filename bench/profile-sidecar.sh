#!/usr/bin/env bash
# Instruction counts of the sidecar's hot path, with callgrind (repeatable, unlike timings on a
# shared VM). Starts the 3 bench backends and the sidecar (profile `sidecar`, one thread) under
# valgrind, warms up, then counts MODE requests only:
#
#   bench/profile-sidecar.sh [h1|h2c|grpc] [REQUESTS]   (default: h1 20000)
#
# Prints instructions per request and the top functions (inclusive); the callgrind output file
# stays in the printed work directory for callgrind_annotate. Needs scripts/bench-proxy.sh to
# have built the binaries (or CARGO_TARGET_DIR/release/* present) and valgrind + h2load + curl.
# SIDECAR_BIN=path profiles another sidecar build (e.g. an older commit's, to compare).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODE="${1:-h1}"
N="${2:-20000}"
T="${CARGO_TARGET_DIR:-$ROOT/target/bench}/release"
# Where scripts/build-sidecar.sh puts the image's build (bench-proxy.sh runs it).
S="${CARGO_TARGET_DIR:-$ROOT/target/bench}/$(rustc -vV | sed -n 's/^host: //p')/sidecar"
WORK="$(mktemp -d /tmp/sagamesh-profile-XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT
for port in 18081 18082 18083; do
  "$T/sagamesh-bench-backend" "127.0.0.1:$port" &
  PIDS+=($!)
done
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
  "${SIDECAR_BIN:-$S/sagamesh-sidecar}" --manifests "$ROOT/bench/config/sidecar.yaml" \
  --outbound-addr 127.0.0.1:14140 --admin-addr 127.0.0.1:14191 --worker-threads 1 \
  >"$WORK/sidecar.log" 2>&1 &
SC=$!
PIDS+=($SC)
for _ in $(seq 300); do
  curl -sf -H 'Host: bench' http://127.0.0.1:14140/ >/dev/null 2>&1 && break
  sleep 0.2
done
args=(-c 32 -H ':authority: bench')
url=http://127.0.0.1:14140/
case "$MODE" in
  h1) args+=(--h1) ;;
  h2c) args=(-c 1 -m 32 -H ':authority: bench') ;;
  grpc)
    printf '\x00\x00\x00\x00\x02\x08\x01' >"$WORK/req.bin"
    args=(-c 1 -m 32 -H ':authority: bench' -d "$WORK/req.bin" -H 'content-type: application/grpc' -H 'te: trailers')
    url=http://127.0.0.1:14140/bench.v1.Bench/Call ;;
  *) echo "mode: h1, h2c or grpc" >&2; exit 2 ;;
esac
timeout 120 h2load "${args[@]}" -n 2000 "$url" >/dev/null
callgrind_control -i on "$SC" >/dev/null
timeout 300 h2load "${args[@]}" -n "$N" "$url" | grep -E "requests:|status codes"
callgrind_control -i off "$SC" >/dev/null
callgrind_control -d "$SC" >/dev/null
sleep 1
out="$WORK/callgrind.out.1"
callgrind_annotate "$out" >"$WORK/self.txt" 2>/dev/null
callgrind_annotate --inclusive=yes "$out" >"$WORK/inclusive.txt" 2>/dev/null
total="$(grep -m1 'PROGRAM TOTALS' "$WORK/self.txt" | awk '{gsub(",", "", $1); print $1}')"
echo "mode $MODE: $N requests, $total instructions, $(( total / N )) per request"
echo "top functions: $WORK/self.txt (self), $WORK/inclusive.txt (inclusive); data: $out"

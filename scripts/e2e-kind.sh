#!/usr/bin/env bash
# End-to-end on a kind cluster, for a machine with Docker (a laptop, a hosted CI runner):
#   1. create a kind cluster, build the operator, sidecar and example images, load them
#   2. helm install the chart, apply the shop example
#   3. check: traffic to `users` is balanced over its 3 pods; a killed pod is ejected with no
#      failed request; one saga Succeeded, the other Compensated in reverse order
#   4. tear down (unless KEEP_CLUSTER=1)
#
# Needs: docker, kind, kubectl, helm. It cannot run on the project's own CI machine (no Docker
# engine there); .github/workflows/e2e-kind.yml runs it on a hosted runner.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CLUSTER="${CLUSTER:-sagamesh-e2e}"
TAG="${TAG:-dev}"
NS_SYSTEM=sagamesh-system
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"

log() { printf '\n[e2e] %s\n' "$*"; }
fail() { printf '\n[e2e] FAILED: %s\n' "$*" >&2; dump; exit 1; }

dump() {
  kubectl get pods -A -o wide || true
  kubectl -n "$NS_SYSTEM" logs -l app.kubernetes.io/component=operator --tail=100 --all-containers || true
  kubectl -n shop get sreg,saga -o wide || true
}

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "[e2e] $tool is required" >&2; exit 1; }
done

cleanup() {
  if [[ "$KEEP_CLUSTER" != 1 ]]; then
    log "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" || true
  fi
}
trap cleanup EXIT

log "creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --wait 120s

log "building images (tag $TAG)"
for image in operator sidecar examples; do
  docker build -f "docker/$image.Dockerfile" -t "sagamesh/$image:$TAG" .
  kind load docker-image --name "$CLUSTER" "sagamesh/$image:$TAG"
done

log "installing the chart"
helm install sagamesh charts/sagamesh --namespace "$NS_SYSTEM" --create-namespace --wait --timeout 180s \
  --set operator.image.repository=sagamesh/operator --set operator.image.tag="$TAG" \
  --set operator.image.pullPolicy=Never \
  --set sidecar.image.repository=sagamesh/sidecar --set sidecar.image.tag="$TAG"

log "applying the shop example"
kubectl apply -f examples/shop/00-namespace.yaml
sed "s#sagamesh/examples:dev#sagamesh/examples:$TAG#" examples/shop/10-services.yaml | kubectl apply -f -
kubectl apply -f examples/shop/20-registrations.yaml -f examples/shop/30-client.yaml
kubectl -n shop rollout status deploy --timeout 180s
kubectl -n shop wait --for=condition=Ready pod/client --timeout 120s
# Every meshed pod has the native sidecar (an init container that keeps running).
sidecars=$(kubectl -n shop get pod client -o jsonpath='{.spec.initContainers[?(@.restartPolicy=="Always")].name}')
[[ -n "$sidecars" ]] || fail "the client pod has no native sidecar"
kubectl -n shop wait --for=jsonpath='{.status.readyEndpoints}'=3 sreg/users --timeout 60s \
  || fail "users did not reach 3 ready endpoints"

# calls N: N requests to users through the client's sidecar; prints one instance name per line,
# or FAIL:<status> for a failed request.
calls() {
  kubectl -n shop exec client -c client -- sh -c "
    for i in \$(seq 1 $1); do
      out=\$(curl -s -o /dev/null -w '%{http_code} %header{x-instance}' -H 'Host: users' http://127.0.0.1:4140/users/\$i)
      code=\${out%% *}
      if [ \"\$code\" = 200 ]; then echo \"\${out#* }\"; else echo \"FAIL:\$code\"; fi
    done"
}

log "checking that traffic is balanced"
shares=$(calls 300 | sort | uniq -c)
echo "$shares"
if grep -q FAIL <<<"$shares"; then fail "requests failed"; fi
[[ $(wc -l <<<"$shares") -eq 3 ]] || fail "expected 3 instances to answer"
while read -r count _; do
  (( count >= 70 && count <= 130 )) || fail "unbalanced share: $count of 300"
done <<<"$shares"

log "killing one users pod under traffic"
victim=$(kubectl -n shop get pod -l app=users -o jsonpath='{.items[0].metadata.name}')
calls 400 > /tmp/sagamesh-e2e-kill.txt &
load=$!
sleep 2
kubectl -n shop delete pod "$victim" --grace-period=0 --force
wait "$load"
if grep -q FAIL /tmp/sagamesh-e2e-kill.txt; then fail "requests failed while a pod was killed"; fi
after=$(tail -100 /tmp/sagamesh-e2e-kill.txt | sort | uniq -c)
echo "$after"
if grep -q "$victim" <<<"$after"; then fail "the killed pod $victim still got traffic"; fi

log "running the sagas"
kubectl apply -f examples/shop/40-sagas.yaml
kubectl -n shop wait --for=jsonpath='{.status.phase}'=Succeeded saga/order-1001 --timeout 120s \
  || fail "order-1001 did not succeed"
kubectl -n shop wait --for=jsonpath='{.status.phase}'=Compensated saga/order-1002 --timeout 120s \
  || fail "order-1002 was not compensated"
order=$(kubectl -n shop get saga order-1002 -o jsonpath='{range .status.history[*]}{.kind}:{.step} {end}')
echo "$order"
[[ "$order" == *"CompensationSucceeded:reserve-stock"*"CompensationSucceeded:create-order"* ]] \
  || fail "compensations did not run in reverse order: $order"
kubectl -n shop get saga

log "PASSED"

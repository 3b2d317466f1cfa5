#!/usr/bin/env bash
# The demo: etcd-guard in front of a real etcd on this machine, with development certificates made for you.
# Installs etcd if missing, builds etcd-guard, starts etcd (mutual TLS) and the proxy on loopback, shows allowed
# and denied requests from etcdctl, then stops everything. Keep it running with: scripts/demo.sh --keep
set -euo pipefail
cd "$(dirname "$0")/.."
keep=false
[ "${1:-}" = "--keep" ] && keep=true

bash scripts/install-deps.sh
cargo build -q -p etcd-guard
bin="${CARGO_TARGET_DIR:-$PWD/target}/debug/etcd-guard"

dir="$PWD/target/demo"
rm -rf "$dir"
mkdir -p "$dir"
echo "== development certificates in $dir"
"$bin" certs init --dir "$dir" --client admin --client kube-apiserver-etcd-client --client cilium --client prometheus:monitoring >/dev/null
ls "$dir"

cat > "$dir/policy.yaml" <<'POLICY'
roles:
  - name: kube-apiserver
    keys:
      - { prefix: "/registry/", access: readwrite }
      - { key: "compact_rev_key", access: readwrite }
    cluster: [status, lease, compact]
  - name: cilium
    keys:
      - { prefix: "cilium/", access: readwrite }
    cluster: [status, lease]
  - name: monitoring
    keys:
      - { prefix: "/registry/", access: read }
    deny:
      - { prefix: "/registry/secrets/" }
    cluster: [status]
  - name: admin
    keys:
      - { prefix: "", access: readwrite }
    cluster: [admin]
bindings:
  - role: kube-apiserver
    subjects: [ { common_name: "kube-apiserver-etcd-client" } ]
  - role: cilium
    subjects: [ { common_name: "cilium" } ]
  - role: monitoring
    subjects: [ { organization: "monitoring" } ]
  - role: admin
    subjects: [ { common_name: "admin" } ]
POLICY

etcd_port=${ETCD_PORT:-22379}
peer_port=${ETCD_PEER_PORT:-22380}
proxy_port=${PROXY_PORT:-23790}
cat > "$dir/etcd-guard.yaml" <<CONFIG
listen: "127.0.0.1:$proxy_port"
tls:
  cert_file: server.crt
  key_file: server.key
  client_ca_file: ca.crt
upstream:
  endpoints: ["https://127.0.0.1:$etcd_port"]
  ca_file: ca.crt
  cert_file: upstream-client.crt
  key_file: upstream-client.key
policy_file: policy.yaml
advertise_client_urls: ["https://127.0.0.1:$proxy_port"]
metrics_listen: "127.0.0.1:${METRICS_PORT:-23791}"
audit:
  file: audit/audit.log
CONFIG
rm -rf "$dir/audit"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== starting etcd on 127.0.0.1:$etcd_port (client certificates required)"
etcd --name demo --data-dir "$dir/etcd-data" \
    --listen-client-urls "https://127.0.0.1:$etcd_port" --advertise-client-urls "https://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "demo=http://127.0.0.1:$peer_port" \
    --cert-file "$dir/etcd-server.crt" --key-file "$dir/etcd-server.key" --trusted-ca-file "$dir/ca.crt" \
    --client-cert-auth --logger zap --log-level error >"$dir/etcd.log" 2>&1 &
pids+=($!)

echo "== starting etcd-guard on 127.0.0.1:$proxy_port"
"$bin" serve --config "$dir/etcd-guard.yaml" >"$dir/etcd-guard.log" 2>&1 &
pids+=($!)

ctl() {
    local who=$1; shift
    ETCDCTL_API=3 etcdctl --endpoints="https://127.0.0.1:$proxy_port" --cacert="$dir/ca.crt" \
        --cert="$dir/$who.crt" --key="$dir/$who.key" --dial-timeout=3s "$@"
}
healthy=false
for _ in $(seq 1 100); do
    if ctl admin endpoint health >/dev/null 2>&1; then healthy=true; break; fi
    sleep 0.2
done
if ! $healthy; then
    echo "etcd-guard did not answer within 20 s; the end of its log ($dir/etcd-guard.log) and etcd's:" >&2
    tail -n 20 "$dir/etcd-guard.log" "$dir/etcd.log" >&2 || true
    exit 1
fi

printf '\n$ etcd-guard config check --config etcd-guard.yaml --connect   # files, and etcd as the proxy reaches it\n'
"$bin" config check --config "$dir/etcd-guard.yaml" --connect

show() {
    local who=$1; shift
    printf '\n$ etcdctl (as %s) %s\n' "$who" "$*"
    ctl "$who" "$@" 2>&1 | grep -v '"level":"warn"' || true
}
echo; echo "# what the policy grants one identity, read from its certificate (deny rules applied)"
printf '$ etcd-guard policy grants --cert prometheus.crt\n'
"$bin" policy grants --policy "$dir/policy.yaml" --cert "$dir/prometheus.crt" || true
show kube-apiserver-etcd-client put /registry/secrets/default/db-password hunter2
show kube-apiserver-etcd-client get /registry/secrets/default/db-password --print-value-only
show cilium put cilium/state/nodes/v1/node-1 '{"name":"node-1"}'
show cilium get --prefix cilium/
echo; echo "# cilium may not read Kubernetes secrets: etcd's own answer, from the proxy"
show cilium get /registry/secrets/default/db-password
show cilium get --from-key cilium/
show prometheus endpoint status
show prometheus get /registry/secrets/default/db-password
echo; echo "# member list shows the proxy, never etcd's own address"
show admin member list
echo; echo "# the audit log: every request above, who made it, what was decided and why (values are never recorded)"
sleep 0.3
"$bin" audit review "$dir/audit" --output table | tail -n 12 || true
printf '\n$ etcd-guard audit review --summary\n'
"$bin" audit review "$dir/audit" --summary --output table || true
printf '\n$ etcd-guard audit verify\n'
"$bin" audit verify "$dir/audit" || true
if grep -rq hunter2 "$dir/audit"; then echo "BUG: a value reached the audit log"; exit 1; fi
echo "(the secret value 'hunter2' appears nowhere in the audit log)"
echo
if $keep; then
    echo "etcd-guard is running on https://127.0.0.1:$proxy_port (certificates in $dir). Ctrl-C stops it."
    wait
fi
echo "demo done; logs: $dir/etcd.log $dir/etcd-guard.log"

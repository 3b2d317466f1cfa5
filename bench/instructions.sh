#!/usr/bin/env bash
# Instructions the proxy executes per forwarded request, counted by valgrind's callgrind, for one or more
# etcd-guard builds. CPU time on a shared VM swings by 10-30 % between runs; instruction counts repeat within about
# 1 %, so they show small changes (a few % of the proxy's own work) that the benchmark's CPU figures cannot.
# They leave out the kernel (system calls, loopback TCP) and cache misses, so they complement the benchmark and do
# not replace it.
#
#   bench/instructions.sh [--workload lin-range|put|ser-range|watch|keep-alive|leased-put] [--rate N] [--seconds S]
#                         [--watchers N --put-rate R] [--policy-roles N] BIN [BIN ...]
#
# For each BIN: etcd (with the benchmark's data and certificates) and `BIN serve` under callgrind are started on
# loopback; a load generator sends N requests/s (one connection, default 150/s: the proxy runs about 50 times
# slower under callgrind) for S seconds (default 6) after a warm-up; the counters cover that window only, and the
# requests are counted in the audit file. Prints instructions per request, and writes callgrind's file beside
# it (`callgrind_annotate --inclusive=yes FILE` shows where they go). With `--workload watch` the requests counted
# are the puts (N watchers see each): divide by N for instructions per delivered event (e.g. --watchers 100
# --put-rate 10). With `--policy-roles N` the proxy runs the policy-scale case's generated policy of N roles and
# bindings (10 key rules each; the bench identity bound to one of them) instead of the small one, so a policy's
# size can be compared at the instruction level (lin-range, ser-range or put: the bench identity may read and
# write `/bench/` only there).
#
# Needs valgrind (Debian package `valgrind`), etcd, and the benchmark built in the same target folder:
#   cargo build --release -p etcd-guard -p etcd-guard-bench
# Under valgrind SHA-256 runs without the CPU's SHA instructions, so the audit chain's hashing costs about 30k
# instructions per request here that it does not cost natively; it is the same for every build.
set -euo pipefail

workload=lin-range
rate=150
seconds=6
watchers=100
put_rate=10
policy_roles=0
bins=()
while [ $# -gt 0 ]; do
    case "$1" in
        --workload) workload=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --watchers) watchers=$2; shift 2 ;;
        --put-rate) put_rate=$2; shift 2 ;;
        --policy-roles) policy_roles=$2; shift 2 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) bins+=("$(realpath "$1")"); shift ;;
    esac
done
[ ${#bins[@]} -gt 0 ] || { echo "usage: $0 [--workload W] [--rate N] [--seconds S] BIN [BIN ...]" >&2; exit 2; }
command -v valgrind > /dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
bench="$root/target/release/etcd-guard-bench"
[ -x "$bench" ] || { echo "$bench is missing: cargo build --release -p etcd-guard -p etcd-guard-bench" >&2; exit 1; }
etcd_bin=$(command -v etcd)

work=$(mktemp -d /tmp/etcd-guard-instructions.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    rm -rf "$work" "${kept:-}"
}
trap cleanup EXIT

# Certificates, etcd's preloaded data and the proxy's configuration, as the benchmark makes them (a short smoke run;
# with --policy-roles also the policy-scale case, which writes the large policy).
cases=(--only lin-range) policy=policy-small.yaml
if [ "$policy_roles" -gt 0 ]; then
    cases=(--only lin-range,policy-scale --policy-roles "$policy_roles") policy=policy-large.yaml
fi
"$bench" --etcd-bin "$etcd_bin" "${cases[@]}" --shapes 1x64 --runs 1 --duration 0.5 --warmup 0.2 --rate off --keep-dir --out "$work/smoke.json" > "$work/smoke.log" 2>&1
kept=$(sed -n 's/^working folder kept: //p' "$work/smoke.log")
[ -d "$kept" ] || { cat "$work/smoke.log" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

for bin in "${bins[@]}"; do
    run="$work/run"
    rm -rf "$run"
    mkdir -p "$run"
    cp "$kept"/*.crt "$kept"/*.key "$kept/$policy" "$run"/
    cp -r "$kept/etcd-data" "$run/"
    client_port=$(free_port); peer_port=$(free_port); listen_port=$(free_port)
    "$etcd_bin" --name bench --data-dir "$run/etcd-data" \
        --listen-client-urls "https://127.0.0.1:$client_port" --advertise-client-urls "https://127.0.0.1:$client_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "bench=http://127.0.0.1:$peer_port" \
        --cert-file "$run/etcd-server.crt" --key-file "$run/etcd-server.key" --trusted-ca-file "$run/ca.crt" \
        --client-cert-auth --logger zap --log-level error > "$run/etcd.log" 2>&1 &
    etcd_pid=$!; pids+=("$etcd_pid")
    cat > "$run/proxy.yaml" <<EOF
listen: "127.0.0.1:$listen_port"
tls: { cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt }
upstream:
  endpoints: ["https://127.0.0.1:$client_port"]
  ca_file: ca.crt
  cert_file: upstream-client.crt
  key_file: upstream-client.key
policy_file: $policy
audit: { file: audit.log, max_files: 2 }
EOF
    sleep 2
    # exec: the background job's pid is valgrind's, which callgrind_control addresses.
    (cd "$run" && exec valgrind --tool=callgrind --callgrind-out-file="$run/callgrind.out" --separate-threads=no \
        "$bin" serve --config "$run/proxy.yaml" > "$run/proxy.log" 2>&1) &
    proxy_pid=$!; pids+=("$proxy_pid")
    for _ in $(seq 1 120); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $listen_port), 1)" 2> /dev/null && break
        sleep 0.5
    done
    # The leased-put workload runs as the scoped identity (see BENCHMARKS.md).
    identity=bench; [ "$workload" = leased-put ] && identity=bench-scoped
    "$bench" load --endpoint "https://127.0.0.1:$listen_port" --ca "$run/ca.crt" --cert "$run/$identity.crt" \
        --key "$run/$identity.key" --workload "$workload" --connections 1 --in-flight 64 --rate "$rate" \
        --watchers "$watchers" --put-rate "$put_rate" --warmup-ms 500 --duration-ms $(((seconds + 4) * 1000)) > "$run/load.log" 2>&1 &
    load_pid=$!; pids+=("$load_pid")
    sleep 2.5
    records() { cat "$run"/audit.log* 2> /dev/null | wc -l; }
    callgrind_control -z "$proxy_pid" > /dev/null 2>&1
    before=$(records)
    sleep "$seconds"
    callgrind_control -d "$proxy_pid" > /dev/null 2>&1
    after=$(records)
    wait "$load_pid" || true
    kill "$proxy_pid" "$etcd_pid" 2> /dev/null || true
    wait "$proxy_pid" "$etcd_pid" 2> /dev/null || true
    dump=$(ls -t "$run"/callgrind.out.* 2> /dev/null | head -1)
    total=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
    requests=$((after - before))
    suffix=""; if [ "$policy_roles" -gt 0 ]; then suffix="-$policy_roles-roles"; fi
    out="$root/target/instructions-$(basename "$bin")-$workload$suffix.callgrind"
    cp "$dump" "$out"
    label=$workload; if [ "$policy_roles" -gt 0 ]; then label="$workload, $policy_roles roles"; fi
    echo "$bin $label: $requests requests, $((total / (requests > 0 ? requests : 1))) instructions per request ($out)"
done

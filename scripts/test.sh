#!/usr/bin/env bash
# The test command: installs what is missing, then format check, lints and every test (unit, property and
# integration tests against a real etcd started on loopback), then the integration tests (`--test '*'`: the
# tests crate's and the benchmark's smoke test) once more against etcd 3.5 (Debian bookworm's etcd-server is 3.4;
# Kubernetes runs 3.5), and once more against 3.4 with every proxy sharing identical watches (`watch.coalesce`,
# the test matrix of tests/src/lib.rs). The same package selection as the first run, so nothing is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
etcd35=$(bash scripts/fetch-etcd-3.5.sh)
# Read whole, not piped into `head` (a SIGPIPE would fail the script under pipefail).
etcd35_version=$("$etcd35/etcd" --version)
echo "integration tests against ${etcd35_version%%$'\n'*}"
ETCD_GUARD_TEST_ETCD_DIR="$etcd35" cargo test --workspace --locked --test '*'
echo "integration tests with shared watches (ETCD_GUARD_TEST_WATCH_COALESCE=1)"
# The benchmark's smoke test writes its proxies' configurations itself (the matrix does not reach them): skipped.
ETCD_GUARD_TEST_WATCH_COALESCE=1 cargo test --workspace --locked --test '*' -- --skip every_workload_runs_through_both_paths

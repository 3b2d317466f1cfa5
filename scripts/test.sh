#!/usr/bin/env bash
# The test command: installs what is missing, then format check, lints and every test (unit, property and
# integration tests against a real etcd started on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

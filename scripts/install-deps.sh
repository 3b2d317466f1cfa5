#!/usr/bin/env bash
# Install what etcd-guard's demo and tests need on a Debian machine, if it is missing:
# etcd and etcdctl (Debian's etcd-server and etcd-client), protoc with its well-known types (for the etcd-client
# crate used in tests), and gcc and make (jemalloc's crate builds it from C).
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/descriptor.proto, …) are only a recommendation of protobuf-compiler,
# which --no-install-recommends skips; the etcd-client crate's build needs them.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
# jemalloc, the binary's allocator, is built from C by its crate: a C compiler and make.
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || need+=(make)
if ((${#need[@]})); then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "installing: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's package may start a system etcd; the demo and tests start their own on other ports and do not use it.
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is required: Rust installed by rustup (https://rustup.rs)" >&2
    exit 1
fi
# The workspace's rust-version (Cargo.toml), against the rustc cargo uses.
want=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' "$(dirname "$0")/../Cargo.toml" | head -n 1)
have=$(rustc --version 2>/dev/null | awk '{print $2}')
if [ -n "$want" ] && [ "$(printf '%s\n%s\n' "$want" "${have:-0}" | sort -V | head -n 1)" != "$want" ]; then
    echo "Rust $want or newer is required; this is ${have:-unknown} (rustup update)" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        rustup component add "$component" >/dev/null 2>&1 || true
    fi
done
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "cargo fmt and cargo clippy are required: rustup component add rustfmt clippy" >&2
    exit 1
fi

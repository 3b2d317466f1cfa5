#!/usr/bin/env bash
# Fetch etcd 3.5 (what Kubernetes runs today) for the integration tests' second etcd version, and print the folder
# that holds its `etcd` and `etcdctl`. Debian bookworm's etcd-server is 3.4; Debian trixie's 3.5 package links only
# libc, so its .deb is downloaded with a private sources list (nothing is installed or changed system-wide) and
# unpacked into target/etcd-3.5. A second run reuses it.
#
#   ETCD_GUARD_TEST_ETCD_DIR="$(bash scripts/fetch-etcd-3.5.sh)" cargo test --workspace --test '*'
set -euo pipefail
cd "$(dirname "$0")/.."

# The first line of `etcd --version` ("etcd Version: 3.5.16"), read whole: piped into `head -1` or `grep -q`, etcd
# can be killed by SIGPIPE while it still writes its other lines, which `pipefail` turns into a failure (exit 141).
first_line() {
    local all
    all=$("$1" --version 2> /dev/null) || return 0
    printf '%s\n' "${all%%$'\n'*}"
}

dest="$PWD/target/etcd-3.5"
bin="$dest/root/usr/bin"
if [ -x "$bin/etcd" ] && [ -x "$bin/etcdctl" ] && [[ "$(first_line "$bin/etcd")" == "etcd Version: 3.5."* ]]; then
    echo "$bin"
    exit 0
fi
rm -rf "$dest"
mkdir -p "$dest/sources" "$dest/lists/partial" "$dest/cache/archives/partial" "$dest/debs"
cat > "$dest/sources/trixie.sources" << 'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
apt_options=(
    -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$dest/sources"
    -o "Dir::State::Lists=$dest/lists" -o "Dir::Cache=$dest/cache" -o "Dir::State::Status=/dev/null"
    -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1"
)
apt-get "${apt_options[@]}" -qq update >&2
(cd "$dest/debs" && apt-get "${apt_options[@]}" -qq download etcd-server etcd-client >&2)
for deb in "$dest"/debs/*.deb; do
    dpkg-deb -x "$deb" "$dest/root"
done
rm -rf "$dest/lists" "$dest/cache" "$dest/debs"
version=$(first_line "$bin/etcd")
case "$version" in
    "etcd Version: 3.5."*) echo "fetched $version" >&2 ;;
    *) echo "expected etcd 3.5, got: $version" >&2; exit 1 ;;
esac
echo "$bin"

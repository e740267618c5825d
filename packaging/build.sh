#!/bin/sh
# Builds the release binary once, then the .deb (cargo-deb) and the .rpm (cargo-generate-rpm)
# from that same binary, and runs lintian on the .deb when it is installed.
# Usage: packaging/build.sh [--no-build]   (--no-build reuses target/release/nbd-s3)
set -eu

cd "$(dirname "$0")/.."

need() {
    if ! cargo "$1" --version >/dev/null 2>&1; then
        echo "installing $2 from crates.io" >&2
        cargo install --locked "$2"
    fi
}
need deb cargo-deb
need generate-rpm cargo-generate-rpm

if [ "${1:-}" != "--no-build" ]; then
    cargo build --release --locked --bin nbd-s3
fi
# Symbols and line tables stay out of the package (the release profile keeps line tables
# for local profiling; a packaged binary is stripped as Debian policy asks).
strip --strip-all -o target/release/nbd-s3.stripped target/release/nbd-s3
mv target/release/nbd-s3.stripped target/release/nbd-s3

cargo deb --no-build --no-strip --output target/debian/
deb=$(ls -t target/debian/nbd-s3_*.deb | head -n 1)
cargo generate-rpm
rpm=$(ls -t target/generate-rpm/nbd-s3-*.rpm | head -n 1)
echo "deb: $deb"
echo "rpm: $rpm"

if command -v lintian >/dev/null 2>&1; then
    lintian --fail-on error "$deb"
fi
if command -v rpm >/dev/null 2>&1; then
    rpm -qlp "$rpm"
fi

# The unit as installed, pointed at the binary just built (verify checks that it exists).
if command -v systemd-analyze >/dev/null 2>&1; then
    unit_dir=$(mktemp -d)
    sed "s#/usr/bin/nbd-s3#$(pwd)/target/release/nbd-s3#g" systemd/nbd-s3.service \
        > "$unit_dir/nbd-s3.service"
    systemd-analyze verify "$unit_dir/nbd-s3.service"
    systemd-analyze security --offline=true "$unit_dir/nbd-s3.service" | tail -n 1
    rm -rf "$unit_dir"
fi

#!/bin/sh
# Builds the release binary once, then the .deb (cargo-deb) and the .rpm (cargo-generate-rpm)
# from the same binary, and runs lintian on the .deb when available.
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
strip --strip-debug -o target/release/nbd-s3.stripped target/release/nbd-s3 2>/dev/null \
    && mv target/release/nbd-s3.stripped target/release/nbd-s3 || true

deb=$(cargo deb --no-build --no-strip 2>/dev/null | tail -n 1)
echo "deb: $deb"
cargo generate-rpm
rpm=$(ls -t target/generate-rpm/*.rpm | head -n 1)
echo "rpm: $rpm"

if command -v lintian >/dev/null 2>&1; then
    lintian --fail-on error "$deb"
fi

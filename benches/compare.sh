#!/usr/bin/env bash
# nbd-s3 next to its peers — nbdkit memory, the nbdkit S3 plugin and s3backer — on one local
# S3 server with the same fio workloads: builds the release binary, installs the peers
# (scripts/deps.sh --bench) and runs the shared benchmark ../shared/bench/peers.sh.
#   benches/compare.sh [PEER...]     PEER: memory | nbdkit-s3 | s3backer | nbd-s3 (default all)
# Knobs (passed through): SIZE (1G), IO (512M), RT (15), PORT, S3PORT; NO_BUILD=1 skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS_SH:-../shared/bench/peers.sh}
[ -f "$PEERS" ] || { echo "compare.sh: $PEERS not found (set PEERS_SH)" >&2; exit 1; }
scripts/deps.sh --bench >&2
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
[ -n "${NO_BUILD:-}" ] || cargo build --release --locked --bin nbd-s3 >&2
echo "peer       workload            bandwidth       IOPS   (SIZE=${SIZE:-1G} IO=${IO:-512M} RT=${RT:-15}s)"
NBDS3=$PWD/target/release/nbd-s3 exec bash "$PEERS" "$@"

#!/bin/bash
# Soak test (issue 7), not part of CI's default run: DURATION seconds (default 600) of fio
# verify on 3 exports x 4 connections through the fault-injecting S3 proxy, the config
# reloaded every RELOAD seconds (default 30). Prints RSS samples, fault counters and any fio
# verify error; exits non-zero on a verify error or RSS growth.
#
#   scripts/soak.sh                  # 10 minutes
#   DURATION=120 RELOAD=15 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECONDS="${DURATION:-600}"
export SOAK_RELOAD_SECONDS="${RELOAD:-30}"
echo "soak: ${SOAK_SECONDS}s, reload every ${SOAK_RELOAD_SECONDS}s"
exec cargo test --test it -- faults::soak --exact --ignored --nocapture

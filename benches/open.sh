#!/usr/bin/env bash
# Huge exports open fast: the time a fresh daemon takes from start to serving an export that
# holds N block objects, the LIST requests it makes for that, and its memory.
#   benches/open.sh [STORE...]     STORE: garage | s3s-fs   (default: both)
# Knobs: COUNTS ("0 10000 200000": block objects per run; 0 is the daemon's start alone), S3FS_MAX (200000: larger counts are
#        skipped on s3s-fs, which rescans its directory for every LIST page), LAYOUT
#        ("front spread": where the objects lie in the export, see below), SIZE (the export,
#        64G), RUNS (opens measured per row, 3: the best is shown), NO_BUILD=1 uses the
#        existing release build, GARAGE (the garage binary: `cargo install garage@2.5.0
#        --locked`).
# The bucket is filled through NBD by nbd-s3 itself (4 KiB blocks, nbdkit's pattern plugin
# as the source, so every block is data), so the objects are exactly what the daemon stores.
# LAYOUT front: the objects are the first N blocks of the export (a disk image filled from
# its start); spread: N blocks evenly spaced over the whole export.
# Every server listens on 127.0.0.1 only; everything lives in one temp directory, removed at
# the end. Garage ignores conditional writes: its exports run with `lease = "off"`.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release --locked --bin nbd-s3 >&2
fi
NBDS3=${NBDS3:-$PWD/target/release/nbd-s3}
S3FS=${S3FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
GARAGE=${GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
COUNTS=${COUNTS:-0 10000 200000}
S3FS_MAX=${S3FS_MAX:-200000}
LAYOUT=${LAYOUT:-front spread}
SIZE=${SIZE:-64G}
RUNS=${RUNS:-3}
BS=4096
KEY=GK0123456789abcdef01234567 # Garage's form: GK + 24 hex digits
SECRET=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
W=$(mktemp -d "${TMPDIR:-/var/tmp}/openbench.XXXX")
SERVERPID= NBDPID=
cleanup() {
  for p in $NBDPID $SERVERPID; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
printf '%s' "$SECRET" >"$W/secret"; chmod 600 "$W/secret"

# --- object stores: start_STORE sets ENDPOINT and SERVERPID; bucket_STORE NAME makes one ---
start_s3s-fs() {
  mkdir -p "$W/s3s"
  local port; port=$(free_port)
  "$S3FS" --host 127.0.0.1 --port "$port" --access-key $KEY --secret-key $SECRET "$W/s3s" \
    >"$W/s3s-fs.log" 2>&1 &
  SERVERPID=$! ENDPOINT="http://127.0.0.1:$port"
  for _ in $(seq 100); do curl -s -o /dev/null "$ENDPOINT" && return 0; sleep 0.1; done
  echo "s3s-fs did not start:" >&2; cat "$W/s3s-fs.log" >&2; exit 1
}
bucket_s3s-fs() { mkdir -p "$W/s3s/$1"; }

start_garage() {
  if [ ! -x "$GARAGE" ]; then
    echo "no garage binary: cargo install garage@2.5.0 --locked (or set GARAGE)" >&2; exit 1
  fi
  local s3 rpc; s3=$(free_port); rpc=$(free_port)
  mkdir -p "$W/garage"
  cat >"$W/garage/garage.toml" <<T
metadata_dir = "$W/garage/meta"
data_dir = "$W/garage/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
T
  "$GARAGE" -c "$W/garage/garage.toml" server >"$W/garage.log" 2>&1 &
  SERVERPID=$! ENDPOINT="http://127.0.0.1:$s3"
  local id=
  for _ in $(seq 100); do
    id=$(g node id -q 2>/dev/null | cut -d@ -f1) && [ -n "$id" ] && break
    sleep 0.2
  done
  [ -n "$id" ] || { echo "garage did not start:" >&2; cat "$W/garage.log" >&2; exit 1; }
  g layout assign -z dc1 -c 10G "$id" >/dev/null
  g layout apply --version 1 >/dev/null
  g key import --yes -n bench "$KEY" "$SECRET" >/dev/null
}
g() { "$GARAGE" -c "$W/garage/garage.toml" "$@"; }
bucket_garage() {
  g bucket create "$1" >/dev/null
  g bucket allow --read --write --owner --key bench "$1" >/dev/null
}

# --- the daemon -------------------------------------------------------------------------
config() { # FILE PORT METRICS-PORT BUCKET
  bench_config "$2" "$3" "$ENDPOINT" "$4" 'block_size = "4KiB"
lease = "off"' >"$1"
}
serve() { # BUCKET LOG: starts a daemon, sets NBDPID, URI, METRICS
  local port mport; port=$(free_port); mport=$(free_port)
  config "$W/nbd-s3.toml" "$port" "$mport" "$1"
  "$NBDS3" serve --config "$W/nbd-s3.toml" >"$2" 2>&1 &
  NBDPID=$! URI="nbd://127.0.0.1:$port/bench" METRICS="http://127.0.0.1:$mport/metrics"
}
stop() { # SIGTERM: the daemon stores everything dirty, then exits 0
  kill "$NBDPID" 2>/dev/null || true
  wait "$NBDPID" || { echo "nbd-s3 did not stop cleanly; see $W" >&2; exit 1; }
  NBDPID=
}

fill() { # BUCKET N LAYOUT
  local n=$2 blocks; blocks=$(( $(numfmt --from=iec "$SIZE") / BS ))
  serve "$1" "$W/fill.log"
  wait_nbd "$URI" "$NBDPID" "$W/fill.log"
  if [ "$n" = 0 ]; then
    : # the export's manifest only
  elif [ "$3" = front ]; then
    # No FLUSH here: 200,000 PUTs take longer than a FLUSH may wait (flush_timeout); the
    # daemon's SIGTERM in `stop` stores everything before it exits.
    nbdcopy -- [ nbdkit --exit-with-parent pattern size=$((n * BS)) ] "$URI"
  else
    # One block every blocks/n: an nbdsh loop of 4 KiB writes, pipelined.
    PATH=/usr/bin:$PATH nbdsh -u "$URI" -c "
import nbd
step = $blocks // $n
buf = nbd.Buffer.from_bytearray(bytearray(b'\x5a' * $BS))
for i in range($n):
    while h.aio_in_flight() >= 64:
        h.poll(-1)
    h.aio_pwrite(buf, i * step * $BS)
while h.aio_in_flight() > 0:
    h.poll(-1)
"
  fi
  stop
}

# Seconds from the daemon's start to the first successful nbdinfo (polled every 10 ms), the
# LIST requests it made, its RSS once serving and its peak RSS, in KiB.
measure() { # BUCKET
  serve "$1" "$W/open.log"
  local t0 t1; t0=$(date +%s.%N)
  for _ in $(seq 30000); do
    nbdinfo --size "$URI" >/dev/null 2>&1 && break
    kill -0 "$NBDPID" 2>/dev/null || { cat "$W/open.log" >&2; exit 1; }
    sleep 0.01
  done
  t1=$(date +%s.%N)
  local lists rss hwm
  lists=$(curl -s "$METRICS" | awk '/^nbd_s3_backend_requests_total\{/ && /op="list"/ {s += $NF} END {print s + 0}')
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$NBDPID/status")
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$NBDPID/status")
  stop
  echo "$(echo "$t1 - $t0" | bc) $lists $rss $hwm"
}

printf '%-8s %8s %-7s %9s %6s %9s %9s\n' store objects layout "open s" LISTs "RSS MiB" "peak MiB"
for store in ${@:-garage s3s-fs}; do
  "start_$store"
  for n in $COUNTS; do
    if [ "$store" = s3s-fs ] && [ "$n" -gt "$S3FS_MAX" ]; then continue; fi
    layouts=$LAYOUT; [ "$n" = 0 ] && layouts=empty
    for layout in $layouts; do
      bucket="open-$n-$layout"
      "bucket_$store" "$bucket"
      t=$(date +%s); fill "$bucket" "$n" "$layout"
      echo "($store: $n objects, $layout, stored in $(( $(date +%s) - t )) s)" >&2
      best=
      for _ in $(seq "$RUNS"); do
        m=$(measure "$bucket")
        if [ -z "$best" ] || [ "$(echo "${m%% *} < ${best%% *}" | bc)" = 1 ]; then best=$m; fi
      done
      read -r secs lists rss hwm <<<"$best"
      printf '%-8s %8d %-7s %9.2f %6d %9.1f %9.1f\n' "$store" "$n" "$layout" "$secs" "$lists" \
        "$(echo "$rss / 1024" | bc -l)" "$(echo "$hwm / 1024" | bc -l)"
    done
  done
  kill "$SERVERPID" 2>/dev/null || true; wait "$SERVERPID" 2>/dev/null || true; SERVERPID=
done

#!/usr/bin/env bash
# Latency hidden by concurrency: the same fio workloads against nbd-s3 and nbdkit's S3 plugin,
# with the local S3 server (s3s-fs on tmpfs) answering at once and then through the test fault
# proxy in latency mode (every response LAT ms after its request, as a distant region).
#   benches/latency.sh [VARIANT...]    VARIANT: nbd-s3 | nbd-s3-local | nbdkit-s3
#                                      (default nbd-s3 nbdkit-s3)
# Knobs: LATENCIES ("0 20", ms), SIZE (export, 1G), IO (bytes per sequential job, 256M),
#        RT (seconds per time-based job, 15); NO_BUILD=1 uses the existing release build;
#        JOURNAL (directory for nbd-s3-local's journal: a real disk, not tmpfs, or its
#        fsync costs nothing; default /var/tmp/latbench-journal.PID, removed at the end).
# Prints one row per variant, latency and workload, then each figure at the highest latency
# as a ratio of the 0 ms figure, and the issue's targets.
#
# A configuration row is one function `variant_NAME PORT ENDPOINT DIR` that starts a server
# on 127.0.0.1:PORT against ENDPOINT (S3 access key benchkey/benchsecret, a bucket of its
# own named after the variant, created by the script) in the background, sets PEERPID and
# EXPORT, and logs to DIR/NAME.log; then name it on the command line or in VARIANTS.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
scripts/deps.sh --bench >&2
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release --locked --bin nbd-s3 --example latency_proxy >&2
fi
NBDS3=${NBDS3:-$PWD/target/release/nbd-s3}
PROXY=${PROXY:-$PWD/target/release/examples/latency_proxy}
S3FS=${S3FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
LATENCIES=${LATENCIES:-0 20}
SIZE=${SIZE:-1G}; IO=${IO:-256M}; RT=${RT:-15}
KEY=benchkey SECRET=benchsecret
BASE=${TMPDIR:-/tmp}; [ -d /dev/shm ] && BASE=/dev/shm
W=$(mktemp -d "$BASE/latbench.XXXX")
JOURNAL=${JOURNAL:-/var/tmp/latbench-journal.$$}
PEERPID= PROXYPID= EXPORT=
cleanup() {
  for p in $PEERPID $PROXYPID $S3PID; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W" "$JOURNAL"
}
trap cleanup EXIT
mkdir -p "$W/s3"
printf '%s' "$SECRET" >"$W/secret"; chmod 600 "$W/secret"
S3PORT=$(free_port)
"$S3FS" --host 127.0.0.1 --port "$S3PORT" --access-key $KEY --secret-key $SECRET "$W/s3" \
  >"$W/s3.log" 2>&1 &
S3PID=$!

# --- configuration rows ------------------------------------------------------------------
variant_nbd-s3() { # PORT ENDPOINT DIR [EXTRA-EXPORT-LINES]
  cat >"$3/nbd-s3.toml" <<T
[server]
listen = "127.0.0.1:$1"
control = "off"
[s3]
endpoint = "$2"
region = "us-east-1"
path_style = true
access_key_id = "$KEY"
secret_access_key_file = "$W/secret"
[[export]]
name = "bench"
size = "$SIZE"
bucket = "$VARIANT"
prefix = "disk/"
${4:-}
T
  "$NBDS3" serve --config "$3/nbd-s3.toml" >>"$3/$VARIANT.log" 2>&1 &
  PEERPID=$! EXPORT=bench
}
variant_nbd-s3-local() { # PORT ENDPOINT DIR: FLUSH and FUA = fsynced in the local journal
  rm -rf "$JOURNAL"
  variant_nbd-s3 "$1" "$2" "$3" "durability = \"local\"
[cache]
journal = \"$JOURNAL\""
}
variant_nbdkit-s3() { # PORT ENDPOINT DIR
  # The plugin advertises min block = object size, above nbdkit's 64K cap: relax it.
  nbdkit -f -p "$1" --exit-with-parent --filter=blocksize-policy S3 \
    blocksize-minimum=512 blocksize-preferred=128k blocksize-maximum=32M \
    endpoint-url="$2" access-key=$KEY secret-key=$SECRET \
    bucket="$VARIANT" key=disk size="$SIZE" object-size=128k >>"$3/$VARIANT.log" 2>&1 &
  PEERPID=$! EXPORT=
}
# -------------------------------------------------------------------------------------------

start() { # VARIANT ENDPOINT
  PORT=$(free_port)
  "variant_$1" "$PORT" "$2" "$W"
  wait_nbd "nbd://127.0.0.1:$PORT/$EXPORT" "$PEERPID" "$W/$1.log"
}
stop() {
  kill "$PEERPID" 2>/dev/null || true; wait "$PEERPID" 2>/dev/null || true; PEERPID=
}
fio_run() { # VARIANT LAT NAME RW BS FIO-ARGS...
  local variant=$1 lat=$2 name=$3 rw=$4 bs=$5; shift 5
  # fio's nbd engine never exits if the server dies: bounded, output to a file.
  if ! timeout --kill-after=10 $((RT * 4 + 240)) fio --name="$name" --ioengine=nbd \
      --uri="nbd://127.0.0.1:$PORT/$EXPORT" --rw="$rw" --bs="$bs" "$@" \
      --output-format=json --output="$W/fio.json" >"$W/fio.out" 2>&1; then
    printf '%s\t%s\t%s\tfailed\n' "$variant" "$lat" "$name" >>"$W/results.tsv"
    printf '%-10s %4s ms  %-14s fio failed\n' "$variant" "$lat" "$name" >&2
    return 0
  fi
  python3 - "$W/fio.json" "$variant" "$lat" "$name" >>"$W/results.tsv" <<'P'
import json, sys
job = json.load(open(sys.argv[1]))['jobs'][0]
io = max(job['read'], job['write'], key=lambda d: d['io_bytes'])
sync = job.get('sync', {}).get('lat_ns', {}).get('mean', 0) or 0
lat_ms = (io['lat_ns']['mean'] + sync) / 1e6
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{sys.argv[4]}\t{io['bw_bytes']/2**20:.1f}\t{io['iops']:.0f}\t{lat_ms:.2f}")
P
  tail -n 1 "$W/results.tsv" | awk -F'\t' '{printf "%-10s %4s ms  %-14s %8s MiB/s %8s IOPS %8s ms\n",$1,$2,$3,$4,$5,$6}' >&2
}

: >"$W/results.tsv"
for lat in $LATENCIES; do
  PROXY_OUT="$W/proxy-$lat.out"
  "$PROXY" "$S3PORT" "$lat" >"$PROXY_OUT" 2>&1 &
  PROXYPID=$!
  for _ in $(seq 100); do grep -q '^port ' "$PROXY_OUT" && break; sleep 0.1; done
  ENDPOINT="http://127.0.0.1:$(awk '/^port /{print $2}' "$PROXY_OUT")"
  for VARIANT in ${@:-${VARIANTS:-nbd-s3 nbdkit-s3}}; do
    # Each latency starts from an empty bucket: the runs do not read each other's data.
    rm -rf "${W:?}/s3/$VARIANT"; mkdir -p "$W/s3/$VARIANT"
    start "$VARIANT" "$ENDPOINT"
    fio_run "$VARIANT" "$lat" seqwrite write 1M --size="$IO" --iodepth=8 --end_fsync=1
    stop; start "$VARIANT" "$ENDPOINT"   # cold: a new process, empty caches
    fio_run "$VARIANT" "$lat" seqread-cold read 1M --size="$IO" --iodepth=8
    fio_run "$VARIANT" "$lat" randwrite4k randwrite 4k --size="$IO" --iodepth=32 \
      --time_based --runtime="$RT" --end_fsync=1
    stop; start "$VARIANT" "$ENDPOINT"
    fio_run "$VARIANT" "$lat" randread4k-cold randread 4k --size="$IO" --iodepth=32 \
      --time_based --runtime="$RT"
    fio_run "$VARIANT" "$lat" write4k-flush randwrite 4k --size="$IO" --iodepth=1 --fsync=1 \
      --time_based --runtime="$RT"
    stop
  done
  kill "$PROXYPID" 2>/dev/null || true; wait "$PROXYPID" 2>/dev/null || true; PROXYPID=
done

python3 - "$W/results.tsv" <<'P'
import sys
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1]) if l.strip()]
print(f"{'variant':10s} {'lat':>5s}  {'workload':14s} {'MiB/s':>9s} {'IOPS':>9s} {'mean ms':>9s}")
res = {}
for r in rows:
    if len(r) < 6:
        print(f"{r[0]:10s} {r[1]:>3s}ms  {r[2]:14s} failed")
        continue
    v, lat, w, bw, iops, ms = r[0], int(r[1]), r[2], float(r[3]), float(r[4]), float(r[5])
    res[(v, lat, w)] = (bw, iops, ms)
    print(f"{v:10s} {lat:>3d}ms  {w:14s} {bw:9.1f} {iops:9.0f} {ms:9.2f}")
lats = sorted({k[1] for k in res})
if len(lats) < 2 or lats[0] != 0:
    sys.exit(0)
hi = lats[-1]
print(f"\nratios at {hi} ms (of the 0 ms figure) and targets:")
target = {
    'seqwrite': lambda bw, iops, ms, z: (bw / z[0], ">= 0.80 of 0 ms"),
    'seqread-cold': lambda bw, iops, ms, z: (bw / z[0], ">= 0.80 of 0 ms"),
    'randwrite4k': lambda bw, iops, ms, z: (iops / z[1], "(no target)"),
    'randread4k-cold': lambda bw, iops, ms, z: (iops / (32 / (hi / 1000)),
                                               f">= 0.90 of the bound {32 / (hi / 1000):.0f} IOPS"),
    'write4k-flush': lambda bw, iops, ms, z: (ms / hi, "<= 1.10 of one round trip"),
}
for v in sorted({k[0] for k in res}):
    for w, f in target.items():
        z, h = res.get((v, 0, w)), res.get((v, hi, w))
        if not z or not h:
            continue
        ratio, want = f(*h, z)
        base = f"{h[0] / z[0]:.2f} of 0 ms MiB/s" if w != 'write4k-flush' else f"{h[2]:.1f} ms per write+flush"
        print(f"{v:10s} {w:14s} {ratio:6.2f}  {want:34s} ({base})")
P

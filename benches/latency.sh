#!/usr/bin/env bash
# Latency hidden by concurrency: the same fio workloads against nbd-s3 and nbdkit's S3 plugin,
# with the local S3 server (s3s-fs on tmpfs) answering at once and then through the test fault
# proxy in latency mode (every response LAT ms after its request, as a distant region).
#   benches/latency.sh [VARIANT...]    VARIANT: nbd-s3 | nbd-s3-local | nbdkit-s3
#                                      (default nbd-s3 nbdkit-s3)
# Knobs: LATENCIES ("0 20", ms), SIZE (export, 4G), IO (bytes per sequential job, 256M),
#        RT (seconds per time-based job, 15); NO_BUILD=1 uses the existing release build;
#        JOURNAL (directory for nbd-s3-local's journal: a real disk, not tmpfs, or its
#        fsync costs nothing; default /var/tmp/latbench-journal.PID, removed at the end).
# Prints one row per variant, latency and workload, then each figure at the highest latency
# as a ratio of the 0 ms figure, and the issue's targets.
#
# What each row measures:
# - The proxy counts the requests it forwards, so every row says how many GETs per read
#   and PUTs per write reached the object store during the run. The cold random read's
#   target is judged on GETs per second: reads the cache answered are not S3 round trips
#   (the 128 MiB area is small enough that a 10 s run meets many blocks twice).
# - `raw-put` is one 128 KiB PUT through the proxy by a few lines of Python (SigV4 by hand,
#   one kept-alive connection; mean of RAWPUTS, 20):
#   the round trip the 4k write+flush target is measured against, proxy and s3s-fs included.
# - The cold random read runs over the export past 2 IO, filled beforehand with copies (hard
#   links in the S3 server's directory, no upload) of the blocks written sequentially, so
#   most of its reads meet a block the run has not fetched yet (at the default 4 GiB, ~30k
#   blocks against ~16k reads). nbdkit's plugin GETs every block it reads, present or not.
# - write4k-flush writes into an area nothing was written to before (`--offset=IO`): a 4k
#   write into a block that exists in S3 but not in the cache needs a GET of that block
#   first, a second round trip no write-back design avoids; a fresh area (or a cached one)
#   measures the FLUSH itself. nbd-s3 rows add its own view from /metrics: the mean PUT
#   as its S3 client timed it and the mean FLUSH as the store timed it.
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
SIZE=${SIZE:-4G}; IO=${IO:-256M}; RT=${RT:-15}
SIZE_B=$(numfmt --from=iec "$SIZE"); IO_B=$(numfmt --from=iec "$IO")
# The export: [0, IO) written sequentially, [IO, 2 IO) fresh for write4k-flush, the rest
# filled for the cold random read.
[ "$SIZE_B" -ge $((4 * IO_B)) ] || { echo "SIZE must be at least 4 x IO" >&2; exit 2; }
RAWPUTS=${RAWPUTS:-20}
BLOCK=131072   # the object size of both servers' rows
KEY=benchkey SECRET=benchsecret
BASE=${TMPDIR:-/tmp}; [ -d /dev/shm ] && BASE=/dev/shm
W=$(mktemp -d "$BASE/latbench.XXXX")
JOURNAL=${JOURNAL:-/var/tmp/latbench-journal.$$}
PEERPID= PROXYPID= EXPORT= METRICS= COUNTS=
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
  local mport; mport=$(free_port)
  bench_config "$1" "$mport" "$2" "$VARIANT" "${4:-}" >"$3/nbd-s3.toml"
  "$NBDS3" serve --config "$3/nbd-s3.toml" >>"$3/$VARIANT.log" 2>&1 &
  PEERPID=$! EXPORT=bench METRICS="http://127.0.0.1:$mport/metrics"
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
  PEERPID=$! EXPORT= METRICS=
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
counts() { # OUT: the proxy's request counts, as rewritten after this call
  touch "$W/stamp"
  for _ in $(seq 200); do [ "$COUNTS" -nt "$W/stamp" ] && break; sleep 0.01; done
  cp "$COUNTS" "$1"
}
scrape() { # OUT: nbd-s3's /metrics (empty for a server without)
  : >"$1"
  [ -z "$METRICS" ] || curl -sf --max-time 10 "$METRICS" >"$1" || true
}
fio_run() { # VARIANT LAT NAME RW BS FIO-ARGS...
  local variant=$1 lat=$2 name=$3 rw=$4 bs=$5; shift 5
  counts "$W/counts.before"; scrape "$W/metrics.before"
  # fio's nbd engine never exits if the server dies: bounded, output to a file.
  if ! timeout --kill-after=10 $((RT * 4 + 240)) fio --name="$name" --ioengine=nbd \
      --uri="nbd://127.0.0.1:$PORT/$EXPORT" --rw="$rw" --bs="$bs" "$@" \
      --output-format=json --output="$W/fio.json" >"$W/fio.out" 2>&1; then
    printf '%s\t%s\t%s\tfailed\n' "$variant" "$lat" "$name" >>"$W/results.tsv"
    printf '%-10s %4s ms  %-14s fio failed\n' "$variant" "$lat" "$name" >&2
    return 0
  fi
  counts "$W/counts.after"; scrape "$W/metrics.after"
  python3 - "$W" "$variant" "$lat" "$name" >>"$W/results.tsv" <<'P'
import json, re, sys
w = sys.argv[1]
job = json.load(open(f"{w}/fio.json"))['jobs'][0]
io = max(job['read'], job['write'], key=lambda d: d['io_bytes'])
sync = job.get('sync', {}).get('lat_ns', {}).get('mean', 0) or 0
lat_ms = (io['lat_ns']['mean'] + sync) / 1e6
secs = max(job['job_runtime'], 1) / 1000
def counts(path):
    return {k: int(v) for k, v in (l.split() for l in open(path) if l.strip())}
a, b = counts(f"{w}/counts.before"), counts(f"{w}/counts.after")
gets, puts = b['GET'] - a['GET'], b['PUT'] - a['PUT']
reads, writes = job['read']['total_ios'], job['write']['total_ios']
def mean_ms(before, after, name, labels):
    """Mean of a histogram's samples between two scrapes, in ms (nan: none)."""
    def total(text, suffix):
        t = 0.0
        for l in text.splitlines():
            m = re.match(rf'{name}_{suffix}\{{(.*)\}} (\S+)$', l)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                t += float(m.group(2))
        return t
    n = total(after, 'count') - total(before, 'count')
    return (total(after, 'sum') - total(before, 'sum')) / n * 1e3 if n > 0 else float('nan')
ma, mb = open(f"{w}/metrics.before").read(), open(f"{w}/metrics.after").read()
put_ms = mean_ms(ma, mb, 'nbd_s3_backend_request_duration_seconds', {'op': 'put'})
flush_ms = mean_ms(ma, mb, 'nbd_s3_export_flush_duration_seconds', {})
print('\t'.join([sys.argv[2], sys.argv[3], sys.argv[4], f"{io['bw_bytes']/2**20:.1f}",
                 f"{io['iops']:.0f}", f"{lat_ms:.2f}",
                 f"{gets / reads:.2f}" if reads else "-", f"{gets / secs:.0f}",
                 f"{puts / writes:.2f}" if writes else "-", f"{put_ms:.2f}", f"{flush_ms:.2f}"]))
P
  tail -n 1 "$W/results.tsv" | awk -F'\t' '{printf "%-10s %4s ms  %-14s %8s MiB/s %8s IOPS %8s ms  GET/read %s (%s/s)  PUT/write %s  PUT %s ms  FLUSH %s ms\n",$1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11}' >&2
}
fill() { # VARIANT: links every block of [2 IO, SIZE) to one of the blocks written sequentially
  case $1 in nbd-s3*) ;; *) return 0 ;; esac   # nbd-s3's object layout only
  python3 - "$W/s3/$1/disk" $((2 * IO_B / BLOCK)) $((SIZE_B / BLOCK)) <<'P'
import os, sys
d, first, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
have = sorted(n for n in os.listdir(d) if len(n) == 16) if os.path.isdir(d) else []
for b in range(first, end):
    if have:
        os.link(os.path.join(d, have[b % len(have)]), os.path.join(d, f"{b:016x}"))
P
}
raw_put() { # LAT: one 128 KiB PUT through the proxy without nbd-s3, mean of RAWPUTS
  mkdir -p "$W/s3/rawput"
  local ms
  ms=$(timeout 120 python3 - 127.0.0.1 "${ENDPOINT##*:}" rawput $KEY $SECRET $((RAWPUTS + 1)) <<'P'
import datetime, hashlib, hmac, http.client, os, sys, time
# One 128 KiB PUT after another on one kept-alive connection, each signed (SigV4) and timed.
host, port, bucket, key, secret, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
body = os.urandom(131072)
payload = hashlib.sha256(body).hexdigest()
def sign(k, m):
    return hmac.new(k, m.encode(), hashlib.sha256).digest()
conn = http.client.HTTPConnection(host, port, timeout=10)
times = []
for i in range(n):
    now = datetime.datetime.now(datetime.timezone.utc)
    amz, day = now.strftime('%Y%m%dT%H%M%SZ'), now.strftime('%Y%m%d')
    path = f"/{bucket}/rawput-{i}"
    hosthdr = f"{host}:{port}"
    canon = f"PUT\n{path}\n\nhost:{hosthdr}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload}"
    scope = f"{day}/us-east-1/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz}\n{scope}\n{hashlib.sha256(canon.encode()).hexdigest()}"
    k = sign(sign(sign(sign(('AWS4' + secret).encode(), day), 'us-east-1'), 's3'), 'aws4_request')
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers = {'Host': hosthdr, 'x-amz-date': amz, 'x-amz-content-sha256': payload,
               'Authorization': f"AWS4-HMAC-SHA256 Credential={key}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}",
               'Content-Length': str(len(body))}
    t = time.perf_counter()
    conn.request('PUT', path, body=body, headers=headers)
    r = conn.getresponse()
    r.read()
    elapsed = time.perf_counter() - t
    if r.status != 200:
        sys.exit(f"raw PUT failed: HTTP {r.status}")
    if i > 0:  # the first one also opens the connection
        times.append(elapsed)
print(f"{sum(times) / len(times) * 1000:.2f}")
P
  )
  printf 'raw-put\t%s\tput128k\t-\t-\t%s\n' "$1" "$ms" >>"$W/results.tsv"
  printf 'raw-put    %4s ms  one 128 KiB PUT round trip (python, kept-alive connection): %s ms\n' "$1" "$ms" >&2
}

: >"$W/results.tsv"
for lat in $LATENCIES; do
  PROXY_OUT="$W/proxy-$lat.out"
  COUNTS="$W/counts-$lat"
  "$PROXY" "$S3PORT" "$lat" "$COUNTS" >"$PROXY_OUT" 2>&1 &
  PROXYPID=$!
  for _ in $(seq 100); do grep -q '^port ' "$PROXY_OUT" && break; sleep 0.1; done
  ENDPOINT="http://127.0.0.1:$(awk '/^port /{print $2}' "$PROXY_OUT")"
  raw_put "$lat"
  for VARIANT in ${@:-${VARIANTS:-nbd-s3 nbdkit-s3}}; do
    # Each latency starts from an empty bucket: the runs do not read each other's data.
    rm -rf "${W:?}/s3/$VARIANT"; mkdir -p "$W/s3/$VARIANT"
    start "$VARIANT" "$ENDPOINT"
    fio_run "$VARIANT" "$lat" seqwrite write 1M --size="$IO" --iodepth=8 --end_fsync=1
    stop; fill "$VARIANT"; start "$VARIANT" "$ENDPOINT"   # cold: a new process, empty caches
    fio_run "$VARIANT" "$lat" seqread-cold read 1M --size="$IO" --iodepth=8
    fio_run "$VARIANT" "$lat" randwrite4k randwrite 4k --size="$IO" --iodepth=32 \
      --time_based --runtime="$RT" --end_fsync=1
    stop; start "$VARIANT" "$ENDPOINT"
    fio_run "$VARIANT" "$lat" randread4k-cold randread 4k --offset=$((2 * IO_B)) \
      --size=$((SIZE_B - 2 * IO_B)) --iodepth=32 --time_based --runtime="$RT"
    # Into the area after the one written above: fresh blocks, no read-modify-write GETs.
    fio_run "$VARIANT" "$lat" write4k-flush randwrite 4k --offset="$IO" --size="$IO" \
      --iodepth=1 --fsync=1 --time_based --runtime="$RT"
    stop
  done
  kill "$PROXYPID" 2>/dev/null || true; wait "$PROXYPID" 2>/dev/null || true; PROXYPID=
done

python3 - "$W/results.tsv" <<'P'
import sys
rows = [l.rstrip('\n').split('\t') for l in open(sys.argv[1]) if l.strip()]
print(f"{'variant':10s} {'lat':>5s}  {'workload':15s} {'MiB/s':>8s} {'IOPS':>8s} {'mean ms':>8s}"
      f" {'GET/rd':>7s} {'GET/s':>6s} {'PUT/wr':>7s} {'PUT ms':>7s} {'FLUSH ms':>8s}")
res, rawput = {}, {}
for r in rows:
    if r[0] == 'raw-put':
        rawput[int(r[1])] = float(r[5])
        print(f"{'raw-put':10s} {int(r[1]):>3d}ms  {'128k PUT':15s} {'':8s} {'':8s} {float(r[5]):8.2f}")
        continue
    if len(r) < 11:
        print(f"{r[0]:10s} {r[1]:>3s}ms  {r[2]:15s} failed")
        continue
    v, lat, w = r[0], int(r[1]), r[2]
    bw, iops, ms, get_s = float(r[3]), float(r[4]), float(r[5]), float(r[7])
    res[(v, lat, w)] = (bw, iops, ms, get_s)
    extra = ' '.join(f"{x:>7s}" if x != 'nan' else f"{'-':>7s}" for x in r[9:11])
    print(f"{v:10s} {lat:>3d}ms  {w:15s} {bw:8.1f} {iops:8.0f} {ms:8.2f} {r[6]:>7s} {r[7]:>6s}"
          f" {r[8]:>7s} {extra}")
lats = sorted({k[1] for k in res})
if len(lats) < 2 or lats[0] != 0:
    sys.exit(0)
hi = lats[-1]
bound = 32 / (hi / 1000)
rt = rawput.get(hi, float(hi))
print(f"\nratios at {hi} ms and targets (round trip = one 128 KiB PUT through the proxy,"
      f" {rt:.2f} ms without nbd-s3):")
target = {
    'seqwrite': lambda bw, iops, ms, gs, z: (bw / z[0], ">= 0.80 of 0 ms", f"{bw:.1f} vs {z[0]:.1f} MiB/s"),
    'seqread-cold': lambda bw, iops, ms, gs, z: (bw / z[0], ">= 0.80 of 0 ms", f"{bw:.1f} vs {z[0]:.1f} MiB/s"),
    'randwrite4k': lambda bw, iops, ms, gs, z: (iops / z[1], "(no target)", f"{iops:.0f} vs {z[1]:.0f} IOPS"),
    'randread4k-cold': lambda bw, iops, ms, gs, z: (gs / bound, f">= 0.90 of {bound:.0f} GETs/s",
                                                   f"{gs:.0f} GETs/s, {iops:.0f} IOPS"),
    'write4k-flush': lambda bw, iops, ms, gs, z: (ms / rt, "<= 1.10 round trips",
                                                 f"{ms:.2f} ms per write+flush"),
}
for v in sorted({k[0] for k in res}):
    for w, f in target.items():
        z, h = res.get((v, 0, w)), res.get((v, hi, w))
        if not z or not h:
            continue
        ratio, want, what = f(*h, z)
        print(f"{v:10s} {w:15s} {ratio:6.2f}  {want:26s} ({what})")
P

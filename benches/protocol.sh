#!/usr/bin/env bash
# Protocol overhead: nbd-s3 with a warm cache next to `nbdkit memory`, the same fio workloads
# (libnbd engine) against each, one server at a time, in one run. Issue 3's target: nbd-s3
# reaches >= 70% of nbdkit's IOPS and bandwidth.
#   benches/protocol.sh            (from anywhere; builds target/release/nbd-s3 first)
# Knobs: WS (working set, 256M), RT (seconds per random job, 10), NBDS3 (binary),
#        STORE: the stores to run nbd-s3 on, "s3 file memory" by default (s3 = s3s-fs on
#        tmpfs, file = file:// store on tmpfs, memory = examples/memory_server: the same server
#        and cache over an in-process memory object store, i.e. protocol + cache overhead alone).
# The working set is written once before the measured reads, so nbd-s3 serves every read
# from its cache; the cache (1GiB) holds the whole working set. After each write phase an
# untimed FLUSH (both peers) lets write-back finish before the next phase is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
WS=${WS:-256M}; RT=${RT:-10}; STORE=${STORE:-s3 file memory}
SIZE=1G
NBDS3=${NBDS3:-$PWD/target/release/nbd-s3}
MEMSRV=${MEMSRV:-$PWD/target/release/examples/memory_server}
[ -n "${NO_BUILD:-}" ] || cargo build --release --locked --bin nbd-s3 --example memory_server >&2
S3FS=${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
BASE=${TMPDIR:-/tmp}; [ -d /dev/shm ] && BASE=/dev/shm
W=$(mktemp -d "$BASE/protobench.XXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done   # nbd-s3 flushes on SIGTERM
  rm -rf "$W"
}
trap cleanup EXIT

# shellcheck source=benches/common.sh
. benches/common.sh

fio_json() { # NAME URI FIO-ARGS... -> prints "MiB/s IOPS"
  local name=$1 uri=$2; shift 2
  fio --name="$name" --ioengine=nbd --uri="$uri" "$@" --output-format=json \
    --output="$W/$name.json" >/dev/null 2>"$W/$name.err" || { echo "fio failed"; cat "$W/$name.err" >&2; return 0; }
  python3 - "$W/$name.json" <<'P'
import json, sys
job = json.load(open(sys.argv[1]))['jobs'][0]
io = max(job['read'], job['write'], key=lambda d: d['io_bytes'])
print(f"{io['bw_bytes']/2**20:.1f} {io['iops']:.0f}")
P
}

# The workloads, in order; the first (sequential write) also warms the working set.
WORKLOADS=(seqwrite1M seqread1M randread4k randwrite4k)
run_workloads() { # PEER URI
  local peer=$1 uri=$2 w
  for w in "${WORKLOADS[@]}"; do
    case $w in
      seqwrite1M) r=$(fio_json "$peer-$w" "$uri" --rw=write --bs=1M --iodepth=8 --size="$WS") ;;
      seqread1M) r=$(fio_json "$peer-$w" "$uri" --rw=read --bs=1M --iodepth=8 --size="$WS") ;;
      randread4k) r=$(fio_json "$peer-$w" "$uri" --rw=randread --bs=4k --iodepth=32 --size="$WS" \
                      --time_based --runtime="$RT") ;;
      randwrite4k) r=$(fio_json "$peer-$w" "$uri" --rw=randwrite --bs=4k --iodepth=32 --size="$WS" \
                       --time_based --runtime="$RT") ;;
    esac
    echo "$peer $w $r" >>"$W/results"
    # Untimed, for both peers alike: a write phase's data is stored (for nbd-s3: written back
    # to the store) before the next phase starts, so no phase pays for the one before it.
    case $w in *write*) PATH=/usr/bin:$PATH nbdsh -u "$uri" -c 'h.flush()' ;; esac
  done
}

# --- nbdkit memory (the reference) ---
port=$(free_port)
nbdkit -f --exit-with-parent -p "$port" -i 127.0.0.1 memory "$SIZE" >"$W/nbdkit.log" 2>&1 &
PIDS+=($!); wait_nbd "nbd://127.0.0.1:$port/" $! "$W/nbdkit.log"
run_workloads nbdkit-memory "nbd://127.0.0.1:$port/"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# --- nbd-s3, cache holding the working set, once per store ---
# s3: s3s-fs on the same machine, so its CPU (MD5 of every PUT body, HTTP) competes with the
#     client and the server for the cores during write phases: protocol + store cost.
# file: the file:// store on tmpfs, a cheaper real store: closer to protocol overhead alone.
start_nbds3() { # STORE -> sets URI; the server's pid is the last of PIDS
  local store=$1 d="$W/$1" s3conf port
  mkdir -p "$d/s3/nbd"
  if [ "$store" = memory ]; then
    port=$(free_port)
    "$MEMSRV" "$port" $((1 << 30)) >"$d/nbd-s3.log" 2>&1 &
    PIDS+=($!); URI="nbd://127.0.0.1:$port/bench"
    wait_nbd "$URI" $! "$d/nbd-s3.log"
    return
  fi
  if [ "$store" = s3 ]; then
    local s3port; s3port=$(free_port)
    "$S3FS" --host 127.0.0.1 --port "$s3port" --access-key bench --secret-key benchsecret \
      "$d/s3" >"$d/s3.log" 2>&1 &
    PIDS+=($!)
    printf 'benchsecret' >"$d/secret"; chmod 600 "$d/secret"
    s3conf="endpoint = \"http://127.0.0.1:$s3port\"
region = \"us-east-1\"
path_style = true
access_key_id = \"bench\"
secret_access_key_file = \"$d/secret\""
    for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$s3port") 2>/dev/null && break; sleep 0.1; done
  else
    s3conf="endpoint = \"file://$d/s3\""
  fi
  port=$(free_port)
  cat >"$d/exports.toml" <<T
[server]
listen = "127.0.0.1:$port"
[s3]
$s3conf
[cache]
memory = "1GiB"
dirty = "512MiB"
[[export]]
name = "bench"
size = "$SIZE"
bucket = "nbd"
prefix = "bench/"
T
  "$NBDS3" serve --config "$d/exports.toml" >"$d/nbd-s3.log" 2>&1 &
  PIDS+=($!); URI="nbd://127.0.0.1:$port/bench"
  wait_nbd "$URI" $! "$d/nbd-s3.log"
}
for store in $STORE; do
  start_nbds3 "$store"
  run_workloads "nbd-s3-$store" "$URI"
  kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true   # flushes, then exits
  if [ "$store" = s3 ]; then kill "${PIDS[-2]}"; wait "${PIDS[-2]}" 2>/dev/null || true; fi
done

echo
echo "protocol overhead: working set $WS, random jobs ${RT}s, iodepth 32 (4k) / 8 (1M), load: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$W/results" $STORE <<'P'
import sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 4:
        rows[(f[0], f[1])] = (float(f[2]), float(f[3]))
stores = sys.argv[2:]
fmt = lambda r: f"{r[0]:7.1f} MiB/s {r[1]:7.0f} IOPS" if r else f"{'failed':>22s}"
head = f"{'workload':12s} {'nbdkit memory':>22s}"
for s in stores:
    head += f" {'nbd-s3 ' + s + ' store':>22s} {'ratio':>6s}"
print(head)
worst = {}
for w in ["seqwrite1M", "seqread1M", "randread4k", "randwrite4k"]:
    a = rows.get(("nbdkit-memory", w))
    line = f"{w:12s} {fmt(a):>22s}"
    for s in stores:
        b = rows.get((f"nbd-s3-{s}", w))
        ratio = "   n/a"
        if a and b and a[1]:
            r = 100 * b[1] / a[1]
            worst[s] = min(worst.get(s, 1e9), r)
            ratio = f"{r:5.0f}%"
        line += f" {fmt(b):>22s} {ratio:>6s}"
    print(line)
for s in stores:
    if s in worst:
        print(f"lowest ratio, {s} store: {worst[s]:.0f}% (target >= 70%)")
P

#!/usr/bin/env bash
# What compression and encryption cost: the same export with no codec (plain), zstd,
# encryption and both, on one local S3 server (s3s-fs on tmpfs) in one run, with fio's nbd
# engine. Every measured byte passes the codec: writes are timed until FLUSH returns (all of
# it stored: end_fsync) with a small dirty limit, and reads start from a cold cache (the
# daemon is restarted after the write) that is smaller than the working set, so they are
# GETs and decodes, not cache hits.
#   benches/codec.sh        (from anywhere; builds target/release/nbd-s3 first)
# Knobs: WS (working set, 256M), RT (seconds of random reads, 10), NBDS3 (binary),
#        NO_BUILD=1 skips the build, DATA ("random half": incompressible and 50%-compressible).
# Prints one row per codec and data kind: MiB/s of sequential write (1 MiB, depth 8) and
# sequential read (1 MiB, depth 8), IOPS of 4 KiB random reads (depth 32), bytes stored in
# the bucket for the working set, and each number relative to plain with the same data.
# Targets: on random data encryption >= 80% and zstd >= 70% of plain throughput; on
# 50%-compressible data zstd stores >= 40% fewer bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
WS=${WS:-256M}; RT=${RT:-10}; DATA=${DATA:-random half}
NBDS3=${NBDS3:-$PWD/target/release/nbd-s3}
[ -n "${NO_BUILD:-}" ] || cargo build --release --locked --bin nbd-s3 >&2
S3FS=${S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
BASE=${TMPDIR:-/tmp}; [ -d /dev/shm ] && BASE=/dev/shm
W=$(mktemp -d "$BASE/codecbench.XXXX")
S3PID=; NBDPID=
cleanup() {
  [ -z "$NBDPID" ] || { kill "$NBDPID" 2>/dev/null || true; wait "$NBDPID" 2>/dev/null || true; }
  [ -z "$S3PID" ] || { kill "$S3PID" 2>/dev/null || true; wait "$S3PID" 2>/dev/null || true; }
  rm -rf "$W"
}
trap cleanup EXIT

# shellcheck source=benches/common.sh
. benches/common.sh

# One s3s-fs for every run; each run has its own prefix.
mkdir -p "$W/s3/nbd"
s3port=$(free_port)
"$S3FS" --host 127.0.0.1 --port "$s3port" --access-key bench --secret-key benchsecret \
  "$W/s3" >"$W/s3.log" 2>&1 &
S3PID=$!
printf 'benchsecret' >"$W/secret"; chmod 600 "$W/secret"
head -c 32 /dev/urandom >"$W/bench.key"; chmod 600 "$W/bench.key"
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$s3port") 2>/dev/null && break; sleep 0.1; done

# The daemon for one run: cache smaller than the working set, small dirty limit.
start_nbds3() { # NAME CODEC-LINES -> sets URI and NBDPID
  local name=$1 lines=$2 port; port=$(free_port)
  cat >"$W/$name.toml" <<T
[server]
listen = "127.0.0.1:$port"
[s3]
endpoint = "http://127.0.0.1:$s3port"
region = "us-east-1"
path_style = true
access_key_id = "bench"
secret_access_key_file = "$W/secret"
[cache]
memory = "64MiB"
dirty = "32MiB"
[[export]]
name = "bench"
size = "1GiB"
bucket = "nbd"
prefix = "$name/"
lease = "off"
$lines
T
  "$NBDS3" serve --config "$W/$name.toml" >>"$W/$name.log" 2>&1 &
  NBDPID=$!; URI="nbd://127.0.0.1:$port/bench"
  wait_nbd "$URI" "$NBDPID" "$W/$name.log"
}
stop_nbds3() { kill "$NBDPID"; wait "$NBDPID" 2>/dev/null || true; NBDPID=; }

# fio's nbd engine never exits once the server is gone: bound it, kill it by PID.
fio_run() { # OUT-NAME FIO-ARGS... -> prints "MiB/s IOPS"
  local name=$1; shift
  timeout -k 5 $((RT + 120)) fio --name="$name" --ioengine=nbd --uri="$URI" "$@" \
    --output-format=json --output="$W/$name.json" >/dev/null 2>"$W/$name.err" \
    || { echo "fio $name failed:" >&2; cat "$W/$name.err" >&2; echo "0 0"; return 0; }
  python3 - "$W/$name.json" <<'P'
import json, sys
job = json.load(open(sys.argv[1]))['jobs'][0]
io = max(job['read'], job['write'], key=lambda d: d['io_bytes'])
print(f"{io['bw_bytes']/2**20:.1f} {io['iops']:.0f}")
P
}

data_args() { # KIND -> fio buffer options
  case $1 in
    random) echo "--refill_buffers --randrepeat=0" ;;
    half) echo "--refill_buffers --buffer_compress_percentage=50 --buffer_compress_chunk=4096" ;;
  esac
}

CODECS=(plain zstd encrypted both)
codec_lines() {
  case $1 in
    plain) echo "" ;;
    zstd) echo 'compression = "zstd"' ;;
    encrypted) echo "encryption_key_file = \"$W/bench.key\"" ;;
    both) printf 'compression = "zstd"\nencryption_key_file = "%s"\n' "$W/bench.key" ;;
  esac
}

: >"$W/results"
for kind in $DATA; do
  for codec in "${CODECS[@]}"; do
    name="$codec-$kind"
    start_nbds3 "$name" "$(codec_lines "$codec")"
    # shellcheck disable=SC2046
    w=$(fio_run "$name-w" --rw=write --bs=1M --iodepth=8 --size="$WS" --end_fsync=1 $(data_args "$kind"))
    stop_nbds3                       # flushes everything, so the bucket holds the working set
    stored=$(find "$W/s3/nbd/$name" -type f ! -name 'nbd-s3.*' -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    start_nbds3 "$name" "$(codec_lines "$codec")"
    r=$(fio_run "$name-r" --rw=read --bs=1M --iodepth=8 --size="$WS")
    rr=$(fio_run "$name-rr" --rw=randread --bs=4k --iodepth=32 --size="$WS" \
           --time_based --runtime="$RT" --randrepeat=0)
    stop_nbds3
    echo "$kind $codec ${w%% *} ${r%% *} ${rr##* } $stored" >>"$W/results"
    rm -rf "${W:?}/s3/nbd/$name"
  done
done

python3 - "$W/results" "$WS" <<'P'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
plain = {r[0]: r for r in rows if r[1] == 'plain'}
def rel(v, base):
    return f"{100 * float(v) / float(base):.0f}%" if float(base) > 0 else "-"
print(f"codec benchmark: working set {sys.argv[2]}, 1 MiB sequential (depth 8), 4 KiB random reads (depth 32), cold cache")
print(f"{'data':<8}{'codec':<11}{'seq write MiB/s':>22}{'seq read MiB/s':>22}{'4k randread IOPS':>22}{'bytes stored':>24}")
for kind, codec, w, r, rr, stored in rows:
    p = plain[kind]
    cell = lambda v, b: f"{v} ({rel(v, b)})"
    print(f"{kind:<8}{codec:<11}{cell(w, p[2]):>22}{cell(r, p[3]):>22}{cell(rr, p[4]):>22}{cell(stored, p[5]):>24}")
P

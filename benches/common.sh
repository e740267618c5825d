# Helpers the benchmark scripts share (sourced, not run).

wait_nbd() { # URI PID LOG: until nbdinfo connects (the server is ready), 60 s at most
  for _ in $(seq 600); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  echo "server for $1 did not start:" >&2; cat "$3" >&2; exit 1
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nbd-s3's configuration for a bench: one export "bench" of $SIZE under disk/ in BUCKET, served
# on 127.0.0.1:PORT with metrics on 127.0.0.1:METRICS-PORT, against ENDPOINT with the access key
# $KEY and the secret in $W/secret; EXTRA lines end the export's table.
bench_config() { # PORT METRICS-PORT ENDPOINT BUCKET [EXTRA]
  cat <<T
[server]
listen = "127.0.0.1:$1"
control = "off"
metrics = "127.0.0.1:$2"
[s3]
endpoint = "$3"
region = "us-east-1"
path_style = true
access_key_id = "$KEY"
secret_access_key_file = "$W/secret"
[[export]]
name = "bench"
size = "$SIZE"
bucket = "$4"
prefix = "disk/"
${5:-}
T
}

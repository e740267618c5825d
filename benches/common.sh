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

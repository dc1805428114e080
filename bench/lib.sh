# shellcheck shell=bash
# Helpers shared by bench/singleflight.sh and bench/hotpath.sh: packages, ports, processes,
# and starting each server under test on loopback. Source it; it sets a trap that stops
# every process started through `spawn` and removes the run's temp dir.

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
TOOLS=$BENCH/tools
PIDS=()
export PYTHONDONTWRITEBYTECODE=1  # tools/ import each other; leave no __pycache__ behind
RUN=""         # temp dir of this run
LAST_PID=""    # pid of the last process started with spawn

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Installs the Debian packages that are missing (idempotent); without dpkg, only warns.
need_pkgs() {
  command -v dpkg-query >/dev/null || { log "no dpkg: install $* yourself"; return 0; }
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -q "${missing[@]}" >&2 ||
    { "${sudo[@]}" apt-get update -q >&2 && "${sudo[@]}" apt-get install -y -q "${missing[@]}" >&2; } ||
    log "warning: could not install ${missing[*]}; rows that need them are skipped"
}

have() { command -v "$1" >/dev/null 2>&1; }

# A TCP port that is free on 127.0.0.1 right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

setup_run() { # creates the temp dir and the cleanup trap
  RUN=$(mktemp -d "${TMPDIR:-/tmp}/pullthrough-bench.XXXXXX")
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  [ -n "$RUN" ] && [ -z "${BENCH_KEEP:-}" ] && rm -rf "$RUN"
  [ -n "$RUN" ] && [ -n "${BENCH_KEEP:-}" ] && log "kept $RUN"
  return 0
}

# spawn LOGFILE CMD...: runs CMD in the background, remembered for cleanup, pid in LAST_PID.
spawn() {
  local logf=$1; shift
  "$@" >"$logf" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# run_child CMD...: like running CMD in the foreground, except that INT/TERM reach the trap at
# once (bash defers traps until a foreground child ends) and cleanup stops CMD as well.
run_child() {
  "$@" &
  local pid=$! rc=0
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  forget_pid "$pid"
  return "$rc"
}

forget_pid() { # drops a reaped pid from PIDS, so cleanup never signals a recycled one
  local p keep=()
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

stop_pid() { # TERM, then KILL after 5 s; only pids this script started
  local pid=$1 _
  kill -0 "$pid" 2>/dev/null || { forget_pid "$pid"; return 0; }
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

wait_http() { # URL [seconds]: until it answers anything
  local url=$1 tries=$(( ${2:-15} * 10 )) _
  for _ in $(seq "$tries"); do
    curl -sk -o /dev/null --max-time 1 "$url" && return 0
    sleep 0.1
  done
  die "nothing answers at $url"
}

peak_rss_kib() { # PID...: sum of VmHWM (peak resident set) in KiB
  local pid total=0 v
  for pid in "$@"; do
    v=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$(( total + ${v:-0} ))
  done
  echo "$total"
}

cpu_seconds() { # PID...: user+system CPU time they have used so far, in seconds
  local pid ticks=0 t
  for pid in "$@"; do
    t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
    ticks=$(( ticks + ${t:-0} ))
  done
  awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'
}

# CPU seconds all processes have used since boot (user + nice + system of all CPUs; interrupt
# time is left out, as no process is charged for it).
machine_busy_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%.2f", ($2 + $3 + $4 + $7 + $8) / hz; exit }' /proc/stat
}

# Sets OWN_CPU: CPU seconds used by this shell and its finished children (and theirs) plus the
# given running pids. Not for $(...): a subshell does not see the children of this shell.
own_cpu_seconds() {
  local kids
  times >"$RUN/.times"  # a builtin with a redirect runs in this shell; in a pipe it would not
  kids=$(awk '{ for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } } END { print t }' "$RUN/.times")
  OWN_CPU=$(awk -v a="$kids" -v b="$(cpu_seconds "$@")" 'BEGIN { printf "%.2f", a + b }')
}

# Call once at the start and once at the end (FILE): records how much CPU other processes on
# the machine took meanwhile, since every figure here depends on having the CPUs to ourselves.
other_load() { # start | end FILE
  if [ "$1" = start ]; then
    own_cpu_seconds
    LOAD_T0=$(date +%s.%N); LOAD_BUSY0=$(machine_busy_seconds); LOAD_OWN0=$OWN_CPU
    return
  fi
  local busy now
  own_cpu_seconds "${PIDS[@]}"; busy=$(machine_busy_seconds); now=$(date +%s.%N)
  awk -v b0="$LOAD_BUSY0" -v b1="$busy" -v o0="$LOAD_OWN0" -v o1="$OWN_CPU" -v t0="$LOAD_T0" -v t1="$now" \
    -v n="$(nproc)" 'BEGIN { other = (b1 - b0) - (o1 - o0); if (other < 0) other = 0
      printf "{\"other_cpu_s\": %.1f, \"wall_s\": %.1f, \"cpus\": %d}\n", other, t1 - t0, n }' >"$2"
}

build_pullthrough() {
  if [ -n "${PULLTHROUGH_BIN:-}" ]; then PT_BIN=$PULLTHROUGH_BIN; return; fi
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --quiet) >&2 || die "cargo build failed"
  PT_BIN=$ROOT/target/release/pullthrough
}

# start_pullthrough DIR PORT UPSTREAM_URL [extra flags]; PT_SCHEME=https for a TLS config
start_pullthrough() {
  local dir=$1 port=$2 up=$3; shift 3
  mkdir -p "$dir"
  local scheme=${PT_SCHEME:-http}  # https when the flags name a config with tls_cert
  spawn "$dir.log" "$PT_BIN" --listen "127.0.0.1:$port" --storage-dir "$dir" --upstream "$up" "$@"
  wait_http "$scheme://127.0.0.1:$port/v2/"
}

# start_registry DIR PORT [REMOTE_URL]: the CNCF distribution registry; with REMOTE_URL it runs
# in proxy mode (a pull-through cache of REMOTE_URL), the reference "registry:2 proxy".
start_registry() {
  local dir=$1 port=$2 remote=${3:-}
  mkdir -p "$dir/data"
  cat >"$dir/config.yml" <<YML
version: 0.1
log: {level: info, formatter: text}
storage:
  filesystem: {rootdirectory: $dir/data}
  cache: {blobdescriptor: inmemory}
  maintenance: {uploadpurging: {enabled: false}}
http: {addr: 127.0.0.1:$port, secret: bench-$port}
YML
  [ -n "$remote" ] && printf 'proxy:\n  remoteurl: %s\n' "$remote" >>"$dir/config.yml"
  spawn "$dir/log" "${REGISTRY_BIN:-docker-registry}" serve "$dir/config.yml"
  wait_http "http://127.0.0.1:$port/v2/"
}

# start_throttle LOG PORT UPSTREAM_PORT RATE: tools/throttle.py (bandwidth cap, counters)
start_throttle() {
  spawn "$1" python3 "$TOOLS/throttle.py" --listen "127.0.0.1:$2" --upstream "127.0.0.1:$3" --rate "$4"
  wait_http "http://127.0.0.1:$2/_throttle/stats"
}

# start_nginx DIR PORT SERVER_BODY [HTTP_EXTRA] [LISTEN_OPTS]: nginx with a config of our own
# under DIR; LISTEN_OPTS "ssl http2" makes it HTTPS (SERVER_BODY then names the certificate).
start_nginx() {
  local dir=$1 port=$2 body=$3 extra=${4:-} opts=${5:-} user="" scheme=http
  [[ $opts == *ssl* ]] && scheme=https
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && user="user root;"
  cat >"$dir/nginx.conf" <<CONF
$user
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log $dir/access.log;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path $dir/client_body;
  proxy_temp_path $dir/proxy_temp;
  fastcgi_temp_path $dir/fastcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
$extra
  server {
    listen 127.0.0.1:$port${opts:+ $opts};
$body
  }
}
CONF
  spawn "$dir/stdout.log" "${NGINX_BIN:-nginx}" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g "daemon off;"
  wait_http "$scheme://127.0.0.1:$port/"
}

# make_cert DIR: a self-signed ECDSA P-256 certificate for 127.0.0.1 (DIR/cert.pem, DIR/key.pem).
make_cert() {
  mkdir -p "$1"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$1/key.pem" -out "$1/cert.pem" >/dev/null 2>&1 || die "openssl could not make a certificate"
}

nginx_pids() { # master pid -> master and workers
  echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"
}

# seed_upstream DIR PORT NAME=SIZE...: a plain registry holding the benchmark image; sets SEED
# (the JSON file written by tools/seed.py) and UP_PORT.
seed_upstream() {
  local dir=$1; UP_PORT=$2; shift 2
  start_registry "$dir" "$UP_PORT"
  SEED=$RUN/seed.json
  log "seeding the upstream with $*"
  python3 "$TOOLS/seed.py" --registry "127.0.0.1:$UP_PORT" --dir "$RUN/blobs" "$@" >"$SEED"
}

seed_get() { # jq-like lookup in the seed JSON: seed_get blobs.big.digest
  python3 -c 'import json,sys
v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$SEED" "$1"
}

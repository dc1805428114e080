# shellcheck shell=bash
# Sourced by run.sh: the processes the suite runs on loopback (registries, token server,
# fault front, pullthrough), and the bookkeeping that stops every one of them on exit.
# Needs: T (work dir), HERE (this folder), PT_BIN, MIRROR_PORT, UP_USER, UP_TOKEN.

declare -A PID=()   # name -> pid of every background process this run started

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# spawn NAME CMD...: runs CMD in the background, output to $T/logs/NAME.log.
spawn() {
  local name=$1; shift
  "$@" >>"$T/logs/$name.log" 2>&1 &
  PID[$name]=$!
}

# term_tree PID: SIGTERM to PID's descendants (deepest first), then PID. A background
# subshell's `timeout client ...` would outlive a TERM sent to the subshell alone.
term_tree() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do term_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}

# stop NAME: TERM (to its process tree), then KILL after 20 s (dockerd can take a while).
stop() {
  local name=$1 pid=${PID[$1]:-}
  [ -n "$pid" ] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    term_tree "$pid"
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$name ($pid) ignored TERM; killing"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  wait "$pid" 2>/dev/null || true
  unset "PID[$name]"
}

# stop_all: clients before the daemons they use, then everything else. Runs from the EXIT
# trap, so it must not fail half-way.
stop_all() {
  local name
  for name in dockerd docker-containerd containerd; do stop "$name"; done
  for name in "${!PID[@]}"; do stop "$name"; done
  # A container run leaves mounts (shm, rootfs) under the data root; rm -rf needs them gone.
  local m
  for m in $(awk -v t="$T/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}

# wait_http NAME URL: until URL answers at all (any HTTP status), or NAME dies / 30 s pass.
wait_http() {
  local name=$1 url=$2
  for _ in $(seq 300); do
    curl -s -o /dev/null --max-time 2 "$url" && return 0
    kill -0 "${PID[$name]}" 2>/dev/null || { log "$name exited; see $T/logs/$name.log"; tail -5 "$T/logs/$name.log" >&2; return 1; }
    sleep 0.1
  done
  log "$name did not answer at $url within 30 s"; return 1
}

# make_signing_key: the RSA key and self-signed certificate shared by the token server
# (signs JWTs) and the registry (trusts them through rootcertbundle).
make_signing_key() {
  mkdir -p "$T/keys"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=pullthrough-test-token-signer \
    -keyout "$T/keys/key.pem" -out "$T/keys/cert.pem" 2>/dev/null
}

# start_tokenserver PORT [NAME [tokenserver.py options]]: requests logged to logs/NAME-requests.jsonl.
start_tokenserver() {
  local port=$1 name=${2:-token}; shift; [ $# -eq 0 ] || shift
  spawn "$name" python3 "$HERE/tokenserver.py" --port "$port" --key "$T/keys/key.pem" --cert "$T/keys/cert.pem" \
    --issuer pullthrough-test --user "$UP_USER:$UP_TOKEN" --ttl 60 --log "$T/logs/$name-requests.jsonl" "$@"
  wait_http "$name" "http://127.0.0.1:$port/token"
}

# start_registry NAME PORT [TOKEN_PORT | htpasswd=FILE]: CNCF distribution; Bearer token auth
# when TOKEN_PORT is given, Basic auth against a bcrypt htpasswd FILE with htpasswd=FILE. Its
# access log (one line per request) lands in logs/NAME.log.
start_registry() {
  local name=$1 port=$2 token_port=${3:-} dir=$T/$1 htpasswd=
  case $token_port in htpasswd=*) htpasswd=${token_port#htpasswd=} token_port= ;; esac
  mkdir -p "$dir/data"
  cat >"$dir/config.yml" <<EOF
version: 0.1
log: {level: info, formatter: text}
storage:
  filesystem: {rootdirectory: $dir/data}
  maintenance: {uploadpurging: {enabled: false}}
http: {addr: 127.0.0.1:$port, secret: test-secret-$name}
EOF
  if [ -n "$token_port" ]; then
    cat >>"$dir/config.yml" <<EOF
auth:
  token:
    realm: http://127.0.0.1:$token_port/token
    service: pullthrough-test-registry
    issuer: pullthrough-test
    rootcertbundle: $T/keys/cert.pem
EOF
  elif [ -n "$htpasswd" ]; then
    cat >>"$dir/config.yml" <<EOF
auth:
  htpasswd: {realm: $name, path: $htpasswd}
EOF
  fi
  spawn "$name" docker-registry serve "$dir/config.yml"
  wait_http "$name" "http://127.0.0.1:$port/v2/"
}

# start_front NAME PORT UPSTREAM_PORT [front.py options]: the logging (and cutting) proxy.
start_front() {
  local name=$1 port=$2 upstream=$3; shift 3
  : >"$T/logs/$name-requests.jsonl"
  spawn "$name" python3 "$HERE/front.py" --port "$port" --upstream "http://127.0.0.1:$upstream" \
    --log "$T/logs/$name-requests.jsonl" "$@"
  wait_http "$name" "http://127.0.0.1:$port/v2/"
}

# start_mirror NAME UPSTREAM_URL [USER]: a fresh pullthrough (empty cache) on MIRROR_PORT,
# the one port every client is configured with, mirroring docker.io from UPSTREAM_URL. The
# user name goes in the config file and the token in the environment, the way mirror.toml
# recommends.
start_mirror() {
  local name=$1 url=$2 user=${3:-}
  mirror_config "$name" >/dev/null
  { echo '[upstreams."docker.io"]'; echo "url = \"$url\""
    [ -z "$user" ] || echo "username = \"$user\""; } >>"$T/$name/mirror.toml"
  if [ -n "$user" ]; then launch_mirror "$name" "PULLTHROUGH_UPSTREAM_PASSWORD=$UP_TOKEN"; else launch_mirror "$name"; fi
}

# mirror_config NAME: a fresh directory for mirror NAME with the [server], [storage], [cache]
# and [log] sections of its mirror.toml (append the [upstreams]); prints the file's path.
mirror_config() {
  local dir=$T/$1
  rm -rf "$dir"; mkdir -p "$dir"
  cat >"$dir/mirror.toml" <<EOF
[server]
listen = "127.0.0.1:$MIRROR_PORT"
[storage]
dir = "$dir/data"
[cache]
tag_ttl = "1s"
[log]
format = "json"
EOF
  echo "$dir/mirror.toml"
}

# launch_mirror NAME [VAR=VALUE ...]: runs the mirror configured by mirror_config NAME, with
# those variables in its environment.
launch_mirror() {
  local name=$1; shift
  spawn "$name" env "$@" "$PT_BIN" --config "$T/$name/mirror.toml"
  MIRROR_NAME=$name
  wait_http "$name" "http://$MIRROR/v2/"
}

# stop_mirror: stops the current mirror and drops its cache (its log stays in logs/).
stop_mirror() { stop "$MIRROR_NAME"; rm -rf "${T:?}/$MIRROR_NAME"; }

# mirror_metric NAME [LABEL=VALUE ...]: a counter summed over the other labels.
mirror_metric() { python3 "$HERE/util.py" metric "http://$MIRROR/metrics" "$@"; }

# A work dir $T (named /tmp/<$1>.*) with logs/ and results.tsv; on exit every service is
# stopped and the dir removed, or, after a failure, its logs kept.
make_workdir() {
  T=$(mktemp -d "/tmp/$1.XXXXXX")   # short: unix socket paths live under it
  mkdir -p "$T/logs"
  : >"$T/results.tsv"
  trap on_exit EXIT
  trap 'exit 130' INT TERM
}

on_exit() {
  local status=$?
  stop_all
  if [ "${KEEP_TMP:-0}" = 1 ]; then
    log "kept $T"
  elif [ "$status" -ne 0 ]; then
    find "$T" -mindepth 1 -maxdepth 1 ! -name logs ! -name results.tsv -exec rm -rf {} + 2>/dev/null || true
    log "failed; logs kept in $T/logs"
  else
    rm -rf "$T"
  fi
}

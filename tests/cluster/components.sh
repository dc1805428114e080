# shellcheck shell=bash
# Sourced by tests/cluster/run.sh and bench/cluster.sh: installing, starting and configuring
# the real components of a pullthrough cluster on loopback: one Garage node (the shared
# tier), one redis-server (leases), and replicas whose configs are rendered from
# examples/cluster/. The sourcing script provides
#   cluster_spawn NAME CMD...   run CMD in the background, remembered for cleanup
#   cluster_alive NAME          whether that process still runs
#   log MESSAGE
# and sets ROOT (the repository) and PT_BIN (the pullthrough binary).

GARAGE_VERSION=2.5.0
GARAGE_ROOT=${GARAGE_ROOT:-$HOME/.local/garage-$GARAGE_VERSION}
EXAMPLE=$ROOT/examples/cluster
CLUSTER_BUCKET=pullthrough

# garage_is_pinned BIN: whether BIN is Garage at the pinned version.
# `garage --version` prints "garage cargo:2.5.0 [features: ...]" (older builds "garage v2.5.0").
garage_is_pinned() { [ -x "$1" ] && "$1" --version 2>/dev/null | grep -Eq "(^|[ :v])${GARAGE_VERSION//./\\.}( |$)"; }

# find_garage: sets GARAGE_BIN to a pinned Garage on PATH or under GARAGE_ROOT; 1 if none.
find_garage() {
  local bin
  for bin in "$(command -v garage 2>/dev/null || true)" "$GARAGE_ROOT/bin/garage"; do
    if [ -n "$bin" ] && garage_is_pinned "$bin"; then GARAGE_BIN=$bin; return 0; fi
  done
  return 1
}

# install_cluster_components: redis-server from Debian, Garage with cargo install (about 12
# minutes on 2 cores, so a binary at the pinned version is reused).
install_cluster_components() {
  if ! dpkg-query -W -f='${Status}' redis-server 2>/dev/null | grep -q 'ok installed'; then
    log "installing redis-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }
  fi
  if find_garage; then
    log "garage $GARAGE_VERSION: $GARAGE_BIN"
    return 0
  fi
  log "cargo install garage $GARAGE_VERSION into $GARAGE_ROOT (about 12 minutes)"
  cargo install garage --locked --version "$GARAGE_VERSION" --root "$GARAGE_ROOT"
  find_garage || { log "garage $GARAGE_VERSION not found after the install"; return 1; }
}

# wait_until SECONDS CMD...: until CMD succeeds (tried every 0.1 s); 1 when time runs out.
wait_until() {
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.1
  done
}

# start_garage NAME DIR S3_PORT RPC_PORT: a fresh single Garage node from
# examples/cluster/garage.toml, with a layout, the bucket, and a key that may use it. Sets
# S3_ENDPOINT, S3_KEY_ID and S3_SECRET.
start_garage() {
  local name=$1 dir=$2 s3=$3 rpc=$4 id
  rm -rf "$dir"; mkdir -p "$dir"
  sed -e "s|/var/lib/garage|$dir|" \
      -e "s|^rpc_bind_addr = .*|rpc_bind_addr = \"127.0.0.1:$rpc\"|" \
      -e "s|^rpc_public_addr = .*|rpc_public_addr = \"127.0.0.1:$rpc\"|" \
      -e "s|^api_bind_addr = \"0.0.0.0:3900\"|api_bind_addr = \"127.0.0.1:$s3\"|" \
      "$EXAMPLE/garage.toml" >"$dir/garage.toml"
  GARAGE=(env "GARAGE_RPC_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" "$GARAGE_BIN" -c "$dir/garage.toml")
  cluster_spawn "$name" "${GARAGE[@]}" server
  wait_until 30 "${GARAGE[@]}" status || { log "$name did not come up"; return 1; }
  id=$("${GARAGE[@]}" node id -q 2>/dev/null | cut -d@ -f1)
  "${GARAGE[@]}" layout assign -z dc1 -c 10G "$id" >/dev/null
  "${GARAGE[@]}" layout apply --version 1 >/dev/null
  "${GARAGE[@]}" bucket create "$CLUSTER_BUCKET" >/dev/null
  # A key of our own choosing (the same format Garage makes: GK + 24 hex, 64 hex), as the
  # README's compose setup imports the one in its .env.
  S3_KEY_ID=GK$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  S3_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  "${GARAGE[@]}" key import --yes -n pullthrough "$S3_KEY_ID" "$S3_SECRET" >/dev/null
  "${GARAGE[@]}" bucket allow --read --write --owner "$CLUSTER_BUCKET" --key pullthrough >/dev/null
  S3_ENDPOINT=http://127.0.0.1:$s3
  wait_until 30 curl -s -o /dev/null "$S3_ENDPOINT/" || { log "$name: no S3 API on $S3_ENDPOINT"; return 1; }
}

# start_redis NAME PORT: a throwaway redis-server (no persistence) in the foreground.
start_redis() {
  local name=$1 port=$2
  cluster_spawn "$name" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no
  REDIS_URL=redis://127.0.0.1:$port/0
  wait_until 10 redis-cli -p "$port" ping || { log "$name did not answer"; return 1; }
}

# render_replica FILE PORT DATA_DIR UPSTREAM_URL: examples/cluster/pullthrough.toml with this
# replica's address (listen and advertise), its own local directory, the running Garage and
# Redis, and UPSTREAM_URL for docker.io (with REPLICA_PARTS set, its parallel_parts).
render_replica() {
  local file=$1 port=$2 data=$3 upstream=$4
  sed -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" \
      -e "s|^dir = .*|dir = \"$data\"|" \
      -e "s|^endpoint = .*|endpoint = \"$S3_ENDPOINT\"|" \
      -e "s|^redis = .*|redis = \"$REDIS_URL\"|" \
      -e "s|^advertise = .*|advertise = \"http://127.0.0.1:$port\"|" \
      -e "s|^url = \"https://registry-1.docker.io\"|url = \"$upstream\"${REPLICA_PARTS:+\\nparallel_parts = $REPLICA_PARTS}|" \
      "$EXAMPLE/pullthrough.toml" >"$file"
}

# start_replica NAME DIR PORT UPSTREAM_URL: a replica with an empty local tier in DIR.
start_replica() {
  local name=$1 dir=$2 port=$3 upstream=$4
  rm -rf "$dir"; mkdir -p "$dir"
  render_replica "$dir/mirror.toml" "$port" "$dir/data" "$upstream"
  cluster_spawn "$name" env "PULLTHROUGH_S3_ACCESS_KEY_ID=$S3_KEY_ID" "PULLTHROUGH_S3_SECRET_ACCESS_KEY=$S3_SECRET" \
    "PULLTHROUGH_CLUSTER_SECRET=$CLUSTER_SECRET" "$PT_BIN" --config "$dir/mirror.toml"
  local _
  for _ in $(seq 300); do
    curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/v2/" && return 0
    cluster_alive "$name" || { log "$name exited"; return 1; }
    sleep 0.1
  done
  log "$name did not answer on port $port"; return 1
}

CLUSTER_SECRET=${CLUSTER_SECRET:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

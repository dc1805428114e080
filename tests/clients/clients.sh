# shellcheck shell=bash
# Sourced by run.sh: the four real clients, each with private state under $T, each pointed
# at the mirror on $MIRROR for docker.io. Their own way to Docker Hub is a closed port
# (127.0.0.1:9), so a pull can only succeed through the mirror.
#
# Per client: pull_CLIENT IMAGE prints the manifest digest the client ended up with for
# docker.io/library/IMAGE; reset_CLIENT IMAGE forgets the image and its blobs, so the next
# pull downloads everything again. containerd and podman also take a full reference
# (ghcr.io/org/app:v1) for IMAGE.

CLOSED=127.0.0.1:9

# full_ref IMAGE: docker.io/library/IMAGE for a bare name, a full reference as it is.
full_ref() { case $1 in */*) echo "$1" ;; *) echo "docker.io/library/$1" ;; esac; }
PULL_TIMEOUT=${PULL_TIMEOUT:-300}

# render FILE: a client config file from examples/ (the files docs/clients.md shows), with the
# mirror's address in place of mirror.example:5000 and a closed port in place of every
# registry's own address, so a pull can only succeed through the mirror.
render() {
  sed -e "s|^server = \"[^\"]*\"|server = \"http://$CLOSED\"|" \
      -e "/^location = \"mirror\.example:5000/!s|^location = \"[^\"]*\"|location = \"$CLOSED\"|" \
      -e "s|mirror\.example:5000|$MIRROR|g" "$ROOT/examples/$1"
}

# Each client's command line with its private state, as an array so `timeout` can run it.
# Set by the setup functions below once $T exists.
CTR=() DOCKER=() PODMAN=() SKOPEO=()

# --- containerd 1.6 ----------------------------------------------------------------------
# run_containerd NAME DIR: a containerd with all its state and sockets in DIR, no CRI.
# Two run: one for ctr, one as dockerd's runtime. Sharing one would let dockerd's copy of a
# manifest collide with ctr's in containerd's shared content store when both pull at once.
run_containerd() {
  local name=$1 d=$2
  mkdir -p "$d"
  cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
EOF
  spawn "$name" containerd --config "$d/config.toml"
  for _ in $(seq 100); do ctr --address "$d/containerd.sock" version >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "$name did not start; see $T/logs/$name.log"; return 1
}

start_containerd() {
  local d=$T/containerd
  CTR=(ctr --address "$d/containerd.sock" --namespace suite)
  local hosts registry
  for hosts in "$ROOT"/examples/containerd/certs.d/*/hosts.toml; do
    registry=$(basename "$(dirname "$hosts")")
    mkdir -p "$d/certs.d/$registry"
    render "containerd/certs.d/$registry/hosts.toml" >"$d/certs.d/$registry/hosts.toml"
  done
  run_containerd containerd "$d"
}

pull_containerd() {
  local ref
  ref=$(full_ref "$1")
  timeout "$PULL_TIMEOUT" "${CTR[@]}" images pull --hosts-dir "$T/containerd/certs.d" "$ref" \
    >>"$T/logs/ctr-pull.log" 2>&1 || { tail -3 "$T/logs/ctr-pull.log" >&2; return 1; }
  "${CTR[@]}" images ls | awk -v ref="$ref" '$1 == ref { print $3 }'
}

# --sync waits for containerd's garbage collector, so the blobs are gone when it returns.
reset_containerd() {
  "${CTR[@]}" images rm --sync "$(full_ref "$1")" >/dev/null 2>&1 || true
  [ -z "$("${CTR[@]}" content ls -q)" ] || { log "containerd still holds blobs after reset"; return 1; }
}

# --- dockerd 20.10 ----------------------------------------------------------------------
start_dockerd() {
  local d=$T/docker flags=()
  mkdir -p "$d/cli"
  # The Debian docker client, not whatever newer `docker` comes first in PATH.
  DOCKER=(env "DOCKER_CONFIG=$d/cli" /usr/bin/docker -H "unix://$d/docker.sock")
  render daemon.json >"$d/daemon.json"
  # Its own containerd, so a system one at /run/containerd (which dockerd would otherwise
  # pick up) stays out of it.
  run_containerd docker-containerd "$d/containerd"
  # No network setup: nothing here may touch the host's bridges or firewall.
  flags=(--bridge none --iptables=false --ip-masq=false)
  if /usr/sbin/dockerd --help 2>&1 | grep -q -- '--ip6tables'; then flags+=(--ip6tables=false); fi
  # The proxy variables make dockerd's own fallback to Docker Hub hit a closed port; the
  # mirror (on 127.0.0.1) is exempt through NO_PROXY.
  HTTP_PROXY=http://$CLOSED HTTPS_PROXY=http://$CLOSED NO_PROXY=127.0.0.1,localhost \
    spawn dockerd /usr/sbin/dockerd --config-file "$d/daemon.json" --data-root "$d/data" \
      --exec-root "$d/exec" --pidfile "$d/dockerd.pid" -H "unix://$d/docker.sock" \
      --containerd "$d/containerd/containerd.sock" --storage-driver vfs "${flags[@]}"
  for _ in $(seq 150); do "${DOCKER[@]}" version >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "dockerd did not start; see $T/logs/dockerd.log"; tail -5 "$T/logs/dockerd.log" >&2; return 1
}

pull_docker() {
  timeout "$PULL_TIMEOUT" "${DOCKER[@]}" pull "$1" >>"$T/logs/docker-pull.log" 2>&1 \
    || { tail -3 "$T/logs/docker-pull.log" >&2; return 1; }
  "${DOCKER[@]}" image inspect -f '{{range .RepoDigests}}{{println .}}{{end}}' "$1" | head -1 | sed 's/.*@//'
}

reset_docker() {
  "${DOCKER[@]}" rmi -f "$1" >/dev/null 2>&1 || true
  [ -z "$("${DOCKER[@]}" images -q)" ] || { log "dockerd still holds images after reset"; return 1; }
}

# run_docker IMAGE: runs the image's command (busybox echo) with no network.
run_docker() { timeout 120 "${DOCKER[@]}" run --rm --network none "$1" 2>&1; }

# --- podman 4.3 -------------------------------------------------------------------------
setup_podman() {
  local d=$T/podman
  mkdir -p "$d"
  PODMAN=(env "CONTAINERS_REGISTRIES_CONF=$d/registries.conf" "CONTAINERS_STORAGE_CONF=$d/storage.conf"
    podman --root "$d/root" --runroot "$d/run" --tmpdir "$d/tmp" --storage-driver vfs
    --events-backend none --cgroup-manager cgroupfs)
  render registries.conf >"$d/registries.conf"
  printf '[storage]\ndriver = "vfs"\ngraphroot = "%s"\nrunroot = "%s"\n' "$d/root" "$d/run" >"$d/storage.conf"
}

pull_podman() {
  local ref
  ref=$(full_ref "$1")
  timeout "$PULL_TIMEOUT" "${PODMAN[@]}" pull -q "$ref" >>"$T/logs/podman-pull.log" 2>&1 \
    || { tail -3 "$T/logs/podman-pull.log" >&2; return 1; }
  "${PODMAN[@]}" image inspect --format '{{.Digest}}' "$ref"
}

reset_podman() {
  "${PODMAN[@]}" rmi -f "$(full_ref "$1")" >/dev/null 2>&1 || true
  [ -z "$("${PODMAN[@]}" images -q)" ] || { log "podman still holds images after reset"; return 1; }
}

# --- skopeo 1.9: talks to the mirror by address; --all keeps the index as pulled --------
setup_skopeo() {
  mkdir -p "$T/skopeo"
  SKOPEO=(skopeo --registries-conf "$T/skopeo/registries.conf" --policy "$T/skopeo/policy.json")
  : >"$T/skopeo/registries.conf"
  echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$T/skopeo/policy.json"
}

# pull_skopeo IMAGE [OUT]: copies into the dir OUT (default one per image).
pull_skopeo() {
  local out=${2:-$T/skopeo/out-${1//[:\/]/-}}
  rm -rf "$out"
  timeout "$PULL_TIMEOUT" "${SKOPEO[@]}" copy -q --all --src-tls-verify=false \
    "docker://$MIRROR/library/$1" "dir:$out" >>"$T/logs/skopeo-pull.log" 2>&1 \
    || { tail -3 "$T/logs/skopeo-pull.log" >&2; return 1; }
  echo "sha256:$(sha256sum <"$out/manifest.json" | cut -d' ' -f1)"
}

reset_skopeo() { rm -rf "$T/skopeo/out-${1//[:\/]/-}"; }

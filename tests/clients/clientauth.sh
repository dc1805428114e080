# shellcheck shell=bash
# Sourced by run.sh: phase clientauth, a mirror with credentials = "client" in front of a
# token-authenticated registry where two accounts see different things:
#
#   alice   may pull private/app and library/*
#   bob     may pull library/* only
#   anonymous callers may pull library/* (the token server's --public)
#
# Each client gets a fresh mirror (empty cache, no remembered confirmations) and, through its
# own way of holding credentials (dockerd: the docker.io entry of the CLI's config.json;
# containerd: ctr --user with hosts.toml; podman: an auth.json entry for the mirror's
# location; skopeo: --src-creds), pulls in this order:
#   1. alice: private/app            digest = the upstream's
#   2. bob:   private/app            refused, though every blob is cached by then (and each of
#                                    its blobs, asked for directly with bob's credentials, too)
#      bob:   library/hello          digest = the upstream's
#   3. anonymous: library/hello OK, private/app refused
# What the client sent the mirror is logged by a front.py between them (--keep-host, so the
# mirror's challenge names the front and token requests pass it too); what the mirror sent the
# upstream by another front.py in front of the registry, which names the JWT subject of every
# request: in each step only the pulling account's (or no) credentials may appear there, and
# only that account at the token server. Finally none of alice's or bob's passwords (or their
# Basic forms) may appear in the mirror's log (run at debug, pullthrough at trace), the error
# bodies it answered, /_pullthrough/status or /metrics.
# Needs: T, HERE, MIRROR, MIRROR_PORT, UP_USER, UP_TOKEN, SKOPEO, the clients set up.

CA_A=alice
CA_B=bob
CA_A_PASS=pa-$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n')
CA_B_PASS=pb-$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n')
CA_PRIVATE=private/app:v1
CA_PUBLIC=library/hello:v1

start_clientauth_upstream() {
  read -r CA_TOKEN_PORT CA_REG_PORT CA_UP_FRONT_PORT CA_MIRROR_PORT < <(python3 "$HERE/util.py" ports 4)
  # $UP_USER (pull and push everywhere) pushes; alice and bob only pull.
  start_tokenserver "$CA_TOKEN_PORT" ca-token --user "$CA_A:$CA_A_PASS:private/app,library/*" \
    --user "$CA_B:$CA_B_PASS:library/*" --public 'library/*'
  start_registry ca-registry "$CA_REG_PORT" "$CA_TOKEN_PORT"
  start_front ca-up-front "$CA_UP_FRONT_PORT" "$CA_REG_PORT"
  local args=(copy -q --all --dest-tls-verify=false --dest-creds "$UP_USER:$UP_TOKEN")
  "${SKOPEO[@]}" "${args[@]}" "oci:$T/oci:single-oci" "docker://127.0.0.1:$CA_REG_PORT/$CA_PRIVATE"
  "${SKOPEO[@]}" "${args[@]}" --format v2s2 "oci:$T/oci:hello" "docker://127.0.0.1:$CA_REG_PORT/$CA_PUBLIC"
  DIGEST[ca/$CA_PRIVATE]=$(raw_digest "127.0.0.1:$CA_REG_PORT/$CA_PRIVATE" --creds "$UP_USER:$UP_TOKEN")
  DIGEST[ca/$CA_PUBLIC]=$(raw_digest "127.0.0.1:$CA_REG_PORT/$CA_PUBLIC" --creds "$UP_USER:$UP_TOKEN")
  CA_BLOBS=$(python3 -c 'import json,sys; print(" ".join(sorted(set(json.load(sys.stdin)["blobs"]))))' <"$T/img-single-oci.json")
  mkdir -p "$T/clientauth"
  for who in A B anon; do auth_json "$who" "$MIRROR" >"$T/clientauth/auth-$who.json"; done
  log "pushed $CA_PRIVATE ${DIGEST[ca/$CA_PRIVATE]}, $CA_PUBLIC ${DIGEST[ca/$CA_PUBLIC]}"
}

# creds WHO: "user:password" of A or B, nothing for anon.
creds() {
  case $1 in A) echo "$CA_A:$CA_A_PASS" ;; B) echo "$CA_B:$CA_B_PASS" ;; esac
}

# auth_json WHO KEY: a docker/containers auth file with WHO's credentials under KEY.
auth_json() {
  local c
  c=$(creds "$1")
  if [ -z "$c" ]; then echo '{"auths": {}}'; return; fi
  printf '{"auths": {"%s": {"auth": "%s"}}}\n' "$2" "$(printf %s "$c" | base64 -w0)"
}

# A fresh mirror with credentials = "client" behind the client-side front on MIRROR_PORT.
start_clientauth_mirror() {
  local name=ca-mirror-$1 file outer=$MIRROR
  file=$(mirror_config "$name")
  sed -i "s|^listen = .*|listen = \"127.0.0.1:$CA_MIRROR_PORT\"|" "$file"
  cat >>"$file" <<EOF
[upstreams."docker.io"]
url = "http://127.0.0.1:$CA_UP_FRONT_PORT"
credentials = "client"
EOF
  MIRROR=127.0.0.1:$CA_MIRROR_PORT
  launch_mirror "$name" "PULLTHROUGH_LOG=debug,pullthrough=trace"
  MIRROR=$outer
  start_front "ca-client-front-$1" "$MIRROR_PORT" "$CA_MIRROR_PORT" --keep-host
}

# --- each client pulls as WHO (A, B or anon); prints the manifest digest ----------------------
ca_pull() {
  local client=$1 who=$2 ref=$3 c
  c=$(creds "$who")
  case $client in
    docker)
      # dockerd sends the CLI's docker.io credentials (the X-Registry-Auth of the pull) to a
      # registry-mirrors entry that challenges.
      auth_json "$who" https://index.docker.io/v1/ >"$T/docker/cli/config.json"
      pull_docker "$ref" ;;
    containerd)
      timeout "$PULL_TIMEOUT" "${CTR[@]}" images pull --hosts-dir "$T/containerd/certs.d" ${c:+--user "$c"} \
        "docker.io/$ref" >>"$T/logs/ctr-pull.log" 2>&1 || { tail -3 "$T/logs/ctr-pull.log" >&2; return 1; }
      "${CTR[@]}" images ls | awk -v ref="docker.io/$ref" '$1 == ref { print $3 }' ;;
    podman)
      timeout "$PULL_TIMEOUT" "${PODMAN[@]}" pull -q --authfile "$T/clientauth/auth-$who.json" "docker.io/$ref" \
        >>"$T/logs/podman-pull.log" 2>&1 || { tail -3 "$T/logs/podman-pull.log" >&2; return 1; }
      "${PODMAN[@]}" image inspect --format '{{.Digest}}' "docker.io/$ref" ;;
    skopeo)
      local out=$T/clientauth/skopeo-out auth=(--src-no-creds)
      [ -z "$c" ] || auth=(--src-creds "$c")
      rm -rf "$out"
      timeout "$PULL_TIMEOUT" "${SKOPEO[@]}" copy -q --all --src-tls-verify=false "${auth[@]}" \
        "docker://$MIRROR/$ref" "dir:$out" >>"$T/logs/skopeo-pull.log" 2>&1 \
        || { tail -3 "$T/logs/skopeo-pull.log" >&2; return 1; }
      echo "sha256:$(sha256sum <"$out/manifest.json" | cut -d' ' -f1)" ;;
  esac
}

ca_reset() {
  case $1 in
    docker) reset_docker "$2" ;;
    containerd|podman) "reset_$1" "docker.io/$2" ;;
    skopeo) rm -rf "$T/clientauth/skopeo-out" ;;
  esac
}

# --- the phase ----------------------------------------------------------------------------
phase_clientauth() {
  log "== phase clientauth: credentials = \"client\", accounts $CA_A (private/app) and $CA_B (public only)"
  start_clientauth_upstream
  check_docker_login
  local client
  for client in "${CLIENTS[@]}"; do check_clientauth "$client"; done
  echo '{"auths": {}}' >"$T/docker/cli/config.json"
}

# `docker login` asks dockerd to check the credentials at Docker Hub itself (never a mirror),
# which cannot be reached here; the suite then writes what it would have stored.
check_docker_login() {
  if printf %s "$CA_A_PASS" | timeout 60 "${DOCKER[@]}" login -u "$CA_A" --password-stdin >"$T/logs/docker-login.log" 2>&1; then
    log "docker login to Docker Hub worked (unexpected here); the suite writes config.json itself anyway"
  else
    log "docker login cannot reach Docker Hub here ($(tail -1 "$T/logs/docker-login.log" | cut -c1-120)); writing config.json auths instead"
  fi
}

check_clientauth() {
  local client=$1 v
  CA_CLIENT_LOG=$T/logs/ca-client-front-$client-requests.jsonl
  CA_BAD=() CA_SENT=() CA_SEEN=()
  start_clientauth_mirror "$client"
  for v in "$CA_PRIVATE" "$CA_PUBLIC"; do ca_reset "$client" "$v" || true; done

  ca_step "$client" A "$CA_PRIVATE" ok
  ca_step "$client" B "$CA_PRIVATE" refused
  check_blobs_refused "$client"
  ca_step "$client" B "$CA_PUBLIC" ok
  ca_step "$client" anon "$CA_PUBLIC" ok
  ca_step "$client" anon "$CA_PRIVATE" refused
  [ "$client" != podman ] || check_podman_registry_key

  if [ ${#CA_BAD[@]} -eq 0 ]; then
    record "$client" - "clientauth: upstream saw only the puller's credentials" PASS "${CA_SEEN[*]}"
  else
    record "$client" - "clientauth: upstream saw only the puller's credentials" FAIL "${CA_BAD[*]}"
  fi
  log "$client sent the mirror: ${CA_SENT[*]}"
  check_no_credentials "$client"
  stop_mirror
  stop "ca-client-front-$client"
}

# ca_step CLIENT WHO REF ok|refused: one pull, recorded; then the upstream's view of it.
ca_step() {
  local client=$1 who=$2 ref=$3 want=$4 c0 u0 t0 got err sent
  c0=$(( $(wc -l <"$CA_CLIENT_LOG") + 1 ))
  u0=$(( $(wc -l <"$T/logs/ca-up-front-requests.jsonl") + 1 ))
  t0=$(( $(wc -l <"$T/logs/ca-token-requests.jsonl") + 1 ))
  local name=$who check
  [ "$who" = A ] && name=$CA_A
  [ "$who" = B ] && name=$CA_B
  if got=$(ca_pull "$client" "$who" "$ref" 2>"$T/err"); then err=; else got= err=$(grep -v '^\s*$' "$T/err" | tail -1 | cut -c1-160); fi
  sleep 0.5   # the fronts log a request when its response completes
  sent=$(python3 "$HERE/util.py" counts "$CA_CLIENT_LOG" "$c0" auth)
  CA_SENT+=("[$name $ref: $sent]")
  if [ "$want" = ok ]; then
    check="clientauth: $name pulls $ref"
    if [ -n "$got" ] && [ "$got" = "${DIGEST[ca/$ref]}" ]; then
      record "$client" "$ref" "$check" PASS "$(short "$got"); sent $sent"
    else
      record "$client" "$ref" "$check" FAIL "got ${got:-nothing} ${err:+($err)}, upstream has ${DIGEST[ca/$ref]}"
    fi
  else
    check="clientauth: $name refused $ref"
    local answers
    answers=$(python3 "$HERE/util.py" counts "$CA_CLIENT_LOG" "$c0" status "/${ref%%:*}/")
    if [ -z "$got" ] && grep -Eq '(^| )40[13]=' <<<"$answers" && ! grep -Eq '(^| )2[0-9][0-9]=' <<<"$answers"; then
      record "$client" "$ref" "$check" PASS "mirror answered $answers; client: $err"
    else
      record "$client" "$ref" "$check" FAIL "pulled ${got:-nothing}; mirror answered $answers; ${err}"
    fi
  fi
  ca_reset "$client" "$ref" || true
  # Upstream requests and token requests in this step: only this identity's (or none).
  local up tok v
  up=$(python3 "$HERE/util.py" counts "$T/logs/ca-up-front-requests.jsonl" "$u0" auth)
  tok=$(python3 "$HERE/util.py" counts "$T/logs/ca-token-requests.jsonl" "$t0" user)
  CA_SEEN+=("[$name $ref: upstream ${up:-none}; tokens ${tok:-none}]")
  # An anonymous token is nobody's: containerd asks anonymously first, and a refusal makes
  # the mirror confirm that identity too.
  for v in $up; do
    case ${v%=*} in -|bearer:|"bearer:${name#anon}") ;; *) CA_BAD+=("$name $ref: upstream got ${v%=*}") ;; esac
  done
  for v in $tok; do
    case ${v%=*} in -|"${name#anon}") ;; *) CA_BAD+=("$name $ref: token server saw ${v%=*}") ;; esac
  done
}

# containers/image looks credentials up by the location it contacts: an auth.json entry for
# docker.io only is not sent to a mirror of docker.io, and the pull is refused.
check_podman_registry_key() {
  local file=$T/clientauth/auth-A-docker.io.json c0 sent check="clientauth: auth.json for docker.io only: not sent to the mirror"
  auth_json A docker.io >"$file"
  c0=$(( $(wc -l <"$CA_CLIENT_LOG") + 1 ))
  if timeout "$PULL_TIMEOUT" "${PODMAN[@]}" pull -q --authfile "$file" "docker.io/$CA_PRIVATE" >>"$T/logs/podman-pull.log" 2>&1; then
    record podman "$CA_PRIVATE" "$check" FAIL "pulled with docker.io credentials"
  else
    sleep 0.5
    sent=$(python3 "$HERE/util.py" counts "$CA_CLIENT_LOG" "$c0" auth)
    if grep -q "basic:$CA_A" <<<"$sent"; then
      record podman "$CA_PRIVATE" "$check" FAIL "refused, but sent $sent"
    else
      record podman "$CA_PRIVATE" "$check" PASS "refused; sent $sent"
    fi
  fi
  reset_podman "docker.io/$CA_PRIVATE" || true
}

# Every blob of private/app is in the cache now (alice pulled it: she gets each one again without
# an upstream blob GET); bob and an anonymous caller asking for one by digest are refused all
# the same.
check_blobs_refused() {
  local client=$1 d code codes=() who c gets0 gets mine=()
  gets0=$(python3 "$HERE/util.py" front "$T/logs/ca-up-front-requests.jsonl" blob-gets)
  for d in $CA_BLOBS; do
    mine+=("$(curl -s -o /dev/null -w '%{http_code}' -u "$CA_A:$CA_A_PASS" "http://$MIRROR/v2/${CA_PRIVATE%%:*}/blobs/$d")")
  done
  sleep 0.5   # the front logs a request when its response completes
  gets=$(( $(python3 "$HERE/util.py" front "$T/logs/ca-up-front-requests.jsonl" blob-gets) - gets0 ))
  if printf '%s\n' "${mine[@]}" | grep -qv '^200$' || [ "$gets" -ne 0 ]; then
    record "$client" "$CA_PRIVATE" "clientauth: cached blobs refused to $CA_B and anonymous" FAIL "not all cached: $CA_A got HTTP ${mine[*]}, upstream blob GETs +$gets"
    return
  fi
  for who in B anon; do
    c=$(creds "$who")
    for d in $CA_BLOBS; do
      code=$(curl -s -o "$T/clientauth/body-$client-$who-${d#sha256:}" -w '%{http_code}' ${c:+-u "$c"} \
        "http://$MIRROR/v2/${CA_PRIVATE%%:*}/blobs/$d")
      codes+=("$code")
    done
  done
  local detail="$CA_A from the cache: HTTP ${mine[*]}, upstream blob GETs +0; $CA_B, anonymous: HTTP ${codes[*]}"
  if ! printf '%s\n' "${codes[@]}" | grep -qv '^40[13]$'; then
    record "$client" "$CA_PRIVATE" "clientauth: cached blobs refused to $CA_B and anonymous" PASS "$detail"
  else
    record "$client" "$CA_PRIVATE" "clientauth: cached blobs refused to $CA_B and anonymous" FAIL "$detail"
  fi
}

# No password of alice or bob, nor their Basic form, in the mirror's log, the error bodies it
# sent, its status page or its metrics.
check_no_credentials() {
  local client=$1 secrets s where=() hits=0 f lines
  curl -s "http://$MIRROR/_pullthrough/status" >"$T/clientauth/status-$client.json"
  curl -s "http://$MIRROR/metrics" >"$T/clientauth/metrics-$client.txt"
  # A token answer is not an error body, but it must not carry the credentials either.
  curl -s -u "$CA_A:$CA_A_PASS" "http://$MIRROR/_pullthrough/token?service=pullthrough" >"$T/clientauth/body-$client-token"
  curl -s -u "$CA_B:$CA_B_PASS" "http://$MIRROR/v2/${CA_PRIVATE%:*}/manifests/${CA_PRIVATE#*:}" >"$T/clientauth/body-$client-manifest-B"
  curl -s "http://$MIRROR/v2/${CA_PRIVATE%:*}/manifests/${CA_PRIVATE#*:}" >"$T/clientauth/body-$client-manifest-anon"
  secrets=("$CA_A_PASS" "$CA_B_PASS" "$(printf %s "$CA_A:$CA_A_PASS" | base64 -w0)" "$(printf %s "$CA_B:$CA_B_PASS" | base64 -w0)")
  local files=("$T/logs/ca-mirror-$client.log" "$T/clientauth/status-$client.json" "$T/clientauth/metrics-$client.txt"
    "$T/clientauth/body-$client"-*)
  for f in "${files[@]}"; do
    for s in "${secrets[@]}"; do
      if grep -qF -- "$s" "$f"; then hits=$((hits + 1)); where+=("$(basename "$f")"); fi
    done
  done
  lines=$(wc -l <"$T/logs/ca-mirror-$client.log")
  local debug
  debug=$(grep -c '"level":"DEBUG"\|"level":"TRACE"' "$T/logs/ca-mirror-$client.log" || true)
  if [ "$hits" -eq 0 ] && [ "$debug" -gt 0 ]; then
    record "$client" - "clientauth: 0 credentials in log, bodies, status, metrics" PASS "$lines log lines ($debug debug/trace), ${#files[@]} files"
  else
    record "$client" - "clientauth: 0 credentials in log, bodies, status, metrics" FAIL "$hits hits in ${where[*]:-nothing}; $debug debug/trace lines of $lines"
  fi
}

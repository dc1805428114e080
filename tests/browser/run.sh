#!/usr/bin/env bash
# The status page in a real browser: headless Chromium (Debian's `chromium`, installed here if
# missing) loads http://mirror/ while a blob download is held half-way by a fake upstream,
# and the numbers the page shows must be those of /_pullthrough/status; a screenshot is saved.
#
#   tests/browser/run.sh [--install]    # --install only installs chromium
#
# PULLTHROUGH_BIN picks the binary (default: target/release/pullthrough, built if missing);
# BROWSER_OUT where the screenshot and DOM go (default: a temp dir, printed).
set -euo pipefail
cd "$(dirname "$0")/../.."

install() {
  if ! command -v chromium > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium > /dev/null \
      || { apt-get update -q > /dev/null && apt-get install -y -q --no-install-recommends chromium > /dev/null; }
  fi
}
install
[[ "${1:-}" == "--install" ]] && exit 0

target="${CARGO_TARGET_DIR:-target}"
bin="${PULLTHROUGH_BIN:-$target/release/pullthrough}"
if [[ -z "${PULLTHROUGH_BIN:-}" ]]; then
  cargo build --release --quiet --bin pullthrough
fi
work="$(mktemp -d)"
out="${BROWSER_OUT:-$work/out}"
mkdir -p "$out"
pids=()
cleanup() {
  touch "$work/release"
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  [[ -n "${BROWSER_OUT:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT

python3 tests/browser/fake_upstream.py "$work/upstream.port" "$work/release" &
pids+=($!)
for _ in $(seq 100); do [[ -f "$work/upstream.port" ]] && break; sleep 0.1; done
upstream="http://127.0.0.1:$(cat "$work/upstream.port")"

cat > "$work/mirror.toml" <<TOML
[storage]
dir = "$work/data"
max_size = "1GiB"
[upstreams."docker.io"]
url = "$upstream"
[[pin]]
image = "library/demo:latest"
TOML
"$bin" --config "$work/mirror.toml" --listen 127.0.0.1:0 --log-format json 2> "$work/mirror.log" &
pids+=($!)
mirror=""
for _ in $(seq 100); do
  mirror="$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try: v = json.loads(line)
    except ValueError: continue
    if v.get("fields", {}).get("message") == "pullthrough listening": print(v["fields"]["addr"]); break
' "$work/mirror.log")"
  [[ -n "$mirror" ]] && break
  sleep 0.1
done
[[ -n "$mirror" ]] || { cat "$work/mirror.log"; echo "the mirror did not start" >&2; exit 1; }
mirror="http://$mirror"

# A pull: the manifest (twice: a miss, then a hit), the config blob, and the layer, which the
# upstream holds at 1 MiB of 4 MiB.
accept="application/vnd.oci.image.manifest.v1+json"
manifest="$(curl -fsS -H "Accept: $accept" "$mirror/v2/library/demo/manifests/latest")"
curl -fsS -o /dev/null -H "Accept: $accept" "$mirror/v2/library/demo/manifests/latest"
read -r config layer < <(python3 -c '
import json, sys
m = json.loads(sys.argv[1]); print(m["config"]["digest"], m["layers"][0]["digest"])' "$manifest")
curl -fsS -o /dev/null "$mirror/v2/library/demo/blobs/$config"
curl -fsS -o "$work/layer" "$mirror/v2/library/demo/blobs/$layer" &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS "$mirror/_pullthrough/status" | python3 -c '
import json, sys
d = json.load(sys.stdin)["downloads"]
sys.exit(0 if d and d[0]["written"] == 1 << 20 else 1)' && break
  sleep 0.1
done

chromium_run() {
  rm -rf "$work/profile"
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/profile" --window-size=1280,1100 --virtual-time-budget=5000 "$@" \
    2> "$work/chromium.log"
}
chromium_run --dump-dom "$mirror/" > "$out/page.html"
chromium_run --screenshot="$out/status-page.png" "$mirror/_pullthrough/ui" > /dev/null
curl -fsS "$mirror/_pullthrough/status" > "$out/status.json"

python3 - "$out/page.html" "$out/status.json" "$layer" <<'PY'
import json, sys
from html.parser import HTMLParser

class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.by_id, self.downloads, self.repos, self.upstreams = {}, [], [], []
        self.polls = 0
        self.members, self.cluster_shown = [], None
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.polls = int(a.get("data-polls") or 0)
        if "id" in a and "data-value" in a:
            self.by_id[a["id"]] = a["data-value"]
        if "data-digest" in a:
            self.downloads.append((a["data-digest"], int(a["data-written"])))
        if "data-repository" in a:
            self.repos.append(a["data-repository"])
        if "data-member" in a:
            self.members.append(a["data-member"])
        if tag == "section" and a.get("id") == "cluster":
            self.cluster_shown = "hidden" not in a
        if "data-upstream" in a:
            self.upstreams.append((a["data-upstream"], a["data-remaining"], a["data-limit"]))

page = Page()
page.feed(open(sys.argv[1]).read())
s = json.load(open(sys.argv[2]))
layer = sys.argv[3]
problems = []
def same(what, shown, want):
    if str(shown) != str(want):
        problems.append(f"{what}: page shows {shown!r}, status says {want!r}")
assert page.polls >= 1, "the page never polled the status"
ratio = s["cache_hit_ratio"]
same("hit ratio", page.by_id.get("hit-ratio"), "" if ratio is None else ratio)
same("served from cache", page.by_id.get("served-cache"), s["totals"]["bytes_cache"])
same("served from upstream", page.by_id.get("served-upstream"), s["totals"]["bytes_upstream"])
same("lookups", page.by_id.get("lookups"), s["totals"]["lookups"])
same("cache size", page.by_id.get("cache-size"), s["cache"]["bytes"])
same("cache bound", page.by_id.get("cache-max"), s["cache"]["max_bytes"])
same("cache entries", page.by_id.get("cache-entries"), s["cache"]["entries"])
pins = s["cache"]["pins"]
same("pins", page.by_id.get("pins-count"), len(pins["config"]) + len(pins["runtime"]))
same("pinned files", page.by_id.get("pins-files"), pins["files"])
same("pinned bytes", page.by_id.get("pins-bytes"), pins["bytes"])
# The manifest and the config blob; the held layer is not committed yet.
same("pinned files of the demo image", pins["files"], 2)
# Free space moves between the page's poll and this reading: both must have one.
if not (int(page.by_id.get("disk-free") or 0) > 0 and (s["cache"]["disk_free_bytes"] or 0) > 0):
    problems.append(f"free space: page {page.by_id.get('disk-free')!r}, status {s['cache']['disk_free_bytes']!r}")
same("downloads in flight", page.by_id.get("inflight"), len(s["downloads"]))
same("downloads", page.downloads, [(d["digest"], d["written"]) for d in s["downloads"]])
same("the held layer", page.downloads, [(layer, 1 << 20)])
for shown, key in [("started", "started"), ("held", "held"), ("in-flight", "in_flight"),
                   ("failed", "failed"), ("no-space", "no_space"), ("skipped", "skipped"),
                   ("queued", "queued"), ("running", "running")]:
    same("prefetch " + key, page.by_id.get("prefetch-" + shown), s["prefetch"][key])
same("upstreams", page.upstreams,
     [(u["name"], str(u["remaining"]), str(u["limit"])) for u in s["upstreams"]])
same("pull budget", page.upstreams[0][1:] if page.upstreams else None, ("97", "100"))
top = [r["repository"] for r in s["top_repositories"]["by_requests"]]
same("top repositories", page.repos[:len(top)], top)
same("cache bound", s["cache"]["max_bytes"], 1 << 30)
cluster = s.get("cluster")
same("cluster section shown", page.cluster_shown, cluster is not None)
same("cluster members", page.members, cluster["members"] if cluster else [])
if cluster:
    same("cluster coordinator", page.by_id.get("cluster-coordinator"), cluster["coordinator"])
    same("leases held", page.by_id.get("cluster-leases"), cluster["leases_held"])
    shared = cluster["shared"]
    same("shared tier size", page.by_id.get("shared-size"), shared["bytes"] if shared else "")
if problems:
    sys.exit("status page does not match /_pullthrough/status:\n  " + "\n  ".join(problems))
print(f"status page matches /_pullthrough/status ({page.polls} polls)")
PY
[[ -s "$out/status-page.png" ]] || { cat "$work/chromium.log"; echo "no screenshot" >&2; exit 1; }

# Let the pull finish: the layer arrives whole.
touch "$work/release"
wait "${pids[2]}"
[[ "$(sha256sum < "$work/layer" | cut -d' ' -f1)" == "${layer#sha256:}" ]]
echo "browser test: ok (screenshot: $out/status-page.png)"

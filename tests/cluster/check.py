#!/usr/bin/env python3
"""The cluster suite's checks (stdlib only). Checks append rows to the suite's results.tsv
(CLIENT, IMAGE, CHECK, PASS|FAIL, DETAIL: the table of tests/clients/util.py).

    check.py largest-blob LAYOUT DIGEST       "digest size" of the image's largest blob
    check.py progress URL                     body bytes of the front's biggest transfer now
    check.py wait-progress URL N SECONDS      returns (printing its bytes) once a transfer has
                                              sent N body bytes; exit 1 after SECONDS
    check.py kill-leader-at FRONT N SECONDS PID=URL...
                                              once the upstream sends, finds the one replica
                                              (its pid and URL) that asked it for a blob, and
                                              kills it (SIGKILL) as soon as N body bytes are
                                              sent; prints "INDEX BYTES" (1-based)
    check.py front-idle URL                   exit 0 when the front has no transfer running
    check.py front-paths LOG SKIP             the requests logged after the first SKIP lines
    check.py fanout RESULTS IMAGE LOG BLOB LEADER FETCH...
    check.py takeover RESULTS IMAGE LOG BLOB LEADER FETCH...
    check.py clients-ok RESULTS IMAGE CHECK FETCH...
    check.py one-body RESULTS LOG SKIP BLOB IMAGE CHECK
    check.py one-body-per-blob RESULTS LOG IMAGE [NOTE]
    check.py members RESULTS N SECONDS URL... every replica's status JSON ("cluster": members)
                                              and pullthrough_cluster_members say N, within
                                              SECONDS (heartbeats)

LOG is a front.py request log, BLOB "digest size", LEADER the replica (1-based) that fetched
from the upstream ("" if none could be told), FETCH one bench/tools/fetch.py result per
replica, in replica order.
"""
import json
import os
import signal
import sys
import time
import urllib.request

FOLLOWER_TTFB = 0.050   # seconds after the upstream's own first byte
MAX_UPSTREAM = 2.0      # x the blob's size, when the lease holder dies


def blobs_of(layout, digest):
    """(digest, size) of every config and layer the manifest or index `digest` names."""
    path = os.path.join(layout, "blobs", *digest.split(":"))
    doc = json.load(open(path))
    if "manifests" in doc:
        return [b for m in doc["manifests"] for b in blobs_of(layout, m["digest"])]
    return [(d["digest"], d["size"]) for d in [doc["config"]] + doc["layers"]]


def active(url):
    with urllib.request.urlopen(url + "/_front/active", timeout=5) as resp:
        return [t for t in json.load(resp) if "/blobs/" in t["path"]]


def blob_gets(url):
    """The replica's upstream blob GETs so far, from its /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pullthrough_upstream_requests_total{") and 'kind="blob_get"' in line)


def kill_leader_at(front, n, seconds, replicas):
    """One process, polling every 20 ms, so the kill lands close to the mark even on a busy
    machine (a process start per poll would not)."""
    end = time.monotonic() + float(seconds)
    pids = [(int(r.split("=", 1)[0]), r.split("=", 1)[1]) for r in replicas]
    leader = None
    while time.monotonic() < end:
        sent = max((t["bytes"] for t in active(front)), default=0)
        if leader is None and sent > 0:
            asked = [i for i, (_, url) in enumerate(pids, 1) if blob_gets(url) > 0]
            if len(asked) != 1:
                print(f"replicas that asked the upstream: {asked}", file=sys.stderr)
                return 1
            leader = asked[0]
        if leader is not None and sent >= int(n):
            os.kill(pids[leader - 1][0], signal.SIGKILL)
            print(leader, sent)
            return 0
        time.sleep(0.02)
    print("the upstream did not get there in time", file=sys.stderr)
    return 1


def records(log, skip=0):
    with open(log) as f:
        lines = [line for line in f if line.strip()]
    return [json.loads(line) for line in lines[skip:]]


def bodies(recs, digest):
    """The GETs of `digest` that sent body bytes."""
    return [r for r in recs if r["method"] == "GET" and r["path"].split("?")[0].endswith("/blobs/" + digest)
            and r["bytes"] > 0]


def fetches(paths):
    """Per replica (1-based): its clients' results, or None when the file is missing/empty."""
    out = {}
    for i, p in enumerate(paths, 1):
        try:
            out[i] = json.load(open(p))["clients"]
        except (OSError, ValueError, KeyError):
            out[i] = None
    return out


class Results:
    def __init__(self, path):
        self.path = path

    def add(self, client, image, check, ok, detail):
        verdict = "PASS" if ok else "FAIL"
        with open(self.path, "a") as f:
            f.write("\t".join([client, image, check, verdict, detail]) + "\n")
        print(f"{verdict}  {client} {image}: {check} ({detail})", file=sys.stderr)


def verified(clients):
    """(ok, total, the distinct errors) of one replica's clients."""
    if clients is None:
        return 0, 0, ["no result"]
    errors = sorted({c["error"] for c in clients if c["error"]})
    return sum(1 for c in clients if not c["error"]), len(clients), errors


def whole_once(got, sent, size):
    """One whole body of the blob for the fleet: a single GET without a Range or from its
    first byte (a download in parts adds the other parts' ranges), and about the blob's
    size in all (a part's connection closed at its end may have carried a little more)."""
    whole = [r for r in got if (r["range"] or "bytes=0-").startswith("bytes=0-")]
    return len(whole) == 1 and size <= sent <= size * 1.1


def upstream_line(recs, digest, size):
    got = bodies(recs, digest)
    sent = sum(r["bytes"] for r in got)
    ranges = [r["range"] for r in got if r["range"]]
    text = f"{len(got)} upstream bodies, {sent / size:.2f} x the blob"
    if ranges:
        text += f", Range: {', '.join(ranges)}"
    return got, sent, text


def fanout(results, image, log, blob, leader, paths):
    digest, size = blob.split()[0], int(blob.split()[1])
    r = Results(results)
    recs = records(log)
    got, sent, line = upstream_line(recs, digest, size)
    r.add("cluster", image, "upstream sent one body", whole_once(got, sent, size), line)
    # The download's own answer confirms the repository for every client that joins it: a
    # client that asked the upstream a HEAD of its own would wait for that round trip.
    heads = [x for x in recs if x["method"] == "HEAD" and x["path"].endswith(f"/blobs/{digest}")]
    r.add("cluster", image, "no client asked the upstream a HEAD", not heads,
          f"{len(heads)} blob HEADs upstream")
    per = fetches(paths)
    ok = sum(verified(c)[0] for c in per.values())
    total = sum(verified(c)[1] for c in per.values())
    errors = sorted({e for c in per.values() for e in verified(c)[2]})
    r.add("cluster", image, "every body verifies (sha256)", total > 0 and ok == total,
          f"{ok}/{total} verified" + (f"; errors: {'; '.join(errors)}" if errors else ""))
    first = min((x["first_byte"] for x in got if x.get("first_byte")), default=None)
    if not leader or first is None:
        r.add("cluster", image, "followers' first byte within 50 ms of the upstream's", False,
              "no single lease holder" if not leader else "the upstream sent no body")
        return
    lags = [(c["first_byte_at"] - first, i) for i, cs in per.items() if i != int(leader) and cs
            for c in cs if c.get("first_byte_at")]
    missing = sum(1 for i, cs in per.items() if i != int(leader) for c in (cs or []) if not c.get("first_byte_at"))
    worst = max(lags, default=(None, None))
    ok = bool(lags) and missing == 0 and worst[0] <= FOLLOWER_TTFB
    lead_lags = [c["first_byte_at"] - first for c in (per.get(int(leader)) or []) if c.get("first_byte_at")]
    detail = (f"leader r{leader}; {len(lags)} follower clients, worst +{worst[0] * 1000:.1f} ms (r{worst[1]})"
              if lags else f"leader r{leader}; no follower client got a byte")
    released = [json.load(open(p))["summary"].get("started_at") for p in paths if os.path.exists(p)]
    released = [t for t in released if t]
    if released:
        detail += f"; clients released within {(max(released) - min(released)) * 1000:.1f} ms"
    if missing:
        detail += f", {missing} without any byte"
    if lead_lags:
        detail += f"; leader's own clients worst +{max(lead_lags) * 1000:.1f} ms"
    r.add("cluster", image, "followers' first byte within 50 ms of the upstream's", ok, detail)


def takeover(results, image, log, blob, leader, paths):
    digest, size = blob.split()[0], int(blob.split()[1])
    r = Results(results)
    recs = records(log)
    got, sent, line = upstream_line(recs, digest, size)
    aborted = sum(1 for x in got if x.get("aborted"))
    r.add("cluster", image, "upstream sent at most 2 x the blob", 0 < sent <= MAX_UPSTREAM * size,
          f"{line}; {aborted} cut off by the kill")
    per = fetches(paths)
    survivors = {i: c for i, c in per.items() if i != int(leader)}
    ok = sum(verified(c)[0] for c in survivors.values())
    total = sum(verified(c)[1] for c in survivors.values())
    errors = sorted({e for c in survivors.values() for e in verified(c)[2]})
    r.add("cluster", image, "other replicas' clients get the whole blob", total > 0 and ok == total,
          f"{ok}/{total} verified on " + ", ".join(f"r{i}" for i in survivors)
          + (f"; errors: {'; '.join(errors)}" if errors else ""))
    killed = verified(per.get(int(leader)))
    print(f"note: the killed replica r{leader}'s clients: {killed[0]}/{killed[1]} complete", file=sys.stderr)


def clients_ok(results, image, check, paths):
    r = Results(results)
    per = fetches(paths)
    ok = sum(verified(c)[0] for c in per.values())
    total = sum(verified(c)[1] for c in per.values())
    errors = sorted({e for c in per.values() for e in verified(c)[2]})
    r.add("cluster", image, check, total > 0 and ok == total,
          f"{ok}/{total} bodies verified" + (f"; errors: {'; '.join(errors)}" if errors else ""))


def one_body(results, log, skip, blob, image, check):
    digest, size = blob.split()[0], int(blob.split()[1])
    got, sent, line = upstream_line(records(log, int(skip)), digest, size)
    Results(results).add("cluster", image, check, whole_once(got, sent, size), line)


def one_body_per_blob(results, log, image, note=""):
    per = {}
    for rec in records(log):
        # Whole bodies: a download in parts adds ranges from further on.
        whole = (rec.get("range") or "bytes=0-").startswith("bytes=0-")
        if rec["method"] == "GET" and "/blobs/sha256:" in rec["path"] and rec["bytes"] > 0 and whole:
            d = rec["path"].split("?")[0].rsplit("/", 1)[-1]
            per[d] = per.get(d, 0) + 1
    worst = max(per.values(), default=0)
    Results(results).add("cluster", image, "one upstream body per blob", bool(per) and worst == 1,
                         f"{len(per)} blobs, {sum(per.values())} bodies, at most {worst} per blob"
                         + (f"; {note}" if note else ""))


def members_of(url):
    """(members in the status JSON, the members gauge) of one replica; None where absent."""
    try:
        with urllib.request.urlopen(url + "/_pullthrough/status", timeout=5) as resp:
            listed = (json.load(resp).get("cluster") or {}).get("members")
    except (OSError, ValueError):
        listed = None
    if isinstance(listed, list):
        listed = len(listed)
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            gauge = [float(line.split()[-1]) for line in resp.read().decode().splitlines()
                     if line.startswith("pullthrough_cluster_members ")]
    except OSError:
        gauge = []
    return listed, int(gauge[0]) if gauge else None


def members(results, n, seconds, urls):
    end = time.monotonic() + float(seconds)
    while True:
        seen = [members_of(u) for u in urls]
        ok = all(s == (int(n), int(n)) for s in seen)
        if ok or time.monotonic() >= end:
            break
        time.sleep(0.5)
    detail = ", ".join(f"r{i}: status {s[0]}, gauge {s[1]}" for i, s in enumerate(seen, 1))
    Results(results).add("cluster", "-", f"{n} members in status and metrics", ok, detail)


def front_paths(log, skip):
    recs = records(log, int(skip))
    shown = [f"{r['method']} {r['path'].split('?')[0][-40:]} {r['status']}" for r in recs[:4]]
    return "; ".join(shown) + (f"; +{len(recs) - 4} more" if len(recs) > 4 else "") if recs else "none"


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "largest-blob":
        digest, size = max(blobs_of(*args), key=lambda b: b[1])
        print(digest, size)
    elif cmd == "progress":
        print(max((t["bytes"] for t in active(args[0])), default=0))
    elif cmd == "wait-progress":
        end = time.monotonic() + float(args[2])
        while time.monotonic() < end:
            done = [t["bytes"] for t in active(args[0]) if t["bytes"] >= int(args[1])]
            if done:
                print(max(done))
                return 0
            time.sleep(0.02)
        return 1
    elif cmd == "kill-leader-at":
        return kill_leader_at(args[0], args[1], args[2], args[3:])
    elif cmd == "front-idle":
        return 0 if not active(args[0]) else 1
    elif cmd == "front-paths":
        print(front_paths(*args))
    elif cmd in ("fanout", "takeover"):
        (fanout if cmd == "fanout" else takeover)(*args[:5], args[5:])
    elif cmd == "clients-ok":
        clients_ok(args[0], args[1], args[2], args[3:])
    elif cmd == "one-body":
        one_body(*args)
    elif cmd == "members":
        members(args[0], args[1], args[2], args[3:])
    elif cmd == "one-body-per-blob":
        one_body_per_blob(*args)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

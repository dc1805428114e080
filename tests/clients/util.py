#!/usr/bin/env python3
"""Small helpers for run.sh (stdlib only); each prints one answer on stdout.

    util.py ports N                    N distinct free 127.0.0.1 TCP ports
    util.py metric URL NAME [K=V ...]  sum of the samples of NAME (with those labels) at URL
    util.py front LOG WHAT             from a front.py log: requests, blob-gets, distinct-blobs,
                                       max-gets-per-blob, cuts, range-gets, blob-bytes (body
                                       bytes of blob GETs), first-body-byte (Unix time, the
                                       earliest), per-blob (JSON: digest -> bodies, bytes)
    util.py registry-blob-gets LOG     blob GETs in a docker-registry access log
    util.py counts LOG FROM FIELD [S]  of a JSON-lines log from line FROM (1-based) on (only
                                       the lines containing S): how many hold each value of
                                       FIELD ("VALUE=N ...", null as "-", sorted)
    util.py table RESULTS              the pass/fail tables; exit 1 if anything failed
"""
import json
import random
import re
import socket
import sys
import urllib.request
from collections import Counter, OrderedDict, defaultdict


def free_ports(n):
    """Random ports below the kernel's ephemeral range, each checked free by binding it.

    Below the ephemeral range, no outgoing connection (of which this suite makes many)
    can be handed the port between this check and the service binding it; random picks
    keep two suites running at once from choosing the same ones.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    picked = []
    while len(picked) < n:
        port = random.randrange(20000, max(low, 20001 + n))
        if port in picked:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        picked.append(port)
    return picked


def parse_labels(text):
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text or ""))


def metric(url, name, wanted):
    """Sums every sample of `name` whose labels include `wanted` (0 when there is none)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?", line)
        if not m or m.group(1) != name:
            continue
        labels = parse_labels(m.group(2))
        if all(labels.get(k) == v for k, v in wanted.items()):
            total += float(m.group(3))
    return int(total) if total.is_integer() else total


def front_stats(log_path):
    records = [json.loads(line) for line in open(log_path) if line.strip()]
    blob_gets = [r for r in records if r["method"] == "GET" and "/blobs/sha256:" in r["path"]]
    per_blob = Counter(r["path"].split("?")[0] for r in blob_gets)
    # A whole body: no Range, or from the first byte (a download in parts asks `bytes=0-`
    # first, then the other parts from further on).
    full_per_blob = Counter(
        r["path"].split("?")[0] for r in blob_gets if (r["range"] or "bytes=0-").startswith("bytes=0-")
    )
    bodies = defaultdict(lambda: {"bodies": 0, "bytes": 0})
    for r in blob_gets:
        b = bodies[r["path"].split("?")[0].rsplit("/", 1)[-1]]
        b["bodies"] += 1 if r["bytes"] else 0
        b["bytes"] += r["bytes"]
    first = [r["first_byte"] for r in blob_gets if r.get("first_byte")]
    return {
        "requests": len(records),
        "blob-gets": len(blob_gets),
        "distinct-blobs": len(per_blob),
        "max-gets-per-blob": max(per_blob.values(), default=0),
        "max-full-gets-per-blob": max(full_per_blob.values(), default=0),
        "cuts": sum(1 for r in records if r["cut"]),
        "range-gets": sum(1 for r in blob_gets if r["range"]),
        "blob-bytes": sum(r["bytes"] for r in blob_gets),
        "first-body-byte": min(first, default=0),
        "per-blob": json.dumps(bodies, sort_keys=True),
    }


def registry_blob_gets(log_path):
    pattern = re.compile(r'"GET /v2/\S+/blobs/sha256:[0-9a-f]{64} HTTP/[\d.]+" \d{3} ')
    with open(log_path, errors="replace") as f:
        return sum(1 for line in f if pattern.search(line))


def field_counts(log_path, start, field, containing=""):
    with open(log_path) as f:
        lines = [line for line in f.readlines()[start - 1:] if line.strip() and containing in line]
    counts = Counter(json.loads(line).get(field) for line in lines)
    return " ".join(f"{'-' if v is None else v}={n}" for v, n in sorted(counts.items(), key=lambda kv: str(kv[0])))


def table(results_path):
    """Every check, then a check x client matrix with a verdict per client; 1 if any failed."""
    rows = [(line.rstrip("\n").split("\t") + [""] * 5)[:5] for line in open(results_path) if line.strip()]
    heads = ["CLIENT", "IMAGE", "CHECK", "RESULT", "DETAIL"]
    print()
    print_columns([heads] + rows)

    counts = defaultdict(Counter)  # (check, client) -> results
    for client, _, check, result, _ in rows:
        counts[check, client][result] += 1
    checks = list(OrderedDict.fromkeys(r[2] for r in rows))
    clients = list(OrderedDict.fromkeys(r[0] for r in rows))
    matrix = [["CHECK"] + clients]
    for check in checks:
        matrix.append([check] + [summary(counts[check, client]) for client in clients])
    failed = [c for c in clients if any(counts[k, c]["FAIL"] for k in checks)]
    matrix.append(["VERDICT"] + ["FAIL" if c in failed else "PASS" for c in clients])
    print()
    print_columns(matrix)
    print()
    return 1 if failed else 0


def summary(results):
    """One matrix cell: '5/5' passed, 'FAIL 1/5', 'skip', or '-' when not applicable."""
    n = sum(results.values())
    if n == 0:
        return "-"
    if results["FAIL"]:
        return f"FAIL {results['FAIL']}/{n}"
    if results["PASS"]:
        return f"{results['PASS']}/{n}" + (f" +{results['SKIP']} skip" if results["SKIP"] else "")
    return "skip"


def print_columns(rows):
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "ports":
        print(" ".join(map(str, free_ports(int(argv[2])))))
    elif cmd == "metric":
        print(metric(argv[2], argv[3], dict(kv.split("=", 1) for kv in argv[4:])))
    elif cmd == "front":
        print(front_stats(argv[2])[argv[3]])
    elif cmd == "registry-blob-gets":
        print(registry_blob_gets(argv[2]))
    elif cmd == "counts":
        print(field_counts(argv[2], int(argv[3]), argv[4], *argv[5:6]))
    elif cmd == "table":
        return table(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

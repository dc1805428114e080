#!/usr/bin/env python3
"""Small helpers for run.sh (stdlib only); each prints one answer on stdout.

    util.py ports N                    N distinct free 127.0.0.1 TCP ports
    util.py metric URL NAME [K=V ...]  sum of the samples of NAME (with those labels) at URL
    util.py front LOG WHAT             from a front.py log: blob-gets, distinct-blobs,
                                       max-gets-per-blob, cuts, range-gets
    util.py registry-blob-gets LOG     blob GETs in a docker-registry access log
    util.py table RESULTS              the pass/fail tables; exit 1 if anything failed
"""
import json
import random
import re
import socket
import sys
import urllib.request
from collections import Counter, defaultdict, OrderedDict


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
    return {
        "blob-gets": len(blob_gets),
        "distinct-blobs": len(per_blob),
        "max-gets-per-blob": max(per_blob.values(), default=0),
        "cuts": sum(1 for r in records if r["cut"]),
        "range-gets": sum(1 for r in blob_gets if r["range"]),
    }


def registry_blob_gets(log_path):
    pattern = re.compile(r'"GET /v2/\S+/blobs/sha256:[0-9a-f]{64} HTTP/[\d.]+" \d{3} ')
    with open(log_path, errors="replace") as f:
        return sum(1 for line in f if pattern.search(line))


def table(results_path):
    """The full list of checks, then a client x check matrix. Returns the exit status."""
    rows = [line.rstrip("\n").split("\t") for line in open(results_path) if line.strip()]
    rows = [(r + [""] * 5)[:5] for r in rows]  # client, image, check, result, detail
    widths = [max(len(r[i]) for r in rows + [["CLIENT", "IMAGE", "CHECK", "RESULT"]]) for i in range(4)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(["CLIENT", "IMAGE", "CHECK", "RESULT"], widths)) + "  DETAIL")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])

    matrix = defaultdict(lambda: defaultdict(Counter))
    checks = list(OrderedDict.fromkeys(r[2] for r in rows))
    for client, _, check, result, _ in rows:
        matrix[client][check][result] += 1
    cell = {}
    for client in matrix:
        for check in checks:
            c = matrix[client][check]
            n = sum(c.values())
            if n == 0:
                cell[client, check] = "-"
            elif c["FAIL"]:
                cell[client, check] = f"FAIL {c['FAIL']}/{n}"
            elif c["PASS"]:
                cell[client, check] = f"PASS {c['PASS']}/{n}" + (f" +{c['SKIP']} skip" if c["SKIP"] else "")
            else:
                cell[client, check] = "SKIP"
    clients = list(matrix)
    first = max(len(c) for c in clients + ["CLIENT"])
    col = {k: max(len(k), *(len(cell[c, k]) for c in clients)) for k in checks}
    print()
    print("CLIENT".ljust(first) + "  " + "  ".join(k.ljust(col[k]) for k in checks) + "  VERDICT")
    failed = False
    for client in clients:
        bad = any(matrix[client][k]["FAIL"] for k in checks)
        failed |= bad
        verdict = "FAIL" if bad else "PASS"
        print(client.ljust(first) + "  " + "  ".join(cell[client, k].ljust(col[k]) for k in checks) + "  " + verdict)
    print()
    return 1 if failed else 0


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
    elif cmd == "table":
        return table(argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

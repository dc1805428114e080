#!/usr/bin/env python3
"""Prints the result tables of bench/singleflight.sh, hotpath.sh, soak.sh, cluster.sh and
coldpath.sh (stdlib only).

    report.py singleflight RESULTS_DIR
    report.py hotpath RESULTS_DIR
    report.py soak RESULTS_DIR
    report.py cluster RESULTS_DIR
    report.py coldpath RESULTS_DIR

Reads the JSON files the scripts leave in RESULTS_DIR and prints a plain-text table with the
ratios against the references measured in the same run, then how each target fared.
"""
import glob, json, os, re, statistics, sys

MiB = 1 << 20
NAMES = {"pullthrough": "pullthrough", "nginx": "nginx proxy_cache_lock", "registry": "registry:2 proxy"}


def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def table(header, rows, left=1):
    """Columns right-aligned except the first `left` ones."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def fmt(r):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells[1:]]
    return "\n".join(out)


def metric(text, name, labels=""):
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text or "", re.M)
    return float(m[1]) if m else None


def other_load(res):
    d = load(f"{res}/load.json")
    if d and d["wall_s"]:
        pct = 100 * d["other_cpu_s"] / (d["wall_s"] * d["cpus"])
        warn = "  <- figures are unreliable" if pct > 10 else ""
        print(f"other processes on this machine used {pct:.0f}% of its CPU time during the run{warn}")


def verdict(ok):
    return "MEETS" if ok else "MISSES"


# ---------------------------------------------------------------- single-flight

def upstream_counts(stats):
    gets = blob_bytes = other = 0
    for key, v in (stats or {}).get("paths", {}).items():
        method, path = key.split(" ", 1)
        if method == "GET" and "/blobs/" in path:
            gets += v["requests"]
            blob_bytes += v["bytes"]
        else:
            other += v["requests"]
    return gets, blob_bytes, other


def singleflight(res):
    setup, run = load(f"{res}/setup.json"), load(f"{res}/run.json")
    size, deadline = run["size"], run["deadline"]
    ttfbs = [load(p)["summary"]["ttfb_median"] for p in sorted(glob.glob(f"{res}/upstream-ttfb-*.json"))]
    ttfbs = [t for t in ttfbs if t is not None]
    up_ttfb = statistics.median(ttfbs) if ttfbs else None
    print(f"\nsingle-flight: {size / MiB:.0f} MiB blob, N cold clients at once, upstream capped at "
          f"{setup['rate'] / MiB:.0f} MiB/s ({'auto' if setup['rate_mode'] == 'auto' else 'set'}); "
          f"{os.cpu_count()} CPUs")
    print(f"ceiling: {setup['ceiling_by']} to {setup['ceiling_clients']} hashing clients = "
          f"{setup['ceiling'] / MiB:.0f} MiB/s in all; N x cap stays below it")
    other_load(res)
    if ttfbs:
        print(f"upstream's own TTFB (direct, {len(ttfbs)} GETs): median {up_ttfb * 1000:.1f} ms, "
              f"max {max(ttfbs) * 1000:.1f} ms")
    header = ["system", "N", "ok", "upstream GETs", "other up. reqs", "up. bytes / blob",
              "slowest client s", "vs 1 client", "TTFB med ms", "TTFB max ms"]
    rows, ours, notes = [], {}, []
    for sys_ in run["systems"].split():
        base = None
        for n in map(int, run["clients"].split()):
            f = load(f"{res}/{sys_}-{n}.fetch.json")
            if not f:
                continue
            s = f["summary"]
            stats = load(f"{res}/{sys_}-{n}.upstream.json", {})
            gets, blob_bytes, other = upstream_counts(stats)
            cut = "deadline" in s["errors"] or stats.get("active", 0) > 0
            ge = ">=" if cut else ""
            wall = s["wall_max"]
            if n == 1 and not cut:
                base = wall
            ratio = f"{ge}{wall / base:.2f}" if base else "-"
            wall_s = f">{deadline}" if "deadline" in s["errors"] else f"{wall:.2f}"
            ms = lambda v: f"{v * 1000:.1f}" if v is not None else "-"
            rows.append([NAMES[sys_], n, f"{s['ok']}/{s['clients']}", gets, other,
                         f"{ge}{blob_bytes / size:.2f}", wall_s, ratio, ms(s["ttfb_median"]), ms(s["ttfb_max"])])
            other_errors = [e for e in s["errors"] if e != "deadline"]
            if other_errors:
                notes.append(f"{NAMES[sys_]} N={n}: client errors: {', '.join(other_errors)}")
            if cut:
                notes.append(f"{NAMES[sys_]} N={n}: stopped at the {deadline} s deadline; upstream counts "
                             "are those at that moment (lower bounds)")
            warm = load(f"{res}/pullthrough-warm.fetch.json") if sys_ == "pullthrough" else None
            if warm and n == max(map(int, run["clients"].split())):
                w = warm["summary"]
                rows.append(["pullthrough, warm (hit)", n, f"{w['ok']}/{w['clients']}", "-", "-", "-",
                             f"{w['wall_max']:.2f}", f"{w['wall_max'] / base:.2f}" if base else "-",
                             ms(w["ttfb_median"]), ms(w["ttfb_max"])])
            if sys_ == "pullthrough":
                ours[n] = dict(s=s, gets=gets, bytes=blob_bytes, wall=wall, ratio=wall / base if base else None,
                               metrics=open(f"{res}/{sys_}-{n}.metrics.txt").read()
                               if os.path.exists(f"{res}/{sys_}-{n}.metrics.txt") else "")
    print()
    print(table(header, rows, left=1))
    for note in notes:
        print("note: " + note)
    print("'warm (hit)': the same clients again once the blob is cached, i.e. the most this machine lets "
          "pullthrough deliver; 'vs 1 client' compares it with the cold 1-client time")
    if ours:
        blob_gets = '{kind="blob_get",status="2xx"}'
        print("\npullthrough's own /metrics per N (upstream blob GETs 2xx / upstream bytes / blob): " + ", ".join(
            f"N={n}: {metric(o['metrics'], 'pullthrough_upstream_requests_total', blob_gets) or 0:.0f}"
            f" / {(metric(o['metrics'], 'pullthrough_upstream_bytes_total') or 0) / size:.2f}"
            for n, o in sorted(ours.items())))
        print("targets (pullthrough):")
        byte_ok = all(o["bytes"] == size and o["s"]["ok"] == o["s"]["clients"] for o in ours.values())
        print(f"  upstream bytes = 1.00 x blob at every N: {verdict(byte_ok)} ("
              + ", ".join(f"N={n}: {o['bytes'] / size:.2f}" for n, o in sorted(ours.items())) + ")")
        nmax = max(ours)
        r = ours[nmax]["ratio"]
        if r is not None and nmax > 1:
            print(f"  slowest client at N={nmax} <= 1.15 x the 1-client time: {verdict(r <= 1.15)} ({r:.2f})")
        if up_ttfb is not None:
            meds = {n: o["s"]["ttfb_median"] for n, o in ours.items() if o["s"]["ttfb_median"] is not None}
            worst = max(meds.values()) - up_ttfb
            print(f"  median TTFB within 50 ms of the upstream's: {verdict(worst <= 0.050)} "
                  f"(worst +{worst * 1000:.1f} ms)")


# ---------------------------------------------------------------- hot path

ROWS = [  # key, label, unit
    ("blob64_c1", "cached 64 MiB blob, 1 conn", "MB/s"),
    ("blob64_c1", "  server CPU per GB", "cpu/GB"),
    ("blob64_c16", "cached 64 MiB blob, 16 conns", "MB/s"),
    ("blob64_c16", "  server CPU per GB", "cpu/GB"),
    ("blob1_c64", "cached 1 MiB blob, 64 conns", "req/s"),
    ("blob1_c64", "  p99 latency", "p99"),
    ("blob1_c64", "  server CPU per request", "cpu/req"),
    ("tag_c64", "manifest by tag (in TTL), 64 conns", "req/s"),
    ("tag_c64", "  p99 latency", "p99"),
    ("tag_c64", "  server CPU per request", "cpu/req"),
    ("tag_c64_t1", "  1 wrk thread", "req/s"),
    ("tag_c64_t1", "  1 wrk thread: p99 latency", "p99"),
    ("digest_c64", "manifest by digest, 64 conns", "req/s"),
    ("digest_c64", "  p99 latency", "p99"),
    ("digest_c64", "  server CPU per request", "cpu/req"),
    ("digest_c64_t1", "  1 wrk thread", "req/s"),
    ("digest_c64_t1", "  1 wrk thread: p99 latency", "p99"),
    ("close_c64", "Connection: close, manifest by digest, 64 c.", "req/s"),
    ("close_c64", "  server CPU per request", "cpu/req"),
    ("tls_blob64_c16", "HTTPS/1.1: cached 64 MiB blob, 16 conns", "MB/s"),
    ("tls_blob64_c16", "  server CPU per GB", "cpu/GB"),
    ("tls_digest_c64", "HTTPS/1.1: manifest by digest, 64 conns", "req/s"),
    ("tls_digest_c64", "  p99 latency", "p99"),
    ("tls_digest_c64", "  server CPU per request", "cpu/req"),
    ("h2_digest", "HTTP/2 (TLS): manifest by digest, 64x8", "req/s"),
    ("h2_digest", "  server CPU per request", "cpu/req"),
    ("h2_blob1", "HTTP/2 (TLS): cached 1 MiB blob, 64x8", "req/s"),
    ("h2_blob1", "  server CPU per GB", "cpu/GB"),
    ("rss_run", "peak RSS during the plain wrk rows", "rss"),
    ("rss_slow", "peak RSS, 256 slow readers of 256 MiB", "rss"),
]
HIGHER_IS_BETTER = {"MB/s": True, "req/s": True, "p99": False, "rss": False, "cpu/GB": False, "cpu/req": False}


def one_value(d, unit):
    if unit == "rss":
        return d.get("rss_kib")
    if unit == "MB/s":
        return d["bytes"] / d["duration_s"] / 1e6
    if unit == "req/s":
        return d["requests"] / d["duration_s"]
    if unit == "cpu/GB":
        return d["server_cpu_s"] / (d["bytes"] / 1e9) if d.get("bytes") and "server_cpu_s" in d else None
    if unit == "cpu/req":
        return d["server_cpu_s"] / d["requests"] * 1e6 if d.get("requests") and "server_cpu_s" in d else None
    return d["p99_us"] / 1000


def value(res, system, key, unit):
    """The median over a row's repeats (files KEY.1.json, KEY.2.json, ...), or the single
    measurement in KEY.json; with the repeats' data merged so that any errors show."""
    runs = [d for d in (load(f) for f in sorted(glob.glob(f"{res}/{system}-{key}.*.json"))) if d]
    if not runs:
        single = load(f"{res}/{system}-{key}.json")
        runs = [single] if single else []
    if not runs:
        return None, None
    vals = [v for v in (one_value(d, unit) for d in runs) if v is not None]
    merged = dict(runs[0])
    for k in ("errors", "non2xx"):
        merged[k] = sum(d.get(k) or 0 for d in runs)
    return (statistics.median(vals) if vals else None), merged


def show(v, unit, d):
    if v is None:
        return "n/a"
    bad = ""
    if d and unit in ("MB/s", "req/s", "p99") and (d.get("errors") or d.get("non2xx")):
        bad = "!"
    if unit == "rss":
        return f"{v / 1024:.1f} MiB"
    if unit == "cpu/GB":
        return f"{v:.2f} s"
    if unit == "cpu/req":
        return f"{v:.0f} us"
    if unit == "p99":
        return f"{v:.2f} ms{bad}"
    return f"{v:,.0f}{bad}"


def ratio(ours, other):
    if ours is None or other is None or other == 0 or ours == 0:
        return "-"
    return f"{ours / other:.2f}"


def hotpath(res):
    run = load(f"{res}/run.json", {})
    print(f"\nhot path: wrk {run.get('duration', '?')} s per measurement, median of {run.get('repeat', 1)} per row "
          f"with the systems taking turns; {os.cpu_count()} CPUs shared by server and client; same bytes "
          f"everywhere (nginx serves the blob and manifest files); HTTPS rows: same certificate, "
          f"h2load 64 connections x 8 streams for HTTP/2")
    other_load(res)
    header = ["row", "ours", "nginx", "registry:2", "ours/nginx", "ours/registry:2"]
    rows, errs, results = [], [], {}
    for key, label, unit in ROWS:
        vals = {s: value(res, s, key, unit) for s in ("pullthrough", "nginx", "registry")}
        results[(key, unit)] = {s: v for s, (v, _) in vals.items()}
        for s, (v, d) in vals.items():
            if d and unit in ("MB/s", "req/s") and (d.get("errors") or d.get("non2xx")):
                errs.append(f"{NAMES[s]} / {label.strip()}: {d.get('errors')} socket errors, "
                            f"{d.get('non2xx')} non-2xx")
            readers = (d or {}).get("readers") if key == "rss_slow" else None
            if readers and (readers["status"].get("200") != readers["connections"] or readers["errors"]):
                errs.append(f"{NAMES[s]} / slow readers: {readers['status']} of {readers['connections']}, "
                            f"errors {readers['errors']}")
        o, n, r = vals["pullthrough"][0], vals["nginx"][0], vals["registry"][0]
        rows.append([label + (f" ({unit})" if unit in ("MB/s", "req/s") else ""),
                     show(o, unit, vals["pullthrough"][1]), show(n, unit, vals["nginx"][1]),
                     show(r, unit, vals["registry"][1]), ratio(o, n), ratio(o, r)])
    print()
    print(table(header, rows))
    print("ratios are ours / theirs: above 1 is better for MB/s and req/s, below 1 is better for "
          "p99, CPU and RSS; '!' marks a row with socket errors or non-2xx answers")
    for e in sorted(set(errs)):
        print("note: " + e)
    print("targets (pullthrough):")
    t = lambda k, u: results[(k, u)]
    def cmp(k, u, other, factor):
        o, x = t(k, u)["pullthrough"], t(k, u)[other]
        if o is None or x is None:
            return None
        return o >= factor * x if HIGHER_IS_BETTER[u] else o * factor <= x
    def p99_within(k, ms):
        o = t(k, "p99")["pullthrough"]
        return None if o is None else o <= ms
    checks = [
        ("blob throughput >= 1.0 x nginx", [cmp("blob64_c1", "MB/s", "nginx", 1), cmp("blob64_c16", "MB/s", "nginx", 1)]),
        ("manifest req/s >= 1.0 x nginx", [cmp("tag_c64", "req/s", "nginx", 1), cmp("digest_c64", "req/s", "nginx", 1)]),
        ("HTTP/2 manifests >= 1.0 x nginx", [cmp("h2_digest", "req/s", "nginx", 1)]),
        ("other HTTPS rows >= 1.0 x nginx", [cmp("tls_blob64_c16", "MB/s", "nginx", 1),
                                             cmp("tls_digest_c64", "req/s", "nginx", 1),
                                             cmp("h2_blob1", "req/s", "nginx", 1)]),
        ("manifest p99 <= 2 ms at 64 conns, 2 wrk threads", [p99_within(k, 2) for k in ("tag_c64", "digest_c64")]),
        ("manifest p99 <= 2 ms at 64 conns, 1 wrk thread", [p99_within(k, 2) for k in ("tag_c64_t1", "digest_c64_t1")]),
        (">= 2 x registry:2 on every row", [cmp(k, u, "registry", 2) for k, _, u in ROWS
                                            if u in ("MB/s", "req/s", "p99", "rss")]),
        ("peak RSS < 64 MiB with 256 slow readers", [None if t("rss_slow", "rss")["pullthrough"] is None
                                                     else t("rss_slow", "rss")["pullthrough"] < 64 * 1024]),
    ]
    for name, results_ in checks:
        known = [x for x in results_ if x is not None]
        if not known:
            print(f"  {name}: not measured")
            continue
        print(f"  {name}: {verdict(all(known))} ({sum(known)}/{len(known)} rows)")


# ---------------------------------------------------------------- soak

FAULT_WINDOW = 35  # s: a failure this soon after an injected fault is put down to it


def soak(res):
    run = load(f"{res}/run.json", {})
    events = []
    with open(f"{res}/events.jsonl") as f:
        for line in f:
            try:
                events.append(json.loads(line))
            except ValueError:
                print(f"note: unreadable event line: {line[:120]!r}")
    faults = (load(f"{res}/throttle.json", {}) or {}).get("faults", {"cut": 0, "429": 0, "log": []})
    flog = faults.get("log", [])
    print(f"\nsoak: {run.get('minutes')} min of mixed load; upstream faults: cut {run.get('cut')}, "
          f"429 {run.get('r429')} per blob/manifest GET; warm-up {run.get('warmup_s')} s after each start; "
          f"{os.cpu_count()} CPUs")
    other_load(res)

    # Resources, per process lifetime.
    samples = []
    if os.path.exists(f"{res}/samples.tsv"):
        for line in open(f"{res}/samples.tsv"):
            t, pid, rss, fds, thr = line.split()
            samples.append((float(t), int(pid), int(rss), int(fds), int(thr)))
    starts = {e["pid"]: e["t"] for e in events if e["kind"] == "start"}
    rows = []
    for pid in sorted({s[1] for s in samples}, key=lambda p: starts.get(p, 0)):
        life = [s for s in samples if s[1] == pid]
        t_start = starts.get(pid, life[0][0])
        warm = [s for s in life if s[0] >= t_start + run.get("warmup_s", 120)]
        w, e = (warm[0] if warm else life[0]), life[-1]
        after = warm or life
        rows.append([pid, len(life), f"{(e[0] - t_start) / 60:.1f}",
                     f"{w[2] / 1024:.1f}", f"{max(s[2] for s in after) / 1024:.1f}", f"{e[2] / 1024:.1f}",
                     f"{(e[2] - w[2]) / 1024:+.1f}", w[3], max(s[3] for s in after), e[3], f"{e[3] - w[3]:+d}",
                     w[4], e[4]])
    print("\nresources (sampled every 10 s; 'warm' = first sample after warm-up):")
    print(table(["pid", "samples", "lived min", "RSS warm MiB", "RSS max", "RSS end", "RSS growth",
                 "fds warm", "fds max", "fds end", "fds growth", "threads warm", "threads end"], rows))

    for a in (e for e in events if e["kind"] == "attack"):
        flood = a.get("flood") or {}
        print(f"\nHTTP/2 memory attack on pid {a['pid']} ({flood.get('connections', '?')} connections, "
              f"{flood.get('streams', '?')} never-read streams, {flood.get('closed_by_server', '?')} closed by the server):")
        print(table(["", "before", "peak under attack", "15 s after"],
                    [["RSS MiB", f"{a['rss_before_kib'] / 1024:.1f}", f"{a['rss_peak_kib'] / 1024:.1f}",
                      f"{a['rss_after_kib'] / 1024:.1f}"],
                     ["open files", a["fds_before"], a["fds_peak"], a["fds_after"]]]))
        h1 = [e for e in events if e["kind"] == "attack_h1" and "try" in e]
        print(f"an HTTP/1.1 client meanwhile: {sum(e['verified'] for e in h1)}/{len(h1)} GETs verified")

    # Client GETs: every attempt, and what explains each failed one.
    stop_t = [e["t"] for e in events if e["kind"] == "stop"]
    restart_windows = [(t, min([s for s in starts.values() if s >= t] or [t + 60]) + 1) for t in stop_t]
    gets = [e for e in events if "try" in e]
    causes, unexplained = {}, []
    for e in gets:
        if e["verified"]:
            continue
        path = e["path"]
        if e.get("sha_mismatch"):
            cause = "CORRUPT: a 200 whose body has the wrong sha256"
            unexplained.append(e)
        elif any(a <= e["t"] <= b for a, b in restart_windows):
            cause = "the restart"
        else:
            recent = [f for f in flog if e["t"] - FAULT_WINDOW <= f[0] <= e["t"] + 1]
            here = [f for f in recent if f[2].split(" ", 1)[1] == path]
            pick = here or recent
            what = f"status {e['status']}" if e["curl_rc"] == 0 else f"curl exit {e['curl_rc']} (status {e['status']})"
            if pick:
                kinds = "/".join(sorted({f[1] for f in pick}))
                cause = (f"{what}: upstream {kinds} injected on this path" if here else
                         f"{what}: upstream {kinds} injected on another path within {FAULT_WINDOW} s (back-off)")
            else:
                cause = f"{what}: UNEXPLAINED"
                unexplained.append(e)
        key = (e["kind"], cause)
        causes[key] = causes.get(key, 0) + 1
    verified = sum(1 for e in gets if e["verified"])
    client_runs = [e for e in events if e["kind"] == "client"]
    gave_up = [(e["of"], e["path"]) for e in client_runs if not e["verified"]]
    by_kind = {}
    for e in gets:
        k = by_kind.setdefault(e["kind"], [0, 0, 0])
        k[0] += 1
        k[1] += e["verified"]
        k[2] += e["bytes"] if e["verified"] else 0
    print("\nclient GETs (curl; every 200 checked against its sha256):")
    print(table(["kind", "attempts", "verified 200s", "verified MiB"],
                [[k, v[0], v[1], f"{v[2] / MiB:.0f}"] for k, v in sorted(by_kind.items())]))
    if causes:
        print("failed attempts, with what explains them:")
        for (kind, cause), n in sorted(causes.items()):
            print(f"  {n:4d}  {kind}: {cause}")
    print(f"faults injected by the upstream proxy: {faults.get('cut', 0)} cuts, {faults.get('429', 0)} x 429")

    # Load generators.
    tot = {}
    for e in events:
        if e["kind"] in ("wrk", "h2load") and e.get("result"):
            t = tot.setdefault(e["kind"], {"runs": 0, "requests": 0, "errors": 0, "non2xx": 0})
            t["runs"] += 1
            for k in ("requests", "errors", "non2xx"):
                t[k] += e["result"].get(k) or 0
        elif e["kind"] in ("wrk", "h2load"):
            tot.setdefault(e["kind"], {"runs": 0, "requests": 0, "errors": 0, "non2xx": 0})["runs"] += 1
            unexplained.append(e)
    for k, t in sorted(tot.items()):
        proto = "HTTP/1.1, wrk" if k == "wrk" else "h2c, h2load"
        print(f"cached hits ({proto}): {t['runs']} runs, {t['requests']:,} 2xx, {t['errors']} socket errors, "
              f"{t['non2xx']} non-2xx")
        if t["errors"] or t["non2xx"]:
            unexplained.append({"kind": k, "errors": t["errors"], "non2xx": t["non2xx"]})
    slow = [e.get("result") for e in events if e["kind"] == "slow"]
    if slow:
        ok = sum((r or {}).get("status", {}).get("200", 0) for r in slow)
        conns = sum((r or {}).get("connections", 0) for r in slow)
        errs = sorted({x for r in slow for x in (r or {}).get("errors", [])})
        print(f"slow readers: {len(slow)} runs, {ok}/{conns} connections answered 200, "
              f"{sum((r or {}).get('bytes', 0) for r in slow) / MiB:.0f} MiB read, errors: {errs or 'none'}")
        if ok != conns or errs:
            unexplained.append({"kind": "slow", "errors": errs})

    # The mirror's own logs.
    for path in sorted(glob.glob(f"{res}/mirror.*.log")):
        text = open(path, errors="replace").read()
        lv = {lvl: len(re.findall(rf"\b{lvl}\b", text)) for lvl in ("ERROR", "WARN")}
        print(f"{os.path.basename(path)}: {lv['ERROR']} ERROR, {lv['WARN']} WARN lines, "
              f"{len(re.findall('panic', text))} mentions of panic")

    print("verdict:")
    print(f"  every fetched body verified: {verdict(not any(e.get('sha_mismatch') for e in gets) and not gave_up)} "
          f"({verified} verified 200s, {sum(1 for e in gets if e.get('sha_mismatch'))} wrong bodies, "
          f"{len(client_runs)} clients, {len(gave_up)} gave up after 8 tries)")
    print(f"  errors the faults or the restart do not explain: {verdict(not unexplained)} ({len(unexplained)})")
    for e in unexplained[:10]:
        print(f"    {json.dumps(e)[:300]}")
    for r in rows:
        rss_ok = float(r[6]) <= max(8.0, 0.1 * float(r[3]))
        print(f"  pid {r[0]}: no growth after warm-up (RSS within max(8 MiB, 10 %), fds within 8): "
              f"{verdict(rss_ok and int(r[10]) <= 8)} (RSS {r[6]} MiB, fds {r[10]})")


# ---------------------------------------------------------------- cluster

def front_bodies(path):
    """(bodies, body bytes, earliest first-byte time) of the blob GETs in a front.py log."""
    recs = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    got = [r for r in recs if r["method"] == "GET" and "/blobs/" in r["path"] and r["bytes"] > 0]
    first = [r["first_byte"] for r in got if r.get("first_byte")]
    return len(got), sum(r["bytes"] for r in got), min(first) if first else None


def leader_of(res, n, replicas):
    """The replica (1-based) that asked the upstream for the blob, from its /metrics."""
    asked = []
    for i in range(1, replicas + 1):
        text = open(f"{res}/cluster-{n}-r{i}.metrics.txt").read() if os.path.exists(
            f"{res}/cluster-{n}-r{i}.metrics.txt") else ""
        if sum(float(v) for v in re.findall(r'^pullthrough_upstream_requests_total\{[^}]*kind="blob_get"[^}]*\} (\S+)$',
                                            text, re.M)) > 0:
            asked.append(i)
    return asked[0] if len(asked) == 1 else None


def cluster(res):
    run = load(f"{res}/run.json")
    size, replicas = run["size"], run["replicas"]
    print(f"\ncluster: {size / MiB:.0f} MiB blob, cold, upstream capped at {run['rate'] / MiB:.0f} MiB/s per body; "
          f"{replicas} replicas on one Garage node and one Redis against a single node; {os.cpu_count()} CPUs")
    other_load(res)
    ms = lambda v: f"{v * 1000:+.1f}" if v is not None else "-"
    header = ["system", "N", "ok", "upstream bodies", "up. bytes / blob", "slowest client s", "vs single node",
              "TTFB med ms", "followers' 1st byte - upstream's, med / max ms"]
    rows, ratios, byte_ratios, lags_all = [], {}, {}, []
    for n in map(int, run["clients"].split()):
        single = load(f"{res}/single-{n}.fetch.json")
        base = single["summary"]["wall_max"] if single else None
        if single:
            s = single["summary"]
            bodies, sent, _ = front_bodies(f"{res}/single-{n}-front.jsonl")
            rows.append(["single node", n, f"{s['ok']}/{s['clients']}", bodies, f"{sent / size:.2f}",
                         f"{s['wall_max']:.2f}", "1.00", f"{s['ttfb_median'] * 1000:.1f}" if s["ttfb_median"] else "-", "-"])
        parts = [load(f"{res}/cluster-{n}-r{i}.fetch.json") for i in range(1, replicas + 1)]
        if not all(parts):
            continue
        clients = [c for p in parts for c in p["clients"]]
        ok = sum(1 for c in clients if not c["error"])
        wall = max(c["wall"] for c in clients)
        ttfbs = sorted(c["ttfb"] for c in clients if c["ttfb"] is not None)
        bodies, sent, first = front_bodies(f"{res}/cluster-{n}-front.jsonl")
        lead = leader_of(res, n, replicas)
        lags = sorted(c["first_byte_at"] - first for i, p in enumerate(parts, 1) if i != lead
                      for c in p["clients"] if c.get("first_byte_at") and first) if lead else []
        lags_all += lags
        ratio = wall / base if base else None
        ratios[n], byte_ratios[n] = ratio, sent / size
        rows.append([f"{replicas} replicas", n, f"{ok}/{len(clients)}", bodies, f"{sent / size:.2f}", f"{wall:.2f}",
                     f"{ratio:.2f}" if ratio else "-", f"{statistics.median(ttfbs) * 1000:.1f}" if ttfbs else "-",
                     f"{ms(statistics.median(lags))} / {ms(max(lags))}" if lags else "no single leader"])
    print()
    print(table(header, rows, left=1))
    local, shared = load(f"{res}/hit-local.fetch.json"), load(f"{res}/hit-shared.fetch.json")
    if local and shared:
        lr, sr = local["summary"]["rate"], shared["summary"]["rate"]
        print(f"\nhits, {local['summary']['clients']} clients: local tier {lr / 1e6:,.0f} MB/s "
              f"({local['summary']['ok']} ok), shared tier (an empty replica) {sr / 1e6:,.0f} MB/s "
              f"({shared['summary']['ok']} ok); shared / local = {sr / lr:.2f}")
    rss = []
    for n in map(int, run["clients"].split()):
        rss += (load(f"{res}/cluster-{n}.rss.json") or {}).get("rss_kib", [])
    single_rss = [(load(f"{res}/single-{n}.rss.json") or {}).get("rss_kib", 0) for n in map(int, run["clients"].split())]
    if rss:
        print(f"peak RSS per replica: max {max(rss) / 1024:.1f} MiB (single node: max {max(single_rss) / 1024:.1f} MiB)")
    print("targets:")
    if byte_ratios:
        print(f"  upstream bytes = 1.00 x blob at every N: {verdict(all(abs(b - 1) < 1e-9 for b in byte_ratios.values()))} ("
              + ", ".join(f"N={n}: {b:.2f}" for n, b in byte_ratios.items()) + ")")
    if ratios and all(ratios.values()):
        print(f"  slowest client <= 1.15 x the single node's: {verdict(all(r <= 1.15 for r in ratios.values()))} ("
              + ", ".join(f"N={n}: {r:.2f}" for n, r in ratios.items()) + ")")
    if lags_all:
        print(f"  followers' first byte within 50 ms of the upstream's: {verdict(max(lags_all) <= 0.050)} "
              f"(worst {max(lags_all) * 1000:+.1f} ms)")
    if rss:
        print(f"  peak RSS per replica < 64 MiB: {verdict(max(rss) < 64 * 1024)} ({max(rss) / 1024:.1f} MiB)")


# ---------------------------------------------------------------- cold path

COLD_ROWS = {  # row: (label, target of the mirror's time over the direct time)
    "tail": ("64 KiB at the end of a cold {r} blob", 1.5),
    "stargz": ("stargz-like sequence on a cold {r} blob", 1.5),
    "quarters": ("4 parallel ranges of a cold {r} blob", 1.1),
    "stream": ("one stream, cold {s} blob", 0.5),
    "image": ("12-layer image ({i}), 3 layers at a time", 0.6),
}
COLD_NAMES = {"pullthrough": "pullthrough", "previous": "previous"}


def mib(n):
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def cold_blobs(res):
    """{row: {blob path: size}}: the blobs each row reads, from the seed files."""
    b, i = load(f"{res}/seed-blobs.json"), load(f"{res}/seed-image.json")
    path = lambda seed, digest: f"GET /v2/{seed['repo']}/blobs/{digest}"
    rng = {path(b, b["blobs"]["range"]["digest"]): b["blobs"]["range"]["size"]}
    image = {path(i, x["digest"]): x["size"] for x in i["blobs"].values()}
    cfg = load(f"{res}/image-manifest.json")["config"]
    image[path(i, cfg["digest"])] = cfg["size"]
    return {"tail": rng, "stargz": rng, "quarters": rng, "image": image,
            "stream": {path(b, b["blobs"]["stream"]["digest"]): b["blobs"]["stream"]["size"]}}


def cold_upstream(stats, blobs):
    """What the upstream sent for these blobs: body bytes, whole 200 bodies (most of any one
    blob), ranged GETs, and the other requests; and whether it was quiet when read."""
    paths = (stats or {}).get("paths", {})
    sent = sum(paths.get(p, {}).get("bytes", 0) for p in blobs)
    full = [paths.get(p, {}).get("full", 0) for p in blobs]
    ranged = sum(sum(r["requests"] for r in paths.get(p, {}).get("ranges", {}).values()) for p in blobs)
    other = sum(v["requests"] for k, v in paths.items() if k not in blobs)
    return {"bytes": sent, "full": sum(full), "full_max": max(full) if full else 0, "ranged": ranged,
            "other": other, "quiet": (stats or {}).get("quiet", False)}


def cold_client(res, row, system, tag):
    c = load(f"{res}/{row}-{system}-{tag}.client.json")
    return c if c and "summary" in c else None


def coldpath(res):
    run = load(f"{res}/run.json")
    runs, systems, rows = run["runs"], run["systems"].split(), run["rows"].split()
    blobs = cold_blobs(res)
    size = {row: sum(b.values()) for row, b in blobs.items()}
    labels = {row: COLD_ROWS[row][0].format(r=mib(size["tail"]), s=mib(size["stream"]), i=mib(size["image"]))
              for row in rows}
    print(f"\ncold path: the upstream caps each connection at {run['conn_rate'] / MiB:.0f} MiB/s and delays every "
          f"request by {run['latency_ms']:g} ms; median of {runs} run(s), each mirror run on a fresh process and an "
          f"empty cache; {os.cpu_count()} CPUs")
    for sys_ in systems:
        print(f"{sys_}: {run['binaries'].get(sys_) or '-'}")
    other_load(res)
    notes, verdicts = [], {s: [] for s in systems}
    header = ["row", "system", "direct s", "mirror s", "ratio", "target", "verdict", "up. bytes / blob",
              "allowed", "up. 200s", "up. ranges", "up. other", "ok"]
    table_rows = []
    med = lambda xs: statistics.median(xs) if xs else None
    for row in rows:
        label, target = COLD_ROWS[row]
        direct = [cold_client(res, row, "direct", f"run{i}") for i in range(1, runs + 1)]
        d_ok = [c["summary"]["wall_max"] for c in direct if c and c["summary"]["ok"] == c["summary"]["clients"]]
        d = med(d_ok)
        table_rows.append([labels[row], "direct", f"{d:.3f}" if d else "-", "", "", "", "", "", "", "", "", "",
                           f"{len(d_ok)}/{runs}"])
        for sys_ in systems:
            cs = [cold_client(res, row, sys_, f"run{i}") for i in range(1, runs + 1)]
            ups = [cold_upstream(load(f"{res}/{row}-{sys_}-run{i}.upstream.json"), blobs[row]) for i in range(1, runs + 1)]
            ok = [c["summary"]["wall_max"] for c in cs if c and c["summary"]["ok"] == c["summary"]["clients"]]
            m = med(ok)
            ratio = m / d if m and d else None
            asked = max((c["requested_range_bytes"] for c in cs if c), default=0)
            allowed = 1.1 * size[row] + asked
            worst = max(u["bytes"] for u in ups)
            busy = not all(u["quiet"] for u in ups)
            good = ratio is not None and ratio <= target and len(ok) == runs
            verdicts[sys_].append((row, "time", good, ratio))
            verdicts[sys_].append((row, "bytes", worst <= allowed and not busy, worst / size[row]))
            table_rows.append(["", COLD_NAMES[sys_], "", f"{m:.3f}" if m else "-", f"{ratio:.2f}" if ratio else "-",
                               f"<= {target}", verdict(good), f"{'>=' if busy else ''}{worst / size[row]:.2f}",
                               f"{allowed / size[row]:.2f}", max(u["full"] for u in ups),
                               max(u["ranged"] for u in ups), max(u["other"] for u in ups), f"{len(ok)}/{runs}"])
            answers = {}
            for c in cs:
                for k, v in (c["summary"]["answers"] if c else {}).items():
                    answers[k] = answers.get(k, 0) + v
            if any(k.startswith("200 whole") or "one range for several" in k for k in answers):
                notes.append(f"{row}, {sys_}: answers over the runs: "
                             + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items()))
                             + " (a 200 with the whole blob to a Range request is correct but slow)")
            errs = sorted({e for c in cs if c for e in c["summary"]["errors"]} | {"no result" for c in cs if not c})
            if errs:
                notes.append(f"{row}, {sys_}: client errors: {', '.join(errs)}")
            if busy:
                notes.append(f"{row}, {sys_}: the upstream was still sending when its counters were read "
                             "(bytes are lower bounds)")
    print()
    print(table(header, table_rows, left=2))
    print("ratio = mirror's median / direct's median; up. = the upstream's answers for the row's blobs (the worst "
          "run): body bytes over the blobs' size, allowed = 1.1 + the ranges the client asked; 200s = whole "
          "bodies sent; ranges = Range GETs; other = other requests (manifests, /v2/ ...)")
    if run["crowd"]:
        n = run["crowd"]
        header = ["row", "system", "ok", "slowest s", "median s", "vs 1 client", "up. 200s", "most of one blob",
                  "up. ranges", "up. bytes / blob", "allowed", "one full body per blob"]
        crowd_rows = []
        for row in rows:
            for k, sys_ in enumerate(systems):
                label = "" if k else labels[row]
                c = cold_client(res, row, sys_, "crowd")
                u = cold_upstream(load(f"{res}/{row}-{sys_}-crowd.upstream.json"), blobs[row])
                if not c:
                    crowd_rows.append([label, sys_, "no result"] + [""] * 9)
                    continue
                s = c["summary"]
                ones = [cold_client(res, row, sys_, f"run{i}") for i in range(1, runs + 1)]
                one = med([o["summary"]["wall_max"] for o in ones if o and o["summary"]["ok"]])
                allowed = 1.1 * size[row] + c["requested_range_bytes"]
                good = u["bytes"] <= allowed and u["full_max"] <= 1 and u["quiet"] and s["ok"] == s["clients"]
                verdicts[sys_].append((row, f"{n} clients", good, u["bytes"] / size[row]))
                crowd_rows.append([label, sys_, f"{s['ok']}/{s['clients']}", f"{s['wall_max']:.3f}",
                                   f"{s['wall_median']:.3f}", f"{s['wall_max'] / one:.2f}" if one else "-", u["full"],
                                   u["full_max"], u["ranged"], f"{'' if u['quiet'] else '>='}{u['bytes'] / size[row]:.2f}",
                                   f"{allowed / size[row]:.2f}", verdict(good)])
                if s["errors"]:
                    notes.append(f"{row}, {sys_}, {n} clients: errors: {', '.join(s['errors'])}")
        print(f"\n{n} clients at once, each doing the row's action, on a cold mirror:")
        print(table(header, crowd_rows, left=2))
        print("vs 1 client: the slowest of them over the 1-client median; allowed = 1.1 + one client's ranges; "
              "most of one blob = the most whole bodies the upstream sent of any one blob (target: 1)")
    for note in notes:
        print("note: " + note)
    print("targets:")
    for sys_ in systems:
        t = [v for v in verdicts[sys_] if v[1] == "time"]
        b = [v for v in verdicts[sys_] if v[1] == "bytes"]
        c = [v for v in verdicts[sys_] if v[1] not in ("time", "bytes")]
        print(f"  {sys_}: times {sum(v[2] for v in t)}/{len(t)} meet their target; upstream bytes within "
              f"1.1 x + ranges asked: {sum(v[2] for v in b)}/{len(b)} rows"
              + (f"; one full body per blob with {run['crowd']} clients: {sum(v[2] for v in c)}/{len(c)} rows" if c else ""))


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("singleflight", "hotpath", "soak", "cluster", "coldpath"):
        sys.exit(__doc__)
    {"singleflight": singleflight, "hotpath": hotpath, "soak": soak, "cluster": cluster,
     "coldpath": coldpath}[sys.argv[1]](sys.argv[2])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Concurrent HTTP/1.1 GET client for the benchmarks (stdlib only).

    fetch.py URL -n 32 [--sha256 HEX] [--size BYTES] [--deadline 60] [--procs 2] [--at UNIX_TIME]

Opens N connections, releases all requests at once (a barrier), reads every body in 1 MiB
reads and hashes it, and prints one JSON object: per-client results and a summary
(ok, wall time of the slowest client, time to first body byte median/max, aggregate rate).
Each client also reports the Unix time of its first body byte (first_byte_at), to compare
with another process's clock on the same machine; --at releases the requests at that Unix
time rather than as soon as all connections are open, so that several fetch.py processes
send theirs together.
Threads release the GIL in recv_into() and sha256 updates, and --procs spreads them over
several processes, so the client keeps up with several GiB/s on two cores.
A client still reading at --deadline seconds gives up and is reported as "deadline".
--ttfb-only hangs up after the first body bytes (to time a server's first byte cheaply).
"""
import argparse, hashlib, json, multiprocessing as mp, socket, statistics, sys, threading, time
import urllib.parse

BUF = 1 << 20


def one(url, headers, deadline, barrier, t_release, ttfb_only=False, at=None):
    u = urllib.parse.urlsplit(url)
    res = {"status": None, "bytes": 0, "sha256": None, "ttfb": None, "first_byte_at": None, "wall": None,
           "error": None}
    try:
        sock = socket.create_connection((u.hostname, u.port or 80), timeout=10)
    except OSError as e:
        res["error"] = f"connect: {e}"
        barrier.wait()
        return res
    path = u.path + ("?" + u.query if u.query else "")
    req = f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUser-Agent: bench-fetch\r\n"
    req += "".join(f"{k}: {v}\r\n" for k, v in headers) + "Connection: close\r\n\r\n"
    barrier.wait()
    if at:
        time.sleep(max(0.0, at - time.time()))
    t0 = time.monotonic()
    t_release.value = t_release.value or time.time()
    end_by = t0 + deadline
    sock.settimeout(1.0)
    h = hashlib.sha256()
    buf = bytearray(BUF)
    mv = memoryview(buf)
    try:
        sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            n = recv(sock, mv, end_by)
            if n == 0:
                raise EOFError("connection closed in the response head")
            head += bytes(mv[:n])
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        res["status"] = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        length = int(hdrs["content-length"]) if "content-length" in hdrs else None
        res["x_cache"] = hdrs.get("x-cache")
        got = len(rest)
        if rest:
            res["ttfb"], res["first_byte_at"] = time.monotonic() - t0, time.time()
            h.update(rest)
        while (length is None or got < length) and not (ttfb_only and res["ttfb"] is not None):
            n = recv(sock, mv, end_by)
            if n == 0:
                break
            if res["ttfb"] is None:
                res["ttfb"], res["first_byte_at"] = time.monotonic() - t0, time.time()
            h.update(mv[:n])
            got += n
        res["bytes"] = got
        if length is not None and got < length and not ttfb_only:
            res["error"] = f"short body: {got} of {length} bytes"
    except TimeoutError as e:
        res["error"] = "deadline" if time.monotonic() >= end_by else f"timeout: {e}"
    except (OSError, EOFError, ValueError, KeyError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    res["wall"] = time.monotonic() - t0
    res["sha256"] = h.hexdigest()
    return res


def recv(sock, mv, end_by):
    while True:
        if time.monotonic() >= end_by:
            raise TimeoutError("deadline")
        try:
            return sock.recv_into(mv)
        except socket.timeout:
            continue


def worker(url, headers, deadline, count, barrier, t_release, out, ttfb_only, at):
    results = [None] * count
    def run(i):
        results[i] = one(url, headers, deadline, barrier, t_release, ttfb_only, at)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(results)


def summarize(results, want_sha, want_size, statuses=(200,)):
    for r in results:
        if r["error"] is None and r["status"] not in statuses:
            r["error"] = f"status {r['status']}"
        if r["error"] is None and want_size is not None and r["bytes"] != want_size:
            r["error"] = f"size {r['bytes']} != {want_size}"
        if r["error"] is None and want_sha and r["sha256"] != want_sha:
            r["error"] = "sha256 mismatch"
    ok = [r for r in results if r["error"] is None]
    ttfbs = [r["ttfb"] for r in results if r["ttfb"] is not None]
    walls = [r["wall"] for r in results]
    total = sum(r["bytes"] for r in results)
    wall = max(walls) if walls else 0
    return {
        "clients": len(results), "ok": len(ok),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "wall_max": wall, "wall_median": statistics.median(walls) if walls else None,
        "ttfb_median": statistics.median(ttfbs) if ttfbs else None,
        "ttfb_max": max(ttfbs) if ttfbs else None,
        "bytes": total, "rate": total / wall if wall else 0,
        "x_cache": sorted({str(r.get("x_cache")) for r in results}),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=1, help="concurrent clients")
    ap.add_argument("--sha256", help="expected hex digest of every body")
    ap.add_argument("--size", type=int, help="expected body length")
    ap.add_argument("--deadline", type=float, default=120)
    ap.add_argument("--procs", type=int, default=2, help="processes to spread the clients over")
    ap.add_argument("--ttfb-only", action="store_true", help="hang up after the first body bytes")
    ap.add_argument("--at", type=float, help="Unix time to send the requests at")
    ap.add_argument("-H", "--header", action="append", default=[], help="K: V")
    a = ap.parse_args()
    headers = [tuple(x.strip() for x in h.split(":", 1)) for h in a.header]
    procs = max(1, min(a.procs, a.n))
    counts = [a.n // procs + (i < a.n % procs) for i in range(procs)]
    ctx = mp.get_context("fork")
    barrier, t_release, out = ctx.Barrier(a.n), ctx.Value("d", 0.0), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(a.url, headers, a.deadline, c, barrier, t_release, out, a.ttfb_only, a.at))
          for c in counts]
    for p in ps:
        p.start()
    results = []
    for _ in ps:
        results += out.get()
    for p in ps:
        p.join()
    ranged = any(k.lower() == "range" for k, _ in headers)
    summary = summarize(results, None if a.ttfb_only else a.sha256, None if a.ttfb_only else a.size,
                        (200, 206) if ranged else (200,))
    summary["started_at"] = t_release.value
    json.dump({"summary": summary, "clients": results}, sys.stdout)
    print()
    return 0 if summary["ok"] == summary["clients"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The client actions of bench/coldpath.sh: what a lazy-pulling snapshotter, a parallel
downloader, skopeo or dockerd asks of a registry, timed and checked (stdlib only).

    coldclient.py ACTION --url http://127.0.0.1:PORT --seed SEED.json [--blob NAME]
                  [-n 1] [--procs 2] [--deadline 120] [--at-once 3]

ACTION, on the blob NAME of SEED.json (written by tools/seed.py), or on its image for "image":
    tail      one GET of the blob's last 64 KiB (Range)
    stargz    on one keep-alive connection, one after the other: a probe (Range: bytes=0-1), the
              last 64 KiB (footer and TOC), 20 chunks of 40-60 KB at scattered offsets, then two
              multi-range GETs (bytes=a-b,c-d) of two ~50 KB chunks each
    quarters  4 connections at once, each a GET of a quarter of the blob (Range)
    stream    one GET of the whole blob
    image     the image by tag: the manifest, then the config, then the layers in manifest
              order on --at-once connections (dockerd's max-concurrent-downloads), whole
-n N runs N such clients at once (released together by a barrier), spread over --procs
processes. A client's wall time runs from its first request to the last byte of its last
response; connections are opened within it (loopback: well under a millisecond).

Every answer is checked against the seeded content, after all clients are done, so checking
costs no client time: a whole body against its digest, a range (206, also each part of a
multipart/byteranges answer, or one range covering all asked) against the same bytes of the
blob file. A 200 with the whole blob to a Range request is correct but slow: it is read to
the end, checked and counted in "answers" as "200 whole".

Prints one JSON object: {"action", "blob", "size", "requested_range_bytes" (one client's),
"clients": [{"wall", "error", "bytes", "requests", "answers"}], "summary": {"clients", "ok",
"errors", "wall_max", "wall_median", "bytes", "answers"}}. A client still busy at --deadline
seconds stops with the error "deadline". Exit status 0 when every client was right.
"""
import argparse, hashlib, http.client, json, multiprocessing as mp, queue, random, re, statistics
import sys, threading, time, urllib.parse

BUF = 1 << 20
TAIL = 64 * 1024
ACCEPT = ", ".join(["application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])


class Deadline(Exception):
    pass


class Client:
    """One client's connections, its counters and the segments it received (checked later)."""

    def __init__(self, url, deadline):
        u = urllib.parse.urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.deadline, self.end_by = deadline, None
        self.bytes = self.requests = 0
        self.answers = {}
        self.segments = []  # (path, start, end inclusive or None for the whole body, sha256 hex)
        self.lock = threading.Lock()

    def start(self):
        self.end_by = time.monotonic() + self.deadline

    def conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=10)

    def count(self, answer, n=1):
        with self.lock:
            self.answers[answer] = self.answers.get(answer, 0) + n

    def get(self, conn, path, rng=None, accept=None):
        """GET path on conn; returns (status, headers, body bytes or None when streamed into
        segments). Range answers are streamed and recorded as segments, multipart parsed."""
        if time.monotonic() >= self.end_by:
            raise Deadline()
        headers = {"User-Agent": "bench-coldclient"}
        if rng:
            headers["Range"] = "bytes=" + ",".join(f"{a}-{b}" for a, b in rng)
        if accept:
            headers["Accept"] = accept
        conn.timeout = max(0.1, min(10.0, self.end_by - time.monotonic()))
        if conn.sock:
            conn.sock.settimeout(conn.timeout)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        with self.lock:
            self.requests += 1
        ctype = resp.getheader("Content-Type", "")
        if resp.status == 206 and ctype.startswith("multipart/byteranges"):
            body = self.read_all(resp)
            parts = multipart(body, ctype)
            for a, b, data in parts:
                self.segments.append((path, a, b, hashlib.sha256(data).hexdigest()))
            self.count(f"206 multipart ({len(parts)} parts)")
            return resp.status, resp, None
        if resp.status == 206:
            a, b, _ = content_range(resp.getheader("Content-Range", ""))
            self.segments.append((path, a, b, self.read_hash(resp)))
            self.count("206" if rng and len(rng) == 1 else "206 one range for several")
            return resp.status, resp, None
        if resp.status == 200 and "/blobs/" in path:
            self.segments.append((path, None, None, self.read_hash(resp)))
            self.count("200 whole" if rng else "200")
            return resp.status, resp, None
        body = self.read_all(resp)
        self.count(str(resp.status))
        return resp.status, resp, body

    def read_hash(self, resp):
        h = hashlib.sha256()
        self.stream(resp, h.update)
        return h.hexdigest()

    def read_all(self, resp):
        out = bytearray()
        self.stream(resp, out.extend)
        return bytes(out)

    def stream(self, resp, sink):
        buf = bytearray(BUF)
        mv = memoryview(buf)
        while True:
            if time.monotonic() >= self.end_by:
                resp.close()
                raise Deadline()
            n = resp.readinto(mv)
            if not n:
                break
            sink(mv[:n])
            with self.lock:
                self.bytes += n
        if resp.length:  # http.client leaves what is missing of a Content-Length body here
            raise EOFError(f"short body: {resp.length} bytes missing")


def content_range(v):
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", v.strip())
    if not m:
        raise ValueError(f"bad Content-Range {v!r}")
    return int(m[1]), int(m[2]), m[3]


def multipart(body, ctype):
    """[(start, end, data)] of a multipart/byteranges body."""
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not m:
        raise ValueError(f"multipart without a boundary: {ctype!r}")
    delim = b"--" + m[1].encode("latin-1")
    parts, pos = [], body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        heads = {k.strip().lower(): v.strip() for k, _, v in
                 (l.partition(":") for l in body[pos:head_end].decode("latin-1").split("\r\n") if l.strip())}
        a, b, _ = content_range(heads.get("content-range", ""))
        data = body[head_end + 4:head_end + 4 + b - a + 1]
        if len(data) != b - a + 1:
            raise ValueError("multipart part shorter than its Content-Range")
        parts.append((a, b, data))
        pos = body.find(delim, head_end + 4 + len(data))
    raise ValueError("multipart body without its closing delimiter")


# ---------------------------------------------------------------- actions

def stargz_plan(size):
    """The requests of the stargz-like sequence: lists of (start, end) ranges."""
    rng = random.Random(f"stargz/{size}")
    chunk = lambda: rng.randrange(40_000, 60_000)
    hi = size - TAIL - 60_000
    plan = [[(0, 1)], [(size - TAIL, size - 1)]]
    for _ in range(20):
        a = rng.randrange(2, hi)
        plan.append([(a, a + chunk() - 1)])
    for _ in range(2):
        a, c = sorted(rng.sample(range(2, hi - 120_000, 4096), 2))
        c = max(c, a + 120_000)
        plan.append([(a, a + chunk() - 1), (c, c + chunk() - 1)])
    return plan


def plan_of(action, size):
    """One client's range requests for the ranged actions (None: not a ranged action)."""
    if action == "tail":
        return [[(size - TAIL, size - 1)]]
    if action == "stargz":
        return stargz_plan(size)
    if action == "quarters":
        q = size // 4
        return [[(i * q, size - 1 if i == 3 else (i + 1) * q - 1)] for i in range(4)]
    return None


def run_action(a, seed, cl):
    path = f"/v2/{seed['repo']}/blobs/{seed['blobs'][a.blob]['digest']}" if a.blob else None
    size = seed["blobs"][a.blob]["size"] if a.blob else None
    if a.action in ("tail", "stargz"):
        c = cl.conn()
        for rng in plan_of(a.action, size):
            cl.get(c, path, rng)
        c.close()
    elif a.action == "stream":
        c = cl.conn()
        cl.get(c, path)
        c.close()
    elif a.action == "quarters":
        parallel(cl, [(path, rng) for rng in plan_of("quarters", size)], 4)
    elif a.action == "image":
        c = cl.conn()
        status, _, body = cl.get(c, f"/v2/{seed['repo']}/manifests/{seed['tag']}", accept=ACCEPT)
        if status != 200:
            raise RuntimeError(f"manifest: status {status}")
        if "sha256:" + hashlib.sha256(body).hexdigest() != seed["manifest"]["digest"]:
            raise RuntimeError("manifest: digest mismatch")
        m = json.loads(body)
        cl.get(c, f"/v2/{seed['repo']}/blobs/{m['config']['digest']}")
        c.close()
        parallel(cl, [(f"/v2/{seed['repo']}/blobs/{l['digest']}", None) for l in m["layers"]], a.at_once)


def parallel(cl, jobs, width):
    """GETs (path, ranges) on `width` connections, in order, each taking the next job."""
    q = queue.Queue()
    for j in jobs:
        q.put(j)
    errors = []

    def worker():
        c = cl.conn()
        try:
            while True:
                try:
                    path, rng = q.get_nowait()
                except queue.Empty:
                    return
                cl.get(c, path, rng)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
        finally:
            c.close()
    ts = [threading.Thread(target=worker) for _ in range(width)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def one(a, seed, barrier):
    cl = Client(a.url, a.deadline)
    res = {"wall": None, "error": None}
    barrier.wait()
    t0 = time.monotonic()
    cl.start()
    try:
        run_action(a, seed, cl)
    except Deadline:
        res["error"] = "deadline"
    except Exception as e:  # noqa: BLE001 - any failure is this client's error
        res["error"] = "deadline" if time.monotonic() >= cl.end_by else f"{type(e).__name__}: {e}"
    res["wall"] = time.monotonic() - t0
    res.update(bytes=cl.bytes, requests=cl.requests, answers=cl.answers, segments=cl.segments)
    return res


def worker(a, seed, count, barrier, out):
    results = [None] * count

    def run(i):
        results[i] = one(a, seed, barrier)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(results)


# ---------------------------------------------------------------- checks

class Truth:
    """The seeded content: digests by path, and hashes of byte ranges of the blob files."""

    def __init__(self, seed):
        self.by_path, self.memo = {}, {}
        for b in seed["blobs"].values():
            self.by_path[f"/v2/{seed['repo']}/blobs/{b['digest']}"] = b
        if seed.get("manifest"):  # the config blob is not in seed.json: it is in the manifest
            m = json.load(open(seed["manifest"]["path"]))
            cfg = m["config"]
            self.by_path.setdefault(f"/v2/{seed['repo']}/blobs/{cfg['digest']}",
                                    {"digest": cfg["digest"], "size": cfg["size"], "path": None})

    def check(self, path, a, b):
        blob = self.by_path.get(path)
        if blob is None:
            return None
        if a is None:
            return blob["digest"].split(":", 1)[1]
        if (path, a, b) not in self.memo:
            if blob["path"] is None or b >= blob["size"] or a > b:
                return "out of range"
            h = hashlib.sha256()
            with open(blob["path"], "rb") as f:
                f.seek(a)
                left = b - a + 1
                while left:
                    d = f.read(min(BUF, left))
                    if not d:
                        break
                    h.update(d)
                    left -= len(d)
            self.memo[(path, a, b)] = h.hexdigest()
        return self.memo[(path, a, b)]


def verify(res, truth, a, seed):
    """Sets res["error"] when a segment is wrong or a requested range was not delivered."""
    if res["error"]:
        return
    for path, s, e, sha in res["segments"]:
        want = truth.check(path, s, e)
        if want != sha:
            res["error"] = f"wrong bytes: {path} {s}-{e}"
            return
    plan = plan_of(a.action, seed["blobs"][a.blob]["size"]) if a.blob else None
    if plan:
        size = seed["blobs"][a.blob]["size"]
        got = [(0, size - 1) if s is None else (s, e) for _, s, e, _ in res["segments"]]
        for rng in plan:
            for x, y in rng:
                if not any(s <= x and y <= e for s, e in got):
                    res["error"] = f"range {x}-{y} never delivered"
                    return


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["tail", "stargz", "quarters", "stream", "image"])
    ap.add_argument("--url", required=True, help="base URL of the registry or mirror")
    ap.add_argument("--seed", required=True, help="JSON written by tools/seed.py")
    ap.add_argument("--blob", help="name of the blob in SEED.json (all actions but image)")
    ap.add_argument("-n", type=int, default=1, help="clients at once")
    ap.add_argument("--procs", type=int, default=2, help="processes to spread the clients over")
    ap.add_argument("--deadline", type=float, default=120)
    ap.add_argument("--at-once", type=int, default=3, help="image: layers downloaded at once")
    a = ap.parse_args()
    seed = json.load(open(a.seed))
    if a.action != "image" and a.blob not in seed["blobs"]:
        sys.exit(f"no blob {a.blob!r} in {a.seed}")
    if a.action == "image":
        a.blob = None
    procs = max(1, min(a.procs, a.n))
    counts = [a.n // procs + (i < a.n % procs) for i in range(procs)]
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(a.n), ctx.Queue()
    ps = [ctx.Process(target=worker, args=(a, seed, c, barrier, out)) for c in counts]
    for p in ps:
        p.start()
    results = []
    for _ in ps:
        results += out.get(timeout=a.deadline + 60)
    for p in ps:
        p.join(timeout=10)
    truth = Truth(seed)
    answers = {}
    for r in results:
        verify(r, truth, a, seed)
        del r["segments"]
        for k, v in r["answers"].items():
            answers[k] = answers.get(k, 0) + v
    walls = [r["wall"] for r in results]
    ok = [r for r in results if r["error"] is None]
    plan = plan_of(a.action, seed["blobs"][a.blob]["size"]) if a.blob else None
    summary = {"clients": len(results), "ok": len(ok), "errors": sorted({r["error"] for r in results if r["error"]}),
               "wall_max": max(walls), "wall_median": statistics.median(walls),
               "bytes": sum(r["bytes"] for r in results), "answers": answers}
    json.dump({"action": a.action, "blob": a.blob, "size": seed["blobs"][a.blob]["size"] if a.blob else None,
               "requested_range_bytes": sum(y - x + 1 for rng in plan for x, y in rng) if plan else 0,
               "summary": summary, "clients": results}, sys.stdout)
    print()
    return 0 if summary["ok"] == summary["clients"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Bandwidth-capped, counting HTTP/1.1 reverse proxy for loopback benchmarks (stdlib asyncio).

    throttle.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:UPORT [--rate 32MiB]
                [--conn-rate 24MiB] [--latency-ms 30]
                [--cut 0.1] [--r429 0.1] [--fault-paths REGEX] [--seed 1]

Stands in front of an upstream registry to make it behave like a remote one: every response
body byte, over all connections together, passes one shared token bucket of --rate bytes/s
(0 = no cap), handed out in 64 KiB slots in arrival order, so concurrent transfers share the
cap fairly. Keep-alive, Content-Length and chunked bodies are supported; request bodies need
a Content-Length.

A remote registry over a long round trip (for the cold-path benchmark): --conn-rate caps the
response bodies of each client connection on its own at that many bytes/s (as TCP over a long
RTT caps each connection, so that N connections get N times the bandwidth), on top of the shared
--rate (a body that fell behind its cap, on a busy machine, catches up by at most 256 KiB, so
the cap holds on average instead of being lost); --latency-ms delays every request by that much before it is forwarded, one round trip
before the response headers (a fixed delay per request: the slower TCP ramp-up of a real long
round trip is not emulated).

Faults (for the soak benchmark), on GETs whose path matches --fault-paths (default /blobs/):
with probability --r429 the request is answered 429 with Retry-After: 1 and not forwarded;
with probability --cut the response is forwarded but the connection is closed after half the
body. Each is counted per path under "faults".

Counts requests, statuses and body bytes per "METHOD path", and per Range header under it
("ranges"); "full" counts the 200 bodies sent whole; "active" the bodies in transfer and
"inflight" the requests not yet answered in full (waiting for their round trip included):
    GET  /_throttle/stats   {"active": n, "inflight": n,
                             "paths": {"GET /v2/...": {"requests", "bytes", "status", "full",
                                                      "ranges": {"bytes=0-1": {"requests", "bytes", "status"}}}},
                             "faults": {"cut": n, "429": n, "paths": {"cut GET /v2/...": n},
                                        "log": [[unix time, kind, "GET /v2/..."], ...]}}
    POST /_throttle/reset   zero the counters
"""
import argparse, asyncio, json, random, re, time

HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
SLOT = 64 * 1024
CONN_BURST = 4 * SLOT  # how far a connection's body may catch up on its cap after a late turn


def parse_size(v):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?", v.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {v!r}")
    return int(float(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m[2].upper()])


class Bucket:
    """A cap: each caller reserves the next free time slot for its bytes, then sleeps. With a
    burst, a sender that fell behind its slots (scheduled late on a busy machine) may catch up
    by that many bytes, so the cap is kept on average rather than lost; `restart` (at the start
    of a response) drops what was left over while idle."""
    def __init__(self, rate, burst=0):
        self.rate, self.next, self.lag = rate, time.monotonic(), (burst / rate if rate else 0.0)

    def restart(self):
        self.next = max(self.next, time.monotonic())

    def reserve(self, n):
        """Books the next free slot for n bytes; returns how long to wait for it (s)."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        start = max(now - self.lag, self.next)
        self.next = start + n / self.rate
        return max(0.0, start - now)

    async def take(self, n):
        wait = self.reserve(n)
        if wait > 0:
            await asyncio.sleep(wait)


class Stats:
    def __init__(self):
        self.reset()

    def reset(self):
        self.paths = {}
        self.faults = {"cut": 0, "429": 0, "paths": {}, "log": []}

    def fault(self, kind, method, path):
        self.faults[kind] += 1
        self.faults["log"].append([round(time.time(), 3), kind, f"{method} {path}"])
        key = f"{kind} {method} {path}"
        self.faults["paths"][key] = self.faults["paths"].get(key, 0) + 1

    def entry(self, method, path):
        return self.paths.setdefault(f"{method} {path}", {"requests": 0, "bytes": 0, "status": {}, "full": 0,
                                                          "ranges": {}})


class Proxy:
    def __init__(self, upstream, rate, cut=0.0, r429=0.0, fault_paths="/blobs/", seed=1, conn_rate=0, latency=0.0):
        host, port = upstream.rsplit(":", 1)
        self.up = (host, int(port))
        self.bucket, self.stats, self.active, self.inflight = Bucket(rate), Stats(), 0, 0
        self.conn_rate, self.latency = conn_rate, latency
        self.cut, self.r429, self.fault_re, self.rng = cut, r429, re.compile(fault_paths), random.Random(seed)

    def draw(self, method, target):
        """Which fault, if any, this request gets: None, "cut" or "429"."""
        if method != "GET" or not (self.cut or self.r429) or not self.fault_re.search(target):
            return None
        x = self.rng.random()
        return "429" if x < self.r429 else "cut" if x < self.r429 + self.cut else None

    async def client(self, reader, writer):
        up, own = [], Bucket(self.conn_rate, CONN_BURST)  # up: the connection to the upstream, once opened
        try:
            while True:
                req = await read_head(reader)
                if req is None:
                    break
                method, target, headers = parse_request(req)
                body = b""
                if "content-length" in headers.lower_keys:
                    body = await reader.readexactly(int(headers.get("content-length")))
                elif headers.get("transfer-encoding"):
                    await respond(writer, 501, b"chunked request bodies are not supported\n")
                    break
                if target.startswith("/_throttle/"):
                    await self.control(writer, method, target)
                    continue
                self.inflight += 1
                try:
                    keep = await self.exchange(writer, up, own, method, target, headers, body)
                finally:
                    self.inflight -= 1
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            for w in [writer] + [u[1] for u in up]:
                w.close()

    async def exchange(self, writer, up, own, method, target, headers, body):
        """One request after its round trip: a fault or the upstream's answer. `up` holds the
        connection to the upstream once opened here; `own` is the client connection's cap.
        Returns whether the connections stay usable."""
        if self.latency:
            await asyncio.sleep(self.latency)
        fault = self.draw(method, target)
        if fault == "429":
            self.stats.fault("429", method, target.split("?", 1)[0])
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 72\r\n\r\n"
                         b'{"errors":[{"code":"TOOMANYREQUESTS","message":"injected by throttle"}]}')
            await writer.drain()
            return True
        if not up:
            up.append(await asyncio.open_connection(*self.up))
        return await self.forward(up[0], writer, method, target, headers, body, fault == "cut", own)

    async def forward(self, up, writer, method, target, headers, body, cut=False, own=None):
        """One request/response exchange; returns whether both connections stay usable."""
        up_r, up_w = up
        lines = [f"{method} {target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in headers.items if k.lower() not in HOP and k.lower() != "content-length"]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        up_w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await up_w.drain()
        head = await read_head(up_r)
        if head is None:
            raise ConnectionError("upstream closed")
        status, rheaders = parse_response(head)
        path = target.split("?", 1)[0]
        st = self.stats.entry(method, path)
        st["requests"] += 1
        st["status"][str(status)] = st["status"].get(str(status), 0) + 1
        counters = [st]
        if headers.get("range"):
            rg = st["ranges"].setdefault(headers.get("range"), {"requests": 0, "bytes": 0, "status": {}})
            rg["requests"] += 1
            rg["status"][str(status)] = rg["status"].get(str(status), 0) + 1
            counters.append(rg)
        buckets = [self.bucket] + ([own] if own else [])
        if own:
            own.restart()
        chunked = "chunked" in rheaders.get("transfer-encoding", "").lower()
        if method == "HEAD" or status in (204, 304) or status < 200:
            length = 0
        elif "content-length" in rheaders.lower_keys:
            length = int(rheaders.get("content-length"))
        else:
            length = None
        out = [head.split(b"\r\n", 1)[0].decode("latin-1")]
        out += [f"{k}: {v}" for k, v in rheaders.items if k.lower() not in HOP]
        out.append("Transfer-Encoding: chunked" if chunked else "Connection: keep-alive")
        if length is None and not chunked:
            out[-1] = "Connection: close"
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        self.active += 1
        try:
            if chunked:
                await self.copy_chunked(up_r, writer, counters, buckets)
                st["full"] += method == "GET" and status == 200
                return True
            if length is None:
                await self.copy(up_r, writer, counters, None, buckets)
                st["full"] += method == "GET" and status == 200
                return False
            if cut and length > 1:
                self.stats.fault("cut", method, path)
                await self.copy(up_r, writer, counters, length // 2, buckets)
                await writer.drain()
                return False  # the rest of the body stays unread: both connections close
            await self.copy(up_r, writer, counters, length, buckets)
            await writer.drain()
            st["full"] += method == "GET" and status == 200 and length > 0
            return True
        finally:
            self.active -= 1

    async def copy(self, r, w, counters, length, buckets):
        left = length
        while left is None or left > 0:
            data = await r.read(SLOT if left is None else min(SLOT, left))
            if not data:
                if left is None:
                    return
                raise ConnectionError("upstream body cut")
            wait = max(b.reserve(len(data)) for b in buckets)
            if wait > 0:
                await asyncio.sleep(wait)
            w.write(data)
            await w.drain()
            for c in counters:
                c["bytes"] += len(data)
            if left is not None:
                left -= len(data)

    async def copy_chunked(self, r, w, counters, buckets):
        while True:
            line = await r.readuntil(b"\r\n")
            size = int(line.split(b";")[0], 16)
            w.write(line)
            if size == 0:
                while (trailer := await r.readuntil(b"\r\n")) != b"\r\n":
                    w.write(trailer)
                w.write(b"\r\n")
                await w.drain()
                return
            await self.copy(r, w, counters, size, buckets)
            w.write(await r.readexactly(2))

    async def control(self, writer, method, target):
        if target.startswith("/_throttle/stats"):
            body = json.dumps({"active": self.active, "inflight": self.inflight, "paths": self.stats.paths,
                               "faults": self.stats.faults}).encode()
            await respond(writer, 200, body, "application/json")
        elif target.startswith("/_throttle/reset") and method == "POST":
            self.stats.reset()
            await respond(writer, 200, b"{}", "application/json")
        else:
            await respond(writer, 404, b"unknown control path\n")


class Headers:
    def __init__(self, items):
        self.items = items
        self.lower_keys = {k.lower() for k, _ in items}

    def get(self, key, default=""):
        key = key.lower()
        for k, v in self.items:
            if k.lower() == key:
                return v
        return default


def parse_headers(lines):
    items = []
    for line in lines:
        k, _, v = line.partition(":")
        items.append((k.strip(), v.strip()))
    return Headers(items)


def parse_request(head):
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    return method, target, parse_headers(lines[1:])


def parse_response(head):
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split(" ", 2)[1]), parse_headers(lines[1:])


async def read_head(reader):
    """The request or status line and headers without the final CRLF CRLF; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    return head[:-4]


async def respond(writer, status, body, ctype="text/plain"):
    writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body)
    await writer.drain()


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--upstream", required=True, help="host:port of the registry")
    ap.add_argument("--rate", type=parse_size, default=0, help="shared body bytes/s, e.g. 32MiB (0: no cap)")
    ap.add_argument("--conn-rate", type=parse_size, default=0,
                    help="body bytes/s of each client connection on its own, e.g. 24MiB (0: no cap)")
    ap.add_argument("--latency-ms", type=float, default=0, help="delay of every request before it is forwarded")
    ap.add_argument("--cut", type=float, default=0.0, help="probability of cutting a response body")
    ap.add_argument("--r429", type=float, default=0.0, help="probability of answering 429")
    ap.add_argument("--fault-paths", default="/blobs/", help="regex: which GET paths get faults")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fault draws")
    a = ap.parse_args()
    proxy = Proxy(a.upstream, a.rate, a.cut, a.r429, a.fault_paths, a.seed, a.conn_rate, a.latency_ms / 1000)
    host, port = a.listen.rsplit(":", 1)
    server = await asyncio.start_server(proxy.client, host, int(port), limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass

#!/usr/bin/env python3
"""Many slow readers of one big blob (stdlib asyncio), to see what a server holds per client.

    slowreaders.py URL [-n 256] [--rate 64KiB] [--seconds 20]

Opens N connections (64 KiB receive buffers), sends a GET on each and reads every body at
--rate bytes/s for --seconds, then hangs up. The kernel buffers on both sides fill, so the
server has to hold each response back: what it keeps in memory meanwhile is the point.
Prints JSON: connections that got a 200, bytes read, errors.
"""
import argparse, asyncio, json, socket, sys, time, urllib.parse

sys.dont_write_bytecode = True
sys.path.insert(0, __import__("os").path.dirname(__file__))
from throttle import parse_size  # noqa: E402

TICK = 0.25


async def reader(u, rate, until, out):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (u.hostname, u.port))
        r, w = await asyncio.open_connection(sock=sock, limit=64 * 1024)
        w.write(f"GET {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nUser-Agent: bench-slowreader\r\n\r\n".encode())
        await w.drain()
        status = int((await r.readuntil(b"\r\n")).split()[1])
        await r.readuntil(b"\r\n\r\n")
        out["status"][status] = out["status"].get(status, 0) + 1
        per_tick = max(1, int(rate * TICK))
        while time.monotonic() < until:
            data = await r.read(per_tick)
            if not data:
                out["eof"] += 1
                break
            out["bytes"] += len(data)
            await asyncio.sleep(TICK)
        w.close()
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        out["errors"].append(f"{type(e).__name__}: {e}")


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--rate", type=parse_size, default=64 * 1024, help="bytes/s per connection")
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    u = urllib.parse.urlsplit(a.url)
    out = {"connections": a.n, "status": {}, "bytes": 0, "eof": 0, "errors": []}
    until = time.monotonic() + a.seconds
    await asyncio.gather(*(reader(u, a.rate, until, out) for _ in range(a.n)))
    out["errors"] = sorted(set(out["errors"]))
    json.dump(out, sys.stdout)
    print()
    return 0 if out["status"].get(200) == a.n else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

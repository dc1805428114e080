#!/usr/bin/env python3
"""A logging reverse proxy between pullthrough and its upstream, with blob cuts (stdlib only).

    front.py --port P --upstream http://127.0.0.1:U --log requests.jsonl [--cut-after 1MiB]
             [--rate 64MiB] [--keep-host]

Every request is forwarded unchanged and logged as one JSON line (method, path, Range,
status, body bytes sent, the Unix time of the first body byte, whether it was cut, whether
the client hung up), so the suite can count exactly which upstream requests the mirror
made and how many bytes each cost. GET /_front/active (answered here, not forwarded) lists
the transfers in progress: path, Range, body bytes sent so far, time of the first body
byte. With --cut-after N, the first GET of each blob path gets its full headers (Content-Length included) but only N body bytes before the
connection is closed: an upstream or CDN dropping a transfer half-way. Later GETs of the
same path (the mirror's Range resume) go through whole. --rate caps each response body at
that many bytes per second, to make a download last long enough for concurrent clients to
pile up on it. Each line also names whose credentials the request carried ("auth"): the
`sub` of a Bearer JWT ("bearer:NAME", "bearer:" for an anonymous token), the user of Basic
("basic:NAME"), "bearer:opaque" for a token that is not a JWT (the mirror's own), or null;
never the token or secret itself. With --keep-host it forwards the client's Host, so a
mirror behind it builds its challenge's realm with the front's address and the clients'
token requests pass (and are logged) here too.
"""
import argparse
import base64
import http.client
import http.server
import json
import re
import threading
import time
import urllib.parse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
CHUNK = 64 << 10


def size_arg(text):
    m = re.fullmatch(r"(\d+)([KMG]i?B?)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (m.group(2) or " ")[0].upper()
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30}.get(unit, 0)


def whose(authorization):
    """Whose credentials an Authorization header carries, without the secret."""
    scheme, _, value = (authorization or "").partition(" ")
    try:
        if scheme.lower() == "bearer":
            payload = value.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return "bearer:" + str(claims.get("sub", ""))
        if scheme.lower() == "basic":
            return "basic:" + base64.b64decode(value).decode().partition(":")[0]
    except (ValueError, IndexError):  # not a JWT (the mirror's own tokens are opaque)
        return scheme.lower() + ":opaque"
    return None


class FrontHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        if self.path == "/_front/active":
            return self.active()
        self.progress = None
        started = time.time()
        body = self.read_request_body()
        upstream = self.server.upstream
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=300)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            host = self.headers.get("Host") if self.server.keep_host else None
            conn.putheader("Host", host or upstream.netloc)
            for name, value in self.headers.items():  # repeated headers stay separate lines
                if name.lower() not in HOP_BY_HOP | {"host", "content-length"}:
                    conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
        except OSError as e:
            self.send_error(502, f"front: upstream unreachable: {e}")
            return self.record(started, 502, 0, False)
        self.progress = {"path": self.path, "range": self.headers.get("Range"), "bytes": 0, "first_byte": None}
        with self.server.lock:
            self.server.transfers[id(self.progress)] = self.progress
        aborted = False
        try:
            cut = self.relay(resp)
        except OSError:  # the client (a killed mirror) hung up
            cut, aborted = False, True
            self.close_connection = True
        finally:
            conn.close()
            with self.server.lock:
                self.server.transfers.pop(id(self.progress), None)
        self.record(started, resp.status, self.progress["bytes"], cut, aborted)

    def active(self):
        with self.server.lock:
            body = json.dumps(list(self.server.transfers.values())).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_request_body(self):
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length else None

    def write(self, data):
        """Writes body bytes on, noting the time of the first (before it leaves) and the count."""
        if self.progress["first_byte"] is None and data:
            self.progress["first_byte"] = round(time.time(), 4)
        self.wfile.write(data)
        with self.server.lock:
            self.progress["bytes"] += len(data)

    def relay(self, resp):
        """Sends the upstream response on (body bytes counted in self.progress); returns
        whether it was cut."""
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if resp.getheader("Content-Length") is None and self.command != "HEAD":
            data = resp.read()  # only small error bodies come without a length
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.write(data)
            return False
        self.end_headers()
        if self.command == "HEAD":
            return False
        limit = self.cut_limit(resp.status)
        sent, started = 0, time.monotonic()
        while chunk := resp.read(CHUNK):
            self.throttle(sent, started)
            if limit is not None and sent + len(chunk) > limit:
                self.write(chunk[: limit - sent])
                self.wfile.flush()
                self.close_connection = True  # the client sees a short body, then EOF
                return True
            self.write(chunk)
            sent += len(chunk)
        return False

    def throttle(self, sent, started):
        rate = self.server.rate
        if rate:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    def cut_limit(self, status):
        """N for the first successful GET of each blob path when cutting; None otherwise."""
        srv = self.server
        if not srv.cut_after or status not in (200, 206) or "/blobs/" not in self.path:
            return None
        path = urllib.parse.urlsplit(self.path).path
        with srv.lock:
            if path in srv.already_cut:
                return None
            srv.already_cut.add(path)
        return srv.cut_after

    def record(self, started, status, sent, cut, aborted=False):
        rec = {"t": round(started, 3), "ms": round((time.time() - started) * 1000, 1),
               "method": self.command, "path": self.path, "range": self.headers.get("Range"),
               "status": status, "bytes": sent, "cut": cut, "aborted": aborted,
               "auth": whose(self.headers.get("Authorization")),
               "first_byte": self.progress["first_byte"] if self.progress else None}
        with self.server.lock:
            self.server.logfile.write(json.dumps(rec) + "\n")
            self.server.logfile.flush()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = forward


class Server(http.server.ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a cold fan-out opens more connections than
    # that at once, and the dropped SYNs came back a second later, timing the harness instead
    # of the mirror.
    daemon_threads, request_queue_size = True, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--log", required=True)
    ap.add_argument("--cut-after", type=size_arg, default=0, help="cut each blob once after this many bytes")
    ap.add_argument("--rate", type=size_arg, default=0, help="body bytes per second per response")
    ap.add_argument("--keep-host", action="store_true",
                    help="forward the client's Host (a mirror's challenge then names this front)")
    args = ap.parse_args()
    server = Server(("127.0.0.1", args.port), FrontHandler)
    server.upstream = urllib.parse.urlsplit(args.upstream)
    server.cut_after, server.rate, server.keep_host = args.cut_after, args.rate, args.keep_host
    server.lock, server.already_cut, server.transfers = threading.Lock(), set(), {}
    server.logfile = open(args.log, "a")
    server.serve_forever()


if __name__ == "__main__":
    main()

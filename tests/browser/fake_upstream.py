#!/usr/bin/env python3
"""A registry for the browser test: one image, library/demo:latest, whose 4 MiB layer stops
after 1 MiB until the file named by RELEASE exists. Anonymous, no tokens.

Usage: fake_upstream.py PORT_FILE RELEASE_FILE  (writes the port it listens on to PORT_FILE)
"""
import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port_file, release_file = sys.argv[1], sys.argv[2]
HOLD_AT = 1 << 20
layer = bytes((i * 7919) % 251 for i in range(4 << 20))
config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


manifest = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": digest(config), "size": len(config)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest(layer), "size": len(layer)}],
}).encode()
blobs = {digest(config): config, digest(layer): layer}
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", ctype="application/json", head=False, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def answer(self, head):
        path = self.path.split("?")[0]
        if path in ("/v2/", "/v2"):
            return self.send(200, b"{}", head=head)
        if path.startswith("/v2/library/demo/manifests/"):
            ref = path.rsplit("/", 1)[1]
            if ref not in ("latest", digest(manifest)):
                return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', head=head)
            return self.send(200, manifest, MANIFEST_TYPE, head,
                             [("Docker-Content-Digest", digest(manifest)),
                              ("ratelimit-limit", "100;w=21600"),
                              ("ratelimit-remaining", "97;w=21600")])
        if path.startswith("/v2/library/demo/blobs/"):
            d = path.rsplit("/", 1)[1]
            body = blobs.get(d)
            if body is None:
                return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', head=head)
            if head or body is not layer:
                return self.send(200, body, "application/octet-stream", head,
                                 [("Docker-Content-Digest", d)])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:HOLD_AT])
            self.wfile.flush()
            while not os.path.exists(release_file):
                time.sleep(0.05)
            self.wfile.write(body[HOLD_AT:])
            return None
        return self.send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', head=head)

    def do_GET(self):
        self.answer(False)

    def do_HEAD(self):
        self.answer(True)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(port_file + ".tmp", port_file)
server.serve_forever()

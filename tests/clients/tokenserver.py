#!/usr/bin/env python3
"""A Docker registry token server for the client suite (stdlib + the `openssl` command).

    tokenserver.py --port P --key key.pem --cert cert.pem --issuer I --user NAME:TOKEN
                   [--ttl 60] [--log requests.jsonl] [--anonymous-pull]

`GET /token?service=S&scope=repository:NAME:pull[,push]` with `Authorization: Basic
base64(NAME:TOKEN)` answers `{"token", "access_token", "expires_in", "issued_at"}` the way
auth.docker.io does. The token is an RS256 JWT whose header carries the signing
certificate as `x5c`; distribution 2.8 (`auth.token`) accepts it because that certificate
is its `rootcertbundle`. The configured user gets pull and push on every repository;
anonymous callers get a token with no access (so the registry refuses them, like a private
Hub repository), or with pull access under --anonymous-pull (like ghcr.io or quay.io for a
public image); a wrong secret is a 401. Each request is logged as one JSON line.
"""
import argparse
import base64
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Signer:
    """RS256 via `openssl dgst -sha256 -sign`: no third-party crypto package needed."""

    def __init__(self, key_path, cert_path):
        der = subprocess.run(["openssl", "x509", "-in", cert_path, "-outform", "DER"],
                             check=True, capture_output=True).stdout
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        self.header = b64url(json.dumps(header).encode())
        self.key_path = key_path

    def sign(self, claims):
        signing_input = self.header + "." + b64url(json.dumps(claims).encode())
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", self.key_path],
                                   input=signing_input.encode(), check=True, capture_output=True).stdout
        return signing_input + "." + b64url(signature)


def granted(scopes, authenticated, anonymous_pull):
    """The JWT `access` list: everything asked for when authenticated, pull (or nothing)
    otherwise."""
    access = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        allowed = ("pull", "push") if authenticated else ("pull",) if anonymous_pull else ()
        allowed = [a for a in actions.split(",") if a in allowed]
        if kind == "repository" and name and allowed:
            access.append({"type": kind, "name": name, "actions": allowed})
    return access


class TokenHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            return self.reply(404, {"error": "not found"})
        query = urllib.parse.parse_qs(url.query)
        user, secret = self.basic_credentials()
        cfg = self.server.cfg
        authenticated = user is not None and (user, secret) == cfg.user
        self.server.log({"user": user, "authenticated": authenticated,
                         "service": query.get("service", [""])[0], "scopes": query.get("scope", [])})
        if user is not None and not authenticated:
            return self.reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "wrong user or token"}]})
        now = int(time.time())
        claims = {"iss": cfg.issuer, "sub": user or "", "aud": query.get("service", [""])[0],
                  "iat": now, "nbf": now - 5, "exp": now + cfg.ttl, "jti": b64url(os.urandom(9)),
                  "access": granted(query.get("scope", []), authenticated, cfg.anonymous_pull)}
        token = self.server.signer.sign(claims)
        issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        self.reply(200, {"token": token, "access_token": token, "expires_in": cfg.ttl, "issued_at": issued})

    def basic_credentials(self):
        value = self.headers.get("Authorization", "")
        if not value.lower().startswith("basic "):
            return None, None
        user, _, secret = base64.b64decode(value[6:]).decode().partition(":")
        return user, secret

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    # socketserver's default listen backlog of 5 drops SYNs (retried a second later) when
    # several replicas and clients ask for tokens at once.
    daemon_threads, request_queue_size = True, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--issuer", default="pullthrough-test-issuer")
    ap.add_argument("--user", required=True, help="NAME:TOKEN")
    ap.add_argument("--ttl", type=int, default=60, help="token lifetime in seconds")
    ap.add_argument("--log", help="JSON lines file (default stderr)")
    ap.add_argument("--anonymous-pull", action="store_true", help="grant pull to anonymous callers")
    cfg = ap.parse_args()
    cfg.user = tuple(cfg.user.split(":", 1))

    server = Server(("127.0.0.1", cfg.port), TokenHandler)
    server.cfg, server.signer = cfg, Signer(cfg.key, cfg.cert)
    sink = open(cfg.log, "a") if cfg.log else sys.stderr
    lock = threading.Lock()

    def log(record):
        with lock:
            sink.write(json.dumps({"t": round(time.time(), 3), **record}) + "\n")
            sink.flush()

    server.log = log
    server.serve_forever()


if __name__ == "__main__":
    main()

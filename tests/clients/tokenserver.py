#!/usr/bin/env python3
"""A Docker registry token server for the client suite (stdlib + the `openssl` command).

    tokenserver.py --port P --key key.pem --cert cert.pem --issuer I --user NAME:TOKEN[:GLOB,...]
                   [--user ...] [--public GLOB ...] [--ttl 60] [--log requests.jsonl]
                   [--anonymous-pull]

`GET /token?service=S&scope=repository:NAME:pull[,push]` with `Authorization: Basic
base64(NAME:TOKEN)` answers `{"token", "access_token", "expires_in", "issued_at"}` the way
auth.docker.io does. The token is an RS256 JWT whose header carries the signing
certificate as `x5c`; distribution 2.8 (`auth.token`) accepts it because that certificate
is its `rootcertbundle`. A user given as NAME:TOKEN gets pull and push on every repository,
one given as NAME:TOKEN:GLOB[,GLOB] pull of the repositories those globs match only (another
Hub account that cannot see a private repository gets a token without access to it).
Anonymous callers get pull of the --public repositories and no access to the others (so the
registry refuses them, like a private Hub repository), or pull of all under --anonymous-pull
(like ghcr.io or quay.io for a public image); a wrong secret is a 401. Each request is logged
as one JSON line (the user's name, never the secret).
"""
import argparse
import base64
import fnmatch
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


def matches(name, globs):
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def granted(scopes, user, cfg):
    """The JWT `access` list for an authenticated `user` (None: anonymous): what its globs
    (or --public, --anonymous-pull) allow of what was asked for."""
    access = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if user is not None:
            globs = cfg.users[user][1]
            allowed = ("pull", "push") if globs is None else ("pull",) if matches(name, globs) else ()
        else:
            allowed = ("pull",) if cfg.anonymous_pull or matches(name, cfg.public) else ()
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
        authenticated = user in cfg.users and cfg.users[user][0] == secret
        self.server.log({"user": user, "authenticated": authenticated,
                         "service": query.get("service", [""])[0], "scopes": query.get("scope", [])})
        if user is not None and not authenticated:
            return self.reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "wrong user or token"}]})
        now = int(time.time())
        claims = {"iss": cfg.issuer, "sub": user or "", "aud": query.get("service", [""])[0],
                  "iat": now, "nbf": now - 5, "exp": now + cfg.ttl, "jti": b64url(os.urandom(9)),
                  "access": granted(query.get("scope", []), user if authenticated else None, cfg)}
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
    ap.add_argument("--user", action="append", required=True,
                    help="NAME:TOKEN (pull and push everywhere) or NAME:TOKEN:GLOB[,GLOB] (pull of "
                    "those repositories only); repeatable")
    ap.add_argument("--public", action="append", default=[],
                    help="a repository glob anonymous callers may pull; repeatable")
    ap.add_argument("--ttl", type=int, default=60, help="token lifetime in seconds")
    ap.add_argument("--log", help="JSON lines file (default stderr)")
    ap.add_argument("--anonymous-pull", action="store_true", help="grant pull to anonymous callers")
    cfg = ap.parse_args()
    cfg.users = {}
    for spec in cfg.user:
        name, _, rest = spec.partition(":")
        secret, _, globs = rest.partition(":")
        cfg.users[name] = (secret, globs.split(",") if globs else None)

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

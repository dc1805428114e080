#!/usr/bin/env python3
"""Helpers for tests/lazy/run.sh (stdlib only).

    image.py tree DIR [--seed N]          a deterministic test tree: small files, nested dirs, an
                                          empty file, a symlink, 1.5 and 4 MiB random files, 2 MiB
                                          of zeros; prints files and bytes
    image.py push REGISTRY REPO TAG --bootstrap FILE --blob FILE [--fs-version 6]
                                          pushes a nydus image through the registry's push API:
                                          the data blob (its digest is its name in the bootstrap),
                                          the bootstrap as a tar.gz layer (image/image.boot), an
                                          OCI config and an OCI manifest with nydus annotations;
                                          prints the manifest digest
    image.py fetch-bootstrap MIRROR REPO TAG OUT
                                          reads the manifest through the mirror, pulls the layer
                                          annotated nydus-bootstrap, checks its digest, writes
                                          image/image.boot to OUT; prints the data blobs'
                                          "digest size" lines
    image.py compare SRC MNT              reads every entry under MNT and compares it with SRC
                                          (type, size, sha256 of files, symlink targets); exit 1
                                          on any difference
    image.py access LOG START [DIGEST]    from the mirror's JSON log, the access lines after line
                                          START (the blob DIGEST's only, if given): JSON with the
                                          count of blob requests by method and status, and bytes
    image.py nydus-metrics SOCKET         nydusd's count of backend reads, from its API socket
    image.py lines FILE                   the number of lines of FILE (0 if missing)
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# The annotations nydusify writes (containerd/nydus-snapshotter's label constants).
BLOB_ANNOTATION = "containerd.io/snapshot/nydus-blob"
BOOTSTRAP_ANNOTATION = "containerd.io/snapshot/nydus-bootstrap"
FS_VERSION_ANNOTATION = "containerd.io/snapshot/nydus-fs-version"
TIMEOUT = 60


# --- the test tree ----------------------------------------------------------------------------
def make_tree(root, seed):
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)

    def write(rel, data):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    for i in range(40):
        words = " ".join(f"line {i}.{j} {rng.random():.12f}" for j in range(rng.randrange(0, 300)))
        write(f"etc/small-{i:02}.txt", words.encode())
    write("a/b/c/d/e/deep.txt", b"five levels down\n")
    write("a/b/sibling.json", json.dumps({"seed": seed, "n": list(range(50))}).encode())
    write("empty", b"")
    write("bin/medium.bin", rng.randbytes(1536 << 10))
    write("bin/big.bin", rng.randbytes(4 << 20))
    write("bin/zeros.bin", bytes(2 << 20))
    write("bin/odd-size.bin", rng.randbytes((1 << 20) + 12345))
    os.symlink("etc/small-00.txt", os.path.join(root, "link-to-small"))
    files = sizes = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                files += 1
                sizes += os.path.getsize(p)
    print(f"{files} files, {sizes} bytes")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def listing(root):
    """path -> (kind, size or target, sha256) for every entry under root (root excluded)."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("symlink", os.readlink(p), "")
            elif os.path.isdir(p):
                out[rel] = ("dir", "", "")
            else:
                out[rel] = ("file", os.path.getsize(p), sha256_file(p))
    return out


def compare(src, mnt):
    want, got = listing(src), listing(mnt)
    bad = []
    for rel in sorted(set(want) | set(got)):
        if rel not in got:
            bad.append(f"missing in the mount: {rel}")
        elif rel not in want:
            bad.append(f"not in the source: {rel}")
        elif want[rel] != got[rel]:
            bad.append(f"differs: {rel}: source {want[rel]}, mount {got[rel]}")
    files = [v for v in got.values() if v[0] == "file"]
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{len(files)} files ({sum(v[1] for v in files)} bytes), {len(got)} entries read; "
          f"{len(bad)} differences")
    return 1 if bad else 0


# --- the registry API -------------------------------------------------------------------------
def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {url}: {e.code} {e.read()[:300]!r}") from None


def push_blob(registry, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _, headers, _ = request("POST", f"{registry}/v2/{repo}/blobs/uploads/")
    location = urllib.parse.urljoin(registry, headers["Location"])
    sep = "&" if "?" in location else "?"
    request("PUT", f"{location}{sep}digest={digest}", data,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    return {"digest": digest, "size": len(data)}


def bootstrap_layer(bootstrap):
    """image/image.boot in a gzip'd tar, as nydusify packs it; (compressed, uncompressed digest)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = open(bootstrap, "rb").read()
        info = tarfile.TarInfo("image/image.boot")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))
    plain = raw.getvalue()
    return gzip.compress(plain, mtime=0), "sha256:" + hashlib.sha256(plain).hexdigest()


def push(args):
    blob = open(args.blob, "rb").read()
    name = os.path.basename(args.blob)
    data_desc = push_blob(args.registry, args.repo, blob)
    if len(name) == 64 and data_desc["digest"] != f"sha256:{name}":
        raise SystemExit(f"blob {name} does not hash to its name ({data_desc['digest']})")
    layer, diff_id = bootstrap_layer(args.bootstrap)
    boot_desc = push_blob(args.registry, args.repo, layer)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [data_desc["digest"], diff_id]},
    }, sort_keys=True).encode()
    config_desc = push_blob(args.registry, args.repo, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config_desc},
        "layers": [
            {"mediaType": NYDUS_BLOB, **data_desc, "annotations": {BLOB_ANNOTATION: "true"}},
            {"mediaType": TAR_GZIP, **boot_desc, "annotations": {
                BOOTSTRAP_ANNOTATION: "true", FS_VERSION_ANNOTATION: args.fs_version}},
        ],
    }, sort_keys=True).encode()
    request("PUT", f"{args.registry}/v2/{args.repo}/manifests/{args.tag}", manifest,
            {"Content-Type": OCI_MANIFEST})
    print("sha256:" + hashlib.sha256(manifest).hexdigest())


def fetch_bootstrap(args):
    base = f"http://{args.mirror}/v2/{args.repo}"
    _, _, body = request("GET", f"{base}/manifests/{args.tag}", headers={"Accept": OCI_MANIFEST})
    manifest = json.loads(body)
    boots = [l for l in manifest["layers"] if l.get("annotations", {}).get(BOOTSTRAP_ANNOTATION) == "true"]
    if len(boots) != 1:
        raise SystemExit(f"expected one bootstrap layer, found {len(boots)}")
    _, _, layer = request("GET", f"{base}/blobs/{boots[0]['digest']}")
    got = "sha256:" + hashlib.sha256(layer).hexdigest()
    if got != boots[0]["digest"]:
        raise SystemExit(f"bootstrap layer: got {got}, manifest says {boots[0]['digest']}")
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("image/image.boot")
        with open(args.out, "wb") as f:
            f.write(member.read())
    for l in manifest["layers"]:
        if l.get("annotations", {}).get(BLOB_ANNOTATION) == "true":
            print(l["digest"], l["size"])


# --- the mirror's access log ------------------------------------------------------------------
def access(args):
    counts, byte_counts, sizes = Counter(), Counter(), []
    with open(args.log, errors="replace") as f:
        for n, line in enumerate(f):
            if n < args.start or not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            fields = rec.get("fields", rec)
            if fields.get("kind") != "blob":
                continue
            if args.digest and fields.get("reference") != args.digest:
                continue
            key = f"{fields.get('method')} {fields.get('status')}"
            counts[key] += 1
            byte_counts[key] += int(fields.get("bytes", 0))
            if fields.get("method") == "GET":
                sizes.append(int(fields.get("bytes", 0)))
    print(json.dumps({
        "requests": dict(counts), "bytes": dict(byte_counts),
        "get_sizes": {"min": min(sizes, default=0), "max": max(sizes, default=0)},
    }, sort_keys=True))


def nydus_metrics(args):
    """nydusd's backend metrics (GET /api/v1/metrics/backend on its API socket), in one line."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(args.socket)

    try:
        conn = UnixConnection("localhost")
        conn.request("GET", "/api/v1/metrics/backend")
        m = json.loads(conn.getresponse().read())
    except (OSError, ValueError) as e:
        print(f"nydusd backend: no metrics ({e})")
        return
    print(f"nydusd backend: {m.get('read_count')} reads, {m.get('read_amount_total')} bytes, "
          f"{m.get('read_errors')} errors")


def lines(args):
    try:
        with open(args.file, "rb") as f:
            print(sum(1 for _ in f))
    except FileNotFoundError:
        print(0)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tree")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=25)
    s = sub.add_parser("push")
    s.add_argument("registry")
    s.add_argument("repo")
    s.add_argument("tag")
    s.add_argument("--bootstrap", required=True)
    s.add_argument("--blob", required=True)
    s.add_argument("--fs-version", default="6")
    f = sub.add_parser("fetch-bootstrap")
    f.add_argument("mirror")
    f.add_argument("repo")
    f.add_argument("tag")
    f.add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("src")
    c.add_argument("mnt")
    a = sub.add_parser("access")
    a.add_argument("log")
    a.add_argument("start", type=int)
    a.add_argument("digest", nargs="?")
    m = sub.add_parser("nydus-metrics")
    m.add_argument("socket")
    n = sub.add_parser("lines")
    n.add_argument("file")
    args = p.parse_args()
    if args.cmd == "tree":
        make_tree(args.dir, args.seed)
    elif args.cmd == "push":
        push(args)
    elif args.cmd == "fetch-bootstrap":
        fetch_bootstrap(args)
    elif args.cmd == "compare":
        sys.exit(compare(args.src, args.mnt))
    elif args.cmd == "access":
        access(args)
    elif args.cmd == "nydus-metrics":
        nydus_metrics(args)
    elif args.cmd == "lines":
        lines(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Make deterministic benchmark blobs and push them as one image to a registry (stdlib only).

    seed.py --registry 127.0.0.1:PORT --repo library/bench --tag v1 --dir DIR big=256MiB [small=1MiB ...]

Each NAME=SIZE blob is SIZE pseudo-random (incompressible) bytes, the same on every run, written
to DIR/NAME.blob and uploaded with the registry's monolithic upload API (POST, then PUT with
?digest=). The blobs become the layers of an OCI image manifest pushed as REPO:TAG, so the
content is reachable by tag and by digest like any image. Prints JSON: the manifest's digest,
media type and file, and each blob's digest, size and file.
"""
import argparse, hashlib, http.client, json, os, random, re, sys, urllib.parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1 << 20


def parse_size(s):
    m = re.fullmatch(r"(\d+)([KMG]i?B?)?", s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    return int(m[1]) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[(m[2] or "")[:1].upper()]


def make_blob(path, size, seed):
    """Writes SIZE deterministic bytes to PATH (kept if already right); returns the hex digest."""
    rng, h = random.Random(seed), hashlib.sha256()
    chunks = (rng.randbytes(min(CHUNK, size - off)) for off in range(0, size, CHUNK))
    if os.path.exists(path) and os.path.getsize(path) == size:
        for c in chunks:
            h.update(c)
        return h.hexdigest()  # content is a function of the seed; skip the rewrite
    with open(path + ".tmp", "wb") as f:
        for c in chunks:
            h.update(c)
            f.write(c)
    os.replace(path + ".tmp", path)
    return h.hexdigest()


class Registry:
    def __init__(self, hostport, repo):
        self.hostport, self.repo = hostport, repo

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.hostport, timeout=300)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r, data

    def has_blob(self, digest):
        r, _ = self.request("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        return r.status == 200

    def put_blob(self, digest, size, body):
        if self.has_blob(digest):
            return
        r, data = self.request("POST", f"/v2/{self.repo}/blobs/uploads/", headers={"Content-Length": "0"})
        if r.status != 202:
            sys.exit(f"upload start: {r.status} {data[:200]!r}")
        loc = urllib.parse.urlsplit(r.getheader("Location"))
        q = urllib.parse.parse_qsl(loc.query) + [("digest", digest)]
        path = f"{loc.path}?{urllib.parse.urlencode(q)}"
        r, data = self.request("PUT", path, body=body, headers={
            "Content-Length": str(size), "Content-Type": "application/octet-stream"})
        if r.status != 201:
            sys.exit(f"upload {digest}: {r.status} {data[:200]!r}")

    def put_manifest(self, tag, body):
        r, data = self.request("PUT", f"/v2/{self.repo}/manifests/{tag}", body=body,
                               headers={"Content-Type": OCI_MANIFEST})
        if r.status != 201:
            sys.exit(f"manifest push: {r.status} {data[:200]!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", required=True, help="host:port (plain HTTP)")
    ap.add_argument("--repo", default="library/bench")
    ap.add_argument("--tag", default="v1")
    ap.add_argument("--dir", required=True)
    ap.add_argument("blobs", nargs="+", help="NAME=SIZE, e.g. big=256MiB")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    reg = Registry(a.registry, a.repo)
    out = {"repo": a.repo, "tag": a.tag, "blobs": {}}
    layers = []
    for spec in a.blobs:
        name, _, size = spec.partition("=")
        size = parse_size(size)
        path = os.path.join(a.dir, f"{name}.blob")
        digest = "sha256:" + make_blob(path, size, f"pullthrough-bench/{name}/{size}")
        with open(path, "rb") as f:
            reg.put_blob(digest, size, f)
        out["blobs"][name] = {"digest": digest, "size": size, "path": path}
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}},
                        separators=(",", ":")).encode()
    cfg_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    reg.put_blob(cfg_digest, len(config), config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(config)},
                           "layers": layers}, separators=(",", ":")).encode()
    reg.put_manifest(a.tag, manifest)
    mpath = os.path.join(a.dir, "manifest.json")
    with open(mpath, "wb") as f:
        f.write(manifest)
    out["manifest"] = {"digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                       "media_type": OCI_MANIFEST, "size": len(manifest), "path": mpath}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

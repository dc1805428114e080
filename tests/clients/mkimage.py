#!/usr/bin/env python3
"""Deterministic OCI image layouts for the client suite (stdlib only).

    mkimage.py LAYOUT TAG [--arch amd64 --arch arm64] [--layers 2] [--layer-size 2MiB]
                          [--gzip-level 1] [--busybox /bin/busybox] [--seed S]

Adds TAG to the OCI layout directory LAYOUT (created if missing). With one --arch the tag
names an image manifest; with several, an OCI image index over one manifest per arch.
Random layers hold one file of incompressible pseudo-random bytes, so their size on the
wire is about --layer-size (a cut after 1 MiB really cuts them). --busybox adds a first
layer with a static busybox and makes `busybox echo` the command, so the image can run.

Same arguments, same bytes, same digests: every tar and gzip header field that could
vary (mtime, owner, gzip name/time) is fixed. Prints {"tag", "digest", "blobs"} as JSON.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
EPOCH = "2024-01-01T00:00:00Z"
HELLO = "hello from pullthrough"


def size_arg(text):
    m = re.fullmatch(r"(\d+)([KMG]i?B?)?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (m.group(2) or " ")[0].upper()
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30}.get(unit, 0)


def canonical(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class Digesting:
    """A write-only file that hashes and counts the bytes passing through to `sink`."""

    def __init__(self, sink):
        self.sink, self.sha, self.size = sink, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.sink.write(data) if self.sink else len(data)

    def flush(self):
        pass

    def digest(self):
        return "sha256:" + self.sha.hexdigest()


class RandomFile:
    """`size` deterministic pseudo-random bytes, read like a file (tarfile pulls from it)."""

    def __init__(self, seed, size):
        self.rng, self.left = random.Random(seed), size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


class Layout:
    def __init__(self, root):
        self.root = root
        self.blobdir = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blobdir, exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def put_json(self, media_type, obj):
        data = canonical(obj)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._write_once(digest, lambda f: f.write(data))
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def put_layer(self, add_members, level):
        """Streams tar -> gzip -> disk; returns (descriptor, diff_id of the plain tar)."""
        tmp = os.path.join(self.blobdir, ".layer.partial")
        with open(tmp, "wb") as raw:
            packed = Digesting(raw)
            # filename="" and mtime=0 keep the gzip header identical run to run.
            with gzip.GzipFile(filename="", mode="wb", fileobj=packed, compresslevel=level, mtime=0) as gz:
                plain = Digesting(gz)
                with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    add_members(tar)
        os.replace(tmp, self._path(packed.digest()))
        desc = {"mediaType": OCI_LAYER_GZIP, "digest": packed.digest(), "size": packed.size}
        return desc, plain.digest()

    def tag(self, desc, tag):
        """Points TAG at `desc` in index.json, replacing an older entry for the same tag."""
        path = os.path.join(self.root, "index.json")
        try:
            with open(path) as f:
                index = json.load(f)
        except FileNotFoundError:
            index = {"schemaVersion": 2, "manifests": []}
        key = "org.opencontainers.image.ref.name"
        index["manifests"] = [m for m in index["manifests"] if m.get("annotations", {}).get(key) != tag]
        index["manifests"].append({**desc, "annotations": {key: tag}})
        with open(path + ".partial", "w") as f:
            json.dump(index, f, indent=1)
        os.replace(path + ".partial", path)

    def _path(self, digest):
        return os.path.join(self.blobdir, digest.split(":", 1)[1])

    def _write_once(self, digest, write):
        if not os.path.exists(self._path(digest)):
            with open(self._path(digest) + ".partial", "wb") as f:
                write(f)
            os.replace(self._path(digest) + ".partial", self._path(digest))


def member(name, size=0, mode=0o644, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type, info.linkname = size, mode, kind, link
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
    return info


def random_layer(seed, size):
    def add(tar):
        tar.addfile(member("data/", mode=0o755, kind=tarfile.DIRTYPE))
        tar.addfile(member("data/payload.bin", size), RandomFile(seed, size))
    return add


def busybox_layer(path):
    def add(tar):
        with open(path, "rb") as f:
            data = f.read()
        tar.addfile(member("bin/", mode=0o755, kind=tarfile.DIRTYPE))
        tar.addfile(member("bin/busybox", len(data), mode=0o755), io.BytesIO(data))
        tar.addfile(member("bin/sh", kind=tarfile.SYMTYPE, link="busybox"))
    return add


def build_image(layout, arch, args):
    adders = [busybox_layer(args.busybox)] if args.busybox else []
    adders += [random_layer(f"{args.seed}/{arch}/{i}", args.layer_size) for i in range(args.layers)]
    layers, diff_ids = [], []
    for add in adders:
        desc, diff_id = layout.put_layer(add, args.gzip_level)
        layers.append(desc)
        diff_ids.append(diff_id)
    cmd = ["/bin/busybox", "echo", HELLO] if args.busybox else ["/bin/sh"]
    config = layout.put_json(OCI_CONFIG, {
        "created": EPOCH, "architecture": arch, "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "Labels": {"seed": args.seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": EPOCH, "created_by": "tests/clients/mkimage.py"} for _ in layers],
    })
    manifest = layout.put_json(OCI_MANIFEST, {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers,
    })
    return manifest, [config["digest"]] + [l["digest"] for l in layers]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layout")
    ap.add_argument("tag")
    ap.add_argument("--arch", action="append", help="repeat for a multi-arch index (default amd64)")
    ap.add_argument("--layers", type=int, default=2, help="random layers per image")
    ap.add_argument("--layer-size", type=size_arg, default=size_arg("2MiB"))
    ap.add_argument("--gzip-level", type=int, default=1, help="0 stores: fastest for big layers")
    ap.add_argument("--busybox", help="static busybox binary to put in a first layer")
    ap.add_argument("--seed", help="default: the tag")
    args = ap.parse_args()
    args.arch = args.arch or ["amd64"]
    args.seed = args.seed or args.tag

    layout = Layout(args.layout)
    manifests, blobs = [], []
    for arch in args.arch:
        manifest, image_blobs = build_image(layout, arch, args)
        manifests.append({**manifest, "platform": {"architecture": arch, "os": "linux"}})
        blobs += image_blobs
    if len(manifests) == 1:
        top = {k: v for k, v in manifests[0].items() if k != "platform"}
    else:
        top = layout.put_json(OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    layout.tag(top, args.tag)
    json.dump({"tag": args.tag, "digest": top["digest"], "blobs": blobs}, sys.stdout)
    print()


if __name__ == "__main__":
    main()

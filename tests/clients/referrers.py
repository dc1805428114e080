#!/usr/bin/env python3
"""Attaches an SBOM artifact to an image in a registry, the way `oras attach` does (stdlib only).

    referrers.py attach REGISTRY REPO TAG ARTIFACT_TYPE   prints the artifact manifest's digest

REGISTRY is host:port of an anonymous, plain-HTTP registry. The artifact is an OCI 1.1 image
manifest with `artifactType`, an empty config and one layer, whose `subject` is the manifest
TAG points at. CNCF distribution 2.8 has no referrers API, so, as the OCI distribution-spec
tells clients to do then, the attachment is also listed in the referrers tag schema: an image
index tagged `sha256-<hex of the subject digest>`, extended if it exists.
"""
import hashlib
import json
import sys
import urllib.error
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX,
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.headers, resp.read()


def push_blob(base, repo, data):
    _, headers, _ = request("POST", f"{base}/v2/{repo}/blobs/uploads/")
    location = headers["Location"]
    if location.startswith("/"):
        location = base + location
    sep = "&" if "?" in location else "?"
    request("PUT", f"{location}{sep}digest={digest(data)}", data,
            {"Content-Type": "application/octet-stream"})
    return {"mediaType": None, "digest": digest(data), "size": len(data)}


def push_manifest(base, repo, ref, media_type, data):
    request("PUT", f"{base}/v2/{repo}/manifests/{ref}", data, {"Content-Type": media_type})


def attach(registry, repo, tag, artifact_type):
    base = f"http://{registry}"
    _, headers, subject_bytes = request("GET", f"{base}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
    subject = {"mediaType": headers["Content-Type"].split(";")[0], "digest": digest(subject_bytes),
               "size": len(subject_bytes)}
    config = push_blob(base, repo, b"{}")
    config["mediaType"] = EMPTY
    layer = push_blob(base, repo, json.dumps({"spdxVersion": "SPDX-2.3", "name": repo}).encode())
    layer["mediaType"] = artifact_type
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                "config": config, "layers": [layer], "subject": subject,
                "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"}}
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    manifest_digest = digest(manifest_bytes)
    push_manifest(base, repo, manifest_digest, OCI_MANIFEST, manifest_bytes)

    fallback_tag = subject["digest"].replace(":", "-")
    try:
        _, _, existing = request("GET", f"{base}/v2/{repo}/manifests/{fallback_tag}", headers={"Accept": OCI_INDEX})
        index = json.loads(existing)
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": manifest_digest,
                               "size": len(manifest_bytes), "artifactType": artifact_type,
                               "annotations": manifest["annotations"]})
    push_manifest(base, repo, fallback_tag, OCI_INDEX, json.dumps(index).encode())
    print(manifest_digest)


def main(argv):
    if len(argv) == 6 and argv[1] == "attach":
        attach(*argv[2:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

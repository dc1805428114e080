#!/usr/bin/env python3
"""Lays out the Docker build context as `docker build .` would send it, into DEST.

Reads .dockerignore with Docker's rules (patterns in order, the last matching one wins, `!`
re-includes; a pattern that matches a directory covers everything under it; `*` and `?` stay
within one path component, `**` crosses them) and copies the repository's tracked files that
survive it. Then checks that every source of the Dockerfile's COPY instructions (those not
`--from` another stage) is in the context. .ci/lint-packaging runs Cargo on the result, so a
file that Cargo needs but the context leaves out (the [[bench]] of issue 17) fails here and not
only in a real image build.

usage: docker-context.py DEST
"""

import os
import re
import shutil
import subprocess
import sys


def compile_pattern(pattern):
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def read_patterns(path):
    patterns = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            body = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            patterns.append((negate, compile_pattern(body)))
    return patterns


def included(path, patterns):
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    keep = True
    for negate, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            keep = negate
    return keep


def copy_sources(dockerfile):
    """The local sources of COPY/ADD instructions, line continuations joined."""
    text = re.sub(r"\\\n", " ", open(dockerfile).read())
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(a.startswith("--from") for a in args):
            continue
        args = [a for a in args if not a.startswith("--")]
        yield from args[:-1]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    dest = sys.argv[1]
    patterns = read_patterns(".dockerignore")
    files = subprocess.run(
        ["git", "ls-files", "-z"], check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for f in filter(None, files):
        if os.path.exists(f) and included(f, patterns):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(f, os.path.join(dest, f))
    missing = [s for s in copy_sources("Dockerfile") if not os.path.exists(os.path.join(dest, s))]
    if missing:
        sys.exit(f"Dockerfile copies {missing}, which .dockerignore keeps out of the context")


if __name__ == "__main__":
    main()

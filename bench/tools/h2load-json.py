#!/usr/bin/env python3
"""Turns h2load's text output (stdin) into the JSON line wrk-json.lua prints (stdlib only).

    h2load ... | h2load-json.py

Prints {"requests", "bytes" (response body bytes), "duration_s", "errors", "non2xx",
"protocol"}: requests = those answered 2xx; errors = errored + timeout (h2load's "failed" also counts
non-2xx answers, which are in non2xx).
h2load reports no latency percentiles, so there are none here. Exits 1 without a result.
"""
import json, re, sys


def main():
    text = sys.stdin.read()
    fin = re.search(r"^finished in ([\d.]+)(ms|s|us),", text, re.M)
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", text, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    data = re.search(r"^traffic: .*, \S+ \((\d+)\) data", text, re.M)
    proto = re.search(r"^Application protocol: (\S+)", text, re.M)
    if not (fin and req and codes and data):
        sys.stderr.write("h2load-json: no result in h2load's output\n")
        return 1
    duration = float(fin[1]) / {"s": 1, "ms": 1e3, "us": 1e6}[fin[2]]
    ok2xx = int(codes[1])
    out = {"requests": ok2xx, "bytes": int(data[1]), "duration_s": duration,
           "errors": int(req[6]) + int(req[7]),  # "failed" also counts the non-2xx
           "non2xx": int(codes[2]) + int(codes[3]) + int(codes[4]),
           "protocol": proto[1] if proto else None}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

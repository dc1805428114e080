-- wrk script: prints one machine-readable line after the run (request headers come from -H).
--   WRKJSON {"requests":..,"bytes":..,"duration_s":..,"errors":..,"non2xx":..,"p50_us":..,"p99_us":..}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "bytes": %d, "duration_s": %.6f, "errors": %d, "non2xx": %d, ' ..
    '"p50_us": %.1f, "p99_us": %.1f, "max_us": %.1f}\n',
    summary.requests, summary.bytes, summary.duration / 1e6,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end

-- wrk reporter of `make bench`: one machine-readable line at the end of the run.
-- BENCH <requests> <seconds> <p50 us> <p99 us> <max us> <non-2xx> <connect> <read> <write> <timeout errors>
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %.6f %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end

-- wrk script of the intake scenario of `make bench`: POST /messages with a JSON body, then the same
-- machine-readable line as report.lua at the end of the run.
wrk.method = "POST"
wrk.body = '{"recipient": "+905551111111", "content": "bench intake"}'
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %.6f %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end

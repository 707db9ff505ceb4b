-- POST request bodies read from a file (one JSON body per line) in turn on each connection, and print
-- the result as one JSON line. Used by bench/loadgen.py's wrk client:
--   wrk -c 32 -t 1 -d 5s -s bench/wrk_bodies.lua http://127.0.0.1:8000/embed -- bodies.jsonl
local bodies = {}
local position = 0

function init(args)
  for line in io.lines(args[1]) do
    bodies[#bodies + 1] = line
  end
  position = math.random(#bodies)
end

function request()
  position = position % #bodies + 1
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, bodies[position])
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_s": %.6f, "non_2xx": %d, "socket_errors": %d, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, errors.status,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000))
end

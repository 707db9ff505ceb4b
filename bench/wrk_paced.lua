-- One POST body (args[1], a file) per request; after each answer a connection waits a random 0-2x
-- INTERVAL_MS milliseconds, so that C connections offer about C / INTERVAL_MS requests per millisecond
-- whatever the answers take (an open-loop load, as long as answers are much faster than the interval).
-- Prints the statuses and the latency percentiles as one JSON line. Used by bench/refusal_latency.py.
local body
local interval = tonumber(os.getenv("INTERVAL_MS") or "1000")
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  body = file:read("*a")
  file:close()
  statuses = {}
end

function request()
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
end

function delay()
  return math.random(0, 2 * interval)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals, counts = {}, {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + count
    end
  end
  for status, count in pairs(totals) do
    counts[#counts + 1] = string.format('"%d": %d', status, count)
  end
  io.write(string.format(
    '{"statuses": {%s}, "timeouts": %d, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "p999_ms": %.3f, "max_ms": %.3f}\n',
    table.concat(counts, ", "), summary.errors.timeout, latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    latency.max / 1000))
end

-- Shared by the workload scripts (loaded with dofile from the same directory).
-- Each workload script sets `counts` (a table key -> requests sent) in every
-- thread, or leaves it nil when the key set is trivial; `done` prints one
-- machine-readable line that bench/report parses:
--
--   WRKJSON {"requests":N,"duration_s":..,"rps":..,"p50_ms":..,"p90_ms":..,
--            "p99_ms":..,"max_ms":..,"mean_ms":..,"errors":{...},
--            "key_hist":{"<requests to a key>":<number of keys>, ...}}
--
-- key_hist is the histogram of per-key request counts (client side); with the
-- upstream's count it gives the theoretical minimum of upstream requests,
-- sum over keys of min(requests to the key, ceil(duration / (ttl + latency))).

local M = {}

function M.json_hist(h)
   local parts = {}
   for n, k in pairs(h) do
      parts[#parts + 1] = string.format('"%d":%d', n, k)
   end
   return "{" .. table.concat(parts, ",") .. "}"
end

-- done() for wrk; hist_fn(summary) returns the key histogram table.
function M.make_done(hist_fn)
   return function(summary, latency, requests)
      local e = summary.errors
      local dur = summary.duration / 1e6
      local hist = hist_fn(summary)
      io.write(string.format(
         'WRKJSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f,' ..
         '"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"key_hist":%s}\n',
         summary.requests, dur, summary.requests / dur,
         latency:percentile(50) / 1000, latency:percentile(90) / 1000,
         latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000,
         summary.bytes, e.connect, e.read, e.write, e.status, e.timeout, M.json_hist(hist)))
   end
end

-- Sum the per-thread `counts` tables into a histogram count -> keys.
function M.hist_from_threads(threads)
   local total = {}
   for _, t in ipairs(threads) do
      local c = t:get("counts")
      if c then
         for k, n in pairs(c) do
            total[k] = (total[k] or 0) + n
         end
      end
   end
   local h = {}
   for _, n in pairs(total) do
      h[n] = (h[n] or 0) + 1
   end
   return h
end

-- Thread bookkeeping shared by the scripts: setup() numbers the threads.
M.threads = {}
function M.setup(thread)
   thread:set("id", #M.threads + 1)
   M.threads[#M.threads + 1] = thread
end

return M

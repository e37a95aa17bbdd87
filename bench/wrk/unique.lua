-- Workload (d): all-miss traffic, every request for a key never seen before:
-- <BENCH_PREFIX>/<thread>-<counter><BENCH_QUERY>. Use BENCH_QUERY="?delay=0s"
-- to ask the upstream to answer at once (CPU-bound run, where a proxy's own
-- overhead shows in req/s).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local prefix = os.getenv("BENCH_PREFIX") or "/miss"
local query = os.getenv("BENCH_QUERY") or ""

setup = common.setup

local n = 0
sent = 0

function request()
   n = n + 1
   sent = n
   return wrk.format("GET", prefix .. "/" .. (id or 0) .. "-" .. n .. query)
end

done = common.make_done(function(summary)
   -- every key was requested once
   local total = 0
   for _, t in ipairs(common.threads) do
      total = total + (t:get("sent") or 0)
   end
   return { [1] = total }
end)

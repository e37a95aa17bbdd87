-- Memory test: cycle through BENCH_KEYS keys (default 10 000) over and over,
-- <BENCH_PREFIX>/<k>, so that with a TTL of 1 s every key stays live in a
-- micro-cache. Threads start at different offsets.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local nkeys = tonumber(os.getenv("BENCH_KEYS") or "10000")
local prefix = os.getenv("BENCH_PREFIX") or "/mem"

setup = common.setup

local reqs, i
counts = {}

function init(args)
   reqs = {}
   for k = 1, nkeys do
      reqs[k] = wrk.format("GET", prefix .. "/" .. k)
   end
   i = math.floor(((id or 1) - 1) * nkeys / 7) % nkeys
end

function request()
   i = i % nkeys + 1
   counts[i] = (counts[i] or 0) + 1
   return reqs[i]
end

done = common.make_done(function(summary)
   return common.hist_from_threads(common.threads)
end)

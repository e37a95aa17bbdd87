-- Workload (c): BENCH_KEYS keys (default 10 000) with a Zipf-like popularity,
-- P(rank k) proportional to 1 / k^s, s = BENCH_ZIPF_S (default 1.1). Paths are
-- <BENCH_PREFIX>/<rank>. The CDF is precomputed per thread; each thread draws
-- from its own deterministic random sequence (same sequence for every system).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local nkeys = tonumber(os.getenv("BENCH_KEYS") or "10000")
local s = tonumber(os.getenv("BENCH_ZIPF_S") or "1.1")
local prefix = os.getenv("BENCH_PREFIX") or "/zipf"
local query = os.getenv("BENCH_QUERY") or ""

setup = common.setup

local cdf, reqs
counts = {}

function init(args)
   local w, sum = {}, 0
   for k = 1, nkeys do
      w[k] = 1 / (k ^ s)
      sum = sum + w[k]
   end
   cdf, reqs = {}, {}
   local acc = 0
   for k = 1, nkeys do
      acc = acc + w[k] / sum
      cdf[k] = acc
      reqs[k] = wrk.format("GET", prefix .. "/" .. k .. query)
   end
   cdf[nkeys] = 1.0
   math.randomseed(7919 * (id or 1))
end

function request()
   local u = math.random()
   local lo, hi = 1, nkeys
   while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
   end
   counts[lo] = (counts[lo] or 0) + 1
   return reqs[lo]
end

done = common.make_done(function(summary)
   return common.hist_from_threads(common.threads)
end)

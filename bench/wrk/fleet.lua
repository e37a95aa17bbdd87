-- The fleet workloads: one key, asked of the instances of a fleet at once.
-- wrk sends all the requests of a thread to one address; setup() gives the
-- threads the instances listed in BENCH_FLEET_ADDRS ("host:port,host:port,...")
-- in turn, so with as many threads as instances (-t3 for three) each instance
-- serves its share of the connections, all of them at the same time, and wrk
-- still sums up one run: one req/s, one latency histogram. Every request
-- carries the Host of BENCH_HOST, as behind a load balancer: instances share a
-- key only when its request is the same, Host included.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

local host = os.getenv("BENCH_HOST")
if host and host ~= "" then
   wrk.headers["Host"] = host
end

local addrs = nil

function setup(thread)
   if not addrs then
      addrs = {}
      for a in (os.getenv("BENCH_FLEET_ADDRS") or ""):gmatch("[^%s,]+") do
         local h, p = a:match("^(.+):(%d+)$")
         local found = h and wrk.lookup(h, p)
         if not found or #found == 0 then
            error("fleet.lua: cannot resolve " .. a .. " (BENCH_FLEET_ADDRS)")
         end
         addrs[#addrs + 1] = found[1]
      end
      if #addrs == 0 then
         error("fleet.lua: BENCH_FLEET_ADDRS names no instance")
      end
   end
   common.setup(thread)
   thread.addr = addrs[(#common.threads - 1) % #addrs + 1]
end

done = common.make_done(function(summary)
   -- every request was for the same key
   return { [summary.requests] = 1 }
end)

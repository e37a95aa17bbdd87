-- Workload (a): one hot key. The path is the one given on wrk's command line;
-- no request() function, so wrk sends its pre-built request (fastest client).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

setup = common.setup
done = common.make_done(function(summary)
   -- every request was for the same key
   return { [summary.requests] = 1 }
end)

-- A worker process for spec/redis_procs_spec.lua: joins group GROUP of
-- STREAM at URL and writes one line "<payload> <consumer>" to OUT for each
-- event it handles (flushed at once, so a kill -9 loses none it wrote).
-- SLOW_MS: each handler first sleeps that long (buzz.sleep: it yields,
-- other events go on). PARTITIONS (environment): bus:redis{ partitions =
-- N, lease = 1 }. It runs until killed.
--   lua5.4 spec/redis/worker.lua URL STREAM GROUP OUT NAME [SLOW_MS [MIN_IDLE]]
local buzz = require "buzz"
local url, stream, group, out, name, slow, min_idle = ...
slow = tonumber(slow) or 0
local f = assert(io.open(out, "a"))
f:setvbuf("no")
local bus = buzz.new{ on_error = function(e)
  io.stderr:write(name, ": ", e, "\n")
end }
local partitions = tonumber(os.getenv("PARTITIONS"))
local r = bus:redis{ url = url, stream = stream, consumer = name,
  fanout = false, start = "all", block = 0.2, count = 20,
  min_idle = tonumber(min_idle) or 1, claim_every = 0.2,
  partitions = partitions, lease = 1 }
r:subscribe("job.>", function(ev)
  if slow > 0 then buzz.sleep(slow / 1000) end
  f:write(("%s %s\n"):format(ev.payload, name))
end, { group = group, concurrency = 8 })
io.stdout:write("ready\n")
io.stdout:flush()
bus:run()

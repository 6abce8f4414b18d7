-- A process for spec/redis_procs_spec.lua that competes for the lease
-- "boss" (LEASE seconds) and, while it leads, writes "<name> <ms>" to OUT
-- every 20 ms (flushed, so a kill -9 loses none). Runs until killed.
--   lua5.4 spec/redis/leader.lua URL STREAM OUT NAME LEASE
local buzz = require "buzz"
local url, stream, out, name, lease = ...
local f = assert(io.open(out, "a"))
f:setvbuf("no")
local bus = buzz.new{ on_error = function(e)
  io.stderr:write(name, ": ", e, "\n")
end }
local r = bus:redis{ url = url, stream = stream, consumer = name,
                     fanout = false }
local l = r:leader("boss", function() end, { lease = tonumber(lease) })
local function beat()
  if l:is_leader() then f:write(("%s %d\n"):format(name, bus:_now())) end
  bus:_after(20, beat)
end
beat()
bus:run()

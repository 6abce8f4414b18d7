-- A worker of the README's "More than one process": joins the consumer
-- group "billing" of the stream "orders" and handles its share of the
-- events until it is stopped (Ctrl-C). Start two or three, then run
-- examples/redis/publish.lua in another terminal.
--   lua5.4 examples/redis/worker.lua [NAME]
local buzz = require "buzz"

local bus = buzz.new()
local r = bus:redis{
  url = os.getenv("REDIS_URL") or "redis://127.0.0.1:6379/0",
  stream = "orders",
  consumer = arg and arg[1] or nil,   -- a stable name resumes its pending
}
r:subscribe("order.*", function(ev)
  print(("%s: %s #%d for %s (attempt %d)"):format(r.consumer, ev.type,
        ev.payload.n, ev.key, ev.attempt))
  io.stdout:flush()
end, { group = "billing" })
bus:run()

-- Publishes N orders (10 unless given) to the stream "orders", for the
-- workers of examples/redis/worker.lua, and returns once Redis has them.
--   lua5.4 examples/redis/publish.lua [N]
local buzz = require "buzz"

local bus = buzz.new()
local r = bus:redis{
  url = os.getenv("REDIS_URL") or "redis://127.0.0.1:6379/0",
  stream = "orders", fanout = false,
}
local n = tonumber(arg and arg[1]) or 10
for i = 1, n do
  assert(r:publish("order.placed", { n = i }, { key = "cust-" .. i % 3 }))
end
assert(r:flush(5))                 -- every XADD confirmed
print(("published %d orders"):format(r:stats().published))
bus:close()

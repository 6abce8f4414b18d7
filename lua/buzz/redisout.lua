--- buzz.redisout: the outbox of a Redis link on a bus with a store
-- (lua/buzz/redis.lua). r:publish called from inside a handler does not
-- send at once: it appends the event's fields to the store as the engine
-- event $OUT.redis, in the writer's order with the handler's other
-- effects, and returns true. A durable consumer of the store
-- ("redis.outbox:STREAM", ordered on the key STREAM: one at a time, in
-- order, each retried with backoff until Redis takes it) sends each
-- one with a script that adds the entry only if the key
-- STREAM:out:CONSUMER:ID is new (SET NX, kept a day):
-- a crash after the send and before the consumer's position moved sends
-- it again, and Redis adds it once. So a handler's publishes are neither
-- lost (they are in the store before they are sent) nor doubled, given a
-- stable consumer name.
-- @module buzz.redisout
local failure = require "buzz.failure"

local type, error, ipairs = type, error, ipairs
local unpack = table.unpack or unpack   -- luacheck: ignore 143

local M = {}

local TYPE = "$OUT.redis"
local SCRIPT = "if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) "
  .. "then return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2)) end "
  .. "return false"
local KEEP_MS = 86400000                  -- how long a sent key is kept

-- The durable consumer's handler: one outbox entry to the stream.
local function sender(link)
  local stream, counts = link.stream, link.counts
  local mine = {}                       -- the streams (partitions) of link
  for _, st in ipairs(link.part_streams) do mine[st] = true end
  return function(ev)
    local p = ev.payload
    if type(p) ~= "table" or not mine[p.s] then return end  -- another's
    local key = ("%s:out:%s:%d"):format(stream, link.consumer, ev.id)
    local ok, v = failure.await(function(done)
      local sent, err = link.cmdc:cmd(function(is_ok, r) done(is_ok, r) end,
        "EVAL", SCRIPT, 2, p.s, key, KEEP_MS, unpack(p.a))
      if not sent then done(false, err) end
    end)
    if not ok then error(v, 0) end     -- retried: it stays in the outbox
    if counts.sending > 0 then counts.sending = counts.sending - 1 end
    if v then
      counts.published = counts.published + 1
    else
      counts.resent = counts.resent + 1  -- Redis had it: sent before
    end
  end
end

--- Starts the outbox of link: its durable consumer.
-- @local
function M.start(link)
  local bus = link.bus
  link.outbox_sub = bus:_subscribe(TYPE, sender(link), {
    durable = "redis.outbox:" .. link.stream, ordered = true,
    retry = { max = 1000000, base = 0.1, max_delay = 5 },
    name = "redis outbox " .. link.stream }, 3)
end

--- r:publish from inside a handler: the fields (args[1..n], from the
--- "*" on) into the store. Returns true, or nil, err, code.
-- @local
function M.put(link, args, first, n)
  local c = link.bus._core
  local a = {}
  for i = first, n do a[#a + 1] = args[i] end
  local id, err, code = c:publish(TYPE, { s = args[2], a = a }, 2,
    link.stream,          -- the key: one ordered lane (a retry holds it)
    nil, nil, nil, nil, nil, true, link.bus._clock.ms)
  if not id then return nil, err, code end
  link.counts.sending = link.counts.sending + 1
  link.counts.outboxed = link.counts.outboxed + 1
  return true
end

return M

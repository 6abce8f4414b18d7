--- buzz example: a producer faster than its consumer, kept honest by
-- queue_limit.
--
--   lua5.4 examples/backpressure.lua      (or luajit)
--
-- Each tick a sensor produces 3 readings while the consumer keeps up with
-- only 2 (bus:step(2)). The queue fills to queue_limit; from then on publish
-- returns nil, "EFULL: ...", "EFULL" and the producer keeps the reading for
-- the next tick instead of dropping it. Nothing is lost, nothing arrives out
-- of order, and a refused publish consumes no id.

-- Run from a checkout, prefer its build (build/<flavour>, or $BUZZ_BUILD);
-- otherwise fall through to an installed buzz (luarocks).
do
  local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
  local build = os.getenv("BUZZ_BUILD")
                or (dir .. "../build/" .. (jit and "luajit" or "lua5.4"))
  local so = io.open(build .. "/buzz/core.so")
  if so then
    so:close()
    package.path = ("%s../lua/?.lua;%s../lua/?/init.lua;%s")
                   :format(dir, dir, package.path)
    package.cpath = build .. "/?.so;" .. package.cpath
  end
end

local buzz = require "buzz"

local LIMIT, READINGS, PER_TICK, CONSUMED_PER_TICK = 4, 15, 3, 2

local bus = assert(buzz.new{ queue_limit = LIMIT })

local received, last_id = {}, 0
bus:subscribe("sensor.temperature", function(ev)
  assert(ev.id == last_id + 1, "ids must be consecutive")
  last_id = ev.id
  received[#received + 1] = ev.payload.seq
end)

local backlog = {}                   -- readings the bus refused, oldest first
local next_seq, refusals, tick = 1, 0, 0

-- Publishes the backlog, then new readings, until the bus says no.
local function produce()
  for _ = 1, PER_TICK do
    if next_seq <= READINGS then
      backlog[#backlog + 1] = next_seq
      next_seq = next_seq + 1
    end
  end
  local sent = 0
  while backlog[1] do
    local id, err, code = bus:publish("sensor.temperature",
                                      { seq = backlog[1], celsius = 21.5 })
    if not id then
      assert(code == "EFULL" and err:match("^EFULL: "), err)
      refusals = refusals + 1
      break                          -- keep the rest for the next tick
    end
    table.remove(backlog, 1)
    sent = sent + 1
  end
  return sent
end

while next_seq <= READINGS or backlog[1] do
  tick = tick + 1
  local sent = produce()
  local done = bus:step(CONSUMED_PER_TICK)
  print(("tick %2d: published %d, delivered %d, %d waiting in the producer")
        :format(tick, sent, done, #backlog))
end

local rest = bus:run()               -- the consumer catches up, then idle
print(("run() delivered the last %d; %d publishes were refused with EFULL")
      :format(rest, refusals))

assert(refusals > 0, "the queue never filled: back-pressure not shown")
assert(#received == READINGS, "readings were lost")
for i = 1, READINGS do assert(received[i] == i, "readings out of order") end
assert(last_id == READINGS, "a refused publish consumed an id")
print(("all %d readings delivered in order, ids 1..%d")
      :format(#received, last_id))
assert(bus:close() == 0)

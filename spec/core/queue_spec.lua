-- csrc/queue.c: event records, priorities, FIFO order, back-pressure.
local core = require "buzz.core"

-- One delivery pulled from the core (core:take), as the Lua layer pulls.
local function take1(c, level)
  local subs, evs = {}, {}
  if c:take(1, subs, evs, level) == 1 then return subs[1], evs[1] end
end

local function noop() end

local PRIO = { critical = 0, high = 1, normal = 2, low = 3 }

describe("the queue", function()
  local c
  before_each(function() c = assert(core.new(10)) end)
  after_each(function() c:close() end)

  local function drain_types()
    local out = {}
    while true do
      local _, ev = take1(c, 0)
      if not ev then return out end
      out[#out + 1] = ev.payload
    end
  end

  it("delivers by priority, then in publish order", function()
    assert(c:subscribe(">", {}, noop))
    local plan = { "low", "normal", "critical", "high", "low", "critical",
                   "normal", "high" }
    for i, p in ipairs(plan) do
      assert(c:publish("e", p .. i, PRIO[p]))
    end
    assert.same({ "critical3", "critical6", "high4", "high8", "normal2",
                  "normal7", "low1", "low5" }, drain_types())
  end)

  it("gives increasing integer ids and millisecond timestamps", function()
    assert(c:subscribe("e", {}, noop))
    local before = core.now_ms()
    local ids = {}
    for i = 1, 5 do ids[i] = assert(c:publish("e", i)) end
    for i = 2, 5 do assert.equal(ids[i - 1] + 1, ids[i]) end
    local last
    for i = 1, 5 do
      local _, ev = take1(c, 0)
      assert.equal(ids[i], ev.id)
      assert.equal(math.floor(ev.ts), ev.ts)
      assert.is_true(ev.ts >= before and ev.ts <= core.now_ms())
      if last then assert.is_true(ev.ts >= last) end
      last = ev.ts
    end
  end)

  it("refuses with EFULL at queue_limit and loses nothing queued", function()
    assert(c:subscribe("e", {}, noop))
    for i = 1, 10 do assert(c:publish("e", i)) end
    local id, err, code = c:publish("e", 11)
    assert.is_nil(id)
    assert.equal("EFULL", code)
    assert.matches("^EFULL: queue is full %(10 pending events%)", err)
    assert.equal(10, c:pending())
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, drain_types())
    -- a refused publish consumed no id
    assert.equal(11, c:publish("e", 12))
  end)

  it("does not queue an event nobody listens to", function()
    assert.equal(1, c:publish("nobody.home", 1))
    assert.equal(0, c:pending())
    assert.equal(2, c:publish("nobody.home", 2))   -- but the id is used
  end)

  it("carries key, correlation id, causation id and headers", function()
    assert(c:subscribe("e", {}, noop))
    local headers = { traceparent = "00-abc-def-01" }
    assert(c:publish("e", "p", PRIO.high, "k1", "corr-1", 41, headers))
    local _, ev = take1(c, 0)
    assert.equal("e", ev.type)
    assert.equal("p", ev.payload)
    assert.equal("high", ev.priority)
    assert.equal("k1", ev.key)
    assert.equal("corr-1", ev.correlation_id)
    assert.equal(41, ev.causation_id)
    assert.equal(headers, ev.headers)
    assert.equal(1, ev.attempt)
  end)

  it("passes payloads by reference", function()
    assert(c:subscribe("e", {}, noop))
    local payload = { nested = { 1, 2, 3 } }
    assert(c:publish("e", payload))
    local _, ev = take1(c, 0)
    assert.equal(payload, ev.payload)
  end)

  it("discards pending events on close and says how many", function()
    assert(c:subscribe("e", {}, noop))
    for i = 1, 7 do c:publish("e", i) end
    assert.equal(7, c:close())
    assert.equal(0, c:close())                      -- idempotent
    assert.has_error(function() c:publish("e", 1) end,
                     "attempt to use a closed bus")
  end)

  it("accepts an unlimited queue with limit 0", function()
    local u = assert(core.new(0))
    assert(u:subscribe("e", {}, noop))
    for i = 1, 1000 do assert(u:publish("e", i)) end
    assert.equal(1000, u:pending())
    u:close()
  end)
end)

-- csrc/bus.c and csrc/loop.c: cursors, audiences, once, the loop contract.
local core = require "buzz.core"

-- One delivery pulled from the core (core:take), as the Lua layer pulls.
local function take1(c, level)
  local subs, evs = {}, {}
  if c:take(1, subs, evs, level) == 1 then return subs[1], evs[1] end
end

local function noop() end

describe("the dispatcher", function()
  local c
  before_each(function() c = assert(core.new(100)) end)
  after_each(function() c:close() end)

  it("hands one event to each subscription in order, then the next",
     function()
    local a, b = { "a" }, { "b" }
    assert(c:subscribe("e.*", a, noop))
    assert(c:subscribe("e.>", b, noop))
    c:publish("e.1", 1)
    c:publish("e.2", 2)
    local seen = {}
    while true do
      local sub, ev = take1(c, 0)
      if not sub then break end
      seen[#seen + 1] = sub[1] .. ev.payload
    end
    assert.same({ "a1", "b1", "a2", "b2" }, seen)
  end)

  it("shares one event table among an event's subscriptions", function()
    assert(c:subscribe("e", {}, noop))
    assert(c:subscribe("e", {}, noop))
    c:publish("e", 1)
    local _, ev1 = take1(c, 0)
    local _, ev2 = take1(c, 0)
    assert.equal(ev1, ev2)
  end)

  it("fixes the audience when the event is published", function()
    assert(c:subscribe("e", { "early" }, noop))
    c:publish("e", 1)
    assert(c:subscribe("e", { "late" }, noop))
    local sub = take1(c, 0)
    assert.same({ "early" }, sub)
    assert.is_nil((take1(c, 0)))
  end)

  it("skips a subscription removed while its event is being delivered",
     function()
    local a, b = { "a" }, { "b" }
    assert(c:subscribe("e", a, noop))
    local idb = assert(c:subscribe("e", b, noop))
    c:publish("e", 1)
    assert.equal(a, (take1(c, 0)))
    assert.is_true(c:unsubscribe(idb, b))
    assert.is_nil((take1(c, 0)))
  end)

  it("ends a once subscription when its first delivery is handed out",
     function()
    local s = { "once" }
    local id = assert(c:subscribe("e", s, noop, true))
    c:publish("e", 1)
    c:publish("e", 2)
    local sub, ev = take1(c, 0)
    assert.equal(s, sub)
    assert.equal(1, ev.payload)
    assert.is_nil(s.is_active)        -- the Lua layer marks it as it runs it
    assert.is_nil((take1(c, 0)))
    assert.is_false(c:unsubscribe(id, s))
    assert.equal(0, c:stats().subscriptions)
  end)

  it("delivers a sync event on its own level, before queued ones", function()
    local s = {}
    assert(c:subscribe("e", s, noop))
    c:publish("e", "queued")
    local id, level = c:publish_sync("e", "sync")
    assert.equal(1, level)
    assert.equal(2, id)
    local sub, ev = take1(c, level)
    assert.equal(s, sub)
    assert.equal("sync", ev.payload)
    assert.is_nil((take1(c, level)))             -- level popped
    assert.equal("queued", select(2, take1(c, 0)).payload)
  end)

  it("nests sync levels", function()
    assert(c:subscribe("e", {}, noop))
    local _, l1 = c:publish_sync("e", 1)
    local _, l2 = c:publish_sync("e", 2)
    assert.equal(l1 + 1, l2)
    assert.equal(2, select(2, take1(c, l2)).payload)
    assert.is_nil((take1(c, l2)))
    assert.equal(1, select(2, take1(c, l1)).payload)
    assert.is_nil((take1(c, l1)))
  end)

  it("returns no level for a sync event nobody listens to", function()
    local id, level = c:publish_sync("nobody", 1)
    assert.equal(1, id)
    assert.is_nil(level)
  end)

  it("drops the refs of delivered events (no growth over many)", function()
    assert(c:subscribe("e", {}, noop))
    for _ = 1, 3 do
      for i = 1, 2000 do c:publish("e", { i }) end
      while take1(c, 0) do end
    end
    collectgarbage()
    collectgarbage()
    local kb = collectgarbage("count")
    for i = 1, 20000 do
      c:publish("e", { i })
      take1(c, 0)
    end
    while take1(c, 0) do end
    collectgarbage()
    collectgarbage()
    assert.is_true(collectgarbage("count") < kb + 64,
                   "Lua heap grew by " .. (collectgarbage("count") - kb))
  end)
end)

describe("the loop contract", function()
  local c
  before_each(function() c = assert(core.new(100)) end)
  after_each(function() c:close() end)

  it("reports timeout 0 while events are pending and -1 when idle",
     function()
    assert.equal(-1, c:timeout())
    assert(c:subscribe("e", {}, noop))
    c:publish("e", 1)
    assert.equal(0, c:timeout())
    take1(c, 0)
    assert.is_nil((take1(c, 0)))
    assert.equal(-1, c:timeout())
  end)

  it("wait() returns false when nothing can arrive", function()
    assert.is_false(c:wait())
    assert(c:subscribe("e", {}, noop))
    c:publish("e", 1)
    assert.is_true(c:wait())
  end)

  it("gives a descriptor that is readable exactly while work is pending",
     function()
    local ok, uv = pcall(require, "luv")
    if not ok then
      pending("luv is not installed for " .. _VERSION)
      return
    end
    local fd = c:fd()
    assert.is_true(math.type == nil or math.type(fd) == "integer")
    assert.is_true(fd >= 0)
    local function readable()
      local readable_now = false
      local poll = uv.new_poll(fd)
      local timer = uv.new_timer()
      poll:start("r", function() readable_now = true; uv.stop() end)
      timer:start(30, 0, function() uv.stop() end)
      uv.run("default")
      poll:close()
      timer:close()
      uv.run("nowait")
      return readable_now
    end
    assert.is_false(readable())
    assert(c:subscribe("e", {}, noop))
    c:publish("e", 1)
    assert.is_true(readable())
    take1(c, 0)
    assert.is_nil((take1(c, 0)))                 -- empty: signal consumed
    assert.is_false(readable())
  end)
end)

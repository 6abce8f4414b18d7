-- buzz.new{ freeze = true }: a handler that changes the event it was given
-- fails with EFROZEN, and what it changed is put back (lua/buzz/freeze.lua).
-- The suite's own buses (H.bus) are frozen; here both sides are shown.
local buzz = require "buzz"

local function frozen(opts)
  local errs = {}
  opts = opts or {}
  opts.on_error = function(err) errs[#errs + 1] = err end
  if opts.freeze == nil then opts.freeze = true end
  return H.bus(opts), errs
end

describe("freeze", function()
  after_each(function() H.done() end)

  it("is off by default: handlers share one event table", function()
    local bus = frozen{ freeze = false }
    local seen
    bus:subscribe("a.b", function(ev) ev.payload.x = 2 end)
    bus:subscribe("a.b", function(ev) seen = ev.payload.x end)
    local p = { x = 1 }
    bus:publish_sync("a.b", p)
    assert.equal(2, seen)
    assert.equal(2, p.x)                -- the publisher's table too
  end)

  it("fails a handler that changes a payload field, and puts it back",
     function()
    local bus, errs = frozen()
    local seen = {}
    bus:subscribe("a.b", function(ev) ev.payload.x = 2 end,
                  { name = "writer" })
    bus:subscribe("a.b", function(ev) seen[#seen + 1] = ev.payload.x end)
    local p = { x = 1 }
    assert.is_number(bus:publish_sync("a.b", p))
    bus:publish("a.b", { x = 1 })
    bus:drain()
    assert.same({ 1, 1 }, seen)
    assert.equal(1, p.x)
    assert.equal(2, #errs)
    for _, e in ipairs(errs) do
      assert.matches('^EFROZEN: a handler of "writer" changed ev.payload.x ',
                     e)
      assert.matches("freeze = true", e, 1, true)
    end
  end)

  it("names the path of what changed, at any depth, added or removed",
     function()
    local cases = {
      { function(ev) ev.payload.items[2] = 9 end, "ev.payload.items[2]" },
      { function(ev) ev.payload.new = true end, "ev.payload.new" },
      { function(ev) ev.payload.gone = nil end, "ev.payload.gone" },
      { function(ev) ev.type = "other" end, "ev.type" },
      { function(ev) ev.payload = {} end, "ev.payload" },
      { function(ev) ev.payload["a b"] = 1 end, 'ev.payload["a b"]' },
    }
    for _, case in ipairs(cases) do
      local bus, errs = frozen()
      local after
      bus:subscribe("a.b", case[1])
      bus:subscribe("a.b", function(ev) after = ev end)
      bus:publish_sync("a.b", { items = { 1, 2, 3 }, gone = "here" })
      assert.equal(1, #errs)
      assert.matches("changed " .. case[2] .. " (", errs[1], 1, true)
      assert.equal("a.b", after.type)
      assert.same({ items = { 1, 2, 3 }, gone = "here" }, after.payload)
      bus:close()
    end
  end)

  it("lets handlers read as they like: pairs, #, ipairs, republishing",
     function()
    local bus, errs = frozen()
    local n, len, sum, got = 0, nil, 0, nil
    bus:subscribe("a.b", function(ev)
      for _ in pairs(ev.payload) do n = n + 1 end
      len = #ev.payload.items
      for _, v in ipairs(ev.payload.items) do sum = sum + v end
      bus:publish_sync("a.c", ev.payload)
    end)
    bus:subscribe("a.c", function(ev) got = ev.payload end)
    bus:publish_sync("a.b", { items = { 1, 2, 3 }, k = "v" })
    assert.same({}, errs)
    assert.equal(2, n)
    assert.equal(3, len)
    assert.equal(6, sum)
    assert.same({ items = { 1, 2, 3 }, k = "v" }, got)
  end)

  it("is a failure like a raise: retried, then dead-lettered", function()
    local clock = buzz.manual_clock(1000)
    local bus = frozen{ clock = clock }
    local calls = 0
    bus:subscribe("order.created", function(ev)
      calls = calls + 1
      ev.payload.total = ev.payload.total + 1
    end, { name = "billing",
           retry = { max = 2, base = 1, factor = 1, jitter = 0 } })
    bus:publish("order.created", { total = 5 })
    bus:drain()
    clock:advance(5)
    assert.equal(2, calls)
    local dead = bus:dead_letters()
    assert.equal(1, #dead)
    assert.same({ total = 5 }, dead[1].event.payload)
    assert.matches("^EFROZEN: a handler of \"billing\" changed "
                   .. "ev.payload.total", dead[1].attempts[2].error)
  end)

  it("finds what a handler that raised changed, before the next runs",
     function()
    local bus, errs = frozen()
    local seen
    bus:subscribe("a.b", function(ev)
      ev.payload.x = 2
      error("boom", 0)
    end, { name = "raiser" })
    bus:subscribe("a.b", function(ev) seen = ev.payload.x end)
    bus:publish_sync("a.b", { x = 1 })
    assert.equal(1, seen)
    local text = table.concat(errs, "\n")
    assert.matches("boom", text, 1, true)
    assert.matches('EFROZEN: a handler of "raiser" (which raised or is '
                   .. "waiting) changed ev.payload.x", text, 1, true)
  end)

  it("checks a batch handler's events too", function()
    local bus, errs = frozen()
    local seen = {}
    bus:batch("m.>", { size = 2, name = "bulk" })(function(events)
      events[1].payload.v = 0
    end)
    bus:subscribe("m.>", function(ev) seen[#seen + 1] = ev.payload.v end)
    bus:publish("m.x", { v = 1 })
    bus:publish("m.x", { v = 2 })
    bus:drain()
    assert.same({ 1, 2 }, seen)
    assert.matches('EFROZEN: a handler of "bulk" changed ev[1].payload.v',
                   table.concat(errs, "\n"), 1, true)
  end)

  it("lets a route's transformers work: they copy, never change",
     function()
    local bus, errs = frozen()
    local got
    bus:route("a.>"):enrich{ extra = 1 }:rename{ x = "y" }
       :handle(function(ev) got = ev.payload end)
    bus:publish_sync("a.b", { x = 1 })
    assert.same({}, errs)
    assert.same({ y = 1, extra = 1 }, got)
  end)

  it("refuses what is not a boolean", function()
    assert.has_error(function() buzz.new{ freeze = "yes" } end,
                     'bad freeze: expected a boolean, got "yes"')
  end)

  it("is EFROZEN in the error map", function()
    assert.is_string(require("buzz.core").errors.EFROZEN)
  end)
end)

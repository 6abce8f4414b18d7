-- lua/buzz/transform.lua: map, enrich, pluck and rename as decorators,
-- on a bus where other handlers see the event unchanged.
local buzz = require "buzz"

describe("transformers", function()
  local bus, seen, raw
  before_each(function()
    bus = H.bus()
    seen, raw = {}, {}
  end)
  after_each(function() H.done() end)

  -- Subscribes handler decorated by t, and an undecorated handler after
  -- it that records what it saw; publishes payload and drains.
  local function run(t, payload)
    bus:subscribe("m.x", t(function(ev) seen[#seen + 1] = ev end))
    bus:subscribe("m.x", function(ev) raw[#raw + 1] = ev end)
    bus:publish("m.x", payload, { key = "k1" })
    bus:drain()
  end

  it("map gives the handler fn(ev) as its payload, the rest unchanged",
     function()
    local p = { pct = 91 }
    run(buzz.map(function(ev) return ev.payload.pct / 100 end), p)
    assert.equal(0.91, seen[1].payload)
    assert.equal("m.x", seen[1].type)
    assert.equal("k1", seen[1].key)
    assert.equal(raw[1].id, seen[1].id)
    assert.equal(p, raw[1].payload)      -- the others' event: untouched
    assert.same({ pct = 91 }, p)
  end)

  it("drop the event when they give nil", function()
    run(buzz.map(function() return nil end), 1)
    assert.same({}, seen)
    assert.equal(1, #raw)
  end)

  it("enrich adds fields to a copy of the payload, from a table or a "
     .. "function", function()
    local p = { host = "web-1" }
    run(buzz.enrich { dc = "fra" }, p)
    assert.same({ host = "web-1", dc = "fra" }, seen[1].payload)
    assert.same({ host = "web-1" }, p)
    local b2 = H.bus()
    local got
    b2:subscribe("e", buzz.enrich(function(ev)
      return { id_seen = ev.id }
    end)(function(ev) got = ev.payload end))
    local id = b2:publish("e")             -- no payload: a new table
    b2:drain()
    assert.same({ id_seen = id }, got)
  end)

  it("pluck makes the value at a path the payload", function()
    run(buzz.pluck("payload.cpu.user"), { cpu = { user = 12, sys = 3 } })
    assert.equal(12, seen[1].payload)
    local b2 = H.bus()
    local calls = 0
    b2:subscribe("e", buzz.pluck("payload.cpu.user")(function()
      calls = calls + 1
    end))
    b2:publish("e", { mem = 1 })           -- missing: dropped
    b2:publish("e", "text")
    b2:drain()
    assert.equal(0, calls)
  end)

  it("rename moves fields in a copy, swaps included", function()
    local p = { a = 1, b = 2, c = 3 }
    run(buzz.rename { a = "b", b = "a", c = "z" }, p)
    assert.same({ a = 2, b = 1, z = 3 }, seen[1].payload)
    assert.same({ a = 1, b = 2, c = 3 }, p)
  end)

  it("compose: the outer one runs first", function()
    local h = buzz.where { ["payload.n"] = { gt = 0 } }(
      buzz.map(function(ev) return ev.payload.n * 10 end)(
        buzz.map(function(ev) return ev.payload + 1 end)(function(ev)
          seen[#seen + 1] = ev.payload
        end)))
    bus:subscribe("e", h)
    bus:publish("e", { n = 0 })
    bus:publish("e", { n = 2 })
    bus:drain()
    assert.same({ 21 }, seen)
  end)

  it("raise at definition for bad arguments", function()
    for _, case in ipairs {
      { function() buzz.map(5) end, "bad argument to buzz.map: expected a "
        .. "function(ev) returning the new payload, got 5" },
      { function() buzz.enrich("x") end, "bad argument to buzz.enrich" },
      { function() buzz.pluck("a..b") end, 'bad argument to buzz.pluck: '
        .. 'expected a path such as "payload.cpu", got "a..b"' },
      { function() buzz.pluck(7) end, "bad argument to buzz.pluck" },
      { function() buzz.rename {} end, "bad argument to buzz.rename" },
      { function() buzz.rename { a = 1 } end,
        'bad argument to buzz.rename: names are strings ("a" = 1)' },
      { function() buzz.map(print)("h") end,
        "a transformer decorates a handler" },
    } do
      local ok, err = pcall(case[1])
      assert.is_false(ok)
      assert.matches("^spec/transform_spec%.lua:%d+: ", err)
      assert.matches(case[2], err, 1, true)
    end
  end)

  it("report an enrich function that gives a non-table as a handler error",
     function()
    local errors = {}
    local b2 = H.bus { on_error = function(err) errors[#errors + 1] = err end }
    b2:subscribe("e", buzz.enrich(function() return 5 end)(print))
    b2:publish("e", {})
    b2:drain()
    assert.equal(1, #errors)
    assert.matches("buzz.enrich: the function returned 5, not a table",
                   errors[1], 1, true)
  end)
end)

-- lua/buzz/router.lua: bus:route(pattern) and its stages.
local buzz = require "buzz"

describe("bus:route", function()
  local bus
  before_each(function() bus = H.bus { on_error = function() end } end)
  after_each(function() H.done() end)

  it("runs the stages in the order they were added, then the handler",
     function()
    local seen = {}
    local sub = bus:route("metrics.cpu")
      :where { ["payload.host"] = { match = "^web" } }
      :enrich { unit = "%" }
      :rename { pct = "value" }
      :filter(function(ev) return ev.payload.value >= 50 end)
      :map(function(ev) return ev.payload.value .. ev.payload.unit end)
      :handle(function(ev) seen[#seen + 1] = ev.payload end)
    bus:publish("metrics.cpu", { host = "web-1", pct = 70 })
    bus:publish("metrics.cpu", { host = "db-1", pct = 99 })
    bus:publish("metrics.cpu", { host = "web-2", pct = 10 })
    bus:publish("metrics.mem", { host = "web-1", pct = 80 })
    bus:drain()
    assert.same({ "70%" }, seen)
    assert.is_true(sub.is_active)
    sub:unsubscribe()
  end)

  it("is immutable: one route branches into two", function()
    local base = bus:route("e"):where { ["payload.ok"] = true }
    local a, b = {}, {}
    base:pluck("payload.n"):handle(function(ev) a[#a + 1] = ev.payload end)
    base:handle(function(ev) b[#b + 1] = ev.payload.n end)
    bus:publish("e", { ok = true, n = 1 })
    bus:publish("e", { ok = false, n = 2 })
    bus:drain()
    assert.same({ 1 }, a)
    assert.same({ 1 }, b)
  end)

  it("passes subscribe options through: a retried route", function()
    local clock = buzz.manual_clock(1000)
    local b2 = H.bus { clock = clock, on_error = function() end }
    local attempts = {}
    b2:route("job.*"):pluck("payload.n"):handle(function(ev)
      attempts[#attempts + 1] = ev.payload .. "/" .. ev.attempt
      if ev.attempt == 1 then error("once") end
    end, { retry = { max = 2, base = 1, jitter = 0 } })
    b2:publish("job.run", { n = 7 })
    b2:drain()
    clock:advance(1)
    assert.same({ "7/1", "7/2" }, attempts)
  end)

  it("composes without subscribing, for use with bus:on", function()
    local got
    local h = bus:route("x"):map(function(ev) return ev.payload * 2 end)
      :compose(function(ev) got = ev.payload end)
    bus:on("x")(h)
    bus:publish("x", 21)
    bus:drain()
    assert.equal(42, got)
  end)

  it("raises for bad patterns, stages and handlers where they are made",
     function()
    for _, case in ipairs {
      { function() bus:route("a..b") end, 'bad pattern "a..b"' },
      { function() bus:route(5) end, "bad pattern: expected a string" },
      { function() bus.route("x") end,
        "use bus:route(...), not bus.route(...)" },
      { function() bus:route("x"):where {} end,
        "where{} needs at least one condition" },
      { function() bus:route("x"):filter(5) end,
        "bad argument to route:filter: expected a function(ev) or a "
        .. "condition" },
      { function() bus:route("x"):map("f") end, "bad argument to buzz.map" },
      { function() bus:route("x"):handle("f") end,
        "bad handler: expected a function, got string" },
      { function() bus:route("x").map(nil, print) end,
        "use route:map(...), not route.map(...)" },
    } do
      local ok, err = pcall(case[1])
      assert.is_false(ok)
      assert.matches(case[2], err, 1, true)
    end
  end)
end)

describe("an aggregation asked of a route too early", function()
  it("says :group_by and :reduce come after :window", function()
    local bus = H.bus()
    for _, name in ipairs{ "group_by", "reduce" } do
      local ok, err = pcall(function()
        return bus:route("cpu.*")[name](bus:route("cpu.*"), "payload.host")
      end)
      assert.is_false(ok)
      assert.matches("route:" .. name .. "() comes after :window{...}", err,
                     1, true)
    end
    H.done()
  end)
end)

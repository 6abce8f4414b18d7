-- lua/buzz/middleware.lua: bus:use, run around every delivery.
local buzz = require "buzz"

local TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
local TP = "00-" .. TRACE .. "-00f067aa0ba902b7-01"

describe("bus:use", function()
  local bus, log
  before_each(function()
    log = {}
    bus = H.bus { on_error = function(err) log[#log + 1] = "error " .. err end }
  end)
  after_each(function() H.done() end)

  it("runs middleware around every delivery, first added outermost, for "
     .. "subscriptions made before and after", function()
    bus:subscribe("e", function(ev) log[#log + 1] = "early " .. ev.payload end)
    bus:use(function(ev, next)
      log[#log + 1] = "a in"
      local r = next(ev)
      log[#log + 1] = "a out"
      return r
    end)
    bus:use(function(ev, next)
      log[#log + 1] = "b"
      return next(ev)
    end)
    bus:subscribe("e", function(ev) log[#log + 1] = "late " .. ev.payload end)
    bus:publish("e", 1)
    bus:drain()
    assert.same({ "a in", "b", "early 1", "a out",
                  "a in", "b", "late 1", "a out" }, log)
  end)

  it("can stop a delivery or replace its event", function()
    bus:use(function(ev, next)
      if ev.payload == "drop" then return end
      if ev.payload == "swap" then
        return next(buzz.map(function() return "swapped" end).apply(ev))
      end
      return next(ev)
    end)
    bus:subscribe("e", function(ev) log[#log + 1] = ev.payload end)
    for _, p in ipairs { "keep", "drop", "swap" } do bus:publish("e", p) end
    bus:drain()
    assert.same({ "keep", "swapped" }, log)
  end)

  it("gives a context with the ids, and the trace of a traceparent",
     function()
    local seen
    bus:use(function(ev, next, ctx)
      seen = ctx
      return next(ev)
    end)
    local sub = bus:subscribe("e", function() end)
    local id = bus:publish("e", nil, { correlation_id = "req-9",
                                       headers = { traceparent = TP } })
    bus:drain()
    assert.equal(sub, seen.subscription)
    assert.equal("req-9", seen.correlation_id)
    assert.equal(TRACE, seen.trace_id)
    assert.equal("00f067aa0ba902b7", seen.parent_id)
    bus:publish("e", nil, { headers = { traceparent = "garbage" } })
    bus:drain()
    assert.is_nil(seen.trace_id)
    assert.is_number(id)
  end)

  it("carries the trace into events published by the handler, with a new "
     .. "span", function()
    bus:use(function(ev, next, ctx)
      ctx.trace_id = ctx.trace_id or ("ab"):rep(16)   -- start a trace
      return next(ev)
    end)
    local got = {}
    bus:subscribe("a", function() bus:publish("b") end)
    bus:subscribe("b", function(ev) got[#got + 1] = ev.headers end)
    bus:publish("a", nil, { headers = { traceparent = TP } })
    bus:publish("a")
    bus:drain()
    assert.equal(2, #got)
    local t1, s1 = got[1].traceparent:match("^00%-(%x+)%-(%x+)%-01$")
    assert.equal(TRACE, t1)
    assert.not_equal("00f067aa0ba902b7", s1)
    assert.equal(("ab"):rep(16), got[2].traceparent:match("^00%-(%x+)%-"))
    bus:publish("b", nil, { headers = { traceparent = TP } })  -- outside
    bus:drain()
    assert.equal(TP, got[3].traceparent)
  end)

  it("isolates a raising middleware like a raising handler, retries too",
     function()
    local clock = buzz.manual_clock(1000)
    local b2 = H.bus { clock = clock, on_error = function() end }
    local calls, attempts = 0, {}
    b2:use(function(ev, next)
      calls = calls + 1
      if ev.attempt == 1 then error("middleware down") end
      return next(ev)
    end)
    b2:subscribe("e", function(ev) attempts[#attempts + 1] = ev.attempt end,
                 { retry = { max = 2, base = 1, jitter = 0 } })
    b2:subscribe("e", function() attempts[#attempts + 1] = "plain" end)
    b2:publish("e")
    b2:drain()
    clock:advance(1)
    assert.same({ 2 }, attempts)         -- the plain one failed for good
    assert.equal(3, calls)
    local d = b2:dead_letters()
    assert.equal(0, #d)
  end)

  it("refuses what is not a function", function()
    assert.has_error(function() bus:use("log") end,
                     "bad middleware: expected a function(ev, next, ctx), "
                     .. "got string")
    assert.has_error(function() bus.use(print) end,
                     "use bus:use(...), not bus.use(...)")
  end)
end)

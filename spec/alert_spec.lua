-- lua/buzz/alert.lua: bus:alert{...} announces $SYS.alert when a metric
-- stays past its threshold, and when it comes back; all under the manual
-- clock.
local buzz = require "buzz"

describe("bus:alert", function()
  local clock, bus, alerts, errors
  -- $SYS.alert is published like any event: delivered when the bus is
  -- driven, so each step of the clock drains
  local function advance(s)
    clock:advance(s)
    bus:drain()
  end
  before_each(function()
    clock = buzz.manual_clock(1000)
    errors = {}
    bus = H.bus{ clock = clock, on_error = function(err)
      errors[#errors + 1] = err
    end }
    alerts = {}
    bus:subscribe("$SYS.alert", function(ev)
      alerts[#alerts + 1] = ev.payload
    end)
  end)
  after_each(function() H.done() end)

  it("fires when a gauge stays above its threshold for `for` seconds, "
     .. "and resolves when it comes back", function()
    bus:subscribe("job", function() error("no") end,
                  { name = "jobs", retry = { max = 1 } })
    local a = bus:alert{ metric = "dead_letters", above = 2, ["for"] = 3,
                         every = 1 }
    for _ = 1, 3 do bus:publish("job") end
    bus:drain()                            -- 3 dead letters
    advance(1)                       -- past: since now
    advance(2)
    assert.same({}, alerts)                -- 2 s past: not yet
    advance(1)
    assert.equal(1, #alerts)
    local fired = alerts[1]
    assert.equal("firing", fired.state)
    assert.equal("dead_letters", fired.name)
    assert.equal(3, fired.value)
    assert.equal(2, fired.above)
    assert.equal(1001000, fired.since)
    assert.is_true(a:is_firing())
    assert.equal(3, bus:discard{})
    advance(1)
    assert.equal(2, #alerts)
    assert.equal("resolved", alerts[2].state)
    assert.equal(0, alerts[2].value)
    assert.is_false(a:is_firing())
    advance(10)
    assert.equal(2, #alerts)               -- nothing new
  end)

  it("watches a failure rate between checks", function()
    local fail = false
    bus:subscribe("pay", function() if fail then error("down") end end,
                  { name = "payments" })
    bus:alert{ name = "payments failing",
               metric = buzz.alert.failure_rate("payments"),
               above = 0.05, every = 10 }
    for _ = 1, 20 do bus:publish_sync("pay") end
    advance(10)                      -- the first check: no rate yet
    for _ = 1, 20 do bus:publish_sync("pay") end
    advance(10)                      -- 0% failed
    assert.same({}, alerts)
    fail = true
    for _ = 1, 2 do bus:publish_sync("pay") end
    fail = false
    for _ = 1, 18 do bus:publish_sync("pay") end
    advance(10)                      -- 10% failed
    assert.equal(1, #alerts)
    assert.equal("payments failing", alerts[1].name)
    assert.near(0.1, alerts[1].value, 1e-9)
  end)

  it("takes a windowed quantile of a histogram, and a rate", function()
    local q = buzz.alert.quantile("latency", 0.95)
    local r = buzz.alert.rate("published.normal")
    local h1 = { bounds = { 1, 2, 4 }, counts = { 0, 0, 0, 0 } }
    local h2 = { bounds = { 1, 2, 4 }, counts = { 10, 90, 100, 100 } }
    local m1 = { latency = h1, published = { normal = 5 } }
    local m2 = { latency = h2, published = { normal = 25 } }
    assert.is_nil(q(m1, nil))
    -- rank 95 of 100 lies in (2, 4], which holds 10: 2 + 2 * 5/10
    assert.near(3, q(m2, m1), 1e-9)
    assert.near(2, r(m2, m1, 10), 1e-9)
    assert.is_nil(r(m2, nil, nil))
  end)

  it("reports a metric function that raises, and goes on checking",
     function()
    local n = 0
    bus:alert{ name = "flaky", metric = function()
      n = n + 1
      if n == 1 then error("broken") end
      return 10
    end, above = 5 }
    advance(1)
    assert.equal(1, #errors)
    assert.matches('^ECALLBACK: the metric of alert "flaky" raised',
                   errors[1])
    advance(1)
    assert.equal("firing", alerts[1].state)
  end)

  it("stops on cancel, and does not keep run() busy", function()
    local a = bus:alert{ metric = function() return 1 end, above = 0 }
    a:cancel()
    advance(5)
    assert.same({}, alerts)
    local real = H.bus()
    real:alert{ metric = "timers", above = 100, every = 60 }
    assert.equal(0, real:run())            -- returns: nothing but the alert
  end)

  it("refuses bad options with the fix in the message", function()
    local function refused(opts)
      local ok, err = pcall(bus.alert, bus, opts)
      assert.is_false(ok)
      return err
    end
    assert.matches("bad options to alert: expected a table, got nil",
                   refused(nil), 1, true)
    assert.matches('unknown option "abov" to alert (known options: above, '
                   .. "below, every, for, metric, name)",
                   refused{ metric = "timers", abov = 1 }, 1, true)
    assert.matches("bad metric: expected a dot path",
                   refused{ above = 1 }, 1, true)
    assert.matches("alert needs a threshold: above = n or below = n",
                   refused{ metric = "timers" }, 1, true)
    assert.matches("bad above: expected a number, got \"1\"",
                   refused{ metric = "timers", above = "1" }, 1, true)
    assert.matches("bad every: expected a positive number, got 0",
                   refused{ metric = "timers", above = 1, every = 0 }, 1,
                   true)
    assert.matches("alert_spec.lua", refused{ metric = "timers" }, 1, true)
  end)
end)

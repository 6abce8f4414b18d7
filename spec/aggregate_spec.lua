-- lua/buzz/aggregate.lua: windows under a manual clock, checked against
-- results computed by hand.
local buzz = require "buzz"

-- A bus on a manual clock at 1000 s, results collected in order.
local function setup()
  local clock = buzz.manual_clock(1000)
  local bus = H.bus { clock = clock, on_error = function() end }
  return bus, clock
end

-- "group@start-end=value" in seconds since 1000, for compact expectations.
local function num(v)
  if type(v) == "number" then return ("%g"):format(v) end
  return tostring(v)
end

local function fmt(r)
  local v = r.value
  if type(v) == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys)
    local parts = {}
    for i, k in ipairs(keys) do parts[i] = k .. ":" .. num(v[k]) end
    v = table.concat(parts, ",")
  end
  return ("%s@%g-%g=%s/%d"):format(tostring(r.group),
                                   r.window_start / 1000 - 1000,
                                   r.window_end / 1000 - 1000,
                                   num(v), r.count)
end

-- Publishes payload at clock time 1000 + t (seconds), in order of t.
local function feed(bus, clock, items)
  for _, it in ipairs(items) do
    local target = 1000 + it[1]
    if target > clock:now() then clock:advance(target - clock:now()) end
    bus:publish(it[2] or "m.cpu", it[3])
    bus:drain()
  end
end

describe("route:window", function()
  after_each(function() H.done() end)

  it("tumbles: one result per window and group, at the window's end",
     function()
    local bus, clock = setup()
    local out = {}
    bus:route("m.cpu"):window { tumbling = 10 }:group_by("payload.host")
      :reduce(buzz.agg.avg("payload.pct"))
      :handle(function(r) out[#out + 1] = fmt(r) end)
    feed(bus, clock, {
      { 1, "m.cpu", { host = "a", pct = 10 } },
      { 2, "m.cpu", { host = "b", pct = 50 } },
      { 9.999, "m.cpu", { host = "a", pct = 20 } },
    })
    assert.same({}, out)                 -- nothing closes before its end
    feed(bus, clock, { { 10, "m.cpu", { host = "a", pct = 90 } } })
    assert.same({ "a@0-10=15/2", "b@0-10=50/1" }, out)
    clock:advance(30)
    assert.same({ "a@0-10=15/2", "b@0-10=50/1", "a@10-20=90/1" }, out)
  end)

  it("slides: each event in every window that holds it", function()
    local bus, clock = setup()
    local out = {}
    bus:route("m.*"):window { sliding = 10, every = 5 }
      :reduce(buzz.agg.count()):handle(function(r) out[#out + 1] = fmt(r) end)
    feed(bus, clock, { { 1 }, { 6 }, { 7 }, { 12 } })
    clock:advance(30)
    -- windows [-5,5) [0,10) [5,15) [10,20)
    assert.same({ "false@-5-5=1/1", "false@0-10=3/3", "false@5-15=3/3",
                  "false@10-20=1/1" }, out)
  end)

  it("closes a session a gap after its group's last event", function()
    local bus, clock = setup()
    local out = {}
    bus:route("m.*"):window { session = 5 }:group_by("payload.u")
      :reduce { n = buzz.agg.count(), users = buzz.agg.distinct("payload.u") }
      :handle(function(r) out[#out + 1] = fmt(r) end)
    feed(bus, clock, {
      { 0, "m.click", { u = "x" } }, { 3, "m.click", { u = "x" } },
      { 4, "m.click", { u = "y" } }, { 7, "m.click", { u = "x" } },
    })
    clock:advance(5)                     -- now 12: x's session ends there
    assert.same({ "y@4-9=n:1,users:1/1", "x@0-12=n:3,users:1/3" }, out)
    feed(bus, clock, { { 20, "m.click", { u = "x" } } })
    clock:advance(10)
    assert.equal("x@20-25=n:1,users:1/1", out[3])
  end)

  it("counts: a result every n events of a group", function()
    local bus, clock = setup()
    local out = {}
    bus:route("m.*"):window { count = 2 }:group_by("payload.k")
      :reduce(buzz.agg.sum("payload.v"))
      :handle(function(r) out[#out + 1] = fmt(r) end)
    feed(bus, clock, {
      { 1, "m.a", { k = 1, v = 1 } }, { 2, "m.a", { k = 2, v = 10 } },
      { 3, "m.a", { k = 1, v = 2 } }, { 4, "m.a", { k = 1, v = 4 } },
    })
    assert.same({ "1@1-3=3/2" }, out)
  end)

  it("sends late events to late(), or publishes them on $SYS.late",
     function()
    local bus, clock = setup()
    local out, late, sys = {}, {}, {}
    local function on_late(ev) late[#late + 1] = ev.id end
    bus:route("m.cpu")
      :window { tumbling = 10, allowed_lateness = 2, late = on_late }
      :reduce(buzz.agg.count()):handle(function(r) out[#out + 1] = fmt(r) end)
    bus:route("m.mem"):window { tumbling = 10 }:reduce(buzz.agg.count())
      :handle(function(r) out[#out + 1] = fmt(r) end)
    bus:subscribe("$SYS.late", function(ev) sys[#sys + 1] = ev.payload.type end)
    local a = bus:publish("m.cpu")       -- ts 1000, delivered at 1011
    local b = bus:publish("m.cpu")
    clock.ms = clock.ms + 11000          -- within lateness: still counted
    bus:drain()
    clock.ms = clock.ms + 2000           -- 1013: [0,10) closed at 12
    bus:publish("m.mem")                 -- ts 1013: on time
    local c = bus:publish("m.cpu")       -- on time too (ts 1013)
    bus:drain()
    assert.same({ "false@0-10=2/2" }, out)
    assert.same({}, late)
    -- an event stamped before a closed window's end: late
    bus._core:publish("m.cpu", nil, 2, nil, nil, nil, nil, nil, nil, nil,
                      1005000)
    bus._core:publish("m.mem", nil, 2, nil, nil, nil, nil, nil, nil, nil,
                      1005000)
    bus:drain()
    assert.equal(1, #late)
    assert.same({ "m.mem" }, sys)
    assert.is_number(a + b + c)
  end)

  it("publishes results as events, one per window and group", function()
    local bus, clock = setup()
    local got = {}
    bus:subscribe("m.cpu.avg", function(ev) got[#got + 1] = ev.payload end)
    bus:route("m.cpu"):where { ["payload.pct"] = { gte = 0 } }
      :window { tumbling = 60 }:group_by("payload.host")
      :reduce { avg = buzz.agg.avg("payload.pct"),
                p90 = buzz.agg.percentile(90, "payload.pct"),
                max = buzz.agg.max("payload.pct"),
                min = buzz.agg.min("payload.pct") }
      :publish("m.cpu.avg")
    for i = 1, 10 do bus:publish("m.cpu", { host = "h", pct = i * 10 }) end
    bus:publish("m.cpu", { host = "h", pct = -1 })   -- filtered out
    bus:drain()
    clock:advance(60)
    assert.equal(1, #got)
    assert.same({ avg = 55, p90 = 90, max = 100, min = 10 }, got[1].value)
    assert.equal("h", got[1].group)
    assert.equal(10, got[1].count)
    -- windows fall on multiples of their size since the epoch
    assert.equal(960000, got[1].window_start)
    assert.equal(1020000, got[1].window_end)
  end)

  it("drops its windows when unsubscribed, and keeps no idle group",
     function()
    local bus, clock = setup()
    local out = {}
    local sub = bus:route("m.*"):window { tumbling = 10 }:group_by("payload")
      :reduce(buzz.agg.count()):handle(function(r) out[#out + 1] = r end)
    for g = 1, 100 do bus:publish("m.x", g) end
    bus:drain()
    clock:advance(10)
    assert.equal(100, #out)
    assert.same({}, sub._engine.windows)   -- closed windows are gone
    bus:publish("m.x", 1)
    bus:drain()
    sub:unsubscribe()
    clock:advance(60)
    assert.equal(100, #out)
  end)

  it("takes custom reducers and processing time", function()
    local bus, clock = setup()
    local out = {}
    bus:route("m.*"):window { tumbling = 5, time = "processing" }
      :reduce { init = function() return "" end,
                step = function(s, ev) return s .. ev.payload end,
                finish = function(s) return s:upper() end }
      :handle(function(r) out[#out + 1] = fmt(r) end)
    feed(bus, clock, { { 1, "m.a", "x" }, { 2, "m.a", "y" } })
    clock:advance(5)
    assert.same({ "false@0-5=XY/2" }, out)
  end)

  it("raises for bad windows, reducers and paths where they are written",
     function()
    local bus = setup()
    local r = bus:route("m.*")
    for _, case in ipairs {
      { function() r:window {} end, "bad window: give its kind" },
      { function() r:window { tumbling = 5, session = 3 } end,
        "a window is one kind: give one of tumbling, sliding, session or "
        .. "count, not both" },
      { function() r:window { tumbling = 0 } end,
        "bad window tumbling: expected a positive number of seconds, got 0" },
      { function() r:window { count = 2.5 } end,
        "bad window count: expected a positive integer, got 2.5" },
      { function() r:window { sliding = 10 } end,
        "bad window every: expected a positive number of seconds, got nil" },
      { function() r:window { sliding = 5, every = 10 } end,
        "every (10 s) is longer than the window (5 s)" },
      { function() r:window { tumbling = 5, every = 1 } end,
        "every goes with sliding windows, not tumbling" },
      { function() r:window { tumbling = 5, size = 1 } end,
        'unknown window option "size"' },
      { function() r:window { tumbling = 5, time = "wall" } end,
        'bad window time "wall"' },
      { function() r:window { tumbling = 5 }:reduce(buzz.agg.mean) end,
        "bad reducer nil: expected buzz.agg.count()" },
      { function() r:window { tumbling = 5 }:reduce { x = 5 } end,
        'bad reducer "x": expected a buzz.agg reducer, got 5' },
      { function() r:window { tumbling = 5 }:reduce {} end,
        "bad reducer: an empty table reduces nothing" },
      { function() r:window { tumbling = 5 }:group_by(5) end,
        "bad group_by: expected a path such as \"payload.pct\"" },
      { function() buzz.agg.avg("a..b") end, "bad reducer path" },
      { function() buzz.agg.percentile(0) end, "bad percentile 0" },
      { function() r:window { tumbling = 5 }:handle(print) end,
        "an aggregation needs :reduce(...)" },
      { function()
          r:window { tumbling = 5 }:reduce(buzz.agg.count()):publish("$x")
        end, 'bad type "$x"' },
      { function()
          r:window { tumbling = 5 }:reduce(buzz.agg.count()):publish(5)
        end, 'bad type: expected a string such as "metrics.cpu.avg", got '
             .. "number" },
      { function() r:window { tumbling = 5, late = "log" } end,
        'bad window late: expected a function(ev), got "log"' },
      { function() r:window { tumbling = 5, allowed_lateness = -1 } end,
        "bad window allowed_lateness: expected seconds >= 0, got -1" },
      { function() r:window { count = 5, every = 1 } end,
        "every goes with sliding windows, not count" },
      { function() r:window { tumbling = 5 }:reduce { init = print } end,
        "bad reducer: a custom reducer is { init = function() end, step = "
        .. "function(state, ev) end, finish = function(state) end "
        .. "(optional) }" },
      { function() r:window { tumbling = 5 }:reduce { buzz.agg.count() } end,
        "bad reducer table: names are strings, got 1" },
    } do
      local ok, err = pcall(case[1])
      assert.is_false(ok)
      assert.matches("^spec/aggregate_spec%.lua:%d+: ", err)
      assert.matches(case[2], err, 1, true)
    end
  end)
end)

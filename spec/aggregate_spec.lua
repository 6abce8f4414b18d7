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

  it("counts with idle: a group quiet that long goes as it is", function()
    local bus, clock = setup()
    local out = {}
    local sub = bus:route("m.*"):window { count = 3, idle = 5 }
      :group_by("payload.k"):reduce(buzz.agg.count())
      :handle(function(r) out[#out + 1] = fmt(r) end)
    feed(bus, clock, {
      { 1, "m.a", { k = "a" } }, { 2, "m.a", { k = "b" } },
      { 4, "m.a", { k = "a" } },        -- a's idle time starts again
    })
    clock:advance(3)                    -- now 7: b idle since 2
    assert.same({ "b@2-2=1/1" }, out)
    clock:advance(1.999)
    assert.same({ "b@2-2=1/1" }, out)
    clock:advance(0.001)                -- now 9: a idle since 4
    assert.same({ "b@2-2=1/1", "a@1-4=2/2" }, out)
    assert.same({}, sub._engine.counts) -- nothing kept
    feed(bus, clock, { { 20, "m.a", { k = "c" } }, { 21, "m.a", { k = "c" } },
                       { 22, "m.a", { k = "c" } } })
    clock:advance(30)                   -- filled: no idle result after
    assert.same({ "b@2-2=1/1", "a@1-4=2/2", "c@20-22=3/3" }, out)
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
        .. "function(state, ev) end, and optionally finish = "
        .. "function(state) end, save = function(state) end with load = "
        .. "function(saved) end }" },
      { function()
          r:window { tumbling = 5 }:reduce { init = print, step = print,
                                            save = print }
        end, "save = function(state) end with load" },
      { function()
          r:window { tumbling = 5 }:reduce { init = print, step = print,
                                            finish = 3 }
        end, "bad reducer: a custom reducer is" },
      { function() r:window { tumbling = 5, idle = 3 } end,
        "idle goes with count windows: a tumbling window closes by time" },
      { function() r:window { count = 5, idle = 0 } end,
        "bad window idle: expected a positive number of seconds, got 0" },
      { function() r:window { count = 5, checkpoint = "1s" } end,
        'bad window checkpoint: expected a positive number of seconds, '
        .. 'got "1s"' },
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

describe("route:window on a store, durable", function()
  local path
  before_each(function() path = H.tmp_store() end)
  after_each(function()
    H.done()
    H.remove_store(path)
  end)

  -- Clocks near the wall clock's time: the store's dedup window, which
  -- keeps a result from being published twice across a restart, counts
  -- back from it.
  local BASE = math.floor(os.time() / 100) * 100 - 1000
  local function open(start)
    local clock = buzz.manual_clock(BASE + start)
    return H.bus { store = path, clock = clock, on_error = function() end },
           clock
  end

  -- The aggregation under test: counts and distinct users per group in
  -- 10 s windows, published on m.stats.
  local function aggregate(bus, kind)
    return bus:route("m.*"):window(kind or { tumbling = 10 })
      :group_by("payload.g")
      :reduce { n = buzz.agg.count(), users = buzz.agg.distinct("payload.u"),
                low = buzz.agg.min("payload.v") }
      :publish("m.stats", { durable = "stats" })
  end

  local function results(bus)
    local out = {}
    for ev in bus:events{ types = "m.stats" } do
      local r = ev.payload
      out[#out + 1] = ("%s@%g n=%d users=%d low=%s"):format(
        r.group, r.window_start / 1000 - BASE - 1000, r.value.n, r.value.users,
        tostring(r.value.low))
    end
    return out
  end

  local function put(bus, clock, t, g, u, v)
    clock:advance(BASE + 1000 + t - clock:now())
    assert(bus:publish("m.x", { g = g, u = u, v = v }))
    bus:drain()
  end

  it("a restart takes up its open windows from the checkpoint and the log",
     function()
    local bus, clock = open(1000)
    aggregate(bus)
    put(bus, clock, 1, "a", "x", 5)
    put(bus, clock, 2, "b", "y", 7)
    put(bus, clock, 3, "a", "y", 2)     -- the checkpoint at 1 s, 2 s...
    put(bus, clock, 3, "a", "x", 9)     -- ...and these after the last one
    assert(bus:flush())
    bus:close()                          -- open windows are memory: gone

    local bus2, clock2 = open(1003)
    aggregate(bus2)
    put(bus2, clock2, 8, "b", "z", 1)
    assert.same({}, results(bus2))
    clock2:advance(10)
    assert.same({ "a@0 n=3 users=2 low=2", "b@0 n=2 users=2 low=1" },
                results(bus2))
  end)

  it("events the checkpoint holds are not counted again", function()
    local bus, clock = open(1000)
    aggregate(bus)
    put(bus, clock, 1, "a", "x", 5)
    put(bus, clock, 2, "a", "y", 6)
    clock:advance(1)                     -- a checkpoint with both
    assert(bus:flush())
    bus:close()
    -- as if the position had not been written: the log comes again whole
    local bus2, clock2 = open(1003)
    assert.is_true(bus2:remove_consumer("stats"))
    aggregate(bus2)
    bus2:drain()
    clock2:advance(10)
    assert.same({ "a@0 n=2 users=2 low=5" }, results(bus2))
  end)

  it("a window closed just before the crash is not published twice",
     function()
    local bus, clock = open(1000)
    aggregate(bus)
    put(bus, clock, 1, "a", "x", 5)
    put(bus, clock, 9.5, "a", "y", 6)
    assert(bus:flush())
    -- the checkpoint as it was before the window closed
    local before = bus._core:state_list("window")[1].value
    clock:advance(1)                     -- closes [0, 10): published
    assert.same({ "a@0 n=2 users=2 low=5" }, results(bus))
    -- a crash between the result and the checkpoint after it
    assert(bus._core:state_put("window", "stats", before))
    assert(bus:flush())
    bus:close()

    local bus2, clock2 = open(1010.5)
    aggregate(bus2)
    clock2:advance(1)
    assert.same({ "a@0 n=2 users=2 low=5" }, results(bus2))
  end)

  it("keeps sessions and count groups too, with their timers", function()
    local bus, clock = open(1000)
    aggregate(bus, { session = 5 })
    put(bus, clock, 1, "a", "x", 1)
    put(bus, clock, 3, "a", "y", 2)
    assert(bus:flush())
    bus:close()
    local bus2, clock2 = open(1004)
    aggregate(bus2, { session = 5 })
    clock2:advance(3.999)
    assert.same({}, results(bus2))
    clock2:advance(0.001)                -- 5 s after the event at 3
    assert.same({ "a@1 n=2 users=2 low=1" }, results(bus2))
    bus2:close()
    H.remove_store(path)

    local bus3, clock3 = open(1000)
    aggregate(bus3, { count = 3, idle = 5 })
    put(bus3, clock3, 1, "c", "x", 4)
    put(bus3, clock3, 2, "c", "x", 3)
    assert(bus3:flush())
    bus3:close()
    local bus4, clock4 = open(1002)
    aggregate(bus4, { count = 3, idle = 5 })
    put(bus4, clock4, 3, "c", "z", 8)
    assert.same({ "c@1 n=3 users=2 low=3" }, results(bus4))
  end)

  -- Issue 13: run() never returned once a durable window existed, as its
  -- checkpoint timer re-arms itself. Checkpoints are housekeeping: they
  -- go on while run() runs, and do not keep it running. In real time (run
  -- waits on the wall clock); should run() not return, the checkpoint
  -- stops the bus after a few more rounds, so the spec fails, not hangs.
  it("lets run() return, checkpointing while it runs", function()
    local bus = H.bus { store = path, on_error = function() end }
    local sub = bus:route("m.*"):window { count = 100, checkpoint = 0.02 }
      :reduce(buzz.agg.count())
      :publish("m.stats", { durable = "stats" })
    local engine = sub._engine
    local checkpoint = engine.checkpoint
    local ticks, late_ticks, ticks_before_last, is_stuck = 0, 0, nil, false
    engine.checkpoint = function(self)
      checkpoint(self)
      ticks = ticks + 1
      if ticks_before_last then
        late_ticks = late_ticks + 1
        if late_ticks > 5 then
          is_stuck = true
          bus:stop()
        end
      end
    end
    bus:subscribe("done", function() ticks_before_last = ticks end)
    assert(bus:publish("m.x", 1))
    assert(bus:publish("done", nil, { delay = 0.2 }))
    local delivered = bus:run()
    assert.is_false(is_stuck, "run() kept running for the checkpoints")
    assert.equal(2, delivered)            -- m.x to the window, done
    -- checkpoints came while run() waited for the delayed event, and
    -- the last one holds the event the window took
    assert.is_true(ticks_before_last > 0)
    assert(bus:flush())
    local row = bus._core:state_list("window")[1]
    assert.equal(1, require("buzz.core").json_decode(row.value).last)
  end)

  it("a live aggregation keeps no checkpoint", function()
    local bus, clock = open(1000)
    bus:route("m.*"):window { tumbling = 10 }:reduce(buzz.agg.count())
      :publish("m.stats")
    put(bus, clock, 1, "a", "x", 1)
    clock:advance(2)
    assert(bus:flush())
    assert.same({}, bus._core:state_list("window"))
  end)

  it("reports a reducer's save that raises, and a replay that fails",
     function()
    local errs = {}
    local bus = H.bus { store = path, clock = buzz.manual_clock(BASE + 1000),
                        on_error = function(e) errs[#errs + 1] = e end }
    local out = {}
    bus:route("m.*"):window { tumbling = 10 }
      :reduce { init = function() return 0 end,
                step = function(n) return n + 1 end,
                save = function() error("no saving") end,
                load = function(n) return n end }
      :handle(function(r) out[#out + 1] = r.value end,
              { durable = "bad_save" })
    bus:publish("m.x", {})
    bus:drain()
    bus._clock:advance(11)
    assert.same({ 1 }, out)               -- it went on
    assert.matches("aggregation bad_save could not save its open windows "
                   .. "(a reducer's save raised: ", tostring(errs[1]), 1,
                   true)
    assert.matches("the last checkpoint stands", tostring(errs[1]), 1, true)
    bus:close()

    -- a checkpoint, then events after it, then a replay that fails
    local b2, clock2 = open(1000)
    aggregate(b2)
    put(b2, clock2, 1, "a", "x", 5)
    clock2:advance(1)
    put(b2, clock2, 2.5, "a", "y", 6)
    assert(b2:flush())
    b2:close()
    local reported = {}
    local b3 = H.bus { store = path, clock = buzz.manual_clock(BASE + 1003),
                       on_error = function(e) reported[#reported + 1] = e end }
    b3.replay = function() error("disk on fire") end
    aggregate(b3)
    assert.matches("aggregation stats could not replay the log from #%d+: "
                   .. ".*disk on fire; its windows hold what the checkpoint "
                   .. "kept", tostring(reported[1]))
  end)

  it("reports a custom state JSON cannot hold, and goes on", function()
    local errs = {}
    local bus = H.bus { store = path, clock = buzz.manual_clock(BASE + 1000),
                        on_error = function(e) errs[#errs + 1] = e end }
    local out = {}
    bus:route("m.*"):window { tumbling = 10 }
      :reduce { init = function() return { f = print } end,
                step = function(s) return s end,
                finish = function() return "ok" end }
      :handle(function(r) out[#out + 1] = r.value end,
              { durable = "odd" })
    bus:publish("m.x", {})
    bus:drain()
    bus._clock:advance(11)
    assert.same({ "ok" }, out)
    assert.matches("could not store window odd", tostring(errs[1]))
  end)
end)

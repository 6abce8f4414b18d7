-- lua/buzz/batch.lua: bus:batch(pattern, opts)(fn), under a manual clock.
local buzz = require "buzz"

local function setup(opts)
  local clock = buzz.manual_clock(1000)
  local o = { clock = clock, on_error = function() end }
  for k, v in pairs(opts or {}) do o[k] = v end
  return H.bus(o), clock
end

-- "n1,n2,..." of a batch's payload numbers.
local function ns(events)
  local t = {}
  for i, ev in ipairs(events) do t[i] = tostring(ev.payload.n) end
  return table.concat(t, ",")
end

local function publish_n(bus, from, to, etype)
  for i = from, to do assert(bus:publish(etype or "m.x", { n = i })) end
end

describe("bus:batch", function()
  after_each(H.done)

  it("hands over size events at a time, in arrival order", function()
    local bus = setup()
    local got = {}
    bus:batch("m.*", { size = 3, interval = 10 })(function(events, attempt)
      got[#got + 1] = ns(events) .. "@" .. attempt
    end)
    publish_n(bus, 1, 7)
    bus:drain()
    assert.same({ "1,2,3@1", "4,5,6@1" }, got)
  end)

  it("hands over a partial batch interval seconds after its first event",
     function()
    local bus, clock = setup()
    local got = {}
    bus:batch("m.*", { size = 10, interval = 2 })(function(events)
      got[#got + 1] = ns(events) .. "@" .. clock:now() - 1000
    end)
    publish_n(bus, 1, 2)
    bus:drain()
    clock:advance(1)
    publish_n(bus, 3, 3)
    bus:drain()
    clock:advance(0.999)
    assert.same({}, got)
    clock:advance(0.001)                -- 2 s after event 1, not event 3
    assert.same({ "1,2,3@2" }, got)
    publish_n(bus, 4, 4)
    bus:drain()
    clock:advance(2)
    assert.same({ "1,2,3@2", "4@4" }, got)
    clock:advance(10)                   -- nothing buffered: no empty batch
    assert.same({ "1,2,3@2", "4@4" }, got)
  end)

  it("closes a batch before max_bytes of payload would be passed",
     function()
    local bus = setup()
    local got = {}
    bus:batch("m.*", { size = 100, max_bytes = 30 })(function(events)
      got[#got + 1] = ns(events)
    end)
    -- {"n":1,"s":"xxxxx"} is 19 bytes of JSON; two are 38 > 30
    for i = 1, 3 do bus:publish("m.x", { n = i, s = "xxxxx" }) end
    -- a payload over the cap on its own goes alone
    bus:publish("m.x", { n = 4, s = ("y"):rep(40) })
    bus:publish("m.x", { n = 5 })
    bus:drain()
    assert.same({ "1", "2", "3", "4" }, got)
  end)

  it("retries a failing batch as a unit, with the same events", function()
    local bus, clock = setup()
    local calls = {}
    bus:batch("m.*", { size = 2, retry = { max = 3, base = 1, jitter = 0 } })(
      function(events, attempt)
        calls[#calls + 1] = ns(events) .. "@" .. attempt
                            .. "/t" .. clock:now() - 1000
        if attempt < 3 then error("db down") end
      end)
    publish_n(bus, 1, 2)
    bus:drain()
    assert.same({ "1,2@1/t0" }, calls)
    clock:advance(1)
    assert.same({ "1,2@1/t0", "1,2@2/t1" }, calls)
    clock:advance(2)                    -- backoff doubles
    assert.same({ "1,2@1/t0", "1,2@2/t1", "1,2@3/t3" }, calls)
    assert.same({}, bus:dead_letters())
  end)

  it("dead-letters an exhausted batch as its events; redrive re-batches",
     function()
    local bus, clock = setup()
    local dlq, ok_after = {}, false
    bus:subscribe("$DLQ.>", function(ev)
      dlq[#dlq + 1] = ev.type .. ":" .. ev.payload.event.payload.n
    end)
    local calls = 0
    bus:batch("m.*", { size = 2, name = "sink",
                       retry = { max = 2, base = 1, jitter = 0 } })(
      function(events)
        calls = calls + 1
        if not ok_after then error("still down") end
        dlq[#dlq + 1] = "ok:" .. ns(events)
      end)
    bus:publish("m.a", { n = 1 })
    bus:publish("m.b", { n = 2 })
    bus:drain()
    clock:advance(1)
    bus:drain()
    assert.equal(2, calls)
    local dead = bus:dead_letters()
    assert.equal(2, #dead)
    assert.same({ "sink", "sink" }, { dead[1].subscription,
                                      dead[2].subscription })
    assert.same({ "m.a", "m.b" }, { dead[1].event.type, dead[2].event.type })
    assert.equal("exhausted", dead[1].reason)
    assert.matches("still down", dead[1].error)
    assert.equal(2, #dead[1].attempts)
    assert.same({ "$DLQ.m.a:1", "$DLQ.m.b:2" }, dlq)
    ok_after = true
    assert.equal(2, bus:redrive{ subscription = "sink" })
    bus:drain()
    assert.same({ "$DLQ.m.a:1", "$DLQ.m.b:2", "ok:1,2" }, dlq)
    assert.same({}, bus:dead_letters())
  end)

  it("reports a failing batch to on_error with its events", function()
    local seen
    local bus = setup{ on_error = function(err, b) seen = { err, b } end }
    bus:batch("m.*", { size = 2 })(function() error("nope") end)
    publish_n(bus, 1, 2)
    bus:drain()
    assert.matches("nope", seen[1])
    assert.equal("1,2", ns(seen[2].batch))
  end)

  it("runs one batch at a time by default; the next waits", function()
    local bus, clock = setup()
    local log = {}
    bus:batch("m.*", { size = 2 })(function(events)
      log[#log + 1] = "start " .. ns(events)
      buzz.sleep(1)
      log[#log + 1] = "end " .. ns(events)
    end)
    publish_n(bus, 1, 4)
    bus:drain()
    assert.same({ "start 1,2" }, log)
    clock:advance(1)
    assert.same({ "start 1,2", "end 1,2", "start 3,4" }, log)
    clock:advance(1)
    assert.same({ "start 1,2", "end 1,2", "start 3,4", "end 3,4" }, log)
  end)

  it("times out a batch handler that sleeps past timeout", function()
    local errs = {}
    local bus, clock = setup{ on_error = function(e)
      errs[#errs + 1] = tostring(e)
    end }
    bus:batch("m.*", { size = 1, timeout = 0.5 })(function()
      buzz.sleep(1)
    end)
    publish_n(bus, 1, 1)
    bus:drain()
    clock:advance(0.5)
    assert.equal(1, #errs)
    assert.matches("ETIMEOUT", errs[1])
  end)

  it("adaptive moves the size toward the target latency", function()
    local bus, clock = setup()
    local sizes = {}
    local sub = bus:batch("m.*", { size = 10, interval = 60,
                                   adaptive = { target = 0.05 } })(
      function(events)
        sizes[#sizes + 1] = #events
        buzz.sleep(#events * 0.001)     -- 1 ms per event
      end)
    for round = 1, 8 do
      publish_n(bus, 1, sub:stats().size)
      bus:drain()
      clock:advance(1)
      assert.equal(0, sub:stats().buffered, "round " .. round)
    end
    -- 1 ms per event and 50 ms wanted: 10 -> 30 -> 40 -> 45 -> ... -> 50
    assert.same({ 10, 30, 40, 45, 48, 49, 50, 50 }, sizes)
    assert.equal(50, sub:stats().size)
  end)

  it("adaptive shrinks a batch that is too slow, within min and max",
     function()
    local bus, clock = setup()
    local sub = bus:batch("m.*", { size = 40, interval = 60,
                                   adaptive = { target = 0.01, min = 5,
                                                max = 40 } })(
      function(events) buzz.sleep(#events * 0.001) end)
    for _ = 1, 6 do
      publish_n(bus, 1, sub:stats().size)
      bus:drain()
      clock:advance(1)
    end
    assert.equal(10, sub:stats().size)
    local fast = bus:batch("f.*", { size = 20, interval = 60,
                                    adaptive = { max = 25 } })(
      function() end)                   -- takes no time: grows to max
    for _ = 1, 3 do
      publish_n(bus, 1, fast:stats().size, "f.x")
      bus:drain()
    end
    assert.equal(25, fast:stats().size)
  end)

  it("applies the subscription's filter before batching", function()
    local bus = setup()
    local got = {}
    bus:batch("m.*", { size = 2, filter = buzz.where{ ["payload.n"] = {
      gt = 2 } } })(function(events) got[#got + 1] = ns(events) end)
    publish_n(bus, 1, 6)
    bus:drain()
    assert.same({ "3,4", "5,6" }, got)
  end)

  it("batches what a route's stages pass on: route:batch{}:handle(fn)",
     function()
    local bus = setup()
    local got = {}
    local sub = bus:route("m.*"):where{ ["payload.n"] = { gt = 1 } }
      :map(function(ev) return { n = ev.payload.n * 10 } end)
      :batch{ size = 2 }:handle(function(events)
        got[#got + 1] = ns(events)
      end)
    publish_n(bus, 1, 5)
    bus:drain()
    assert.same({ "20,30", "40,50" }, got)
    assert.equal(0, sub:stats().buffered)
    local ok, err = pcall(function()
      bus:route("m.*"):batch{ size = 2 }:handle("f")
    end)
    assert.is_false(ok)
    assert.matches("^spec/batch_spec%.lua:%d+: bad handler", err)
    ok, err = pcall(function() bus:route("m.*"):batch{ size = 0 } end)
    assert.is_false(ok)
    assert.matches("^spec/batch_spec%.lua:%d+: bad batch size", err)
  end)

  it("unsubscribe hands over the partial batch, then nothing more",
     function()
    local bus = setup()
    local got = {}
    local sub = bus:batch("m.*", { size = 10 })(function(events)
      got[#got + 1] = ns(events)
    end)
    publish_n(bus, 1, 3)
    bus:drain()
    assert.equal(3, sub:stats().buffered)
    assert.is_true(sub:unsubscribe())
    assert.same({ "1,2,3" }, got)
    publish_n(bus, 4, 5)
    bus:drain()
    assert.same({ "1,2,3" }, got)
  end)

  it("stats show the size, what is buffered and batches not finished",
     function()
    local bus, clock = setup()
    local sub = bus:batch("m.*", { size = 2 })(function()
      buzz.sleep(1)
    end)
    publish_n(bus, 1, 5)
    bus:drain()
    local st = sub:stats()
    assert.equal(2, st.size)
    assert.equal(1, st.buffered)
    assert.equal(2, st.batches)        -- one asleep, one waiting
    assert.equal(1, st.inflight)
    assert.equal(1, st.waiting)
    clock:advance(3)                    -- 5 went at its interval (1 s)
    assert.equal(0, sub:stats().batches)
  end)

  describe("with a durable store", function()
    local path
    before_each(function() path = H.tmp_store() end)
    after_each(function() H.remove_store(path) end)

    local function open(clock)
      return H.bus{ store = path, clock = clock, on_error = function() end }
    end

    it("a restart takes up what was buffered or failing, then new events",
       function()
      local clock = buzz.manual_clock(1000)
      local bus = open(clock)
      local fail = true
      bus:batch("m.*", { size = 3, durable = "sink",
                         retry = { max = 5, base = 10 } })(function()
        if fail then error("down") end
      end)
      publish_n(bus, 1, 5)               -- 1,2,3 failing; 4,5 buffered
      bus:drain()
      assert(bus:flush())
      bus:close()                        -- as a crash would leave it

      local bus2 = open(buzz.manual_clock(2000))
      local got = {}
      bus2:batch("m.*", { size = 3, durable = "sink" })(function(events)
        got[#got + 1] = ns(events)
      end)
      assert.same({}, got)               -- handed over on the next turn
      bus2:drain()
      assert.same({ "1,2,3" }, got)      -- 4, 5 wait for a third, as ever
      publish_n(bus2, 6, 6)
      bus2:drain()
      assert.same({ "1,2,3", "4,5,6" }, got)
      assert(bus2:flush())
      bus2:close()

      -- all finished: nothing is taken up again
      local bus3 = open(buzz.manual_clock(3000))
      local again = {}
      bus3:batch("m.*", { size = 1, durable = "sink" })(function(events)
        again[#again + 1] = ns(events)
      end)
      bus3:drain()
      assert.same({}, again)
    end)

    it("reports a take-up that fails, saying where the events are",
       function()
      local bus = open(buzz.manual_clock(1000))
      bus:batch("m.*", { size = 10, durable = "sink" })(function() end)
      publish_n(bus, 1, 3)
      bus:drain()
      assert(bus:flush())
      bus:close()
      local errs = {}
      local bus2 = H.bus{ store = path, clock = buzz.manual_clock(2000),
                          on_error = function(e) errs[#errs + 1] = e end }
      bus2.replay = function() error("disk on fire") end
      bus2:batch("m.*", { size = 10, durable = "sink" })(function() end)
      assert.matches("batch sink could not take up its unfinished events: "
                     .. ".*disk on fire; they are in the log from #1 to #3 "
                     .. "%(bus:replay{ from = 1, to = 3, handler = %.%.%. } "
                     .. "feeds them%)", tostring(errs[1]))
    end)

    -- Issue 13: a durable batch without retry that failed was released,
    -- its row moved past its events, and nothing but on_error saw them.
    it("dead-letters a failing durable batch by default, as its events; "
       .. "redrive after a restart re-batches them", function()
      local bus = open(buzz.manual_clock(1000))
      bus:batch("m.*", { size = 2, durable = "sink" })(function()
        error("sink down")
      end)
      publish_n(bus, 1, 2)
      bus:drain()
      local dead = bus:dead_letters{ subscription = "sink" }
      assert.equal(2, #dead)
      assert.same({ 1, 2 }, { dead[1].event.payload.n,
                              dead[2].event.payload.n })
      assert(bus:flush())
      bus:close()
      local bus2 = open(buzz.manual_clock(2000))
      local got = {}
      bus2:batch("m.*", { size = 2, durable = "sink" })(function(events)
        got[#got + 1] = ns(events)
      end)
      bus2:drain()
      assert.same({}, got)                -- finished: not taken up again
      assert.equal(2, bus2:redrive { subscription = "sink" })
      bus2:drain()
      assert.same({ "1,2" }, got)
    end)

    it("lets a durable batch opt out of dead letters with retry = false",
       function()
      local bus = open(buzz.manual_clock(1000))
      bus:batch("m.*", { size = 2, durable = "sink", retry = false })(
        function() error("sink down") end)
      publish_n(bus, 1, 2)
      bus:drain()
      assert.same({}, bus:dead_letters())
    end)

    it("run() waits for a partial batch's interval, then returns",
       function()
      local bus = H.bus{ store = path, on_error = function() end }
      local got = {}
      bus:batch("m.*", { size = 10, interval = 0.05, durable = "sink" })(
        function(events) got[#got + 1] = ns(events) end)
      publish_n(bus, 1, 2)
      assert.equal(2, bus:run())
      assert.same({ "1,2" }, got)
      assert.equal(0, bus:stats().timers)
    end)

    it("a live batch keeps no state in the store", function()
      local bus = open(buzz.manual_clock(1000))
      bus:batch("m.*", { size = 10 })(function() end)
      publish_n(bus, 1, 3)
      bus:drain()
      assert(bus:flush())
      local c = bus._core
      assert.same({}, c:state_list("batch"))
    end)
  end)

  describe("bad input", function()
    local bus
    before_each(function() bus = setup() end)

    local function fails_with(msg, pattern, opts)
      local ok, err = pcall(function()
        bus:batch(pattern or "m.*", opts)(function() end)
      end)
      assert.is_false(ok)
      assert.matches(msg, err, 1, true)
      assert.matches("batch_spec.lua", err, 1, true)  -- the caller's line
    end

    it("raises at definition, pointing at the caller", function()
      fails_with("bad batch size: expected a positive integer, got 0", nil,
                 { size = 0 })
      fails_with("bad batch size: expected a positive integer, got 1.5",
                 nil, { size = 1.5 })
      fails_with("bad batch interval: expected a positive number of "
                 .. "seconds, got -1", nil, { interval = -1 })
      fails_with("bad batch max_bytes", nil, { max_bytes = "1k" })
      fails_with("bad batch adaptive: expected true or a table", nil,
                 { adaptive = "yes" })
      fails_with("bad batch adaptive.target", nil,
                 { adaptive = { target = 0 } })
      fails_with("min (50) is above max (10)", nil,
                 { adaptive = { min = 50, max = 10 } })
      fails_with("unknown option \"speed\" in adaptive", nil,
                 { adaptive = { speed = 1 } })
      fails_with("unknown option \"sise\" to batch (known: adaptive", nil,
                 { sise = 3 })
      fails_with("cannot be ordered", nil, { ordered = true })
      fails_with("cannot be once", nil, { once = true })
      fails_with("bad options to batch: expected a table", nil, 5)
      fails_with("bad retry", nil, { retry = "x" })
      fails_with("bad batch timeout", nil, { timeout = 0 })
      fails_with("bad name", nil, { name = 3 })
      fails_with("bad durable", nil, { durable = "" })
      fails_with("bad condition: expected buzz.where", nil, { filter = 5 })
      fails_with('bad start "x"', nil, { start = "x" })
      fails_with("pattern", "m..x", {})
      fails_with("pattern", 42, {})
    end)

    it("a handler that is not a function raises at the caller", function()
      local decorate = bus:batch("m.*")
      local ok, err = pcall(function() decorate("f") end)
      assert.is_false(ok)
      assert.matches("bad handler: expected a function(events)", err, 1,
                     true)
      assert.matches("batch_spec.lua", err, 1, true)
    end)

    it("bus.batch without the colon says how to call it", function()
      local ok, err = pcall(bus.batch, "m.*")
      assert.is_false(ok)
      assert.matches("bus:batch", err, 1, true)
    end)
  end)
end)

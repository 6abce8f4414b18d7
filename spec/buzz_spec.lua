-- lua/buzz/init.lua: the public API (DESIGN.md, "Public API").
local buzz = require "buzz"

describe("a bus", function()
  local bus, errors
  before_each(function()
    errors = {}
    bus = H.bus{ on_error = function(err, ev, sub, trace)
      errors[#errors + 1] = { err = err, ev = ev, sub = sub, trace = trace }
    end }
  end)
  after_each(function() H.done() end)

  describe("delivering", function()
    it("gives handlers the event fields of the contract", function()
      local got
      bus:subscribe("task.*", H.counter(1, function(ev) got = ev end))
      local before = os.time() * 1000
      local id = bus:publish("task.start", { task_id = "1735560000" },
                             { key = "task-1", priority = "high",
                               headers = { traceparent = "00-1-2-01" } })
      assert.equal(1, bus:drain())
      assert.equal(id, got.id)
      assert.equal("task.start", got.type)
      assert.same({ task_id = "1735560000" }, got.payload)
      local after = os.time() * 1000
      assert(got.ts >= before - 1000 and got.ts <= after + 1000,
             ("ts %s is not between %d and %d"):format(tostring(got.ts),
                                                       before - 1000,
                                                       after + 1000))
      assert.equal("high", got.priority)
      assert.equal("task-1", got.key)
      assert.equal(1, got.attempt)
      assert.is_nil(got.correlation_id)
      assert.is_nil(got.causation_id)
      assert.same({ traceparent = "00-1-2-01" }, got.headers)
    end)

    it("uses the normal priority when none is given", function()
      bus:subscribe("e", H.counter(1, function(ev)
        assert.equal("normal", ev.priority)
      end))
      bus:publish("e")
      bus:drain()
    end)

    it("delivers critical events before normal ones, FIFO within each",
       function()
      local order = {}
      bus:subscribe("job.>", function(ev) order[#order + 1] = ev.payload end)
      bus:publish("job.a", "n1")
      bus:publish("job.b", "l1", { priority = "low" })
      bus:publish("job.c", "c1", { priority = "critical" })
      bus:publish("job.d", "n2", { priority = "normal" })
      bus:publish("job.e", "h1", { priority = "high" })
      bus:publish("job.f", "c2", { priority = "critical" })
      bus:drain()
      assert.same({ "c1", "c2", "h1", "n1", "n2", "l1" }, order)
    end)

    it("reaches an event's subscriptions in subscription order", function()
      local order = {}
      for i, p in ipairs({ ">", "a.*", "a.b", "*.b", "a.>" }) do
        bus:subscribe(p, function() order[#order + 1] = i end)
      end
      bus:publish("a.b")
      bus:drain()
      assert.same({ 1, 2, 3, 4, 5 }, order)
    end)

    it("does not deliver to a subscription made after the publish",
       function()
      bus:publish("e", 1)
      bus:subscribe("e", H.counter(0))
      bus:drain()
    end)

    it("delivers events published in a handler after the current event",
       function()
      local order = {}
      bus:subscribe("first", function()
        order[#order + 1] = "first:a"
        bus:publish("second", nil, { priority = "critical" })
      end)
      bus:subscribe("first", function() order[#order + 1] = "first:b" end)
      bus:subscribe("second", function() order[#order + 1] = "second" end)
      bus:publish("first")
      bus:drain()
      assert.same({ "first:a", "first:b", "second" }, order)
    end)

    it("delivers a critical event a handler publishes before the normal "
       .. "events already queued", function()
      local order = {}
      bus:subscribe("n", function(ev)
        order[#order + 1] = "n" .. ev.payload
        if ev.payload == 1 then
          bus:publish("c", 1, { priority = "critical" })
          bus:publish("h", 1, { priority = "high" })
          bus:publish("n", 9)
        end
      end)
      bus:subscribe("c", function() order[#order + 1] = "c" end)
      bus:subscribe("h", function() order[#order + 1] = "h" end)
      for i = 1, 3 do bus:publish("n", i) end
      assert.equal(6, bus:drain())
      assert.same({ "n1", "c", "h", "n2", "n3", "n9" }, order)
    end)

    it("counts a preempting delivery toward step(max)", function()
      local order = {}
      bus:subscribe("n", function(ev)
        order[#order + 1] = "n" .. ev.payload
        if ev.payload == 1 then
          bus:publish("c", 1, { priority = "critical" })
        end
      end)
      bus:subscribe("c", function() order[#order + 1] = "c" end)
      for i = 1, 3 do bus:publish("n", i) end
      assert.equal(2, bus:step(2))
      assert.same({ "n1", "c" }, order)
      assert.equal(2, bus:step(5))
      assert.same({ "n1", "c", "n2", "n3" }, order)
    end)

    it("passes the payload by reference, one event table per event",
       function()
      local payload, tables = { n = 1 }, {}
      bus:subscribe("e", function(ev) tables[1] = ev end)
      bus:subscribe("e", function(ev) tables[2] = ev end)
      bus:publish("e", payload)
      bus:drain()
      assert.equal(payload, tables[1].payload)
      assert.equal(tables[1], tables[2])
    end)

    it("accepts callable tables as handlers", function()
      local calls = 0
      local handler = setmetatable({}, { __call = function(self, ev)
        assert.is_table(self)
        calls = calls + ev.payload
      end })
      bus:subscribe("e", handler)
      bus:publish("e", 5)
      bus:drain()
      assert.equal(5, calls)
    end)

    it("gives increasing ids across publish and publish_sync", function()
      local a = bus:publish("x")
      local b = bus:publish_sync("x")
      local c = bus:publish("x")
      assert.is_true(a < b and b < c)
    end)
  end)

  describe("publish_sync", function()
    it("delivers before it returns", function()
      local seen = false
      bus:subscribe("e", function() seen = true end)
      bus:publish_sync("e")
      assert.is_true(seen)
      assert.equal(0, bus:stats().pending)
    end)

    it("delivers at once even inside a handler", function()
      local order = {}
      bus:subscribe("outer", function()
        order[#order + 1] = "outer:start"
        bus:publish_sync("inner")
        order[#order + 1] = "outer:end"
      end)
      bus:subscribe("inner", function() order[#order + 1] = "inner" end)
      bus:publish("outer")
      bus:drain()
      assert.same({ "outer:start", "inner", "outer:end" }, order)
    end)

    it("leaves queued events queued", function()
      local order = {}
      bus:subscribe(">", function(ev) order[#order + 1] = ev.type end)
      bus:publish("queued")
      bus:publish_sync("now")
      assert.same({ "now" }, order)
      bus:drain()
      assert.same({ "now", "queued" }, order)
    end)

    it("is not refused by a full queue (it does not queue)", function()
      local small = H.bus{ queue_limit = 1 }
      small:subscribe("e", H.counter(2))
      assert(small:publish("e"))
      assert.is_nil((small:publish("e")))
      assert(small:publish_sync("e"))
      small:drain()
    end)
  end)

  describe("correlation and causation", function()
    it("inherits the correlation id and sets the causation id in handlers",
       function()
      local child, grandchild
      bus:subscribe("order.created", function()
        bus:publish("order.paid", nil)
      end)
      bus:subscribe("order.paid", function(ev)
        child = ev
        bus:publish_sync("order.shipped", nil)
      end)
      bus:subscribe("order.shipped", function(ev) grandchild = ev end)
      local root = bus:publish("order.created", nil,
                               { correlation_id = "req-9" })
      bus:drain()
      assert.equal("req-9", child.correlation_id)
      assert.equal(root, child.causation_id)
      assert.equal("req-9", grandchild.correlation_id)
      assert.equal(child.id, grandchild.causation_id)
    end)

    it("lets a handler choose another correlation id", function()
      local got
      bus:subscribe("a", function()
        bus:publish("b", nil, { correlation_id = "new" })
      end)
      bus:subscribe("b", function(ev) got = ev.correlation_id end)
      bus:publish("a", nil, { correlation_id = "old" })
      bus:drain()
      assert.equal("new", got)
    end)

    it("does not leak the context out of handlers", function()
      local got
      bus:subscribe("a", function() end)
      bus:subscribe("b", function(ev) got = ev end)
      bus:publish("a", nil, { correlation_id = "x" })
      bus:drain()
      bus:publish("b")
      bus:drain()
      assert.is_nil(got.correlation_id)
      assert.is_nil(got.causation_id)
    end)
  end)

  describe("failures", function()
    it("isolates a raising handler: the others still run", function()
      local ran = {}
      bus:subscribe("e", function() ran[#ran + 1] = 1 end)
      local bad = bus:subscribe("e", function() error("boom") end)
      bus:subscribe("e", function() ran[#ran + 1] = 3 end)
      local id = bus:publish("e", "payload")
      bus:publish("e", "again")
      assert.equal(6, bus:drain())
      assert.same({ 1, 3, 1, 3 }, ran)
      assert.equal(2, #errors)
      assert.matches("boom", errors[1].err)
      assert.equal(id, errors[1].ev.id)
      assert.equal(bad, errors[1].sub)
      assert.matches("stack traceback", errors[1].trace)
    end)

    it("reports non-string errors as they were raised", function()
      local value = { code = 42 }
      bus:subscribe("e", function() error(value) end)
      bus:publish("e")
      bus:drain()
      assert.equal(value, errors[1].err)
      assert.is_string(errors[1].trace)
    end)

    it("survives an on_error that raises, saying so on stderr", function()
      local ok, out = H.run([[
        local buzz = require "buzz"
        local bus = buzz.new{
          on_error = function() error("on_error broke") end }
        local n = 0
        bus:subscribe("e", function() error("x") end)
        bus:subscribe("e", function() n = n + 1 end)
        bus:publish("e")
        bus:publish("e")
        print("delivered", bus:drain(), n)
      ]])
      assert.is_true(ok, out)
      assert.matches("delivered\t4\t2", out)
      assert.matches("buzz: on_error raised while reporting", out, 1, true)
      assert.matches("on_error broke", out, 1, true)
    end)

    it("reports to stderr when no on_error is given", function()
      local plain = H.bus()
      plain:subscribe("task.*", function() error("went wrong") end)
      plain:publish("task.start")
      local code = [[
        local buzz = require "buzz"
        local bus = buzz.new()
        bus:subscribe("task.*", function() error("went wrong") end)
        bus:publish("task.start")
        bus:drain()
        print("after")
      ]]
      local ok, out = H.run(code)
      assert.is_true(ok, out)
      assert.matches('buzz: handler for "task.*" failed on task.start #1', out,
                     1, true)
      assert.matches("went wrong", out, 1, true)
      assert.matches("after", out, 1, true)
    end)

    it("reports a handler that yields with no driver, without hanging",
       function()
      local after = false
      bus:subscribe("e", function()
        coroutine.yield("waiting")
        after = true
      end)
      bus:subscribe("e", H.counter(1))
      bus:publish("e")
      assert.equal(2, bus:drain())
      assert.is_false(after)
      assert.equal(1, #errors)
      assert.matches("yielded", errors[1].err)
    end)

    it("keeps working after many failures (coroutines are replaced)",
       function()
      local ok = 0
      bus:subscribe("e", function(ev)
        if ev.payload % 2 == 0 then error("even") end
        ok = ok + 1
      end)
      for i = 1, 200 do bus:publish("e", i) end
      bus:drain()
      assert.equal(100, ok)
      assert.equal(100, #errors)
    end)
  end)

  describe("subscriptions", function()
    it("decorator form returns the subscription", function()
      local sub = bus:on("task.*")(H.counter(1))
      assert.equal("task.*", sub.pattern)
      assert.is_true(sub.is_active)
      bus:publish("task.x")
      bus:drain()
    end)

    it("once delivers exactly one event", function()
      local sub = bus:once("task.done")(H.counter(1))
      bus:publish("task.done")
      bus:publish("task.done")
      bus:drain()
      assert.is_false(sub.is_active)
      assert.is_false(sub:unsubscribe())
      assert.equal(0, bus:stats().subscriptions)
    end)

    it("once is also an option of subscribe", function()
      bus:subscribe("e", H.counter(1), { once = true })
      bus:publish("e")
      bus:publish("e")
      bus:drain()
    end)

    it("unsubscribe is idempotent and stops deliveries", function()
      local sub = bus:subscribe("e", H.counter(1))
      bus:publish("e")
      bus:drain()
      assert.is_true(sub:unsubscribe())
      assert.is_false(sub:unsubscribe())
      bus:publish("e")
      bus:drain()
    end)

    it("unsubscribing in a handler stops that handler at once", function()
      local later
      bus:subscribe("e", function() later:unsubscribe() end)
      later = bus:subscribe("e", H.counter(0))
      bus:publish("e")
      bus:publish("e")
      bus:drain()
    end)

    it("a handler may unsubscribe itself", function()
      local sub
      sub = bus:subscribe("e", H.counter(1, function() sub:unsubscribe() end))
      bus:subscribe("e", H.counter(3))
      for _ = 1, 3 do bus:publish("e") end
      bus:drain()
    end)

    it("unsubscribe_handler removes every subscription of a function",
       function()
      local fn = H.counter(0)
      bus:subscribe("a", fn)
      bus:subscribe("b.*", fn)
      local other = bus:subscribe("a", H.counter(1))
      assert.equal(2, bus:unsubscribe_handler(fn))
      bus:publish("a")
      bus:publish("b.c")
      bus:drain()
      assert.is_true(other.is_active)
    end)

    if _VERSION == "Lua 5.4" then
      it("ends a subscription when a to-be-closed variable goes", function()
        local f = assert(load([[
          local bus, fn = ...
          do
            local sub <close> = bus:subscribe("e", fn)
          end
        ]]))
        f(bus, H.counter(0))
        bus:publish("e")
        bus:drain()
        assert.equal(0, bus:stats().subscriptions)
      end)
    end
  end)

  describe("driving", function()
    it("step(max) makes at most max deliveries and says how many", function()
      bus:subscribe("e", function() end)
      bus:subscribe("e", function() end)
      for _ = 1, 3 do bus:publish("e") end
      assert.equal(1, bus:step())
      assert.equal(4, bus:step(4))
      assert.equal(1, bus:step(10))
      assert.equal(0, bus:step(10))
      assert.equal(0, bus:step(0))
    end)

    it("step(max) counts a handler's publish_sync deliveries as part of it",
       function()
      local inner = 0
      for _ = 1, 3 do
        bus:subscribe("inner", function() inner = inner + 1 end)
      end
      bus:subscribe("outer", function() bus:publish_sync("inner", {}) end)
      bus:publish("outer")
      bus:publish("outer")
      assert.equal(1, bus:step(1))             -- not 4: the three inner ran
      assert.equal(3, inner)                   -- inside that one delivery
      assert.equal(1, bus:step(3))
      assert.equal(6, inner)
    end)

    it("step(max) counts the same with a store (the core's publish_sync)",
       function()
      local path = os.tmpname()
      finally(function() os.remove(path); os.remove(path .. "-wal")
                         os.remove(path .. "-shm") end)
      local sbus = H.bus{ store = path }
      local inner = 0
      for _ = 1, 3 do
        sbus:subscribe("inner", function() inner = inner + 1 end)
      end
      sbus:subscribe("outer", function() sbus:publish_sync("inner", {}) end)
      sbus:publish("outer")
      assert.equal(1, sbus:step(1))
      assert.equal(3, inner)
    end)

    it("drain() delivers until nothing is due, including follow-ups",
       function()
      local n = 0
      bus:subscribe("count", function(ev)
        n = n + 1
        if ev.payload < 10 then bus:publish("count", ev.payload + 1) end
      end)
      bus:publish("count", 1)
      assert.equal(10, bus:drain())
      assert.equal(10, n)
    end)

    it("run() returns when nothing is pending and no timer is armed",
       function()
      bus:subscribe("e", H.counter(3))
      for _ = 1, 3 do bus:publish("e") end
      assert.equal(3, bus:run())
      assert.equal(0, bus:run())
    end)

    it("run() returns after stop() from a handler", function()
      local n = 0
      bus:subscribe("e", function()
        n = n + 1
        if n == 2 then bus:stop() end
      end)
      for _ = 1, 5 do bus:publish("e") end
      assert.equal(2, bus:run())
      assert.equal(3, bus:stats().pending)
      assert.equal(3, bus:run())                 -- run again resumes
    end)

    it("refuses to drive the bus from inside a handler", function()
      for _, method in ipairs({ "step", "drain", "run" }) do
        local b = H.bus()
        local msg
        b:subscribe("e", function()
          local ok, err = pcall(b[method], b)
          assert.is_false(ok)
          msg = err
        end)
        b:publish("e")
        b:drain()
        assert.matches("bus:" .. method .. "%(%) called from inside a handler",
                       msg)
      end
    end)

    it("exposes the loop contract: fd and timeout", function()
      assert.equal(-1, bus:timeout())
      bus:subscribe("e", function() end)
      bus:publish("e")
      assert.equal(0, bus:timeout())
      assert.is_number(bus:fd())
      bus:drain()
      assert.equal(-1, bus:timeout())
    end)
  end)

  describe("back-pressure", function()
    it("refuses with nil, EFULL, code at queue_limit and keeps the queue",
       function()
      local small = H.bus{ queue_limit = 3 }
      local got = {}
      small:subscribe("e", function(ev) got[#got + 1] = ev.payload end)
      for i = 1, 3 do assert(small:publish("e", i)) end
      local id, err, code = small:publish("e", 4)
      assert.is_nil(id)
      assert.equal("EFULL", code)
      assert.matches("^EFULL: ", err)
      small:drain()
      assert.same({ 1, 2, 3 }, got)
      assert(small:publish("e", 5))              -- room again
    end)
  end)

  describe("closing", function()
    it("discards pending events, returns their number, and is idempotent",
       function()
      bus:subscribe("e", H.counter(0))
      for _ = 1, 4 do bus:publish("e") end
      assert.equal(4, bus:close())
      assert.equal(0, bus:close())
      assert.is_true(bus:is_closed())
    end)

    it("raises 'attempt to use a closed bus' on every method", function()
      local sub = bus:subscribe("e", function() end)
      bus:close()
      assert.is_false(sub.is_active)
      assert.is_false(sub:unsubscribe())
      local calls = {
        function() bus:publish("e") end,
        function() bus:publish_sync("e") end,
        function() bus:subscribe("e", print) end,
        function() bus:on("e") end,
        function() bus:once("e") end,
        function() bus:step() end,
        function() bus:drain() end,
        function() bus:run() end,
        function() bus:stop() end,
        function() bus:stats() end,
        function() bus:unsubscribe_handler(print) end,
      }
      for _, f in ipairs(calls) do
        assert.has_error(f, "attempt to use a closed bus")
      end
    end)

    it("delivers nothing more once a handler closes the bus", function()
      bus:subscribe("e", H.counter(1, function() bus:close() end))
      bus:subscribe("e", H.counter(0))
      bus:publish("e")
      bus:publish("e")
      assert.equal(1, bus:drain())
    end)

    if _VERSION == "Lua 5.4" then
      it("closes as a to-be-closed variable", function()
        local f = assert(load([[
          local buzz = ...
          local b
          do
            local bus <close> = buzz.new()
            b = bus
          end
          return b
        ]]))
        assert.is_true(f(buzz):is_closed())
      end)
    end
  end)
end)

describe("bad input", function()
  local bus
  before_each(function() bus = H.bus() end)
  after_each(function() H.done() end)

  local function raises(pattern, f)
    local ok, err = pcall(f)
    assert.is_false(ok, "expected an error matching " .. pattern)
    assert.matches(pattern, tostring(err), 1, true)
    assert.equal(0, bus:stats().pending)
  end

  it("rejects non-function handlers", function()
    raises("bad handler: expected a function, got nil",
           function() bus:subscribe("e") end)
    raises("bad handler: expected a function, got string",
           function() bus:subscribe("e", "print") end)
    raises("bad handler: expected a function, got table",
           function() bus:on("e")({}) end)
    assert.equal(0, bus:stats().subscriptions)
  end)

  -- { subject, message as a pattern, message as a type }
  local BAD = {
    { "",      "is empty",           "is empty" },
    { "a..b",  "empty token",        "empty token" },
    { "a.>.b", "may only come last", "one concrete subject" },
    { "a b",   "white space",        "white space" },
    { "a.",    "empty token",        "empty token" },
  }
  for _, case in ipairs(BAD) do
    it(("rejects the malformed subject %q everywhere"):format(case[1]),
       function()
      raises(case[2], function() bus:subscribe(case[1], print) end)
      raises(case[2], function() bus:on(case[1]) end)
      raises(case[2], function() bus:once(case[1]) end)
      raises(case[3], function() bus:publish(case[1]) end)
      raises(case[3], function() bus:publish_sync(case[1]) end)
      assert.equal(0, bus:stats().subscriptions)
    end)
  end

  it("words a bad pattern the same in subscribe and in the decorators",
     function()
    for _, p in ipairs({ "a..b", "a\nb", "a.>.b" }) do
      local _, e1 = pcall(bus.subscribe, bus, p, print)
      local _, e2 = pcall(bus.on, bus, p)
      local _, e3 = pcall(bus.once, bus, p)
      assert.matches('bad pattern "', e1, 1, true)
      assert.equal(e1, e2)
      assert.equal(e1, e3)
    end
  end)

  it("accepts a wildcard inside a token as a literal", function()
    local got
    bus:subscribe("a.b*", function(ev) got = ev.type end)
    bus:publish("a.b*")
    bus:drain()
    assert.equal("a.b*", got)
  end)

  it("rejects wildcards in a published type", function()
    raises("a published type names one concrete subject",
           function() bus:publish("task.*") end)
    raises("a published type names one concrete subject",
           function() bus:publish_sync("task.>") end)
  end)

  it("rejects publishing reserved $ subjects, but allows subscribing",
     function()
    raises("reserved for the engine", function() bus:publish("$SYS.x") end)
    assert(bus:subscribe("$SYS.>", print))
  end)

  it("rejects a non-string subject with the expected form", function()
    raises('bad type: expected a string such as "task.start", got number',
           function() bus:publish(42) end)
    raises('bad pattern: expected a string such as "task.*", got nil',
           function() bus:subscribe(nil, print) end)
  end)

  it("rejects unknown option names, naming the known ones", function()
    raises('unknown option "prio" to publish (known options: at, '
           .. "correlation_id, dedup, delay, expect, headers, key, priority, "
           .. "stream, version)",
           function() bus:publish("e", nil, { prio = "high" }) end)
    raises('unknown option "onec" to subscribe',
           function() bus:subscribe("e", print, { onec = true }) end)
    raises('unknown option "queue_limt" to buzz.new',
           function() buzz.new{ queue_limt = 5 } end)
    raises("bad options to publish: expected a table, got string",
           function() bus:publish("e", nil, "high") end)
  end)

  it("rejects bad option values", function()
    raises('bad priority "urgent": expected "critical", "high", "normal" '
           .. 'or "low"', function()
      bus:publish("e", nil, { priority = "urgent" })
    end)
    raises("bad key: expected a string or an integer, got table",
           function() bus:publish("e", nil, { key = {} }) end)
    raises("bad correlation_id: expected a string, got number",
           function() bus:publish("e", nil, { correlation_id = 5 }) end)
    raises("bad headers: names and values must be strings",
           function() bus:publish("e", nil, { headers = { a = 1 } }) end)
    raises("bad once: expected a boolean",
           function() bus:subscribe("e", print, { once = "yes" }) end)
    raises("bad queue_limit: expected a positive integer, got 0",
           function() buzz.new{ queue_limit = 0 } end)
    raises("bad queue_limit: expected a positive integer, got 1.5",
           function() buzz.new{ queue_limit = 1.5 } end)
    raises("bad on_error: expected a function, got string",
           function() buzz.new{ on_error = "print" } end)
    raises('bad durability "fast": expected "batch", "sync" or "none"',
           function() buzz.new{ durability = "fast" } end)
    raises("bad max: expected a non-negative integer, got -1",
           function() bus:step(-1) end)
  end)

  it("rejects delays that are not seconds from now or epoch seconds",
     function()
    raises("bad delay: expected seconds >= 0, got -1",
           function() bus:publish("e", nil, { delay = -1 }) end)
    raises("bad delay: expected seconds >= 0, got \"5\"",
           function() bus:publish("e", nil, { delay = "5" }) end)
    raises("bad at: expected epoch seconds, got NaN",
           function() bus:publish("e", nil, { at = 0 / 0 }) end)
    raises("give delay (seconds from now) or at (epoch seconds), not both",
           function() bus:publish("e", nil, { delay = 1, at = 1 }) end)
    assert.equal(0, bus:stats().delayed)
  end)

  it("tells a caller who used . instead of :", function()
    raises("use bus:publish(...), not bus.publish(...)",
           function() bus.publish("e") end)
    raises("use bus:subscribe(...), not bus.subscribe(...)",
           function() bus.subscribe("e", print) end)
    raises("use bus:drain(...), not bus.drain(...)",
           function() bus.drain() end)
    local sub = bus:subscribe("e", print)
    raises("use sub:unsubscribe(), not sub.unsubscribe()",
           function() sub.unsubscribe() end)
  end)

  it("points the error at the caller's line", function()
    local ok, err = pcall(function()
      bus:publish("a..b")                       -- this line
    end)
    assert.is_false(ok)
    assert.matches("buzz_spec.lua:%d+: bad type", err)
  end)

  it("points subscribe, on and once errors at the caller's line too",
     function()
    local calls = {
      function() bus:subscribe("a.>.b", print) end,
      function() bus:subscribe("a", 42) end,
      function() bus:on("a.>.b") end,
      function() bus:on("a")(42) end,
      function() bus:once("a", { bogus = 1 }) end,
    }
    for _, f in ipairs(calls) do
      local ok, err = pcall(f)
      assert.is_false(ok)
      assert.matches("^spec/buzz_spec.lua:%d+: ", err)
    end
  end)

  it("leaves the bus usable after every rejected call", function()
    pcall(bus.subscribe, bus, "a..b", print)
    pcall(bus.publish, bus, "x.*")
    pcall(bus.publish, bus, "e", nil, { priority = "urgent" })
    bus:subscribe("e", H.counter(1))
    assert(bus:publish("e"))
    assert.equal(1, bus:drain())
  end)
end)

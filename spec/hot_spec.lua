-- lua/buzz/hot.lua: publish_sync's hot path on a memory bus (audiences
-- memoized in Lua, one core:sync_id per event, handlers in pooled
-- workers).
-- Each case holds for the core's own path too; here it is checked where
-- the hot path could break it.
local buzz = require "buzz"

describe("publish_sync's hot path", function()
  local bus, errors
  before_each(function()
    errors = {}
    bus = H.bus{ on_error = function(err, ev, sub, trace)
      errors[#errors + 1] = { err = err, ev = ev, sub = sub, trace = trace }
    end }
  end)
  after_each(function() H.done() end)

  it("delivers to a subscription made after its type's audience was "
     .. "memoized", function()
    local seen = {}
    bus:subscribe("job.done", function() seen[#seen + 1] = "a" end)
    bus:publish_sync("job.done")
    bus:subscribe("job.*", function() seen[#seen + 1] = "b" end)
    bus:publish_sync("job.done")
    assert.equal("a a b", table.concat(seen, " "))
  end)

  it("stops delivering to a subscription ended after the memo was made, "
     .. "even within the event under way", function()
    local seen, b = {}, nil
    bus:subscribe("job.done", function()
      seen[#seen + 1] = "a"
      b:unsubscribe()                  -- b is later in this event's audience
    end)
    b = bus:subscribe("job.done", function() seen[#seen + 1] = "b" end)
    bus:publish_sync("job.done")
    bus:publish_sync("job.done")
    assert.equal("a a", table.concat(seen, " "))
  end)

  it("fixes the audience at publish: a subscription made by a handler "
     .. "gets the next event, not this one", function()
    local seen = {}
    bus:subscribe("job.done", function()
      seen[#seen + 1] = "a"
      if #seen == 1 then
        bus:subscribe("job.done", function() seen[#seen + 1] = "late" end)
      end
    end)
    bus:publish_sync("job.done")
    bus:publish_sync("job.done")
    assert.equal("a a late", table.concat(seen, " "))
  end)

  it("ends a once subscription at its first event", function()
    local calls = H.counter(1)
    bus:once("job.done")(calls)
    bus:publish_sync("job.done")
    bus:publish_sync("job.done")
  end)

  it("reports a raising handler with its traceback and runs the next ones",
     function()
    local after = H.counter(2)
    bus:subscribe("job.done", function() error("boom") end)
    bus:subscribe("job.done", after)
    bus:publish_sync("job.done", { n = 1 })
    bus:publish_sync("job.done", { n = 2 })
    assert.equal(2, #errors)
    assert.matches("boom", errors[1].err)
    assert.equal(1, errors[1].ev.payload.n)
    assert.equal("job.done", errors[1].sub.pattern)
    assert.matches("stack traceback:", errors[1].trace)
    assert.matches("hot_spec.lua", errors[1].trace)
    assert.not_matches("hot%.lua", errors[1].trace)  -- the handler's only
  end)

  it("hands a handler that sleeps to the bus's timers, runs the others at "
     .. "once, and delivers to each subscription once", function()
    local clock = buzz.manual_clock(1000)
    local b = H.bus{ clock = clock }
    local seen = {}
    b:subscribe("job.done", function(ev)
      seen[#seen + 1] = "sleeper " .. ev.id
      buzz.sleep(5)
      seen[#seen + 1] = "woke " .. ev.id
    end)
    b:subscribe("job.done", function(ev) seen[#seen + 1] = "b " .. ev.id end)
    local id = b:publish_sync("job.done")
    assert.equal(("sleeper %d b %d"):format(id, id), table.concat(seen, " "))
    clock:advance(5)
    assert.equal(("sleeper %d b %d woke %d"):format(id, id, id),
                 table.concat(seen, " "))
    local id2 = b:publish_sync("job.done")   -- the pool still works
    assert.equal(("sleeper %d b %d"):format(id2, id2),
                 table.concat(seen, " ", 4))
  end)

  it("reports the right subscription when a lone handler raises in a "
     .. "worker that last ran a larger audience", function()
    for _ = 1, 3 do bus:subscribe("many", function() end) end
    bus:subscribe("one", function() error("lone") end, { name = "lone" })
    bus:publish_sync("many")           -- the worker's last index: 3
    bus:publish_sync("one")
    assert.equal(1, #errors)
    assert.equal("lone", errors[1].sub.name)
    assert.matches("lone", errors[1].err)
  end)

  it("runs 100 nested levels from deep in the caller's C stack, the "
     .. "deepest one asleep, and wakes it", function()
    -- past 16 levels the hot path resumes through the core (a fresh C
    -- budget on Lua 5.4): the nesting must end in EDEPTH, not in "C stack
    -- overflow", however deep the caller already is
    local clock = buzz.manual_clock(1000)
    local b = H.bus{ clock = clock, on_error = function(err)
      errors[#errors + 1] = { err = err }
    end }
    local depth, woke, returned = 0, nil, 0
    b:subscribe("deep", function(ev)
      depth = depth + 1
      if depth < 100 then
        assert(b:publish_sync("deep", ev.payload + 1))
      else
        buzz.sleep(5)
        woke = ev.payload
      end
      returned = returned + 1
    end)
    local function nest(n)             -- 150 C calls deep (pcall's)
      if n == 0 then return b:publish_sync("deep", 1) end
      local ok, id = pcall(nest, n - 1)
      assert(ok, id)
      return id
    end
    assert.is_number(nest(150))
    assert.equal(100, depth)
    assert.equal(99, returned)         -- all but the sleeper returned
    assert.is_nil(woke)
    clock:advance(5)
    assert.equal(100, woke)
    assert.equal(100, returned)
    assert.same({}, errors)
    b:subscribe("again", H.counter(3))  -- the workers still serve
    for _ = 1, 3 do b:publish_sync("again") end
  end)

  it("counts as inside a handler while a nested level runs, not after",
     function()
    local inside = {}
    bus:subscribe("outer", function()
      inside[#inside + 1] = bus:_is_in_handler()
      bus:publish_sync("inner")
      inside[#inside + 1] = bus:_is_in_handler()
    end)
    bus:subscribe("inner", function()
      inside[#inside + 1] = bus:_is_in_handler()
    end)
    bus:publish_sync("outer")
    inside[#inside + 1] = bus:_is_in_handler()
    assert.same({ true, true, true, false }, inside)
  end)

  it("gives events ids that rise with the queued ones, and inherits the "
     .. "correlation and causation ids", function()
    local inner
    bus:subscribe("outer", function()
      bus:publish_sync("inner")
    end)
    bus:subscribe("inner", function(ev) inner = ev end)
    local a = bus:publish("x")
    local b = bus:publish_sync("outer", nil, { correlation_id = "req-1" })
    local c = bus:publish("x")
    assert.is_true(a < b and b < inner.id and inner.id < c)
    assert.equal("req-1", inner.correlation_id)
    assert.equal(b, inner.causation_id)
  end)

  it("counts its levels with the core's toward EDEPTH", function()
    local depth, refused = 0, nil
    bus:subscribe("deep", function()
      depth = depth + 1
      -- every other level takes the core's path (a dedup key)
      local opts = depth % 2 == 0 and { dedup = "d" .. depth } or nil
      local id, err, code = bus:publish_sync("deep", nil, opts)
      if not id and not refused then refused = { depth, err, code } end
    end)
    bus:publish_sync("deep")
    assert.equal(100, depth)
    assert.same({ 100, refused[2], "EDEPTH" }, refused)
    assert.matches("^EDEPTH: publish_sync nested 101 deep", refused[2])
  end)

  it("on LuaJIT, takes ids from the core through the FFI: in step with "
     .. "core:sync_id, and none where core:sync_id refuses", function()
    if not rawget(_G, "jit") then
      pending("the FFI is LuaJIT's")
      return
    end
    local ffi = require "ffi"
    local c = bus._core
    local f = ffi.cast("double (*)(void *, int, int, double *)",
                       c:ffi_sync_id())
    local ts = ffi.new("double[1]")
    local a = c:sync_id(0, 2)
    local b = f(c, 0, 2, ts)
    local d = c:sync_id(0, 2)
    assert.same({ a + 1, a + 2 }, { b, d })
    assert.is_true(math.abs(ts[0] - os.time() * 1000) < 2000)
    assert.equal(0, f(c, 100, 2, ts))          -- EDEPTH: no id taken
    assert.equal(d + 1, (c:sync_id(0, 2)))
    local path = H.tmp_store()
    local stored = H.bus{ store = path }
    assert.equal(0, f(stored._core, 0, 2, ts))  -- a store's ids are not
    stored:close()                              -- the hot path's
    H.remove_store(path)
    assert.is_truthy(bus._hot.sync_id ~= c.sync_id)   -- the path uses it
    local id = bus:publish_sync("job.none")
    bus:subscribe("job.x", function() end)
    assert.equal(id + 1, bus:publish_sync("job.x"))
    bus:close()
    assert.equal(0, f(c, 0, 2, ts))            -- closed
  end)

  it("stops at a handler that closes the bus", function()
    local later = H.counter(0)
    bus:subscribe("job.done", function() bus:close() end)
    bus:subscribe("job.done", later)
    bus:publish_sync("job.done")
    assert.has_error(function() bus:publish_sync("job.done") end,
                     "attempt to use a closed bus")
  end)

  it("points misuse at the caller's line, on either path", function()
    bus:subscribe("job.*", function() end)
    local cases = {
      function() bus:publish_sync("a..b") end,               -- the core's
      function() bus:publish_sync("job.done", nil, { prio = 1 }) end,
      function() bus:publish_sync("job.done", nil, { dedup = 7 }) end,
      function() bus:publish_sync("job.done", nil, { delay = 1 }) end,
      function() bus.publish_sync("job.done") end,
      function() bus:publish("a..b") end,
      function() bus.publish("job.done") end,
    }
    for i, case in ipairs(cases) do
      local ok, err = pcall(case)
      assert.is_false(ok)
      assert.matches("^spec/hot_spec%.lua:%d+: ", err, 1, false,
                     "case " .. i)
    end
  end)

  it("counts as inside a handler: step, drain and run raise there",
     function()
    local errs = {}
    bus:subscribe("job.done", function()
      for _, m in ipairs { "step", "drain", "run" } do
        local ok, err = pcall(bus[m], bus)
        errs[#errs + 1] = not ok and err:match("called from inside a handler")
      end
    end)
    bus:publish_sync("job.done")
    assert.same({ "called from inside a handler", "called from inside a "
                  .. "handler", "called from inside a handler" }, errs)
  end)

  it("gives handlers the options, a lone string key included", function()
    local got = {}
    bus:subscribe("job.done", function(ev) got[#got + 1] = ev end)
    bus:publish_sync("job.done", 1, { key = "k-1" })
    bus:publish_sync("job.done", 2, { key = 7 })
    bus:publish_sync("job.done", 3, { key = "k-3", priority = "low",
                                       headers = { a = "b" }, version = 2,
                                       correlation_id = "c-3" })
    assert.same({ "k-1", "normal", 1 },
                { got[1].key, got[1].priority, got[1].attempt })
    assert.equal(7, got[2].key)
    assert.same({ "k-3", "low", { a = "b" }, 2, "c-3" },
                { got[3].key, got[3].priority, got[3].headers,
                  got[3].version, got[3].correlation_id })
    assert.has_error(function()
      bus:publish_sync("job.done", 4, { key = "k", prio = 1 })
    end)
    assert.has_error(function()
      bus:publish_sync("job.done", 4, { key = 1.5 })
    end)
  end)

  it("keeps at most 4096 types per memo, and a rotation of 5,000 types "
     .. "still mostly hits (no cliff past 4096)", function()
    local n = 0
    bus:subscribe("t.*", function() n = n + 1 end)
    local h = bus._hot
    for _ = 1, 2 do
      for i = 1, 5000 do bus:publish_sync("t.n" .. i) end
    end
    local hits = 0
    for i = 1, 5000 do
      local t = "t.n" .. i
      if h.memo[t] ~= nil or h.old[t] ~= nil then hits = hits + 1 end
      bus:publish_sync(t)
      assert.is_true(h.nmemo <= 4096)
    end
    assert.equal(15000, n)
    assert.is_true(hits >= 3500, hits .. " of 5000 hit")
  end)

  it("leaves middleware to the core's path, which stamps traceparent",
     function()
    local got
    bus:use(function(ev, next, ctx)
      ctx.trace_id = ("a"):rep(32)
      return next(ev)
    end)
    bus:subscribe("outer", function() bus:publish_sync("inner") end)
    bus:subscribe("inner", function(ev) got = ev end)
    bus:publish_sync("outer")
    assert.matches("^00%-" .. ("a"):rep(32), got.headers.traceparent)
  end)
end)

-- The core's own path for queued events keeps the table of the event under
-- delivery in one reused slot of the core (lbuzz.c, push_event): these
-- check that each event still gets its own table, shared by its
-- subscriptions, and lets go of it once delivered.
describe("core.publish_options, publish's fast reading of its options",
         function()
  local core = require "buzz.core"
  local options = require "buzz.options"
  local pack = table.pack or function(...)
    return { n = select("#", ...), ... }
  end
  local values = {
    key = { "k", 5, 5.0, -7, 2 ^ 53, -2 ^ 53, 2 ^ 53 + 2, 0.5, 0 / 0, true,
            "" },
    priority = { "critical", "high", "normal", "low", "HIGH", 1, "" },
    correlation_id = { "req-1", "", 5, {} },
    headers = { {}, { a = "b" }, { a = "b", c = "d" }, { a = 1 }, { "x" },
                "x", setmetatable({}, { __pairs = function()
                  return next, { a = 1 } end }) },
    dedup = { "d", "", 5 },
    version = { 1, 2 ^ 31 - 1, 2 ^ 31, 0, 1.5, 3.0, "1" },
    delay = { 1 }, at = { 5 }, bogus = { 1 },
  }
  local names = {}
  for k in pairs(values) do names[#names + 1] = k end
  table.sort(names)

  -- What the Lua validator makes of opts: its results, or its message.
  local function validated(opts)
    local r = pack(pcall(options.check_publish_options, opts, 1))
    if not r[1] then return "raises" end
    return { r[2], r[3], r[4], r[5], r[6], r[7], n = 6 }, r[8]
  end

  it("returns what the validator returns, or nothing, for 3,000 tables "
     .. "of valid and invalid options", function()
    local seed = os.time()
    math.randomseed(seed)
    local taken = 0
    for round = 1, 3000 do
      local opts = {}
      for _, k in ipairs(names) do
        if math.random() < 0.3 then
          local vs = values[k]
          opts[k] = vs[math.random(#vs)]
        end
      end
      if round % 100 == 0 then opts[1] = "x" end
      local fast = pack(core.publish_options(opts))
      local want, is_later = validated(opts)
      if fast.n > 0 then
        taken = taken + 1
        assert.are_not.equal("raises", want, "seed " .. seed)
        assert.is_false(is_later)
        assert.same(want, fast, "seed " .. seed)
      end
    end
    assert.is_true(taken > 100)        -- it takes the common cases
  end)

  it("leaves not-a-table, delay, at and anything unknown to the validator",
     function()
    for _, opts in ipairs { {delay = 1}, {at = 5}, {bogus = 1}, {[1] = 2},
                            {key = "k", delay = 0} } do
      assert.equal(0, select("#", core.publish_options(opts)))
    end
    assert.equal(0, select("#", core.publish_options("x")))
    assert.equal(0, select("#", core.publish_options(nil)))
    assert.same({ 2, n = 6 }, pack(core.publish_options({})))
  end)
end)

describe("drain's event tables", function()
  local bus
  before_each(function() bus = H.bus() end)
  after_each(function() H.done() end)

  it("hands every subscription of a queued event one table, each event "
     .. "its own, and keeps them intact", function()
    local a, b = {}, {}
    bus:subscribe("job.*", function(ev) a[#a + 1] = ev end)
    bus:subscribe("job.done", function(ev) b[#b + 1] = ev end,
                  { filter = buzz.where{ ["payload.n"] = { gte = 2 } } })
    for n = 1, 3 do bus:publish("job.done", { n = n }) end
    assert.equal(5, bus:drain())
    assert.equal(3, #a)
    assert.equal(2, #b)
    assert.equal(a[2], b[1])
    assert.equal(a[3], b[2])
    assert.is_true(a[1] ~= a[2] and a[2] ~= a[3])
    for n = 1, 3 do
      assert.equal(n, a[n].payload.n)
      assert.equal("job.done", a[n].type)
    end
    assert.is_true(a[1].id < a[2].id and a[2].id < a[3].id)
  end)

  it("lets a prefilter read the payload a handler before it set",
     function()
    local got = {}
    bus = H.bus{ freeze = false }      -- the handler changes the event
    bus:subscribe("job.done", function(ev) ev.payload = { n = 5 } end)
    bus:subscribe("job.done", function(ev) got[#got + 1] = ev.payload.n end,
                  { filter = buzz.where{ ["payload.n"] = { gte = 5 } } })
    bus:publish("job.done", { n = 1 })
    bus:drain()
    assert.same({ 5 }, got)
  end)

  it("inherits the correlation id a handler of a queued event reads at "
     .. "its publish", function()
    local child
    bus = H.bus{ freeze = false }      -- the handler changes the event
    bus:subscribe("outer", function(ev)
      ev.correlation_id = "changed"
      bus:publish("inner")
    end)
    bus:subscribe("inner", function(ev) child = ev end)
    bus:publish("other")
    local id = bus:publish("outer", nil, { correlation_id = "req-1" })
    bus:publish("other")
    bus:drain()
    assert.equal("changed", child.correlation_id)
    assert.equal(id, child.causation_id)
  end)

  it("keeps what handlers of queued events publish apart from their "
     .. "events", function()
    local got = {}
    bus:subscribe("a", function(ev)
      bus:publish("b", { n = ev.payload.n }, { key = "k" .. ev.payload.n })
    end)
    bus:subscribe("b", function(ev)
      got[#got + 1] = ev.key .. "=" .. tostring(ev.payload.n)
    end)
    for n = 1, 4 do bus:publish("a", { n = n }) end
    bus:drain()
    assert.equal("k1=1 k2=2 k3=3 k4=4", table.concat(got, " "))
  end)

  it("lets a delivered queued event's table be collected", function()
    local kept = setmetatable({}, { __mode = "k" })
    bus:subscribe("job.done", function(ev) kept[ev] = true end)
    bus:publish("job.done", { n = 1 })
    bus:drain()
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(kept))
  end)
end)

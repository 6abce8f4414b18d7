-- Limits: every number that reaches the engine is range-checked at the
-- caller's line; nested publish_sync stops at a documented depth; a
-- stored row that does not decode is reported, never handed over as nil;
-- reporting never fails silently; dedup windows follow the bus's clock.
local buzz = require "buzz"

-- The hostile numbers, by label (NaN and math.huge are made here so that
-- both interpreters show the same label).
local BAD = {
  { "2^63", 2 ^ 63 }, { "1e300", 1e300 }, { "-1", -1 }, { "0.5", 0.5 },
  { "NaN", 0 / 0 }, { "math.huge", math.huge }, { "-math.huge", -math.huge },
  { '"3"', "3" },
}

describe("numbers out of range", function()
  local path, store

  setup(function()
    path = H.tmp_store()
    store = assert(buzz.new{ store = path })
  end)

  teardown(function()
    store:close()
    H.remove_store(path)
  end)

  after_each(function() H.done() end)

  -- Each field: how to give it a value v, and the labels of BAD it takes
  -- as valid (a key may be -1 or the string "3").
  local function sub(opts)
    return function(v) H.bus():subscribe("e", print, opts(v)) end
  end
  local FIELDS = {
    { "queue_limit", function(v) buzz.new{ queue_limit = v } end },
    { "max_payload", function(v) buzz.new{ max_payload = v } end },
    { "dedup_window", function(v) buzz.new{ dedup_window = v } end,
      ok = { ["0.5"] = true } },
    { "max_age", function(v) buzz.new{ store = path, max_age = v } end,
      ok = { ["0.5"] = true } },
    { "max_events", function(v) buzz.new{ store = path, max_events = v } end },
    { "max_size", function(v) buzz.new{ store = path, max_size = v } end },
    { "key", function(v) store:publish("e", nil, { key = v }) end,
      ok = { ["-1"] = true, ['"3"'] = true } },
    { "version", function(v) store:publish("e", nil, { version = v }) end },
    { "delay", function(v) H.bus():publish("e", nil, { delay = v }) end,
      ok = { ["0.5"] = true } },
    { "at", function(v) H.bus():publish("e", nil, { at = v }) end,
      ok = { ["0.5"] = true } },
    { "max", function(v) H.bus():step(v) end },
    { "from", function(v) store:events{ from = v } end },
    { "to", function(v) store:events{ to = v } end },
    { "from", function(v) store:events{ from = { time = v } } end,
      ok = { ["0.5"] = true } },
    { "limit", function(v) store:events{ limit = v } end },
    { "key", function(v) store:events{ key = v } end,
      ok = { ["-1"] = true, ['"3"'] = true } },
    { "from_version", function(v) H.bus():upcaster("e", v, print) end },
    { "seconds", function(v) H.bus():every(v, "e") end,
      ok = { ["0.5"] = true } },
    { "timeout", sub(function(v) return { timeout = v } end),
      ok = { ["0.5"] = true } },
    { "concurrency", sub(function(v) return { concurrency = v } end) },
    { "retry.max", sub(function(v) return { retry = { max = v } } end) },
    { "retry.base", sub(function(v) return { retry = { base = v } } end),
      ok = { ["0.5"] = true } },
    { "retry.max_delay",
      sub(function(v) return { retry = { max_delay = v, base = 0 } } end),
      ok = { ["0.5"] = true } },
    { "breaker.failures",
      sub(function(v) return { breaker = { failures = v } } end) },
    { "breaker.cool_down",
      sub(function(v) return { breaker = { cool_down = v } } end),
      ok = { ["0.5"] = true } },
    { "batch size", function(v) H.bus():batch("e", { size = v })(print) end },
    { "batch interval",
      function(v) H.bus():batch("e", { interval = v })(print) end,
      ok = { ["0.5"] = true } },
    { "window tumbling", function(v)
        H.bus():route("e"):window{ tumbling = v }:handle(print)
      end, ok = { ["0.5"] = true } },
    { "start", function(v) buzz.manual_clock(v) end,
      ok = { ["0.5"] = true } },
    { "seconds", function(v) buzz.manual_clock(0):advance(v) end,
      ok = { ["0.5"] = true } },
    { "seconds", function(v) buzz.retry_after(v) end,
      ok = { ["0.5"] = true } },
  }

  for _, field in ipairs(FIELDS) do
    local name, apply, ok = field[1], field[2], field.ok or {}
    for _, bad in ipairs(BAD) do
      local label, v = bad[1], bad[2]
      if not ok[label] then
        it(("refuses %s = %s at the caller's line, naming the field")
           :format(name, label), function()
          local okc, err = pcall(apply, v)
          assert.is_false(okc, name .. " = " .. label .. " was taken")
          assert.is_string(err)
          assert.matches("bad " .. name, err, 1, true)
          assert.matches("limits_spec.lua:%d+:", err)
          assert.no.matches("number has no integer representation", err, 1,
                            true)
        end)
      end
    end
  end

  it("names the range when it is the range that is broken", function()
    local cases = {
      { function() buzz.new{ dedup_window = 1e300 } end,
        "bad dedup_window: expected a positive number, got 1e+300 (allowed: "
        .. "0.001 to 31536000 seconds (a year))" },
      { function() buzz.new{ queue_limit = 2 ^ 63 } end,
        "(allowed: integers from 1 to 2^53)" },
      { function() store:publish("e", nil, { key = 2 ^ 63 }) end,
        "(allowed: integers from -2^53 to 2^53)" },
      { function() store:publish("e", nil, { version = 2 ^ 31 }) end,
        "(allowed: integers from 1 to 2147483647)" },
      { function() H.bus():step(1e300) end,
        "(allowed: integers from 0 to 2^53)" },
      { function() store:events{ from = 2 ^ 63 } end,
        "(allowed: ids from 0 to 2^53" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(case[1])
      assert.is_false(ok)
      assert.matches(case[2], err, 1, true)
    end
  end)

  it("keeps integers up to 2^53 exact, in keys and versions", function()
    local edge = 2 ^ 53
    local id = assert(store:publish("e", nil, { key = edge,
                                                 version = 2 ^ 31 - 1 }))
    local id2 = assert(store:publish("e", nil, { key = -edge }))
    local got = {}
    for ev in store:events{ from = id, to = id2 } do got[#got + 1] = ev end
    assert.equal(2, #got)
    assert.is_true(got[1].key == edge and got[2].key == -edge)
    assert.equal(2 ^ 31 - 1, got[1].version)
  end)

  it("refuses out-of-range numbers in the core too, never casting them",
     function()
    local core = require "buzz.core"
    local c = assert(core.new(10))
    for _, v in ipairs { 2 ^ 63, 1e300, 0 / 0, math.huge, 0.5 } do
      assert.has_error(function() c:publish("e", nil, nil, v) end)
      assert.has_error(function() c:pump(v) end)
      assert.has_error(function() c:arm(v) end)
    end
    assert.has_error(function() core.new(1e300) end)
    assert.has_error(function()
      core.new(1, { dedup_window_ms = 1e300 })
    end, 'bad option "dedup_window_ms": expected an integer from 0 to '
         .. "31536000000, got 1e+300")
    c:close()
  end)
end)

describe("nested publish_sync", function()
  after_each(function() H.done() end)

  -- A bus whose handler of "d" publishes_sync the next level until
  -- payload levels; returns the per-level delivery counts and the results
  -- of the publish_sync calls that failed.
  local function nest(bus, levels, opts)
    local seen, failed = {}, {}
    bus:subscribe("d", function(ev)
      local n = ev.payload
      seen[n] = (seen[n] or 0) + 1
      if n < levels then
        local id, err, code = bus:publish_sync("d", n + 1)
        if not id then failed[#failed + 1] = { n + 1, err, code } end
      end
    end, opts)
    assert(bus:publish_sync("d", 1))
    return seen, failed
  end

  it("delivers 100 levels, and refuses the 101st with EDEPTH, publishing "
     .. "nothing", function()
    local errors = {}
    local bus = H.bus{ on_error = function(e) errors[#errors + 1] = e end }
    local seen, failed = nest(bus, 101)
    for n = 1, 100 do assert.equal(1, seen[n], "level " .. n) end
    assert.is_nil(seen[101])
    assert.equal(1, #failed)
    assert.equal(101, failed[1][1])
    assert.equal("EDEPTH", failed[1][3])
    assert.matches("^EDEPTH: publish_sync nested 101 deep", failed[1][2])
    assert.equal(100, bus:stats().last_id)     -- no id was consumed
    assert.same({}, errors)
  end)

  it("reaches 100 levels with wrapped handlers too (timeout, retry, "
     .. "middleware)", function()
    local errors = {}
    local bus = H.bus{ on_error = function(e) errors[#errors + 1] = e end }
    bus:use(function(ev, nxt) return nxt(ev) end)
    local seen, failed = nest(bus, 200, { timeout = 5, retry = { max = 2 },
                                          breaker = { failures = 3 } })
    for n = 1, 100 do assert.equal(1, seen[n], "level " .. n) end
    assert.is_nil(seen[101])
    assert.equal(1, #failed)
    assert.equal("EDEPTH", failed[1][3])
    assert.same({}, errors)
  end)

  it("stores nothing for a refused level", function()
    local path = H.tmp_store()
    finally(function() H.remove_store(path) end)
    local bus = H.bus{ store = path }
    local _, failed = nest(bus, 150)
    assert.equal(1, #failed)
    assert.equal(100, assert(bus:store_info()).events)
  end)

  it("survives a 50,000-level attempt on both interpreters, reporting it",
     function()
    local ok, out = H.run([[
      local buzz = require "buzz"
      local bus = buzz.new{ on_error = function(e) print("on_error", e) end }
      local deepest, refused = 0, 0
      bus:subscribe("d", function(ev)
        deepest = math.max(deepest, ev.payload)
        if ev.payload < 50000 then
          local id, _, code = bus:publish_sync("d", ev.payload + 1)
          if not id then refused = refused + 1; assert(code == "EDEPTH") end
        end
      end)
      bus:publish_sync("d", 1)
      print("deepest", deepest, "refused", refused)
    ]])
    assert.is_true(ok, out)
    assert.equal("deepest\t100\trefused\t1\n", out)
  end)
end)

describe("a stored row that does not decode", function()
  local path

  before_each(function()
    path = H.tmp_store()
    local bus = assert(buzz.new{ store = path })
    for n = 1, 3 do assert(bus:publish("order.created", { n = n })) end
    bus:close()
    local p = assert(io.popen(("sqlite3 %q %q 2>&1"):format(path,
      "UPDATE events SET payload = '{not json' WHERE id = 2")))
    local out = p:read("*a")
    p:close()
    assert.equal("", out)
  end)

  after_each(function()
    H.done()
    H.remove_store(path)
  end)

  it("goes to on_error as EDECODE for a durable consumer, which moves on",
     function()
    local errors, got = {}, {}
    local bus = H.bus{ store = path, on_error = function(err, ev)
      errors[#errors + 1] = { err = err, id = ev and ev.id }
    end }
    bus:subscribe("order.*", function(ev) got[#got + 1] = ev.payload.n end,
                  { durable = "billing" })
    bus:drain()
    assert.same({ 1, 3 }, got)
    assert.equal(1, #errors)
    assert.equal(2, errors[1].id)
    assert.matches("^EDECODE: event 2's stored payload is not valid JSON",
                   errors[1].err)
    assert.equal(3, bus:_position("billing"))
  end)

  it("goes to on_error as EDECODE in a replay, and the replay goes on",
     function()
    local errors, got = {}, {}
    local bus = H.bus{ store = path, readonly = true,
                       on_error = function(err) errors[#errors + 1] = err end }
    local n = bus:replay{ handler = function(ev) got[#got + 1] = ev.id end }
    assert.equal(2, n)
    assert.same({ 1, 3 }, got)
    assert.equal(1, #errors)
    assert.matches("^EDECODE: event 2", errors[1])
  end)

  it("comes out of events() with decode_error and no payload", function()
    local bus = H.bus{ store = path, readonly = true }
    local evs = {}
    for ev in bus:events() do evs[#evs + 1] = ev end
    assert.equal(3, #evs)
    assert.is_nil(evs[2].payload)
    assert.matches("^EDECODE: event 2's stored payload", evs[2].decode_error)
    assert.is_nil(evs[1].decode_error)
  end)
end)

describe("reporting", function()
  it("still reports when on_error fails on an error whose __tostring "
     .. "raises", function()
    local ok, out = H.run([[
      local buzz = require "buzz"
      local bus = buzz.new{ on_error = function(err) error(tostring(err)) end }
      bus:subscribe("e", function()
        error(setmetatable({}, { __tostring = function() error("no") end }))
      end)
      bus:publish("e")
      bus:drain()
      print("done")
    ]])
    assert.is_true(ok, out)
    assert.matches("buzz: on_error raised while reporting "
                   .. '"error object (a table whose __tostring raised: ', out,
                   1, true)
    assert.matches("done\n$", out)
  end)
end)

describe("dedup on a manual clock", function()
  after_each(function() H.done() end)

  for _, kind in ipairs { "memory", "store" } do
    it(("lets a key through again once the clock passes the window (%s)")
       :format(kind), function()
      local path = H.tmp_store()
      finally(function() H.remove_store(path) end)
      local clock = buzz.manual_clock(1000)
      local bus = H.bus{ clock = clock, dedup_window = 1,
                         store = kind == "store" and path or nil }
      local id = assert(bus:publish("pay", nil, { dedup = "k" }))
      local again, dup = bus:publish("pay", nil, { dedup = "k" })
      assert.equal(id, again)
      assert.equal("duplicate", dup)
      clock:advance(5)
      local third, dup3 = bus:publish("pay", nil, { dedup = "k" })
      assert.is_nil(dup3)
      assert.is_true(third > id)
    end)
  end

  it("loads the keys of a store by the manual clock's time", function()
    local path = H.tmp_store()
    finally(function() H.remove_store(path) end)
    local clock = buzz.manual_clock(1000)
    local bus = assert(buzz.new{ store = path, clock = clock })
    local id = assert(bus:publish("pay", nil, { dedup = "k" }))
    bus:close()
    bus = H.bus{ store = path, clock = buzz.manual_clock(1010) }
    local again, dup = bus:publish("pay", nil, { dedup = "k" })
    assert.equal(id, again)
    assert.equal("duplicate", dup)
  end)
end)

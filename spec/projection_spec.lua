-- bus:projection: state folded from the log, per key or whole, with
-- versioned snapshots; lua/buzz/projection.lua and core.json_canonical.
local buzz = require "buzz"
local core = require "buzz.core"

-- The hash the issue defines, from canonical text written by hand.
local function hash_of_text(text)
  return core.sha256(text):sub(1, 8)
end

local function totals(extra)
  local o = {
    types = "order.>", by = "key",
    init = function() return { n = 0, total = 0 } end,
    apply = function(s, ev)
      s.n = s.n + 1
      s.total = s.total + ev.payload.cents
    end,
  }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

describe("core.json_canonical", function()
  it("sorts the members of every object, whatever the insertion order",
     function()
    local a = { b = 1, a = { z = true, y = { 3, 2, { d = 1, c = 2 } } } }
    local b = {}
    b.a = {}
    b.a.y = { 3, 2, { c = 2, d = 1 } }
    b.a.z = true
    b.b = 1
    local text = '{"a":{"y":[3,2,{"c":2,"d":1}],"z":true},"b":1}'
    assert.equal(text, core.json_canonical(a))
    assert.equal(text, core.json_canonical(b))
    assert.equal("{}", core.json_canonical({}))
    assert.equal('{"A":1,"_":2,"a":3,"é":4}',
                 core.json_canonical({ ["é"] = 4, a = 3, _ = 2, A = 1 }))
    assert.equal("2.5", core.json_canonical(2.5))
    assert.equal("3", core.json_canonical(3.0))     -- the same on LuaJIT
  end)

  it("refuses what JSON cannot hold, naming it", function()
    local text, err, code = core.json_canonical({ f = print })
    assert.is_nil(text)
    assert.equal("EINVAL", code)
    assert.matches("value.f: functions cannot be encoded", err, 1, true)
  end)
end)

describe("bus:projection", function()
  local path
  before_each(function() path = H.tmp_store() end)
  after_each(function()
    H.done()
    H.remove_store(path)
  end)

  it("folds each key's events into its state, with the state's hash",
     function()
    local bus = H.bus{ store = path }
    local p = bus:projection("orders", totals())
    bus:publish("order.paid", { cents = 5 }, { key = "c1" })
    bus:publish("order.paid", { cents = 7 }, { key = "c2" })
    bus:publish("order.refunded", { cents = -2 }, { key = "c1" })
    bus:publish("user.signed_up", { cents = 1000 }, { key = "c1" })
    bus:drain()
    assert.same({ n = 2, total = 3 }, p:get("c1"))
    assert.same({ n = 1, total = 7 }, p:get("c2"))
    assert.is_nil(p:get("c3"))
    assert.equal(hash_of_text('{"n":2,"total":3}'), p:version("c1"))
    assert.equal(hash_of_text('{"n":1,"total":7}'), p:version("c2"))
    assert.matches("^%x%x%x%x%x%x%x%x$", p:version("c1"))
    assert.is_nil(p:version("c3"))
    assert.equal(3, p:position())
    assert.same({ "c1", "c2" }, p:keys())
    local pos, whole = p:hash()
    assert.equal(3, pos)
    assert.equal(hash_of_text("s:c1\t" .. p:version("c1") .. "\ns:c2\t"
                              .. p:version("c2")), whole)
  end)

  it("folds in log order even when priorities reorder delivery", function()
    local bus = H.bus{ store = path }
    local p = bus:projection("seq", {
      types = "step.*",
      init = function() return { ids = {} } end,
      apply = function(s, ev) s.ids[#s.ids + 1] = ev.id end,
    })
    local a = bus:publish("step.a", {}, { priority = "low" })
    local b = bus:publish("step.b", {})
    local c = bus:publish("step.c", {}, { priority = "critical" })
    bus:drain()
    assert.same({ a, b, c }, p:get().ids)
  end)

  it("reads what the log already holds when it is made", function()
    local bus = H.bus{ store = path }
    for i = 1, 5 do bus:publish("order.paid", { cents = i }, { key = "k" }) end
    bus:drain()
    local p = bus:projection("orders", totals())
    assert.same({ n = 5, total = 15 }, p:get("k"))
  end)

  it("restarts from its snapshot and folds only the events after it",
     function()
    local bus = H.bus{ store = path }
    bus:projection("orders", totals{ snapshot_every = 4 })
    for i = 1, 10 do
      bus:publish("order.paid", { cents = i }, { key = "k" .. i % 2 })
      bus:drain()                      -- one fold per event
    end
    bus:close()                        -- a snapshot of the last two
    bus = H.bus{ store = path }
    for i = 11, 13 do
      bus:publish("order.paid", { cents = i }, { key = "k1" })
    end
    bus:drain()
    local applied = 0
    local p = bus:projection("orders", totals{
      snapshot_every = 4,
      apply = function(s, ev)
        applied = applied + 1
        s.n, s.total = s.n + 1, s.total + ev.payload.cents
      end })
    assert.equal(3, applied)               -- the tail only
    assert.is_true(p:stats().loaded)
    assert.same({ n = 8, total = 25 + 36 }, p:get("k1"))
    assert.same({ n = 5, total = 30 }, p:get("k0"))
    assert.is_true((p:check()))
  end)

  it("with snapshot_every = false writes no snapshot, not even at close",
     function()
    local bus = H.bus{ store = path }
    local p = bus:projection("orders", totals{ snapshot_every = false })
    bus:publish("order.paid", { cents = 1 }, { key = "k" })
    bus:drain()
    assert.same({ n = 1, total = 1 }, p:get("k"))
    bus:close()
    bus = H.bus{ store = path }
    p = bus:projection("orders", totals())
    assert.is_false(p:stats().loaded)
    assert.same({ n = 1, total = 1 }, p:get("k"))
  end)

  it("rebuilds from the log when its version changes", function()
    local bus = H.bus{ store = path }
    bus:projection("orders", totals{ version = "v1" })
    for i = 1, 3 do bus:publish("order.paid", { cents = i }, { key = "k" }) end
    bus:drain()
    bus:close()
    bus = H.bus{ store = path }
    local p = bus:projection("orders", totals{
      version = "v2",
      init = function() return { n = 0, total = 0, doubled = true } end,
      apply = function(s, ev)
        s.n, s.total = s.n + 1, s.total + 2 * ev.payload.cents
      end })
    assert.is_true(p:stats().rebuilt)
    assert.is_false(p:stats().loaded)
    assert.same({ n = 3, total = 12, doubled = true }, p:get("k"))
    bus:close()
    bus = H.bus{ store = path }            -- v2's snapshot is the one kept
    p = bus:projection("orders", totals{ version = "v2",
                                         apply = function() end })
    assert.is_true(p:stats().loaded)
    assert.same({ n = 3, total = 12, doubled = true }, p:get("k"))
  end)

  it("rebuilds when a snapshot row does not match its hash", function()
    local bus = H.bus{ store = path }
    bus:projection("orders", totals())
    for i = 1, 3 do bus:publish("order.paid", { cents = i }, { key = "k" }) end
    bus:drain()
    bus:close()
    H.sqlite(path, "UPDATE state SET value = json_set(value, "
                   .. "'$.state.total', 999) WHERE kind = "
                   .. "'projection:orders' AND name = 'k:s:k'")
    bus = H.bus{ store = path }
    local p = bus:projection("orders", totals())
    assert.is_true(p:stats().rebuilt)
    assert.same({ n = 3, total = 6 }, p:get("k"))
  end)

  it("after a snapshot cut short, each key skips what its row holds",
     function()
    -- what a crash between a snapshot's key rows and its position row
    -- leaves: k's row is newer than the position
    local bus = H.bus{ store = path }
    for i = 1, 6 do
      bus:publish("order.paid", { cents = i }, { key = i <= 3 and "j" or "k" })
    end
    bus:drain()
    bus:_state_put("projection:orders", "@", { version = "1", position = 2 })
    bus:_state_put("projection:orders", "k:s:j",
                   { key = "j", position = 2, state = { n = 2, total = 3 },
                     hash = hash_of_text('{"n":2,"total":3}') })
    bus:_state_put("projection:orders", "k:s:k",
                   { key = "k", position = 5, state = { n = 2, total = 9 },
                     hash = hash_of_text('{"n":2,"total":9}') })
    bus:close()
    bus = H.bus{ store = path }
    local p = bus:projection("orders", totals())
    assert.is_true(p:stats().loaded)
    assert.same({ n = 3, total = 6 }, p:get("j"))
    assert.same({ n = 3, total = 15 }, p:get("k"))
    assert.is_true((p:check()))
  end)

  it("equals a fold from scratch after any snapshots and restarts "
     .. "(random logs)", function()
    math.randomseed(42)
    for round = 1, 12 do
      local file = H.tmp_store()
      local every = math.random(1, 6)
      local bus = buzz.new{ store = file }
      bus:projection("p", totals{ snapshot_every = every })
      for _ = 1, math.random(5, 40) do
        bus:publish("order." .. (math.random(2) == 1 and "paid" or "x"),
                    { cents = math.random(-50, 50) },
                    { key = "k" .. math.random(4),
                      priority = ({ "low", "normal" })[math.random(2)] })
        if math.random(3) == 1 then bus:drain() end
        if math.random(8) == 1 then
          bus:drain()
          bus:close()
          bus = buzz.new{ store = file }
          bus:projection("p", totals{ snapshot_every = every })
        end
      end
      bus:drain()
      local p = bus._projections.p
      local fresh = bus:projection("fresh", totals{ snapshot_every = false })
      local _, h1 = p:hash()
      local _, h2 = fresh:hash()
      assert.equal(h2, h1, "round " .. round)
      assert.equal(fresh:position(), p:position())
      bus:close()
      H.remove_store(file)
    end
  end)

  it("at(position) gives the state as of an event", function()
    local bus = H.bus{ store = path }
    local p = bus:projection("orders", totals())
    local ids = {}
    for i = 1, 4 do
      ids[i] = bus:publish("order.paid", { cents = i * 10 }, { key = "k" })
    end
    bus:drain()
    assert.same({ n = 2, total = 30 }, p:at(ids[2], "k"))
    assert.same({ n = 4, total = 100 }, p:get("k"))
    assert.is_nil(p:at(0, "k"))
    local whole = bus:projection("count", {
      types = "order.*", apply = function(s) s.n = (s.n or 0) + 1 end })
    assert.same({ n = 3 }, whole:at(ids[3]))
    assert.same({}, whole:at(0))
  end)

  it("check() finds a state that left the log's, and repair mends it",
     function()
    local bus = H.bus{ store = path }
    local p = bus:projection("orders", totals())
    for i = 1, 3 do
      bus:publish("order.paid", { cents = i }, { key = "k" .. i })
    end
    bus:drain()
    local ok, report = p:check()
    assert.is_true(ok)
    assert.same({}, report.diverged)
    assert.equal(report.hash, report.expected)
    p:get("k2").total = 99                  -- what a bug would do
    ok, report = p:check()
    assert.is_false(ok)
    assert.same({ "k2" }, report.diverged)
    assert.are_not.equal(report.hash, report.expected)
    ok, report = p:check{ repair = true }
    assert.is_false(ok)
    assert.is_true(report.repaired)
    assert.same({ n = 1, total = 2 }, p:get("k2"))
    assert.is_true((p:check()))
    assert.has_error(function() p:check{ fix = true } end,
      'unknown option "fix" to proj:check (known options: repair)')
  end)

  it("calls on_change after each event it folds", function()
    local bus = H.bus{ store = path }
    local p = bus:projection("orders", totals())
    local seen = {}
    assert.equal(p, p:on_change(function(state, ev, key)
      seen[#seen + 1] = key .. "=" .. state.total .. "@" .. ev.id
    end))
    bus:publish("order.paid", { cents = 4 }, { key = "a" })
    bus:publish("order.paid", { cents = 6 }, { key = "a" })
    bus:drain()
    assert.same({ "a=4@1", "a=10@2" }, seen)
  end)

  it("keys by a function; nil leaves the event out", function()
    local bus = H.bus{ store = path }
    local p = bus:projection("by_region", {
      types = "order.*",
      by = function(ev) return ev.payload.region end,
      apply = function(s, ev) s[#s + 1] = ev.payload.cents end,
    })
    bus:publish("order.paid", { cents = 1, region = "eu" })
    bus:publish("order.paid", { cents = 2 })
    bus:publish("order.paid", { cents = 3, region = 7 })
    bus:publish("order.paid", { cents = 4, region = "eu" })
    bus:drain()
    assert.same({ 1, 4 }, p:get("eu"))
    assert.same({ 3 }, p:get(7))
    assert.same({ 7, "eu" }, p:keys())
    assert.equal(4, p:position())
  end)

  it("reports an apply that raises and goes on", function()
    local errs = {}
    local bus = H.bus{ store = path, on_error = function(e)
      errs[#errs + 1] = e
    end }
    local p = bus:projection("orders", totals{
      apply = function(s, ev)
        if ev.payload.cents < 0 then error("negative") end
        s.total = s.total + ev.payload.cents
      end })
    bus:publish("order.paid", { cents = 5 }, { key = "k" })
    bus:publish("order.paid", { cents = -1 }, { key = "k" })
    bus:publish("order.paid", { cents = 2 }, { key = "k" })
    bus:drain()
    assert.equal(7, p:get("k").total)
    assert.equal(1, #errs)
    assert.matches("ECALLBACK: projection orders: apply raised on event 2 "
                   .. "(skipped)", errs[1], 1, true)
    assert.matches("negative", errs[1], 1, true)
  end)

  it("on a memory bus folds what is delivered while it exists", function()
    local bus = H.bus()
    bus:publish("order.paid", { cents = 100 }, { key = "k" })
    bus:drain()
    local p = bus:projection("orders", totals())
    bus:publish("order.paid", { cents = 1 }, { key = "k" })
    bus:publish("order.paid", { cents = 2 },
                { key = "k", priority = "critical" })
    bus:drain()
    assert.same({ n = 2, total = 3 }, p:get("k"))
    assert.is_false(p:snapshot())
    assert.has_error(function() p:at(1, "k") end,
      "proj:at needs a store: a memory bus keeps no log to fold again")
    assert.has_error(function() p:check() end,
      "proj:check needs a store: a memory bus keeps no log to fold again")
  end)

  it("stops at close and is gone from the bus", function()
    local bus = H.bus{ store = path }
    local p = bus:projection("orders", totals())
    p:close()
    p:close()                                  -- idempotent
    bus:publish("order.paid", { cents = 1 }, { key = "k" })
    bus:drain()
    assert.is_nil(p:get("k"))
    assert.is_truthy(bus:projection("orders", totals()))  -- the name is free
  end)

  it("raises on misuse, naming the fix", function()
    local bus = H.bus{ store = path }
    assert.has_error(function() bus:projection("", totals()) end,
      "bad name to projection: expected a non-empty string")
    assert.has_error(function() bus:projection("p") end,
      "bad options to projection: expected a table with apply = "
      .. "function(state, ev)")
    assert.has_error(function() bus:projection("p", { types = "a" }) end,
      "projection needs apply = function(state, ev) (returns the new state, "
      .. "or nil when it changed state in place)")
    assert.has_error(function() bus:projection("p", totals{ by = "id" }) end,
      'bad by to projection: expected "key", "stream" or a function(ev) '
      .. "returning the key")
    assert.has_error(function()
      bus:projection("p", totals{ snapshot_every = 0 })
    end, "bad snapshot_every to projection: expected a positive integer "
         .. "(events) or false")
    assert.has_error(function() bus:projection("p", totals{ every = 1 }) end,
      'unknown option "every" to projection (known options: apply, by, '
      .. "init, snapshot_every, types, version)")
    assert.has_error(function() bus:projection("p", totals{ types = "a..b" })
    end)
    local p = bus:projection("p", totals())
    assert.has_error(function() bus:projection("p", totals()) end,
      'projection "p" exists already on this bus (close it first)')
    assert.has_error(function() p.get("k") end,
      "use proj:get(...), not proj.get(...)")
    assert.has_error(function() p:get({}) end,
      "bad key to proj:get: expected a string or an integer, got table")
    local whole = bus:projection("w", { apply = function() end })
    assert.has_error(function() whole:get("k") end,
      'projection "w" has one state (no by): call proj:get() without a key')
    assert.has_error(function() p:at(-1) end,
      "bad position to proj:at: expected an event id (an integer >= 0)")
    assert.has_error(function() p:on_change(1) end,
      "bad argument to proj:on_change: expected a function(state, ev, key)")
  end)
end)

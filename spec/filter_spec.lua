-- lua/buzz/filter.lua: buzz.where and its combinators, table-driven over
-- the condition grammar, and the filter = option of subscribe.
local buzz = require "buzz"

local EV = {
  type = "metrics.cpu", key = "web-1", priority = "normal",
  headers = { tenant = "acme" },
  payload = { host = "web-1", pct = 93.5, status = "failed", tier = "gold",
              tags = { "a", "b" }, up = false, ["odd key"] = 1,
              ["end"] = "kw", nested = { deep = { x = 7 } } },
}

-- { spec, holds for EV? }
local CASES = {
  { { type = "metrics.cpu" }, true },
  { { type = "metrics.mem" }, false },
  { { key = "web-1", priority = "normal" }, true },
  { { ["headers.tenant"] = "acme" }, true },
  { { ["payload.status"] = "failed" }, true },
  { { ["payload.tier"] = { "gold", "platinum" } }, true },
  { { ["payload.tier"] = { "silver", "bronze" } }, false },
  { { ["payload.pct"] = { gt = 90 } }, true },
  { { ["payload.pct"] = { gte = 93.5, lte = 93.5 } }, true },
  { { ["payload.pct"] = { gt = 90, lt = 93 } }, false },
  { { ["payload.host"] = { gt = "a", lt = "x" } }, true },   -- strings
  { { ["payload.host"] = { gt = 1 } }, false },   -- other type: fails
  { { ["payload.pct"] = { ne = 1 } }, true },
  { { ["payload.pct"] = { eq = 93.5 } }, true },
  { { ["payload.tier"] = { ["in"] = { "gold" } } }, true },
  { { ["payload.tier"] = { not_in = { "gold" } } }, false },
  { { ["payload.missing"] = { exists = false } }, true },
  { { ["payload.missing"] = { exists = true } }, false },
  { { ["payload.up"] = false }, true },           -- false is a value
  { { ["payload.up"] = { exists = true } }, true },
  { { ["payload.host"] = { match = "^web%-%d$" } }, true },
  { { ["payload.pct"] = { match = "9" } }, false },  -- numbers: no
  { { ["payload.status"] = { ["not"] = "ok" } }, true },
  { { ["payload.status"] = { ["not"] = { "ok", "failed" } } }, false },
  { { ["payload.tags.1"] = "a" }, true },
  { { ["payload.nested.deep.x"] = 7 }, true },
  { { ["payload.host.len"] = { exists = true } }, false },  -- no string
  { { ["payload.odd key"] = 1 }, true },                    -- methods
  { { ["payload.end"] = "kw" }, true },
  { { ["payload.pct"] = function(v) return v > 90 end }, true },
  { { ["payload.status"] = "failed", ["payload.pct"] = { lt = 50 } },
    false },
}

describe("buzz.where", function()
  it("holds or not as each condition of the grammar says", function()
    for i, case in ipairs(CASES) do
      local w = buzz.where(case[1])
      assert.equal(case[2], w.test(EV), ("case %d"):format(i))
    end
  end)

  it("finds nothing through a value that is not a table", function()
    local w = buzz.where { ["payload.a.b"] = { exists = false } }
    assert.is_true(w.test { payload = "text" })
    assert.is_true(w.test { payload = { a = 5 } })
    assert.is_true(w.test {})
  end)

  it("combines with any, all and negate, predicates and tables alike",
     function()
    local hot = buzz.where { ["payload.pct"] = { gt = 90 } }
    local web = function(ev) return ev.payload.host:sub(1, 3) == "web" end
    assert.is_true(buzz.all(hot, web, { type = "metrics.cpu" }).test(EV))
    assert.is_false(buzz.all(hot, { type = "x" }).test(EV))
    assert.is_true(buzz.any({ type = "x" }, hot).test(EV))
    assert.is_false(buzz.any({ type = "x" }, { key = "y" }).test(EV))
    assert.is_false(buzz.negate(hot).test(EV))
    assert.is_true(buzz.negate { type = "x" }.test(EV))
  end)

  it("decorates a handler, which then sees only what it holds for",
     function()
    local seen = {}
    local h = buzz.where { ["payload.n"] = { gt = 1 } }(function(ev)
      seen[#seen + 1] = ev.payload.n
      return "ret"
    end)
    assert.is_nil(h { payload = { n = 1 } })
    assert.equal("ret", h { payload = { n = 2 } })
    assert.same({ 2 }, seen)
    local f = buzz.filter(function(ev) return ev.payload.n == 3 end)
    local got
    f(function(ev) got = ev.payload.n end) { payload = { n = 3 } }
    assert.equal(3, got)
  end)

  it("raises at definition, naming the caller's line and the fix",
     function()
    for _, case in ipairs {
      { {}, "where{} needs at least one condition" },
      { { ["payload..x"] = 1 }, 'bad path "payload..x": has an empty step' },
      { { [".x"] = 1 }, 'bad path ".x": has an empty step' },
      { { [5] = 1 }, "bad path 5 in where{}: paths are strings" },
      { { x = { between = 1 } },
        'unknown operator "between" in the condition on "x" (known: eq,' },
      { { x = {} }, 'bad condition on "x": an empty table matches nothing' },
      { { x = { gt = {} } }, 'bad condition on "x": gt expects a number or '
                             .. "a string" },
      { { x = { gt = 0 / 0 } }, "gt expects a number or a string, got NaN" },
      { { x = { ["in"] = "a" } }, "in expects an array of values" },
      { { x = { { 1 } } }, "a set holds table" },
      { { x = { exists = 1 } }, "exists expects true or false, got 1" },
      { { x = { match = 5 } }, "match expects a Lua pattern string, got 5" },
      { { x = { ["not"] = {} } }, "an empty table matches nothing" },
      { { x = io.stdout }, "expected a value, an array of values" },
    } do
      local ok, err = pcall(function() buzz.where(case[1]) end)
      assert.is_false(ok)
      assert.matches("^spec/filter_spec%.lua:%d+: ", err)
      assert.matches(case[2], err, 1, true)
    end
    assert.has_error(function() buzz.where("status") end,
                     "bad argument to buzz.where: expected a table such as "
                     .. '{ ["payload.status"] = "failed" }, got "status"')
    assert.has_error(function() buzz.any() end,
                     "buzz.any needs at least one condition")
    assert.has_error(function() buzz.all({}) end,
                     "where{} needs at least one condition, such as "
                     .. '{ ["payload.status"] = "failed" }')
    assert.has_error(function() buzz.negate(5) end)
    assert.has_error(function() buzz.filter("x") end)
    assert.has_error(function() buzz.where { x = 1 }("not a handler") end)
  end)

  it("keeps values out of the generated code", function()
    local w = buzz.where { ["payload.x"] = "a\"]] error('boom') --" }
    assert.is_true(w.test { payload = { x = "a\"]] error('boom') --" } })
    w = buzz.where { ["payload.]] error('boom') --"] = 1 }
    assert.is_true(w.test { payload = { ["]] error('boom') --"] = 1 } })
  end)
end)

describe("the filter option of subscribe", function()
  after_each(function() H.done() end)

  it("delivers only what the condition holds for, plain or supervised",
     function()
    local bus = H.bus()
    local plain, retried = {}, {}
    bus:subscribe("order.*", function(ev) plain[#plain + 1] = ev.payload.n end,
                  { filter = { ["payload.n"] = { gt = 1 } } })
    bus:subscribe("order.*", function(ev)
      retried[#retried + 1] = ev.payload.n
    end, { filter = buzz.where { ["payload.n"] = { lt = 3 } }, retry = 2 })
    for n = 1, 3 do bus:publish("order.created", { n = n }) end
    bus:drain()
    assert.same({ 2, 3 }, plain)
    assert.same({ 1, 2 }, retried)
  end)

  it("skipping a more urgent event never lets a less urgent one ahead",
     function()
    -- a handler publishes x (normal), then c (critical): c preempts the
    -- rest of the batch, and the filter that skips it must not let that
    -- preempting take go on to x, ahead of e2 (found by fuzz/api.lua)
    local bus = H.bus()
    local seen = {}
    bus:subscribe(">", function(ev)
      seen[#seen + 1] = ev.type
      if ev.type == "e1" then
        bus:publish("x", { n = 0 })
        bus:publish("c", { n = 0 }, { priority = "critical" })
      end
    end)
    bus:subscribe("c", function() end,         -- skips c, after the first
                  { filter = { ["payload.n"] = { gt = 5 } } })
    for i = 1, 4 do bus:publish("e" .. i, { n = 0 }) end
    bus:drain()
    assert.same({ "e1", "c", "e2", "e3", "e4", "x" }, seen)
  end)

  it("raises for a bad condition when subscribing", function()
    local bus = H.bus()
    assert.has_error(function()
      bus:subscribe("e", print, { filter = { x = { between = 1 } } })
    end, 'unknown operator "between" in the condition on "x" (known: eq, '
         .. "exists, gt, gte, in, lt, lte, match, ne, not, not_in)")
    assert.has_error(function() bus:subscribe("e", print, { filter = 5 }) end,
                     "bad condition: expected buzz.where{...}, a table of "
                     .. "field conditions or a function(ev), got 5")
    -- raised where the subscription is written, by any way of writing it
    for _, subscribe in ipairs {
      function() bus:subscribe("e", print, { filter = 5 }) end,
      function() bus:route("e"):handle(print, { filter = 5 }) end,
      function()
        bus:route("e"):window { tumbling = 1 }:reduce(buzz.agg.count())
          :handle(print, { filter = 5 })
      end,
      function() bus:batch("e", { filter = 5 })(print) end,
    } do
      local ok, err = pcall(subscribe)
      assert.is_false(ok)
      assert.matches("^spec/filter_spec%.lua:%d+: bad condition", err)
    end
    bus:publish("e")
    assert.equal(0, bus:drain())          -- nothing was subscribed
  end)
end)

-- The core's prefilter (csrc/lprefilter.c): the part of a where{}
-- it tests on the payload before a delivery. It may only reject what the
-- Lua test rejects; for values, sets and comparisons it must reject.
describe("the core's prefilter", function()
  local core = require "buzz.core"
  after_each(function() H.done() end)

  local SPECS = {
    { ["payload.s"] = "ok" },
    { ["payload.n"] = 1 },
    { ["payload.n"] = { gt = 2 } },
    { ["payload.n"] = { gte = 2, lt = 5 } },
    { ["payload.n"] = { lte = 2.5 } },
    { ["payload.s"] = { gt = "b" } },
    { ["payload.s"] = { "ok", "fine" } },
    { ["payload.n"] = { ["in"] = { 1, 3 } } },
    { ["payload.n"] = { not_in = { 1, 3 } } },
    { ["payload.n"] = { ne = 1 } },
    { ["payload.a.b"] = true },
    { ["payload.a.b"] = { exists = true } },
    { ["payload.a.b"] = { exists = false } },
    { ["payload.list.2"] = "y" },
    { payload = "str" },
    { ["payload.n"] = { gt = 0 }, ["payload.s"] = { match = "^o" } },
    { ["payload.n"] = { ["not"] = 1 }, ["payload.s"] = "ok" },
    { ["payload.big"] = { gt = 2 ^ 53 } },
    { ["payload.n"] = { eq = 1 }, type = "m.x" },
  }
  local meta = setmetatable({}, { __index = function() return "ok" end })
  local PAYLOADS = {
    { s = "ok", n = 1 }, { s = "fine", n = 3 }, { s = "no", n = 2 },
    { n = 1.0 }, { n = "1" }, { n = 0 / 0 }, { n = 2.5 }, { n = 5 },
    { s = "c" }, { s = "a" }, { s = 5 }, { a = { b = true } },
    { a = { b = false } }, { a = "b" }, { a = meta }, meta,
    { list = { "x", "y" } }, { list = "xy" }, "str", 42, true, false,
    { big = math.tointeger and math.tointeger(2 ^ 53) + 1 or 2 ^ 53 },
    { big = 2 ^ 53 }, {}, { s = "ok", n = 1, a = { b = true } },
  }

  it("never rejects what the Lua test keeps, and rejects the rest of "
     .. "what it covers", function()
    local covered = 0
    for i, spec in ipairs(SPECS) do
      local cond = buzz.where(spec)
      local plan = require("buzz.filter").plan(cond)
      assert.is_table(plan, "spec " .. i .. " has a prefilter")
      local s = spec["payload.s"]
      local exact = s == nil or type(s) ~= "table"
                    or s.match == nil
      exact = exact and not (type(spec["payload.n"]) == "table"
                             and spec["payload.n"]["not"] ~= nil)
      exact = exact and spec.type == nil
      for j, payload in ipairs(PAYLOADS) do
        local ev = { type = "m.x", payload = payload }
        local keep = cond.test(ev)
        local may = core.prefilter(plan, payload)
        local where = ("spec %d, payload %d"):format(i, j)
        if keep then assert.is_true(may, where .. ": rejected") end
        local through_meta = payload == meta
          or (type(payload) == "table" and payload.a == meta)
        if exact and not through_meta then
          assert.equal(keep, may, where)
          covered = covered + 1
        end
      end
    end
    assert.is_true(covered > 300)
  end)

  it("has nothing to test for predicates and Lua-only conditions",
     function()
    local plan = require("buzz.filter").plan
    assert.is_nil(plan(buzz.filter(function() return true end)))
    assert.is_nil(plan(buzz.where { ["payload.s"] = { match = "x" } }))
    assert.is_nil(plan(buzz.where { key = "k1" }))
    assert.is_nil(plan(buzz.any(buzz.where { ["payload.n"] = 1 })))
    assert.is_nil(plan(function() end))
    local all = plan(buzz.all({ ["payload.n"] = 1 },
                              buzz.where { ["payload.s"] = "ok" }))
    assert.equal(2, #all)
  end)

  it("delivers the same events as the Lua test alone, live, sync and "
     .. "durable", function()
    local path = H.tmp_store()
    local bus = H.bus { store = path }
    local runs = {}
    for i, spec in ipairs(SPECS) do
      local cond = buzz.where(spec)
      local a, b, d = {}, {}, {}
      bus:subscribe("m.x", function(ev) a[#a + 1] = ev.id end,
                    { filter = cond })
      bus:subscribe("m.x", function(ev) b[#b + 1] = ev.id end,
                    { filter = function(ev) return cond.test(ev) end })
      bus:subscribe("m.x", function(ev) d[#d + 1] = ev.id end,
                    { filter = cond, durable = "d" .. i })
      runs[i] = { a, b, d }
    end
    for j, payload in ipairs(PAYLOADS) do
      if core.json_encode(payload) then  -- a store cannot keep NaN
        if j % 2 == 0 then
          bus:publish_sync("m.x", payload)
        else
          bus:publish("m.x", payload)
        end
      end
    end
    bus:drain()
    for i, r in ipairs(runs) do
      assert.same(r[2], r[1], "spec " .. i .. ", live")
      local cond, want = buzz.where(SPECS[i]), {}
      for ev in bus:events() do         -- as stored: JSON's payloads
        if cond.test(ev) then want[#want + 1] = ev.id end
      end
      assert.same(want, r[3], "spec " .. i .. ", durable")
    end
    -- a durable consumer's position moves past the events it skipped
    local last = bus:store_info().last_id
    for _, cons in ipairs(bus:consumers()) do
      assert.equal(last, cons.acked, cons.name)
    end
    bus:close()
    H.remove_store(path)
  end)

  it("a once subscription ends at its first event that passes", function()
    local bus = H.bus { clock = buzz.manual_clock(1000),
                        on_error = function() end }
    local got, fn_got, tries = {}, {}, 0
    bus:once("o.*", { filter = buzz.where { ["payload.n"] = 3 } })(
      function(ev) got[#got + 1] = ev.payload.n end)
    bus:once("o.*", { filter = function(ev) return ev.payload.n > 1 end })(
      function(ev) fn_got[#fn_got + 1] = ev.payload.n end)
    local sub = bus:once("o.*", { filter = { ["payload.n"] = { gte = 4 } },
                                  retry = { max = 2, base = 1 } })(
      function() tries = tries + 1; error("again") end)
    for n = 1, 6 do bus:publish("o.x", { n = n }) end
    bus:drain()
    bus._clock:advance(2)
    assert.same({ 3 }, got)
    assert.same({ 2 }, fn_got)
    assert.equal(2, tries)                -- event 4, retried; 5, 6 never
    assert.is_false(sub.is_active)
    bus:use(function(ev, nxt) return nxt(ev) end)  -- ended subs are gone
  end)
end)

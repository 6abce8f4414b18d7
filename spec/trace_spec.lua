-- lua/buzz/trace.lua: buzz.new{ trace = ... }, bus:trace(id | correlation)
-- and `buzz trace`: the causal tree of a chain, each event with its
-- deliveries, in memory and through a store, under the manual clock.
local buzz = require "buzz"
local core = require "buzz.core"

-- A three-hop chain: order.placed -> order.paid (its first attempt fails,
-- the retry passes) -> order.shipped. Returns the bus, its clock and the
-- first event's id.
local function chain(opts)
  local clock = buzz.manual_clock(1000)
  opts = opts or {}
  opts.clock, opts.trace = clock, opts.trace or true
  opts.on_error = function() end
  local bus = H.bus(opts)
  local tries = 0
  bus:subscribe("order.placed", function(ev)
    bus:publish("order.paid", { n = ev.payload.n })
  end, { name = "checkout" })
  bus:subscribe("order.paid", function(ev)
    tries = tries + 1
    if tries == 1 then error("card declined") end
    bus:publish("order.shipped", { n = ev.payload.n })
  end, { name = "billing", retry = { max = 3, base = 1, jitter = 0 } })
  bus:subscribe("order.shipped", function() end, { name = "shipping" })
  local id = bus:publish("order.placed", { n = 7 },
                         { correlation_id = "req-1" })
  bus:drain()
  clock:advance(1)                   -- the retry
  bus:drain()
  return bus, clock, id
end

-- The tree with what varies (span ids, durations) left out.
local function shape(n)
  local spans = {}
  for i, sp in ipairs(n.spans) do
    assert.matches("^%x+$", sp.span_id)
    assert.equal(16, #sp.span_id)
    assert.is_true(sp.duration_us >= 0)
    spans[i] = { sp.subscription, sp.attempt, sp.outcome, sp.start,
                 sp.error and sp.error:match("card declined") or sp.error,
                 sp.fate }
  end
  local children = {}
  for i, c in ipairs(n.children) do children[i] = shape(c) end
  return { n.id, n.type, n.correlation_id, spans, children }
end

describe("tracing", function()
  after_each(function() H.done() end)

  it("gives the exact tree of a three-hop chain with a failure and its "
     .. "retry", function()
    local bus, _, id = chain()
    assert.same(
      { 1, "order.placed", "req-1",
        { { "checkout", 1, "ok", 1000000 } },
        { { 2, "order.paid", "req-1",
            { { "billing", 1, "failed", 1000000, "card declined" },
              { "billing", 2, "ok", 1001000 } },
            { { 3, "order.shipped", "req-1",
                { { "shipping", 1, "ok", 1001000 } }, {} } } } } },
      shape(bus:trace(id)))
    -- the same chain by its correlation id: one root
    local roots = bus:trace("req-1")
    assert.equal(1, #roots)
    assert.same(shape(bus:trace(id)), shape(roots[1]))
    assert.same(shape(bus:trace(2)), shape(roots[1].children[1]))
    assert.is_nil(bus:trace(99))
    assert.same({}, bus:trace("nobody"))
  end)

  it("marks the attempt after which a subscription gave up", function()
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ clock = clock, trace = true,
                       on_error = function() end }
    bus:subscribe("job", function() error("no") end,
                  { name = "jobs", retry = { max = 2, base = 1, jitter = 0 } })
    local id = bus:publish("job")
    bus:drain()
    clock:advance(1)
    bus:drain()
    local spans = bus:trace(id).spans
    assert.equal(2, #spans)
    assert.same({ "failed", "failed" }, { spans[1].outcome,
                                          spans[2].outcome })
    assert.is_nil(spans[1].fate)
    assert.equal("dead_lettered", spans[2].fate)
  end)

  it("takes the trace id and parent span from traceparent, and gives "
     .. "each delivery a span id of its own", function()
    local bus = H.bus{ trace = true }
    bus:subscribe("a", function() end)
    bus:subscribe("a", function() end, { name = "second" })
    local id = bus:publish_sync("a", nil, { headers = {
      traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      tracestate = "congo=t61rcWkgMzE" } })
    local spans = bus:trace(id).spans
    assert.equal(2, #spans)
    assert.are_not.equal(spans[1].span_id, spans[2].span_id)
    for _, sp in ipairs(spans) do
      assert.equal("4bf92f3577b34da6a3ce929d0e0e4736", sp.trace_id)
      assert.equal("00f067aa0ba902b7", sp.parent_span_id)
    end
  end)

  it("with a ratio, traces whole chains: a child as its root", function()
    math.randomseed(7)
    local bus = H.bus{ trace = 0.5 }
    bus:subscribe("root", function() bus:publish_sync("child") end)
    bus:subscribe("child", function() bus:publish("grandchild") end)
    bus:subscribe("grandchild", function() end)
    bus:subscribe("grandchild", function() end, { name = "second" })
    local traced, untraced = 0, 0
    for _ = 1, 40 do
      local id = bus:publish_sync("root")
      bus:drain()
      local t = bus:trace(id)
      if t then
        traced = traced + 1
        assert.equal(1, #t.children)   -- its descendants came along
        local child = t.children[1]
        assert.equal("child", child.type)
        assert.equal(1, #child.children)
        assert.equal(2, #child.children[1].spans)  -- both deliveries
      else
        untraced = untraced + 1
        assert.is_nil(bus:trace(id + 1))  -- and not without it
        assert.is_nil(bus:trace(id + 2))
      end
    end
    assert.is_true(traced > 0 and untraced > 0, traced .. "/" .. untraced)
  end)

  it("traces nothing by default, and refuses bad values", function()
    local bus = H.bus()
    bus:subscribe("a", function() end)
    local id = bus:publish_sync("a")
    assert.is_nil(bus:trace(id))
    assert.has_error(function() buzz.new{ trace = "yes" } end,
      'bad trace "yes": expected true, or the share of chains to trace '
      .. "(a number above 0, at most 1)")
    assert.has_error(function() buzz.new{ trace = 2 } end)
    assert.has_error(function() bus:trace({}) end,
      "bad event: expected an event id or a correlation id, got a table")
  end)
end)

describe("tracing with a store, and buzz trace", function()
  local path
  before_each(function() path = H.tmp_store() end)
  after_each(function()
    H.done()
    H.remove_store(path)
  end)

  it("keeps the tree in the store: a later bus and the tool read it",
     function()
    local bus, _, id = chain{ store = path }
    local want = shape(bus:trace(id))
    bus:close()
    local reader = H.bus{ store = path, readonly = true }
    assert.same(want, shape(reader:trace(id)))
    reader:close()

    local status, out = H.sh(H.cli(("--store %s trace %d")
                                   :format(H.quote(path), id)))
    assert.equal(0, status, out)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal("#1 order.placed  [req-1]", lines[1])
    assert.matches("^  %- checkout attempt 1 ok [%d.]+ ms$", lines[2])
    assert.equal("  #2 order.paid  [req-1]", lines[3])
    assert.matches("^    %- billing attempt 1 failed [%d.]+ ms: .*card "
                   .. "declined$", lines[4])
    assert.matches("^    %- billing attempt 2 ok [%d.]+ ms$", lines[5])
    assert.equal("    #3 order.shipped  [req-1]", lines[6])
    assert.matches("^      %- shipping attempt 1 ok [%d.]+ ms$", lines[7])
    assert.equal(7, #lines)

    status, out = H.sh(H.cli(("--store %s trace req-1 --mermaid")
                             :format(H.quote(path))))
    assert.equal(0, status, out)
    assert.equal(table.concat({
      "flowchart TD",
      '  e1["#1 order.placed<br/>checkout #1 ok"]',
      "  e1 --> e2",
      '  e2["#2 order.paid<br/>billing #1 failed<br/>billing #2 ok"]',
      "  e2 --> e3",
      '  e3["#3 order.shipped<br/>shipping #1 ok"]',
      "" }, "\n"), out)

    status, out = H.sh(H.cli(("--store %s trace 1 --json")
                             :format(H.quote(path))))
    assert.equal(0, status, out)
    local roots = core.json_decode(out)
    assert.same(want, shape(roots[1]))
  end)

  it("shows the spans to SQL as one table, spans, one row per delivery",
     function()
    chain{ store = path }:close()
    local out = H.sqlite(path, "SELECT event_id, type, subscription, "
                         .. "attempt, outcome, coalesce(error, '-') "
                         .. "LIKE '%card declined%', length(span_id), "
                         .. "correlation_id FROM spans ORDER BY event_id, "
                         .. "attempt")
    assert.equal(table.concat({
      "1|order.placed|checkout|1|ok|0|16|req-1",
      "2|order.paid|billing|1|failed|1|16|req-1",
      "2|order.paid|billing|2|ok|0|16|req-1",
      "3|order.shipped|shipping|1|ok|0|16|req-1", "" }, "\n"), out)
  end)

  it("drops the traces of the events retention drops", function()
    local bus = H.bus{ store = path, trace = true, max_events = 3 }
    bus:subscribe("e", function() end)
    for i = 1, 6 do
      bus:publish("e", i, { correlation_id = "c" .. i })
    end
    bus:drain()
    assert(bus:flush())
    assert.is_table(bus:trace(1))
    H.eventually(function() return bus:store_info().events == 3 end, 5,
                 "retention to leave 3 events")
    local reader = H.bus{ store = path, readonly = true }
    H.eventually(function() return reader:trace(3) == nil end, 5,
                 "the traces of the dropped events to go")
    assert.is_nil(reader:trace(1))
    assert.same({}, reader:trace("c1"))
    assert.is_table(reader:trace(4))
    assert.equal(1, #reader:trace("c6"))
  end)

  it("says so, and exits 1, for what was not traced", function()
    local bus = H.bus{ store = path }
    bus:publish("e")
    bus:close()
    local err = H.tmp_store() .. ".err"
    local status = H.sh(H.cli(("--store %s trace 1 2>%s")
                              :format(H.quote(path), H.quote(err))))
    assert.equal(1, status)
    assert.matches('buzz: no trace of "1" in the store', H.read(err), 1,
                   true)
    os.remove(err)
  end)
end)

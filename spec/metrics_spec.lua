-- lua/buzz/metrics.lua and csrc/lmetrics.c: bus:metrics() and
-- buzz.metrics.prometheus(bus). Exact counts after scripted scenarios
-- under the manual clock; histograms checked against their own _count and
-- _sum; the Prometheus text checked by promtool, Prometheus's own linter.
local buzz = require "buzz"

-- The value of the series name{labels} in Prometheus text (labels as a
-- string exactly as written), or nil.
local function series(text, name, labels)
  local line = name .. (labels and ("{" .. labels .. "}") or "") .. " "
  for l in text:gmatch("[^\n]+") do
    if l:sub(1, #line) == line then return tonumber(l:sub(#line + 1)) end
  end
  return nil
end

local function promtool(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  local p = assert(io.popen("promtool check metrics < " .. path .. " 2>&1"))
  local out = p:read("*a")
  local ok, _, code = p:close()
  os.remove(path)
  return ok == true or code == 0, out
end

-- Store files made here, removed after each test.
local stores = {}
local function tmpdb()
  local path = H.tmp_store()
  stores[#stores + 1] = path
  return path
end
local function cleanup()
  H.done()
  for _, path in ipairs(stores) do H.remove_store(path) end
  stores = {}
end

describe("bus:metrics()", function()
  after_each(cleanup)

  it("counts deliveries, failures, retries and dead letters per "
     .. "subscription name, exactly", function()
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ clock = clock, on_error = function() end }
    bus:subscribe("order.*", function() end, { name = "audit" })
    local tries = {}
    bus:subscribe("order.placed", function(ev)
      tries[ev.id] = (tries[ev.id] or 0) + 1
      if ev.payload.fail > tries[ev.id] - 1 then error("boom") end
    end, { name = "billing", retry = { max = 3, base = 1, jitter = 0 } })
    bus:subscribe("order.placed", function() error("plain") end)
    bus:publish("order.placed", { fail = 0 })   -- billing: first try
    bus:publish("order.placed", { fail = 2 })   -- two retries, then ok
    bus:publish("order.placed", { fail = 9 })   -- three tries: dead
    bus:publish_sync("order.shipped", { fail = 0 }, { priority = "high" })
    bus:drain()
    clock:advance(60)
    local m = bus:metrics()
    local audit, billing, plain = m.subscriptions.audit,
                                  m.subscriptions.billing,
                                  m.subscriptions["order.placed"]
    assert.same({ 4, 0, 0, 0 }, { audit.delivered, audit.failed,
                                  audit.retried, audit.dead_lettered })
    assert.same({ 3, 5, 4, 1 }, { billing.delivered, billing.failed,
                                  billing.retried, billing.dead_lettered })
    assert.same({ 3, 3, 0, 0 }, { plain.delivered, plain.failed,
                                  plain.retried, plain.dead_lettered })
    assert.equal(1, m.published.high)
    assert.equal(3 + 1, m.published.normal)   -- and the $DLQ event
    assert.equal(1, m.dead_letters)
    assert.equal(0, m.retrying)
  end)

  it("counts the publish_sync hot path and the queued path alike, and "
     .. "shares one name's counters between its subscriptions", function()
    local bus = H.bus()
    bus:subscribe("a.b", function() end)
    bus:subscribe("a.b", function() end)
    local ended = bus:subscribe("a.b", function() end)
    bus:publish_sync("a.b")
    bus:publish("a.b")
    bus:drain()
    ended:unsubscribe()
    bus:publish_sync("a.b")
    local m = bus:metrics()
    assert.equal(3 + 3 + 2, m.subscriptions["a.b"].delivered)
    assert.equal(3, m.published.normal)
  end)

  it("reports the queue by priority, and the full queue's refusals",
     function()
    local bus = H.bus{ queue_limit = 2 }
    bus:subscribe("t", function() end)
    assert(bus:publish("t", nil, { priority = "low" }))
    assert(bus:publish("t", nil, { priority = "critical" }))
    local id, _, code = bus:publish("t")
    assert.is_nil(id)
    assert.equal("EFULL", code)
    local m = bus:metrics()
    assert.same({ critical = 1, high = 0, normal = 0, low = 1 }, m.queued)
    assert.equal(1, m.refused_full)
    bus:drain()
    m = bus:metrics()
    assert.same({ critical = 0, high = 0, normal = 0, low = 0 }, m.queued)
    assert.same({ critical = 1, high = 0, normal = 0, low = 1 },
                m.published)
  end)

  it("shows what a breaker holds back and its state, and what waits in a "
     .. "key lane", function()
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ clock = clock, on_error = function() end }
    bus:subscribe("pay", function() error("down") end, {
      name = "payments", retry = false,
      breaker = { failures = 2, within = 10, cool_down = 30 } })
    bus:subscribe("ship", function() buzz.sleep(5) end,
                  { name = "shipping", ordered = true })
    for _ = 1, 4 do bus:publish("pay") end
    for _ = 1, 3 do bus:publish("ship", nil, { key = "k1" }) end
    bus:drain()
    local m = bus:metrics()
    local pay, ship = m.subscriptions.payments, m.subscriptions.shipping
    assert.equal("open", pay.breaker)
    assert.equal(2, pay.failed)
    assert.equal(2, pay.held)
    assert.equal(1, ship.in_flight)        -- asleep
    assert.equal(2, ship.waiting)          -- behind it in lane k1
    assert.is_nil(ship.breaker)
    local text = buzz.metrics.prometheus(bus)
    assert.equal(1, series(text, "buzz_breaker_state",
                           'subscription="payments",state="open"'))
    assert.equal(0, series(text, "buzz_breaker_state",
                           'subscription="payments",state="closed"'))
    assert.equal(2, series(text, "buzz_deliveries_waiting",
                           'subscription="shipping"'))
  end)

  it("times one delivery in SAMPLE per name: cumulative buckets that end "
     .. "in _count, and the latency by the bus's clock", function()
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ clock = clock }
    local n = buzz.metrics.SAMPLE * 3
    bus:subscribe("t", function() end)
    for _ = 1, n do bus:publish("t") end
    clock:advance(0.2)                     -- published 200 ms ago
    bus:drain()
    local m = bus:metrics()
    local d = m.subscriptions.t.duration
    assert.equal(3, d.count)
    assert.equal(#d.bounds + 1, #d.counts)
    for i = 2, #d.counts do assert.is_true(d.counts[i] >= d.counts[i - 1]) end
    assert.equal(3, d.counts[#d.counts])
    assert.is_true(d.sum >= 0 and d.sum < 1)
    local lat = m.latency
    assert.equal(3, lat.count)
    assert.near(0.6, lat.sum, 1e-9)
    for i, bound in ipairs(lat.bounds) do   -- all three at 0.2 s
      assert.equal(bound >= 0.2 and 3 or 0, lat.counts[i])
    end
  end)

  it("gives a store's writer figures, and a durable consumer's lag after "
     .. "a restart", function()
    local path = tmpdb()
    local bus = H.bus{ store = path }
    bus:subscribe("e", function() end, { durable = "reader" })
    for i = 1, 5 do bus:publish("e", i) end
    bus:drain()
    bus:close()
    local writer = H.bus{ store = path }
    for i = 1, 7 do writer:publish("e", i) end
    assert(writer:flush())
    local m = writer:metrics()
    assert.equal(7, m.store.appended)
    assert.is_true(m.store.commits >= 1)
    assert.equal(m.store.commits, m.store.commit_latency.count)
    assert.equal(m.store.commits,
                 m.store.commit_latency.counts[#m.store.commit_latency.counts])
    assert.equal(0, m.store.backlog_rows)
    assert.is_true(m.store.wal_bytes >= 0)
    assert.equal(7, m.store.consumers.reader)
  end)

  it("is refused on a closed bus", function()
    local bus = buzz.new()
    bus:close()
    assert.has_error(function() bus:metrics() end,
                     "attempt to use a closed bus")
  end)
end)

describe("buzz.metrics.prometheus", function()
  after_each(cleanup)

  local function busy_bus(path)
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ clock = clock, store = path,
                       on_error = function() end }
    bus:subscribe("job.*", function() end, { name = 'odd "name"\\x' })
    bus:subscribe("job.failed", function() error("no") end,
                  { retry = { max = 2, base = 1, jitter = 0 },
                    durable = "worker" })
    for i = 1, 40 do bus:publish("job.failed", i) end
    bus:publish_sync("job.done", 1, { priority = "critical" })
    bus:drain()
    clock:advance(5)
    return bus
  end

  it("writes text promtool accepts, on a populated bus with a store",
     function()
    local text = buzz.metrics.prometheus(busy_bus(tmpdb()),
                                         { instance = "a\"b\\c\nd" })
    local ok, out = promtool(text)
    assert.is_true(ok, out .. "\n" .. text)
    assert.equal(1, series(text, "buzz_events_published_total",
                           'instance="a\\"b\\\\c\\nd",priority="critical"'))
  end)

  it("writes each family's HELP and TYPE once, buckets that rise to "
     .. "+Inf = _count, and counters ending in _total", function()
    local text = buzz.metrics.prometheus(busy_bus(tmpdb()))
    local seen = {}
    for name, kind in text:gmatch("# TYPE (%S+) (%S+)") do
      assert.is_nil(seen[name], name)
      seen[name] = kind
      if kind == "counter" then assert.matches("_total$", name) end
    end
    assert.equal("histogram", seen.buzz_handler_duration_seconds)
    assert.equal("histogram", seen.buzz_store_commit_seconds)
    local last, count
    for le, v in text:gmatch('buzz_store_commit_seconds_bucket{le="([^"]+)"} '
                             .. "(%d+)") do
      v = tonumber(v)
      assert.is_true(last == nil or v >= last)
      last = v
      if le == "+Inf" then count = v end
    end
    assert.equal(count, series(text, "buzz_store_commit_seconds_count"))
    assert.equal(40, series(text, "buzz_dead_lettered_total",
                            'subscription="worker"'))
    assert.equal(80, series(text, "buzz_delivery_failures_total",
                            'subscription="worker"'))
    assert.equal(41, series(text, "buzz_deliveries_total",
                            'subscription="odd \\"name\\"\\\\x"'))
  end)

  it("sums the buses that share a dict: counters add, histograms add "
     .. "bucket by bucket, the worse breaker state stays", function()
    local dict = { data = {} }         -- what ngx.shared.DICT offers
    function dict:set(k, v) self.data[k] = v end
    function dict:get(k) return self.data[k] end
    function dict:delete(k) self.data[k] = nil end
    function dict:get_keys()
      local keys = {}
      for k in pairs(self.data) do keys[#keys + 1] = k end
      return keys
    end
    local clock = buzz.manual_clock(1000)
    local a = H.bus{ clock = clock, on_error = function() end }
    local b = H.bus{ clock = clock, on_error = function() end }
    for i, bus in ipairs { a, b } do
      bus:subscribe("job", function() end, { name = "jobs" })
      bus:subscribe("pay", function() error("down") end, {
        name = "payments", retry = false,
        breaker = { failures = i, within = 10, cool_down = 30 } })
      for _ = 1, 10 * i do bus:publish("job") end
      bus:publish("pay")
      bus:drain()
    end
    local ha = buzz.metrics.share(a, dict, 1)
    local hb = buzz.metrics.share(b, dict, 1)
    clock:advance(1)
    local text = buzz.metrics.shared_prometheus(dict, { job = "w" })
    assert.equal(30, series(text, "buzz_deliveries_total",
                            'job="w",subscription="jobs"'))
    assert.equal(2, series(text, "buzz_delivery_failures_total",
                           'job="w",subscription="payments"'))
    assert.equal(1, series(text, "buzz_breaker_state",     -- a: open
                           'job="w",subscription="payments",state="open"'))
    assert.equal(2, series(text, "buzz_handler_duration_seconds_count",
                           'job="w",subscription="jobs"'))  -- a first each
    assert.equal(2, series(text, "buzz_handler_duration_seconds_bucket",
                           'job="w",subscription="jobs",le="+Inf"'))
    local ok, out = promtool(text)
    assert.is_true(ok, out)
    ha:cancel()
    hb:cancel()
    assert.is_nil(next(dict.data))
    text = buzz.metrics.shared_prometheus(dict)
    assert.equal(0, series(text, "buzz_events_published_total",
                           'priority="normal"'))
  end)

  it("refuses to share into what is not a dict, or at a bad interval",
     function()
    local bus = H.bus()
    assert.has_error(function() buzz.metrics.share(bus, "metrics") end,
      "bad dict: expected a shared dict such as ngx.shared.metrics, got "
      .. "string")
    local dict = { set = function() end, delete = function() end }
    assert.has_error(function() buzz.metrics.share(bus, dict, 0) end,
      "bad every: expected seconds, more than 0 and at most 3600, got 0")
    local ok, err = pcall(buzz.metrics.share, bus, dict, "1")
    assert.is_false(ok)
    assert.matches("bad every: .* got 1$", err)
  end)

  it("refuses labels that are not names and values", function()
    local bus = H.bus()
    assert.has_error(function() buzz.metrics.prometheus(bus, "x") end,
      "bad labels: expected a table of names and values, got string")
    assert.has_error(function()
      buzz.metrics.prometheus(bus, { ["bad-name"] = "v" })
    end, 'bad label name bad-name: expected a name such as "instance"')
    assert.has_error(function()
      buzz.metrics.prometheus(bus, { instance = {} })
    end, "bad label instance: expected a string value, got table")
  end)
end)

-- bus:redis against a real redis-server (spec/redis/server.lua starts one
-- on a free port): the connection, the fanout, consumer groups with
-- acks, redelivery, dead letters, entries lost while pending, a deleted
-- stream, a restarted server, a server that is down, and bad input.
local buzz = require "buzz"
local S = require "spec.redis.server"

local srv
setup(function() srv = S.start() end)
teardown(function() if srv then srv:remove() end end)

local n = 0
local function fresh_stream()
  n = n + 1
  return ("s%d_%d"):format(n, os.time())
end

-- Runs bus until every group of r reads new entries.
local function ready(bus, r)
  S.until_(bus, function()
    for _, g in pairs(r:stats().groups) do
      if not g.reading then return false end
    end
    return true
  end)
end

-- Runs bus for about seconds.
local function spin(bus, seconds)
  local t = bus:_now() + seconds * 1000
  S.until_(bus, function() return bus:_now() >= t end)
end

-- A bus whose on_error keeps what it is given.
local function new_bus(errs)
  return buzz.new{ on_error = function(e) errs[#errs + 1] = e end }
end

describe("the connection (core:redis) #redis", function()
  it("sends commands and pulls their replies in order", function()
    local bus = buzz.new()
    local c = assert(bus._core:redis("127.0.0.1", srv.port, 1000))
    assert.equal("connecting", (c:state()))
    assert.is_true(c:send("SET", "k", 42))
    assert.is_true(c:send("GET", "k"))
    assert.is_true(c:send("GET", "missing"))
    assert.is_true(c:send("RPUSH", "l", "a", "b\0c"))
    assert.is_true(c:send("LRANGE", "l", 0, -1))
    assert.is_true(c:send("NOSUCHCOMMAND"))
    assert.is_true(c:send("INCRBY", "n", 2 ^ 40))
    local big = ("x"):rep(100000) .. "\r\n$3\r\n"   -- RESP-like bytes
    assert.is_true(c:sendv({ "SET", "big", big }, 3))
    assert.is_true(c:send("GET", "big"))
    assert.is_true(c:send("INCRBY", "m", -12345678901))
    local got = {}
    S.until_(bus, function()
      local ok, v = c:next()
      if ok ~= nil then got[#got + 1] = { ok, v } end
      return #got == 10
    end)
    assert.same({ true, "OK" }, got[1])
    assert.same({ true, "42" }, got[2])
    assert.same({ true, false }, got[3])
    assert.same({ true, 2 }, got[4])
    assert.same({ true, { "a", "b\0c" } }, got[5])
    assert.is_false(got[6][1])
    assert.matches("^ERR unknown command", got[6][2])
    assert.same({ true, 2 ^ 40 }, got[7])
    assert.same({ true, "OK" }, got[8])
    assert.is_true(got[9][2] == big)
    assert.same({ true, -12345678901 }, got[10])
    assert.equal(0, c:waiting())
    assert.equal("ready", (c:state()))
    c:close()
    c:close()                                   -- idempotent
    assert.error_matches(function() c:send("PING") end, "closed connection")
    bus:close()
  end)

  it("reports a refused connection in its state", function()
    local bus = buzz.new()
    local c = assert(bus._core:redis("127.0.0.1", 1, 1000))
    S.until_(bus, function() c:next() return c:state() == "closed" end)
    local _, why = c:state()
    assert.equal("cannot connect: connection refused", why)
    local ok, err, code = c:send("PING")
    assert.is_nil(ok)
    assert.equal("ECLOSED", code)
    assert.matches("^ECLOSED", err)
    bus:close()
  end)

  it("refuses a host that does not resolve", function()
    local bus = buzz.new()
    local c, err, code = bus._core:redis("no-such-host.invalid", 6379, 1000)
    assert.is_nil(c)
    assert.equal("EINVAL", code)
    assert.matches("cannot resolve no%-such%-host%.invalid", err)
    bus:close()
  end)

  it("bus:close() closes its connections", function()
    local bus = buzz.new()
    local r = bus:redis{ url = srv.url, stream = fresh_stream() }
    S.until_(bus, function()
      return r:stats().connections.commands == "ready"
    end)
    bus:close()
    assert.equal("down", r:stats().connections.commands)
    assert.error_matches(function() r:publish("a.b", 1) end, "closed")
  end)
end)

describe("bus:redis #redis", function()
  it("delivers every published event to every bus (fanout)", function()
    local stream = fresh_stream()
    local a, b = buzz.new(), buzz.new()
    local ra = a:redis{ url = srv.url, stream = stream, block = 0.1 }
    local rb = b:redis{ url = srv.url, stream = stream, block = 0.1 }
    local seen_a, seen_b = {}, {}
    a:subscribe("order.*", function(ev) seen_a[#seen_a + 1] = ev end)
    b:subscribe("order.>", function(ev) seen_b[#seen_b + 1] = ev end)
    -- both have read where the stream ends before anything is published
    S.until_(a, function() return ra.fan_last[stream] end)
    S.until_(b, function() return rb.fan_last[stream] end)
    assert(ra:publish("order.placed", { n = 1, items = { "x" } },
      { key = "cust-1", priority = "high", correlation_id = "req-1",
        headers = { tenant = "t1" } }))
    assert(ra:publish("order.paid", { n = 2 }, { key = 7 }))
    local inherited                     -- inside a handler: the
    a:subscribe("local.go", function()  -- correlation id is inherited
      inherited = ra:publish("order.sent", 3)
    end)
    a:publish("local.go", nil, { correlation_id = "req-9" })
    a:drain()
    assert.is_true(inherited)
    S.until_(a, function() return #seen_a == 3 and ra:pending() == 0 end)
    S.until_(b, function() return #seen_b == 3 end)
    for _, seen in ipairs { seen_a, seen_b } do
      local e = seen[1]
      assert.equal("order.placed", e.type)
      assert.same({ n = 1, items = { "x" } }, e.payload)
      assert.equal("cust-1", e.key)
      assert.equal("high", e.priority)
      assert.equal("req-1", e.correlation_id)
      assert.equal("t1", e.headers.tenant)
      assert.matches("^%d+%-%d+$", e.headers["redis-id"])
      assert.equal(7, seen[2].key)
      assert.equal("req-9", seen[3].correlation_id)
    end
    assert.equal(3, ra:stats().published)
    assert.equal("3", srv:cli("XLEN", stream))
    a:close()
    b:close()
  end)

  it("shares a group's events between buses, and acks what succeeded",
     function()
    local stream = fresh_stream()
    local a, b = buzz.new(), buzz.new()
    local opts = { url = srv.url, stream = stream, block = 0.1,
                   fanout = false, start = "all" }
    local ra = a:redis(opts)
    local rb = b:redis(opts)
    local got = {}
    local function handler(who)
      return function(ev)
        assert.equal("job.run", ev.type)
        assert.equal("workers", ev.group)
        got[ev.payload] = (got[ev.payload] or "") .. who
      end
    end
    ra:subscribe("job.*", handler("a"), { group = "workers" })
    rb:subscribe("job.*", handler("b"), { group = "workers" })
    ready(a, ra)
    ready(b, rb)
    for i = 1, 40 do assert(ra:publish("job.run", i)) end
    local function all() local k = 0 for _ in pairs(got) do k = k + 1 end
                          return k == 40 end
    for _ = 1, 100 do
      if all() then break end
      spin(a, 0.03)
      spin(b, 0.03)
    end
    assert.is_true(all())
    local by = { a = 0, b = 0 }
    for i = 1, 40 do
      assert.is_true(got[i] == "a" or got[i] == "b")   -- once, not twice
      by[got[i]] = by[got[i]] + 1
    end
    assert.is_true(by.a > 0 and by.b > 0)
    S.until_(a, function() return ra:stats().acked + rb:stats().acked == 40 end)
    assert.matches("^0", srv:cli("XPENDING", stream, "workers"))
    a:close()
    b:close()
  end)

  it("redelivers what failed, counts attempts, and dead-letters after "
     .. "max_deliveries", function()
    local stream = fresh_stream()
    local errs = {}
    local bus = new_bus(errs)
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.1,
      fanout = false, min_idle = 0.1, claim_every = 0.05,
      max_deliveries = 3 }
    local attempts = {}
    r:subscribe("task.*", function(ev)
      attempts[#attempts + 1] = ev.payload .. "#" .. ev.attempt
      if ev.payload == "bad" then error("cannot do it") end
      if ev.payload == "flaky" and ev.attempt < 2 then error("not yet") end
    end, { group = "g" })
    ready(bus, r)
    assert(r:publish("task.do", "bad"))
    assert(r:publish("task.do", "flaky"))
    S.until_(bus, function() return r:stats().dead == 1 and
                                    r:stats().acked == 2 end)
    table.sort(attempts)
    assert.same({ "bad#1", "bad#2", "bad#3", "flaky#1", "flaky#2" }, attempts)
    local dlq = srv:cli("XRANGE", stream .. ":dlq", "-", "+")
    assert.matches("task%.do", dlq)
    assert.matches("not handled in 3 deliveries", dlq)
    assert.matches("^0", srv:cli("XPENDING", stream, "g"))
    assert.matches("cannot do it", errs[1])
    local dl = bus:dead_letters()           -- the bus's dead letters too
    assert.equal(1, #dl)
    assert.equal("task.do", dl[1].event.type)
    assert.equal("bad", dl[1].event.payload)
    assert.equal("not handled in 3 deliveries", dl[1].error)
    assert.equal("task.* (redis group g, " .. r.consumer .. ")",
                 dl[1].subscription)
    bus:close()
  end)

  it("dead-letters an entry that is not a buzz event, and counts entries "
     .. "deleted while pending as lost", function()
    local stream = fresh_stream()
    local errs = {}
    local bus = new_bus(errs)
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.1,
      fanout = false, min_idle = 0.1, claim_every = 0.05 }
    local seen = 0
    r:subscribe("x.*", function(ev)
      seen = seen + 1
      if ev.payload == "fail" then error("keep it pending") end
    end, { group = "g" })
    ready(bus, r)
    srv:cli("XADD", stream, "*", "hello", "world")          -- no type
    srv:cli("XADD", stream, "*", "type", "x.y", "payload", "{nope")
    S.until_(bus, function() return r:stats().dead == 2 end)
    assert.equal(0, seen)
    local dl = bus:dead_letters()
    assert.equal(2, #dl)
    assert.equal("redis.invalid", dl[1].event.type)
    assert.matches("bad payload", dl[2].error)
    local id = srv:cli("XADD", stream, "*", "type", "x.y", "payload",
                       '"fail"')
    S.until_(bus, function() return seen == 1 end)
    srv:cli("XDEL", stream, id)                 -- deleted while pending
    S.until_(bus, function() return r:stats().lost == 1 end)
    assert.matches("^0", srv:cli("XPENDING", stream, "g"))
    assert.equal(1, seen)
    bus:close()
  end)

  it("recovers when the stream is deleted under a blocked read", function()
    local stream = fresh_stream()
    local errs = {}
    local bus = new_bus(errs)
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.5,
                         fanout = false }
    local got = {}
    r:subscribe("e.*", function(ev) got[#got + 1] = ev.payload end,
                { group = "g" })
    ready(bus, r)
    assert(r:publish("e.one", 1))
    S.until_(bus, function() return #got == 1 end)
    srv:cli("DEL", stream)
    S.until_(bus, function() return errs[1] end)
    assert.matches("the stream key no longer exists", errs[1])
    assert(r:publish("e.two", 2))
    S.until_(bus, function() return #got == 2 end)
    assert.same({ 1, 2 }, got)
    bus:close()
  end)

  it("keeps going across a restart of Redis, refusing publishes while it "
     .. "is down", function()
    local stream = fresh_stream()
    local errs = {}
    local bus = new_bus(errs)
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.2,
                         fanout = false, start = "all" }
    local got = {}
    r:subscribe("e.*", function(ev) got[#got + 1] = ev.payload end,
                { group = "g" })
    assert(r:publish("e.x", 1))
    S.until_(bus, function() return #got == 1 end)
    srv:stop()
    local ok, err, code
    S.until_(bus, function()
      ok, err, code = r:publish("e.x", 99)
      return ok == nil
    end)
    assert.equal("EUNAVAILABLE", code)
    assert.matches("^EUNAVAILABLE: redis 127%.0%.0%.1:%d+: ", err)
    assert.matches("EUNAVAILABLE", errs[1])
    bus:drain()                         -- the bus works locally meanwhile
    srv:restart()
    S.until_(bus, function() return r:publish("e.x", 2) end, 15)
    S.until_(bus, function() return #got == 2 end, 15)
    assert.same({ 1, 2 }, got)          -- 1 is not handled twice: acked
    bus:close()
  end)

  it("waits for Redis when it is down at startup", function()
    local errs = {}
    local bus = new_bus(errs)
    local r = bus:redis{ url = "redis://127.0.0.1:1/0", stream = "s" }
    assert.is_true(r:publish("e.x", 1))   -- before the first connect
    S.until_(bus, function() return r:stats().failed == 1 end)
    local ok, err, code = r:publish("e.x", 2)
    assert.is_nil(ok)
    assert.equal("EUNAVAILABLE", code)
    assert.matches("connection refused", err)
    assert.matches("^EUNAVAILABLE: redis 127%.0%.0%.1:1: cannot connect",
                   errs[1])
    bus:close()
  end)

  it("acks a group's entries its pattern does not match, unhandled",
     function()
    local stream = fresh_stream()
    local bus = buzz.new()
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.1,
                         fanout = false }
    local got = {}
    r:subscribe("a.*", function(ev) got[#got + 1] = ev.type end,
                { group = "g" })
    ready(bus, r)
    assert(r:publish("b.x", 1))
    assert(r:publish("a.x", 2))
    S.until_(bus, function() return r:stats().acked == 2 end)
    assert.same({ "a.x" }, got)
    assert.equal(1, r:stats().skipped)
    assert.matches("^0", srv:cli("XPENDING", stream, "g"))
    bus:close()
  end)

  it("reads no further ahead than count entries waiting for handlers",
     function()
    local stream = fresh_stream()
    local bus = buzz.new()
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.1,
                         fanout = false, count = 5 }
    local most, done = 0, 0
    r:subscribe("w.*", function()
      most = math.max(most, r:stats().groups.g.inflight)
      buzz.sleep(0.01)
      done = done + 1
    end, { group = "g", concurrency = 1 })
    ready(bus, r)
    for i = 1, 60 do assert(r:publish("w.x", i)) end
    S.until_(bus, function() return done == 60 end)
    assert.is_true(most >= 1 and most <= 9, "inflight reached " .. most)
    bus:close()
  end)

  it("runs the README's two-terminal example", function()
    srv:cli("DEL", "orders")
    local env = ("REDIS_URL=%s LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
                 .. "LUA_CPATH='%s/?.so;;'"):format(srv.url, H.build)
    local dir = H.mktemp_dir()
    local _, pid = H.sh(("%s %s examples/redis/worker.lua w1 > %s/w1 2>&1 "
                         .. "& echo $!"):format(env, H.lua, dir))
    H.eventually(function()
      return srv:cli("XINFO", "CONSUMERS", "orders", "billing"):find("w1")
    end, 10, "the worker to join its group")
    local status, out = H.sh(("%s %s examples/redis/publish.lua 5 2>&1")
                             :format(env, H.lua))
    assert.equal(0, status, out)
    assert.equal("published 5 orders\n", out)
    local shown = H.eventually(function()
      local text = H.slurp(dir .. "/w1") or ""
      local _, k = text:gsub("\n", "")
      return k == 5 and text
    end, 10, "five orders handled")
    H.sh(H.tool .. "kill " .. pid:match("%d+"))
    H.remove_dir(dir)
    assert.matches("^w1: order%.placed #1 for cust%-1 %(attempt 1%)\n",
                   shown)
    assert.matches("w1: order%.placed #3 for cust%-0 %(attempt 1%)\n",
                   shown)
    local readme = H.read("README.md")
    local block = readme:match("```lua examples/redis/worker%.lua\n(.-)```")
    assert.is_truthy(block, "README lost the worker's program")
    assert.is_truthy(H.read("examples/redis/worker.lua"):find(block, 1, true),
                     "README shows the worker as it is not")
  end)

  it("flush waits for Redis to confirm, and times out when it cannot",
     function()
    local bus = buzz.new{ on_error = function() end }
    local r = bus:redis{ url = srv.url, stream = fresh_stream(),
                         fanout = false }
    for i = 1, 100 do assert(r:publish("f.x", i)) end
    assert.is_true(r:pending() > 0)
    assert.is_true(r:flush(5))
    assert.equal(0, r:pending())
    assert.equal(100, r:stats().published)
    srv:cli("CLIENT", "PAUSE", 1000, "WRITE")    -- XADD waits a second
    assert(r:publish("f.x", 101))
    local ok, err, code = r:flush(0.2)
    assert.is_nil(ok)
    assert.equal("ETIMEOUT", code)
    assert.matches("1 publishes not confirmed in 0.2 s", err)
    assert.is_true(r:flush(5))
    bus:close()
  end)

  it("elects one leader among links, hands the lease over on close, "
     .. "and lists the members", function()
    local stream = fresh_stream()
    local bus = buzz.new()
    local function link(name)
      return bus:redis{ url = srv.url, stream = stream, consumer = name,
                        fanout = name == "a" }
    end
    local a, b = link("a"), link("b")
    local elected = {}
    local la = a:leader("boss", function(l)
      elected[#elected + 1] = "a"
      assert.is_true(l:is_leader())
    end, { lease = 1 })
    local lb = b:leader("boss", function() elected[#elected + 1] = "b" end,
                        { lease = 1 })
    S.until_(bus, function() return #elected == 1 end)
    spin(bus, 1.2)                      -- renewals keep it where it is
    assert.equal(1, #elected)
    local was, other = elected[1], elected[1] == "a" and lb or la
    assert.is_false(other:is_leader());
    (was == "a" and la or lb):close()   -- gives the lease up
    S.until_(bus, function() return #elected == 2 end)
    assert.are_not.equal(was, elected[2])
    assert.is_true(other:is_leader())
    S.until_(bus, function() return #a:members() == 2 end)
    local m = a:members()
    table.sort(m)
    assert.same({ "a", "b" }, m)
    -- every: one publish per period, whichever link leads "every:tick.x"
    local ticks = {}
    bus:subscribe("tick.x", function(ev) ticks[#ticks + 1] = ev.payload end)
    a:every(0.1, "tick.x", function() return "t" end)
    b:every(0.1, "tick.x", function() return "t" end)
    local t0 = bus:_now()
    S.until_(bus, function() return #ticks >= 5 end)
    local per = (bus:_now() - t0) / #ticks
    assert.is_true(per > 60, "published every " .. per .. " ms: twice?")
    b:close()
    S.until_(bus, function() return #a:members() == 1 end)
    bus:close()
  end)

  it("trims to retain, but never a pending entry nor an unread one",
     function()
    local stream = fresh_stream()
    local bus = buzz.new{ on_error = function() end }
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.1,
                         fanout = false, min_idle = 60 }
    local seen = 0
    r:subscribe("t.*", function(ev)
      seen = seen + 1
      if ev.payload == 2 then error("stays pending") end
    end, { group = "g" })
    ready(bus, r)
    for i = 1, 4 do assert(r:publish("t.x", i)) end
    S.until_(bus, function() return seen == 4 end)
    -- a second group that has read nothing keeps everything: trim nothing
    srv:cli("XGROUP", "CREATE", stream, "idle", "0")
    local t = bus:redis{ url = srv.url, stream = stream, fanout = false,
                         retain = 0.001 }
    spin(bus, 0.2)
    assert.equal(0, t:stats().trimmed)
    assert.equal("4", srv:cli("XLEN", stream))
    t:close()
    srv:cli("XGROUP", "DESTROY", stream, "idle")
    -- now only g's pending entry 2 holds: 1 goes, 2, 3 and 4 stay
    t = bus:redis{ url = srv.url, stream = stream, fanout = false,
                   retain = 0.001 }
    S.until_(bus, function() return t:stats().trimmed == 1 end)
    assert.equal("3", srv:cli("XLEN", stream))
    local left = srv:cli("XRANGE", stream, "-", "+")
    assert.matches("\n2\n", left)
    assert.not_matches("\n1\n", left)
    bus:close()
  end)

  it("with a store, takes a group's entries into the store once (the "
     .. "inbox): a crash before the handlers ran does not run them twice",
     function()
    local stream = fresh_stream()
    local path = H.tmp_store()
    local runs = {}
    local function handler(ev) runs[#runs + 1] = ev.payload end
    local bus = buzz.new{ store = path }
    local r = bus:redis{ url = srv.url, stream = stream, consumer = "c1",
                         fanout = false, block = 0.1 }
    r:subscribe("i.*", handler, { group = "g" })
    H.eventually(function() r:pump() return r:stats().groups.g.reading end)
    local pub = buzz.new()
    local rp = pub:redis{ url = srv.url, stream = stream, fanout = false }
    for i = 1, 3 do assert(rp:publish("i.x", i)) end
    assert(rp:flush(5))
    pub:close()
    -- the entries reach the store, and the process dies before any
    -- handler ran (close discards what is queued in memory)
    H.eventually(function() r:pump() return r:stats().received == 3 end)
    assert(bus:flush())
    bus:close()
    assert.same({}, runs)
    assert.matches("^3", srv:cli("XPENDING", stream, "g"))
    -- it comes back: the store's durable consumer delivers them, and
    -- Redis's redelivery of the same entries is a duplicate, acked
    bus = buzz.new{ store = path }
    r = bus:redis{ url = srv.url, stream = stream, consumer = "c1",
                   fanout = false, block = 0.1 }
    r:subscribe("i.*", handler, { group = "g", retry = 2 })
    H.eventually(function()                  -- (not driven: no handler)
      r:pump()
      return r:stats().duplicates == 3
    end, 5, "Redis's redeliveries")
    assert.same({}, runs)
    S.until_(bus, function() return #runs == 3 end)
    spin(bus, 0.3)
    table.sort(runs)
    assert.same({ 1, 2, 3 }, runs)
    H.eventually(function()
      return srv:cli("XPENDING", stream, "g"):match("^0")
    end, 5, "every entry acked")
    bus:close()
    H.remove_store(path)
  end)

  it("buzz redis shows streams, groups, pending entries and dead letters",
     function()
    local stream = fresh_stream()
    local bus = buzz.new{ on_error = function() end }
    local r = bus:redis{ url = srv.url, stream = stream, block = 0.1,
      fanout = false, min_idle = 0.05, claim_every = 0.05,
      max_deliveries = 1 }
    local failing = true
    r:subscribe("c.*", function(ev)
      if ev.payload == "poison" or failing then error("no") end
    end, { group = "billing" })
    ready(bus, r)
    assert(r:publish("c.x", "poison"))
    S.until_(bus, function() return r:stats().dead == 1 end)
    failing = true
    assert(r:publish("c.x", "later"))
    S.until_(bus, function() return r:stats().received >= 2 end)
    bus:close()                                -- "later" stays pending
    local function cli(a)
      local status, out = H.sh(H.cli("redis --url " .. srv.url .. " " .. a
                                     .. " 2>&1"))
      return status, out
    end
    local st, out = cli("streams")
    assert.equal(0, st, out)
    assert.matches(stream .. "  2 entries  1 groups", out, 1, true)
    assert.matches(stream .. ":dlq  1 entries  0 groups", out, 1, true)
    st, out = cli("groups " .. stream)
    assert.equal(0, st, out)
    assert.matches("^billing  1 consumers  1 pending  last %d+%-%d+", out)
    st, out = cli("pending " .. stream .. " billing --json")
    assert.equal(0, st, out)
    local row = require("buzz.core").json_decode(out)
    assert.equal(1, row.deliveries)
    assert.matches("%-%d+$", row.consumer)
    st, out = cli("dlq " .. stream)
    assert.equal(0, st, out)
    assert.matches("c%.x  group billing  1 deliveries  not handled in 1 "
                   .. 'deliveries  "poison"', out)
    st, out = cli("nonsense")
    assert.equal(2, st)
    assert.matches("say what", out)
    -- the same module in this process (what its lines print)
    local function here(words, opts)
      local path = os.tmpname()
      local f, saved = assert(io.open(path, "w")), io.stdout
      package.loaded["buzz.cliredis"] = nil
      rawset(io, "stdout", f)           -- (the module keeps io.stdout)
      local ok, err = pcall(function()
        local ctx = { buses = {} }
        opts.words, opts.url = words, srv.url
        require("buzz.cliredis").redis(opts, ctx)
        for _, b in ipairs(ctx.buses) do b:close() end
      end)
      rawset(io, "stdout", saved)
      f:close()
      package.loaded["buzz.cliredis"] = nil
      local text = H.read(path)
      os.remove(path)
      assert(ok, tostring(err))
      return text
    end
    assert.matches(stream .. "  2 entries  1 groups",
                   here({ "streams" }, {}), 1, true)
    assert.matches('"group":"billing"', here({ "groups", stream },
                                               { json = true }), 1, true)
    assert.matches("idle %d+ ms  1 deliveries",
                   here({ "pending", stream, "billing" }, {}))
    assert.matches('"error":"not handled in 1 deliveries"',
                   here({ "dlq", stream }, { json = true }), 1, true)
    st, out = H.sh(H.cli("redis --url redis://127.0.0.1:1/0 streams 2>&1"))
    assert.equal(1, st)
    assert.matches("cannot reach Redis at redis://127%.0%.0%.1:1/0: cannot "
                   .. "connect: connection refused", out)
  end)

  it("with a store, a handler's publishes go through the outbox: kept "
     .. "while Redis is down, sent once", function()
    local stream = fresh_stream()
    local path = H.tmp_store()
    local function open()
      local bus = buzz.new{ store = path, on_error = function() end }
      local r = bus:redis{ url = srv.url, stream = stream, consumer = "c1",
                           fanout = false }
      bus:subscribe("local.x", function(ev)
        assert.is_true(r:publish("echo.x", ev.payload))
      end)
      return bus, r
    end
    local bus, r = open()
    srv:stop()
    for i = 1, 3 do bus:publish("local.x", i) end
    S.until_(bus, function() return r:stats().outboxed == 3 end)
    spin(bus, 0.3)                     -- its sends fail, and are retried
    assert.equal(3, r:pending())
    bus:close()
    srv:restart()
    bus, r = open()
    S.until_(bus, function() return r:stats().published == 3 end, 15)
    assert.equal("3", srv:cli("XLEN", stream))
    local entries = srv:cli("XRANGE", stream, "-", "+")
    assert.matches("echo%.x.-\n1\n.-echo%.x.-\n2\n.-echo%.x.-\n3\n",
                   entries)
    -- sent again from the start (the consumer's position forgotten):
    -- Redis knows each, and adds none twice
    r:close()                          -- (its outbox consumer with it)
    assert(bus:remove_consumer("redis.outbox:" .. stream))
    bus:close()
    bus, r = open()
    S.until_(bus, function() return r:stats().resent == 3 end)
    assert.equal("3", srv:cli("XLEN", stream))
    bus:close()
    H.remove_store(path)
  end)

  it("partitions: a key's events go to one partition stream, the "
     .. "fanout reads them all, and two links share the partitions",
     function()
    local stream = fresh_stream()
    local bus = buzz.new{ on_error = function() end }
    local function link(name)
      return bus:redis{ url = srv.url, stream = stream, consumer = name,
                        partitions = 4, lease = 1.5, block = 0.1,
                        fanout = name == "a", max_deliveries = 2 }
    end
    local a, b = link("a"), link("b")
    local fan, got = {}, {}
    bus:subscribe("p.*", function(ev) fan[#fan + 1] = ev.payload end)
    for _, r in ipairs { a, b } do
      r:subscribe("p.*", function(ev)
        if ev.payload == "poison" then error("never") end
        got[ev.key] = (got[ev.key] or "") .. ev.payload .. ","
        if ev.payload == 5 and ev.attempt == 1 then error("again") end
      end, { group = "g" })
    end
    -- both members known, every partition read by one of them
    S.until_(bus, function()
      local pa, pb = a:stats().groups.g.partitions,
                     b:stats().groups.g.partitions
      return #a:members() == 2 and #pa + #pb == 4 and #pa > 0 and #pb > 0
        and a:stats().groups.g.reading and b:stats().groups.g.reading
    end)
    S.until_(bus, function() return a.fan_last[stream .. ":3"] end)
    for s = 1, 12 do
      assert(a:publish("p.x", s, { key = "k" .. s % 3 }))
    end
    S.until_(bus, function()
      if #fan < 12 then return false end
      for k = 0, 2 do
        local _, commas = (got["k" .. k] or ""):gsub(",", "")
        if commas < (k == 2 and 5 or 4) then return false end
      end
      return true
    end)
    assert.equal("3,6,9,12,", got.k0)  -- in order, once each
    assert.equal("1,4,7,10,", got.k1)
    assert.equal("2,5,5,8,11,", got.k2)  -- 5 failed once: 8 waited for it
    local total, used = 0, 0
    for i = 0, 3 do
      local len = tonumber(srv:cli("XLEN", stream .. ":" .. i))
      total = total + len
      if len > 0 then used = used + 1 end
    end
    assert.equal(12, total)
    assert.is_true(used <= 3)           -- three keys: three partitions
    assert.equal("0", srv:cli("XLEN", stream))
    -- what fails max_deliveries times: a dead letter of the bus and of
    -- the dead-letter stream, acked
    assert(a:publish("p.x", "poison", { key = "kp" }))
    S.until_(bus, function() return #bus:dead_letters() == 1 end)
    local dl = bus:dead_letters()[1]
    assert.equal("exhausted", dl.reason)
    assert.equal("poison", dl.event.payload)
    S.until_(bus, function()
      return srv:cli("XLEN", stream .. ":dlq") == "1"
    end)
    assert.matches("never", srv:cli("XRANGE", stream .. ":dlq", "-", "+"))
    bus:close()
  end)

  it("partitions with a store: the inbox keeps each key in order",
     function()
    local stream = fresh_stream()
    local path = H.tmp_store()
    local bus = buzz.new{ store = path, on_error = function() end }
    local r = bus:redis{ url = srv.url, stream = stream, consumer = "a",
                         partitions = 2, lease = 1.5, block = 0.1,
                         fanout = false }
    local got = {}
    r:subscribe("p.*", function(ev)
      got[ev.key] = (got[ev.key] or "") .. ev.payload .. ","
      if ev.payload == 2 and ev.attempt == 1 then error("again") end
    end, { group = "g" })
    S.until_(bus, function()
      local g = r:stats().groups.g
      return #g.partitions == 2 and g.reading
    end)
    for s = 1, 6 do assert(r:publish("p.x", s, { key = "k" .. s % 2 })) end
    S.until_(bus, function()
      return got.k0 == "2,2,4,6," and got.k1 == "1,3,5,"
    end)
    for i = 0, 1 do
      H.eventually(function()
        return srv:cli("XPENDING", stream .. ":" .. i, "g"):match("^0")
      end, 5, "partition " .. i .. " acked")
    end
    local names = {}                        -- the inbox: redis.g
    for _, c in ipairs(bus:consumers()) do names[c.name] = true end
    assert.is_true(names["redis.g"])
    bus:close()
    H.remove_store(path)
  end)

  it("authenticates and selects the database the url names", function()
    local locked = S.start("s3cret")
    local bus = buzz.new{ on_error = function() end }
    local r = bus:redis{ url = ("redis://:s3cret@127.0.0.1:%d/2")
                               :format(locked.port), stream = "auth" }
    assert(r:publish("a.x", 1))
    assert(r:flush(5))
    assert.equal("1", locked:cli("-n", 2, "XLEN", "auth"))
    assert.equal("0", locked:cli("XLEN", "auth"))       -- not in db 0
    local bad = bus:redis{ url = ("redis://:wrong@127.0.0.1:%d/0")
                                 :format(locked.port), stream = "auth" }
    assert(bad:publish("a.x", 2))
    S.until_(bus, function() return bad:stats().failed == 1 end)
    bus:close()
    locked:remove()
  end)

  it("raises on bad input", function()
    local bus = buzz.new()
    assert.error_matches(function() bus:redis{ url = "http://x" } end,
                         'bad url: expected "redis://host:port/db"')
    assert.error_matches(function() bus:redis{ nope = 1 } end,
                         'unknown option "nope" to bus:redis')
    assert.error_matches(function() bus:redis{ block = 10 } end,
                         "at most 5 seconds")
    assert.error_matches(function() bus:redis{ start = "middle" } end,
                         'bad start')
    assert.error_matches(function() bus:redis{ outbox = "yes" } end,
                         'bad outbox')
    assert.error_matches(function() bus:redis{ partitions = 0 } end,
                         'partitions')
    assert.error_matches(function() bus:redis{ stream = "" } end,
                         'bad stream: expected a non%-empty string')
    assert.error_matches(function() bus:redis{ consumer = 5 } end,
                         'bad consumer')
    assert.error_matches(function()
      bus:redis{ url = "redis://127.0.0.1:6379/x" } end,
      'the database is a number')
    assert.error_matches(function() bus:redis{ lease = -1 } end, 'lease')
    assert.error_matches(function() bus:redis{ partitions = 1.5 } end,
                         'partitions')
    local r = bus:redis{ url = srv.url, stream = fresh_stream() }
    assert.error_matches(function() r:publish("a.*", 1) end, "a%.%*")
    assert.error_matches(function() r:publish("$SYS.x", 1) end, "reserved")
    assert.error_matches(function() r:publish("a.b", print) end,
                         "bad payload")
    assert.error_matches(function() r:publish("a.b", 0 / 0) end,
                         "bad payload")
    assert.error_matches(function()
      r:publish("a.b", ("x"):rep(1048577)) end, "bad payload.*1048576")
    assert.error_matches(function() r:publish("a.b", 1, { ttl = 1 }) end,
                         'unknown option "ttl"')
    assert.error_matches(function() r:publish("a.b", 1, { key = {} }) end,
                         "bad key")
    assert.error_matches(function() r.publish("a.b", 1) end,
                         "use r:publish")
    local fn = function() end
    assert.error_matches(function()
      r:subscribe("a.*", fn, { group = "bad name" }) end, "bad group")
    assert.error_matches(function()
      r:subscribe("a.*", fn, { group = "g", retry = { attempts = 3 } })
    end, "max_deliveries")
    assert.error_matches(function()
      r:subscribe("a.*", fn, { group = "g", inbox = 1 }) end, "bad inbox")
    assert.error_matches(function()
      r:subscribe("a..b", fn, { group = "g" }) end, "a%.%.b")
    assert.error_matches(function() r:leader("a b", fn) end, "bad name")
    assert.error_matches(function() r:leader("x", 1) end, "bad fn")
    assert.error_matches(function() r:leader("x", fn, { lease = -1 }) end,
                         "lease")
    assert.error_matches(function() r:every(0, "t.x") end, "seconds")
    assert.error_matches(function() r:every(1, "t.*") end, "t%.%*")
    r:subscribe("a.*", fn, { group = "g" })
    assert.error_matches(function()
      r:subscribe("b.*", fn, { group = "g" }) end, "already")
    r:close()
    assert.error_matches(function() r:publish("a.b", 1) end, "closed")
    bus:close()
  end)
end)

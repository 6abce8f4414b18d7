-- The durable log: buzz.new{ store = ... } against real SQLite files.
local buzz = require "buzz"
local core = require "buzz.core"

local tmp_store, remove_store = H.tmp_store, H.remove_store

-- Retention runs on the writer thread: tests poll for its result.
local eventually = H.eventually

local function collect(iter)
  local out = {}
  for ev in iter do out[#out + 1] = ev end
  return out
end

local function ids(events)
  local out = {}
  for i, ev in ipairs(events) do out[i] = ev.id end
  return out
end

local sqlite, damage_middle_of_log = H.sqlite, H.damage_middle_of_log

describe("the store", function()
  local path

  before_each(function()
    path = tmp_store()
  end)

  after_each(function()
    H.done()
    remove_store(path)
  end)

  describe("appending", function()
    it("keeps every event with its full envelope, id for id", function()
      local bus = H.bus{ store = path }
      local id = bus:publish("order.created", { n = 1, tags = { "a", "b" } }, {
        priority = "high", key = "k-1", correlation_id = "req-9",
        headers = { traceparent = "00-abc-def-01" }, version = 2,
      })
      assert.is_true(bus:flush())
      local evs = collect(H.bus{ store = path, readonly = true }:events())
      assert.equal(1, #evs)
      local ev = evs[1]
      assert.equal(id, ev.id)
      assert.equal("order.created", ev.type)
      assert.same({ n = 1, tags = { "a", "b" } }, ev.payload)
      assert.equal("high", ev.priority)
      assert.equal("k-1", ev.key)
      assert.equal("req-9", ev.correlation_id)
      assert.same({ traceparent = "00-abc-def-01" }, ev.headers)
      assert.equal(2, ev.version)
      assert.is_true(math.abs(ev.ts - core.now_ms()) < 60000)
    end)

    it("stores the causation id of events published by handlers", function()
      local bus = H.bus{ store = path }
      bus:subscribe("a", function() bus:publish("b", { x = 1 }) end)
      local first = bus:publish("a", {})
      bus:drain()
      bus:flush()
      local evs = collect(bus:events{ types = "b" })
      assert.equal(first, evs[1].causation_id)
    end)

    it("keeps integer keys as integers", function()
      local bus = H.bus{ store = path }
      bus:publish("k", 1, { key = 42 })
      bus:flush()
      local ev = collect(bus:events())[1]
      assert.equal(42, ev.key)
      assert.equal("number", type(ev.key))
    end)

    it("continues ids after a restart", function()
      local bus = H.bus{ store = path }
      for i = 1, 3 do bus:publish("e", i) end
      bus:close()
      bus = H.bus{ store = path }
      assert.equal(4, bus:publish("e", 4))
    end)

    it("never reuses ids, even when retention emptied the log", function()
      local bus = H.bus{ store = path, max_events = 1 }
      for i = 1, 5 do bus:publish("e", i) end
      bus:flush()
      eventually(function() return bus:store_info().events == 1 end, 5,
                 "retention to leave one event")
      bus:close()
      bus = H.bus{ store = path }
      assert.equal(6, bus:publish("e", 6))
    end)
  end)

  describe("durability", function()
    it("never hands a handler an event that is not committed (batch)",
       function()
      local bus = H.bus{ store = path, durability = "batch" }
      local reader = H.bus{ store = path, readonly = true }
      local seen = 0
      bus:subscribe("e", H.counter(20, function(ev)
        local found = collect(reader:events{ from = ev.id, to = ev.id })
        assert.equal(1, #found)
        seen = seen + 1
      end))
      for i = 1, 20 do bus:publish("e", i) end
      assert.equal(20, bus:drain())
      assert.equal(20, seen)
    end)

    it("gates every event, not only the head of the queue", function()
      local bus = H.bus{ store = path }
      local reader = H.bus{ store = path, readonly = true }
      local a = bus:subscribe("a", H.counter(0))
      bus:subscribe("b", H.counter(50, function(ev)
        assert.equal(1, #collect(reader:events{ from = ev.id, to = ev.id }))
      end))
      for _ = 1, 50 do
        bus:publish("a", 1)
        bus:publish("b", 2)
      end
      a:unsubscribe()
      bus:drain()
    end)

    it("commits before publish returns with sync", function()
      local bus = H.bus{ store = path, durability = "sync" }
      local reader = H.bus{ store = path, readonly = true }
      for i = 1, 5 do
        local id = bus:publish("e", i)
        local found = collect(reader:events{ from = id })
        assert.equal(1, #found)
        assert.equal(i, found[1].payload)
      end
    end)

    it("delivers before the commit with none, and stores on flush",
       function()
      local bus = H.bus{ store = path, durability = "none" }
      bus:subscribe("e", H.counter(3))
      for i = 1, 3 do bus:publish("e", i) end
      assert.equal(3, bus:drain())
      assert.is_true(bus:flush())
      assert.equal(3, #collect(bus:events()))
    end)

    it("commits a publish_sync before its handlers run", function()
      local bus = H.bus{ store = path }
      local reader = H.bus{ store = path, readonly = true }
      bus:subscribe("e", H.counter(1, function(ev)
        assert.equal(1, #collect(reader:events{ from = ev.id }))
      end))
      bus:publish_sync("e", "now")
    end)

    it("groups a burst of publishes into few commits", function()
      local bus = H.bus{ store = path }
      for i = 1, 5000 do bus:publish("e", i) end
      bus:flush()
      local info = bus:store_info()
      assert.equal(5000, info.committed)
      assert.is_true(info.commits < 5000)
    end)

    it("flush is true on a memory bus too", function()
      assert.is_true(H.bus():flush())
    end)
  end)

  describe("durable consumers", function()
    it("resume after a restart with the first event not acknowledged",
       function()
      local bus = H.bus{ store = path }
      local got = {}
      bus:subscribe("order.*", function(ev) got[#got + 1] = ev.payload end,
                    { durable = "billing" })
      for i = 1, 3 do bus:publish("order.created", i) end
      bus:drain()
      assert.same({ 1, 2, 3 }, got)
      bus:close()
      -- events published while the consumer is away
      bus = H.bus{ store = path }
      for i = 4, 6 do bus:publish("order.created", i) end
      bus:close()
      bus = H.bus{ store = path }
      got = {}
      bus:subscribe("order.*", function(ev) got[#got + 1] = ev.payload end,
                    { durable = "billing" })
      bus:drain()
      assert.same({ 4, 5, 6 }, got)
    end)

    it("progress independently of each other", function()
      local bus = H.bus{ store = path }
      local a, b = {}, {}
      for i = 1, 4 do bus:publish("e", i) end
      bus:subscribe("e", function(ev) a[#a + 1] = ev.payload end,
                    { durable = "a" })
      bus:drain()
      bus:subscribe("e", function(ev) b[#b + 1] = ev.payload end,
                    { durable = "b" })
      bus:publish("e", 5)
      bus:drain()
      assert.same({ 1, 2, 3, 4, 5 }, a)
      assert.same({ 1, 2, 3, 4, 5 }, b)
      local cs = bus:consumers()
      assert.equal(2, #cs)
      assert.equal("a", cs[1].name)
      assert.equal(5, cs[1].acked)
      assert.equal(0, cs[1].lag)
      assert.equal("e", cs[2].pattern)
    end)

    it("with start = \"new\" skip what was stored before them", function()
      local bus = H.bus{ store = path }
      bus:publish("e", 1)
      local got = {}
      bus:subscribe("e", function(ev) got[#got + 1] = ev.payload end,
                    { durable = "late", start = "new" })
      bus:publish("e", 2)
      bus:drain()
      assert.same({ 2 }, got)
    end)

    it("only see their own types, in id order, past any priority",
       function()
      local bus = H.bus{ store = path }
      local got = {}
      bus:subscribe("order.>", function(ev) got[#got + 1] = ev.id end,
                    { durable = "o" })
      bus:publish("order.a", 1, { priority = "low" })
      bus:publish("user.a", 2)
      bus:publish("order.b.c", 3, { priority = "critical" })
      bus:drain()
      assert.same({ 1, 3 }, got)
    end)

    it("move past an event whose handler raised, report it, and keep it "
       .. "as a dead letter", function()
      local errs = {}
      local bus = H.bus{ store = path, on_error = function(err)
        errs[#errs + 1] = err
      end }
      local got = {}
      bus:subscribe("e", function(ev)
        if ev.payload == 2 then error("boom") end
        got[#got + 1] = ev.payload
      end, { durable = "d" })
      for i = 1, 3 do bus:publish("e", i) end
      bus:drain()
      assert.same({ 1, 3 }, got)
      assert.equal(1, #errs)
      assert.matches("boom", errs[1])
      assert.equal(4, bus:consumers()[1].acked)   -- past $DLQ.e (#4) too
      local dead = bus:dead_letters{ subscription = "d" }
      assert.equal(1, #dead)
      assert.equal(2, dead[1].event.payload)
    end)

    it("are not fed live events, and live subscriptions no history",
       function()
      local bus = H.bus{ store = path }
      bus:publish("e", 1)
      bus:flush()
      local live = {}
      bus:subscribe("e", function(ev) live[#live + 1] = ev.payload end)
      bus:publish("e", 2)
      bus:drain()
      assert.same({ 2 }, live)
    end)

    it("keep their position when unsubscribed, until removed", function()
      local bus = H.bus{ store = path }
      bus:publish("e", 1)
      local sub = bus:subscribe("e", H.counter(1), { durable = "d" })
      bus:drain()
      assert.is_true(sub:unsubscribe())
      assert.equal(1, bus:consumers()[1].acked)
      assert.is_true(bus:remove_consumer("d"))
      assert.is_false(bus:remove_consumer("d"))
      assert.same({}, bus:consumers())
    end)

    it("refuse misuse with a message that says what to do", function()
      local bus = H.bus{ store = path }
      bus:subscribe("e", print, { durable = "d" })
      assert.has_error(function()
        bus:subscribe("e", print, { durable = "d" })
      end, 'durable consumer "d" is already subscribed on this bus; '
           .. "unsubscribe it first or pick another name")
      assert.has_error(function() bus:remove_consumer("d") end,
        'durable consumer "d" is subscribed on this bus: unsubscribe it '
        .. "before removing it")
      assert.has_error(function()
        bus:subscribe("e", print, { durable = "x", once = true })
      end, "a durable consumer cannot be once: it keeps a position across "
           .. "restarts")
      assert.has_error(function()
        bus:subscribe("e", print, { durable = "" })
      end, 'bad durable: expected a consumer name such as "billing", got ""')
      assert.has_error(function()
        bus:subscribe("e", print, { start = "new" })
      end, 'start applies to a durable consumer: give durable = "name" too')
      assert.has_error(function()
        bus:subscribe("e", print, { durable = "y", start = "first" })
      end, 'bad start "first": expected "all" (the whole log) or "new" '
           .. "(events after now)")
      assert.has_error(function()
        H.bus():subscribe("e", print, { durable = "d" })
      end, "durable consumers keep their position in a store: create the "
           .. 'bus with buzz.new{ store = "events.db" }')
    end)

    it("skip only the event an upcaster fails on, and report it",
       function()
      local errs = {}
      local bus = H.bus{ store = path, on_error = function(e)
        errs[#errs + 1] = e
      end }
      for i = 1, 5 do bus:publish("e", i) end
      bus:upcaster("e", 1, function(p)
        if p == 3 then error("cannot upcast") end
        return p
      end)
      local got = {}
      bus:subscribe("e", function(ev) got[#got + 1] = ev.payload end,
                    { durable = "d" })
      bus:drain()
      assert.same({ 1, 2, 4, 5 }, got)
      assert.equal(1, #errs)
      assert.matches("upcasting event 3 failed: .*cannot upcast", errs[1])
    end)

    it("keep their place when a handler unsubscribes mid-page", function()
      local bus = H.bus{ store = path }
      for i = 1, 10 do bus:publish("e", i) end
      local sub
      sub = bus:subscribe("e", function(ev)
        if ev.payload == 4 then sub:unsubscribe() end
      end, { durable = "d" })
      bus:drain()
      local got = {}
      bus:subscribe("e", function(ev) got[#got + 1] = ev.payload end,
                    { durable = "d" })
      bus:drain()
      assert.equal(4, got[1])          -- the one under way comes again
      assert.equal(7, #got)
    end)

    it("resubscribed, see nothing twice", function()
      local bus = H.bus{ store = path }
      for i = 1, 2000 do bus:publish("e", i) end
      local n = 0
      local sub = bus:subscribe("e", function() n = n + 1 end,
                                { durable = "d" })
      bus:drain()
      sub:unsubscribe()
      bus:subscribe("e", function() n = n + 1 end, { durable = "d" })
      bus:drain()
      assert.equal(2000, n)
    end)

    it("catch up in one drain, however many pages behind", function()
      local bus = H.bus{ store = path }
      for i = 1, 1000 do bus:publish("e", i) end
      local got = 0
      bus:subscribe("e", function() got = got + 1 end, { durable = "d" })
      assert.equal(1000, bus:drain())
      assert.equal(1000, got)
    end)

    it("let bus:run() return once they have caught up", function()
      local bus = H.bus{ store = path }
      local got = 0
      bus:subscribe("e", function() got = got + 1 end, { durable = "d" })
      for i = 1, 600 do bus:publish("e", i) end
      bus:run()
      assert.equal(600, got)
    end)
  end)

  describe("idempotent publishing", function()
    it("returns the first id and \"duplicate\", and delivers once",
       function()
      local bus = H.bus{ store = path }
      bus:subscribe("pay", H.counter(1))
      local id = bus:publish("pay", { amount = 5 }, { dedup = "req-77" })
      local id2, dup = bus:publish("pay", { amount = 5 }, { dedup = "req-77" })
      assert.equal(id, id2)
      assert.equal("duplicate", dup)
      bus:drain()
      bus:flush()
      assert.equal(1, #collect(bus:events()))
    end)

    it("remembers keys across a restart", function()
      local bus = H.bus{ store = path }
      local id = bus:publish("pay", 1, { dedup = "req-1" })
      bus:close()
      bus = H.bus{ store = path }
      local id2, dup = bus:publish("pay", 1, { dedup = "req-1" })
      assert.equal(id, id2)
      assert.equal("duplicate", dup)
    end)

    it("forgets keys after the window", function()
      local bus = H.bus{ store = path, dedup_window = 0.001 }
      local id = bus:publish("pay", 1, { dedup = "req-1" })
      os.execute("sleep 0.01")
      local id2, dup = bus:publish("pay", 1, { dedup = "req-1" })
      assert.is_nil(dup)
      assert.is_true(id2 > id)
    end)

    it("works on a memory bus too", function()
      local bus = H.bus()
      local id = bus:publish("pay", 1, { dedup = "k" })
      assert.same({ id, "duplicate" },
                  { bus:publish("pay", 1, { dedup = "k" }) })
      assert.has_error(function() bus:publish("pay", 1, { dedup = 5 }) end,
        'bad dedup: expected a non-empty string such as "req-77", got 5')
    end)
  end)

  describe("opening and reading without a scan", function()
    it("reads neither the log nor its rows: a damaged middle page is not "
       .. "met", function()
      local bus = H.bus{ store = path }
      local first, mid, last
      for i = 1, 3000 do
        local id = bus:publish("order.placed", { n = i, pad = ("x"):rep(40) },
                               { dedup = i % 500 == 0 and "d-" .. i or nil })
        first = first or id
        if i == 1500 then mid = id end
        last = id
      end
      assert.is_true(bus:flush())
      bus:close()
      damage_middle_of_log(path)

      -- a writer: ids go on, and the dedup keys came from their index
      local w = H.bus{ store = path }
      assert.same({ mid, "duplicate" },
                  { w:publish("order.placed", {}, { dedup = "d-1500" }) })
      assert.is_true(w:publish("order.placed", { n = 3001 }) > last)
      assert.is_true(w:flush())
      -- a reader, and a read from the log's end
      local r = H.bus{ store = path, readonly = true }
      local tail = collect(r:events{ from = last })
      assert.equal(last, tail[1].id)
      assert.equal(2, #tail)
      assert.equal(first, collect(r:events{ limit = 1 })[1].id)
    end)

    it("stops reading at to: the rows after it are never read", function()
      local bus = H.bus{ store = path }
      local first
      for i = 1, 3000 do
        local id = bus:publish("order.placed", { n = i, pad = ("x"):rep(40) })
        first = first or id
      end
      bus:close()
      damage_middle_of_log(path)
      local r = H.bus{ store = path, readonly = true }
      local got = collect(r:events{ from = first, to = first + 9 })
      assert.same({ first, first + 9 }, { got[1].id, got[#got].id })
      assert.equal(10, #got)
      assert.equal(1, r:replay{ types = "order.*", from = first + 9,
                                to = first + 9, handler = function() end })
    end)

    it("gives the first and last ids without counting the events with "
       .. "store_info{ events = false }", function()
      local bus = H.bus{ store = path }
      local first, last
      for i = 1, 3000 do
        last = bus:publish("order.placed", { n = i, pad = ("x"):rep(40) })
        first = first or last
      end
      bus:close()
      damage_middle_of_log(path)
      local r = H.bus{ store = path, readonly = true }
      local info = assert(r:store_info{ events = false })
      assert.same({ first, last }, { info.first_id, info.last_id })
      assert.is_nil(info.events)
      assert.equal(path, info.path)
      local none, err, code = r:store_info()          -- the count does
      assert.is_nil(none)                              -- read the log
      assert.equal("ESTORE", code)
      assert.matches("malformed", err)
      assert.has_error(function() r:store_info{ events = "no" } end,
                       'bad events: expected a boolean (false leaves the '
                       .. 'count out), got "no"')
    end)

    it("moves a store of an older buzz to the dedup index by time, once, "
       .. "keeping its keys", function()
      local bus = H.bus{ store = path }
      local id = bus:publish("pay", 1, { dedup = "req-1" })
      bus:close()
      sqlite(path, "DROP INDEX events_dedup_ts; CREATE INDEX events_dedup "
             .. "ON events(dedup) WHERE dedup IS NOT NULL")
      assert.equal("events_dedup\n", sqlite(path, "SELECT name FROM "
                   .. "sqlite_schema WHERE type = 'index' AND name LIKE "
                   .. "'events_dedup%'"))
      -- a reader changes nothing
      H.bus{ store = path, readonly = true }:close()
      assert.equal("events_dedup\n", sqlite(path, "SELECT name FROM "
                   .. "sqlite_schema WHERE type = 'index' AND name LIKE "
                   .. "'events_dedup%'"))
      bus = H.bus{ store = path }
      assert.same({ id, "duplicate" },
                  { bus:publish("pay", 1, { dedup = "req-1" }) })
      bus:close()
      assert.equal("events_dedup_ts\n", sqlite(path, "SELECT name FROM "
                   .. "sqlite_schema WHERE type = 'index' AND name LIKE "
                   .. "'events_dedup%'"))
      assert.matches("USING COVERING INDEX events_dedup_ts %(ts>%?%)",
                     sqlite(path, "EXPLAIN QUERY PLAN SELECT dedup, id, ts "
                            .. "FROM events WHERE dedup IS NOT NULL AND "
                            .. "ts >= 5 ORDER BY ts, dedup, id"))
    end)

    it("opens a store of an older buzz that has no room for the index, "
       .. "keeping its keys", function()
      local bus = H.bus{ store = path }
      local id = bus:publish("pay", 1, { dedup = "req-1" })
      for i = 1, 200 do bus:publish("pay", { i = i, pad = ("p"):rep(200) }) end
      bus:close()
      sqlite(path, "DROP INDEX events_dedup_ts; CREATE INDEX events_dedup "
             .. "ON events(dedup) WHERE dedup IS NOT NULL; PRAGMA "
             .. "wal_checkpoint(TRUNCATE)")
      local size = tonumber(sqlite(path, "PRAGMA page_size"))
                   * tonumber(sqlite(path, "PRAGMA page_count"))
      bus = H.bus{ store = path, max_size = size }   -- not a page more
      assert.same({ id, "duplicate" },
                  { bus:publish("pay", 1, { dedup = "req-1" }) })
      bus:close()
      assert.equal("events_dedup\n", sqlite(path, "SELECT name FROM "
                   .. "sqlite_schema WHERE type = 'index' AND name LIKE "
                   .. "'events_dedup%'"))
    end)
  end)

  describe("query and replay", function()
    local bus

    before_each(function()
      bus = H.bus{ store = path }
      for i = 1, 600 do
        local t = i % 3 == 0 and "order.created" or "user.seen"
        bus:publish(t, { i = i }, { key = i % 2 == 0 and "even" or "odd" })
      end
      bus:flush()
    end)

    it("iterates every event in id order across pages", function()
      local evs = collect(bus:events())
      assert.equal(600, #evs)
      for i, ev in ipairs(evs) do assert.equal(i, ev.id) end
    end)

    it("filters by type pattern, id range, key and limit", function()
      local evs = collect(bus:events{ types = "order.*", from = 10, to = 30 })
      assert.same({ 12, 15, 18, 21, 24, 27, 30 }, ids(evs))
      evs = collect(bus:events{ types = "order.*", key = "even", limit = 3 })
      assert.same({ 6, 12, 18 }, ids(evs))
      assert.same({}, collect(bus:events{ types = "nothing.here" }))
      assert.same({ 599, 600 }, ids(collect(bus:events{ from = 599 })))
      assert.same({ 599, 600 },
                  ids(collect(bus:events{ from = { id = 599 } })))
      assert.same({ 1, 2 }, ids(collect(bus:events{ to = { id = 2 } })))
    end)

    it("filters by time", function()
      local now = core.now_ms() / 1000
      assert.equal(600, #collect(bus:events{ from = { time = now - 60 } }))
      assert.equal(0, #collect(bus:events{ from = { time = now + 60 } }))
      assert.equal(0, #collect(bus:events{ to = { time = now - 60 } }))
    end)

    it("replays through a handler without appending", function()
      local seen = {}
      local n = bus:replay{ types = "order.created", handler = function(ev)
        assert.is_true(ev.is_replay)
        seen[#seen + 1] = ev.payload.i
      end }
      assert.equal(200, n)
      assert.equal(200, #seen)
      assert.equal(3, seen[1])
      assert.equal(600, bus:store_info().events)
    end)

    it("reports a handler's raise and goes on", function()
      local errs = 0
      local b2 = H.bus{ store = path .. "2", on_error = function()
        errs = errs + 1
      end }
      for i = 1, 5 do b2:publish("e", i) end
      b2:flush()
      local n = b2:replay{ handler = function(ev)
        if ev.payload % 2 == 0 then error("even") end
      end }
      assert.equal(5, n)
      assert.equal(2, errs)
      b2:close()
      remove_store(path .. "2")
    end)

    it("goes on across pages after raises, each reported with its event "
       .. "and traceback", function()
      local errs = {}
      local b2 = H.bus{ store = path, readonly = true,
                        on_error = function(e, ev, _, trace)
        errs[#errs + 1] = { e = e, id = ev.id, trace = trace }
      end }
      local seen = 0
      local n = b2:replay{ handler = function(ev)
        seen = seen + 1
        if ev.id % 250 == 1 then error("bad " .. ev.id) end
      end }
      assert.equal(600, n)
      assert.equal(600, seen)
      assert.equal(3, #errs)
      for k, id in ipairs { 1, 251, 501 } do
        assert.equal(id, errs[k].id)
        assert.matches("bad " .. id, errs[k].e)
        assert.matches("store_spec.lua", errs[k].trace)
      end
      b2:close()
    end)

    it("stops when a handler closes the bus", function()
      local b2 = H.bus{ store = path, readonly = true }
      local seen = 0
      local n = b2:replay{ handler = function()
        seen = seen + 1
        if seen == 300 then b2:close() end
      end }
      assert.equal(300, n)
      assert.equal(300, seen)
    end)

    it("replays to a named durable consumer", function()
      local got = 0
      bus:subscribe("user.*", function() got = got + 1 end,
                    { durable = "u", start = "new" })
      assert.equal(10, bus:replay{ consumer = "u", limit = 10 })
      assert.equal(10, got)
      assert.has_error(function() bus:replay{ consumer = "nobody" } end,
                       'no durable consumer "nobody" is subscribed on this bus')
    end)

    it("refuses bad filters", function()
      assert.has_error(function() bus:events{ types = "a..b" } end)
      assert.has_error(function() bus:events{ from = "x" } end,
        'bad from: expected an event id or { time = epoch seconds }, got "x"')
      assert.has_error(function() bus:events{ limit = 0 } end,
                       "bad limit: expected a positive integer, got 0")
      assert.has_error(function() bus:events{ typo = 1 } end,
        'unknown option "typo" to events (known options: from, key, limit, '
        .. "to, types)")
      assert.has_error(function() bus:replay{} end,
                       "bad handler: expected a function, got nil")
      assert.has_error(function()
        bus:replay{ handler = print, consumer = "u" }
      end, "give replay a handler or a consumer, not both")
      assert.has_error(function() H.bus():events() end,
        "bus:events() reads the store, and this bus has none: create it "
        .. 'with buzz.new{ store = "events.db" }')
    end)
  end)

  describe("upcasting", function()
    it("rewrites old payloads on read, chained, without touching the row",
       function()
      local bus = H.bus{ store = path }
      bus:publish("order.created", { amount = 5 })                -- v1
      bus:publish("order.created", { cents = 700 }, { version = 2 })
      bus:publish("order.created", { total = { cents = 1 } }, { version = 3 })
      bus:flush()
      bus:upcaster("order.created", 1, function(p)
        return { cents = p.amount * 100 }
      end)
      bus:upcaster("order.created", 2, function(p, ev)
        assert.equal("order.created", ev.type)
        return { total = { cents = p.cents } }
      end)
      local evs = collect(bus:events())
      assert.same({ total = { cents = 500 } }, evs[1].payload)
      assert.same({ total = { cents = 700 } }, evs[2].payload)
      assert.same({ total = { cents = 1 } }, evs[3].payload)
      for _, ev in ipairs(evs) do assert.equal(3, ev.version) end
      -- durable consumers and replay see the same
      local got = {}
      bus:subscribe("order.*", function(ev) got[#got + 1] = ev.payload end,
                    { durable = "d" })
      bus:drain()
      assert.same({ cents = 500 }, got[1].total)
      -- the rows are as they were written
      local raw = collect(H.bus{ store = path, readonly = true }:events())
      assert.same({ amount = 5 }, raw[1].payload)
      assert.equal(1, raw[1].version)
    end)

    it("filters a durable consumer on the upcast payload", function()
      local bus = H.bus{ store = path }
      for i = 1, 6 do bus:publish("e", { n = i }) end   -- v1: { n }
      bus:upcaster("e", 1, function(p) return { amount = p.n * 10 } end)
      local got = {}
      bus:subscribe("e", function(ev) got[#got + 1] = ev.payload.amount end,
                    { durable = "d",
                      filter = { ["payload.amount"] = { gt = 30 } } })
      bus:drain()
      assert.same({ 40, 50, 60 }, got)
      assert.equal(6, bus:_position("d"))
    end)

    it("raise an upcaster's error from events() and replay", function()
      local bus = H.bus{ store = path }
      for i = 1, 3 do bus:publish("e", i) end
      bus:flush()
      bus:upcaster("e", 1, function(p)
        if p == 2 then error("no two", 0) end
        return p * 10
      end)
      local seen = {}
      assert.has_error(function()
        for ev in bus:events() do seen[#seen + 1] = ev.payload end
      end, "upcasting event 2 failed: no two")
      assert.same({}, seen)            -- the page is upcast before use
      assert.has_error(function()
        bus:replay{ handler = function() end }
      end, "upcasting event 2 failed: no two")
      local one = {}
      for ev in bus:events{ to = 1 } do one[#one + 1] = ev.payload end
      assert.same({ 10 }, one)
    end)

    it("refuses bad registrations", function()
      local bus = H.bus{ store = path }
      bus:upcaster("a", 1, print)
      assert.has_error(function() bus:upcaster("a", 1, print) end,
                       "an upcaster for a version 1 is already registered")
      assert.has_error(function() bus:upcaster("a", 0, print) end,
                       "bad from_version: expected a positive integer, got 0")
      assert.has_error(function() bus:upcaster("a.*", 1, print) end)
      assert.has_error(function() bus:upcaster("a", 2, "f") end,
                       "bad upcaster: expected a function, got string")
    end)
  end)

  describe("retention", function()
    it("keeps the newest max_events", function()
      local bus = H.bus{ store = path, max_events = 10 }
      for i = 1, 100 do bus:publish("e", i) end
      bus:flush()
      eventually(function() return bus:store_info().events == 10 end, 5,
                 "retention to leave 10 events")
      assert.same({ 91, 100 }, { bus:store_info().first_id,
                                 bus:store_info().last_id })
    end)

    it("drops events older than max_age but never the newest", function()
      local bus = H.bus{ store = path, max_age = 0.05 }
      for i = 1, 20 do bus:publish("e", i) end
      bus:flush()
      os.execute("sleep 0.1")
      bus:publish("e", 21)
      bus:flush()
      eventually(function() return bus:store_info().events == 1 end, 5,
                 "retention to leave one event")
    end)

    it("holds back what a durable consumer has not acknowledged", function()
      local bus = H.bus{ store = path, max_events = 10 }
      bus:subscribe("e", print, { durable = "slow" })
      for i = 1, 100 do bus:publish("e", i) end
      bus:flush()
      eventually(function() return bus:store_info().held_back == 90 end,
                 5, "90 events held back")
      assert.equal(100, bus:store_info().events)
      assert.equal(90, bus:stats().store.held_back)
    end)
  end)

  describe("bad input", function()
    local bus

    before_each(function()
      bus = H.bus{ store = path, max_payload = 4096 }
    end)

    it("refuses payloads JSON cannot hold, naming the path", function()
      local cyclic = {}
      cyclic.self = cyclic
      local cases = {
        { { items = { 1, 2, { cb = print } } }, "payload.items[3].cb" },
        { cyclic, "payload.self" },
        { { x = 0 / 0 }, "payload.x" },
        { { x = math.huge }, "payload.x" },
        { { 1, 2, name = "mixed" }, "payload" },
        { { [1] = 1, [3] = 3 }, "payload" },
        { io.stdout, "payload" },
        { { [true] = 1 }, "payload" },
      }
      for _, case in ipairs(cases) do
        local ok, err = pcall(bus.publish, bus, "e", case[1])
        assert.is_false(ok)
        assert.matches(case[2]:gsub("[%[%]%.]", "%%%0"), err)
      end
      bus:flush()
      assert.equal(0, bus:store_info().events)
      assert.equal(0, bus:stats().last_id)     -- no id was used up
    end)

    it("refuses a payload above max_payload", function()
      local ok, err = pcall(bus.publish, bus, "e", string.rep("x", 5000))
      assert.is_false(ok)
      assert.matches("above", err)
      assert.truthy(bus:publish("e", string.rep("x", 4000)))
    end)

    it("keeps accepting functions on a memory bus", function()
      local mem = H.bus()
      mem:subscribe("e", H.counter(1, function(ev)
        assert.equal(print, ev.payload.cb)
      end))
      mem:publish("e", { cb = print })
      mem:drain()
    end)

    it("gives nil, err, code for a file that is not a database", function()
      bus:close()
      remove_store(path)
      local f = assert(io.open(path, "wb"))
      f:write(string.rep("not sqlite at all ", 500))
      f:close()
      local b, err, code = buzz.new{ store = path }
      assert.is_nil(b)
      assert.equal("ESTORE", code)
      assert.matches("not a database", err)
    end)

    it("gives nil, err, code for an SQLite file that is not a store",
       function()
      bus:close()
      remove_store(path)
      sqlite(path, "CREATE TABLE people (name TEXT); "
                   .. "INSERT INTO people VALUES ('ann');")
      local b, err, code = buzz.new{ store = path }
      assert.is_nil(b)
      assert.equal("ESTORE", code)
      assert.matches("not a buzz store", err)
      assert.equal("ann\n", sqlite(path, "SELECT name FROM people"))
    end)

    it("gives nil, err, code for a read-only file, which it can still read",
       function()
      bus:publish("e", 1)
      bus:close()
      os.execute(("chmod 444 %q"):format(path))
      local b, err, code = buzz.new{ store = path }
      assert.is_nil(b)
      assert.equal("ESTORE", code)
      assert.matches("read%-only", err)
      local r = H.bus{ store = path, readonly = true }
      assert.equal(1, #collect(r:events()))
      assert.has_error(function() r:publish("e", 2) end,
        "this bus opened its store read-only (readonly = true): it cannot "
        .. "publish")
      os.execute(("chmod 644 %q"):format(path))
    end)

    it("names a directory given as the store, and what to give instead",
       function()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute(("mkdir %q"):format(dir)))
      finally(function() os.execute(("rm -rf %q"):format(dir)) end)
      for _, readonly in ipairs { false, true } do
        local b, err, code = buzz.new{ store = dir, readonly = readonly }
        assert.is_nil(b)
        assert.equal("ESTORE", code)
        assert.equal(("ESTORE: %s is a directory: give the path of a store "
                      .. "file in it, such as %s/events.db"):format(dir, dir),
                     err)
      end
    end)

    it("opens a missing file read-only with an error, creating nothing",
       function()
      local missing = tmp_store()
      local b, err, code = buzz.new{ store = missing, readonly = true }
      assert.is_nil(b)
      assert.equal("ESTORE", code)
      assert.equal("ESTORE: " .. missing .. ": No such file or directory "
                   .. "(readonly = true opens an existing store)", err)
      assert.is_nil(io.open(missing))
    end)

    it("leaves a store written by a newer buzz alone", function()
      bus:publish("e", 1)
      bus:close()
      sqlite(path, "PRAGMA user_version = 5")
      for _, readonly in ipairs { false, true } do
        local b, err, code = buzz.new{ store = path, readonly = readonly }
        assert.is_nil(b)
        assert.equal("ESTORE", code)
        assert.equal("ESTORE: " .. path .. " was written by a newer buzz "
                     .. "(schema 5, this buzz knows 1); upgrade buzz to "
                     .. "open it", err)
      end
      assert.equal("1\n", sqlite(path, "SELECT count(*) FROM events"))
    end)

    it("refuses writes through a read-only bus, and reads through it",
       function()
      bus:subscribe("e", print, { durable = "d" })
      bus:publish("e", 1)
      bus:flush()
      local r = H.bus{ store = path, readonly = true }
      assert.has_error(function()
        r:subscribe("e", print, { durable = "r" })
      end, "durable consumers save their position, and this bus opened its "
           .. "store read-only")
      assert.has_error(function() r:remove_consumer("d") end,
        "this bus opened its store read-only: it cannot remove consumers")
      assert.has_error(function() r:publish_sync("e", 2) end,
        "this bus opened its store read-only (readonly = true): it cannot "
        .. "publish")
      assert.same({ 1 }, ids(collect(r:events{ from = { id = 1 } })))
      assert.equal(1, r:store_info().events)
    end)

    it("gives nil, err, code in a directory that does not exist", function()
      local b, err, code = buzz.new{ store = "/nonexistent/dir/e.db" }
      assert.is_nil(b)
      assert.equal("ESTORE", code)
      assert.matches("/nonexistent/dir/e.db", err, 1, true)
    end)

    it("gives nil, err, code when the disk is full, and keeps the log whole",
       function()
      bus:close()
      local full = H.bus{ store = path, durability = "sync",
                          max_size = 64 * 1024 }
      local stored, err, code = {}, nil, nil
      for i = 1, 200 do
        local id
        id, err, code = full:publish("e", { i = i, pad = string.rep("p", 900) })
        if not id then break end
        stored[#stored + 1] = id
      end
      assert.equal("ESTORE", code)
      assert.matches("full", err)
      assert.is_true(#stored > 5, #stored .. " stored")
      full:close()
      assert.equal("ok\n", sqlite(path, "PRAGMA integrity_check"))
      local evs = collect(H.bus{ store = path, readonly = true }:events())
      assert.same(stored, ids(evs))
      for i, ev in ipairs(evs) do assert.equal(i, ev.payload.i) end
    end)

    it("never delivers the events of a group that failed to commit",
       function()
      bus:close()
      local errs = {}
      local full = H.bus{ store = path, max_size = 64 * 1024,
                          on_error = function(e) errs[#errs + 1] = e end }
      local delivered = 0
      full:subscribe("e", function() delivered = delivered + 1 end)
      local accepted = 0
      for i = 1, 200 do
        local id, err, code = full:publish("e", { i = i,
                                                  pad = string.rep("p", 900) })
        if id then
          accepted = accepted + 1
        else
          assert.equal("ESTORE", code)
          errs[#errs + 1] = err
        end
      end
      full:drain()
      local ok, err = full:flush()
      if not ok then errs[#errs + 1] = err end
      assert.is_true(#errs > 0)
      assert.matches("full", errs[1])
      local stored = #collect(full:events())
      assert.equal(stored, delivered)
      assert.is_true(accepted > stored)
      full:close()
      assert.equal("ok\n", sqlite(path, "PRAGMA integrity_check"))
    end)

    it("reports a failed commit that a read comes upon, once, to on_error",
       function()
      bus:close()
      local errs = {}
      local full = H.bus{ store = path, max_size = 64 * 1024,
                          on_error = function(e) errs[#errs + 1] = e end }
      assert(full:publish("e", { i = 1 }))
      assert(full:flush())
      -- one event too big for the store: batch durability, so nothing
      -- waits for its commit but the read below (no later publish, no
      -- drive that could come upon the failure first)
      assert(full:publish("e", { i = 2, pad = string.rep("p", 100000) }))
      assert.same({}, errs)
      local n = #collect(full:events())  -- the read waits for the commit
      assert.equal(1, n)
      assert.equal(1, #errs)
      assert.matches("^ESTORE: database or disk is full", errs[1])
      assert.equal(n, #collect(full:events()))
      assert.equal(1, #errs)           -- reported once, and cleared
      full:close()
    end)

    it("forgets the dedup key of an event that was not stored", function()
      bus:close()
      local full = H.bus{ store = path, max_size = 64 * 1024 }
      local pad = string.rep("p", 900)
      for i = 1, 200 do
        assert.truthy(full:publish("e", { pad = pad }, { dedup = "k" .. i }))
        if not full:flush() then       -- lost: a retry is not a duplicate
          local _, second = full:publish("e", { pad = pad },
                                         { dedup = "k" .. i })
          assert.is_nil(second)
          return
        end
      end
      error("the store never filled up")
    end)

    it("refuses a second writer with ELOCKED, and lets readers in",
       function()
      local b, err, code = buzz.new{ store = path }
      assert.is_nil(b)
      assert.equal("ELOCKED", code)
      assert.matches("locked by another writer", err)
      local ok, out = H.run(([[
        local buzz = require "buzz"
        local b, err, code = buzz.new{ store = %q }
        print(code)
        local r = assert(buzz.new{ store = %q, readonly = true })
        print(r:store_info().events)
      ]]):format(path, path))
      assert.is_true(ok, out)
      assert.equal("ELOCKED\n0\n", out)
      bus:close()
      b = H.bus{ store = path }             -- free again once closed
      assert.truthy(b)
    end)

    it("refuses bad store options", function()
      assert.has_error(function() buzz.new{ store = 5 } end,
        'bad store: expected the path of a SQLite file such as "events.db", '
        .. "got 5")
      assert.has_error(function() buzz.new{ max_events = 10 } end,
        'max_events applies to a store: give buzz.new{ store = "events.db" } '
        .. "too, or drop max_events")
      assert.has_error(function() buzz.new{ store = path, max_age = -1 } end,
                       "bad max_age: expected a positive number, got -1")
      assert.has_error(function() bus:publish("e", 1, { version = 1.5 }) end,
                       "bad version: expected a positive integer, got 1.5")
    end)
  end)
end)

-- Optimistic concurrency: publish with stream and expect (lua/buzz/
-- stream.lua; the stream columns and their unique index in the store).

describe("publish with stream and expect", function()
  local path
  before_each(function() path = H.tmp_store() end)
  after_each(function()
    H.done()
    H.remove_store(path)
  end)

  for _, with_store in ipairs { false, true } do
    local where = with_store and "with a store" or "in memory"

    it("appends only at the expected version, " .. where, function()
      local bus = H.bus{ store = with_store and path or nil }
      local seen = {}
      bus:subscribe("order.*", function(ev)
        seen[#seen + 1] = ev.stream .. "@" .. ev.stream_version
      end)
      assert.equal(0, bus:stream_version("order-17"))
      local a = bus:publish("order.placed", { n = 1 },
                            { stream = "order-17", expect = "none" })
      local b = bus:publish("order.paid", { n = 2 },
                            { stream = "order-17", expect = 1 })
      assert.is_truthy(a and b)
      local id, err, code = bus:publish("order.paid", { n = 3 },
                                        { stream = "order-17", expect = 1 })
      assert.is_nil(id)
      assert.equal("ECONFLICT: order-17 is at 2, expected 1", err)
      assert.equal("ECONFLICT", code)
      id, err, code = bus:publish("order.placed", {},
                                  { stream = "order-17", expect = "none" })
      assert.is_nil(id)
      assert.equal("ECONFLICT: order-17 is at 2, expected none (a new "
                   .. "stream)", err)
      assert.equal("ECONFLICT", code)
      local c = bus:publish("order.shipped", {}, { stream = "order-17" })
      assert.equal(b + 1, c)               -- a conflict uses up no id
      bus:publish("order.placed", {}, { stream = "order-18", expect = 0 })
      bus:drain()
      assert.same({ "order-17@1", "order-17@2", "order-17@3",
                    "order-18@1" }, seen)
      assert.equal(3, bus:stream_version("order-17"))
      assert.equal(1, bus:stream_version("order-18"))
    end)

    it("gives publish_sync's handlers the version, " .. where, function()
      local bus = H.bus{ store = with_store and path or nil }
      local got = {}
      bus:subscribe("cart.opened", function(ev)
        got[#got + 1] = ev.stream_version
        -- a handler appending to the stream it was given counts from it
        assert(bus:publish("cart.item", {}, { stream = ev.stream,
                                              expect = ev.stream_version }))
      end)
      assert(bus:publish_sync("cart.opened", {}, { stream = "cart-1",
                                                   expect = "none" }))
      assert.same({ 1 }, got)
      assert.equal(2, bus:stream_version("cart-1"))
    end)
  end

  it("lets one of two coroutines that read the same version append",
     function()
    local bus = H.bus{ store = path }
    bus:publish("acct.opened", {}, { stream = "acct-1" })
    local results = {}
    local function writer(name)
      return coroutine.create(function()
        local v = bus:stream_version("acct-1")
        coroutine.yield()
        local id, err = bus:publish("acct.debited", { by = name },
                                    { stream = "acct-1", expect = v })
        results[name] = id and "ok" or err
      end)
    end
    local a, b = writer("a"), writer("b")
    coroutine.resume(a)
    coroutine.resume(b)                  -- both have read version 1
    coroutine.resume(a)
    coroutine.resume(b)
    assert.equal("ok", results.a)
    assert.equal("ECONFLICT: acct-1 is at 2, expected 1", results.b)
  end)

  it("keeps versions in the log across a restart, for events() and "
     .. "replay", function()
    local bus = H.bus{ store = path }
    for i = 1, 3 do
      assert(bus:publish("order.step", { i = i }, { stream = "o-1",
                                                     expect = i - 1 }))
    end
    bus:publish("order.note", {})                      -- in no stream
    bus:close()
    bus = H.bus{ store = path }
    assert.equal(3, bus:stream_version("o-1"))
    local id, err = bus:publish("order.step", {}, { stream = "o-1",
                                                    expect = 2 })
    assert.is_nil(id)
    assert.equal("ECONFLICT: o-1 is at 3, expected 2", err)
    assert(bus:publish("order.step", { i = 4 }, { stream = "o-1",
                                                  expect = 3 }))
    local rows = {}
    for ev in bus:events{} do
      rows[#rows + 1] = tostring(ev.stream) .. "@"
                        .. tostring(ev.stream_version)
    end
    assert.same({ "o-1@1", "o-1@2", "o-1@3", "nil@nil", "o-1@4" }, rows)
  end)

  it("commits each append in a group with its own version", function()
    local bus = H.bus{ store = path }
    for i = 1, 50 do
      assert(bus:publish("e", { i = i }, { stream = "s" .. i % 5 }))
    end
    assert(bus:flush())
    local versions = {}
    for ev in bus:events{} do
      versions[ev.stream] = (versions[ev.stream] or 0) + 1
      assert.equal(versions[ev.stream], ev.stream_version)
    end
    assert.equal(10, versions.s0)
    assert.equal(10, bus:stream_version("s4"))
  end)

  it("a duplicate dedup key takes no version", function()
    local bus = H.bus{ store = path }
    local a = bus:publish("pay", {}, { stream = "p", dedup = "k1" })
    local again, dup = bus:publish("pay", {}, { stream = "p", dedup = "k1" })
    assert.equal(a, again)
    assert.equal("duplicate", dup)
    assert.equal(1, bus:stream_version("p"))
  end)

  it("answers a retried publish whose first try got in with its id, not "
     .. "a conflict", function()
    local bus = H.bus{ store = path }
    local o = { stream = "pay-1", expect = "none", dedup = "req-9" }
    local a = assert(bus:publish("pay", {}, o))
    local again, dup = bus:publish("pay", {}, o)     -- the same request
    assert.equal(a, again)
    assert.equal("duplicate", dup)
    local id, err, code = bus:publish("pay", {}, { stream = "pay-1",
                                                   expect = "none",
                                                   dedup = "req-10" })
    assert.is_nil(id)                                -- a new request
    assert.equal("ECONFLICT: pay-1 is at 1, expected none (a new stream)",
                 err)
    assert.equal("ECONFLICT", code)
    assert.equal(a + 1, assert(bus:publish("pay", {}, { stream = "pay-1" })))
  end)

  it("refuses two events at one place of a stream in the log itself",
     function()
    local bus = H.bus{ store = path }
    bus:publish("e", {}, { stream = "s" })
    bus:close()
    local out = H.sqlite(path, "INSERT INTO events (id, type, ts, priority, "
      .. "payload, stream, stream_version) VALUES (99, 'e', 1, 2, '{}', "
      .. "'s', 1)")
    assert.matches("UNIQUE constraint failed", out, 1, true)
  end)

  it("opens a store an older buzz made, adding the stream columns",
     function()
    local bus = H.bus{ store = path }
    bus:publish("old.event", { n = 1 })
    bus:close()
    H.sqlite(path, "DROP INDEX events_stream; ALTER TABLE events DROP "
                   .. "COLUMN stream_version; ALTER TABLE events DROP "
                   .. "COLUMN stream")
    assert.equal("0\n", H.sqlite(path, "SELECT count(*) FROM "
                 .. "pragma_table_info('events') WHERE name = 'stream'"))
    local ro = H.bus{ store = path, readonly = true }   -- read as it is
    local n = 0
    for ev in ro:events{} do
      n = n + 1
      assert.is_nil(ev.stream)
    end
    assert.equal(1, n)
    assert.equal(0, ro:stream_version("s"))
    ro:close()
    bus = H.bus{ store = path }
    assert(bus:publish("new.event", {}, { stream = "s", expect = "none" }))
    assert(bus:flush())
    local rows = {}
    for ev in bus:events{} do rows[#rows + 1] = tostring(ev.stream) end
    assert.same({ "nil", "s" }, rows)
  end)

  it("raises on misuse, naming the fix", function()
    local bus = H.bus()
    assert.has_error(function() bus:publish("e", {}, { expect = 1 }) end,
      'bad expect: give the stream it is about (stream = "order-17")')
    assert.has_error(function() bus:publish("e", {}, { stream = "" }) end,
      'bad stream: expected a non-empty string such as "order-17", got ""')
    assert.has_error(function() bus:publish("e", {}, { stream = 7 }) end,
      'bad stream: expected a non-empty string such as "order-17", got '
      .. "number")
    assert.has_error(function()
      bus:publish("e", {}, { stream = "s", expect = -1 })
    end, 'bad expect: expected a version (an integer >= 0), "none" or '
         .. '"any", got number')
    assert.has_error(function()
      bus:publish("e", {}, { stream = "s", expect = "latest" })
    end, 'bad expect: expected a version (an integer >= 0), "none" or '
         .. '"any", got "latest"')
    assert.has_error(function()
      bus:publish("e", {}, { stream = "s", delay = 5 })
    end, "stream cannot be combined with delay or at: its version is "
         .. "checked and taken when publish is called")
    assert.has_error(function()
      bus:publish_sync("e", {}, { stream = "s", bogus = 1 })
    end)
    assert.has_error(function() bus:stream_version(1) end,
      'bad stream: expected a non-empty string such as "order-17"')
    assert.has_error(function() bus.stream_version("s") end)
    assert.equal(0, bus:stream_version("s"))    -- nothing was published
  end)

  it("keys a projection by stream", function()
    local bus = H.bus{ store = path }
    local p = bus:projection("orders", {
      types = "order.*", by = "stream",
      apply = function(s, ev) s.last = ev.stream_version end,
    })
    bus:publish("order.placed", {}, { stream = "o-1" })
    bus:publish("order.placed", {}, { stream = "o-2" })
    bus:publish("order.paid", {}, { stream = "o-1", expect = 1 })
    bus:publish("order.note", {})                  -- no stream: left out
    bus:drain()
    assert.same({ last = 2 }, p:get("o-1"))
    assert.same({ last = 1 }, p:get("o-2"))
    assert.same({ "o-1", "o-2" }, p:keys())
  end)
end)

describe("buzz.core.errors", function()
  it("knows ECONFLICT", function()
    assert.equal("a stream is not at the version expected",
                 require("buzz.core").errors.ECONFLICT)
  end)
end)

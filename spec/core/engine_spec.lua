-- csrc/loop.c, csrc/lbuzz.c, csrc/store.c: what the Lua layer builds its
-- engine on. The loop's timer (arm), resuming a thread with a current
-- event (resume), engine publishes of "$" types, and the store's state
-- table (state_put, state_del, state_list).
local core = require "buzz.core"

-- One delivery pulled from the core (core:take), as the Lua layer pulls.
local function take1(c, level)
  local subs, evs = {}, {}
  if c:take(1, subs, evs, level) == 1 then return subs[1], evs[1] end
end

-- The Lua layer's side of delivery, in miniature: subscription objects
-- carry their handler (fn); psync runs a publish_sync level's deliveries
-- (core:publish_sync returns id, level; core:take hands them out).
local function sub(c, pattern, fn)
  return c:subscribe(pattern, { fn = fn }, fn)
end

local function run_level(c, level)
  local subs, evs = {}, {}
  while true do
    local n = c:take(8, subs, evs, level)
    if n == 0 then return end
    for i = 1, n do       -- the event is current while its handler runs
      assert(c:resume(coroutine.create(subs[i].fn), evs[i], evs[i]))
    end
  end
end

local function psync(c, ...)
  local id, level = c:publish_sync(...)
  if level then run_level(c, level) end
  return id
end

local function noop() end

-- Milliseconds on the monotonic clock.
local function now()
  return core.hrtime() / 1e6
end

-- Sleeps about s seconds without touching the core's loop.
local function sleep(s)
  local deadline = now() + s * 1000
  os.execute(H.tool .. "sleep " .. s)
  while now() < deadline do end   -- sleep(1) may return early on a signal
end

local tmp_store, remove_store = H.tmp_store, H.remove_store

-- The events queued at level 0, in order.
local function drain(c)
  local out = {}
  while true do
    local _, ev = take1(c, 0)
    if not ev then return out end
    out[#out + 1] = ev
  end
end

describe("the loop's timer", function()
  local c
  before_each(function() c = assert(core.new(100)) end)
  after_each(function() c:close() end)

  it("counts timeout() down to the armed time, and -1 once disarmed",
     function()
    assert.equal(-1, c:timeout())
    assert.is_true(c:arm(500))
    local t1 = c:timeout()
    assert.is_true(t1 > 0 and t1 <= 500, "timeout " .. t1)
    sleep(0.05)
    local t2 = c:timeout()
    assert.is_true(t2 >= 0 and t2 < t1, ("timeout %d, then %d"):format(t1, t2))
    assert.is_true(c:arm(-1))
    assert.equal(-1, c:timeout())
    assert.is_true(c:arm(100))
    assert.is_true(c:arm(nil))
    assert.equal(-1, c:timeout())
    assert.is_true(c:arm(100))
    assert.is_true(c:arm())
    assert.equal(-1, c:timeout())
  end)

  it("replaces the due time when armed again", function()
    c:arm(60000)
    assert.is_true(c:timeout() > 1000)
    c:arm(50)
    assert.is_true(c:timeout() <= 50)
    c:arm(60000)
    assert.is_true(c:timeout() > 1000)
  end)

  it("makes wait() return true when it fires, about the armed time later",
     function()
    local t0 = now()
    c:arm(80)
    local rounds = 0
    while c:timeout() ~= -1 do
      assert.is_true(c:wait())
      rounds = rounds + 1
      assert.is_true(rounds < 1000, "wait() keeps returning early")
    end
    local elapsed = now() - t0
    assert.is_true(elapsed >= 70, ("fired after %.1f ms"):format(elapsed))
    assert.is_true(elapsed < 10000, ("fired after %.1f ms"):format(elapsed))
    assert.is_false(c:wait())          -- one-shot: nothing keeps it alive
  end)

  it("is due at once when armed with 0", function()
    c:arm(0)
    assert.equal(0, c:timeout())
    assert.is_true(c:wait())
    assert.equal(-1, c:timeout())
  end)

  it("still reports 0 while events are pending", function()
    assert(c:subscribe("e", {}, noop))
    c:arm(60000)
    c:publish("e", 1)
    assert.equal(0, c:timeout())
    drain(c)
    assert.is_true(c:timeout() > 1000)
  end)

  it("is not consumed by the descriptor's own passes over the loop",
     function()
    c:fd()                             -- a polling host
    assert(c:subscribe("e", {}, noop))
    c:arm(20)
    c:publish("e", 1)                  -- signals the descriptor
    sleep(0.05)                        -- the timer is due now
    drain(c)                           -- the signal is consumed: a pass
    assert.equal(0, c:timeout())       -- still there, and due
    assert.is_true(c:wait())
    assert.equal(-1, c:timeout())
  end)

  it("does not hold up close()", function()
    c:arm(60000)
    local t0 = now()
    c:close()
    assert.is_true(now() - t0 < 1000)
    assert.has_error(function() c:arm(10) end, "attempt to use a closed bus")
  end)

  it("refuses what is not a time", function()
    assert.has_error(function() c:arm(-2) end)
    assert.has_error(function() c:arm("soon") end)
  end)
end)

describe("resume", function()
  local c
  before_each(function() c = assert(core.new(100)) end)
  after_each(function() c:close() end)

  it("gives publishes inside the thread the event's correlation and "
     .. "causation", function()
    assert(c:subscribe("child", {}, noop))
    local co = coroutine.create(function(x)
      local a = c:publish("child", x)
      local b = c:publish("child", "own", nil, nil, "req-own", 7)
      return a, b
    end)
    local ev = { id = 41, correlation_id = "req-1" }
    local ok, a, b = c:resume(co, ev, "p")
    assert.is_true(ok)
    assert.is_number(a)
    assert.equal(a + 1, b)
    local evs = drain(c)
    assert.equal(2, #evs)
    assert.equal("p", evs[1].payload)
    assert.equal("req-1", evs[1].correlation_id)
    assert.equal(41, evs[1].causation_id)
    assert.equal("req-own", evs[2].correlation_id)   -- given ones win
    assert.equal(7, evs[2].causation_id)
  end)

  it("keeps the event current only while the thread runs", function()
    assert(c:subscribe("child", {}, noop))
    local co = coroutine.create(function()
      coroutine.yield()
      c:publish("child", "second")
    end)
    assert.is_true((c:resume(co, { id = 5, correlation_id = "first" })))
    c:publish("child", "outside")
    assert.is_true((c:resume(co, { id = 6, correlation_id = "again" })))
    local evs = drain(c)
    assert.equal("outside", evs[1].payload)
    assert.is_nil(evs[1].correlation_id)
    assert.is_nil(evs[1].causation_id)
    assert.equal("again", evs[2].correlation_id)
    assert.equal(6, evs[2].causation_id)
  end)

  it("returns true and what the thread yields or returns", function()
    local co = coroutine.create(function(a)
      local b, c2 = coroutine.yield(a + 1, "y")
      return b * 2, c2
    end)
    assert.same({ true, 2, "y" }, { c:resume(co, nil, 1) })
    assert.equal("suspended", coroutine.status(co))
    assert.same({ true, 20, "z" }, { c:resume(co, nil, 10, "z") })
    assert.equal("dead", coroutine.status(co))
    assert.same({ false, "cannot resume dead coroutine" },
                { c:resume(co, nil) })
  end)

  it("returns false and the error, leaving the thread for a traceback",
     function()
    local function boom() error("boom") end
    local co = coroutine.create(function() boom() end)
    local ok, err = c:resume(co, { id = 1 })
    assert.is_false(ok)
    assert.matches("boom", err)
    local trace = debug.traceback(co, err)
    assert.matches("stack traceback", trace)
    assert.matches("boom", trace)
    local obj = {}
    co = coroutine.create(function() error(obj) end)
    assert.same({ false, obj }, { c:resume(co, nil) })
    assert.same({ false, "cannot resume dead coroutine" },
                { c:resume(co, nil) })
  end)

  it("refuses a thread that is running", function()
    local co
    co = coroutine.create(function()
      return c:resume(co, nil)
    end)
    assert.same({ true, false, "cannot resume non-suspended coroutine" },
                { c:resume(co, nil) })
  end)

  it("works re-entrantly: handlers run by publish_sync inside the thread",
     function()
    local seen = {}
    assert(sub(c, "leaf", function(ev) seen.leaf = ev end))
    assert(sub(c, "mid", function(ev)
      seen.mid = ev
      psync(c, "leaf", "l")
    end))
    assert(sub(c, "after", function(ev) seen.after = ev end))
    local co = coroutine.create(function()
      psync(c, "mid", "m")
      coroutine.yield("between")
      psync(c, "after", "a")
    end)
    local ev = { id = 41, correlation_id = "req-1" }
    assert.same({ true, "between" }, { c:resume(co, ev) })
    assert.same({ true }, { c:resume(co, ev) })
    assert.equal(41, seen.mid.causation_id)
    assert.equal("req-1", seen.mid.correlation_id)
    assert.equal(seen.mid.id, seen.leaf.causation_id)
    assert.equal("req-1", seen.leaf.correlation_id)
    assert.equal(41, seen.after.causation_id)      -- the stack unwound
    assert.equal("req-1", seen.after.correlation_id)
  end)

  it("runs a thread with no current event when ev is nil, even inside a "
     .. "handler", function()
    local inner
    assert(sub(c, "inner", function(ev) inner = ev end))
    assert(sub(c, "outer", function()
      local co = coroutine.create(function()
        psync(c, "inner", 1)
      end)
      assert(c:resume(co, nil))
    end))
    psync(c, "outer", 0, nil, nil, "req-outer")
    assert.is_nil(inner.correlation_id)
    assert.is_nil(inner.causation_id)
  end)

  it("refuses what is not a thread or an event table", function()
    local co = coroutine.create(noop)
    assert.has_error(function() c:resume("co", nil) end)
    assert.has_error(function() c:resume(co, 5) end)
    assert.equal("suspended", coroutine.status(co))   -- not resumed
  end)
end)

describe("engine publishes", function()
  local c
  before_each(function() c = assert(core.new(100)) end)
  after_each(function() c:close() end)

  local function engine_publish(method, type, payload)
    return c[method](c, type, payload, nil, nil, nil, nil, nil, nil, nil,
                     true)
  end

  it("refuses reserved types without the engine flag", function()
    assert(c:subscribe("$DLQ.x", {}, noop))
    for _, method in ipairs { "publish", "publish_sync" } do
      local id, err, code = c[method](c, "$DLQ.x", 1)
      assert.is_nil(id)
      assert.matches("reserved for the engine", err)
      assert.equal("ESUBJECT", code)
      id, err, code = c[method](c, "$DLQ.x", 1, nil, nil, nil, nil, nil,
                                nil, nil, false)
      assert.is_nil(id)
      assert.matches("reserved for the engine", err)
      assert.equal("ESUBJECT", code)
    end
    assert.equal(0, c:pending())
  end)

  it("accepts them with it, and delivers them to their subscribers",
     function()
    local got = {}
    assert(c:subscribe("$DLQ.x", {}, noop))
    assert(sub(c, "$SYS.>", function(ev) got[#got + 1] = ev end))
    local id = assert(engine_publish("publish", "$DLQ.x", "dead"))
    local evs = drain(c)
    assert.equal(1, #evs)
    assert.equal(id, evs[1].id)
    assert.equal("$DLQ.x", evs[1].type)
    assert.equal("dead", evs[1].payload)
    local _, level = engine_publish("publish_sync", "$SYS.breaker", "open")
    run_level(c, level)
    assert.equal(1, #got)
    assert.equal("$SYS.breaker", got[1].type)
  end)

  it("still checks the subject's grammar", function()
    local id, _, code = engine_publish("publish", "$DLQ..x", 1)
    assert.is_nil(id)
    assert.equal("ESUBJECT", code)
  end)
end)

describe("the state table", function()
  local path, cores

  local function open(readonly, durability)
    local c = assert(core.new(100, { store = {
      path = path, durability = durability or 1,
      readonly = readonly and 1 or 0 } }))
    cores[#cores + 1] = c
    return c
  end

  before_each(function()
    path = tmp_store()
    cores = {}
  end)
  after_each(function()
    for _, c in ipairs(cores) do c:close() end
    remove_store(path)
  end)

  it("puts, replaces, lists in name order and deletes rows", function()
    local c = open()
    assert.is_true(c:state_put("retry", "b", "2"))
    assert.is_true(c:state_put("retry", "a", "1"))
    assert.is_true(c:state_put("dlq", "x", "y"))
    assert.same({ { name = "a", value = "1" }, { name = "b", value = "2" } },
                c:state_list("retry"))   -- sees its own writes at once
    assert.is_true(c:state_put("retry", "a", "9"))
    assert.is_true(c:state_put("retry", "c", ""))
    assert.same({ { name = "a", value = "9" }, { name = "b", value = "2" },
                  { name = "c", value = "" } }, c:state_list("retry"))
    assert.is_true(c:state_del("retry", "a"))
    assert.is_true(c:state_del("retry", "nope"))
    assert.same({ { name = "b", value = "2" }, { name = "c", value = "" } },
                c:state_list("retry"))
    assert.same({ { name = "x", value = "y" } }, c:state_list("dlq"))
    assert.same({}, c:state_list("unknown"))
  end)

  it("looks one row up by kind and name", function()
    local c = open()
    assert.is_true(c:state_put("retry", "a", "1"))
    assert.is_true(c:state_put("retry", "ab", "2"))
    assert.is_true(c:state_put("dlq", "a", "3"))
    assert.same({ { name = "a", value = "1" } }, c:state_list("retry", "a"))
    assert.same({ { name = "a", value = "3" } }, c:state_list("dlq", "a"))
    assert.same({}, c:state_list("retry", "b"))
    assert.same({ { name = "7", value = "4" } },
                { c:state_put("retry", 7, "4") and
                  c:state_list("retry", 7)[1] })       -- numbers as text
    assert.has_error(function() c:state_list("retry", {}) end)
  end)

  it("keeps rows across close and reopen, and deletes a whole kind",
     function()
    local c = open()
    c:state_put("delay", "1", '{"due":5}')
    c:state_put("delay", "2", '{"due":6}')
    c:state_put("keep", "k", "v")
    c:close()
    c = open()
    assert.same({ { name = "1", value = '{"due":5}' },
                  { name = "2", value = '{"due":6}' } },
                c:state_list("delay"))
    assert.is_true(c:state_del("delay"))
    assert.is_true(c:state_del("delay", nil))
    assert.same({}, c:state_list("delay"))
    assert.same({ { name = "k", value = "v" } }, c:state_list("keep"))
    c:close()
    c = open()
    assert.same({}, c:state_list("delay"))
    assert.same({ { name = "k", value = "v" } }, c:state_list("keep"))
  end)

  it("writes under sync durability too", function()
    local c = open(false, 2)
    assert.is_true(c:state_put("k", "n", "v"))
    assert.same({ { name = "n", value = "v" } }, c:state_list("k"))
  end)

  it("lets a read-only bus list but not write", function()
    local w = open()
    w:state_put("k", "n", "v")
    assert.is_true(w:flush())
    local r = open(true)
    assert.same({ { name = "n", value = "v" } }, r:state_list("k"))
    for _, try in ipairs {
      function() return r:state_put("k", "n", "w") end,
      function() return r:state_del("k", "n") end,
      function() return r:state_del("k") end,
    } do
      local ok, err, code = try()
      assert.is_nil(ok)
      assert.equal("ESTORE: the store was opened read-only", err)
      assert.equal("ESTORE", code)
    end
    assert.same({ { name = "n", value = "v" } }, w:state_list("k"))
  end)

  it("reads a store an older buzz wrote (no state table) as empty",
     function()
    local w = open()
    assert(w:publish("e", 1))
    w:close()
    local status, out = H.sh(H.tool .. "sqlite3 " .. H.quote(path)
                             .. " 'DROP TABLE state' 2>&1")
    if status ~= 0 then
      pending("the sqlite3 shell is not available: " .. out)
      return
    end
    local r = open(true)
    assert.same({}, r:state_list("k"))
    r:close()
    local w2 = open()                  -- a writer creates it again
    assert.is_true(w2:state_put("k", "n", "v"))
    assert.same({ { name = "n", value = "v" } }, w2:state_list("k"))
  end)

  it("refuses what is not a string", function()
    local c = open()
    assert.has_error(function() c:state_put("k", "n") end)
    assert.has_error(function() c:state_put("k", {}, "v") end)
    assert.has_error(function() c:state_del(nil, "n") end)
    assert.has_error(function() c:state_list() end)
  end)

  it("is not there on a memory bus (EINVAL)", function()
    local c = assert(core.new(100))
    cores[#cores + 1] = c
    for _, try in ipairs {
      function() return c:state_put("k", "n", "v") end,
      function() return c:state_del("k", "n") end,
      function() return c:state_list("k") end,
    } do
      local ok, err, code = try()
      assert.is_nil(ok)
      assert.matches("this bus has none", err)
      assert.equal("EINVAL", code)
    end
  end)
end)

describe("core.traceback", function()
  local function inner(stop)
    local tb = core.traceback("msg", 1, stop)
    return tb                          -- not a tail call: inner stays
  end
  local function outer(stop)
    local tb = inner(stop)
    return tb
  end

  it("words frames as debug.traceback does, without global lookups",
     function()
    local tb = outer()
    assert.matches("^msg\nstack traceback:\n\t[^\n]*engine_spec%.lua:%d+: "
                   .. "in upvalue 'inner'\n", tb)
    assert.matches("in upvalue 'outer'", tb)
  end)

  it("stops before the first frame running stop", function()
    local tb = outer(outer)
    assert.matches("in upvalue 'inner'", tb)
    assert.not_matches("outer", tb)
    assert.equal(2, select(2, tb:gsub("\n", "\n")))  -- header, inner
  end)

  it("reads another thread from its top, and passes non-strings through",
     function()
    local co = coroutine.create(function() coroutine.yield() end)
    coroutine.resume(co)
    assert.matches("^hi\nstack traceback:\n\t%[C%]: in",
                   core.traceback(co, "hi"))
    local obj = {}
    assert.equal(obj, core.traceback(obj))
    assert.has_error(function() core.traceback("m", 1, "nope") end)
  end)
end)

describe("core.match", function()
  it("matches a type against a pattern by the trie's rules", function()
    for _, case in ipairs {
      { "a.*", "a.b", true }, { "a.*", "a.b.c", false },
      { "a.>", "a.b.c", true }, { "a.>", "a", false },
      { ">", "$DLQ.e", false }, { "*.e", "$DLQ.e", false },
      { "$DLQ.>", "$DLQ.order.paid", true }, { "a.b*", "a.b*", true },
      { "a.b*", "a.bc", false },
    } do
      assert.equal(case[3], core.match(case[1], case[2]),
                   case[1] .. " ~ " .. case[2])
    end
  end)

  it("raises for a malformed pattern or type", function()
    local ok, err = pcall(core.match, "a..b", "a")
    assert.is_false(ok)
    assert.matches('^bad pattern "a..b": has an empty token', err)
    assert.has_error(function() core.match("a", "a.*") end)
    assert.has_error(function() core.match(nil, "a") end)
  end)
end)

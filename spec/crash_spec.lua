-- Crash safety, for real: a child process publishes with durability
-- "sync" and acknowledges through a durable consumer; it is killed with
-- SIGKILL at a different moment each round, and the store must hold
-- every event the child was told was published, intact and in order, and
-- the consumer must resume right after its last acknowledged event.
local CHILD = [[
local buzz = require "buzz"
io.stdout:setvbuf("no")
local bus = assert(buzz.new{ store = arg[1], durability = "sync" })
bus:subscribe("job.*", function(ev)
  print("handled " .. ev.id)
end, { durable = "worker" })
local i = tonumber(arg[2])
while true do
  i = i + 1
  local id = assert(bus:publish("job.run", { i = i,
                                             body = ("x"):rep(i % 97) }))
  print(("published %d %d"):format(id, i))
  bus:step(3)
  print("acked " .. bus:consumers()[1].acked)
end
]]

local read, spit = H.read, H.spit

local function buzz_clock(start)
  return require("buzz").manual_clock(start)
end

-- Runs the child for about `secs` seconds, then SIGKILLs it; returns what
-- it printed, complete lines only (the kill may cut the last one). With
-- ready (a grep pattern), the seconds count from the first line of its
-- output that matches it (at most 20 s of waiting): a loaded machine, or
-- the sanitizers' build, may take longer than secs just to start.
local function run_and_kill(script, store, start, secs, out, ready)
  local wait = ""
  if ready then
    wait = ("n=0; until grep -q %s %s 2>/dev/null || "
            .. "! kill -0 $pid 2>/dev/null || [ $n -ge 2000 ]; do "
            .. "%ssleep 0.01; n=$((n+1)); done; ")
           :format(H.quote(ready), out, H.tool)
  end
  local cmd = ("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='%s/?.so;;' "
               .. "%s %s %s %d > %s 2>&1 & pid=$!; %s%ssleep %.2f; "
               .. "kill -9 $pid; wait $pid 2>/dev/null; true")
              :format(H.build, H.lua, script, store, start, out, wait, H.tool,
                      secs)
  os.execute(cmd)
  local text = read(out)
  return text:match("^(.*\n)") or ""
end

-- A scratch directory holding the child script; removed after each test.
local function scratch(child)
  local t = {}
  before_each(function()
    t.dir = H.mktemp_dir()
    t.store = t.dir .. "/events.db"
    t.script = t.dir .. "/child.lua"
    t.out = t.dir .. "/out.txt"
    spit(t.script, child)
  end)
  after_each(function()
    H.done()
    H.remove_dir(t.dir)
  end)
  return t
end

describe("a store after SIGKILL", function()
  local t = scratch(CHILD)

  it("keeps every reported event and resumes the consumer exactly",
     function()
    local expected = {}          -- id -> i, over every round
    local last_i, prev_pos = 0, 0
    local kill_points = { 0.25, 0.4, 0.55, 0.7, 0.9, 0.33 }
    for round, secs in ipairs(kill_points) do
      local text = run_and_kill(t.script, t.store, last_i, secs, t.out,
                                "^published ")
      local acked, handled, published = prev_pos, prev_pos, 0
      for line in text:gmatch("([^\n]*)\n") do
        local id, i = line:match("^published (%d+) (%d+)$")
        if id then
          expected[tonumber(id)] = tonumber(i)
          published = published + 1
        end
        local a = line:match("^acked (%d+)$")
        if a then acked = tonumber(a) end
        local h = line:match("^handled (%d+)$")
        if h then handled = tonumber(h) end
      end
      assert.is_true(published > 0, ("round %d: the child published "
                                      .. "nothing:\n%s"):format(round, text))
      local p = assert(io.popen(("sqlite3 %q 'PRAGMA integrity_check'")
                                :format(t.store)))
      assert.equal("ok\n", p:read("*a"))
      p:close()

      local bus = H.bus{ store = t.store }
      -- every reported id is there, intact, and ids come in order
      local prev, seen = 0, {}
      for ev in bus:events() do
        assert.is_true(ev.id > prev)
        prev = ev.id
        seen[ev.id] = ev.payload
      end
      for id, i in pairs(expected) do
        local payload = seen[id]
        assert.is_table(payload, ("round %d: event %d is missing")
                                 :format(round, id))
        assert.equal(i, payload.i)
        assert.equal(("x"):rep(i % 97), payload.body)
      end
      for _, payload in pairs(seen) do
        if payload.i > last_i then last_i = payload.i end
      end
      -- the position is at least what the child saw committed, never
      -- past what it handled, and delivery resumes right after it
      local pos = bus:consumers()[1].acked
      assert.is_true(pos >= acked, ("round %d: position %d is behind the "
                                    .. "acknowledged %d"):format(round, pos,
                                                                 acked))
      assert.is_true(pos <= math.max(handled, acked))
      local first
      local sub = bus:subscribe("job.*", function(ev)
        first = first or ev.id
      end, { durable = "worker" })
      bus:step(1)
      local after = {}
      for ev in bus:events{ from = pos + 1, limit = 1 } do after[1] = ev.id end
      assert.equal(after[1], first)
      sub:unsubscribe()
      prev_pos = bus:consumers()[1].acked
      bus:close()
    end
  end)
end)

-- Retries and dead letters of a durable consumer, "batch" durability
-- (the default): the child's handler fails two events in three, one of
-- them fatally, and says which events it saw; it is killed with no flush.
local RETRY_CHILD = [[
local buzz = require "buzz"
io.stdout:setvbuf("no")
local bus = assert(buzz.new{ store = arg[1], on_error = function() end })
bus:subscribe("job.*", function(ev)
  local i = ev.payload.i
  if i % 3 == 0 then
    print("saw " .. ev.id .. " fatal")
    error(buzz.fatal("bad job " .. i))
  elseif i % 3 == 1 then
    print("saw " .. ev.id .. " retry")
    error("flaky " .. i)
  end
  print("saw " .. ev.id .. " ok")
end, { durable = "billing", retry = { max = 3, base = 3600, jitter = 0 } })
local i = 0
while true do
  i = i + 1
  assert(bus:publish("job.run", { i = i }))
  bus:step(3)
end
]]

describe("retries and dead letters after SIGKILL", function()
  local t = scratch(RETRY_CHILD)

  it("lose no event a handler saw: each is retried, dead or redelivered",
     function()
    local retried, buried = 0, 0
    for round, secs in ipairs { 0.3, 0.45, 0.6 } do
      local store = ("%s/events-%d.db"):format(t.dir, round)
      local text = run_and_kill(t.script, store, 0, secs, t.out, "^saw ")
      local saw = {}             -- id -> "ok" | "retry" | "fatal"
      for id, what in text:gmatch("saw (%d+) (%a+)\n") do
        saw[tonumber(id)] = what
      end
      assert.is_truthy(next(saw), ("round %d: the child saw nothing:\n%s")
                                  :format(round, text))
      -- Two hours on: every stored retry is due.
      local clock = buzz_clock(os.time() + 7200)
      local bus = H.bus{ store = store, clock = clock }
      local dead = {}
      for _, d in ipairs(bus:dead_letters{ subscription = "billing" }) do
        assert.equal("fatal", d.reason)
        assert.matches("bad job", d.error, 1, true)
        dead[d.event.id] = true
      end
      local got = {}             -- id -> attempts delivered now
      bus:subscribe("job.*", function(ev)
        local a = got[ev.id] or {}
        a[#a + 1] = ev.attempt
        got[ev.id] = a
      end, { durable = "billing", retry = { max = 3, base = 3600 } })
      bus:drain()
      clock:advance(1)
      for id, what in pairs(saw) do
        -- One that failed is retried now, or redelivered from the
        -- consumer's position, or a dead letter; one that went through
        -- is done (or, at most, redelivered).
        assert.is_true(what == "ok" or got[id] ~= nil or dead[id] ~= nil,
                       ("round %d: event %d (%s) was lost"):format(round, id,
                                                                   what))
        if what == "retry" and got[id] then
          for _, a in ipairs(got[id]) do
            if a == 2 then retried = retried + 1 end
          end
        end
        if what == "ok" then assert.is_nil(dead[id]) end
      end
      for id in pairs(dead) do
        assert.equal("fatal", saw[id], ("round %d: dead letter %d"):format(
                                       round, id))
        buried = buried + 1
      end
      bus:close()
    end
    -- The kills fell between attempts: stored retries and dead letters
    -- were what carried those events over.
    assert.is_true(retried > 0, "no stored retry came back")
    assert.is_true(buried > 0, "no dead letter was kept")
  end)
end)

-- Durable windows and batches, "batch" durability: the child counts
-- events per group in 1 s windows and hands them to a batch; its clock
-- moves 50 ms per event, near the wall clock (the store's dedup window
-- counts back from it). It is killed with no flush.
local STREAM_SETUP = [[
local buzz = require "buzz"
local function setup(bus, on_batch)
  bus:route("m.x"):window{ tumbling = 1, allowed_lateness = 5,
                           checkpoint = 0.5 }
    :group_by("payload.g"):reduce(buzz.agg.count())
    :publish("m.stats", { durable = "stats" })
  bus:batch("m.x", { size = 7, interval = 1, durable = "sink" })(on_batch)
end
]]

local STREAM_CHILD = STREAM_SETUP .. [[
io.stdout:setvbuf("no")
local clock = buzz.manual_clock(tonumber(arg[2]))
local bus = assert(buzz.new{ store = arg[1], clock = clock })
setup(bus, function(events)
  local ids = {}
  for i, ev in ipairs(events) do ids[i] = ev.id end
  print("batch " .. table.concat(ids, " "))
end)
local i = 0
while true do
  i = i + 1
  assert(bus:publish("m.x", { g = i % 3 }))
  bus:step(2)
  clock:advance(0.05)
end
]]

describe("durable windows and batches after SIGKILL", function()
  local t = scratch(STREAM_CHILD)

  it("count every stored event once, and hand every one to a batch",
     function()
    local setup = assert(load(STREAM_SETUP .. " return setup"))()
    for round, secs in ipairs { 0.15, 0.3, 0.45 } do
      local store = ("%s/events-%d.db"):format(t.dir, round)
      local start = math.floor(os.time())
      local text = run_and_kill(t.script, store, start, secs, t.out,
                                "^batch ")
      local handled = {}
      for ids in text:gmatch("batch ([%d ]+)\n") do
        for id in ids:gmatch("%d+") do handled[tonumber(id)] = true end
      end
      assert.is_truthy(next(handled), ("round %d: no batch ran:\n%s")
                                      :format(round, text))
      -- What the store kept: the inputs, each in its window and group.
      local want, inputs, last_ts = {}, {}, 0
      local reader = H.bus{ store = store, readonly = true }
      for ev in reader:events{ types = "m.x" } do
        local k = ("%d@%d"):format(ev.payload.g, math.floor(ev.ts / 1000))
        want[k] = (want[k] or 0) + 1
        inputs[#inputs + 1] = ev.id
        if ev.ts > last_ts then last_ts = ev.ts end
      end
      reader:close()
      -- The restart: the clock where the child stopped, then past every
      -- window's lateness.
      local clock = buzz_clock(last_ts / 1000)
      local bus = H.bus{ store = store, clock = clock,
                         on_error = function() end }
      setup(bus, function(events)
        for _, ev in ipairs(events) do handled[ev.id] = true end
      end)
      bus:drain()
      clock:advance(10)
      bus:drain()
      local got = {}
      for ev in bus:events{ types = "m.stats" } do
        local r = ev.payload
        local k = ("%d@%d"):format(r.group, math.floor(r.window_start / 1000))
        assert.is_nil(got[k], ("round %d: window %s published twice")
                              :format(round, k))
        got[k] = r.count
      end
      assert.same(want, got)
      for _, id in ipairs(inputs) do
        assert.is_true(handled[id], ("round %d: event %d never reached a "
                                     .. "batch"):format(round, id))
      end
      bus:close()
    end
  end)
end)

-- Ids under SIGKILL, in every durability mode: the child publishes as
-- fast as it can and logs, one unbuffered line each, every id publish
-- returned and every id its handler saw, with the event's fingerprint
-- (the round and a counter). It is killed at a random moment after its
-- first publish, and restarted on the same store.
local IDS_CHILD = [[
local buzz = require "buzz"
local store, durability, round, logpath = arg[1], arg[2], arg[3], arg[4]
local log = assert(io.open(logpath, "w"))
log:setvbuf("no")
local bus = assert(buzz.new{ store = store, durability = durability })
bus:subscribe("job.*", function(ev)
  log:write(("saw %d %s\n"):format(ev.id, ev.payload.fp))
end)
local i = 0
while true do
  i = i + 1
  local fp = round .. "." .. i
  local id, err, code = bus:publish("job.run", { fp = fp })
  if id then
    log:write(("pub %d %s\n"):format(id, fp))
  elseif code == "EFULL" then
    bus:drain()
  else
    error(err)
  end
  bus:step(2)
end
]]

-- Starts the child, waits until it has logged a publish, lets it run for
-- secs more and SIGKILLs it. Returns the complete lines of its log (the
-- kill may cut the last one) and what it wrote on stderr.
local function run_until_kill(t, durability, round, secs)
  local log = ("%s/log-%s-%d.txt"):format(t.dir, durability, round)
  local cmd = ("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='%s/?.so;;' "
               .. "%s %s %s %s %d %s 2> %s & pid=$!; n=0; "
               .. "until grep -q '^pub ' %s 2>/dev/null || "
               .. "! kill -0 $pid 2>/dev/null || [ $n -ge 2000 ]; do "
               .. "%ssleep 0.01; n=$((n+1)); done; %ssleep %.3f; "
               .. "kill -9 $pid; wait $pid 2>/dev/null; true")
              :format(H.build, H.lua, t.script, t.store, durability, round,
                      log, t.out, log, H.tool, H.tool, secs)
  os.execute(cmd)
  local text = H.slurp(log) or ""
  return text:match("^(.*\n)") or "", read(t.out)
end

-- Runs rounds kills of the child with this durability on one store, then
-- checks that every id ever returned or seen names exactly one event, and
-- that the store holds each with the fingerprint the child logged.
local function id_rounds(t, durability, rounds)
  local seed = os.time()
  math.randomseed(seed)
  local names = {}           -- id -> fingerprint, over every round
  local returned, saw = {}, {}
  local function name(id, fp, how, round)
    local was = names[id]
    if was ~= nil and was ~= fp then   -- (assert per line is slow)
      assert.is_true(false, ("round %d (seed %d): id %d %s %s, but named %s "
                             .. "before"):format(round, seed, id, how, fp,
                                                 was))
    end
    names[id] = fp
  end
  for round = 1, rounds do
    local text, err = run_until_kill(t, durability, round,
                                     math.random() * 0.3)
    local published = 0
    for what, id, fp in text:gmatch("(%a+) (%d+) (%S+)\n") do
      id = tonumber(id)
      if what == "pub" then
        name(id, fp, "was returned for", round)
        returned[id] = fp
        published = published + 1
      else
        name(id, fp, "was seen for", round)
        saw[id] = fp
      end
    end
    assert.is_true(published > 0, ("round %d: the child published nothing:"
                                   .. "\n%s"):format(round, err))
  end
  local p = assert(io.popen(("sqlite3 %q 'PRAGMA integrity_check'")
                            :format(t.store)))
  assert.equal("ok\n", p:read("*a"))
  p:close()
  local bus = H.bus{ store = t.store, durability = durability }
  local stored = {}
  for ev in bus:events() do
    local fp, was = ev.payload.fp, names[ev.id]
    if was ~= nil and was ~= fp then
      assert.is_true(false, ("(seed %d) the store holds %s as event %d, "
                             .. "which the child knew as %s")
                            :format(seed, fp, ev.id, was))
    end
    stored[ev.id] = fp
  end
  -- What each mode promises on top: "batch" and "sync" hand handlers
  -- committed events only; "sync" returns an id once it is committed.
  local function kept(ids, how)
    for id, fp in pairs(ids) do
      if stored[id] ~= fp then
        assert.is_true(false, ("(seed %d) event %d (%s) was %s, then lost")
                              :format(seed, id, fp, how))
      end
    end
  end
  if durability ~= "none" then kept(saw, "seen") end
  if durability == "sync" then kept(returned, "returned") end
  -- and after the last crash, ids go on past every one handed out
  local high = 0
  for id in pairs(names) do high = math.max(high, id) end
  assert.is_true(bus:publish("job.run", { fp = "last" }) > high)
  bus:close()
end

describe("ids after SIGKILL", function()
  local t = scratch(IDS_CHILD)

  for _, durability in ipairs { "none", "batch", "sync" } do
    it(("each name one event forever, 3 rounds, durability %q")
       :format(durability), function()
      id_rounds(t, durability, 3)
    end)
  end
end)

describe("ids after 50 SIGKILLs per durability mode #slow", function()
  local t = scratch(IDS_CHILD)

  for _, durability in ipairs { "none", "batch", "sync" } do
    it(("each name one event forever, durability %q"):format(durability),
       function()
      id_rounds(t, durability, 50)
    end)
  end
end)

-- A projection that snapshots every 3 events, folding as fast as events
-- come: a SIGKILL lands in the middle of snapshots (key rows written,
-- the position row not yet) as often as not.
local PROJECTION_CHILD = [[
local buzz = require "buzz"
local store = arg[1]
local bus = assert(buzz.new{ store = store })
bus:projection("totals", {
  types = "order.*", by = "key", snapshot_every = 3,
  init = function() return { n = 0, sum = 0 } end,
  apply = function(s, ev) s.n, s.sum = s.n + 1, s.sum + ev.payload.v end,
})
local i = 0
while true do
  i = i + 1
  bus:publish("order.paid", { v = i % 7 }, { key = "k" .. i % 5 })
  bus:drain()
  if i == 1 then print("ready") io.stdout:flush() end
end
]]

describe("a projection after SIGKILL", function()
  local t = scratch(PROJECTION_CHILD)

  it("restarts from what its snapshots hold and equals a fold from "
     .. "scratch", function()
    for round, secs in ipairs { 0.3, 0.45, 0.2, 0.6 } do
      local text = run_and_kill(t.script, t.store, 0, secs, t.out,
                                "^ready")
      assert.matches("ready", text, 1, true)
      local bus = H.bus{ store = t.store }
      local p = bus:projection("totals", {
        types = "order.*", by = "key", snapshot_every = 3,
        init = function() return { n = 0, sum = 0 } end,
        apply = function(s, ev)
          s.n, s.sum = s.n + 1, s.sum + ev.payload.v
        end,
      })
      local ok, report = p:check()
      assert.is_true(ok, ("round %d: diverged keys %s"):format(
        round, table.concat(report.diverged, ", ")))
      assert.is_true(p:position() > 0)
      local n = 0
      for _, k in ipairs(p:keys()) do n = n + p:get(k).n end
      local events = 0
      for _ in bus:events{ types = "order.*" } do events = events + 1 end
      assert.equal(events, n, "round " .. round)
      bus:close()
    end
  end)
end)

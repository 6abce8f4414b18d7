-- lua/buzz/luv.lua: a bus driven by a plain luv loop (buzz.new{ loop =
-- uv }). Real clock, short delays; the specs check what is delivered and
-- in which order, never how long it took. Every loop run has a guard: an
-- unreferenced timer that stops the loop if the bus never lets it end.
local uv = require "luv"
local buzz = require "buzz"
local luv_driver = require "buzz.luv"

-- Handles of the loop that are not closing.
local function live_handles()
  local n = 0
  uv.walk(function(h) if not h:is_closing() then n = n + 1 end end)
  return n
end

-- Runs the loop; true if it ended by itself, false if the guard had to
-- stop it after seconds.
local function run_loop(seconds)
  local is_stopped = false
  local guard = uv.new_timer()
  uv.update_time()            -- the loop's time is stale since its last run
  guard:start(math.floor((seconds or 5) * 1000), 0, function()
    is_stopped = true
    uv.stop()
  end)
  guard:unref()               -- never keeps the loop alive by itself
  uv.run()
  guard:close()
  uv.run("nowait")            -- its close callback
  return not is_stopped
end

local function quiet() end

-- A stand-in for Neovim, for the test that calls it: vim.loop is this
-- loop, and vim.schedule runs its callback a millisecond later from a
-- timer, as the editor runs scheduled callbacks some time after a fast
-- one returns. The state says whether a scheduled callback runs now and
-- how many were scheduled.
local function fake_neovim()
  local state = { in_schedule = false, schedules = 0 }
  local fake = { loop = uv }
  function fake.schedule(fn)
    state.schedules = state.schedules + 1
    local t = uv.new_timer()
    t:start(1, 0, function()
      t:close()
      state.in_schedule = true
      fn()
      state.in_schedule = false
    end)
  end
  rawset(_G, "vim", fake)
  finally(function() rawset(_G, "vim", nil) end)
  return state
end

describe("the luv driver", function()
  after_each(function()
    H.done()                  -- closes the buses (and so their handles)
    uv.walk(function(h) if not h:is_closing() then h:close() end end)
    uv.run("nowait")
  end)

  it("delivers events published before uv.run() on the loop", function()
    local bus = H.bus{ loop = uv }
    local seen = {}
    bus:subscribe("task.*", function(ev)
      seen[#seen + 1] = ev.type .. " " .. ev.payload.n
      if #seen == 3 then bus:close() end
    end)
    bus:publish("task.start", { n = 1 })
    bus:publish("task.step", { n = 2 })
    bus:publish("task.done", { n = 3 }, { priority = "high" })
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.same({ "task.done 3", "task.start 1", "task.step 2" }, seen)
  end)

  it("counts what it delivers on the loop, as on any host", function()
    local bus = H.bus{ loop = uv }
    local m
    bus:subscribe("task.*", function()
      local d = bus:metrics().subscriptions["task.*"].delivered
      if d == 3 then
        m = bus:metrics()
        bus:close()
      end
    end)
    bus:publish("task.start", { n = 1 })
    bus:publish("task.step", { n = 2 })
    bus:publish("task.done", { n = 3 }, { priority = "high" })
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.equal(3, m.subscriptions["task.*"].delivered)
    assert.are.same({ critical = 0, high = 1, normal = 2, low = 0 },
                    m.published)
  end)

  it("fires a delayed event and retries with backoff on the loop",
     function()
    local bus = H.bus{ loop = uv, on_error = quiet }
    local log, is_ticked, is_paid = {}, false, false
    local function finish()
      if is_ticked and is_paid then bus:close() end
    end
    bus:subscribe("pay.card", function(ev)
      log[#log + 1] = "pay " .. ev.attempt
      if ev.attempt < 3 then error("gateway down") end
      is_paid = true
      finish()
    end, { retry = { max = 3, base = 0.02, jitter = 0 } })
    bus:subscribe("reminder", function(ev)
      assert.are.equal("soon", ev.payload)
      is_ticked = true
      finish()
    end)
    -- From a plain luv callback, once the loop runs: the driver must see
    -- the new deadline itself, as no turn of the bus is under way.
    local t = uv.new_timer()
    t:start(5, 0, function()
      t:close()
      assert.are.same({ true, "delayed" },
                      { bus:publish("reminder", "soon", { delay = 0.02 }) })
      bus:publish("pay.card", { cents = 500 })
    end)
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.same({ "pay 1", "pay 2", "pay 3" }, log)
    assert.is_true(is_ticked)
  end)

  it("fires a delay published before uv.run()", function()
    local bus = H.bus{ loop = uv }
    local got
    bus:subscribe("later", function(ev) got = ev.payload bus:close() end)
    bus:publish("later", 42, { delay = 0.02 })
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.equal(42, got)
  end)

  it("shares one loop with a luv TCP server", function()
    local bus = H.bus{ loop = uv }
    local conns, reply = {}, nil
    local server = uv.new_tcp()
    assert(server:bind("127.0.0.1", 0))
    local port = server:getsockname().port
    -- The server publishes what a client asks; a handler answers it.
    bus:subscribe("ping", function(ev)
      local conn = conns[ev.payload.conn]
      conn:write("pong " .. ev.payload.n .. "\n")
    end)
    assert(server:listen(8, function(err)
      assert(not err, err)
      local conn = uv.new_tcp()
      server:accept(conn)
      conns[#conns + 1] = conn
      local id = #conns
      conn:read_start(function(rerr, data)
        assert(not rerr, rerr)
        if data then
          bus:publish("ping", { conn = id, n = tonumber(data:match("%d+")) })
        else
          conn:close()
        end
      end)
    end))
    local client = uv.new_tcp()
    client:connect("127.0.0.1", port, function(err)
      assert(not err, err)
      client:write("ping 7\n")
      client:read_start(function(rerr, data)
        assert(not rerr, rerr)
        if data then
          reply = data
          client:close()
          server:close()
          bus:close()
        end
      end)
    end)
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.equal("pong 7\n", reply)
  end)

  it("makes at most TURN deliveries per loop iteration", function()
    local bus = H.bus{ loop = uv }
    local total = luv_driver.TURN * 3 + 1
    local iteration, per = 0, {}
    local check = uv.new_check()
    check:start(function() iteration = iteration + 1 end)
    check:unref()
    local n = 0
    bus:subscribe("flood", function()
      n = n + 1
      per[iteration] = (per[iteration] or 0) + 1
      if n == total then bus:close() end
    end)
    for i = 1, total do bus:publish("flood", i) end
    assert.is_true(run_loop(), "uv.run() did not return")
    check:close()
    assert.are.equal(total, n)
    local turns, most = 0, 0
    for _, k in pairs(per) do
      turns = turns + 1
      if k > most then most = k end
    end
    assert.is_true(turns >= 4, "delivered in " .. turns .. " iterations")
    assert.are.equal(luv_driver.TURN, most)
  end)

  it("wakes for a store's commits: a durable consumer reads them",
     function()
    local path = H.tmp_store()
    finally(function() H.remove_store(path) end)
    local bus = H.bus{ loop = uv, store = path }
    local got = {}
    bus:subscribe("order.*", function(ev)
      got[#got + 1] = ev.payload.n
      if #got == 3 then bus:close() end
    end, { durable = "billing" })
    for n = 1, 3 do bus:publish("order.created", { n = n }) end
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.same({ 1, 2, 3 }, got)
  end)

  it("fires a durable window's checkpoints on the host's loop, where "
     .. "they are due like any timer", function()
    local path = H.tmp_store()
    finally(function() H.remove_store(path) end)
    local bus = H.bus{ loop = uv, store = path }
    local sub = bus:route("m.*"):window { count = 100, checkpoint = 0.02 }
      :reduce(buzz.agg.count()):publish("m.stats", { durable = "stats" })
    local engine, checkpoint = sub._engine, sub._engine.checkpoint
    local ticks = 0
    engine.checkpoint = function(self)
      checkpoint(self)
      ticks = ticks + 1
      if ticks == 3 then bus:close() end
    end
    bus:publish("m.x", 1)
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.equal(3, ticks)
    local again = H.bus{ store = path, readonly = true }
    local row = again._core:state_list("window")[1]
    assert.are.equal(1, require("buzz.core").json_decode(row.value).last)
  end)

  it("refuses run() on a bus the loop drives", function()
    local bus = H.bus{ loop = uv }
    assert.has_error(function() bus:run() end,
                     "bus:run() would block the host loop that drives this "
                     .. "bus (buzz.new{ loop = ... }): let the host's loop "
                     .. "run it (uv.run(), Neovim's own), or use "
                     .. "bus:drain()")
    local got
    bus:subscribe("still", function(ev) got = ev.payload end)
    bus:publish("still", "works")
    assert.are.equal(1, bus:drain())   -- driving by hand still works
    assert.are.equal("works", got)
  end)

  it("holds three handles, and close() releases them so uv.run() "
     .. "returns", function()
    assert.are.equal(0, live_handles())
    local bus = buzz.new{ loop = uv }
    assert.are.equal(3, live_handles())
    bus:subscribe("never.run", function() error("delivered") end)
    bus:publish("never.run")
    assert.are.equal(1, bus:close())       -- discarded, as without a loop
    assert.are.equal(0, live_handles())
    assert.is_true(run_loop(), "uv.run() did not return")
  end)

  it("lets a script close the bus outside uv.run() and exit cleanly",
     function()
    -- luv 1.44 crashes at exit on a handle closed and never called back;
    -- close() completes its handles' close when the loop is not running.
    local ok, out, status = H.run([[
      local uv = require "luv"
      local bus = require("buzz").new{ loop = uv }
      local n = 0
      bus:subscribe("a", function() n = n + 1 uv.stop() end)
      bus:publish("a")
      uv.run()                    -- stopped by the handler, bus open
      bus:close()
      assert(n == 1)
      print("exits")
    ]])
    assert.are.equal(0, status, out)
    assert.is_true(ok)
    assert.matches("exits", out, 1, true)
  end)

  it("keeps the loop alive while the bus is open", function()
    local bus = H.bus{ loop = uv }
    assert.is_false(run_loop(0.05), "uv.run() returned with the bus open")
    bus:close()
    assert.is_true(run_loop(), "uv.run() did not return")
  end)

  it("reports a turn that raises through on_error, and goes on",
     function()
    local errors = {}
    local bus = H.bus{ loop = uv,
                       on_error = function(err) errors[#errors + 1] = err end }
    local n = 0
    bus:subscribe("job", function()
      n = n + 1
      if n == 1 then error("a handler fails") end   -- on_error, as ever
      bus:close()
    end)
    -- A timer callback of the bus's that raises (none of buzz's own
    -- does): luv would end the process on an error in its callback.
    bus._timers:after(0, function() error("a timer blew up") end)
    bus:publish("job")
    bus:publish("job")
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.equal(2, n)
    assert.are.equal(2, #errors)
    local all = table.concat(errors, "\n")
    assert.matches("a handler fails", all, 1, true)
    assert.matches("buzz.luv: a turn of the bus raised: [^\n]*a timer "
                   .. "blew up", all)
  end)

  it("on Neovim's loop runs each turn through vim.schedule, without "
     .. "spinning while it waits", function()
    local nvim = fake_neovim()
    local bus = H.bus{ loop = uv }
    local iterations = 0
    local check = uv.new_check()
    check:start(function() iterations = iterations + 1 end)
    check:unref()
    local total, n, outside = luv_driver.TURN * 2 + 1, 0, 0
    bus:subscribe("edit", function()
      n = n + 1
      if not nvim.in_schedule then outside = outside + 1 end
      if n == total then bus:close() end
    end)
    for i = 1, total do bus:publish("edit", i) end
    assert.is_true(run_loop(), "uv.run() did not return")
    check:close()
    assert.are.equal(total, n)
    assert.are.equal(0, outside)
    assert.is_true(nvim.schedules >= 3, nvim.schedules .. " schedules")
    -- A poll left watching while a turn waits fires on every iteration.
    assert.is_true(iterations < 20 * nvim.schedules,
                   iterations .. " loop iterations for " .. nvim.schedules
                   .. " turns")
  end)

  it("lets a handler await its own luv I/O; others go on meanwhile",
     function()
    local bus = H.bus{ loop = uv }
    local log = {}
    bus:subscribe("file.stat", function(ev)
      log[#log + 1] = "stat " .. ev.payload
      local err, st = buzz.await(function(done)
        uv.fs_stat(ev.payload, done)
      end)
      log[#log + 1] = ("%s: %s"):format(ev.payload,
                                        err and "error" or st.type)
      bus:publish("file.done", ev.payload)   -- inherits the correlation
    end)
    bus:subscribe("file.done", function(ev)
      log[#log + 1] = "done " .. ev.payload .. " cause " ..
                      tostring(ev.causation_id)
      bus:close()
    end)
    bus:subscribe("other", function() log[#log + 1] = "other" end)
    local id = bus:publish("file.stat", "README.md")
    bus:publish("other")
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.same({ "stat README.md", "other", "README.md: file",
                      "done README.md cause " .. id }, { log[1], log[2],
                      log[3], log[4] })
  end)

  it("await: a retry awaits again, a timeout ends a wait that never "
     .. "comes, a start that raises fails the attempt", function()
    local errs = {}
    local bus = H.bus{ loop = uv, on_error = function(e)
      errs[#errs + 1] = tostring(e)
    end }
    local attempts, waits, never = 0, {}, nil
    bus:subscribe("pay", function(ev)
      attempts = attempts + 1
      local n = buzz.await(function(done)
        local t = uv.new_timer()
        t:start(5, 0, function() t:close(); done(ev.attempt) end)
      end)
      waits[#waits + 1] = n
      if n == 1 then error("declined") end
    end, { retry = { max = 3, base = 0.01, jitter = 0 } })
    bus:subscribe("hang", function()
      buzz.await(function(done) never = done end)
    end, { timeout = 0.02 })
    bus:subscribe("bad", function()
      buzz.await(function() error("cannot start") end)
    end)
    bus:subscribe("$DLQ.>", function() end)
    bus:publish("pay")
    bus:publish("hang")
    bus:publish("bad")
    -- close once everything has happened (or after 4 s): a fixed deadline
    -- was too short under AddressSanitizer on a loaded machine
    local t, started = uv.new_timer(), uv.now()
    t:start(10, 10, function()
      local all = table.concat(errs, "\n")
      if (#waits >= 2 and all:find("ETIMEOUT", 1, true)
          and all:find("cannot start", 1, true))
         or uv.now() - started > 4000 then
        t:close(); bus:close()
      end
    end)
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.same({ 1, 2 }, waits)
    assert.are.equal(2, attempts)
    local all = table.concat(errs, "\n")
    assert.matches("ETIMEOUT", all, 1, true)
    assert.matches("cannot start", all, 1, true)
    assert.is_function(never)
    never("late")                           -- dropped: the attempt is over
  end)

  it("await on Neovim's loop resumes the handler through vim.schedule",
     function()
    local nvim = fake_neovim()
    local bus = H.bus{ loop = uv }
    local where = {}
    bus:subscribe("edit", function()
      where[#where + 1] = nvim.in_schedule
      buzz.await(function(done)
        local t = uv.new_timer()
        t:start(2, 0, function() t:close(); done() end)  -- a fast callback
      end)
      where[#where + 1] = nvim.in_schedule
      bus:close()
    end)
    bus:publish("edit")
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.same({ true, true }, where)
  end)

  it("await: done called at once resumes on the next turn; twice counts "
     .. "once; outside a handler it raises", function()
    local bus = H.bus{ loop = uv }
    local got = {}
    bus:subscribe("now", function()
      local a, b = buzz.await(function(done)
        done(1, 2)
        done(3, 4)
      end)
      got[#got + 1] = a + b
      bus:close()
    end)
    bus:publish("now")
    assert.is_true(run_loop(), "uv.run() did not return")
    assert.are.same({ 3 }, got)
    assert.has_error(function() buzz.await(function() end) end,
                     "buzz.await works inside a handler, which the bus "
                     .. "runs in a coroutine; outside one, pass your "
                     .. "callback to the API")
    local ok, err = pcall(function() buzz.await("x") end)
    assert.is_false(ok)
    assert.matches("bad argument to buzz.await: expected a function(done)",
                   err, 1, true)
  end)
end)

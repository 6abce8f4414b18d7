-- bus:saga: steps started by an event, compensated in reverse order when
-- one fails for good, recorded so that a crash resumes them
-- (lua/buzz/saga.lua).
local buzz = require "buzz"

-- A saga of three steps over log: each step and undo notes its name;
-- fail names a step whose run raises.
local function three_steps(log, fail, extra)
  local function step(name)
    return {
      name = name,
      run = function(ctx)
        log[#log + 1] = name
        ctx.data[name] = true
        if fail == name then error(name .. " broke") end
      end,
      undo = function(ctx)
        assert(ctx.data[name], "undo of a step that did not run")
        log[#log + 1] = "undo " .. name
      end,
    }
  end
  local o = { on = "task:start", steps = { step("one"), step("two"),
                                           step("three") },
              id = function(ev) return ev.payload.task_id end }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

describe("bus:saga", function()
  local path
  before_each(function() path = H.tmp_store() end)
  after_each(function()
    H.done()
    H.remove_store(path)
  end)

  it("runs the steps in order and records the saga completed", function()
    local bus = H.bus{ store = path }
    local log, outcomes = {}, {}
    local saga = bus:saga("build", three_steps(log))
    bus:subscribe("$SYS.saga.build", function(ev)
      outcomes[#outcomes + 1] = ev.payload.id .. " " .. ev.payload.status
    end)
    bus:publish("task:start", { task_id = "t1" })
    bus:drain()
    assert.same({ "one", "two", "three" }, log)
    assert.same({ "t1 completed" }, outcomes)
    local rec = saga:get("t1")
    assert.equal("completed", rec.status)
    assert.same({ one = true, two = true, three = true }, rec.data)
    assert.equal("task:start", rec.event.type)
  end)

  it("compensates the completed steps in reverse order when the third "
     .. "fails", function()
    local errs = {}
    local bus = H.bus{ store = path, on_error = function(e)
      errs[#errs + 1] = e
    end }
    local log, outcomes = {}, {}
    local saga = bus:saga("build", three_steps(log, "three",
                                               { retry = { max = 2,
                                                           base = 0 } }))
    bus:subscribe("$SYS.saga.build", function(ev)
      outcomes[#outcomes + 1] = ev.payload.status .. " at "
                                .. tostring(ev.payload.step)
    end)
    bus:publish("task:start", { task_id = "t1" })
    bus:run()
    assert.same({ "one", "two", "three", "three", "undo two", "undo one" },
                log)
    assert.same({ "compensated at three" }, outcomes)
    local rec = saga:get("t1")
    assert.equal("compensated", rec.status)
    assert.equal("three", rec.failed_step)
    assert.matches("three broke", rec.error, 1, true)
    assert.equal(2, #errs)                     -- each failed attempt
    assert.matches("ECALLBACK: saga build t1: step three (attempt 1 of 2)",
                   errs[1], 1, true)
    assert.same({ rec }, saga:list{ status = "compensated" })
    assert.same({}, saga:list{ status = "completed" })
  end)

  it("marks a saga failed when an undo fails for good", function()
    local bus = H.bus{ store = path, on_error = function() end }
    local opts = three_steps({}, "three")
    opts.steps[2].undo = function() error("cannot undo") end
    local saga = bus:saga("build", opts)
    bus:publish("task:start", { task_id = "t1" })
    bus:drain()
    local rec = saga:get("t1")
    assert.equal("failed", rec.status)
    assert.matches("cannot undo", rec.error, 1, true)
    assert.same({ rec }, saga:list{ status = "failed" })
  end)

  it("starts one saga per id, however often its event comes", function()
    local bus = H.bus{ store = path }
    local log = {}
    local saga = bus:saga("build", three_steps(log))
    bus:publish("task:start", { task_id = "t1" })
    bus:publish("task:start", { task_id = "t1" })
    bus:publish("task:start", { task_id = "t2" })
    bus:drain()
    assert.equal(6, #log)
    assert.equal(2, #saga:list())
    bus:close()
    bus = H.bus{ store = path }                -- also after a restart
    log = {}
    bus:saga("build", three_steps(log))
    bus:publish("task:start", { task_id = "t1" })
    bus:drain()
    assert.same({}, log)
  end)

  it("waits for a reply to a request, and a reply that never comes fails "
     .. "the step", function()
    local clock = buzz.manual_clock(1000)
    local bus = H.bus{ store = path, clock = clock,
                       on_error = function() end }
    bus:subscribe("agent:run", function(ev)
      if ev.payload.task ~= "silent" then
        bus:publish("agent:complete", { status = "ok", task = ev.payload.task })
      end
    end)
    bus:publish("agent:complete", { status = "stray" })   -- not the saga's
    local undone = {}
    local saga = bus:saga("orchestrate", {
      on = "task:start", id = function(ev) return ev.payload.task end,
      timeout = 5,
      steps = {
        { name = "prepare", run = function() end,
          undo = function(ctx) undone[#undone + 1] = ctx.id end },
        { name = "agent", run = function(ctx)
            local reply = ctx:request("agent:run", { task = ctx.id },
                                      { reply = "agent:complete" })
            ctx.data.status = reply.payload.status
          end },
      },
    })
    bus:publish("task:start", { task = "t1" })
    bus:publish("task:start", { task = "silent" })
    bus:drain()
    assert.equal("completed", saga:get("t1").status)
    assert.equal("ok", saga:get("t1").data.status)
    assert.equal("running", saga:get("silent").status)
    clock:advance(6)                           -- past the reply's timeout
    bus:drain()
    local rec = saga:get("silent")
    assert.equal("compensated", rec.status)
    assert.matches("ETIMEOUT: saga orchestrate silent: step agent (attempt "
                   .. "1 of 1): no agent:complete reply to agent:run within "
                   .. "5 s", rec.error, 1, true)
    assert.same({ "silent" }, undone)
  end)

  it("fails the step when its request cannot be published", function()
    local bus = H.bus{ queue_limit = 1, on_error = function() end }
    bus:subscribe("filler", function() end)        -- (queued: they have
    bus:subscribe("work", function() end)          -- an audience)
    local saga = bus:saga("s", {
      on = "go",
      steps = { { name = "ask", run = function(ctx)
        assert(bus:publish("filler", {}))           -- the queue is full now
        ctx:request("work", {}, { reply = "done" })
      end } } })
    bus:publish("go", {})
    bus:drain()
    local rec = saga:list()[1]
    assert.equal("compensated", rec.status)
    assert.matches("^EFULL: saga s 1: step ask %(attempt 1 of 1%): queue is "
                   .. "full", rec.error)
  end)

  it("resumes a saga SIGKILLed between steps, and completes it", function()
    local marks = os.tmpname()
    local child = ([[
      local buzz = require "buzz"
      local bus = assert(buzz.new{ store = %q })
      local function mark(s)
        local f = assert(io.open(%q, "a")) f:write(s, "\n") f:close()
      end
      bus:saga("build", {
        on = "task:start",
        steps = {
          { name = "one", run = function() mark("one") end },
          { name = "two", run = function(ctx)
              ctx.bus:flush()            -- step one's record is committed
              local pid = io.open("/proc/self/stat"):read("*n")
              os.execute("kill -9 " .. pid)
            end },
          { name = "three", run = function() mark("three") end },
        } })
      bus:publish("task:start", {})
      bus:drain()
      mark("not killed")
    ]]):format(path, marks)
    local ok = H.run(child)
    assert.is_false(ok)
    assert.equal("one\n", H.slurp(marks))
    local bus = H.bus{ store = path }
    local log = {}
    local saga = bus:saga("build", {
      on = "task:start",
      steps = {
        { name = "one", run = function() log[#log + 1] = "one" end },
        { name = "two", run = function() log[#log + 1] = "two" end },
        { name = "three", run = function() log[#log + 1] = "three" end },
      } })
    assert.equal("running", saga:list()[1].status)
    bus:drain()
    assert.same({ "two", "three" }, log)   -- from the step it was at
    assert.equal("completed", saga:list()[1].status)
    os.remove(marks)
  end)

  it("works on a memory bus, without a record across restarts", function()
    local bus = H.bus{ on_error = function() end }
    local log = {}
    local saga = bus:saga("build", three_steps(log, "two"))
    bus:publish("task:start", { task_id = "t1" })
    bus:drain()
    assert.same({ "one", "two", "undo one" }, log)
    assert.equal("compensated", saga:get("t1").status)
    saga:close()
    saga:close()
    bus:publish("task:start", { task_id = "t9" })
    bus:drain()
    assert.equal(3, #log)
  end)

  it("raises on misuse, naming the fix", function()
    local bus = H.bus()
    assert.has_error(function() bus:saga("a b", three_steps({})) end,
      "bad name to saga: expected letters, digits, _ or - (it names "
      .. "$SYS.saga.NAME)")
    assert.has_error(function() bus:saga("s") end,
      'bad options to saga: expected a table with on = "pattern" and '
      .. "steps = { { run = fn, undo = fn }, ... }")
    assert.has_error(function() bus:saga("s", { steps = {} }) end,
      'saga needs on = "pattern": the event that starts one')
    assert.has_error(function() bus:saga("s", { on = "a", steps = {} }) end,
      "saga needs steps = { { run = fn, undo = fn }, ... } (one at least)")
    assert.has_error(function()
      bus:saga("s", { on = "a", steps = { { undo = print } } })
    end, "saga step 1 needs run = function(ctx)")
    assert.has_error(function()
      bus:saga("s", { on = "a", steps = { { run = print, redo = print } } })
    end, 'unknown option "redo" to saga step 1 (known options: name, '
         .. "retry, run, timeout, undo)")
    assert.has_error(function()
      bus:saga("s", { on = "a", steps = { { run = print } }, retry = 0 })
    end)
    local s = bus:saga("s", { on = "a", steps = { { run = print } } })
    assert.has_error(function()
      bus:saga("s", { on = "a", steps = { { run = print } } })
    end, 'saga "s" exists already on this bus')
    assert.has_error(function() s.get("x") end,
      "use saga:get(...), not saga.get(...)")
  end)
end)

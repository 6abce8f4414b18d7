--- Running deliveries: the one place handlers are started.
--
-- The core decides what is due and in which order; this module pulls it
-- (core:take fills two reused arrays with subscription objects and event
-- tables) and runs each handler in a pooled coroutine, resumed through
-- core:resume so that the event is the current one while it runs
-- (publishes inside inherit its correlation id and take its id as their
-- causation id). A handler that returns leaves its coroutine idle and
-- back in the pool, with no yield; one that yields (buzz.sleep, a host's
-- I/O) is handed to the supervisor (Supervisor:adopt), which owns the
-- coroutine from then on; one that raises goes to the reporter, and the
-- other deliveries go on. The core never calls a handler.
--
-- Also here: "is a handler running?" (depth, counted by every resume made
-- here, the supervisor's included), stop(), and what a take handed out
-- but a stop() left unrun (run first by the next drive).
--
-- Not here: failure policy (lua/buzz/failure.lua), timers, the hot path of
-- publish_sync on a memory bus (lua/buzz/hot.lua).
-- @module buzz.task
local core = require "buzz.core"

local rawget, type, pcall = rawget, type, pcall
local co_lib = coroutine
-- The raw coroutine functions: inside OpenResty coroutine.* serve the
-- threads nginx schedules.
local create = rawget(co_lib, "_create") or co_lib.create
local co_resume = rawget(co_lib, "_resume") or co_lib.resume
local close = co_lib.close             -- nil before Lua 5.4
local traceback = core.traceback

local M = {}

local BATCH = 64        -- deliveries one take hands out at most
local POOL_MAX = 64     -- idle coroutines kept per bus

--- The running state of one bus.
---@param bus table
---@return table
function M.new(bus)
  return {
    bus = bus,
    pool = {}, npool = 0,   -- idle workers, pool[1..npool]
    depth = 0,              -- resumes under way (> 0: inside a handler)
    is_stopped = false,
    runs = 0,               -- deliveries made, however they started
    limit = false,          -- step(max): runs at which work stops
    subs = {}, evs = {},    -- the queue's batch: [pos..last] not run yet
    pos = 1, last = 0, is_durable = false,
    psubs = {}, pevs = {},  -- a preempting take's (one delivery)
    levels = {},            -- publish_sync level -> { subs, evs }
  }
end

-- An idle thread for the pool: run to its end, so core:resume can start
-- a handler in it, and again once that handler returned.
local function noop() end

local function new_thread()
  local co = create(noop)
  co_resume(co)
  return co
end

-- An idle thread from the pool, or a new one.
local function idle(t)
  local k = t.npool
  if k == 0 then return new_thread() end
  t.npool = k - 1
  return t.pool[k]
end

local function message(what)
  return type(what) == "string" and what or "(error object is not a string)"
end

-- The handler in co yielded (ok: it is the supervisor's now) or raised
-- (what).
local function settle(t, co, sub, ev, ok, what, arg)
  local bus = t.bus
  if ok then
    local fine, err = pcall(bus._sup.adopt, bus._sup, co, sub, ev, what, arg)
    if fine then return end
    what = err
  end
  bus._report(what, ev, sub, traceback(co, message(what), 0))
  if close then close(co) end
end

--- Runs sub's handler with ev, unless sub ended since the take.
---@return nil
local function run(t, c, sub, ev)
  if not sub.is_active then return end
  if sub._once then sub.is_active = false end   -- the core ended it
  local co = idle(t)
  t.runs = t.runs + 1
  t.depth = t.depth + 1
  local ok, done, what, arg = c:resume(co, ev, sub._fn, ev)
  t.depth = t.depth - 1
  if done and ok then                  -- it returned: co is idle again
    local k = t.npool + 1
    if k <= POOL_MAX then t.pool[k], t.npool = co, k end
    return
  end
  if ok then
    settle(t, co, sub, ev, true, what, arg)
  else
    settle(t, co, sub, ev, false, done)
  end
end
M.run = run

--- Resumes co (a supervised job's thread) while ev is the current event,
--- counting as a running handler. Returns as coroutine.resume does.
--- With co idle (task.idle) and a function first, starts it: see
--- core:resume (true, true when it returned).
function M.resume(t, c, co, ev, ...)
  t.depth = t.depth + 1
  local ok, a, b, d = c:resume(co, ev, ...)
  t.depth = t.depth - 1
  return ok, a, b, d
end

M.idle = idle

--- Gives an idle thread (one that ran to its end) back to the pool.
function M.give(t, co)
  local k = t.npool + 1
  if k <= POOL_MAX then t.pool[k], t.npool = co, k end
end

-- Reports what core:take could not hand out.
local function report_errs(bus, errs)
  for i = 1, #errs, 3 do
    bus._report(errs[i], errs[i + 1] or nil, errs[i + 2] or nil)
  end
end

local PRIO = { critical = 0, high = 1, normal = 2, low = 3 }

-- Makes at most max deliveries of events more urgent than the priority
-- below, one take at a time (a stop() leaves nothing taken behind);
-- returns how many.
local function preempt(t, below, max)
  local bus, n, subs, evs = t.bus, 0, t.psubs, t.pevs
  while n < max do
    local c = bus._core
    if not c or t.is_stopped then break end
    local m, errs = c:take(1, subs, evs, 0, below)
    if errs then report_errs(bus, errs) end
    if m == 0 then break end
    local sub, ev = subs[1], evs[1]
    subs[1], evs[1] = nil, nil
    n = n + 1
    run(t, c, sub, ev)
  end
  return n
end

--- Makes at most max deliveries from the queue (and durable consumers'
--- pages), never waiting; returns how many. Stops early on stop() or
--- when a handler closes the bus.
---@param max integer
---@return integer
function M.drive(t, max)
  local bus, n = t.bus, 0
  local c = bus._core
  if not c or t.is_stopped then return 0 end
  -- The batch loop keeps what it reads per delivery in locals: the core's
  -- resume, one idle thread (a handler that returns leaves it idle for
  -- the next one), and the depth (a handler runs all through the batch
  -- but for the reporter, which may drive the bus).
  local subs, evs, resume, d = t.subs, t.evs, c.resume, t.depth
  local co = idle(t)
  while n < max and not t.is_stopped do
    local pos, last = t.pos, t.last
    if pos > last then
      local want = max - n
      local m, errs, is_durable = c:take(want < BATCH and want or BATCH,
                                         subs, evs)
      if errs then report_errs(bus, errs) end
      if m == 0 or t.is_stopped then break end
      pos, last = 1, m
      t.last, t.is_durable = m, is_durable or false
    end
    local is_durable = t.is_durable
    t.depth = d + 1
    while pos <= last and n < max do
      local sub, ev = subs[pos], evs[pos]
      pos = pos + 1
      n = n + 1
      if sub.is_active then
        if sub._once then sub.is_active = false end  -- the core ended it
        local ok, done, what, arg = resume(c, co, ev, sub._fn, ev)
        if not (done and ok) then      -- it yielded or raised
          t.depth = d
          if ok then
            settle(t, co, sub, ev, true, what, arg)
          else
            settle(t, co, sub, ev, false, done)
          end
          t.depth = d + 1
          co = idle(t)
        end
      end
      if is_durable and bus._core then
        local id = sub._id             -- nil: it ended meanwhile
        if id then c:ack(id, sub, ev.id) end
      end
      if t.is_stopped then break end   -- stop(), or the bus closed
      local p = subs.preempt           -- a handler queued a more urgent
      if p and evs[pos] ~= ev then     -- event than the batch's last (it
        subs.preempt = nil             -- comes after the current event)
        local below = pos <= last and PRIO[evs[pos].priority]
        if below and p < below and n < max then
          t.depth, t.pos = d, pos
          local m = preempt(t, below, max - n)
          n, t.runs = n + m, t.runs - m  -- run() counted them: drive adds n
          t.depth = d + 1
          if t.is_stopped then break end
        end
      end
    end
    t.depth = d
    t.pos = pos
    if pos > last then                 -- let the tables run go (GC)
      for i = 1, last do subs[i], evs[i] = nil, nil end
      t.last = 0
    end
  end
  local k = t.npool + 1
  if k <= POOL_MAX then t.pool[k], t.npool = co, k end
  t.runs = t.runs + n
  return n
end

--- Runs the deliveries of a publish_sync level (core:publish_sync's
--- second result) until the core closes it.
function M.run_level(t, c, level)
  local arr = t.levels[level]
  if not arr then
    arr = { {}, {} }
    t.levels[level] = arr
  end
  local subs, evs, bus = arr[1], arr[2], t.bus
  while true do
    local m = c:take(BATCH, subs, evs, level)
    if m == 0 then return end          -- that take closed the level
    for i = 1, m do
      local sub, ev = subs[i], evs[i]
      subs[i], evs[i] = nil, nil
      run(t, c, sub, ev)
      if not bus._core then return end
    end
    c = bus._core
  end
end

--- Deliveries a take handed out that have not run (a stop() came).
function M.held(t)
  return t.last - t.pos + 1
end

--- A delivery a timer or the supervisor's queue started (a retry, a job
--- that waited for its lane): it counts toward step(max).
function M.started(t)
  t.runs = t.runs + 1
end

--- Has step(max) made its deliveries? Then timers and queued jobs wait.
function M.is_spent(t)
  local limit = t.limit
  return limit and t.runs >= limit or false
end

--- The bus closed: what a take handed out and nothing ran is dropped,
--- and a drive under way stops.
function M.close(t)
  t.pos, t.last = 1, 0
  t.is_stopped = true
end

return M

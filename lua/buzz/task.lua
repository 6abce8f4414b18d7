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

local rawget, type, pcall, setmetatable = rawget, type, pcall, setmetatable
local co_lib = coroutine
-- The raw coroutine functions: inside OpenResty coroutine.* serve the
-- threads nginx schedules.
local create = rawget(co_lib, "_create") or co_lib.create
local yield = rawget(co_lib, "_yield") or co_lib.yield
local close = co_lib.close             -- nil before Lua 5.4
local traceback = core.traceback

local M = {}

local BATCH = 64        -- deliveries one take hands out at most
local POOL_MAX = 64     -- idle coroutines kept per bus

-- What a worker yields when its handler returned.
local DONE = setmetatable({}, { __tostring = function() return "done" end })
M.DONE = DONE

--- The running state of one bus.
---@param bus table
---@return table
function M.new(bus)
  return {
    bus = bus,
    pool = {}, npool = 0,   -- idle workers, pool[1..npool]
    states = setmetatable({}, { __mode = "k" }),  -- worker -> its state
    depth = 0,              -- resumes under way (> 0: inside a handler)
    is_stopped = false,
    subs = {}, evs = {},    -- the queue's batch: [pos..last] not run yet
    pos = 1, last = 0, is_durable = false,
    psubs = {}, pevs = {},  -- a preempting take's (one delivery)
    levels = {},            -- publish_sync level -> { subs, evs }
  }
end

-- A worker: runs a handler with its event, yields DONE, and is given the
-- next. One whose handler yielded is the supervisor's from then on: when
-- that handler returns, the worker ends (st.adopted).
local function new_worker(t)
  local st = { adopted = false, body = false }
  local function body(fn, ev)
    while true do
      fn(ev)
      if st.adopted then return end
      fn, ev = nil, nil  -- luacheck: ignore 311 (an idle worker holds no event)
      fn, ev = yield(DONE)
    end
  end
  st.body = body                       -- where its tracebacks stop
  local co = create(body)
  t.states[co] = st
  return co
end

local function message(what)
  return type(what) == "string" and what or "(error object is not a string)"
end

-- The worker co did not come back DONE: its handler yielded (ok) or
-- raised (what).
local function settle(t, co, sub, ev, ok, what, arg)
  local bus, st = t.bus, t.states[co]
  t.states[co] = nil
  if ok then                           -- it yielded: the supervisor's now
    st.adopted = true
    local fine, err = pcall(bus._sup.adopt, bus._sup, co, sub, ev, what, arg)
    if fine then return end
    what = err
  end
  bus._report(what, ev, sub, traceback(co, message(what), 0, st.body))
  if close then close(co) end
end

--- Runs sub's handler with ev, unless sub ended since the take.
---@return nil
local function run(t, c, sub, ev)
  if not sub.is_active then return end
  if sub._once then sub.is_active = false end   -- the core ended it
  local k, co = t.npool
  if k > 0 then
    co, t.npool = t.pool[k], k - 1
  else
    co = new_worker(t)
  end
  t.depth = t.depth + 1
  local ok, what, arg = c:resume(co, ev, sub._fn, ev)
  t.depth = t.depth - 1
  if what == DONE and ok then
    k = t.npool + 1
    if k <= POOL_MAX then t.pool[k], t.npool = co, k end
    return
  end
  settle(t, co, sub, ev, ok, what, arg)
end
M.run = run

--- Resumes co (a supervised job's thread) while ev is the current event,
--- counting as a running handler. Returns as coroutine.resume does.
function M.resume(t, c, co, ev, ...)
  t.depth = t.depth + 1
  local ok, what, arg = c:resume(co, ev, ...)
  t.depth = t.depth - 1
  return ok, what, arg
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
  local subs, evs = t.subs, t.evs
  while n < max do
    local c = bus._core
    if not c or t.is_stopped then break end
    local pos, last = t.pos, t.last
    if pos > last then
      local want = max - n
      local m, errs, is_durable = c:take(want < BATCH and want or BATCH,
                                         subs, evs)
      if errs then report_errs(bus, errs) end
      if m == 0 then break end
      pos, last = 1, m
      t.last, t.is_durable = m, is_durable or false
    end
    local is_durable = t.is_durable
    while pos <= last and n < max do
      local sub, ev = subs[pos], evs[pos]
      pos = pos + 1
      n = n + 1
      run(t, c, sub, ev)
      if is_durable then
        c = bus._core
        local id = sub._id             -- nil: it ended meanwhile
        if c and id then c:ack(id, sub, ev.id) end
      end
      if t.is_stopped or not bus._core then break end
      local p = subs.preempt           -- a handler queued a more urgent
      if p and evs[pos] ~= ev then     -- event than the batch's last (it
        subs.preempt = nil             -- comes after the current event)
        local below = pos <= last and PRIO[evs[pos].priority]
        if below and p < below and n < max then
          t.pos = pos
          n = n + preempt(t, below, max - n)
          if t.is_stopped or not bus._core then break end
        end
      end
    end
    t.pos = pos
    if pos > last then                 -- let the tables run go (GC)
      for i = 1, last do subs[i], evs[i] = nil, nil end
      t.last = 0
    end
  end
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

--- The bus closed: what a take handed out and nothing ran is dropped.
function M.close(t)
  t.pos, t.last = 1, 0
end

return M

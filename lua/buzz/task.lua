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
-- Also here: "is a handler running?" (in_handler: depth, counted by every
-- resume made here, the supervisor's included, and hot.lua's publish_sync
-- levels), stop(), and what a take handed out
-- but a stop() left unrun (run first by the next drive). A durable page
-- is upcast here before it runs (the core calls no upcaster), and the
-- store failures the core kept are reported at each drive and at close.
--
-- Not here: failure policy (lua/buzz/failure.lua), timers, the hot path of
-- publish_sync on a memory bus (lua/buzz/hot.lua).
-- @module buzz.task
local core = require "buzz.core"
local metrics = require "buzz.metrics"
local store = require "buzz.store"
local upcast, failures = store.upcast, store.failures

local rawget, type, pcall, setmetatable = rawget, type, pcall, setmetatable
local co_lib = coroutine
-- The raw coroutine functions: inside OpenResty coroutine.* serve the
-- threads nginx schedules.
local create = rawget(co_lib, "_create") or co_lib.create
local co_resume = rawget(co_lib, "_resume") or co_lib.resume
local co_yield = rawget(co_lib, "_yield") or co_lib.yield
local close = co_lib.close             -- nil before Lua 5.4
local traceback = core.traceback
local SAMPLE, hist_age, hist_since = metrics.SAMPLE, metrics.hist_age,
                                     metrics.hist_since

local M = {}

--- The raw coroutine functions, for hot.lua's workers too.
M.create, M.co_resume, M.co_yield = create, co_resume, co_yield

local BATCH = 64        -- deliveries one take hands out at most
local POOL_MAX = 64     -- idle coroutines kept per bus

--- The running state of one bus.
---@param bus table
---@return table
function M.new(bus)
  local t = {
    bus = bus,
    pool = {}, npool = 0,   -- idle workers, pool[1..npool]
    depth = 0,              -- resumes under way here (in_handler)
    is_stopped = false,
    runs = 0,               -- deliveries made, however they started
    limit = false,          -- step(max): runs at which work stops
    deferred = false,       -- the supervisor kept jobs for the next drive
    subs = {}, evs = {},    -- the queue's batch: [pos..last] not run yet
    pos = 1, last = 0, is_durable = false,
    skip = false,           -- durable batch: index -> true, upcast failed
    psubs = {}, pevs = {},  -- a preempting take's (one delivery)
    extra = 0,              -- preempting deliveries a batch made
    states = setmetatable({}, { __mode = "k" }),  -- thread -> run_batch's
    hold = false, slot = 0,  -- hold[slot]: the current event (the core's);
    dslot = 0,              -- hold[dslot]: hot.lua's publish_sync levels
    fslot = 0,              -- hold[fslot]: store failures to report
    levels = {},            -- publish_sync level -> { subs, evs }
  }
  t.hold, t.slot, t.dslot, t.fslot = bus._core:holder()
  return t
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
-- (what); its traceback stops before stop (the function co started in,
-- when that is not the handler).
local function settle(t, co, sub, ev, ok, what, arg, stop)
  local bus = t.bus
  if ok then
    local fine, err = pcall(bus._sup.adopt, bus._sup, co, sub, ev, what, arg)
    if fine then return end
    what = err
  end
  bus._report(what, ev, sub, traceback(co, message(what), 0, stop))
  if close then close(co) end
end

--- Runs sub's handler with ev, unless sub ended since the take. It does
--- not count toward step(max): a preempting delivery is counted by its
--- caller, and a publish_sync's are part of the delivery that made them.
---@return nil
local function run(t, c, sub, ev)
  if not sub.is_active then return end
  if sub._once then sub.is_active = false end   -- the core ended it
  local co = idle(t)
  local m = sub._m                     -- counted (lua/buzz/metrics.lua)
  local t0
  if m then
    local n = m[1] + 1
    m[1] = n
    if n % SAMPLE == 1 then            -- timed
      local mc = t.bus._manual
      t0 = hist_age(m.latency, ev.ts, mc and mc.ms)
    end
  end
  t.depth = t.depth + 1
  local ok, done, what, arg = c:resume(co, ev, sub._fn, ev)
  t.depth = t.depth - 1
  if done and ok then                  -- it returned: co is idle again
    if t0 then hist_since(m.duration, t0) end
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

-- Upcasts a durable page (evs[1..m], subs[i] the consumer of evs[i]) with
-- the bus's upcasters: an event an upcaster raises on is reported and
-- skipped (acked unrun). Returns the skipped indexes, or false.
local function upcast_page(bus, subs, evs, m)
  local skip, from = false, 1
  while from <= m do
    local i, err = upcast(bus._upcast, evs, m, from)
    if not i then break end
    skip = skip or {}
    skip[i] = true
    bus._report(err, nil, subs[i])
    from = i + 1
  end
  return skip
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
    n, t.runs = n + 1, t.runs + 1      -- step's, as the batch's are
    run(t, c, sub, ev)
  end
  return n
end

-- Runs the batch's deliveries t.pos..upto in the thread drive started it
-- in (an idle thread of the pool): each handler is called right here,
-- its event current meanwhile (hold[slot], which publish inherits from),
-- so a batch costs one resume, not one per delivery. t.pos moves past
-- each delivery before its handler runs. Returns when done, on stop() or
-- close(), or, in a thread the supervisor adopted because a handler
-- yielded (st.adopted), as soon as that handler returns: drive runs the
-- rest elsewhere. Events that preempt the rest (subs.preempt) run in
-- their own threads (run) and count in t.extra.
local function run_batch(t, upto, st)
  local subs, evs, hold, slot, bus = t.subs, t.evs, t.hold, t.slot, t.bus
  local is_durable, pos, skip = t.is_durable, t.pos, t.skip
  while pos <= upto do
    local sub, ev = subs[pos], evs[pos]
    pos = pos + 1
    t.pos = pos
    if sub.is_active and not (skip and skip[pos - 1]) then
      if sub._once then sub.is_active = false end   -- the core ended it
      hold[slot] = ev
      local m = sub._m                 -- counted (lua/buzz/metrics.lua)
      if not m then                    -- (a core without metrics)
        sub._fn(ev)
      else
        local n = m[1] + 1
        m[1] = n
        if n % SAMPLE ~= 1 then
          sub._fn(ev)
        else                             -- timed
          local mc = bus._manual
          local t0 = hist_age(m.latency, ev.ts, mc and mc.ms)
          sub._fn(ev)
          if not st.adopted then hist_since(m.duration, t0) end
        end
      end
      if st.adopted then return end
    end
    if is_durable then
      local c, id = bus._core, sub._id  -- id nil: it ended meanwhile
      if c and id then c:ack(id, sub, ev.id) end
    end
    if t.is_stopped then return end    -- stop(), or the bus closed
    local p = subs.preempt             -- a handler queued a more urgent
    if p and evs[pos] ~= ev then       -- event than the batch's last (it
      subs.preempt = nil               -- comes after the current event)
      local below = pos <= t.last and PRIO[evs[pos].priority]
      if below and p < below and pos <= upto then
        local m = preempt(t, below, upto - pos + 1)
        upto, t.extra = upto - m, t.extra + m
        if t.is_stopped then return end
      end
    end
  end
end

-- The state of a thread running run_batch: adopted once the supervisor
-- took it over (made on the thread's first batch).
local function batch_state(t, co)
  local st = { adopted = false }
  t.states[co] = st
  return st
end

--- Makes at most max deliveries from the queue (and durable consumers'
--- pages), never waiting; returns how many. Stops early on stop() or
--- when a handler closes the bus.
---@param max integer
---@return integer
function M.drive(t, max)
  local bus, n = t.bus, 0
  if t.hold[t.fslot] then failures(t) end
  local c = bus._core
  if not c or t.is_stopped then return 0 end
  local subs, evs, states, d = t.subs, t.evs, t.states, t.depth
  while n < max and not t.is_stopped do
    local pos, last = t.pos, t.last
    if pos > last then
      local want = max - n
      local m, errs, is_durable = c:take(want < BATCH and want or BATCH,
                                         subs, evs)
      if errs then report_errs(bus, errs) end
      if m == 0 or t.is_stopped then break end
      pos, last = 1, m
      t.pos, t.last, t.is_durable = 1, m, is_durable or false
      t.skip = is_durable and bus._upcast and upcast_page(bus, subs, evs, m)
    end
    local upto = pos + (max - n) - 1
    if upto > last then upto = last end
    local k, co = t.npool
    if k > 0 then
      co, t.npool = t.pool[k], k - 1
    else
      co = new_thread()
    end
    local st = states[co] or batch_state(t, co)
    t.extra, t.depth = 0, d + 1       -- handlers run all through the batch
    local ok, done, what, arg = c:resume(co, nil, run_batch, t, upto, st)
    t.depth = d
    local made = t.pos - pos
    n, t.runs = n + made + t.extra, t.runs + made
    if done == true and ok then        -- the batch ran: co is idle again
      k = t.npool + 1
      if k <= POOL_MAX then t.pool[k], t.npool = co, k end
    else                               -- the delivery at t.pos - 1
      states[co] = nil                 -- yielded or raised
      local i = t.pos - 1
      local sub, ev = subs[i], evs[i]
      if ok then
        st.adopted = true
        settle(t, co, sub, ev, true, what, arg, run_batch)
      else
        settle(t, co, sub, ev, false, done, nil, run_batch)
      end
      local cc = bus._core
      if t.is_durable and cc and sub._id then cc:ack(sub._id, sub, ev.id) end
    end
    c = bus._core
    if not c then break end
    if t.pos > t.last then             -- let the tables run go (GC)
      for i = 1, t.last do subs[i], evs[i] = nil, nil end
      t.pos, t.last = 1, 0
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

--- Is one of the bus's handlers running? A resume made here is under
--- way (depth), or a publish_sync level of hot.lua's (hold[dslot]).
function M.in_handler(t)
  return t.depth > 0 or t.hold[t.dslot] > 0
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
  failures(t)                          -- the last ones the core kept
  t.last = t.pos - 1                   -- (a drive under way counts by pos)
  t.is_stopped = true
end

return M

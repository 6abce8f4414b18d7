--- Failure handling for a bus: retries with backoff and jitter, dead
-- letters, per-key ordering, circuit breakers, timeouts, concurrency,
-- buzz.sleep and delayed events.
--
-- A subscription with any of retry, ordered, breaker, timeout or
-- concurrency is "supervised": lua/buzz/task.lua runs a small wrapper
-- instead of the handler. A delivery that passes its gates at once runs
-- inline in the task's thread, under xpcall, and becomes a job (a table)
-- only if it fails or yields. Everything else (retries, queued and
-- redriven deliveries) is a job run in an idle thread of the bus's one
-- pool (task.lua); core:resume makes the job's event the current one, so
-- publishes inside inherit its correlation id whenever the job is
-- resumed. Plain subscriptions never come here, so their hot path is
-- untouched; a plain handler that yields (buzz.sleep) is adopted by the
-- same machinery (Supervisor:adopt, which task.lua calls).
--
-- Tracebacks are taken by core.traceback at the raise and stop at the
-- wrapper's xpcall, so a dead letter shows the handler's frames only.
--
-- A job passes three gates before it runs: its key's lane (ordered), the
-- breaker, then the concurrency limit. A job holds its lane from the
-- moment it is admitted until it succeeds or is dead-lettered, so a key
-- waiting for a retry holds back only its own later events. Follow-on
-- work (the next job of a lane, a job waiting for a slot, jobs a closing
-- breaker releases) goes through a run queue, never by recursion.
--
-- Beside it: lua/buzz/policy.lua checks the options and computes the
-- backoff, lua/buzz/dlq.lua selects, redrives and announces dead letters,
-- lua/buzz/schedule.lua keeps delayed events, and the bus's state rows
-- (lua/buzz/store.lua) hold what outlives a run.
-- @module buzz.failure
local core = require "buzz.core"

local type, error, pairs, ipairs, tostring, pcall, setmetatable =
      type, error, pairs, ipairs, tostring, pcall, setmetatable
local xpcall, select = xpcall, select
local unpack = table.unpack or unpack   -- luacheck: ignore (5.1's global)
local getmetatable, rawget = getmetatable, rawget
-- The core resumes these threads (core:resume, lua_resume), so inside
-- OpenResty, whose coroutine.* serve the threads nginx schedules, the raw
-- functions it keeps as coroutine._* are the ones that fit.
local co_lib = coroutine
local status = rawget(co_lib, "_status") or co_lib.status
local yield = rawget(co_lib, "_yield") or co_lib.yield
local running = co_lib.running
local close = coroutine.close         -- nil before Lua 5.4
local core_traceback = core.traceback  -- debug.traceback, minus 30 us
local floor, max = math.floor, math.max
local sort = table.sort
local storable = require "buzz.storable"
local policies = require "buzz.policy"
local dlq = require "buzz.dlq"
local schedule = require "buzz.schedule"
local event_of = dlq.event_of
local backoff = policies.backoff

local M = {}

local Supervisor = {}
Supervisor.__index = Supervisor

local Runner = {}
Runner.__index = Runner

-- What a handler yields to sleep: SLEEP, milliseconds.
local SLEEP = setmetatable({}, { __tostring = function() return "sleep" end })

-- Error objects handlers raise to steer their retries.
local Fatal = { __name = "buzz.fatal" }
Fatal.__index = Fatal
function Fatal:__tostring() return tostring(self.err) end

local RetryAfter = { __name = "buzz.retry_after" }
RetryAfter.__index = RetryAfter
function RetryAfter:__tostring() return tostring(self.err) end

storable.wrapper(Fatal)           -- described by what they carry
storable.wrapper(RetryAfter)



-- ------------------------------------------------------------ helpers

local util = require "buzz.util"
local errors = require "buzz.errors"
local task = require "buzz.task"
local task_resume, task_started, task_spent = task.resume, task.started,
                                              task.is_spent
local quote = util.quote

local function fifo()
  return { first = 1, last = 0 }
end

local function push(q, v)
  local last = q.last + 1
  q.last, q[last] = last, v
end

local function shift(q)
  local first = q.first
  if first > q.last then return nil end
  local v = q[first]
  q[first], q.first = nil, first + 1
  return v
end

local function size(q)
  return q.last - q.first + 1
end

-- A storable sentence for any error value a handler may raise (NUL and
-- bytes that are not UTF-8 escaped, cut at 64 KiB: lua/buzz/storable.lua).
local readable = storable.describe
M.readable = readable

-- The traceback of a raise, as storable text: its first line holds the
-- first TRACE_MESSAGE bytes of the message (the whole of which is the
-- attempt's error), so a long message does not crowd out the frames.
local TRACE_MESSAGE = 4096

-- The traceback of err, as storable text: of the thread co when given,
-- else of the running one from level, down to stop (core.traceback).
local function trace_of(err, co, level, stop)
  local msg = storable.text(readable(err), TRACE_MESSAGE)
  if co then return storable.text(core_traceback(co, msg)) end
  return storable.text(core_traceback(msg, level, stop))
end

M.copy = dlq.copy

-- The event's own fields as a plain table, for dead letters and stored
-- retries (the delivery's attempt is not part of the event).
local function plain(ev)
  return { id = ev.id, type = ev.type, payload = ev.payload, ts = ev.ts,
           priority = ev.priority, key = ev.key,
           correlation_id = ev.correlation_id,
           causation_id = ev.causation_id, headers = ev.headers,
           version = ev.version }
end

-- The event table a job's handler gets: the shared one for a first
-- delivery, else a copy carrying the attempt (and redrive count).
local function event_for(job)
  if job.attempt == 1 and job.redrives == 0 and job.ev.attempt == 1 then
    return job.ev
  end
  local t = {}
  for k, v in pairs(job.ev) do t[k] = v end
  t.attempt = job.attempt
  if job.redrives > 0 then t.redrives = job.redrives end
  return t
end


-- ------------------------------------------------------------ policies
-- (lua/buzz/policy.lua)

M.retry_policy = policies.retry
M.breaker_policy = policies.breaker
M.backoff = backoff


-- ------------------------------------------------------------ the API

--- Raises an error that ends a delivery's retries at once: the event goes
--- straight to the dead letters. error(buzz.fatal("card declined")).
---@param err any
function M.fatal(err)
  return setmetatable({ err = err }, Fatal)
end

-- seconds (a number >= 0) in whole milliseconds; raises at level.
local function to_ms(seconds, level)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0
     or seconds > util.MAX_SECONDS then
    error(("bad seconds: expected a number >= 0, got %s%s")
          :format(quote(seconds), type(seconds) == "number"
                  and seconds > util.MAX_SECONDS
                  and (" (allowed: up to %g)"):format(util.MAX_SECONDS)
                  or ""), level + 1)
  end
  return floor(seconds * 1000 + 0.5)
end

--- Fails this attempt and asks for the next one after seconds (the
--- subscription's max attempts still applies). Never returns.
---@param seconds number
---@param err any|nil
function M.retry_after(seconds, err)
  local ms = to_ms(seconds, 2)
  error(setmetatable({ ms = ms,
                       err = err or ("retry after %g s"):format(seconds) },
                     RetryAfter), 2)
end

-- What a handler yields to wait for a callback: AWAIT, start.
local AWAIT = setmetatable({}, { __tostring = function() return "await" end })

--- Suspends the handler until a callback API calls back, and returns what
--- it was called with: start(done) begins the operation, and the
--- operation calls done(...). For luv (and Neovim's vim.uv), whose
--- callbacks the host's loop runs:
---   local err, stat = buzz.await(function(done) uv.fs_stat(path, done) end)
--- Other deliveries go on meanwhile; timeout applies; a start that raises
--- fails the attempt. Only inside a handler.
---@param start function
function M.await(start)
  if type(start) ~= "function" then
    error(("bad argument to buzz.await: expected a function(done) that "
           .. "starts the operation, got %s"):format(quote(start)), 2)
  end
  local co, is_main = running()
  if co == nil or is_main then
    error("buzz.await works inside a handler, which the bus runs in a "
          .. "coroutine; outside one, pass your callback to the API", 2)
  end
  return yield(AWAIT, start)
end

--- Suspends the handler for seconds on the bus's clock; other deliveries
--- go on meanwhile. Only inside a handler.
---@param seconds number
function M.sleep(seconds)
  local ms = to_ms(seconds, 2)
  local co, is_main = running()
  if co == nil or is_main then
    error("buzz.sleep works inside a handler, which the bus runs in a "
          .. "coroutine; outside one, use your host's timers", 2)
  end
  yield(SLEEP, ms)
end


-- ------------------------------------------------------------ supervisor

--- The failure machinery of one bus.
---@param bus table the bus (for publishing engine events and reporting)
---@param timers table the bus's timer list
function M.new(bus, timers)
  return setmetatable({
    bus = bus, timers = timers, clock = timers.clock,
    runq = fifo(), is_flushing = false,
    runners = {},        -- name -> the runner of a live sub with retry
                         -- (or a durable one): redrive and orphans find it
    plain = setmetatable({}, { __mode = "k" }),  -- sub -> runner (adopted)
    all = setmetatable({}, { __mode = "k" }),    -- every runner: close()
    -- thread -> the runner of the inline delivery running there, or its
    -- job once it yielded
    by_thread = setmetatable({}, { __mode = "k" }),
    -- A host driver that resumes jobs whose handler yielded nothing (an
    -- operation of the host's own, which the host completes): it sets
    -- this to an object whose park(job) returns true when it takes the
    -- job over, to resume it later with runner:continue(job, ...).
    host = nil,
    is_held = false,     -- set by the host: flush() waits (see there)
    dead = {},           -- dead letters in id order
    next_dead = 1,
    orphans = {},        -- name -> stored retries waiting for their sub
    delays = 0,          -- delayed events waiting
    seq = 0,             -- the last delayed event's row number
    redriven = 0,
  }, Supervisor)
end

function Supervisor:now()
  return self.clock:now_ms()
end

-- The core, or nil once the bus is closed.
function Supervisor:core()
  return self.bus._core or nil
end

-- State rows (retries, dead letters, delayed events, windows, batches)
-- go through the bus (lua/buzz/store.lua): written only with a writable
-- store, a failure reported, never raised.
function Supervisor:put(kind, name, value)
  self.bus:_state_put(kind, name, value)
end

function Supervisor:get(kind, name)
  return self.bus:_state_get(kind, name)
end

function Supervisor:del(kind, name)
  self.bus:_state_del(kind, name)
end

-- Publishes an engine event ($DLQ.<type>, $SYS.breaker); a refusal (a
-- full queue) is reported, never raised.
function Supervisor:announce(etype, payload)
  local c = self:core()
  if not c then return end
  local ok, id, err = pcall(c.publish, c, etype, payload, nil, nil, nil, nil,
                            nil, nil, nil, true, self.clock.ms)
  if not ok or not id then
    self.bus._report((errors.wrap("EINVAL", ("could not publish %s")
                                            :format(etype), ok and err or id)))
  end
end

-- Starts jobs queued by follow-on work, unless a caller up the stack is
-- already doing so. While is_held (a host driver's thread is taken by a
-- job it parked) the rest wait for the next flush.
function Supervisor:flush()
  if self.is_flushing then return end
  self.is_flushing = true
  local q = self.runq
  while true do
    local job = shift(q)
    if job == nil then break end
    if self.is_held or task_spent(self.bus._task) then  -- back to the
      q.first = q.first - 1            -- head of the queue (held by the
      q[q.first] = job                 -- host, or step's budget is spent:
      if not self.is_held then self.bus._task.deferred = true end  -- the
      break                            -- next drive flushes)
    end
    if not job.runner.is_closed then job.runner:gate(job) end
  end
  self.is_flushing = false
end

function Supervisor:enqueue(job)
  push(self.runq, job)
end

--- A runner for a supervised subscription. policy: retry, breaker (both
--- validated), ordered, timeout (ms), concurrency, name.
function Supervisor:runner(sub, handler, policy, level)
  local r = setmetatable({
    sup = self, sub = sub, handler = handler, name = policy.name,
    retry = policy.retry, ordered = policy.ordered,
    timeout = policy.timeout, concurrency = policy.concurrency,
    inflight = 0, waiting = fifo(), held = fifo(), lanes = {},
    retrying = 0, is_closed = false, is_durable = policy.is_durable or false,
  }, Runner)
  -- xpcall's message handler: the traceback is taken where it raised,
  -- down to the handler (buzz's own frames below it are left out).
  r.on_raise = function(e)
    r.trace = trace_of(e, nil, 3, xpcall)
    return e
  end
  self.all[r] = true
  if policy.breaker then
    local b = policy.breaker
    r.breaker = { failures = b.failures, within = b.within,
                  cool_down = b.cool_down, state = "closed", fails = fifo() }
  end
  local other = self.runners[r.name]
  if r.retry and other and not (r.is_durable and other.is_durable
                                and other.sub.durable == sub.durable) then
    error(("a subscription named %q is already subscribed on this bus "
           .. "(retries and dead letters are kept by name): give each "
           .. "one its own name = \"...\"")
          :format(r.name), level + 1)
  end
  if (r.retry or r.is_durable) and not other then
    self.runners[r.name] = r          -- the core refuses a second durable
  end                                 -- consumer of one name, in its words
  return r
end

-- Stored retries of a subscription that is back: each runs at its due
-- time (now, if that has passed).
function Supervisor:adopt_orphans(r)
  local rows = self.orphans[r.name]
  if not (rows and (r.retry or r.is_durable)) then return end
  self.orphans[r.name] = nil
  local now = self:now()
  for _, row in ipairs(rows) do        -- in event id order
    local job = r:job(row.event, row.attempt, row.redrives or 0)
    job.history, job.stored = row.history, row.stored
    -- The key's first row takes its lane; the rest (and the key's new
    -- events) wait behind it, each until its own due time too.
    job.not_before = row.due
    if not r:wait_in_lane(job) then
      job.not_before = nil
      r.retrying = r.retrying + 1
      job.retry_timer = self.timers:at(max(row.due, now), Runner.retry_due,
                                       job)
    end
  end
end

--- A handler yielded inside the core's dispatch (co is the core's thread,
--- ev the event it is handling). A supervised job running inline there
--- goes to sleep in it; a plain handler's delivery becomes a job that
--- takes the thread over.
function Supervisor:adopt(co, sub, ev, what, arg)
  local by = self.by_thread
  local job = by[co]
  if getmetatable(job) == Runner then  -- deliver()'s fast path: make the
    job = job:inline_job(ev)            -- job it did without so far
    by[co] = job
  end
  if job then
    job.co = co
    job.runner:asleep(job, what, arg)
    job.runner:keep(job)
    return
  end
  local r = self:plain_runner(sub)
  job = r:job(ev, ev.attempt or 1, 0)
  job.co, job.evt, job.is_plain = co, ev, true
  r.inflight = r.inflight + 1
  r:asleep(job, what, arg)
  r:keep(job)                          -- a durable consumer's, in the store
  self:flush()
end

--- The runner that takes over a plain subscription's deliveries when they
--- outlive their call (a sleep), made the first time one does.
function Supervisor:plain_runner(sub)
  local r = self.plain[sub]
  if r == nil then
    r = self:runner(sub, sub._inner or sub.handler, {
      name = sub.durable or sub.pattern, is_durable = sub.durable ~= nil,
    }, 1)
    self.plain[sub] = r
  end
  return r
end

--- A plain durable subscription starts: what an earlier run kept of its
--- deliveries (asleep when it stopped) runs again now.
function Supervisor:adopt_plain_orphans(sub)
  if self.orphans[sub.durable] then
    self:adopt_orphans(self:plain_runner(sub))
  end
end

--- Loads stored dead letters, retries and delayed events (bus opening).
function Supervisor:load()
  local bus = self.bus
  for _, row in ipairs(bus:_state_list("dead")) do
    local rec = row.value
    if type(rec) == "table" and rec.id then
      self.dead[#self.dead + 1] = rec
      if rec.id >= self.next_dead then self.next_dead = rec.id + 1 end
    end
  end
  sort(self.dead, function(a, b) return a.id < b.id end)
  for _, row in ipairs(bus:_state_list("retry")) do
    local rec = row.value
    if type(rec) == "table" and rec.subscription and rec.event then
      rec.event, rec.stored = event_of(rec.event), row.name
      local list = self.orphans[rec.subscription] or {}
      list[#list + 1] = rec
      self.orphans[rec.subscription] = list
    end
  end
  if bus._readonly then return end
  for _, row in ipairs(bus:_state_list("delay")) do
    local rec = row.value
    if type(rec) == "table" and rec.type then
      self:schedule_publish(rec, row.name)
    end
  end
end


-- ------------------------------------------------------------ jobs

function Runner:job(ev, attempt, redrives)
  -- The fields every job gets are made here, so the table is sized once;
  -- history and the timers come only with failures, sleeps and timeouts.
  return { runner = self, ev = ev, attempt = attempt, redrives = redrives,
           key = ev.key, evt = false, co = false, is_over = false,
           has_lane = false, is_finished = false }
end

--- The core hands this runner a delivery. One that passes every gate at
--- once (its lane is free, the breaker closed, a slot free) runs inline,
--- in the core's thread of this delivery, and gets a job table only if
--- it fails or yields; others queue as jobs.
function Runner:deliver(ev)
  if self.is_closed then return end
  local key, b, conc = ev.key, self.breaker, self.concurrency
  if not self.ordered then key = nil end
  if self.timeout or (key ~= nil and self.lanes[key])
     or (b and b.state ~= "closed")
     or (conc and self.inflight >= conc) then
    local job = self:job(ev, 1, 0)
    self:admit(job)
    self.sup:flush()
    return self:keep(job)
  end
  if key ~= nil then self.lanes[key] = true end
  self.inflight = self.inflight + 1
  local sup = self.sup
  local co, by = running(), sup.by_thread
  local outer = by[co]
  by[co] = self                       -- adopt() makes the job if it yields
  local ok, err = xpcall(self.handler, self.on_raise, ev)
  local job = by[co]
  by[co] = outer
  if job ~= self then                 -- it slept: adopt() made the job
    if not job.is_over then self:settle(job, ok, err) end
  elseif ok then                      -- the usual case: free_slot() with
    local w = self.waiting            -- nobody waiting, inline
    self.inflight = self.inflight - 1
    if w.first <= w.last then
      self.inflight = self.inflight + 1
      self:free_slot()
    end
    if key ~= nil then self:pass_lane(key) end
  else
    self:settle(self:inline_job(ev), false, err)
  end
  local q = sup.runq
  if q.first <= q.last then sup:flush() end  -- follow-on work only
end

-- The job of a delivery the fast path ran inline (it holds its lane).
function Runner:inline_job(ev)
  local job = self:job(ev, 1, 0)
  job.evt, job.has_lane = ev, self.ordered and ev.key ~= nil
  return job
end

-- Gate 1: the key's lane. lanes[key] is true while a job holds the lane
-- and none waits, else the FIFO of those waiting.
function Runner:admit(job)
  if not self:wait_in_lane(job) then self:gate(job) end
end

-- Queues job behind its key's lane if another job holds it (true), else
-- gives it the lane, or nothing for an unordered runner or no key
-- (false).
function Runner:wait_in_lane(job)
  local k = job.key
  if not self.ordered or k == nil then return false end
  local lanes = self.lanes
  local lane = lanes[k]
  if lane == nil then
    lanes[k] = true
    job.has_lane = true
    return false
  end
  if lane == true then
    lane = fifo()
    lanes[k] = lane
  end
  push(lane, job)
  return true
end

-- Gates 2 and 3: the breaker, then the concurrency limit.
function Runner:gate(job)
  local b = self.breaker
  if b then
    if b.state == "open" or (b.state == "half_open" and b.probe) then
      push(self.held, job)
      return
    end
    if b.state == "half_open" then b.probe = job end
  end
  if self.concurrency and self.inflight >= self.concurrency then
    push(self.waiting, job)
    return
  end
  self:start(job)
end

-- Runs the attempt's handler protected, in whatever thread runs the job,
-- and settles the attempt, unless it timed out while it slept.
function Runner:body(job)
  local ok, err = xpcall(self.handler, self.on_raise, job.evt)
  if not job.is_over then self:settle(job, ok, err) end
end

-- An attempt's handler returned (ok) or raised err, the traceback of which
-- on_raise kept.
function Runner:settle(job, ok, err)
  if ok then return self:succeed(job) end
  local trace = self.trace
  self.trace = nil
  self:fail(job, err, trace)
end

-- Starts an attempt in an idle thread of the bus's pool (lua/buzz/task.lua,
-- the one pool of the bus). A timeout is armed only if the handler
-- yields: one that never does cannot be interrupted.
function Runner:start(job)
  local sup = self.sup
  task_started(sup.bus._task)          -- a delivery: step(max) counts it
  self.inflight = self.inflight + 1
  job.is_over = false
  job.evt = event_for(job)
  if self.timeout then job.deadline = sup:now() + self.timeout end
  local c = sup:core()
  if c == nil then return end
  local t = sup.bus._task
  local co = task.idle(t)
  job.co = co
  local ok, done, what, arg = task_resume(t, c, co, job.evt, Runner.body,
                                          self, job)
  if ok and done then                  -- the body settled the job
    return task.give(t, co)
  end
  if job.is_over or job.co ~= co then return end
  if not ok then
    return self:fail(job, done, trace_of(done, co))
  end
  self:asleep(job, what, arg)
end

-- Resumes the job's thread and takes what it gave: finished (the body
-- settled the attempt), failed, or asleep. A host driver that parked the
-- job (asleep) resumes it here too, with what its operation returned.
function Runner:continue(job, ...)
  local c, co = self.sup:core(), job.co
  if c == nil then return end
  local t = self.sup.bus._task
  local ok, what, arg = task_resume(t, c, co, job.evt, ...)
  if ok and status(co) == "dead" then  -- it ran to its end: idle again
    task.give(t, co)
    if job.is_over or job.co ~= co then return end
    if job.is_plain then self:succeed(job) end
    return
  end
  if job.is_over or job.co ~= co then return end
  if not ok then
    return self:fail(job, what, trace_of(what, co))
  end
  self:asleep(job, what, arg)
end

-- The attempt's handler yielded: what = SLEEP, ms sleeps on the bus's
-- timers; nothing (a host's own operation, such as OpenResty's ngx.sleep
-- or a cosocket) goes to the host driver, if it takes the job over;
-- anything else fails it (nothing here could resume it). Either wait is
-- bounded by the job's timeout.
function Runner:asleep(job, what, ms)
  local sup = self.sup
  local timers, host = sup.timers, sup.host
  if what == SLEEP then
    job.wake_timer = timers:after(ms, Runner.wake, job)
  elseif what == AWAIT then
    if not self:await(job, ms) then return end
  elseif what ~= nil or not (host and host:park(job)) then
    self:fail(job, errors.text("EYIELD", ("handler yielded %s, which buzz "
                                          .. "cannot resume: yield only "
                                          .. "through buzz.sleep or a host "
                                          .. "driver"):format(quote(what))),
              nil)
    return
  end
  if job.deadline and not job.timeout_timer then
    job.timeout_timer = timers:at(job.deadline, Runner.timed_out, job)
  end
end

-- The handler awaits start(done): done resumes it with its arguments,
-- once, unless the attempt is over by then (a timeout). done called
-- before start returns resumes it on the next turn (no recursion); on
-- Neovim (sup.schedule, set by the luv driver) through vim.schedule, so
-- the handler may use vim.api. False when start raised: the attempt
-- failed.
function Runner:await(job, start)
  local sup = self.sup
  local co = job.co                    -- a late call for it is dropped
  local state, early = "starting", nil -- then "waiting", then "done"
  local function resume(n, args)
    if self.is_closed or job.is_over or job.co ~= co then return end
    self:continue(job, unpack(args, 1, n))
    sup:flush()
  end
  local function done(...)
    if state == "done" then return end -- called back twice: once counts
    local n, args = select("#", ...), { ... }
    if state == "starting" then
      state, early = "done", { n, args }
    elseif sup.schedule then
      state = "done"
      sup.schedule(function() resume(n, args) end)
    else
      state = "done"
      resume(n, args)
    end
  end
  local ok, err = xpcall(start, self.on_raise, done)
  if not ok then
    state = "done"
    local trace = self.trace
    self.trace = nil
    self:fail(job, err, trace)
    return false
  end
  if state == "starting" then state = "waiting" end
  if early then
    job.wake_timer = sup.timers:after(0, function()
      job.wake_timer = nil
      resume(early[1], early[2])
    end)
  end
  return true
end

function Runner.wake(job)
  job.wake_timer = nil
  local r = job.runner
  if r.is_closed or job.is_over then return end
  r:continue(job)
  r.sup:flush()
end

function Runner.timed_out(job)
  job.timeout_timer = nil
  local r = job.runner
  if r.is_closed or job.is_over then return end
  r:fail(job, errors.text("ETIMEOUT", ("handler did not finish within %g s")
                                       :format(r.timeout / 1000)), nil)
  r.sup:flush()
end

-- A delivery left its concurrency slot: the first waiting job may go.
function Runner:free_slot()
  local n = self.inflight - 1
  self.inflight = n
  local w = self.waiting
  if w.first <= w.last and (not self.concurrency or n < self.concurrency)
  then
    self.sup:enqueue(shift(w))
  end
end

-- The key's lane passes to its next job, or is free.
function Runner:pass_lane(key)
  local lanes = self.lanes
  local lane = lanes[key]
  local nxt = lane ~= true and shift(lane)
  if nxt then
    nxt.has_lane = true
    local due = nxt.not_before
    nxt.not_before = nil
    if due and due > self.sup:now() then  -- a stored retry, not yet due
      self.retrying = self.retrying + 1
      nxt.retry_timer = self.sup.timers:at(due, Runner.retry_due, nxt)
    else
      self.sup:enqueue(nxt)
    end
  else
    lanes[key] = nil
  end
end

-- One attempt ended: frees its slot and its timers.
function Runner:end_attempt(job)
  job.is_over = true
  if job.timeout_timer then job.timeout_timer:cancel() end
  if job.wake_timer then job.wake_timer:cancel() end
  local co = job.co
  if co and close and status(co) == "suspended" then
    close(co)                         -- timed out asleep: its to-be-closed
  end                                 -- variables run (Lua 5.4)
  job.timeout_timer, job.wake_timer, job.co = nil, nil, false
  job.deadline = nil
  self:free_slot()
end

-- The job is finished for good: its lane passes to the key's next job.
function Runner:release(job)
  job.is_finished = true
  if job.stored then
    self.sup:del("retry", job.stored)
    job.stored = nil
  end
  if job.has_lane then
    job.has_lane = false
    self:pass_lane(job.key)
  end
  if self.on_release then self.on_release(job) end
end

function Runner:succeed(job)
  self:end_attempt(job)
  local b = self.breaker
  if b and b.probe == job then self:close_breaker() end
  self:release(job)
end

function Runner:fail(job, err, trace)
  local sup = self.sup
  self:end_attempt(job)
  local msg = readable(err)
  local h = job.history or {}
  job.history = h
  h[#h + 1] = { attempt = job.attempt, error = msg, traceback = trace,
                at = sup:now() / 1000 }
  sup.bus._report(err, job.evt, self.sub, trace)
  if self.is_closed then return end
  self:breaker_failed(job)
  local p = self.retry
  if p == nil then return self:release(job) end
  if getmetatable(err) == Fatal then return self:bury(job, "fatal") end
  if job.attempt >= p.max then return self:bury(job, "exhausted") end
  local delay = getmetatable(err) == RetryAfter and err.ms
                or backoff(p, job.attempt)
  job.attempt = job.attempt + 1
  local due = sup:now() + delay
  self.retrying = self.retrying + 1
  job.retry_timer = sup.timers:at(due, Runner.retry_due, job)
  if sup.bus._store and not job.ev.batch then self:store(job, due) end
end

-- Writes the job's row (kind "retry"): its next attempt is due at due.
-- Rows are named subscription/event id, the id zero-padded so that they
-- load in publish order (a lane's order, after a restart).
function Runner:store(job, due)
  job.stored = job.stored or ("%s/%016d"):format(self.name, job.ev.id or 0)
  self.sup:put("retry", job.stored, {
    subscription = self.name, attempt = job.attempt, due = due,
    event = plain(job.ev), history = job.history, redrives = job.redrives })
end

--- A job of a durable subscription that outlives its delivery (queued
--- behind its lane, the breaker or the concurrency limit, or asleep) is
--- stored until it ends, as a retry due now: the consumer's position has
--- moved past its event, so the row is what a crash or a close leaves of
--- it, and the subscription's next run picks it up.
function Runner:keep(job)
  if not self.is_durable or job.is_finished or job.stored
     or not self.sup.bus._store then
    return
  end
  self:store(job, self.sup:now())
end

-- A retry comes due. One that holds its lane goes on; one stored by an
-- earlier run must win its lane first.
function Runner.retry_due(job)
  job.retry_timer = nil
  local r = job.runner
  r.retrying = r.retrying - 1
  if r.is_closed then return end
  if job.has_lane then r:gate(job) else r:admit(job) end
  r.sup:flush()
end

-- The last attempt failed: the event becomes a dead letter; a batch (see
-- lua/buzz/batch.lua) becomes one letter per event, so that a redrive
-- feeds its events to the batch again.
function Runner:bury(job, reason)
  local sup = self.sup
  local h = job.history or {}
  local last = h[#h]
  local recs = {}
  for i, ev in ipairs(job.ev.batch or { job.ev }) do
    local rec = {
      id = sup.next_dead, subscription = self.name,
      pattern = self.sub.pattern, reason = reason,
      error = last and last.error, attempts = h, event = plain(ev),
      failed_at = sup:now() / 1000, redrives = ev.redrives or job.redrives,
    }
    sup.next_dead = rec.id + 1
    sup.dead[#sup.dead + 1] = rec
    sup:put("dead", ("%012d"):format(rec.id), rec)
    recs[i] = rec
  end
  self:release(job)
  for _, rec in ipairs(recs) do             -- copies: not the bus's own
    sup:announce("$DLQ." .. rec.event.type, sup:dlq_payload(rec))
  end
end

-- ------------------------------------------------------------ breaker

function Runner:announce_breaker(state)
  local b = self.breaker
  b.state = state
  self.sup:announce("$SYS.breaker", {
    subscription = self.name, pattern = self.sub.pattern, state = state,
    held = size(self.held), at = self.sup:now() / 1000 })
end

function Runner:breaker_failed(job)
  local b = self.breaker
  if not b then return end
  if b.state == "half_open" then
    if b.probe == job then self:open_breaker() end
    return
  end
  if b.state ~= "closed" then return end
  local now, fails = self.sup:now(), b.fails
  push(fails, now)
  while size(fails) > 0 and fails[fails.first] <= now - b.within do
    shift(fails)
  end
  if size(fails) >= b.failures then self:open_breaker() end
end

function Runner:open_breaker()
  local b = self.breaker
  b.probe, b.fails = nil, fifo()
  b.timer = self.sup.timers:after(b.cool_down, Runner.half_open, self)
  self:announce_breaker("open")
end

function Runner.half_open(r)
  local b = r.breaker
  b.timer = nil
  if r.is_closed then return end
  r:announce_breaker("half_open")
  local job = shift(r.held)
  if job then r.sup:enqueue(job) end
  r.sup:flush()
end

function Runner:close_breaker()
  local b = self.breaker
  b.probe = nil
  self:announce_breaker("closed")
  while true do
    local job = shift(self.held)
    if job == nil then break end
    self.sup:enqueue(job)
  end
end

--- The breaker's state: "closed", "open" or "half_open" (nil: none).
function Runner:breaker_state()
  return self.breaker and self.breaker.state
end

--- The subscription ended: nothing of it runs again. Stored retries stay
--- in the store for a subscription of the same name.
function Runner:close()
  if self.is_closed then return end
  self.is_closed = true
  local sup = self.sup
  if sup.runners[self.name] == self then sup.runners[self.name] = nil end
  if self.breaker and self.breaker.timer then self.breaker.timer:cancel() end
end

function Runner:stats()
  return { inflight = self.inflight, waiting = size(self.waiting),
           held = size(self.held), retrying = self.retrying,
           breaker = self:breaker_state() }
end


-- ------------------------------------------------------------ dead letters
-- select, remove, redrive and dlq_payload (lua/buzz/dlq.lua)

dlq.supervisor(Supervisor)


-- ------------------------------------------------------------ delays
-- schedule_publish (lua/buzz/schedule.lua)

schedule.supervisor(Supervisor)

function Supervisor:close()
  for r in pairs(self.all) do r:close() end   -- any order: each only ends
end

--- The subscription sub ended: the runner adopted for its plain handler's
--- sleeps, if any, ends too.
function Supervisor:forget(sub)
  local r = self.plain[sub]
  if r then r:close() end
end

M.SLEEP = SLEEP

return M

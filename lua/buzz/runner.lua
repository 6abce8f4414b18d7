--- buzz.runner: the jobs of a supervised subscription. A Runner is made
-- by the supervisor (failure.lua) for each subscription with retry,
-- ordered, breaker, timeout or concurrency (and for a plain one whose
-- handler slept). It runs a delivery inline when its gates let it, else
-- as a job in an idle thread of the bus's pool (task.lua): the key's
-- lane, the breaker, then the concurrency limit; a job that fails is
-- retried on the bus's timers with its policy's backoff, kept in the
-- store while it waits, and buried as a dead letter when its attempts
-- are spent; one that yields sleeps or awaits (SLEEP, AWAIT) and is
-- resumed; one past its timeout is ended. Follow-on work goes through
-- the supervisor's run queue, never by recursion.
--
-- Also here, for failure.lua and the rest: the error objects handlers
-- raise (Fatal, RetryAfter), what a handler yields (SLEEP, AWAIT), the
-- FIFO queues, and the storable traceback of a raise.
-- @module buzz.runner
local core = require "buzz.core"
local util = require "buzz.util"
local errors = require "buzz.errors"
local task = require "buzz.task"
local storable = require "buzz.storable"
local policies = require "buzz.policy"
local tracing = require "buzz.trace"

local pairs, tostring, setmetatable = pairs, tostring, setmetatable
local xpcall, select = xpcall, select
local unpack = table.unpack or unpack   -- luacheck: ignore (5.1's global)
local getmetatable, rawget = getmetatable, rawget
-- The core resumes these threads (core:resume, lua_resume), so inside
-- OpenResty, whose coroutine.* serve the threads nginx schedules, the raw
-- functions it keeps as coroutine._* are the ones that fit.
local co_lib = coroutine
local status = rawget(co_lib, "_status") or co_lib.status
local running = co_lib.running
local close = coroutine.close         -- nil before Lua 5.4
local core_traceback = core.traceback  -- debug.traceback, minus 30 us
local backoff = policies.backoff
local task_resume, task_started = task.resume, task.started
local quote = util.quote

local M = {}

local Runner = {}
Runner.__index = Runner
M.Runner = Runner

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

-- What a handler yields to wait for a callback: AWAIT, start.
local AWAIT = setmetatable({}, { __tostring = function() return "await" end })


-- ------------------------------------------------------------ helpers

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
                at = sup:now() }        -- ms, as every time returned
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
  local m = self.sub and self.sub._m   -- a retry (buzz.metrics)
  if m then m[3] = m[3] + 1 end
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
      failed_at = sup:now(), redrives = ev.redrives or job.redrives,
    }
    sup.next_dead = rec.id + 1
    sup.dead[#sup.dead + 1] = rec
    local m = self.sub and self.sub._m -- a dead letter (buzz.metrics)
    if m then m[4] = m[4] + 1 end
    local tr = sup.bus._trace          -- (buzz.trace)
    if tr then tracing.buried(tr, ev, self.sub) end
    sup:put("dead", ("%012d"):format(rec.id), rec)
    recs[i] = rec
  end
  self:release(job)
  for _, rec in ipairs(recs) do             -- copies: not the bus's own
    sup:announce("$DLQ." .. rec.event.type, sup:dlq_payload(rec))
  end
end

-- ------------------------------------------------------------ breaker
-- announce_breaker, breaker_failed, open/close_breaker, half_open and
-- breaker_state (lua/buzz/breaker.lua)

require("buzz.breaker").install(Runner, { fifo = fifo, push = push,
                                          shift = shift, size = size })

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
  local in_lanes = 0                   -- behind another job of their key
  for _, lane in pairs(self.lanes) do
    if lane ~= true then in_lanes = in_lanes + size(lane) end
  end
  return { inflight = self.inflight, waiting = size(self.waiting),
           in_lanes = in_lanes, held = size(self.held),
           retrying = self.retrying, breaker = self:breaker_state() }
end


M.SLEEP, M.AWAIT, M.Fatal, M.RetryAfter = SLEEP, AWAIT, Fatal, RetryAfter
M.fifo, M.push, M.shift = fifo, push, shift
M.readable, M.trace_of = readable, trace_of

return M

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
-- This file holds the handlers' API (buzz.fatal, retry_after, sleep,
-- await) and the Supervisor: the run queue, the runners by name, adoption
-- of yielding handlers, and what a bus loads at open. The jobs themselves
-- are lua/buzz/runner.lua's (its breaker: lua/buzz/breaker.lua).
--
-- Beside it: lua/buzz/policy.lua checks the options and computes the
-- backoff, lua/buzz/dlq.lua selects, redrives and announces dead letters,
-- lua/buzz/schedule.lua keeps delayed events, and the bus's state rows
-- (lua/buzz/store.lua) hold what outlives a run.
-- @module buzz.failure
local type, error, pairs, ipairs, pcall, setmetatable =
      type, error, pairs, ipairs, pcall, setmetatable
local xpcall = xpcall
local getmetatable, rawget = getmetatable, rawget
-- Inside OpenResty, whose coroutine.* serve the threads nginx schedules,
-- the raw functions it keeps as coroutine._* are the ones that fit.
local co_lib = coroutine
local yield = rawget(co_lib, "_yield") or co_lib.yield
local running = co_lib.running
local floor, max = math.floor, math.max
local sort = table.sort
local util = require "buzz.util"
local errors = require "buzz.errors"
local task = require "buzz.task"
local dlq = require "buzz.dlq"
local schedule = require "buzz.schedule"
local runner = require "buzz.runner"
local event_of = dlq.event_of
local task_spent = task.is_spent
local quote = util.quote

-- The jobs of a subscription, and what handlers raise and yield
-- (lua/buzz/runner.lua).
local Runner = runner.Runner
local SLEEP, AWAIT = runner.SLEEP, runner.AWAIT
local Fatal, RetryAfter = runner.Fatal, runner.RetryAfter
local fifo, push, shift = runner.fifo, runner.push, runner.shift
local trace_of = runner.trace_of

local M = {}

local Supervisor = {}
Supervisor.__index = Supervisor

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
  local co, is_main = coroutine.running()   -- handlers run in threads
  if co == nil or is_main then
    error("buzz.retry_after() is for inside a handler: it fails the "
          .. "delivery's attempt and asks for the next one", 2)
  end
  error(setmetatable({ ms = ms,
                       err = err or ("retry after %g s"):format(seconds) },
                     RetryAfter), 2)
end

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
-- @local
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
-- @local
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
-- @local
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
-- @local
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
-- @local
function Supervisor:adopt_plain_orphans(sub)
  if self.orphans[sub.durable] then
    self:adopt_orphans(self:plain_runner(sub))
  end
end

-- A time a store written by buzz before 0.2.0 holds in seconds (dead
-- letters' failed_at and attempts' at), in ms as every time now is.
local function ms(t)
  if type(t) == "number" and t < 1e11 then return t * 1000 end
  return t
end

--- Loads stored dead letters, retries and delayed events (bus opening).
-- @local
function Supervisor:load()
  local bus = self.bus
  for _, row in ipairs(bus:_state_list("dead")) do
    local rec = row.value
    if type(rec) == "table" and rec.id then
      rec.failed_at = ms(rec.failed_at)
      for _, a in ipairs(type(rec.attempts) == "table" and rec.attempts
                         or {}) do
        if type(a) == "table" then a.at = ms(a.at) end
      end
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
-- @local
function Supervisor:forget(sub)
  local r = self.plain[sub]
  if r then r:close() end
end


return M

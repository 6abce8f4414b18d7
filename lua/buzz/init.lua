--- buzz: an embeddable event-processing engine.
-- The C core (`buzz.core`) owns subscriptions, matching, the queue and the
-- loop. This module makes the bus (buzz.new), its subscriptions and its
-- lifecycle (close, stats, the loop contract), and puts on the bus class
-- the methods of the modules that own them: publish.lua (publish,
-- publish_sync), drive.lua (step, drain, run), store.lua, dlq.lua,
-- schedule.lua. See DESIGN.md for the contract.
-- @module buzz
local ok_core, core = pcall(require, "buzz.core")
if not ok_core then              -- a core built for the other interpreter
  local why = tostring(core)     -- fails to link: say so, and what to do
  if why:find("undefined symbol", 1, true) then
    why = why .. "\n(buzz: this buzz/core.so was built for another Lua "
          .. "than this " .. (jit and jit.version or _VERSION) .. ": build "
          .. "it for this one (make, or luarocks --lua-version="
          .. (jit and "5.1" or "5.4") .. " make) or put its build first "
          .. "on package.cpath)"
  end
  error(why, 0)
end
local util = require "buzz.util"
local timers = require "buzz.timers"
local failure = require "buzz.failure"
local conditions = require "buzz.filter"
local transform = require "buzz.transform"
local router = require "buzz.router"
local middleware = require "buzz.middleware"
local driver = require "buzz.driver"
local errors = require "buzz.errors"
local hot_path = require "buzz.hot"
local task = require "buzz.task"
local schedule = require "buzz.schedule"
local dlq = require "buzz.dlq"
local store_api = require "buzz.store"
local publish = require "buzz.publish"
local drive = require "buzz.drive"
local metrics = require "buzz.metrics"
local alert = require "buzz.alert"
local tracing = require "buzz.trace"

local type, error, pairs, ipairs, pcall =
      type, error, pairs, ipairs, pcall
local setmetatable, getmetatable = setmetatable, getmetatable
local floor, math_max = math.floor, math.max
local sort = table.sort

local M = { _VERSION = "0.2.0" }

local Bus = { __name = "buzz.bus" }
Bus.__index = Bus
local Sub = { __name = "buzz.sub" }
Sub.__index = Sub

-- Open memory buses without middleware -> their hot path's state
-- (lua/buzz/publish.lua's HOT: publish_sync looks buses up there).
local HOT = publish.HOT

local options = require "buzz.options"
local DURABILITIES = options.DURABILITIES

-- ------------------------------------------------------------ validation
-- (lua/buzz/options.lua)
local check_options, is_callable = options.check_options, options.is_callable
local supervision = require("buzz.policy").subscription
local SUBSCRIBE_OPTIONS = options.SUBSCRIBE_OPTIONS
local check_subject_arg = util.check_subject_arg
local check_subject_value = util.check_subject_value


-- Returns the core of a bus, raising if self is not an open bus (at
-- level, 3 unless given: the method's caller).
local function check_bus(self, method, level)
  if getmetatable(self) ~= Bus then
    error(("use bus:%s(...), not bus.%s(...)"):format(method, method),
          level or 3)
  end
  local c = self._core
  if not c then error("attempt to use a closed bus", level or 3) end
  return c
end


-- ------------------------------------------------------------ errors

-- The default on_error and the protected reporter (lua/buzz/errors.lua).
local default_on_error, reporter = errors.default_on_error, errors.reporter

-- The core refused a call: its misuse (a bad subject, a payload JSON cannot
-- hold, a durable consumer without a store) is raised at the caller's
-- level; failures of the world are returned.
local MISUSE = { ESUBJECT = true, EINVAL = true, ETOOBIG = true }
local function refused(err, code, level)
  if MISUSE[code] then error(err, level + 1) end
  return nil, err, code
end


-- ------------------------------------------------------------ the bus

--- Creates a bus.
---@param opts table|nil store, durability, queue_limit, on_error,
--- max_payload, dedup_window, clock, loop, trace, metrics_every, freeze;
--- for a store readonly, max_size, max_backlog, max_age, max_events
---@return table|nil bus, string|nil err, string|nil code
function M.new(opts)
  local limit, on_error, durability, store, backlog, clock, loop =
    options.new(opts, 2)
  opts = opts or {}
  local copts = {
    max_payload = opts.max_payload,
    dedup_window_ms = opts.dedup_window and floor(opts.dedup_window * 1000),
    now_ms = clock and clock:now_ms(),  -- the dedup keys a store loads
  }
  if store then
    copts.store = {
      path = store,
      durability = DURABILITIES[durability or "batch"],
      readonly = opts.readonly and 1 or 0,
      max_bytes = opts.max_size,
      max_backlog = backlog,
      max_age_ms = opts.max_age and floor(opts.max_age * 1000),
      max_events = opts.max_events,
    }
  end
  local report = reporter(on_error or default_on_error)
  local c, err, code = core.new(limit, copts)
  if not c then return nil, err, code end
  clock = clock or timers.real_clock()
  local tl = timers.new(clock)
  local bus = setmetatable({
    _report = report,
    _core = c,                -- false once closed
    _store = store,           -- path, or nil for a memory bus
    _durability = store and (durability or "batch"),
    _readonly = opts.readonly or false,
    _upcasters = nil, _upcast = nil,  -- type -> chain; runner (store.lua)
    _clock = clock,
    _manual = clock.is_manual and clock,  -- stamps events, or false
    _timers = tl,             -- delays, retries, timeouts, sleeps
    _mw = middleware.new(opts.freeze),  -- bus:use; freeze (freeze.lua)
    _subs = setmetatable({}, { __mode = "k" }),  -- live subscriptions
    _max_payload = opts.max_payload,
    _metrics = metrics.new(),  -- counters by subscription name
    _trace = false,            -- event-chain tracing (lua/buzz/trace.lua)
  }, Bus)
  if opts.trace then
    bus._trace = tracing.new(bus, opts.trace == true and 1 or opts.trace)
  end
  local sup = failure.new(bus, tl)
  bus._sup = sup
  bus._task = task.new(bus)  -- runs every delivery
  if not store then bus._hot = hot_path.new(bus) end  -- publish_sync's
  HOT[bus] = bus._hot                                   -- hot path
  if opts.metrics_every then             -- checked above
    metrics.start_snapshots(bus, opts.metrics_every)
  end
  if store then
    local ok, e = pcall(sup.load, sup)
    if not ok then
      c:close()
      return nil, errors.wrap("ESTORE", "cannot load the store's records", e)
    end
  end
  if clock.is_manual then clock:join(bus) end
  if loop ~= nil then         -- a host's loop drives it (lua/buzz/driver.lua)
    local d, derr, dcode = driver.attach(bus, loop, 2)
    if not d then
      bus:close()
      return nil, derr, dcode
    end
    bus._driver = d
    bus.publish = driver.publisher(d, Bus.publish)  -- nil: the plain method
  end
  return bus
end


-- The function the core calls for sub's deliveries: its filter, then its
-- supervisor (if it has one), then the bus's middleware, then its handler.
-- Made again when middleware is added.
local function bind(self, sub)
  local inner = middleware.wrap(self._mw, sub, sub.handler)
  if self._trace then inner = tracing.wrap(self._trace, sub, inner) end
  sub._inner = inner
  local test, runner = sub._test, sub._runner
  local deliver = inner
  if runner then
    runner.handler = inner
    deliver = function(ev) runner:deliver(ev) end
  end
  if test and sub.is_once then
    -- the core ends a once sub as it hands it an event; with a filter,
    -- this does so for the first event that passes (retries go on)
    return function(ev)
      if not (sub.is_active and test(ev)) then return end
      sub.is_active = false
      local c, id = self._core, sub._id
      sub._id = nil
      self._subs[sub] = nil
      if c and id then c:unsubscribe(id, sub) end
      return deliver(ev)
    end
  end
  if test then
    return function(ev) if test(ev) then return deliver(ev) end end
  end
  return deliver
end

local function subscribe(self, c, pattern, handler, opts, is_once, level)
  check_subject_arg(pattern, "pattern", "task.*", level + 1)
  if not is_callable(handler) then
    error(("bad handler: expected a function, got %s"):format(type(handler)),
          level + 1)
  end
  local durable, start_new
  is_once, durable, start_new = options.subscribe(opts, is_once,
                                                  self._readonly,
                                                  level + 1)
  local policy = opts and supervision(opts, durable or pattern, level + 1)
  local sub = setmetatable({
    pattern = pattern, handler = handler, bus = self,
    is_once = is_once or false, is_active = true, durable = durable,
    name = policy and policy.name or (opts and opts.name) or durable,
  }, Sub)
  metrics.attach(self._metrics, sub)     -- sub._name, sub._m
  sub._test = opts and opts.filter ~= nil
              and conditions.predicate(opts.filter, level + 2) or nil
  if policy then
    sub._runner = self._sup:runner(sub, handler, policy, level + 1)
  end
  -- A once subscription with a filter ends at its first event that
  -- passes the filter (bind), not at the first that comes.
  local plan = sub._test and conditions.plan(opts.filter) or nil
  -- What the hot path calls (lua/buzz/hot.lua), as the core does.
  sub._fn = bind(self, sub)
  sub._once = sub.is_once and not sub._test
  local id, err, code = c:subscribe(pattern, sub, sub._fn, sub._once,
                                    durable, start_new, plan)
  if not id then
    if sub._runner then sub._runner:close() end
    local _, e, k = refused(err, code, level + 1)  -- not a tail call
    return nil, e, k
  end
  sub._id = id
  self._subs[sub] = true
  if self._hot then hot_path.invalidate(self._hot) end
  if sub._runner then
    self._sup:adopt_orphans(sub._runner)
  elseif durable then
    self._sup:adopt_plain_orphans(sub)   -- kept by an earlier run
  end
  return sub
end

--- Subscribes handler to every event whose type matches pattern.
---@param pattern string NATS-style: "task.*", "repo.>"
---@param handler function called with the event table
---@param opts table|nil once
---@return table sub
function Bus:subscribe(pattern, handler, opts)
  local c = check_bus(self, "subscribe")
  local sub, err, code = subscribe(self, c, pattern, handler, opts, false, 2)
  return sub, err, code       -- not a tail call: error levels count frames
end

-- Returns the decorator for on/once, checking what it can up front.
-- For the modules that subscribe for the user (routes, windows,
-- batches): level is where a misuse is raised, counted from the caller
-- (2: its caller).
function Bus:_subscribe(pattern, handler, opts, level)
  local c = check_bus(self, "subscribe")
  local sub, err, code = subscribe(self, c, pattern, handler, opts, false,
                                   level + 1)
  return sub, err, code       -- not a tail call: error levels count frames
end

local function decorator(self, method, pattern, opts, is_once)
  check_bus(self, method)
  check_subject_value(pattern, "pattern", "task.*", true, 3)
  check_options(opts, SUBSCRIBE_OPTIONS, method, 3)
  return function(handler)
    local c = check_bus(self, method)
    local sub, err, code = subscribe(self, c, pattern, handler, opts,
                                     is_once, 2)
    return sub, err, code     -- not a tail call: error levels count frames
  end
end

--- Decorator form: bus:on("task.*", opts)(function(ev) ... end) -> sub.
---@param pattern string
---@param opts table|nil
---@return function decorate taking the handler, returning the sub
function Bus:on(pattern, opts)
  local decorate = decorator(self, "on", pattern, opts, false)
  return decorate
end

--- Like on, but the subscription ends after its first delivery.
---@param pattern string
---@param opts table|nil
---@return function decorate taking the handler, returning the sub
function Bus:once(pattern, opts)
  local decorate = decorator(self, "once", pattern, opts, true)
  return decorate
end

--- Removes every subscription whose handler is fn.
---@param fn function
---@return integer removed
function Bus:unsubscribe_handler(fn)
  local subs = check_bus(self, "unsubscribe_handler"):subs()
  local n = 0
  for i = 1, #subs do
    if subs[i].handler == fn and subs[i]:unsubscribe() then n = n + 1 end
  end
  return n
end

--- Closes the bus: nothing more is delivered. Returns the number of pending
--- events discarded (call drain() first to deliver them). Idempotent.
---@return integer
function Bus:close()
  if getmetatable(self) ~= Bus then
    error("use bus:close(), not bus.close()", 2)
  end
  local c = self._core
  if not c then return 0 end
  metrics.stop_snapshots(self)  -- (while the store is open)
  if self._servers then require("buzz.serve").close_all(self) end
  if self._projections then require("buzz.projection").close_all(self) end
  self._core = false
  HOT[self] = nil
  local d = self._driver
  if d then d:close() end     -- the host's handles, before the fd goes
  self._timers:clear()
  task.close(self._task)
  self._sup:close()
  if self._clock.is_manual then self._clock:leave(self) end
  return c:close()            -- marks every live subscription inactive
end
Bus.__close = Bus.close


--- Counters from the core: pending, subscriptions, last_id, cached_types,
--- queue_limit, and with a store `store` (see store_info).
---@return table
function Bus:stats()
  local c = check_bus(self, "stats")
  local st = c:stats()
  st.pending = st.pending + task.held(self._task)  -- taken, not run
  local sup = self._sup
  st.timers = self._timers:count()
  st.dead_letters = #sup.dead
  st.delayed = sup.delays
  st.redriven = sup.redriven
  if self._store then st.store = store_api.info(self, c, false) end
  return st
end

--- What the bus has counted (README, "Seeing inside"): events published
--- and queued by priority, per subscription name deliveries, failures,
--- retries, dead letters, gauges and handler durations, and with a store
--- the writer's figures.
---@return table
function Bus:metrics()
  return metrics.collect(self, check_bus(self, "metrics"))
end

--- Watches a metric (README, "Seeing inside"): $SYS.alert events when it
--- stays past a threshold, and when it comes back. Returns the alert
--- (:cancel(), :is_firing()).
---@param opts table metric, above or below, for, every, name
---@return table
function Bus:alert(opts)
  check_bus(self, "alert")
  return alert.new(self, opts, 2)
end

--- The causal tree under a traced event (by id), or the trees of a
--- correlation id (a list): each event with its deliveries' spans and the
--- events it caused (README, "Seeing inside"). From the bus's memory, or
--- its store's records (a store another bus traced into).
---@param what integer|string an event id, or a correlation id
---@return table|nil
function Bus:trace(what)
  check_bus(self, "trace")
  if not (type(what) == "string" or (type(what) == "number"
                                     and what >= 1 and what % 1 == 0)) then
    error(("bad event: expected an event id or a correlation id, got %s")
          :format(type(what) == "number" and tostring(what)
                  or "a " .. type(what)), 2)
  end
  return tracing.tree(self, what)
end

--- True once close() has been called.
---@return boolean
function Bus:is_closed()
  if getmetatable(self) ~= Bus then
    error("use bus:is_closed(), not bus.is_closed()", 2)
  end
  return not self._core
end

--- The loop contract for host drivers: a descriptor that is readable while
--- work is pending, and the milliseconds until the next timer (-1: none).
---@return integer fd
function Bus:fd()
  return check_bus(self, "fd"):fd()
end

---@return integer ms
function Bus:timeout()
  local ms = check_bus(self, "timeout"):timeout()
  local due = not self._clock.is_manual and self._timers:next_due()
  if not due or ms == 0 then return ms end
  local left = math_max(0, due - self._clock:now_ms())
  return (ms < 0 or left < ms) and left or ms
end

function Bus:__tostring()
  local c = self._core
  return ("buzz.bus (%s)"):format(c and ("%d pending"):format(c:pending())
                                  or "closed")
end


-- ------------------------------------------------------------ internal

-- The bus's internal interface, for the modules of lua/buzz/ (batch,
-- aggregate, schedule, failure's supervisor, store, dlq) instead of its
-- private fields. Not part of the public API; names start with _.
--   bus:_now()                    the bus's clock, in milliseconds
--   bus:_at(due_ms, fn, ...)      a timer on the bus's timer heap: fn(...)
--                                 at due_ms; returns it (:cancel())
--   bus:_after(ms, fn, ...)       the same, ms from now
--   bus:_report_error(err, ev, sub, trace)  to on_error, protected
--   bus:_announce(etype, payload) publishes $DLQ.*, $SYS.*; reports refusal
--   bus:_has_store()              true when the bus has a store
--   bus:_state_put/_state_get/_state_del/_state_list  the store's state
--                                 rows (lua/buzz/store.lua)
--   bus:_position(name)           a durable consumer's acked id (store.lua)
--   bus:_subscribe(...)           subscribe for the user (above)
function Bus:_now()
  return self._clock:now_ms()
end

function Bus:_at(due, fn, ...)
  return self._timers:at(due, fn, ...)
end

function Bus:_after(ms, fn, ...)
  return self._timers:after(ms, fn, ...)
end

function Bus:_report_error(err, ev, sub, trace)
  return self._report(err, ev, sub, trace)
end

function Bus:_announce(etype, payload)
  return self._sup:announce(etype, payload)
end

function Bus:_has_store()
  return self._store ~= nil
end


-- ------------------------------------------------------------ the store

-- publish and publish_sync (lua/buzz/publish.lua); step, drain, run,
-- stop and the host drivers' turns (lua/buzz/drive.lua).
publish.install(Bus, check_bus, refused)
drive.install(Bus, check_bus)

-- events, replay, upcaster, flush, consumers, remove_consumer, store_info
-- and the state rows (lua/buzz/store.lua).
store_api.install(Bus, check_bus, refused)


-- ------------------------------------------------------------ failures

-- dead_letters, redrive, discard (dlq.lua); every (schedule.lua)
dlq.install(Bus, check_bus)
schedule.install(Bus, check_bus, refused)
for _, m in ipairs { "serve", "group", "projection", "stream", "saga",
                     "state", "redis" } do
  require("buzz." .. m).install(Bus, check_bus)
end

--- The state of a subscription's failure handling: inflight, waiting,
--- held, retrying, breaker ("closed", "open", "half_open" or nil).
---@return table|nil
function Sub:stats()
  local e = self._engine
  local st = self._runner and self._runner:stats()
             or e and e.stats and e:stats() or {}
  return metrics.sub_stats(self, st)
end


-- ------------------------------------------------------------ subs

--- Ends the subscription; its handler is never called again. Idempotent.
---@return boolean true if it was active
function Sub:unsubscribe()
  if getmetatable(self) ~= Sub then
    error("use sub:unsubscribe(), not sub.unsubscribe()", 2)
  end
  if not self.is_active then return false end
  self.is_active = false
  local id, c = self._id, self.bus._core
  self._id = nil
  if c and id then c:unsubscribe(id, self) end
  local h = self.bus._hot
  if h then hot_path.invalidate(h) end
  if self._runner then self._runner:close() end
  if self._engine then self._engine:stop() end   -- its open windows
  self.bus._sup:forget(self)
  self.bus._subs[self] = nil
  return true
end
Sub.__close = Sub.unsubscribe

function Sub:__tostring()
  return ("buzz.sub (%q, %s)"):format(self.pattern,
                                      self.is_active and "active" or "ended")
end

--- A clock that moves only when told: buzz.new{ clock = clock }, then
--- clock:advance(seconds) fires what falls due, without sleeping.
M.manual_clock = timers.manual_clock
M.sleep = failure.sleep
M.await = failure.await
M.fatal = failure.fatal
M.retry_after = failure.retry_after

-- Filters and transformers: conditions and decorators (lua/buzz/filter.lua,
-- lua/buzz/transform.lua).
M.where = conditions.where
M.any = conditions.any
M.all = conditions.all
M.negate = conditions.negate
M.filter = conditions.filter
M.map = transform.map
M.enrich = transform.enrich
M.pluck = transform.pluck
M.rename = transform.rename
M.agg = require("buzz.aggregate").agg  -- reducers for route:window()
M.metrics = metrics                   -- buzz.metrics.prometheus(bus)
M.alert = alert                       -- buzz.alert.failure_rate(name)...

--- Adds a middleware, run around every delivery of every subscription of
--- the bus (those made before too), after the ones added before it:
--- fn(ev, next, ctx) calls next(ev) to go on (see lua/buzz/middleware.lua).
---@param fn function
---@return boolean true
function Bus:use(fn)
  local c = check_bus(self, "use")
  middleware.add(self._mw, fn, 2)
  HOT[self] = nil             -- middleware stamps headers: the core's path
  local subs = {}
  for sub in pairs(self._subs) do subs[#subs + 1] = sub end
  sort(subs, function(a, b) return a._id < b._id end)
  for _, sub in ipairs(subs) do
    local fn2 = bind(self, sub)
    if not sub._runner then
      sub._fn = fn2
      c:set_handler(sub._id, sub, fn2)
    end
  end
  return true
end

--- A batch subscription: bus:batch(pattern, opts)(fn) calls fn(events,
--- attempt) with arrays of events (see lua/buzz/batch.lua). opts: size,
--- interval, max_bytes, adaptive, and subscribe's retry, breaker,
--- timeout, concurrency, name, durable, start, filter.
---@param pattern string
---@param opts table|nil
---@return function decorator taking fn and returning the subscription
function Bus:batch(pattern, opts)
  check_bus(self, "batch")
  local decorate = require("buzz.batch").decorator(self, pattern, opts, 3)
  return decorate                      -- not a tail call: error levels
end

--- A route over pattern: stages (where, filter, map, enrich, pluck,
--- rename) added one call at a time, then handle(fn, opts) subscribes.
---@param pattern string
---@return table route
function Bus:route(pattern)
  check_bus(self, "route")
  check_subject_value(pattern, "pattern", "metrics.*", true, 2)
  return router.new(self, pattern)
end

return M

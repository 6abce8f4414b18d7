--- OpenResty driver: an nginx worker's timers drive a bus.
--
-- `buzz.new{ loop = "ngx" }` (in init_worker_by_lua*, one bus per worker)
-- attaches the bus here. A publish outside a handler schedules a turn on
-- `ngx.timer.at(0)`, so the events of a request are delivered as soon as
-- the request yields or ends, in a timer's context, where handlers may use
-- cosockets and ngx.sleep; the bus's own timers (delays, retries, windows,
-- buzz.sleep) are re-armed on `ngx.timer.at` after each turn. A turn makes
-- at most TURN_MAX deliveries, then schedules another, so a burst never
-- holds the worker. When the worker exits the driver delivers what is due
-- and closes the bus (a store commits and releases its lock).
--
-- Yielding handlers. The core resumes handlers with lua_resume, so an ngx
-- API that yields (ngx.sleep, a cosocket) yields to the core, not to
-- nginx; nginx has parked the operation on the timer's entry thread. The
-- driver is failure.lua's host (sup.host): a handler that yields nothing
-- comes to Driver:park, whatever its subscription (plain, or with retry,
-- timeout, ordered, concurrency or breaker) and wherever it runs (in the
-- core's dispatch, in a retry, after a buzz.sleep). The turn stops
-- delivering, yields its entry thread with OpenResty's raw yield
-- (coroutine._yield), and when nginx resumes it with the operation's
-- results it resumes the job through its runner (runner:continue), which
-- settles the attempt as for any job: success, retry, dead letter, a
-- buzz.sleep on the bus's timers, or another ngx yield, parked again. A
-- timeout still ends an attempt that waits on nginx; the late wake is
-- dropped. Meanwhile a fresh turn delivers the rest.
-- One turn carries one handler, as one nginx thread waits for one
-- operation: from the park until the thread waits, the driver holds the
-- bus's timers and the supervisor's run queue (Driver:hold), and the
-- next turn takes them up. Not covered: a nested delivery (publish_sync
-- in a handler) that yields to nginx cannot park and fails with
-- failure.lua's message; within drain() the bus's timers wait, so a
-- timeout cannot end a wait on nginx there; and a cosocket belongs to
-- the turn that made it: keep it within one handler call.
--
-- `M.shared{ dict, store, ... }` gives every worker one log: a store has
-- one writer, so one worker (the owner) opens it and the others forward
-- their publishes through a lua_shared_dict list, which the owner takes
-- on its poll timer. See the function for the guarantees.
-- @module buzz.ngx
local core = require "buzz.core"
local util = require "buzz.util"
local errors = require "buzz.errors"

local type, error, pcall, select, tostring, pairs =
      type, error, pcall, select, tostring, pairs
local setmetatable, getmetatable, rawget = setmetatable, getmetatable, rawget
local unpack = table.unpack or unpack
local huge = math.huge
local json_encode, json_decode = core.json_encode, core.json_decode

-- Lua's own coroutine function name, which OpenResty keeps as
-- coroutine._<name> (its coroutine.<name> knows only its own threads,
-- and the bus's are not among them), or nil outside OpenResty.
local function raw_coroutine(name)
  return rawget(coroutine, "_" .. name)
end

local M = {}

local Driver = {}
Driver.__index = Driver

-- Deliveries per bus:_turn(), and per nginx timer before the turn hands
-- the worker back to nginx and schedules the next.
local BATCH = 256
local TURN_MAX = 4096

-- The interval of the heartbeat: an always-pending timer, so that the
-- driver hears of the worker's exit (its callback runs with premature).
local HEARTBEAT = 1

-- Phases whose entry thread nginx lets yield.
local YIELDABLE = { rewrite = true, access = true, content = true,
                    timer = true }

local function log_err(...)
  ngx.log(ngx.ERR, ...)
end

-- ------------------------------------------------------------ turns

local turn              -- the timer callback, below

--- Schedules a turn now (after the current handler of nginx yields),
--- unless one is already scheduled. Returns true if one is.
function Driver:schedule(cause)
  if self.is_scheduled or self.is_closed then
    if cause == "wake" then self.next_cause = "wake" end  -- it serves both
    return true
  end
  self.next_cause = cause or self.cause or "timer"
  local ok, err = ngx.timer.at(0, turn, self, false)
  if not ok then
    if err ~= "process exiting" then
      log_err("buzz: could not schedule a turn: ", err)
    end
    return false
  end
  self.is_scheduled = true
  return true
end

--- Arms a timer for the bus's next due time, unless one due no later is
--- armed: stale timers run a harmless turn.
function Driver:arm()
  local bus = self.bus
  if self.is_closed or bus:is_closed() then return end
  local ms = bus:timeout()
  if ms < 0 then return end
  if ms == 0 then self:schedule() return end
  local at = ngx.now() * 1000 + ms
  if self.due_at and self.due_at <= at then return end
  local ok, err = ngx.timer.at(ms / 1000, turn, self, at)
  if ok then
    self.due_at = at
  elseif err ~= "process exiting" then
    log_err("buzz: could not arm a timer: ", err)
  end
end

local function pack(...)
  return select("#", ...), { ... }
end

-- Resumes a parked job with the n results in res, as Runner.wake does.
local function resume(r, job, n, res)
  r:continue(job, unpack(res, 1, n))
  r.sup:flush()
end

-- A handler of job yielded on an ngx operation in this nginx thread
-- (park, below, took the job over): waits for the operation, then resumes
-- the job through its runner, as failure.lua resumes a sleeper, with what
-- nginx gives the thread back. The runner settles the attempt (success,
-- retry, dead letter), sends a buzz.sleep to the bus's timers, and parks
-- a further ngx yield here again, as it does a job that the runner starts
-- meanwhile (the next of a lane, say) once this one's attempt is over.
-- A wake that comes after the attempt ended (timed out, bus closed) is
-- dropped. While a handler runs, a nested delivery (publish_sync) that
-- yields cannot park here: it fails.
local function carry(self, job)
  local raw_yield = self.raw_yield
  while job do
    local co = job.co
    self:hold(false)         -- this thread waits: other turns may go on
    coroutine.yield()        -- clears a co_op a buzz.sleep left set
    local n, res = pack(raw_yield())
    local r = job.runner
    if not self.bus._core or r.is_closed or job.is_over or job.co ~= co then
      return
    end
    local t = { parked = nil, job = job }
    self.current = t
    local ok, err = pcall(resume, r, job, n, res)
    self.current = nil
    if not ok then
      self:hold(false)
      log_err("buzz: resuming a handler failed: ", tostring(err))
      return
    end
    self:arm()               -- timers the handler set (buzz.sleep, retry)
    job = t.parked
  end
end

-- One turn of the bus: due timers and deliveries, then the supervisor's
-- run queue (jobs a park held back), unless this turn parked a job.
local function turn_once(bus, t)
  local n = bus:_turn(BATCH)
  if not t.parked then bus._sup:flush() end
  return n
end

-- Runs turns of the bus in this nginx thread until nothing is due or
-- limit deliveries were made (then schedules a turn for the rest);
-- carries a handler that parked.
function Driver:run_turn(limit)
  local bus = self.bus
  local total = 0
  while not self.is_closed and not bus:is_closed() do
    local t = { parked = nil }
    self.current = t
    local ok, n = pcall(turn_once, bus, t)
    self.current = nil
    if not ok then
      log_err("buzz: a turn failed: ", tostring(n))
      n = 0
    end
    total = total + n
    if t.parked then
      if self.inline == 0 then
        self:schedule()    -- the rest, while this thread waits
      end
      carry(self, t.parked)
    elseif not ok or n == 0 or bus:timeout() ~= 0 then
      break
    end
    if total >= limit then
      self:schedule()
      break
    end
  end
  return total
end

turn = function(premature, self, at)
  if at then
    if self.due_at == at then self.due_at = nil end
  else
    self.is_scheduled = false
  end
  if self.is_closed then return end
  if premature then return self:exit() end
  if self.inline > 0 then return end      -- drain() does it, then arms
  self.cause = at and "timer" or self.next_cause or "timer"
  self.next_cause = nil
  self:run_turn(TURN_MAX)
  self.cause = nil
  self:arm()
end

local function heartbeat(premature, self)
  if self.is_closed then return end
  if premature then return self:exit() end
  self:arm()
end

-- The worker exits: deliver what is due, then close the bus (or let the
-- owner of a shared store do it, forwarded events first).
function Driver:exit()
  if self.on_exit then return self.on_exit() end
  local bus = self.bus
  if not bus:is_closed() then
    self.cause = "exit"
    self:run_turn(huge)
    bus:close()
  end
end

-- ------------------------------------------------------------ yields

--- failure.lua's host hook: a handler of job yielded nothing, which is an
--- ngx operation (ngx.sleep, a cosocket) that nginx parked on this
--- turn's entry thread. Takes the job over if one of our turns runs
--- here and carries no other job yet (nor, in carry, a handler still
--- running): the turn stops delivering, and carry resumes the job when
--- nginx resumes the thread. Returns true if it took the job.
---@param job table a job of failure.lua
---@return boolean
function Driver:park(job)
  local t = self.current
  if not t or t.parked or (t.job and not t.job.is_over and t.job ~= job)
  then
    return false
  end
  t.parked = job
  local bus = self.bus         -- no other delivery on this thread now,
  if bus._core then bus._task.is_stopped = true end
  self:hold(true)              -- nor timers, nor queued jobs
  return true
end

--- While held, the bus's timers and the supervisor's run queue wait (a
--- job they start could not park: this thread's turn carries one).
--- carry() lets go before the thread waits.
function Driver:hold(is_held)
  self.bus._timers.is_held = is_held
  self.bus._sup.is_held = is_held
end

-- ------------------------------------------------------------ the driver

--- Attaches bus to the worker's timers; buzz.new{ loop = "ngx" } calls it.
---@param bus table
---@return table driver
function M.attach(bus)
  local why
  if type(ngx) ~= "table" or type(ngx.timer) ~= "table" then
    why = 'loop = "ngx" drives a bus inside OpenResty (nginx with the lua '
          .. "module), and ngx is not here"
  elseif ngx.get_phase() == "init" then
    why = 'buzz.new{ loop = "ngx" } runs in init_worker_by_lua*, not in '
          .. "init_by_lua*: the master process forks the workers, and a "
          .. "bus cannot cross a fork"
  elseif type(raw_coroutine("yield")) ~= "function" then
    why = 'loop = "ngx" needs OpenResty\'s coroutine._yield (lua-nginx-'
          .. "module 0.10 or later)"
  end
  if why then
    bus:close()
    error(why, 4)        -- attach <- driver.attach <- buzz.new <- caller
  end
  local self = setmetatable({
    bus = bus,
    is_closed = false,
    is_scheduled = false,  -- a turn at 0 is pending
    due_at = nil,          -- ms of the earliest armed timer
    current = nil,         -- the turn running bus:_turn, or nil
    inline = 0,            -- drain()s delivering in requests: no turns
    on_exit = nil,         -- set by M.shared
    raw_yield = raw_coroutine("yield"),
  }, Driver)
  bus._sup.host = self     -- parks the handlers that yield to nginx
  local ok, err = ngx.timer.every(HEARTBEAT, heartbeat, self)
  if not ok then log_err("buzz: could not start the heartbeat: ", err) end
  self:schedule()          -- what a store brought back (retries, delays)
  return self
end

--- The bus calls this before a publish made outside a handler.
function Driver:wake()
  self:schedule("wake")
end

--- Called by bus:close(): no more turns. Pending nginx timers find the
--- driver closed and return.
function Driver:close()
  self.is_closed = true
end

-- The driver of bus, raising at the caller of buzz.ngx.<fn> for anything
-- but a bus made with loop = "ngx".
local function driver_of(bus, fn)
  local d = type(bus) == "table" and rawget(bus, "_driver")
  if getmetatable(d) ~= Driver then
    error(('buzz.ngx.%s(bus): expected a bus made with buzz.new{ loop = '
           .. '"ngx" }, got %s'):format(fn, util.quote(bus)), 3)
  end
  return d
end

--- Why the bus is delivering now, for a handler that wants to know (or
--- log it): "wake" (a turn a publish scheduled, right after the request
--- or timer that published), "timer" (a delay, retry, sleep or window of
--- the bus's, or the heartbeat), "drain" (buzz.ngx.drain in a request),
--- "exit" (the worker is exiting), or nil outside the driver's turns.
---@param bus table a bus made with buzz.new{ loop = "ngx" }
---@return string|nil
function M.cause(bus)
  local d = driver_of(bus, "cause")
  return d.cause
end

--- Delivers what is due now, in the calling request (rewrite, access or
--- content phase) or timer, one delivery after another, waiting for
--- handlers that use cosockets: for a response that must follow its
--- events' handlers. The worker's turns wait meanwhile. Returns the
--- number of deliveries. In other phases nothing may yield, and a handler
--- that does fails.
---@param bus table a bus made with buzz.new{ loop = "ngx" }
---@return integer
function M.drain(bus)
  local d = driver_of(bus, "drain")
  if bus:is_closed() then error("attempt to use a closed bus", 2) end
  if not YIELDABLE[ngx.get_phase()] then
    return bus:drain()
  end
  d.inline = d.inline + 1
  local cause = d.cause
  d.cause = "drain"
  local ok, n = pcall(d.run_turn, d, huge)
  d.cause = cause
  d.inline = d.inline - 1
  d:arm()
  if not ok then error(n, 0) end
  coroutine.yield()        -- clears a co_op a buzz.sleep left set, so that
  return n                 -- the request's own ngx.sleep waits in full
end


-- ------------------------------------------------------------ one log

local Shared = {}
Shared.__index = Shared

-- Forwarded events the owner takes per poll.
local TAKE_MAX = 1000

local SHARED_OPTIONS = { dict = true, store = true, owner = true,
                         poll = true, setup = true }

--- One store for all the workers of nginx. A store has one writer (an
--- flock), so the worker numbered `owner` (default 0) opens it, with the
--- `setup(bus)` function subscribing its durable consumers, and every
--- other worker forwards its publishes through the lua_shared_dict
--- `dict` (a list, atomic lpop), which the owner takes every `poll`
--- seconds (default 0.05) and publishes in the order they came. The other
--- options go to buzz.new. Until the owner has the store (at start, or
--- while a reloading nginx's old owner still holds it) the owner forwards
--- too.
---
--- What a forwarded event gets: each is published once, in the owner;
--- the shared dict survives a worker's crash and a reload, not a stop
--- (the owner takes it all when it exits). Like durability "batch", a
--- crash of the owner can lose only the events it took in that instant.
--- A forwarded publish returns true, "forwarded" (the id comes later); a
--- full dict returns nil, "EFULL: ...", "EFULL".
---@param opts table dict, store, owner, poll, setup, and buzz.new's
---@return table shared with publish(), is_owner(), bus (the owner's)
function M.shared(opts)
  if type(opts) ~= "table" then
    error("buzz.ngx.shared{ dict = \"buzz\", store = \"events.db\" }: "
          .. "expected an options table", 2)
  end
  if type(ngx) ~= "table" or ngx.get_phase() ~= "init_worker" then
    error("buzz.ngx.shared{} runs in init_worker_by_lua*", 2)
  end
  local dict = type(opts.dict) == "string" and ngx.shared[opts.dict]
  if not dict then
    error(("bad dict %s: expected the name of a lua_shared_dict "
           .. "(lua_shared_dict buzz 1m; in the http block)")
          :format(util.quote(opts.dict)), 2)
  end
  if type(opts.store) ~= "string" or opts.store == "" then
    error(("bad store %s: one log for every worker needs a store, such "
           .. "as \"events.db\""):format(util.quote(opts.store)), 2)
  end
  local owner = opts.owner or 0
  if type(owner) ~= "number" or owner % 1 ~= 0 or owner < 0
     or owner >= ngx.worker.count() then
    error(("bad owner %s: expected a worker id, 0 to %d")
          :format(util.quote(owner), ngx.worker.count() - 1), 2)
  end
  local poll = opts.poll or 0.05
  if type(poll) ~= "number" or poll <= 0 then
    error(("bad poll %s: expected seconds > 0"):format(util.quote(poll)), 2)
  end
  if opts.setup ~= nil and type(opts.setup) ~= "function" then
    error("bad setup: expected a function(bus)", 2)
  end
  local new_opts = { loop = "ngx", store = opts.store }
  for k, v in pairs(opts) do
    if not SHARED_OPTIONS[k] then new_opts[k] = v end
  end
  local self = setmetatable({
    dict = dict, key = "buzz:" .. opts.store, setup = opts.setup,
    new_opts = new_opts, poll = poll,
    is_owner_worker = ngx.worker.id() == owner,
    bus = nil,               -- the owner's bus, once it has the store
    is_closed = false,
    tries = 0, last_err = nil, said_at = 0,  -- opens that failed (open)
    on_error = opts.on_error,
  }, Shared)
  if self.is_owner_worker then
    local ok, err = ngx.timer.every(poll, Shared.tick, self)
    if not ok then error("buzz.ngx.shared: " .. tostring(err), 2) end
    self:open()
  end
  return self
end

-- The world failed: on_error if given, else the error log. msg is
-- "CODE: message".
function Shared:report(msg)
  if self.on_error then
    local ok, e = pcall(self.on_error, msg)
    if ok then return end
    msg = msg .. " (and on_error raised: " .. tostring(e) .. ")"
  end
  log_err("buzz: ", msg)
end

-- The owner opens the store; one that will not open (still locked by a
-- reload's old owner, or not writable) is tried again on the next poll.
-- Its failure is logged once, then at most every REPEAT seconds while it
-- lasts (each poll would log 20 lines a second).
local REPEAT = 60
function Shared:open()
  local bus, err = require("buzz").new(self.new_opts)
  if not bus then
    local now = ngx.now()
    self.tries = self.tries + 1
    if err ~= self.last_err or now - self.said_at >= REPEAT then
      local msg = errors.wrap("ESTORE", "the shared store is not open yet",
                              err)
      if tostring(err):find("Permission denied", 1, true) then
        msg = msg .. " (this worker cannot write there: give nginx's "
              .. "workers a user that can, the user directive, or the "
              .. "store a directory they can write)"
      end
      if self.tries > 1 then
        msg = ("%s (still failing after %d tries)"):format(msg, self.tries)
      end
      self:report(msg)
      self.last_err, self.said_at = err, now
    end
    return
  end
  self.bus = bus
  bus._driver.on_exit = function() self:exit() end
  if self.setup then
    local ok, e = pcall(self.setup, bus)
    if not ok then
      self:report((errors.wrap("ECALLBACK", "setup(bus) raised", e)))
    end
  end
  self:take()
end

-- Publishes forwarded events in the owner, at most TAKE_MAX; one the bus
-- refuses for a full queue goes back to the head of the list.
function Shared:take()
  local bus, dict, key = self.bus, self.dict, self.key
  for _ = 1, TAKE_MAX do
    if bus:is_closed() then return end
    local text = dict:lpop(key)
    if not text then return end
    local rec = json_decode(text)
    local ok, id, err, code = pcall(bus.publish, bus, rec.type, rec.payload,
                                    rec.opts)
    if ok and not id and code == "EFULL" then
      dict:lpush(key, text)
      return
    end
    if not ok or not id then
      self:report((errors.wrap("EINVAL", ("a forwarded %s was refused")
                                          :format(tostring(rec.type)),
                               ok and err or id)))
    end
  end
end

function Shared.tick(premature, self)
  if self.is_closed then return end
  if premature then return self:exit() end
  if not self.bus then return self:open() end
  self:take()
end

-- The owner's worker exits: take what was forwarded, deliver what is
-- due, close the store.
function Shared:exit()
  if self.is_closed then return end
  self.is_closed = true
  local bus = self.bus
  if not bus or bus:is_closed() then return end
  self:take()
  bus._driver.on_exit = nil
  bus._driver:run_turn(huge)
  bus:close()
end

--- True in the worker that owns the store.
---@return boolean
function Shared:is_owner()
  return self.is_owner_worker
end

--- Publishes on the shared log: at once in the owner (as bus:publish),
--- else forwarded to it. Raises for a bad type or a payload JSON cannot
--- hold; returns id | true, "forwarded" | nil, err, code.
---@param etype string
---@param payload any
---@param opts table|nil as for bus:publish
function Shared:publish(etype, payload, opts)
  if getmetatable(self) ~= Shared then
    error("use shared:publish(...), not shared.publish(...)", 2)
  end
  local bus = self.bus
  if bus and not bus:is_closed() then
    return bus:publish(etype, payload, opts)
  end
  util.check_type_arg(etype, "order.created", 2)
  if opts ~= nil and type(opts) ~= "table" then
    error(("bad options: expected a table, got %s"):format(type(opts)), 2)
  end
  local text, err = json_encode({ type = etype, payload = payload,
                                  opts = opts })
  if not text then error(("bad payload: %s"):format(err), 2) end
  local len, why = self.dict:rpush(self.key, text)
  if not len then
    return nil, ("EFULL: the shared dict is full (%s); give "
                 .. "lua_shared_dict more room"):format(tostring(why)), "EFULL"
  end
  return true, "forwarded"
end

-- The gateway under nginx (lua/buzz/ngxgate.lua): content_by_lua*
-- handlers for an SSE stream, a webhook or POST /events, and /metrics.
function M.sse(bus, opts) return require("buzz.ngxgate").sse(bus, opts) end
function M.ingest(publisher, opts)
  return require("buzz.ngxgate").ingest(publisher, opts)
end
function M.metrics(bus, opts)
  return require("buzz.ngxgate").metrics(bus, opts)
end

return M

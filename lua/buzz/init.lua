--- buzz: an embeddable event-processing engine.
-- The C core (`buzz.core`) owns subscriptions, matching, the queue and the
-- loop; this module validates input, runs each delivery in a coroutine and
-- reports failures. See DESIGN.md for the contract.
-- @module buzz
local core = require "buzz.core"

local type, error, pairs, tostring, pcall =
      type, error, pairs, tostring, pcall
local setmetatable, getmetatable, rawget = setmetatable, getmetatable, rawget
local floor, huge = math.floor, math.huge
local concat, sort = table.concat, table.sort
local stderr = io.stderr

local M = { _VERSION = "0.1.0" }

local Bus = { __name = "buzz.bus" }
Bus.__index = Bus
local Sub = { __name = "buzz.sub" }
Sub.__index = Sub

--- Priorities, most urgent first, and the number the core uses for each.
local PRIORITIES = { critical = 0, high = 1, normal = 2, low = 3 }
local PRIORITY_CHOICES = '"critical", "high", "normal" or "low"'

local DURABILITIES = { batch = true, sync = true, none = true }

-- Deliveries run() makes between checks of the loop.
local RUN_BATCH = 256


-- ------------------------------------------------------------ validation

local function option_set(...)
  local set, names = {}, { ... }
  for i = 1, #names do set[names[i]] = true end
  sort(names)
  set[1] = concat(names, ", ")        -- for messages; never a real option
  return set
end

local NEW_OPTIONS = option_set("store", "durability", "queue_limit",
                               "on_error")
local SUBSCRIBE_OPTIONS = option_set("once")
local PUBLISH_OPTIONS = option_set("priority", "key", "delay", "at",
                                   "correlation_id", "headers")

-- Raises if opts is not nil or a table of known options.
local function check_options(opts, allowed, what, level)
  if opts == nil then return end
  if type(opts) ~= "table" then
    error(("bad options to %s: expected a table, got %s")
          :format(what, type(opts)), level + 1)
  end
  for k in pairs(opts) do
    if type(k) ~= "string" or not allowed[k] then
      error(("unknown option %s to %s (known options: %s)")
            :format(type(k) == "string" and ("%q"):format(k) or tostring(k),
                    what, allowed[1]), level + 1)
    end
  end
end

local function is_callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return type(mt) == "table" and rawget(mt, "__call") ~= nil
end

local function is_integer(n)
  return type(n) == "number" and n == floor(n) and n > -huge and n < huge
end

-- Returns the core of a bus, raising if self is not an open bus.
local function check_bus(self, method)
  if getmetatable(self) ~= Bus then
    error(("use bus:%s(...), not bus.%s(...)"):format(method, method), 3)
  end
  local c = self._core
  if not c then error("attempt to use a closed bus", 3) end
  return c
end

local function check_subject_arg(s, what, example, level)
  if type(s) ~= "string" then
    error(("bad %s: expected a string such as %q, got %s")
          :format(what, example, type(s)), level + 1)
  end
end

-- Validates publish options; returns priority, key, correlation_id, headers.
local function publish_options(opts, level)
  check_options(opts, PUBLISH_OPTIONS, "publish", level + 1)
  local prio = 2
  local p = opts.priority
  if p ~= nil then
    prio = PRIORITIES[p]
    if not prio then
      error(("bad priority %s: expected %s")
            :format(type(p) == "string" and ("%q"):format(p) or tostring(p),
                    PRIORITY_CHOICES), level + 1)
    end
  end
  local key = opts.key
  if key ~= nil and type(key) ~= "string" and not is_integer(key) then
    error(("bad key: expected a string or an integer, got %s")
          :format(type(key)), level + 1)
  end
  local corr = opts.correlation_id
  if corr ~= nil and type(corr) ~= "string" then
    error(("bad correlation_id: expected a string, got %s")
          :format(type(corr)), level + 1)
  end
  local headers = opts.headers
  if headers ~= nil then
    if type(headers) ~= "table" then
      error(("bad headers: expected a table of strings, got %s")
            :format(type(headers)), level + 1)
    end
    for k, v in pairs(headers) do
      if type(k) ~= "string" or type(v) ~= "string" then
        error(("bad headers: names and values must be strings (%s = %s)")
              :format(tostring(k), tostring(v)), level + 1)
      end
    end
  end
  if opts.delay ~= nil or opts.at ~= nil then
    error("delayed events (delay, at) are not available yet: publish "
          .. "without them, or schedule the publish yourself", level + 1)
  end
  return prio, key, corr, headers
end


-- ------------------------------------------------------------ delivery

local function default_on_error(err, ev, sub, trace)
  stderr:write(("buzz: handler for %q failed on %s #%s: %s\n")
               :format(sub.pattern, tostring(ev.type), tostring(ev.id),
                       trace or tostring(err)))
end

-- The core calls this for a failed delivery; on_error runs protected, and
-- an on_error that raises is reported on stderr.
local function reporter(on_error)
  return function(err, ev, sub, trace)
    local ok, e2 = pcall(on_error, err, ev, sub, trace)
    if not ok then
      stderr:write(("buzz: on_error raised while reporting %q: %s\n")
                   :format(tostring(err), tostring(e2)))
    end
  end
end

-- Runs queued deliveries in the core; raises if called from a handler
-- (the core's only refusal, "EINHANDLER").
local function pump(c, max, method)
  local n = c:pump(max)
  if not n then
    error(("bus:%s() called from inside a handler; use "
           .. "bus:publish_sync(...) to deliver an event at once")
          :format(method), 3)
  end
  return n
end

-- The core refused a call: its misuse ("ESUBJECT") is raised at the
-- caller's level; failures of the world are returned.
local function refused(err, code, level)
  if code == "ESUBJECT" then error(err, level + 1) end
  return nil, err, code
end


-- ------------------------------------------------------------ the bus

--- Creates a bus.
---@param opts table|nil store, durability, queue_limit, on_error
---@return table|nil bus, string|nil err, string|nil code
function M.new(opts)
  check_options(opts, NEW_OPTIONS, "buzz.new", 2)
  opts = opts or {}
  local limit = opts.queue_limit
  if limit == nil then
    limit = 100000
  elseif not is_integer(limit) or limit < 1 then
    error(("bad queue_limit: expected a positive integer, got %s")
          :format(tostring(limit)), 2)
  end
  local on_error = opts.on_error
  if on_error ~= nil and not is_callable(on_error) then
    error(("bad on_error: expected a function, got %s"):format(type(on_error)),
          2)
  end
  local durability = opts.durability
  if durability ~= nil and not DURABILITIES[durability] then
    error(('bad durability %s: expected "batch", "sync" or "none"')
          :format(type(durability) == "string" and ("%q"):format(durability)
                  or tostring(durability)), 2)
  end
  if opts.store ~= nil then
    error("the SQLite store is not available yet: omit store for an "
          .. "in-memory bus", 2)
  end
  local c, err, code = core.new(limit,
                                reporter(on_error or default_on_error))
  if not c then return nil, err, code end
  return setmetatable({
    _core = c,                -- false once closed
  }, Bus)
end

local function subscribe(self, c, pattern, handler, opts, is_once, level)
  check_subject_arg(pattern, "pattern", "task.*", level + 1)
  if not is_callable(handler) then
    error(("bad handler: expected a function, got %s"):format(type(handler)),
          level + 1)
  end
  check_options(opts, SUBSCRIBE_OPTIONS, "subscribe", level + 1)
  if opts and opts.once ~= nil then
    if type(opts.once) ~= "boolean" then
      error("bad once: expected a boolean", level + 1)
    end
    is_once = is_once or opts.once
  end
  local sub = setmetatable({
    pattern = pattern, handler = handler, bus = self,
    is_once = is_once or false, is_active = true,
  }, Sub)
  local id, err, code = c:subscribe(pattern, sub, handler, sub.is_once)
  if not id then
    local _, e, k = refused(err, code, level + 1)  -- not a tail call
    return nil, e, k
  end
  sub._id = id
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
local function decorator(self, method, pattern, opts, is_once)
  check_bus(self, method)
  check_subject_arg(pattern, "pattern", "task.*", 3)
  local ok, why = core.check_subject(pattern, true)
  if not ok then error(why, 3) end
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

-- The shared front half of publish and publish_sync. Inside a handler the
-- core inherits the correlation id and sets the causation id itself.
local function publish_args(opts, level)
  if opts == nil then return 2 end     -- the core checks the type itself
  return publish_options(opts, level + 1)
end

--- Queues an event; handlers run when the bus is driven.
---@param etype string a concrete subject, "task.start"
---@param payload any
---@param opts table|nil priority, key, correlation_id, headers
---@return integer|nil id, string|nil err, string|nil code
function Bus:publish(etype, payload, opts)
  local c = check_bus(self, "publish")
  local prio, key, corr, headers = publish_args(opts, 2)
  local id, err, code = c:publish(etype, payload, prio, key, corr, nil,
                                  headers)
  if not id then
    local _, e, k = refused(err, code, 2)     -- not a tail call: levels
    return nil, e, k
  end
  return id
end

--- Delivers an event to its handlers before returning, even in a handler.
---@param etype string
---@param payload any
---@param opts table|nil
---@return integer|nil id, string|nil err, string|nil code
function Bus:publish_sync(etype, payload, opts)
  local c = check_bus(self, "publish_sync")
  local prio, key, corr, headers = publish_args(opts, 2)
  local id, err, code = c:publish_sync(etype, payload, prio, key, corr, nil,
                                       headers)
  if not id then
    local _, e, k = refused(err, code, 2)     -- not a tail call: levels
    return nil, e, k
  end
  return id
end

--- Makes at most max deliveries (default 1); returns how many it made.
---@param max integer|nil
---@return integer
function Bus:step(max)
  local c = check_bus(self, "step")
  if max == nil then
    max = 1
  elseif not is_integer(max) or max < 0 then
    error(("bad max: expected a non-negative integer, got %s")
          :format(tostring(max)), 2)
  end
  c:stop(false)
  return pump(c, max, "step")
end

--- Delivers until nothing is due; returns the number of deliveries.
---@return integer
function Bus:drain()
  local c = check_bus(self, "drain")
  c:stop(false)
  return pump(c, -1, "drain")
end

--- Drives the bus on its own loop until stop(), or until nothing is
--- pending and no timer is armed. Returns the number of deliveries.
---@return integer
function Bus:run()
  local c = check_bus(self, "run")
  c:stop(false)
  local total = 0
  while true do
    local n = pump(c, RUN_BATCH, "run")
    total = total + n
    c = self._core
    if not c or c:is_stopped() then break end
    if n == 0 and not c:wait() then break end
  end
  return total
end

--- Makes run() (or a drain/step in progress) return after the current
--- delivery.
function Bus:stop()
  check_bus(self, "stop"):stop(true)
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
  self._core = false
  return c:close()            -- marks every live subscription inactive
end
Bus.__close = Bus.close

--- Counters from the core: pending, subscriptions, last_id, cached_types,
--- queue_limit.
---@return table
function Bus:stats()
  return check_bus(self, "stats"):stats()
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
  return check_bus(self, "timeout"):timeout()
end

function Bus:__tostring()
  local c = self._core
  return ("buzz.bus (%s)"):format(c and ("%d pending"):format(c:pending())
                                  or "closed")
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
  return true
end
Sub.__close = Sub.unsubscribe

function Sub:__tostring()
  return ("buzz.sub (%q, %s)"):format(self.pattern,
                                      self.is_active and "active" or "ended")
end

return M

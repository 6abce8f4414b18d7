--- buzz.drive: how a bus is driven. step(max), drain() and run() pull due
-- deliveries from the core (task.lua's drive: core:take, then each
-- handler in the bus's one coroutine pool, then core:ack), fire the
-- timers that are due by the bus's clock (retries, delays, windows), and
-- start the supervisor's queued jobs; stop() ends a run; _turn is a host
-- driver's turn (luv, Neovim), _tick and _next_due serve the manual
-- clock. Nothing here waits for the store's writer except step and drain,
-- which deliver what was published (a commit wakes run()'s loop).
-- @module buzz.drive
local task = require "buzz.task"
local util = require "buzz.util"
local options = require "buzz.options"

local error, pairs = error, pairs
local math_max = math.max
local drive, in_handler = task.drive, task.in_handler
local check_number = util.check_number
local RANGE = options.RANGE

local M = {}
local Drive = {}           -- the bus's methods (M.install)

-- Deliveries run() makes between checks of the loop.
local RUN_BATCH = 256
local HUGE = 2 ^ 53     -- no limit: drain's

-- init.lua's check_bus (install sets it).
local check_bus

-- Raises, for the driving method, when called from inside a handler
-- (level 3: the method's caller).
local function not_in_handler(self, method)
  if in_handler(self._task) then
    error(("bus:%s() called from inside a handler; use "
           .. "bus:publish_sync(...) to deliver an event at once")
          :format(method), 3)
  end
end

-- Starts the supervisor's queued jobs that a step(max) left when its
-- budget was spent (task.lua's deferred).
local function flush_deferred(self, t)
  if t.deferred then
    t.deferred = false
    self._sup:flush()
  end
end

-- Answers what bus:serve's servers have queued (lua/buzz/serve.lua).
local function serve_io(self)
  local list = self._servers
  if list and list[1] then require("buzz.serve").pump(self) end
end

-- At most max deliveries, waiting for the commit of written events when
-- nothing else is due (step and drain deliver what was published).
local function pull(self, t, max)
  local n = drive(t, max)
  if not self._store then return n end  -- a memory bus writes nothing
  while n < max and not t.is_stopped do
    local c = self._core
    if not c then break end
    local waited, err = c:wait_commit()
    if err then self._report(err) end
    if not waited then break end
    n = n + drive(t, max - n)
  end
  return n
end

-- Fires the timers due by the bus's clock (while step's budget lasts);
-- returns how many fired.
local function fire_due(self)
  local tl = self._timers
  if tl.n == 0 then return 0 end
  return tl:fire(self._clock:now_ms(), task.is_spent, self._task)
end

--- Makes at most max deliveries (default 1); returns how many it made.
--- Timers that are due (delayed events, retries) fire first.
---@param max integer|nil
---@return integer
-- @function Bus:step
function Drive:step(max)
  check_bus(self, "step")
  if max == nil then
    max = 1
  else
    check_number(max, "max", RANGE.max, 2)
  end
  not_in_handler(self, "step")
  local t = self._task
  t.is_stopped = false
  serve_io(self)
  local start = t.runs
  t.limit = start + max               -- every delivery counts, however
  fire_due(self)                      -- it started: timers (retries),
  if self._core then flush_deferred(self, t) end  -- the supervisor's
  local n = t.runs - start
  if n < max and self._core then pull(self, t, max - n) end
  t.limit = false
  return t.runs - start
end

--- Delivers until nothing is due; returns the number of deliveries.
--- Timers due by the clock fire on the way; later ones wait.
---@return integer
-- @function Bus:drain
function Drive:drain()
  check_bus(self, "drain")
  local t = self._task
  if in_handler(t) then not_in_handler(self, "drain") end
  t.is_stopped = false
  local total, tl = 0, self._timers
  serve_io(self)
  repeat
    if t.deferred then flush_deferred(self, t) end
    local n = pull(self, t, HUGE)     -- (pull ends when a take found
    total = total + n                 -- nothing due)
    if not self._core or tl.n == 0 then break end
  until t.is_stopped or fire_due(self) == 0
  return total
end

-- For a manual clock: the earliest timer of this bus, and a turn of the
-- bus at the clock's new time.
function Drive:_next_due()
  if not self._core then return nil end
  return self._timers:next_due()
end

-- True while one of the bus's handlers runs.
function Drive:_is_in_handler()
  return self._core and in_handler(self._task) or false
end

function Drive:_tick()
  if self._core and not self:_is_in_handler() then self:drain() end
end

-- A host driver's turn (lua/buzz/luv.lua): the timers that are due, then
-- at most max deliveries, as step(max) but never waiting for a commit
-- (the commit wakes the host's poll); nothing on a closed bus, or while
-- a handler runs, or after a timer's callback closed the bus. Returns the
-- deliveries made.
function Drive:_turn(max)
  local t = self._task
  if not self._core or in_handler(t) then return 0 end
  t.is_stopped = false
  serve_io(self)
  if not self._core then return 0 end
  fire_due(self)
  if not self._core then return 0 end
  flush_deferred(self, t)
  return drive(t, max)
end

--- Drives the bus on its own loop until stop(), or until nothing is
--- pending and no timer is armed (housekeeping timers, which Timer:unref
--- marks, do not count). Returns the number of deliveries. It never
--- waits for the store's writer: a commit wakes the loop.
---@return integer
-- @function Bus:run
function Drive:run()
  check_bus(self, "run")
  if self._driver then
    error("bus:run() would block the host loop that drives this bus "
          .. "(buzz.new{ loop = ... }): let the host's loop run it (uv.run(), "
          .. "Neovim's own), or use bus:drain()", 2)
  end
  not_in_handler(self, "run")
  local t = self._task
  t.is_stopped = false
  local total, tl, clock, c = 0, self._timers, self._clock
  while true do
    serve_io(self)
    if not self._core then break end
    flush_deferred(self, t)
    local n = drive(t, RUN_BATCH)
    total = total + n
    c = self._core
    if not c or t.is_stopped then break end
    local fired = fire_due(self)
    c = self._core
    if not c then break end
    if n == 0 and fired == 0 then
      -- Housekeeping timers (a durable window's checkpoints) fire while
      -- run() waits for something else, but do not keep it going.
      local due = not clock.is_manual and tl:has_ref() and tl:next_due()
      c:arm(due and math_max(0, due - clock:now_ms()) or -1)
      if not c:wait() then break end
    end
  end
  if c then c:arm(-1) end
  return total
end

--- Makes run() (or a drain/step in progress) return after the current
--- delivery.
-- @function Bus:stop
function Drive:stop()
  check_bus(self, "stop")
  self._task.is_stopped = true
end

--- Puts the driving methods on the bus class; check_bus is init.lua's.
-- @local
function M.install(Bus, check_bus_fn)
  check_bus = check_bus_fn
  for k, f in pairs(Drive) do Bus[k] = f end
end

return M

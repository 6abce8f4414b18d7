--- Timers and clocks for a bus: delays, retry backoff, timeouts, breaker
-- cool-downs and buzz.sleep all wait here.
--
-- A timer list is a binary min-heap ordered by (due, seq), so timers due at
-- the same millisecond fire in the order they were set. Cancelling marks a
-- timer dead; dead timers are dropped when they reach the top. Nothing here
-- runs on its own: the bus fires what is due when it is driven (step,
-- drain, run) or when a manual clock is advanced.
--
-- A housekeeping timer (a durable window's checkpoint, which re-arms
-- itself for as long as the window lives) is unreferenced, libuv's
-- uv_unref idea: it fires like any other while the bus is driven, and a
-- host loop's timer counts down to it, but it does not keep bus:run()
-- going: has_ref() says whether any other timer is live.
-- @module buzz.timers
local core = require "buzz.core"
local util = require "buzz.util"

local setmetatable, getmetatable, error, pairs, ipairs =
      setmetatable, getmetatable, error, pairs, ipairs
local sort = table.sort
local floor, huge = math.floor, math.huge
local now_ms = core.now_ms

local M = {}

local Timers = {}
Timers.__index = Timers

local Timer = {}
Timer.__index = Timer

--- A new, empty timer list reading the time from clock.
---@param clock table a clock (see real_clock, manual_clock)
---@return table
-- @local
function M.new(clock)
  -- is_held: a host driver's thread is taken (lua/buzz/ngx.lua); fire()
  -- stops, and what is due waits for its next call.
  -- live: timers not yet fired or cancelled; unrefs: those of them
  -- made housekeeping by Timer:unref().
  return setmetatable({ clock = clock, heap = {}, n = 0, seq = 0, live = 0,
                        unrefs = 0, is_held = false }, Timers)
end

-- The heap's order, (due, seq), is written out in each loop below rather
-- than called as a function: the calls were two thirds of a retry's cost.

local function sift_up(h, i)
  local t = h[i]
  local due, seq = t.due, t.seq
  while i > 1 do
    local parent = floor(i / 2)
    local p = h[parent]
    local pd = p.due
    if pd < due or (pd == due and p.seq < seq) then break end
    h[i] = p
    i = parent
  end
  h[i] = t
end

local function sift_down(h, n, i)
  local t = h[i]
  local due, seq = t.due, t.seq
  while true do
    local child = i * 2
    if child > n then break end
    local c = h[child]
    if child < n then
      local r = h[child + 1]
      local rd, cd = r.due, c.due
      if rd < cd or (rd == cd and r.seq < c.seq) then
        child, c = child + 1, r
      end
    end
    local cd = c.due
    if due < cd or (due == cd and seq < c.seq) then break end
    h[i] = c
    i = child
  end
  h[i] = t
end

local function pop(self)
  local h, n = self.heap, self.n
  local top = h[1]
  h[1] = h[n]
  h[n] = nil
  n = n - 1
  self.n = n
  if n > 1 then sift_down(h, n, 1) end
  return top
end

--- Calls fn(a, b) once the clock reaches due (milliseconds on the clock).
---@return table timer with :cancel()
-- @local
function Timers:at(due, fn, a, b)
  local seq = self.seq + 1
  self.seq = seq
  local t = setmetatable({ due = due, seq = seq, fn = fn, a = a, b = b,
                           list = self }, Timer)
  local n = self.n + 1
  self.n = n
  self.heap[n] = t
  sift_up(self.heap, n)
  self.live = self.live + 1
  return t
end

--- Calls fn(a, b) after ms milliseconds.
-- @local
function Timers:after(ms, fn, a, b)
  return self:at(self.clock:now_ms() + ms, fn, a, b)
end

--- Stops the timer from firing; true if it was still due. Idempotent.
-- @local
function Timer:cancel()
  if self.fn == nil then return false end
  self.fn, self.a, self.b = nil, nil, nil
  local list = self.list
  list.live = list.live - 1
  if self.is_unref then list.unrefs = list.unrefs - 1 end
  return true
end

--- Makes the timer housekeeping: it still fires when due while the bus
--- is driven, but does not keep bus:run() going. Returns the timer.
---@return table timer
-- @local
function Timer:unref()
  if self.fn ~= nil and not self.is_unref then
    self.is_unref = true
    self.list.unrefs = self.list.unrefs + 1
  end
  return self
end

--- True while a live timer is not housekeeping: one that bus:run() waits
--- for.
---@return boolean
-- @local
function Timers:has_ref()
  return self.live > self.unrefs
end

--- The due time of the earliest live timer, or nil.
-- @local
function Timers:next_due()
  local h = self.heap
  while self.n > 0 and h[1].fn == nil do pop(self) end
  local top = h[1]
  return top and top.due
end

--- Fires every timer due by now, in (due, seq) order, including those a
--- callback sets for a time already reached, until one sets is_held.
--- Returns how many fired.
-- @local
function Timers:fire(now, is_spent, arg)
  local fired, h = 0, self.heap
  while self.n > 0 and not self.is_held do
    if is_spent and is_spent(arg) then break end  -- step(max)'s budget
    local top = h[1]
    if top.fn ~= nil and top.due > now then break end
    pop(self)
    local fn, a, b = top.fn, top.a, top.b
    if fn ~= nil then
      top.fn, top.a, top.b = nil, nil, nil
      self.live = self.live - 1
      if top.is_unref then self.unrefs = self.unrefs - 1 end
      fired = fired + 1
      fn(a, b)
    end
  end
  return fired
end

--- Live timers.
-- @local
function Timers:count()
  return self.live
end

--- Cancels every timer.
-- @local
function Timers:clear()
  for i = 1, self.n do
    local t = self.heap[i]
    t.fn, t.a, t.b = nil, nil, nil
    self.heap[i] = nil
  end
  self.n, self.live, self.unrefs = 0, 0, 0
end


-- ------------------------------------------------------------ clocks

local RealClock = { is_manual = false }
RealClock.__index = RealClock

function RealClock.now_ms()
  return now_ms()
end

--- Seconds since the epoch, with milliseconds.
-- @local
function RealClock:now()
  return self:now_ms() / 1000
end

local real = setmetatable({}, RealClock)

--- The wall clock (one shared, stateless instance).
-- @local
function M.real_clock()
  return real
end

local ManualClock = { __name = "buzz.clock", is_manual = true }
ManualClock.__index = ManualClock

-- The times a manual clock takes: its start and each advance.
local START = util.range("epoch seconds", 0, util.MAX_SECONDS, false, false,
                         "seconds")
local ADVANCE = util.range("a number >= 0", 0, util.MAX_SECONDS, false,
                           false, "seconds")

--- A clock that moves only when advanced: delays, backoff, timeouts and
--- breakers of the buses using it are then exact and take no real time.
--- It starts at start (epoch seconds), or at the wall clock's time.
---@param start number|nil
---@return table clock
function M.manual_clock(start)
  if start ~= nil then util.check_number(start, "start", START, 2) end
  return setmetatable({ ms = floor((start or now_ms() / 1000) * 1000),
                        buses = setmetatable({}, { __mode = "k" }),
                        nbuses = 0, version = 0 },
                      ManualClock)
end

function ManualClock:now_ms()
  return self.ms
end

--- The clock's time in epoch seconds (an integer when it is whole).
---@return number
function ManualClock:now()
  if getmetatable(self) ~= ManualClock then
    error("use clock:now(), not clock.now()", 2)
  end
  local ms = self.ms
  if ms % 1000 == 0 then return floor(ms / 1000) end
  return ms / 1000
end

--- A bus starts using the clock (buzz.new); buses are ticked in the order
--- they joined.
-- @local
function ManualClock:join(bus)
  self.nbuses = self.nbuses + 1
  self.buses[bus] = self.nbuses
  self.version = self.version + 1
end

function ManualClock:leave(bus)
  self.buses[bus] = nil
  self.version = self.version + 1
end

-- The buses on the clock in the order they joined: a copy, so that a bus
-- made or closed by a handler while they tick changes nothing here.
local function joined(clock)
  local list = {}
  for bus in pairs(clock.buses) do list[#list + 1] = bus end
  local order = clock.buses
  sort(list, function(a, b) return order[a] < order[b] end)
  return list
end

--- Moves the clock forward by seconds. Each timer due on the way fires at
--- its own time, and every bus on the clock is drained then, so a retry
--- set by a retry fires too if it falls within the advance, and an event
--- one bus publishes on another is delivered at once. Not from inside a
--- handler: like bus:drain(), it would deliver there.
---@param seconds number
---@return number now the clock's new time, in epoch seconds
function ManualClock:advance(seconds)
  if getmetatable(self) ~= ManualClock then
    error("use clock:advance(seconds), not clock.advance(seconds)", 2)
  end
  util.check_number(seconds, "seconds", ADVANCE, 2)
  local buses, version = joined(self), self.version
  for _, bus in ipairs(buses) do
    if bus:_is_in_handler() then
      error("clock:advance() called from inside a handler; advance the "
            .. "clock from the code that drives the bus", 2)
    end
  end
  local target = self.ms + floor(seconds * 1000 + 0.5)
  while true do
    local due = huge
    for _, bus in ipairs(buses) do
      local d = bus:_next_due()
      if d and d < due then due = d end
    end
    if due > target then break end
    if due > self.ms then self.ms = due end
    for _, bus in ipairs(buses) do bus:_tick() end
    if self.version ~= version then  -- a handler made or closed a bus
      buses, version = joined(self), self.version
    end
  end
  self.ms = target
  for _, bus in ipairs(joined(self)) do bus:_tick() end
  return self:now()
end

function ManualClock:__tostring()
  return ("buzz.clock (manual, %.3f)"):format(self.ms / 1000)
end

M.is_clock = function(v)
  local mt = getmetatable(v)
  return mt == ManualClock or mt == RealClock
end

return M

--- buzz.dlq: dead letters. A delivery whose last attempt failed becomes a
-- dead letter (failure.lua's Runner:bury makes the record); here are its
-- selection, removal and redrive (the supervisor's), the payload of its
-- $DLQ.<type> event, and the bus's dead_letters, redrive and discard.
-- @module buzz.dlq
local util = require "buzz.util"
local options = require "buzz.options"
local storable = require "buzz.storable"
local core = require "buzz.core"

local type, error, pairs, ipairs = type, error, pairs, ipairs
local setmetatable, getmetatable = setmetatable, getmetatable
local json_encode = core.json_encode
local check_options, is_integer = options.check_options, options.is_integer
local check_positive = options.check_positive
local DEAD_LETTER_OPTIONS = options.DEAD_LETTER_OPTIONS
local check_subject_value = util.check_subject_value
local quote = util.quote

local M = {}
local Sup = {}             -- the supervisor's methods (M.supervisor)
local Dead = {}            -- the bus's methods (M.install)

-- The core's max_payload when buzz.new is given none (csrc/lbuzz.c).
local DEFAULT_MAX_PAYLOAD = 1048576

-- init.lua's check_bus (install sets it).
local check_bus

--- A deep copy of v (cycles and shared tables kept as such), so that
--- what callers get cannot change the records the bus keeps.
---@param v any
---@param seen table|nil
local function deep_copy(v, seen)
  if type(v) ~= "table" then return v end
  seen = seen or {}
  if seen[v] then return seen[v] end
  local t = {}
  seen[v] = t
  for k, x in pairs(v) do t[deep_copy(k, seen)] = deep_copy(x, seen) end
  return setmetatable(t, getmetatable(v))
end

-- Rebuilds an event table from its stored plain form.
local function event_of(e)
  local ev = {}
  for k, v in pairs(e) do ev[k] = v end
  ev.attempt = 1
  return ev
end

-- Error text kept per attempt in a $DLQ event that had to be trimmed.
local TRIMMED_ERROR = 1024

-- The attempts of a $DLQ event being trimmed: the last one only, or all,
-- without tracebacks, their errors cut to TRIMMED_ERROR bytes.
local function trim_attempts(copy, last_only)
  local a, out = copy.attempts or {}, {}
  for i = last_only and #a or 1, #a do
    local x = a[i]
    out[#out + 1] = { attempt = x.attempt, at = x.at,
                      error = x.error and storable.text(x.error,
                                                        TRIMMED_ERROR) }
  end
  copy.attempts = out
  if copy.error then copy.error = storable.text(copy.error, TRIMMED_ERROR) end
end

--- The payload of the $DLQ event of the dead letter rec: a copy (callers
--- cannot change the bus's record). With a store it must be held by
--- JSON within max_payload, or the event would be refused and nobody
--- told: a record JSON cannot hold as it is goes as storable.value makes
--- it; one above the limit is trimmed (is_trimmed = true) step by step
--- until it fits: tracebacks go and errors are cut to 1 KiB, then only
--- the last attempt stays, then the event's payload is left out. The
--- dead letter itself keeps everything.
-- @local
function Sup:dlq_payload(rec)
  local copy = deep_copy(rec)
  local bus = self.bus
  if not bus:_has_store() then return copy end
  local limit = bus._max_payload or DEFAULT_MAX_PAYLOAD
  local text, _, code = json_encode(copy, limit)
  if text then return copy end
  if code == "EINVAL" then
    copy = storable.value(copy)
    if json_encode(copy, limit) then return copy end
  end
  copy.is_trimmed = true
  trim_attempts(copy, false)
  if json_encode(copy, limit) then return copy end
  trim_attempts(copy, true)
  if json_encode(copy, limit) then return copy end
  if type(copy.event) == "table" then copy.event.payload = nil end
  return copy                      -- if it is still too big, announce
end                                -- reports the refusal


-- The dead letters a filter selects: an id, or { subscription, types,
-- limit }; types is a subject pattern over the event's type.
function Sup:select(f)
  local out = {}
  if type(f) == "number" then
    for _, rec in ipairs(self.dead) do
      if rec.id == f then out[1] = rec end
    end
    return out
  end
  f = f or {}
  for _, rec in ipairs(self.dead) do
    if (f.subscription == nil or rec.subscription == f.subscription)
       and (f.types == nil or core.match(f.types, rec.event.type)) then
      out[#out + 1] = rec
      if f.limit and #out >= f.limit then break end
    end
  end
  return out
end

-- Takes the records out of the list (and the store).
function Sup:remove(recs)
  if #recs == 0 then return end
  local gone = {}
  for _, rec in ipairs(recs) do
    gone[rec] = true
    self:del("dead", ("%012d"):format(rec.id))
  end
  local kept = {}
  for _, rec in ipairs(self.dead) do
    if not gone[rec] then kept[#kept + 1] = rec end
  end
  self.dead = kept
end

--- Delivers dead letters again to their subscriptions, from attempt 1;
--- a letter whose subscription is not subscribed stays. Returns how many
--- were redriven.
-- @local
function Sup:redrive(recs)
  local moved, jobs = {}, {}
  for _, rec in ipairs(recs) do
    local r = self.runners[rec.subscription]
    if r and not r.is_closed then
      local job = r:job(event_of(rec.event), 1, (rec.redrives or 0) + 1)
      local h = {}
      for i, a in ipairs(rec.attempts or {}) do h[i] = a end
      job.history = h
      r:admit(job)
      moved[#moved + 1] = rec
      jobs[#jobs + 1] = job
    end
  end
  self:remove(moved)
  self.redriven = self.redriven + #moved
  self:flush()
  for _, job in ipairs(jobs) do job.runner:keep(job) end
  return #moved
end


-- A dead-letter selection: an id, or { subscription, types, limit }.
local function dead_filter(f, method, level)
  if is_integer(f) then return f end
  if type(f) ~= "table" and f ~= nil then
    error(("bad argument to %s: expected a dead letter id or a table of "
           .. "filters, got %s"):format(method, quote(f)), level + 1)
  end
  check_options(f, DEAD_LETTER_OPTIONS, method, level + 1)
  if f then
    if f.subscription ~= nil and type(f.subscription) ~= "string" then
      error(("bad subscription: expected a subscription's name, such as "
             .. "\"billing\", got %s")
            :format(quote(f.subscription)), level + 1)
    end
    if f.types ~= nil then
      check_subject_value(f.types, "types", "order.*", true, level + 1)
    end
    check_positive(f.limit, "limit", true, level + 1)
  end
  return f
end

--- The dead letters, oldest first: each is { id, subscription, pattern,
--- reason ("exhausted" or "fatal"), error, attempts = { { attempt, error,
--- traceback, at } }, event, failed_at, redrives } (times in ms).
---@param filter table|integer|nil an id, or { subscription, types, limit }
---@return table
-- @function Bus:dead_letters
function Dead:dead_letters(filter)
  check_bus(self, "dead_letters")
  local recs = self._sup:select(dead_filter(filter, "dead_letters", 2))
  for i, rec in ipairs(recs) do recs[i] = deep_copy(rec) end
  return recs
end

-- The dead letters filter selects, for a method that changes them (not on
-- a read-only store); an id that is not there raises. The method has
-- checked the bus.
local function dead_to_change(self, method, filter)
  if self._readonly then
    error(("this bus opened its store read-only: it cannot %s")
          :format(method), 3)
  end
  local recs = self._sup:select(dead_filter(filter, method, 3))
  if is_integer(filter) and #recs == 0 then
    error(("no dead letter %d on this bus"):format(filter), 3)
  end
  return recs
end

--- Delivers dead letters again, to the subscription each came from,
--- starting over at attempt 1 (ev.redrives counts the redrives). Letters
--- whose subscription is not subscribed on this bus stay. Returns how
--- many were redriven.
---@param filter table|integer|nil an id, or { subscription, types, limit }
---@return integer
-- @function Bus:redrive
function Dead:redrive(filter)
  check_bus(self, "redrive")
  local recs = dead_to_change(self, "redrive", filter)
  return self._sup:redrive(recs)
end

--- Removes dead letters for good; returns how many.
---@param filter table|integer|nil an id, or { subscription, types, limit }
---@return integer
-- @function Bus:discard
function Dead:discard(filter)
  check_bus(self, "discard")
  local recs = dead_to_change(self, "discard", filter)
  self._sup:remove(recs)
  return #recs
end

M.copy = deep_copy
M.event_of = event_of

--- A dead letter no runner made (a Redis group's entry that reached
--- max_deliveries, or is not a buzz event: lua/buzz/redisgroup.lua),
--- kept, stored and announced as a runner's are; nothing redrives it
--- (no runner has its name).
function Sup:bury_event(name, pattern, ev, reason, err)
  local rec = { id = self.next_dead, subscription = name, pattern = pattern,
    reason = reason, error = err, attempts = {}, event = ev,
    failed_at = self:now(), redrives = 0 }
  self.next_dead = rec.id + 1
  self.dead[#self.dead + 1] = rec
  self:put("dead", ("%012d"):format(rec.id), rec)
  self:announce("$DLQ." .. ev.type, self:dlq_payload(rec))
  return rec
end

--- Puts select, remove, redrive, dlq_payload and bury_event on the
--- supervisor class.
-- @local
function M.supervisor(Supervisor)
  for k, f in pairs(Sup) do Supervisor[k] = f end
end

--- Puts dead_letters, redrive and discard on the bus class.
-- @local
function M.install(Bus, check_bus_fn)
  check_bus = check_bus_fn
  for k, f in pairs(Dead) do Bus[k] = f end
end

return M

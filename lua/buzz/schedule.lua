--- buzz.schedule: events published later. publish with delay or at
-- keeps the event (in the store's "delay" rows too) until its time on
-- the bus's clock; bus:every publishes on a period. The clock and the
-- timer heap are lua/buzz/timers.lua's.
-- @module buzz.schedule
local core = require "buzz.core"
local util = require "buzz.util"
local options = require "buzz.options"
local errors = require "buzz.errors"

local error, pcall, pairs, tonumber = error, pcall, pairs, tonumber
local floor, math_max = math.floor, math.max
local check_positive, is_callable = options.check_positive,
                                    options.is_callable
local check_type_arg = util.check_type_arg

local M = {}
local Sup = {}             -- the supervisor's methods (M.supervisor)
local Sched = {}           -- the bus's methods (M.install)

-- init.lua's check_bus and refused (install sets them).
local check_bus, refused

-- publish with delay or at: checks the type and the payload now (with a
-- store the payload must be JSON), then keeps the event until its time,
-- with the correlation and causation ids it would get now (inside a
-- handler, those of the handler's event). Returns true, "delayed"; the
-- event gets its id when it is published. f holds the checked options;
-- level 3 is the caller of the function that calls this one.
function M.publish_later(self, c, method, etype, payload, opts, f,
                             level)
  if method ~= "publish" then
    error("publish_sync delivers at once: use bus:publish(type, payload, "
          .. "{ delay = seconds }) for a delayed event", level)
  end
  check_type_arg(etype, "task.start", level)
  local now = self._clock:now_ms()
  local due = opts.at and floor(opts.at * 1000 + 0.5)
              or now + floor(opts.delay * 1000 + 0.5)
  if due <= now then
    local id, err, code = c:publish(etype, payload, f.prio, f.key, f.corr,
                                    nil, f.headers, f.dedup, f.version, nil,
                                    self._manual and self._manual.ms or nil)
    if not id then
      local _, e, k = refused(err, code, level)  -- not a tail call: levels
      return nil, e, k
    end
    return id, err
  end
  if self._store then
    local text, err = core.json_encode(payload, self._max_payload)
    if not text then error(("bad payload: %s"):format(err), level) end
  end
  local caus, corr = c:current()
  self._sup:schedule_publish({
    type = etype, payload = payload, priority = f.prio, key = f.key,
    correlation_id = f.corr or corr, causation_id = caus,
    headers = f.headers, dedup = f.dedup, version = f.version, due = due })
  return true, "delayed"
end

-- Publishes a delayed event at its time; a refusal (full queue) tries
-- again a little later, so nothing is lost.
local function publish_due(sup, rec)
  local c = sup:core()
  if not c then return end
  local ok, id, err, code = pcall(c.publish, c, rec.type, rec.payload,
                                  rec.priority, rec.key, rec.correlation_id,
                                  rec.causation_id, rec.headers, rec.dedup,
                                  rec.version, nil, sup.clock.ms)
  if ok and not id and code == "EFULL" then
    sup.timers:after(100, publish_due, sup, rec)
    return
  end
  sup.delays = sup.delays - 1
  if rec.stored then sup:del("delay", rec.stored) end
  if not ok or not id then
    sup.bus:_report_error((errors.wrap("EINVAL",
      ("delayed %s could not be published"):format(rec.type),
      ok and err or id)))
  end
end

--- Keeps rec = { type, payload, priority (0..3), key, correlation_id,
--- causation_id, headers, dedup, version, due } until due, in the store
--- too (stored names the row when it comes from there: due/sequence).
-- @local
function Sup:schedule_publish(rec, stored)
  if stored == nil and self.bus:_has_store() then
    self.seq = self.seq + 1
    stored = ("%016d/%08d"):format(rec.due, self.seq)
    self:put("delay", stored, rec)
  elseif stored then                  -- names made later must not clash
    local seq = tonumber(stored:match("/(%d+)$"))
    if seq and seq > self.seq then self.seq = seq end
  end
  rec.stored = stored
  self.delays = self.delays + 1
  self.timers:at(rec.due, publish_due, self, rec)
end

--- Publishes an event every seconds on the bus's clock, its payload from
--- payload_fn() (called each time; a value is used as is). Returns a
--- handle whose :cancel() stops it.
---@param seconds number
---@param etype string
---@param payload_fn function|any
---@return table handle
-- @function Bus:every
function Sched:every(seconds, etype, payload_fn)
  check_bus(self, "every")
  check_positive(seconds, "seconds", false, 2)
  check_type_arg(etype, "metrics.tick", 2)
  local period = math_max(1, floor(seconds * 1000 + 0.5))
  local handle = { is_active = true }
  local tl, bus, clock = self._timers, self, self._clock
  local function tick(due)
    if not (handle.is_active and bus._core) then return end
    -- The next period after now: after a stall, missed ticks are skipped,
    -- not published in a burst.
    local nxt, now = due + period, clock:now_ms()
    if nxt <= now then nxt = now + period - (now - due) % period end
    handle.timer = tl:at(nxt, tick, nxt)
    local payload = payload_fn
    if is_callable(payload_fn) then
      local pok, v = pcall(payload_fn)
      if not pok then
        bus:_report_error((errors.wrap("ECALLBACK",
          ("every(%s): payload function raised"):format(etype), v)))
        return
      end
      payload = v
      if not bus._core then return end  -- it closed the bus
    end
    local pubok, id, err = pcall(bus.publish, bus, etype, payload)
    if not (pubok and id) then
      bus:_report_error((errors.wrap("EINVAL", ("every(%s)"):format(etype),
                                     pubok and err or id)))
    end
  end
  local first = self._clock:now_ms() + period
  handle.timer = tl:at(first, tick, first)
  function handle.cancel()
    handle.is_active = false
    return handle.timer:cancel()
  end
  return handle
end

--- Puts schedule_publish on the supervisor class.
-- @local
function M.supervisor(Supervisor)
  for k, f in pairs(Sup) do Supervisor[k] = f end
end

--- Puts every on the bus class.
-- @local
function M.install(Bus, check_bus_fn, refused_fn)
  check_bus, refused = check_bus_fn, refused_fn
  for k, f in pairs(Sched) do Bus[k] = f end
end

return M

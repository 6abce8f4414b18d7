--- buzz.alert: thresholds on a bus's metrics (bus:alert), announced as
-- $SYS.alert events.
--
-- Every `every` seconds (by the bus's clock) an alert reads bus:metrics()
-- and takes its value: a dot path into that table ("dead_letters",
-- "subscriptions.billing.in_flight", "store.consumers.reader"), or a
-- function(m, prev, seconds) of the metrics now and at the last check
-- (nil the first time), which is how rates and windowed quantiles are
-- made (M.rate, M.failure_rate, M.quantile). When the value stays past
-- the threshold (above, or below) for `for` seconds, $SYS.alert is
-- published with state "firing"; when it comes back, once more with
-- state "resolved". A value of nil (no data) counts as not past.
--
-- The check's timer does not keep run() from going idle (Timer:unref).
-- A metric function that raises goes to on_error (ECALLBACK), and the
-- next check runs as usual.
-- @module buzz.alert
local util = require "buzz.util"
local errors = require "buzz.errors"

local type, pcall, tostring, error, pairs, ipairs, setmetatable =
      type, pcall, tostring, error, pairs, ipairs, setmetatable
local quote, check_number = util.quote, util.check_number

local M = {}

local OPTIONS = { name = true, metric = true, above = true, below = true,
                  ["for"] = true, every = true }
local KNOWN = "above, below, every, for, metric, name"

local SECONDS = util.range("a positive number", 0, util.MAX_SECONDS, false,
                           true, "seconds")

-- The value at a dot path of metrics table m, or nil.
local function at_path(m, path)
  local v = m
  for part in path:gmatch("[^.]+") do
    if type(v) ~= "table" then return nil end
    v = v[part]
  end
  return v
end

local function value_of(a, m, prev, secs)
  local metric = a.metric
  if type(metric) == "string" then
    local v = at_path(m, metric)
    return type(v) == "number" and v or nil
  end
  local v = metric(m, prev, secs)
  if v ~= nil and type(v) ~= "number" then
    error(("returned %s, not a number"):format(type(v)), 0)
  end
  return v
end

local function is_past(a, v)
  if v == nil or v ~= v then return false end
  if a.above ~= nil and v > a.above then return true end
  if a.below ~= nil and v < a.below then return true end
  return false
end

local function announce(a, state, v, now)
  a.bus:_announce("$SYS.alert", {
    name = a.name, state = state, value = v, above = a.above,
    below = a.below, since = a.since, at = now,
  })
end

local Alert = {}
Alert.__index = Alert

-- One check: reads the metrics, updates the state, announces a change,
-- and arms the next check.
local function check(a)
  local bus = a.bus
  a.timer = nil
  if a.is_cancelled or bus:is_closed() then return end
  local now = bus:_now()
  local ok, m = pcall(bus.metrics, bus)
  if ok then
    local secs = a.prev_at and (now - a.prev_at) / 1000 or nil
    local fine, v = pcall(value_of, a, m, a.prev, secs)
    if not fine then
      bus:_report_error((errors.wrap("ECALLBACK",
        ("the metric of alert %s raised"):format(quote(a.name)), v)))
    elseif is_past(a, v) then
      a.since = a.since or now
      if not a.firing and now - a.since >= a.hold_ms then
        a.firing = true
        announce(a, "firing", v, now)
      end
      a.value = v
    else
      if a.firing then
        a.firing = false
        announce(a, "resolved", v, now)
      end
      a.since, a.value = nil, v
    end
    a.prev, a.prev_at = m, now
  end
  if a.is_cancelled or bus:is_closed() then return end
  a.timer = bus:_after(a.every_ms, check, a)
  a.timer:unref()
end

--- Stops the checks; a firing alert is not resolved. Idempotent.
function Alert:cancel()
  self.is_cancelled = true
  if self.timer then self.timer:cancel() end
  self.timer = nil
end

--- Is the alert firing now? Its last value, too.
function Alert:is_firing()
  return self.firing, self.value
end

local count = 0

--- bus:alert(opts): see the module's comment and README.
function M.new(bus, opts, level)
  if type(opts) ~= "table" then
    error(("bad options to alert: expected a table, got %s")
          :format(type(opts)), level + 1)
  end
  for k in pairs(opts) do
    if not OPTIONS[k] then
      error(("unknown option %s to alert (known options: %s)")
            :format(type(k) == "string" and ("%q"):format(k) or tostring(k),
                    KNOWN), level + 1)
    end
  end
  local metric = opts.metric
  if type(metric) ~= "string" and type(metric) ~= "function" then
    error(("bad metric: expected a dot path into bus:metrics() such as "
           .. "\"dead_letters\" or a function(m, prev, seconds), got %s")
          :format(quote(metric)), level + 1)
  end
  if opts.above == nil and opts.below == nil then
    error("alert needs a threshold: above = n or below = n", level + 1)
  end
  for _, k in ipairs { "above", "below" } do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v ~= v) then
      error(("bad %s: expected a number, got %s"):format(k, quote(v)),
            level + 1)
    end
  end
  if opts["for"] ~= nil then
    check_number(opts["for"], "for", SECONDS, level + 1)
  end
  if opts.every ~= nil then
    check_number(opts.every, "every", SECONDS, level + 1)  -- (> 0)
  end
  if opts.name ~= nil and type(opts.name) ~= "string" then
    error(("bad name: expected a string, got %s"):format(type(opts.name)),
          level + 1)
  end
  count = count + 1
  local a = setmetatable({
    bus = bus, metric = metric, above = opts.above, below = opts.below,
    name = opts.name or (type(metric) == "string" and metric
                         or ("alert " .. count)),
    hold_ms = (opts["for"] or 0) * 1000, every_ms = (opts.every or 1) * 1000,
    firing = false, is_cancelled = false, since = nil, value = nil,
    prev = nil, prev_at = nil, timer = nil,
  }, Alert)
  a.timer = bus:_after(a.every_ms, check, a)
  a.timer:unref()
  return a
end

-- ------------------------------------------------------------ helpers

--- A metric: the per-second rate of the counter at path between checks.
function M.rate(path)
  return function(m, prev, secs)
    if not prev or not secs or secs <= 0 then return nil end
    local now, before = at_path(m, path), at_path(prev, path)
    if type(now) ~= "number" or type(before) ~= "number" then return nil end
    return (now - before) / secs
  end
end

--- A metric: the share of a subscription's deliveries that failed
--- between checks (failed attempts over deliveries), nil without any.
function M.failure_rate(name)
  return function(m, prev)
    local s, p = m.subscriptions[name], prev and prev.subscriptions[name]
    if not s or not p then return nil end
    local delivered = s.delivered - p.delivered
    if delivered <= 0 then return nil end
    return (s.failed - p.failed) / delivered
  end
end

--- A metric: quantile q (0..1) of the histogram at path over what it
--- observed between checks, estimated as Prometheus's histogram_quantile
--- does (linear within the bucket); nil without observations.
function M.quantile(path, q)
  if type(q) ~= "number" or q < 0 or q > 1 then
    error(("bad quantile %s: expected a number from 0 to 1")
          :format(quote(q)), 2)
  end
  return function(m, prev)
    local h, p = at_path(m, path), prev and at_path(prev, path)
    if type(h) ~= "table" or type(p) ~= "table" then return nil end
    local n = #h.counts
    local total = h.counts[n] - p.counts[n]
    if total <= 0 then return nil end
    local rank, below, lower = q * total, 0, 0
    for i = 1, n do
      local cum = h.counts[i] - p.counts[i]
      if cum >= rank then
        local upper = h.bounds[i]
        if upper == nil then return lower end   -- +Inf: the last bound
        local inside = cum - below
        if inside <= 0 then return upper end
        return lower + (upper - lower) * (rank - below) / inside
      end
      below, lower = cum, h.bounds[i] or lower
    end
    return lower
  end
end

return M

--- buzz.policy: the failure-handling options of a subscription, checked
-- and normalised (retry and its backoff, breaker, ordered lanes, timeout,
-- concurrency), and the backoff computed from a retry policy. Pure: no
-- job runs here (lua/buzz/failure.lua runs them). Times come back in
-- milliseconds.
-- @module buzz.policy
local util = require "buzz.util"
local options = require "buzz.options"

local type, error, pairs, tostring = type, error, pairs, tostring
local floor, min, max, random = math.floor, math.min, math.max,
                                math.random
local concat, sort = table.concat, table.sort
local quote = util.quote
local check_positive = options.check_positive

local M = {}

local RETRY_DEFAULTS = { max = 5, base = 0.2, factor = 2, max_delay = 30,
                         jitter = 0.2 }
local BREAKER_DEFAULTS = { failures = 5, within = 10, cool_down = 30 }

local function check_table(v, name, defaults, level)
  if type(v) ~= "table" then
    error(("bad %s: expected %s, got %s")
          :format(name, name == "retry"
                  and "a table such as { max = 5, base = 0.2 }, a number "
                      .. "of attempts, or false (no retries)"
                  or "a table such as { failures = 5, within = 10, "
                     .. "cool_down = 30 }",
                  quote(v)), level + 1)
  end
  local known = {}
  for k in pairs(defaults) do known[#known + 1] = k end
  sort(known)
  for k in pairs(v) do
    if defaults[k] == nil then
      error(("unknown option %s in %s (known: %s)")
            :format(quote(k), name, concat(known, ", ")), level + 1)
    end
  end
end

-- v if it is a number above lo (or at it, unless lo_open), an integer
-- if is_int, and at most util.MAX_INT (counts) or util.MAX_SECONDS
-- (seconds, factors); else raises at level.
local function number_in(v, name, lo, lo_open, is_int, level)
  local hi = is_int and util.MAX_INT or util.MAX_SECONDS
  if type(v) ~= "number" or v ~= v or v > hi or v < lo
     or (lo_open and v == lo) or (is_int and v ~= floor(v)) then
    error(("bad %s: expected %s %s %s, got %s%s")
          :format(name, is_int and "an integer" or "a number",
                  lo_open and ">" or ">=", tostring(lo), quote(v),
                  type(v) == "number" and v > hi and (" (allowed: up to %s)")
                  :format(is_int and "2^53" or ("%g"):format(hi)) or ""),
          level + 1)
  end
  return v
end

--- Validates a retry option: a table of max, base, factor, max_delay,
--- jitter (seconds), or an integer (max attempts); false (no retries) is
--- the caller's to handle. Returns the policy with defaults filled in and
--- times in milliseconds.
function M.retry(v, level)
  if type(v) == "number" then v = { max = v } end
  check_table(v, "retry", RETRY_DEFAULTS, level + 1)
  local p = {}
  for k, d in pairs(RETRY_DEFAULTS) do p[k] = v[k] == nil and d or v[k] end
  number_in(p.max, "retry.max (attempts, counting the first)", 1, false,
            true, level + 1)
  number_in(p.base, "retry.base", 0, false, false, level + 1)
  number_in(p.factor, "retry.factor", 1, false, false, level + 1)
  number_in(p.max_delay, "retry.max_delay", 0, false, false, level + 1)
  number_in(p.jitter, "retry.jitter", 0, false, false, level + 1)
  if p.jitter > 1 then
    error(("bad retry.jitter: expected a fraction from 0 to 1, got %s")
          :format(quote(p.jitter)), level + 1)
  end
  if p.max_delay < p.base then       -- the default cap gives way to base
    if v.max_delay ~= nil then
      error(("bad retry.max_delay: %s is less than retry.base (%s)")
            :format(quote(p.max_delay), quote(p.base)), level + 1)
    end
    p.max_delay = p.base
  end
  return { max = p.max, base = p.base * 1000, factor = p.factor,
           max_delay = p.max_delay * 1000, jitter = p.jitter }
end

--- Validates a breaker option; times come back in milliseconds.
function M.breaker(v, level)
  if v == true then v = {} end
  check_table(v, "breaker", BREAKER_DEFAULTS, level + 1)
  local p = {}
  for k, d in pairs(BREAKER_DEFAULTS) do p[k] = v[k] == nil and d or v[k] end
  number_in(p.failures, "breaker.failures", 1, false, true, level + 1)
  number_in(p.within, "breaker.within", 0, true, false, level + 1)
  number_in(p.cool_down, "breaker.cool_down", 0, true, false, level + 1)
  return { failures = p.failures, within = p.within * 1000,
           cool_down = p.cool_down * 1000 }
end

--- The delay before attempt + 1, in ms: base * factor^(attempt - 1),
--- capped at max_delay, then spread by +-jitter.
---@param p table a retry policy
---@param attempt integer the attempt that failed
---@param rand function|nil returns a number in [0, 1)
function M.backoff(p, attempt, rand)
  local d = min(p.max_delay, p.base * p.factor ^ (attempt - 1))
  if p.jitter > 0 then
    d = d * (1 + p.jitter * (2 * (rand or random)() - 1))
  end
  return max(0, floor(d + 0.5))
end

-- The failure-handling options of a subscription as a policy for the
-- supervisor, or nil when it has none (a plain subscription).
function M.subscription(opts, default_name, level)
  local name = opts.name
  if name ~= nil and (type(name) ~= "string" or name == "") then
    error(("bad name: expected a string such as \"billing\", got %s")
          :format(quote(name)), level + 1)
  end
  local retry, breaker = opts.retry, opts.breaker
  local ordered, timeout, conc = opts.ordered, opts.timeout, opts.concurrency
  if ordered ~= nil and type(ordered) ~= "boolean" then
    error("bad ordered: expected a boolean", level + 1)
  end
  -- A durable consumer is at least once: a failed event must stay
  -- inspectable, so without a policy it becomes a dead letter (retry = 1);
  -- retry = false opts out (the error only goes to on_error).
  if retry == false then
    retry = nil
  elseif retry == nil and opts.durable ~= nil then
    retry = 1
  end
  if retry == nil and breaker == nil and not ordered and timeout == nil
     and conc == nil then
    return nil
  end
  check_positive(timeout, "timeout", false, level + 1)
  check_positive(conc, "concurrency", true, level + 1)
  return {
    name = name or default_name,
    retry = retry ~= nil and M.retry(retry, level + 1) or nil,
    breaker = breaker ~= nil and M.breaker(breaker, level + 1)
              or nil,
    ordered = ordered or false,
    timeout = timeout and floor(timeout * 1000 + 0.5),
    concurrency = conc,
    is_durable = opts.durable ~= nil,
  }
end

return M

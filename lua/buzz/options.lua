--- buzz.options: the validation of what callers give buzz.new, subscribe
-- and publish (known keys, types, ranges), and the parsing of publish's
-- options, which is on the hot path. Each function raises at level
-- counted from its caller, as the code it came from in init.lua did.
-- @module buzz.options
local core = require "buzz.core"
local util = require "buzz.util"
local timers = require "buzz.timers"
local driver = require "buzz.driver"

local type, error, pairs, ipairs, tostring, next =
      type, error, pairs, ipairs, tostring, next
local getmetatable, rawget = getmetatable, rawget
local floor, huge = math.floor, math.huge
local concat, sort = table.concat, table.sort

local M = {}

--- Priorities, most urgent first, and the number the core uses for each.
local PRIORITIES = { critical = 0, high = 1, normal = 2, low = 3 }
local PRIORITY_CHOICES = '"critical", "high", "normal" or "low"'

-- Durability modes and the number the core uses for each.
local DURABILITIES = { none = 0, batch = 1, sync = 2 }



-- The range of max_backlog, in bytes (csrc/buzz.h, BUZZ_BACKLOG_*).
local MIN_BACKLOG, MAX_BACKLOG = 65536, 2 ^ 48



local function option_set(...)
  local set, names = {}, { ... }
  for i = 1, #names do set[names[i]] = true end
  sort(names)
  set[1] = concat(names, ", ")        -- for messages; never a real option
  return set
end

local NEW_OPTIONS = option_set("store", "durability", "queue_limit",
                               "on_error", "readonly", "max_payload",
                               "dedup_window", "max_age", "max_events",
                               "max_size", "max_backlog", "clock", "loop",
                               "metrics_every", "trace", "freeze")
local SUBSCRIBE_OPTIONS = option_set("once", "durable", "start", "name",
                                     "retry", "ordered", "breaker",
                                     "timeout", "concurrency", "filter")
local DEAD_LETTER_OPTIONS = option_set("subscription", "types", "limit")
local PUBLISH_OPTIONS = option_set("priority", "key", "delay", "at",
                                   "correlation_id", "headers", "dedup",
                                   "version", "stream", "expect")
local QUERY_OPTIONS = option_set("types", "from", "to", "key", "limit")
local STORE_INFO_OPTIONS = option_set("types", "events")
local REPLAY_OPTIONS = option_set("types", "from", "to", "key", "limit",
                                  "handler", "consumer")

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

-- An integer every Lua number holds exactly (and JSON carries): within
-- +-2^53. Larger ones (2^63, 1e300) are refused, never rounded or wrapped.
local MAX_INT = util.MAX_INT
local function is_integer(n)
  return type(n) == "number" and n == floor(n) and n >= -MAX_INT
         and n <= MAX_INT
end

local quote = util.quote

-- The ranges of the numeric options (util.check_number names the field
-- and the range in its message).
local range, check_number = util.range, util.check_number
local MAX_SECONDS = util.MAX_SECONDS
local RANGE = {
  count = range("a positive integer", 1, MAX_INT, true),
  seconds = range("a positive number", 0, MAX_SECONDS, false, true,
                  "seconds"),
  -- a window below a millisecond would be none; above a year, memory
  dedup_window = range("a positive number", 0.001, 365 * 86400, false,
                       false, "seconds (a year)"),
  max_age = range("a positive number", 0.001, MAX_SECONDS, false, false,
                  "seconds"),
  version = range("a positive integer", 1, 2 ^ 31 - 1, true),
  key = range("a string or an integer", -MAX_INT, MAX_INT, true),
  max = range("a non-negative integer", 0, MAX_INT, true),
  snapshot = range("a positive number", 0.01, 3600, false, false,
                   "seconds (an hour)"),
}

-- Raises unless v is nil or a number > 0 (an integer if is_int) within
-- its range (rng: RANGE.count or RANGE.seconds unless given).
local function check_positive(v, name, is_int, level, rng)
  if v == nil then return end
  check_number(v, name, rng or (is_int and RANGE.count or RANGE.seconds),
               level + 1)
end

-- Raises unless key is nil, a string or an integer within +-2^53.
local function check_key(key, level)
  if key == nil or type(key) == "string" then return end
  if type(key) ~= "number" then
    error(("bad key: expected a string or an integer, got %s")
          :format(type(key)), level + 1)
  end
  check_number(key, "key", RANGE.key, level + 1)
end

-- The furthest ahead a delay or an at may be, in seconds: its due time in
-- milliseconds stays an exact integer.
local MAX_DELAY = 1e11

-- The validator of publish options, for what core.publish_options (one
-- pass in C: the common options, valid) does not take.
local function check_publish_options(opts, level)
  if type(opts) ~= "table" then
    error(("bad options to publish: expected a table, got %s")
          :format(type(opts)), level + 1)
  end
  -- One pass over what is there (publish is the hot path: a key alone
  -- costs one step), then the checks of what was given, in a fixed order.
  local p, key, corr, headers, delay, at, dedup, version
  for k, v in next, opts do
    if k == "key" then key = v
    elseif k == "priority" then p = v
    elseif k == "correlation_id" then corr = v
    elseif k == "headers" then headers = v
    elseif k == "delay" then delay = v
    elseif k == "at" then at = v
    elseif k == "dedup" then dedup = v
    elseif k == "version" then version = v
    elseif k ~= "stream" and k ~= "expect" then  -- (stream.lua's)
      error(("unknown option %s to publish (known options: %s)")
            :format(type(k) == "string" and ("%q"):format(k) or tostring(k),
                    PUBLISH_OPTIONS[1]), level + 1)
    end
  end
  local prio = 2
  if p ~= nil then
    prio = PRIORITIES[p]
    if not prio then
      error(("bad priority %s: expected %s")
            :format(type(p) == "string" and ("%q"):format(p) or tostring(p),
                    PRIORITY_CHOICES), level + 1)
    end
  end
  if key ~= nil and type(key) ~= "string"             -- a key in range:
     and not (type(key) == "number" and key % 1 == 0  -- no call (hot path)
              and key >= -MAX_INT and key <= MAX_INT) then
    check_key(key, level + 1)
  end
  if corr ~= nil and type(corr) ~= "string" then
    error(("bad correlation_id: expected a string, got %s")
          :format(type(corr)), level + 1)
  end
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
  if delay ~= nil or at ~= nil then
    if delay ~= nil and at ~= nil then
      error("give delay (seconds from now) or at (epoch seconds), not both",
            level + 1)
    end
    if delay ~= nil and (type(delay) ~= "number" or delay ~= delay
                         or delay < 0 or delay == huge) then
      error(("bad delay: expected seconds >= 0, got %s"):format(quote(delay)),
            level + 1)
    end
    if at ~= nil and (type(at) ~= "number" or at ~= at or at < 0
                      or at == huge) then
      error(("bad at: expected epoch seconds, got %s"):format(quote(at)),
            level + 1)
    end
    if (delay or 0) > MAX_DELAY or (at or 0) > MAX_DELAY then
      error(("bad %s %s: more than %g seconds (about 3,000 years) ahead")
            :format(delay and "delay" or "at", quote(delay or at),
                    MAX_DELAY), level + 1)
    end
  end
  if dedup ~= nil and (type(dedup) ~= "string" or dedup == "") then
    error(("bad dedup: expected a non-empty string such as \"req-77\", "
           .. "got %s"):format(quote(dedup)), level + 1)
  end
  if version ~= nil then
    check_number(version, "version", RANGE.version, level + 1)
  end
  return prio, key, corr, headers, dedup, version, delay ~= nil or at ~= nil
end

-- On LuaJIT the validator is compiled, and a call of C is not: it is the
-- faster there.
local scan_publish_options = not rawget(_G, "jit") and core.publish_options

--- Validates publish options; returns priority (0..3), key,
--- correlation_id, headers, dedup, version, and whether delay or at was
--- given.
local function publish_options(opts, level)
  local prio, key, corr, headers, dedup, version
  if scan_publish_options then
    prio, key, corr, headers, dedup, version = scan_publish_options(opts)
    if prio then return prio, key, corr, headers, dedup, version, false end
  end
  local is_later
  prio, key, corr, headers, dedup, version, is_later =
    check_publish_options(opts, level + 1)    -- not a tail call: levels
  return prio, key, corr, headers, dedup, version, is_later
end

-- Validates the options of buzz.new (nil or a table); returns
-- queue_limit (100000 unless given), on_error, durability, store,
-- max_backlog, clock and loop as given.
function M.new(opts, level)
  check_options(opts, NEW_OPTIONS, "buzz.new", level + 1)
  opts = opts or {}
  local limit = opts.queue_limit
  if limit == nil then
    limit = 100000
  else
    check_number(limit, "queue_limit", RANGE.count, level + 1)
  end
  local on_error = opts.on_error
  if on_error ~= nil and not is_callable(on_error) then
    error(("bad on_error: expected a function, got %s"):format(type(on_error)),
          level + 1)
  end
  local durability = opts.durability
  if durability ~= nil and not DURABILITIES[durability] then
    error(('bad durability %s: expected "batch", "sync" or "none"')
          :format(quote(durability)), level + 1)
  end
  local store = opts.store
  if store ~= nil and (type(store) ~= "string" or store == "") then
    error(("bad store: expected the path of a SQLite file such as "
           .. "\"events.db\", got %s"):format(quote(store)), level + 1)
  end
  if store and store:find("\0", 1, true) then
    error(("bad store: the path %s contains a NUL byte; give a path "
           .. "without one"):format(quote(store)), level + 1)
  end
  if store == ":memory:" then
    error('bad store: ":memory:" cannot be shared by the store\'s writer '
          .. "thread and its reader; omit store for an in-memory bus",
          level + 1)
  end
  for _, k in ipairs { "readonly", "freeze" } do
    if opts[k] ~= nil and type(opts[k]) ~= "boolean" then
      error(("bad %s: expected a boolean, got %s"):format(k, quote(opts[k])),
            level + 1)
    end
  end
  check_positive(opts.max_payload, "max_payload", true, level + 1)
  check_positive(opts.dedup_window, "dedup_window", false, level + 1,
                 RANGE.dedup_window)
  check_positive(opts.max_age, "max_age", false, level + 1, RANGE.max_age)
  check_positive(opts.max_events, "max_events", true, level + 1)
  check_positive(opts.max_size, "max_size", true, level + 1)
  local backlog = opts.max_backlog
  if backlog ~= nil and (not is_integer(backlog) or backlog < MIN_BACKLOG
                         or backlog > MAX_BACKLOG) then
    error(("bad max_backlog: expected an integer number of bytes from "
           .. "%d (64 KiB) to 2^48, got %s"):format(MIN_BACKLOG,
                                                   quote(backlog)), level + 1)
  end
  local clock = opts.clock
  if clock ~= nil and not timers.is_clock(clock) then
    error(("bad clock: expected buzz.manual_clock(), got %s")
          :format(quote(clock)), level + 1)
  end
  local loop = opts.loop
  if loop ~= nil then driver.check(loop, level + 1) end  -- raises first
  local tr = opts.trace
  if tr ~= nil and tr ~= true and tr ~= false
     and not (type(tr) == "number" and tr > 0 and tr <= 1) then
    error(("bad trace %s: expected true, or the share of chains to trace "
           .. "(a number above 0, at most 1)"):format(quote(tr)), level + 1)
  end
  if opts.metrics_every ~= nil then
    check_number(opts.metrics_every, "metrics_every", RANGE.snapshot,
                 level + 1)
    if store and opts.readonly then
      error("metrics_every writes the bus's metrics into its store, and "
            .. "this bus opens it read-only", level + 1)
    end
  end
  if not store then
    for _, k in ipairs { "durability", "readonly", "max_age", "max_events",
                         "max_size", "max_backlog", "metrics_every" } do
      if opts[k] ~= nil then
        error(("%s applies to a store: give buzz.new{ store = "
               .. "\"events.db\" } too, or drop %s"):format(k, k), level + 1)
      end
    end
  end
  return limit, on_error, durability, store, backlog, clock, loop
end

-- Validates subscribe's options other than the failure-handling ones
-- (supervision's): is_once is on/once's own, readonly the bus's store's.
-- Returns is_once, durable, start_new.
function M.subscribe(opts, is_once, readonly, level)
  check_options(opts, SUBSCRIBE_OPTIONS, "subscribe", level + 1)
  local durable, start_new
  if opts then
    if opts.once ~= nil then
      if type(opts.once) ~= "boolean" then
        error("bad once: expected a boolean", level + 1)
      end
      is_once = is_once or opts.once
    end
    durable = opts.durable
    if durable ~= nil then
      if type(durable) ~= "string" or durable == "" then
        error(("bad durable: expected a consumer name such as "
               .. "\"billing\", got %s"):format(quote(durable)), level + 1)
      end
      if is_once then
        error("a durable consumer cannot be once: it keeps a position "
              .. "across restarts", level + 1)
      end
      if readonly then
        error("durable consumers save their position, and this bus opened "
              .. "its store read-only", level + 1)
      end
    end
    local start = opts.start
    if start ~= nil then
      if start ~= "all" and start ~= "new" then
        error(('bad start %s: expected "all" (the whole log) or "new" '
               .. '(events after now)'):format(quote(start)), level + 1)
      end
      if durable == nil then
        error("start applies to a durable consumer: give durable = "
              .. "\"name\" too", level + 1)
      end
      start_new = start == "new"
    end
  end
  return is_once, durable, start_new
end

M.PRIORITIES = PRIORITIES
M.DURABILITIES = DURABILITIES
M.RANGE = RANGE
M.MAX_INT = MAX_INT
M.option_set = option_set
M.check_options = check_options
M.is_callable = is_callable
M.is_integer = is_integer
M.check_positive = check_positive
M.check_key = check_key
M.publish_options = publish_options
M.scan_publish_options = scan_publish_options   -- (false on LuaJIT)
M.check_publish_options = check_publish_options   -- after a failed scan
M.SUBSCRIBE_OPTIONS = SUBSCRIBE_OPTIONS
M.QUERY_OPTIONS = QUERY_OPTIONS
M.STORE_INFO_OPTIONS = STORE_INFO_OPTIONS
M.REPLAY_OPTIONS = REPLAY_OPTIONS
M.DEAD_LETTER_OPTIONS = DEAD_LETTER_OPTIONS

return M

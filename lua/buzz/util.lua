--- Small helpers the Lua layer's modules share: how a value is shown in a
-- message, the checks of subjects given as arguments, and dot paths into
-- an event ("payload.cpu.user").
-- @module buzz.util
local core = require "buzz.core"

local type, error, tostring, tonumber = type, error, tostring, tonumber
local floor = math.floor

local M = {}

--- v as a message shows it: strings quoted, NaN as NaN (tostring says
--- nan, -nan or -nan(ind), depending on the platform).
---@param v any
---@return string
function M.quote(v)
  if type(v) == "string" then return ("%q"):format(v) end
  if v ~= v then return "NaN" end
  return tostring(v)
end

--- Raises fmt:format(...) at level, counted from fail's caller as
--- error() counts from there (1: the caller itself, 2: its caller).
function M.fail(level, fmt, ...)
  error(fmt:format(...), level + 1)
end

-- ------------------------------------------------------------ numbers

--- The largest integer every Lua number holds exactly, and JSON carries
--- without loss: counts, sizes, ids and integer keys stay within it.
--- The keys of t, sorted.
function M.sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

M.MAX_INT = 2 ^ 53

--- The longest duration or furthest epoch time an option takes, in
--- seconds (about 3,000 years): its milliseconds stay exact integers.
M.MAX_SECONDS = 1e11

-- n as a range shows it: 2^53 by name, integers in full.
local function show(n)
  if n == M.MAX_INT then return "2^53" end
  if n == -M.MAX_INT then return "-2^53" end
  if n == floor(n) and n > -1e15 and n < 1e15 then
    return ("%d"):format(n)
  end
  return ("%.14g"):format(n)
end

--- A range for check_number: numbers from lo to hi (above lo only, with
--- lo_open), integers only with is_int. what says what is expected
--- ("a positive integer") and unit what the numbers count ("seconds").
---@return table range
function M.range(what, lo, hi, is_int, lo_open, unit)
  local text = (lo_open and "more than %s, up to %s" or "%s to %s")
               :format(show(lo), show(hi))
  if is_int then text = "integers " .. (lo_open and text or "from " .. text) end
  if unit then text = text .. " " .. unit end
  return { what = what, lo = lo, hi = hi, is_int = is_int,
           lo_open = lo_open, text = text }
end

--- Is v a number within the range r (see range)?
function M.in_range(v, r)
  return type(v) == "number" and v >= r.lo and v <= r.hi
         and not (r.lo_open and v == r.lo)
         and not (r.is_int and v ~= floor(v))   -- NaN fails v >= lo
end

--- v, if it is a number within the range r; else raises at level
--- 'bad <name>: expected <r.what>, got <v>'. r.what states the type and
--- the lower bound ("a positive integer"); a number that has them but is
--- out of range (1e300, 2^63, a window below a millisecond) gets the
--- whole range too: '... got 1e+300 (allowed: integers from 1 to 2^53)'.
function M.check_number(v, name, r, level)
  if M.in_range(v, r) then return v end
  local msg = ("bad %s: expected %s, got %s"):format(name, r.what,
                                                     M.quote(v))
  if type(v) == "number" and (v > r.hi or v < -r.hi
                              or (v > 0 and v < r.lo)) then
    msg = ("%s (allowed: %s)"):format(msg, r.text)
  end
  error(msg, level + 1)
end

-- The ranges positive() checks against.
local POSITIVE_INT = M.range("a positive integer", 1, M.MAX_INT, true)
local POSITIVE_SECONDS = M.range("a positive number of seconds", 0,
                                 M.MAX_SECONDS, false, true, "seconds")

--- v, unless it is not a positive number (an integer up to 2^53 with
--- is_int, else seconds up to MAX_SECONDS): then raises "bad <what>: ..."
--- at level.
function M.positive(v, what, is_int, level)
  local n = M.check_number(v, what, is_int and POSITIVE_INT
                           or POSITIVE_SECONDS, level + 1)
  return n                             -- not a tail call: error levels
end

--- Raises (at level) unless s is a string; what names the argument and
--- example shows one.
function M.check_subject_arg(s, what, example, level)
  if type(s) ~= "string" then
    error(("bad %s: expected a string such as %q, got %s")
          :format(what, example, type(s)), level + 1)
  end
end

--- Raises (at level) unless s is a well-formed pattern (is_pattern) or
--- type, with the core's message for one that is not.
function M.check_subject_value(s, what, example, is_pattern, level)
  M.check_subject_arg(s, what, example, level + 1)
  local ok, why = core.check_subject(s, is_pattern)
  if not ok then error(why, level + 1) end
end

--- Raises (at level) unless etype is a type a user may publish: a valid
--- subject, not one of the engine's reserved "$" types.
function M.check_type_arg(etype, example, level)
  M.check_subject_value(etype, "type", example, false, level + 1)
  if etype:sub(1, 1) == "$" then
    error(("bad type %q: types starting with \"$\" are reserved for the "
           .. "engine ($DLQ.>, $SYS.>)"):format(etype), level + 1)
  end
end

--- The steps of a dot path: "payload.items.1" -> { "payload", "items", 1 }
--- (a step of digits is an integer index), or nil for what is not a
--- string or has an empty step ("a..b", ".a", "a.", "").
---@param path any
---@return table|nil
function M.steps(path)
  if type(path) ~= "string" then return nil end
  local steps = {}
  for step in (path .. "."):gmatch("([^.]*)%.") do
    if step == "" then return nil end
    steps[#steps + 1] = step:match("^%d+$") and tonumber(step) or step
  end
  return steps
end

--- A function reading the value at steps from a table, nil when a step
--- goes through something that is not a table.
---@param steps table
---@return function get(t) -> value
function M.getter(steps)
  local n = #steps
  local s1, s2 = steps[1], steps[2]
  if n == 1 then                       -- the usual paths, unrolled
    return function(t)
      if type(t) ~= "table" then return nil end
      return t[s1]
    end
  elseif n == 2 then
    return function(t)
      if type(t) ~= "table" then return nil end
      local v = t[s1]
      if type(v) ~= "table" then return nil end
      return v[s2]
    end
  end
  return function(t)
    local v = t
    for i = 1, n do
      if type(v) ~= "table" then return nil end
      v = v[steps[i]]
    end
    return v
  end
end

return M

--- Small helpers the Lua layer's modules share: how a value is shown in a
-- message, the checks of subjects given as arguments, and dot paths into
-- an event ("payload.cpu.user").
-- @module buzz.util
local core = require "buzz.core"

local type, error, tostring, tonumber = type, error, tostring, tonumber

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

--- v, unless it is not a positive number (an integer with is_int, else
--- seconds): then raises "bad <what>: ..." at level.
function M.positive(v, what, is_int, level)
  if type(v) ~= "number" or v ~= v or v <= 0 or v == math.huge
     or (is_int and v ~= math.floor(v)) then
    error(("bad %s: expected a positive %s, got %s")
          :format(what, is_int and "integer" or "number of seconds",
                  M.quote(v)), level + 1)
  end
  return v
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

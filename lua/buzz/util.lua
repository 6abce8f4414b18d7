--- Small helpers the Lua layer's modules share: how a value is shown in a
-- message, and dot paths into an event ("payload.cpu.user").
-- @module buzz.util
local type, tostring, tonumber = type, tostring, tonumber

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

--- Error codes: the core's one map (csrc/buzz.h) and the "CODE: message"
-- text that on_error and every `nil, err, code` return carry.
-- Modules that report a failure of their own build the text here, so a
-- code the core does not know is a bug caught where it is made.
-- @module buzz.errors
local core = require "buzz.core"
local type, tostring, error, pairs, pcall = type, tostring, error, pairs, pcall
local match, format = string.match, string.format

local M = {}

--- Every code the core knows, and its short meaning: { EFULL = "queue is
--- full", ... } (a copy: changing it changes nothing).
---@return table<string, string>
function M.codes()
  local t = {}
  for k, v in pairs(core.errors) do t[k] = v end
  return t
end

local CODES = core.errors

--- The code that err starts with ("EFULL: ..." -> "EFULL"), if err is a
--- string and the code one of the map's; else nil.
---@param err any
---@return string|nil
function M.code_of(err)
  if type(err) ~= "string" then return nil end
  local code = match(err, "^(E%u+): ")
  if code and CODES[code] then return code end
  return nil
end

--- "CODE: message". Raises if code is not in the map (a bug in buzz).
---@param code string
---@param message string
---@return string
function M.text(code, message)
  if not CODES[code] then
    error(format("buzz: unknown error code %q (not in core.errors)",
                 tostring(code)), 2)
  end
  return code .. ": " .. message
end

--- Reports a failure in context: "CODE: context: inner", where inner is
--- err without its own code, and CODE is err's code, or default when err
--- has none (a raised value, a message from elsewhere).
---@param default string the code when err carries none
---@param context string what was being done
---@param err any what failed
---@return string text, string code
function M.wrap(default, context, err)
  local code = M.code_of(err)
  local ok, inner = pcall(tostring, err)
  if not ok or type(inner) ~= "string" then
    inner = "(an error value that cannot be shown)"
  end
  if code then
    inner = inner:sub(#code + 3)
  else
    code = default
  end
  return M.text(code, context .. ": " .. inner), code
end

return M

--- Storable text and values: what a handler raises, and the records the
-- failure machinery keeps, made safe for the store.
--
-- A failed delivery is kept as JSON (a stored retry, a dead letter, the
-- $DLQ event), and JSON (csrc/json.c) refuses a NUL byte; bytes that are
-- not UTF-8 pass through cJSON but make the text invalid JSON for every
-- other reader. Error text comes from the user: so that the record can
-- always be written, error text (and tracebacks) are made storable where
-- they are captured: NUL is written \0 and each byte that is not part of
-- a UTF-8 character \xHH (visible, and never mistaken for the real
-- bytes), and text longer than TEXT_MAX bytes is cut there with a marker
-- "... [truncated N bytes]". Any value raised becomes such a text, even a
-- table whose __tostring raises.
--
-- For the rare record that still cannot be encoded (an event table a
-- handler changed to hold a function, say), value() gives a copy JSON
-- holds. What this module does not do: it never changes what on_error is
-- given, nor a payload that encodes as it is.
-- @module buzz.storable
local core = require "buzz.core"

local type, tostring, pcall, pairs, ipairs, getmetatable, rawget =
      type, tostring, pcall, pairs, ipairs, getmetatable, rawget
local format = string.format
local sort = table.sort
local floor, huge = math.floor, math.huge
local json_encode, json_text, null = core.json_encode, core.json_text,
                                    core.null

local M = {}

--- Bytes of error text (or traceback) kept; the rest is cut off with a
--- marker. The $DLQ event must fit max_payload (1 MiB by default) with
--- the event and a few attempts.
M.TEXT_MAX = 65536

--- s as text the store can keep: NUL as \0, bytes that are not UTF-8 as
--- \xHH, and, past limit bytes (default TEXT_MAX; false: no limit), cut
--- with "... [truncated N bytes]" (N counts the bytes of s left out).
--- Text that needs none of it comes back as it is. (csrc/json.c does the
--- work: a Lua pattern would cost ~200 instructions a byte of every
--- traceback.)
---@param s string
---@param limit integer|false|nil
---@return string
function M.text(s, limit)
  if limit == nil then limit = M.TEXT_MAX end
  return json_text(s, limit or 0)
end
local text = M.text

-- tostring(v), or nil when that raises or gives no string (a __tostring
-- that raises, or returns a table on LuaJIT).
local function safe_tostring(v)
  local ok, s = pcall(tostring, v)
  if ok and type(s) == "string" then return s end
  return nil
end

-- The error steering objects of lua/buzz/failure.lua (buzz.fatal,
-- buzz.retry_after) carry what was raised in err.
local WRAPPERS = {}

--- Registers a metatable whose objects carry the raised value in .err:
--- describe() describes that value.
function M.wrapper(mt)
  WRAPPERS[mt] = true
end

--- A storable sentence for any value a handler may raise: a string as it
--- is (made storable), a table by its __tostring or as JSON, nil and
--- other values by their type. Never raises.
---@param err any
---@return string
function M.describe(err)
  local t = type(err)
  if t == "string" then return text(err) end
  if t == "table" then
    local mt = getmetatable(err)
    if WRAPPERS[mt] then return M.describe(rawget(err, "err")) end
    if type(mt) == "table" and rawget(mt, "__tostring") then
      local ok, s = pcall(tostring, err)
      if ok and type(s) == "string" then return text(s) end
      if ok then
        return "error object (a table whose __tostring gave a " .. type(s)
               .. ")"
      end
      return text("error object (a table whose __tostring raised: "
                  .. (type(s) == "string" and s or type(s)) .. ")")
    end
    local json = json_encode(err, M.TEXT_MAX)
    if json then return text("error object " .. json) end
    return "error object (" .. (safe_tostring(err) or "table") .. ")"
  end
  if t == "nil" then return "error raised with no value (nil)" end
  return text(format("error object (%s %s)", t, safe_tostring(err) or "?"))
end


-- ------------------------------------------------------------ values

local MAX_SAFE = 2 ^ 53 - 1

local function safe(v, seen, depth)
  local t = type(v)
  if t == "string" then return text(v, false) end
  if t == "number" then
    if v ~= v or v == huge or v == -huge
       or (v == floor(v) and (v > MAX_SAFE or v < -MAX_SAFE)) then
      return tostring(v)
    end
    return v
  end
  if t == "boolean" or v == nil or v == null then return v end
  if t ~= "table" then
    return "(" .. (safe_tostring(v) or t) .. ")"
  end
  if seen[v] then return "(a cycle)" end
  if depth >= 100 then return "(nested too deep)" end
  seen[v] = true
  local n, count, out = #v, 0, {}
  for _ in pairs(v) do count = count + 1 end
  if n > 0 and n == count then          -- an array: 1..n
    for i = 1, n do
      local x = safe(v[i], seen, depth + 1)
      out[i] = x == nil and null or x
    end
  else                                  -- an object: keys as text
    local keys, names = {}, {}
    for k in pairs(v) do
      keys[#keys + 1] = k
      names[k] = type(k) == "string" and text(k, false)
                 or (type(k) == "number" and tostring(k))
                 or "(" .. (safe_tostring(k) or type(k)) .. ")"
    end
    sort(keys, function(a, b) return names[a] < names[b] end)
    for _, k in ipairs(keys) do out[names[k]] = safe(v[k], seen, depth + 1) end
  end
  seen[v] = nil
  return out
end

--- A copy of v that JSON holds: strings made storable (not cut),
--- numbers JSON cannot hold and other values as text, cycles and tables
--- nested past 100 levels as a note, keys as text. For a record that
--- failed to encode; it never raises.
---@param v any
---@return any
function M.value(v)
  return safe(v, {}, 0)
end

return M

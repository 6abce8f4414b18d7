--- buzz.clitext: what bin/buzz prints and how it fails: UTC times read
-- and written, JSON with sorted keys (so equal events print alike), one
-- event a line, columns, sizes; usage errors and failures raised as
-- tables that bin/buzz's main() catches (exit 2 and 1).
--
-- Only bin/buzz uses it; it is not part of the library's API.
local core = require "buzz.core"

local type, tostring, pairs, ipairs, error = type, tostring, pairs, ipairs,
                                             error
local floor, max = math.floor, math.max
local concat, sort = table.concat, table.sort
local format, rep = string.format, string.rep
local stdout, stderr = io.stdout, io.stderr
local date = os.date
local json_encode, json_null = core.json_encode, core.null

local M = {}

-- ------------------------------------------------------------ failures

-- Usage errors and failures travel as raised tables, caught in main().
function M.usage_error(msg, cmd)
  error({ exit = 2, msg = msg, cmd = cmd }, 0)
end

function M.fail(msg)
  error({ exit = 1, msg = msg }, 0)
end

-- Returns the value, or fails with the store's message: for the
-- nil, err, code triples of the API.
function M.checked(v, err)
  if v == nil then M.fail(tostring(err)) end
  return v
end


-- ------------------------------------------------------------ time

-- Days from 1970-01-01 to a date of the proleptic Gregorian calendar.
local function days_from_civil(y, m, d)
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- Epoch seconds of "YYYY-MM-DD[(T| )hh:mm[:ss[.fff]]][Z]", read as UTC;
-- nil if s is not such a time.
function M.parse_time(s)
  local y, mo, d, rest = s:match("^(%d%d%d%d)%-(%d%d)%-(%d%d)(.*)$")
  if not y then return nil end
  local h, mi, sec = 0, 0, 0
  if rest ~= "" and rest ~= "Z" then
    local hh, mm, tail = rest:match("^[T ](%d%d):(%d%d)(.*)$")
    if not hh then return nil end
    h, mi = tonumber(hh), tonumber(mm)
    local ss, more = tail:match("^:(%d%d%.?%d*)(.*)$")
    if ss then sec, tail = tonumber(ss), more end
    if not sec or (tail ~= "" and tail ~= "Z") then return nil end
  end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo < 1 or mo > 12 or d < 1 or d > 31 or h > 23 or mi > 59
     or sec >= 61 then
    return nil
  end
  return days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec
end

-- ISO 8601 UTC time with milliseconds of a ts (ms since the epoch).
function M.iso_time(ts)
  local s = floor(ts / 1000)
  return date("!%Y-%m-%dT%H:%M:%S", s) .. format(".%03dZ", ts - s * 1000)
end


-- ------------------------------------------------------------ JSON


-- True if t is a non-empty array: keys exactly 1..#t.
local function is_array(t)
  local n, count = #t, 0
  if n == 0 then return false end
  for _ in pairs(t) do count = count + 1 end
  return count == n
end

local function encode_table(t, indent, depth, seen)
  if seen[t] then M.fail("cannot print a table that contains itself") end
  seen[t] = true
  local parts, array = {}, is_array(t)
  if array then
    for i = 1, #t do parts[i] = M.encode(t[i], indent, depth + 1, seen) end
  else
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = tostring(k) end
    sort(keys)
    for i, k in ipairs(keys) do
      local v = t[k]
      if v == nil then v = t[tonumber(k)] end
      parts[i] = M.checked(json_encode(k)) .. (indent and ": " or ":")
                 .. M.encode(v, indent, depth + 1, seen)
    end
  end
  seen[t] = nil
  local open, close = "{", "}"
  if array then open, close = "[", "]" end
  if #parts == 0 then return open .. close end
  if not indent then return open .. concat(parts, ",") .. close end
  local pad = "\n" .. rep(indent, depth + 1)
  return open .. pad .. concat(parts, "," .. pad) .. "\n"
         .. rep(indent, depth) .. close
end

--- JSON text of a decoded value, object keys sorted; compact without
--- indent, else pretty-printed with indent per level.
---@param v any
---@param indent string|nil
---@return string
function M.encode(v, indent, depth, seen)
  if type(v) == "table" then
    return encode_table(v, indent, depth or 0, seen or {})
  end
  if v == nil then v = json_null end
  return M.checked(json_encode(v))
end

-- Envelope fields in the order --json and show print them.
local ENVELOPE = { "id", "type", "ts", "priority", "key", "correlation_id",
                   "causation_id", "version", "stream", "stream_version",
                   "attempt", "headers", "payload" }
local IN_ENVELOPE = {}
for _, k in ipairs(ENVELOPE) do IN_ENVELOPE[k] = true end

--- One event as a JSON object on one line, fields in envelope order, then
--- any others the API adds, by name.
---@param ev table
---@return string
function M.event_json(ev)
  local names, parts = {}, {}
  for _, k in ipairs(ENVELOPE) do names[#names + 1] = k end
  local extra = {}
  for k in pairs(ev) do
    if not IN_ENVELOPE[k] and type(k) == "string" then
      extra[#extra + 1] = k
    end
  end
  sort(extra)
  for _, k in ipairs(extra) do names[#names + 1] = k end
  for _, k in ipairs(names) do
    if ev[k] ~= nil then
      parts[#parts + 1] = M.checked(json_encode(k)) .. ":" .. M.encode(ev[k])
    end
  end
  return "{" .. concat(parts, ",") .. "}"
end


-- ------------------------------------------------------------ output

-- A key as shown: raw when it is plain, JSON when a string could be
-- misread (spaces, or digits that would pass for an integer key).
function M.key_text(k)
  if type(k) == "number" then return format("%d", k) end
  if k:match("^[%w_.:/@+-]+$") and not k:match("^%-?%d+$") then return k end
  return M.encode(k)
end

-- Cuts s to width columns (UTF-8 characters), ending with an ellipsis.
function M.cut(s, width)
  if #s <= width then return s end
  local cols, i = 0, 1
  while i <= #s do
    local b = s:byte(i)
    if b < 0x80 or b >= 0xC0 then
      if cols == width - 1 then return s:sub(1, i - 1) .. "…" end
      cols = cols + 1
    end
    i = i + 1
  end
  return s
end

--- One event as ls and tail print it.
---@param ev table
---@return string
function M.event_line(ev)
  local parts = { format("%d", ev.id), M.iso_time(ev.ts), ev.type }
  if ev.key ~= nil then parts[#parts + 1] = "key=" .. M.key_text(ev.key) end
  parts[#parts + 1] = M.encode(ev.payload)
  return concat(parts, " ")
end

-- Writes one event; width cuts lines (nil: never). A stored row that does
-- not decode is not printed as a null payload: its EDECODE message goes
-- to stderr, and opts.is_undecodable makes the command exit 1.
function M.print_event(ev, opts, width)
  if ev.decode_error then
    stdout:flush()
    stderr:write("buzz: ", ev.decode_error, "\n")
    opts.is_undecodable = true
    return
  end
  local line = opts.json and M.event_json(ev) or M.event_line(ev)
  if width and not opts.json then line = M.cut(line, width) end
  stdout:write(line, "\n")
end

-- Writes rows as columns padded to their widest cell.
function M.print_table(rows, indent)
  local widths = {}
  for _, row in ipairs(rows) do
    for j, cell in ipairs(row) do
      widths[j] = max(widths[j] or 0, #cell)
    end
  end
  for _, row in ipairs(rows) do
    local cells = {}
    for j, cell in ipairs(row) do
      cells[j] = j < #row and cell .. rep(" ", widths[j] - #cell) or cell
    end
    stdout:write(indent, concat(cells, "  "), "\n")
  end
end

function M.human_size(bytes)
  local units, n, u = { "bytes", "KiB", "MiB", "GiB", "TiB" }, bytes, 1
  while n >= 1024 and u < #units do n, u = n / 1024, u + 1 end
  if u == 1 then return format("%d bytes", bytes) end
  return format("%.1f %s (%d bytes)", n, units[u], bytes)
end

return M

--- Shared helpers for the benchmarks: timing, memory readings, output.
-- Timing is CPU time (os.clock). Every measurement is warmed up, calibrated
-- so that one run takes about RUN_SECONDS, then run RUNS times; the best run
-- is reported. A full GC precedes every run, outside the timed region, so a
-- run pays only for the garbage it makes itself.
-- @module bench.util
local clock, floor, huge, min, max = os.clock, math.floor, math.huge,
                                     math.min, math.max
local collectgarbage, error, tonumber, tostring, type =
      collectgarbage, error, tonumber, tostring, type
local open, popen, write = io.open, io.popen, io.write
local format, rep = string.format, string.rep

local M = {}

M.RUN_SECONDS = 0.3      -- target CPU time of one timed run
M.RUNS = 3               -- timed runs per measurement; the best is kept
M.CALIBRATE_SECONDS = 0.05

M.is_jit = type(jit) == "table"

--- The checkout's root, as a prefix of the running script's path
--- ("" when it runs from the root: lua5.4 bench/run.lua).
M.root = (arg and arg[0] or ""):match("^(.-)bench/[%w_]+%.lua$") or ""

--- For a benchmark run on its own (`lua5.4 bench/NAME.lua`):
--- true, with the checkout's Lua layer and build (build/<flavour>, or
--- $BUZZ_BUILD: bench/metrics_cost.sh's build without metrics) put first
--- on the package paths; false when it is loaded by bench/run.lua.
---@param name string the benchmark's file name, without .lua
---@return boolean
function M.standalone(name)
  local script = arg and arg[0] or ""
  if not script:match("bench/" .. name .. "%.lua$") then return false end
  local root, flavour = M.root, M.is_jit and "luajit" or "lua5.4"
  package.path = root .. "lua/?.lua;" .. root .. "lua/?/init.lua;"
                 .. root .. "?.lua;" .. package.path
  local build = os.getenv("BUZZ_BUILD") or (root .. "build/" .. flavour)
  package.cpath = build .. "/?.so;" .. package.cpath
  return true
end

--- The end of a benchmark file: run alone with `--case NAME [N]`, one
--- case for callgrind (bench/instructions.sh) through M.run_case; alone
--- without, the whole table through M.run; loaded by bench/run.lua,
--- nothing.
---@param bench table the benchmark's module
---@param is_main boolean what standalone() said
function M.main(bench, is_main)
  if not is_main then return end
  if arg[1] == "--case" then
    bench.run_case(arg[2], tonumber(arg[3]) or 10000)
  else
    bench.run()
  end
end

--- The interpreter, as people name it.
---@return string
function M.interpreter()
  if M.is_jit then return jit.version end
  return _VERSION
end

--- Full collection, twice so that finalizers and their garbage are gone.
function M.full_gc()
  collectgarbage("collect")
  collectgarbage("collect")
end

-- Runs body(n) once after a full GC; returns its CPU seconds. body returns
-- the number of handler calls it caused, which must be n * per.
local function timed(label, body, n, per)
  M.full_gc()
  local t0 = clock()
  local calls = body(n)
  local t = clock() - t0
  if calls ~= n * per then
    error(format("%s: %d events made %s handler calls, expected %d",
                 label, n, tostring(calls), n * per), 0)
  end
  return t
end

--[[
Measures body(n) -> handler calls. opts.per: handler calls per event
(default 1); opts.max_n: the most events one run may make (a queue bound).
Returns events per CPU second of the best run, and the run's n.
]]
function M.measure(label, body, opts)
  opts = opts or {}
  local per, max_n = opts.per or 1, opts.max_n or 1e9
  local n = min(1000, max_n)
  timed(label, body, n, per)                       -- warm-up
  local t
  while true do
    t = timed(label, body, n, per)
    if t >= M.CALIBRATE_SECONDS or n >= max_n then break end
    n = min(max_n, t < M.CALIBRATE_SECONDS / 10 and n * 10 or n * 2)
  end
  n = floor(min(max_n, max(n, n * M.RUN_SECONDS / max(t, 1e-6))))
  local best = huge
  for _ = 1, M.RUNS do
    best = min(best, timed(label, body, n, per))
  end
  return n / max(best, 1e-9), n
end


-- ------------------------------------------------------------ memory

local page_size

local function get_page_size()
  if page_size then return page_size end
  page_size = 4096
  local p = popen and popen("getconf PAGESIZE 2>/dev/null")
  if p then
    local s = tonumber(p:read("*l") or "")
    p:close()
    if s and s > 0 then page_size = s end
  end
  return page_size
end

--- Resident set size of this process in bytes, from /proc/self/statm.
---@return integer|nil bytes
function M.rss()
  local ps = get_page_size()
  local f = open("/proc/self/statm", "r")
  if not f then return nil end
  local line = f:read("*l")
  f:close()
  local pages = tonumber(line and line:match("^%d+%s+(%d+)"))
  return pages and pages * ps
end

--- Bytes in the Lua heap.
---@return number
function M.heap()
  return collectgarbage("count") * 1024
end


-- ------------------------------------------------------------ output

local LABEL_WIDTH = 34

--- A section title.
function M.section(title)
  write("\n", title, "\n", rep("-", #title), "\n")
end

local NOTE_WIDTH = 96

--- Prose, indented and wrapped at NOTE_WIDTH columns; a leading run of
--- spaces in s indents every line.
function M.note(s)
  local indent, text = s:match("^( *)(.*)$")
  indent = "  " .. indent
  local line = indent
  for word in text:gmatch("%S+") do
    if #line > #indent and #line + 1 + #word > NOTE_WIDTH then
      write(line, "\n")
      line = indent .. "  " .. word
    elseif #line > #indent then
      line = line .. " " .. word
    else
      line = line .. word
    end
  end
  write(line, "\n")
end

--- Target verdict; under LuaJIT marked * (the targets are set for 5.4).
---@param is_ok boolean
---@return string
function M.verdict(is_ok)
  local v = is_ok and "ok" or "MISS"
  if M.is_jit then v = v .. "*" end
  return v
end

--- A rate row: label, events/s, then free-form columns.
---@param label string
---@param rate number events per second
---@param rest string|nil
function M.row(label, rate, rest)
  write(format("  %-" .. LABEL_WIDTH .. "s %10d ev/s", label, floor(rate + 0.5)))
  if rest and rest ~= "" then write("   ", rest) end
  write("\n")
end

--- "1.23x mediator  (target >= 1.10x)  ok" for a ratio row.
---@param ratio number
---@param name string what the ratio is against
---@param target number|nil
---@return string
function M.ratio(ratio, name, target)
  local s = format("%7.2fx %s", ratio, name)
  if target then
    s = format("%-18s (target >= %gx)  %s", s, target,
               M.verdict(ratio >= target))
  end
  return s
end

--- Thousands separators: 1234567 -> "1,234,567".
---@param n number
---@return string
function M.commas(n)
  local s = tostring(floor(n + 0.5))
  local sign, digits = s:match("^(-?)(%d+)$")
  if not digits then return s end
  digits = digits:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  if digits:sub(1, 1) == "," then digits = digits:sub(2) end
  return sign .. digits
end

return M

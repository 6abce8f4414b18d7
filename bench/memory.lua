--- Benchmark 3: memory per pending event, 1,000,000 events queued.
-- Each variant runs in a fresh interpreter (bench/run.lua --memory-probe),
-- so the RSS delta is not hidden by memory that earlier benchmarks freed
-- but the allocator kept. The probe subscribes one handler (an event with no
-- audience is never queued), takes readings after a full GC, queues N events
-- with a payload that costs nothing per event (nil, or one shared table),
-- takes readings again, then drains and closes.
-- @module bench.memory
local util = require "bench.util"
local buzz = require "buzz"
local clock, format, tonumber, popen = os.clock, string.format, tonumber,
                                       io.popen
local pairs, error, tostring, concat = pairs, error, tostring, table.concat

local M = {}

local N = 1000000
local TARGET_BYTES = 200

local VARIANTS = { "nil", "table" }
local LABELS = {
  ["nil"] = "nil payload",
  table = "one shared payload table",
}

--- Queues N events in this process and returns the readings.
---@param variant string "nil" | "table"
---@return table
function M.probe(variant)
  local payload
  if variant == "table" then
    payload = { task_id = "1735560000" }
  elseif variant ~= "nil" then
    error("unknown memory probe variant " .. tostring(variant), 0)
  end
  local calls = 0
  local bus = buzz.new{ queue_limit = 2 * N }
  bus:subscribe("task.start", function() calls = calls + 1 end)
  bus:publish("task.start", payload)       -- the type is known, pools exist
  bus:drain()
  calls = 0
  util.full_gc()
  local r = { n = N, rss0 = util.rss(), heap0 = util.heap() }
  local t0 = clock()
  for _ = 1, N do bus:publish("task.start", payload) end
  r.publish_s = clock() - t0
  r.pending = bus:stats().pending
  util.full_gc()
  r.rss1, r.heap1 = util.rss(), util.heap()
  t0 = clock()
  r.drained = bus:drain()
  r.drain_s = clock() - t0
  r.calls = calls
  r.discarded = bus:close()
  util.full_gc()
  r.rss2, r.heap2 = util.rss(), util.heap()
  return r
end

--- The probe's readings as one line, for the parent to parse.
function M.encode(r)
  local parts = { "buzz-memory-probe" }
  for k, v in pairs(r) do parts[#parts + 1] = format("%s=%.17g", k, v) end
  return concat(parts, " ")
end

local function decode(line)
  if not line or not line:match("^buzz%-memory%-probe") then return nil end
  local r = {}
  for k, v in line:gmatch("([%w_]+)=(%S+)") do r[k] = tonumber(v) end
  return r
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- Runs the probe in a child interpreter; falls back to this process.
local function run_variant(interp, script, variant)
  if interp and script and popen then
    local p = popen(format("%s %s --memory-probe %s 2>&1", shell_quote(interp),
                           shell_quote(script), variant))
    if p then
      local out = p:read("*a")
      p:close()
      local r
      for line in out:gmatch("[^\n]+") do r = decode(line) or r end
      if r then return r, "fresh process" end
      util.note("memory probe failed in a child process, running it here:")
      util.note(out)
    end
  end
  return M.probe(variant), "this process (RSS may be understated)"
end

--- Runs the benchmark and prints its table.
---@param interp string|nil the interpreter command (arg[-1])
---@param script string|nil this script's path (arg[0])
function M.run(interp, script)
  local worst
  util.section(format("3. memory: %s pending events (payload excluded)",
                      util.commas(N)))
  for i = 1, #VARIANTS do
    local v = VARIANTS[i]
    local r, where = run_variant(interp, script, v)
    if r.pending ~= N or r.drained ~= N or r.calls ~= N then
      error(format("memory probe (%s): pending %s, drained %s, handler "
                   .. "calls %s; expected %d each", v, tostring(r.pending),
                   tostring(r.drained), tostring(r.calls), N), 0)
    end
    local per_heap = (r.heap1 - r.heap0) / N
    util.note(format("%s (measured in %s):", LABELS[v], where))
    if r.rss0 and r.rss1 then
      local per_rss = (r.rss1 - r.rss0) / N
      worst = worst and math.max(worst, per_rss) or per_rss
      util.note(format("  RSS        %7.1f bytes/event  (target <= %d)  %s",
                       per_rss, TARGET_BYTES, util.verdict(per_rss <= TARGET_BYTES)))
      util.note(format("    of which Lua heap %5.1f, C core and allocator %5.1f",
                       per_heap, per_rss - per_heap))
    else
      util.note(format("  Lua heap   %7.1f bytes/event  (no /proc/self/statm)",
                       per_heap))
    end
    util.note(format("  RSS %.1f MiB before, %.1f MiB queued, %.1f MiB after "
                     .. "drain + close",
                     (r.rss0 or 0) / 1048576, (r.rss1 or 0) / 1048576,
                     (r.rss2 or 0) / 1048576))
    util.note(format("  queued at %s ev/s, drained at %s ev/s",
                     util.commas(N / r.publish_s), util.commas(N / r.drain_s)))
  end
  M.goals = {
    { worst and format("<= %d B per pending event (RSS, worst variant: "
                       .. "%.1f B)", TARGET_BYTES, worst)
      or format("<= %d B per pending event (no RSS reading)", TARGET_BYTES),
      worst ~= nil and worst <= TARGET_BYTES },
  }
end

return M

--- Benchmark 7: a tumbling-window average over 1,000 groups. buzz's
-- route:window against the same aggregation written by hand (a table of
-- sums per group, flushed at the window's end) fed by a plain handler on
-- the same bus; and the memory an open group takes.
-- @module bench.aggregate

package.path = (arg and arg[0] or ""):gsub("bench/[%w_]+%.lua$", "?.lua")
               .. ";" .. package.path      -- finds bench.util from anywhere
local util = require "bench.util"
local is_main = util.standalone("aggregate")
local buzz = require "buzz"
local format, floor = string.format, math.floor

local M = {}

local GROUPS = 1000
local BATCH = 1000              -- events per drain; the clock moves 1 s

local results = 0

-- payloads cycle through the groups
local PAYLOADS = {}
for g = 1, GROUPS do PAYLOADS[g] = { host = "h" .. g, pct = g % 100 } end

-- body(n): publishes n events over the groups, a second of clock time
-- every BATCH of them.
local function feeder(bus, clock)
  return function(n)
    for i = 1, n do
      bus:publish("m.cpu", PAYLOADS[i % GROUPS + 1])
      if i % BATCH == 0 then
        bus:drain()
        clock:advance(1)
      end
    end
    bus:drain()
    return n
  end
end

local function buzz_body()
  local clock = buzz.manual_clock(1800000000)
  local bus = buzz.new{ clock = clock, queue_limit = BATCH * 2 }
  bus:route("m.cpu"):window{ tumbling = 60 }:group_by("payload.host")
    :reduce(buzz.agg.avg("payload.pct"))
    :handle(function() results = results + 1 end)
  return feeder(bus, clock), bus
end

-- By hand: sums per group in the open window, flushed when time passes
-- its end.
local function hand_body()
  local clock = buzz.manual_clock(1800000000)
  local bus = buzz.new{ clock = clock, queue_limit = BATCH * 2 }
  local open_start, sums, order = nil, {}, {}
  local function flush()
    for _, g in ipairs(order) do
      local s = sums[g]
      local _ = s.sum / s.n
      results = results + 1
    end
    sums, order = {}, {}
  end
  bus:subscribe("m.cpu", function(ev)
    local start = floor(ev.ts / 60000) * 60000
    if start ~= open_start then
      if open_start then flush() end
      open_start = start
    end
    local host = ev.payload.host
    local s = sums[host]
    if not s then
      s = { sum = 0, n = 0 }
      sums[host] = s
      order[#order + 1] = host
    end
    s.sum, s.n = s.sum + ev.payload.pct, s.n + 1
  end)
  return feeder(bus, clock), bus
end

-- Bytes of Lua heap per open group: one window with `groups` groups.
local function bytes_per_group(groups)
  util.full_gc()
  local clock = buzz.manual_clock(1800000000)
  local bus = buzz.new{ clock = clock, queue_limit = groups + 1 }
  bus:route("m.cpu"):window{ tumbling = 60 }:group_by("payload.host")
    :reduce(buzz.agg.avg("payload.pct")):handle(function() end)
  local hosts = {}
  for g = 1, groups do hosts[g] = { host = "g" .. g, pct = 1 } end
  util.full_gc()
  local before = util.heap()
  for g = 1, groups do bus:publish("m.cpu", hosts[g]) end
  bus:drain()
  util.full_gc()
  local per = (util.heap() - before) / groups
  bus:close()
  return per
end

--- Runs the benchmark and prints its table.
function M.run()
  util.section("7. tumbling-window average, 1,000 groups")
  local b1, bus1 = buzz_body()
  local b2, bus2 = hand_body()
  local rb = util.measure("window", b1)
  local rh = util.measure("hand", b2)
  rb = math.max(rb, util.measure("window", b1))
  rh = math.max(rh, util.measure("hand", b2))
  bus1:close()
  bus2:close()
  util.row("buzz route:window avg", rb, util.ratio(rb / rh, "by hand"))
  util.row("by hand, in a plain handler", rh)
  util.note(format("one open window holds about %.0f bytes of Lua heap per "
                   .. "group (10,000 groups; the payloads not counted)",
                   bytes_per_group(10000)))
end

-- One case for callgrind (bench/instructions.sh): n events through the
-- window (window) or the hand-written aggregation (hand).
function M.run_case(name, n)
  local make = ({ window = buzz_body, hand = hand_body })[name]
  if not make then error("no case " .. tostring(name), 0) end
  local body, bus = make()
  body(n)
  bus:close()
end

util.main(M, is_main)

return M

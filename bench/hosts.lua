--- Benchmark 8: what a host loop costs per event. The same bus and handler
-- driven by hand (bus:drain()), by the core's own loop (bus:run()) and by
-- a luv loop (buzz.new{ loop = uv }, lua/buzz/luv.lua), side by side in
-- one process: in bursts of BURST events, and one event per wake-up (a
-- source that publishes from a luv callback on every loop iteration, the
-- worst case for a host driver: a poll, a prepare and a turn per event).
-- @module bench.hosts

package.path = (arg and arg[0] or ""):gsub("bench/[%w_]+%.lua$", "?.lua")
               .. ";" .. package.path      -- finds bench.util from anywhere
local util = require "bench.util"
local is_main = util.standalone("hosts")
local buzz = require "buzz"
local has_luv, uv = pcall(require, "luv")
local format, min = string.format, math.min

local M = {}

local BURST = 1000              -- events published before each drive

local calls = 0
local function handler() calls = calls + 1 end

local PAYLOAD = { n = 1 }

-- body(n): publishes n events in bursts, driving the bus with drive()
-- after each burst.
local function bursts(bus, drive)
  return function(n)
    calls = 0
    local left = n
    while left > 0 do
      local k = min(BURST, left)
      for _ = 1, k do bus:publish("host.ev", PAYLOAD) end
      drive(k)
      left = left - k
    end
    return calls
  end
end

local function plain_bus()
  local bus = buzz.new{ queue_limit = BURST * 2 }
  bus:subscribe("host.ev", handler)
  return bus
end

-- A luv-driven bus whose handler stops the loop once `target` calls are
-- made, so that uv.run() returns after each burst.
local target = 0
local function luv_bus()
  local bus = buzz.new{ loop = uv, queue_limit = BURST * 2 }
  bus:subscribe("host.ev", function()
    calls = calls + 1
    if calls >= target then uv.stop() end
  end)
  return bus
end

local function luv_drive(k)
  target = calls + k
  uv.run()
end

-- One event per loop iteration: an idle handle publishes one event each
-- time round the loop, and the handler stops the loop after n.
local function luv_trickle(bus)
  return function(n)
    calls, target = 0, n
    local sent = 0
    local idle = uv.new_idle()
    idle:start(function()
      if sent < n then
        sent = sent + 1
        bus:publish("host.ev", PAYLOAD)
      end
    end)
    uv.run()
    idle:close()
    uv.run("nowait")
    return calls
  end
end

-- The same by hand: publish one, drain, n times.
local function drain_trickle(bus)
  return function(n)
    calls = 0
    for _ = 1, n do
      bus:publish("host.ev", PAYLOAD)
      bus:drain()
    end
    return calls
  end
end

--- Runs the benchmark and prints its table.
function M.run()
  util.section("8. host loops: drain() vs run() vs a luv loop, per event")
  if not has_luv then
    util.note("skipped: luv is not installed (Debian's lua-luv)")
    return
  end
  local drained, ran, luved = plain_bus(), plain_bus(), luv_bus()
  local b_drain = bursts(drained, function() drained:drain() end)
  local b_run = bursts(ran, function() ran:run() end)
  local b_luv = bursts(luved, luv_drive)
  local t_drain = drain_trickle(drained)
  local t_luv = luv_trickle(luved)
  -- Two rounds, the best of each kept: the cases take turns.
  local r = { 0, 0, 0, 0, 0 }
  for _ = 1, 2 do
    r[1] = math.max(r[1], util.measure("drain", b_drain))
    r[2] = math.max(r[2], util.measure("run", b_run))
    r[3] = math.max(r[3], util.measure("luv", b_luv))
    r[4] = math.max(r[4], util.measure("drain 1", t_drain))
    r[5] = math.max(r[5], util.measure("luv 1", t_luv))
  end
  drained:close()
  ran:close()
  luved:close()
  local function ns(rate) return format("%6.0f ns/event", 1e9 / rate) end
  util.row(format("bursts of %d, drain()", BURST), r[1], ns(r[1]))
  util.row(format("bursts of %d, run()", BURST), r[2],
           ns(r[2]) .. "  " .. util.ratio(r[2] / r[1], "drain()"))
  util.row(format("bursts of %d, luv loop", BURST), r[3],
           ns(r[3]) .. "  " .. util.ratio(r[3] / r[1], "drain()")
           .. ", " .. format("%.2fx run()", r[3] / r[2]))
  util.row("one per call, publish + drain()", r[4], ns(r[4]))
  util.row("one per loop iteration, luv", r[5],
           ns(r[5]) .. "  " .. util.ratio(r[5] / r[4], "drain()"))
  util.note(format("the luv loop makes at most %d deliveries per turn; one "
                   .. "event per iteration pays a poll, a prepare and a "
                   .. "turn for each", require("buzz.luv").TURN))
end

if is_main then M.run() end

return M

--- Benchmark 1: one exact subject, one subscriber, a trivial handler.
-- buzz (publish_sync; publish + drain in three batch shapes) against
-- mediator_lua and a bare pcall loop, the floor for any bus that isolates
-- handler errors.
-- @module bench.dispatch
local util = require "bench.util"
local buzz = require "buzz"
local pcall, format = pcall, string.format

local M = {}

local SUBJECT = "task.start"
local BATCH_MAX = 1000000      -- the most events one "publish N" run queues

-- Targets (Lua 5.4), as ratios to mediator.
local TARGET_SYNC = 1.10
local TARGET_QUEUED = 0.80

local calls = 0
local function handler()
  calls = calls + 1
end

-- Each body(n) makes n events and returns the handler calls they caused.

local function buzz_sync(payload)
  local bus = buzz.new()
  bus:subscribe(SUBJECT, handler)
  return function(n)
    calls = 0
    for _ = 1, n do bus:publish_sync(SUBJECT, payload) end
    return calls
  end, bus
end

-- publish all n, then one drain.
local function buzz_batch_all(payload)
  local bus = buzz.new{ queue_limit = BATCH_MAX }
  bus:subscribe(SUBJECT, handler)
  return function(n)
    calls = 0
    for _ = 1, n do bus:publish(SUBJECT, payload) end
    bus:drain()
    return calls
  end, bus
end

-- publish size events, drain, repeat.
local function buzz_batch_of(size, payload)
  local bus = buzz.new{ queue_limit = size }
  bus:subscribe(SUBJECT, handler)
  return function(n)
    calls = 0
    local k = 0
    for _ = 1, n do
      bus:publish(SUBJECT, payload)
      k = k + 1
      if k == size then
        bus:drain()
        k = 0
      end
    end
    bus:drain()
    return calls
  end, bus
end

local function mediator_literal(Mediator, payload)
  local m = Mediator()
  m:subscribe({ "task", "start" }, handler)
  return function(n)
    calls = 0
    for _ = 1, n do m:publish({ "task", "start" }, payload) end
    return calls
  end
end

local function mediator_hoisted(Mediator, payload)
  local m = Mediator()
  local ns = { "task", "start" }
  m:subscribe(ns, handler)
  return function(n)
    calls = 0
    for _ = 1, n do m:publish(ns, payload) end
    return calls
  end
end

local function pcall_floor(payload)
  return function(n)
    calls = 0
    for _ = 1, n do pcall(handler, payload) end
    return calls
  end
end

--- Runs the benchmark and prints its table.
function M.run()
  util.section("1. one exact subject (\"task.start\"), one subscriber, "
               .. "trivial handler")
  local ok, Mediator = pcall(require, "mediator")
  if not ok then
    util.note("mediator_lua is missing (apt-get install lua-mediator): "
              .. "section skipped")
    return
  end
  local payload = { task_id = "1735560000" }
  local results, buses = {}, {}
  local function measure(key, body, bus, opts)
    results[key] = util.measure(key, body, opts)
    if bus then buses[#buses + 1] = bus end
  end

  -- Peers first, so each buzz row can print its ratio.
  measure("mediator", mediator_literal(Mediator, payload))
  measure("mediator_hoisted", mediator_hoisted(Mediator, payload))
  measure("pcall", pcall_floor(payload))
  measure("sync", buzz_sync(payload))
  local body, bus = buzz_batch_all(payload)
  measure("batch_all", body, bus, { max_n = BATCH_MAX })
  measure("batch_1000", buzz_batch_of(1000, payload))
  measure("batch_1", buzz_batch_of(1, payload))
  for i = 1, #buses do buses[i]:close() end

  local med = results.mediator
  local function row(label, key, target)
    util.row(label, results[key], util.ratio(results[key] / med, "mediator",
                                             target))
  end
  row("buzz publish_sync", "sync", TARGET_SYNC)
  row("buzz publish N + drain once", "batch_all", TARGET_QUEUED)
  row("buzz publish 1000 + drain, repeat", "batch_1000", TARGET_QUEUED)
  row("buzz publish 1 + drain, repeat", "batch_1", TARGET_QUEUED)
  row("mediator_lua publish", "mediator")
  row("mediator_lua, hoisted namespace", "mediator_hoisted")
  row("floor: pcall(handler, payload)", "pcall")
  local hm = results.mediator_hoisted
  util.note(format("against mediator with a hoisted namespace table: "
                   .. "publish_sync %.2fx, publish N + drain %.2fx, "
                   .. "publish 1 + drain %.2fx",
                   results.sync / hm, results.batch_all / hm,
                   results.batch_1 / hm))
  if util.is_jit then
    util.note("LuaJIT compiles the mediator and pcall loops, inlining the "
              .. "trivial handler (the hoisted and floor rows are then close "
              .. "to an empty loop); buzz crosses the Lua C API and resumes "
              .. "a coroutine per delivery, which traces cannot compile")
  end
  util.note(format("buzz cost per event above the pcall floor: publish_sync "
                   .. "%.0f ns, publish N + drain %.0f ns",
                   1e9 / results.sync - 1e9 / results.pcall,
                   1e9 / results.batch_all - 1e9 / results.pcall))
end

return M

--- Benchmark 5: failure handling. Deliveries to a subscription with a retry
-- policy when 1% of first attempts fail (and succeed when retried) against
-- the same subscription with none failing; the cost of ordered = true over
-- 1,000 keys; and, as the peer, a plain pcall loop that keeps failed
-- events in a Lua list and retries them, the least any retrying bus does.
-- Time is a manual clock that the run advances by TICK seconds after each
-- batch of BATCH events (so 20,000 events a second of its time) and past
-- every retry at the end: retries fall due while the run goes on, inside
-- the timed region, which never sleeps.
-- @module bench.failure

package.path = (arg and arg[0] or ""):gsub("bench/[%w_]+%.lua$", "?.lua")
               .. ";" .. package.path      -- finds bench.util from anywhere
local util = require "bench.util"
local is_main = util.standalone("failure")
local cpu_clock = os.clock
local buzz = require "buzz"
local pcall, error, ipairs, pairs, format, floor = pcall, error, ipairs, pairs,
                                          string.format, math.floor

local M = {}

local SUBJECT = "task.start"
local FAIL_EVERY = 100         -- 1% of first attempts fail
local KEYS = 1000
local BATCH = 1000             -- publish this many, drain, advance TICK
local TICK = 0.05
local TARGET_FAILING = 0.90    -- 1% failing, as a ratio to 0% failing
local ROUNDS = 8

local calls = 0                -- handler calls that succeeded: one per
                               -- event once its retries are through

local function quiet() end

-- The first attempt of every FAIL_EVERY-th event fails. Event i has key
-- (i + floor(i / FAIL_EVERY)) % KEYS: one key after another, and the
-- failing events' keys (101 m % 1000 for i = 100 m) go round every key.
-- Every handler makes the same test, failing or not (a remainder of -1
-- never comes), so the cases differ only in what buzz does.
local function key_of(i)
  return (i + floor(i / FAIL_EVERY)) % KEYS
end

-- A bus on a manual clock, its subscription made with opts, and body(n):
-- publishes n events (payload i), drains and advances the clock every
-- BATCH, then advances it past every retry. With is_failing, the handler fails the first
-- attempt of the events fails() picks.
local function buzz_body(opts, is_failing, keyed)
  local clock = buzz.manual_clock(1000)
  local bus = buzz.new{ clock = clock, on_error = quiet,
                        queue_limit = BATCH * 2 }
  local rem = is_failing and 0 or -1
  bus:subscribe(SUBJECT, function(ev)
    if ev.payload % FAIL_EVERY == rem and ev.attempt == 1 then
      error("flaky", 0)
    end
    calls = calls + 1
  end, opts)
  local popts = {}
  return function(n)
    calls = 0
    local k = 0
    for i = 1, n do
      if keyed then popts.key = key_of(i) end
      bus:publish(SUBJECT, i, keyed and popts or nil)
      k = k + 1
      if k == BATCH then
        bus:drain()
        clock:advance(TICK)
        k = 0
      end
    end
    bus:drain()
    clock:advance(60)
    return calls
  end, bus
end

-- The peer: pcall each handler call; a failed event goes on a list that is
-- retried after the batch.
local function pcall_retry_floor(is_failing)
  local attempt = {}
  local rem = is_failing and 0 or -1
  local function handler(i)
    if i % FAIL_EVERY == rem and attempt[i] == nil then
      error("flaky", 0)
    end
    calls = calls + 1
  end
  return function(n)
    calls = 0
    local retry, nr = {}, 0
    for i = 1, n do
      if not pcall(handler, i) then
        attempt[i] = 1
        nr = nr + 1
        retry[nr] = i
      end
    end
    for j = 1, nr do pcall(handler, retry[j]) end
    for j = 1, nr do attempt[retry[j]] = nil end
    return calls
  end
end

local RETRY = { max = 5, base = 0.1, jitter = 0.2 }  -- two batches

-- name, subscription options, is_failing, keyed.
M.CASES = {
  { "plain", nil, false, false },
  { "retry0", { retry = RETRY }, false, false },
  { "retry1", { retry = RETRY }, true, false },
  { "plain_keyed", nil, false, true },
  { "ordered", { ordered = true }, false, true },
  { "ordered1", { ordered = true, retry = RETRY }, true, true },
}

--- Every case's body by name, the peers' too, and the buses to close.
function M.bodies()
  local bodies, buses = {}, {}
  for _, case in ipairs(M.CASES) do
    bodies[case[1]], buses[case[1]] = buzz_body(case[2], case[3], case[4])
  end
  bodies.floor0 = pcall_retry_floor(false)
  bodies.floor1 = pcall_retry_floor(true)
  return bodies, buses
end

--- Runs the benchmark and prints its table.
function M.run()
  util.section("5. failure handling: retries, ordered lanes")
  local results, bodies, buses = {}, M.bodies()
  local cases = M.CASES
  -- util.measure calibrates each case (its n: about RUN_SECONDS a run);
  -- then ROUNDS rounds time every case once, taking turns, and the best
  -- run of each is kept, so that a ratio compares runs made side by side.
  local keys, ns = {}, {}
  for _, case in ipairs(cases) do keys[#keys + 1] = case[1] end
  keys[#keys + 1], keys[#keys + 2] = "floor0", "floor1"
  for _, key in ipairs(keys) do
    results[key], ns[key] = util.measure(key, bodies[key])
  end
  for _ = 1, ROUNDS do
    for _, key in ipairs(keys) do
      util.full_gc()
      local t0 = cpu_clock()
      local handled = bodies[key](ns[key])
      local t = cpu_clock() - t0
      if handled ~= ns[key] then
        error(("%s: %d of %d events handled"):format(key, handled, ns[key]),
              0)
      end
      results[key] = math.max(results[key], ns[key] / math.max(t, 1e-9))
    end
  end
  for _, bus in pairs(buses) do bus:close() end

  local r = results
  util.row("buzz plain subscription", r.plain)
  util.row("buzz retry, 0% failing", r.retry0,
           util.ratio(r.retry0 / r.plain, "plain"))
  util.row("buzz retry, 1% failing once", r.retry1,
           util.ratio(r.retry1 / r.retry0, "0% failing", TARGET_FAILING))
  util.row("buzz plain, 1,000 keys", r.plain_keyed)
  util.row("buzz ordered = true, 1,000 keys", r.ordered,
           util.ratio(r.ordered / r.plain_keyed, "plain keyed"))
  util.row("buzz ordered + retry, 1% failing", r.ordered1,
           util.ratio(r.ordered1 / r.ordered, "ordered, 0%"))
  util.row("peer: pcall + retry list, 0%", r.floor0)
  util.row("peer: pcall + retry list, 1%", r.floor1,
           util.ratio(r.floor1 / r.floor0, "0% failing"))
  util.note(format("events per CPU second, every event handled (a 1%% run "
                   .. "makes %.2f handler calls per event). buzz retry vs the "
                   .. "peer: 0%% %.2fx, 1%% %.2fx. Supervision costs %.0f ns "
                   .. "per delivery over a plain subscription; ordered lanes "
                   .. "%.0f ns.", 1 + 1 / FAIL_EVERY, r.retry0 / r.floor0,
                   r.retry1 / r.floor1, 1e9 / r.retry0 - 1e9 / r.plain,
                   1e9 / r.ordered - 1e9 / r.plain_keyed))
end

--- One case's body, run once over n events (for instruction counts:
--- `lua5.4 bench/failure.lua --case retry1 20000` under callgrind).
function M.run_case(name, n)
  local body = M.bodies()[name]
  if not body then error("no case " .. tostring(name), 0) end
  local handled = body(n)
  if handled ~= n then
    error(("%s: %d of %d events handled"):format(name, handled, n), 0)
  end
end

util.main(M, is_main)

return M

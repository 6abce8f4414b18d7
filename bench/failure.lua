--- Benchmark 5: failure handling. Deliveries to a subscription with a retry
-- policy when 1% of first attempts fail (and succeed when retried) against
-- the same subscription with none failing; the cost of ordered = true over
-- 1,000 keys; and, as the peer, a plain pcall loop that keeps failed
-- events in a Lua list and retries them, the least any retrying bus does.
-- Retries are due after base seconds on a manual clock, which the run
-- advances once it has published everything, so the timed region holds the
-- retries too and never sleeps.
-- @module bench.failure

local root = (arg and arg[0] or ""):match("^(.-)bench/[%w_]+%.lua$") or ""
local is_main = (arg and arg[0] or ""):match("bench/failure%.lua$") ~= nil
if is_main then
  local flavour = type(jit) == "table" and "luajit" or "lua5.4"
  package.path = root .. "lua/?.lua;" .. root .. "lua/?/init.lua;"
                 .. root .. "?.lua;" .. package.path
  package.cpath = root .. "build/" .. flavour .. "/?.so;" .. package.cpath
end

local util = require "bench.util"
local buzz = require "buzz"
local pcall, error, ipairs, format, floor = pcall, error, ipairs,
                                          string.format, math.floor

local M = {}

local SUBJECT = "task.start"
local FAIL_EVERY = 100         -- 1% of first attempts fail
local KEYS = 1000
local BATCH = 1000             -- publish this many, then drain
local TARGET_FAILING = 0.90    -- 1% failing, as a ratio to 0% failing
local ROUNDS = 2

local calls = 0                -- handler calls that succeeded: one per
                               -- event once its retries are through

local function quiet() end

-- A bus on a manual clock, its subscription made with opts, and body(n):
-- publishes n events (payload i), drains every BATCH, then advances the
-- clock past every retry. The handler fails the first attempt of every
-- fail_every-th event (none if fail_every is nil).
local function buzz_body(opts, fail_every, keyed)
  local clock = buzz.manual_clock(1000)
  local bus = buzz.new{ clock = clock, on_error = quiet,
                        queue_limit = BATCH * 2 }
  bus:subscribe(SUBJECT, function(ev)
    if fail_every and ev.attempt == 1 and ev.payload % fail_every == 0 then
      error("flaky", 0)
    end
    calls = calls + 1
  end, opts)
  local popts = {}
  return function(n)
    calls = 0
    local k = 0
    for i = 1, n do
      if keyed then popts.key = floor(i / 3) % KEYS end  -- over keys
      bus:publish(SUBJECT, i, keyed and popts or nil)
      k = k + 1
      if k == BATCH then
        bus:drain()
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
local function pcall_retry_floor(fail_every)
  local attempt = {}
  local function handler(i)
    if fail_every and attempt[i] == nil and i % fail_every == 0 then
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

--- Runs the benchmark and prints its table.
function M.run()
  util.section("5. failure handling: retries, ordered lanes")
  local retry = { max = 5, base = 1, jitter = 0.2 }
  local cases = {
    { "plain", nil, nil, false },
    { "retry0", { retry = retry }, nil, false },
    { "retry1", { retry = retry }, FAIL_EVERY, false },
    { "plain_keyed", nil, nil, true },
    { "ordered", { ordered = true }, nil, true },
    { "ordered1", { ordered = true, retry = retry }, FAIL_EVERY, true },
  }
  -- Every case is measured ROUNDS times, the rounds interleaved, and the
  -- best kept: a ratio then compares runs made under the same conditions.
  local results, buses, bodies = {}, {}, {}
  for i, case in ipairs(cases) do
    local body, bus = buzz_body(case[2], case[3], case[4])
    bodies[i], buses[i] = body, bus
  end
  bodies.floor0, bodies.floor1 = pcall_retry_floor(nil),
                                 pcall_retry_floor(FAIL_EVERY)
  for _ = 1, ROUNDS do
    for i, case in ipairs(cases) do
      local rate = util.measure(case[1], bodies[i])
      results[case[1]] = math.max(results[case[1]] or 0, rate)
    end
    for _, key in ipairs { "floor0", "floor1" } do
      results[key] = math.max(results[key] or 0,
                              util.measure(key, bodies[key]))
    end
  end
  for i = 1, #buses do buses[i]:close() end

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
                   .. "%.0f ns.", 1 + 1 / FAIL_EVERY, r.retry0 / r.floor0, r.retry1 / r.floor1,
                   1e9 / r.retry0 - 1e9 / r.plain,
                   1e9 / r.ordered - 1e9 / r.plain_keyed))
end

if is_main then M.run() end

return M

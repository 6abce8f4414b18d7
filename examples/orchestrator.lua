--- buzz example: a task orchestrator with retries, dead letters and
-- callbacks.
--
--   lua5.4 examples/orchestrator.lua     (or luajit examples/orchestrator.lua)
--
-- A launcher publishes "task:start". The orchestrator sends each task
-- through two steps, an agent and then a build; each step reports its
-- outcome as a completion event ("step.<name>.done") carrying the task_id
-- and a status. A step that fails is retried by the bus itself (the
-- subscription's retry policy: 3 attempts, 1 s then 2 s apart); when the
-- attempts run out the bus dead-letters the event and publishes it on
-- "$DLQ.step.<name>.run", which becomes the step's "failed" completion.
-- The task is then marked failed and a notification published. Whatever
-- the outcome of a step, the launcher gets exactly one callback for it.
--
-- Names: "task:start" is the issue's name and a valid subject: ':' is an
-- ordinary character, so it is a single token (no pattern but
-- "task:start", "*" or ">" matches it). The launcher's events keep that
-- "task:<verb>" form; the steps' events are dotted, "step.<name>.<verb>",
-- so that one pattern ("step.*.done") reaches every step.
--
-- Three tasks: T1 succeeds, T2's build fails twice and then succeeds, T3's
-- agent always fails. Everything runs on a manual clock, so the retries'
-- back-off takes no time and the trace is the same on every run. The
-- example asserts what it prints and exits non-zero if buzz misbehaves.

-- Run from a checkout, prefer its build (build/<flavour>, or $BUZZ_BUILD);
-- otherwise fall through to an installed buzz (luarocks).
do
  local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
  local build = os.getenv("BUZZ_BUILD")
                or (dir .. "../build/" .. (jit and "luajit" or "lua5.4"))
  local so = io.open(build .. "/buzz/core.so")
  if so then
    so:close()
    package.path = ("%s../lua/?.lua;%s../lua/?/init.lua;%s")
                   :format(dir, dir, package.path)
    package.cpath = build .. "/?.so;" .. package.cpath
  end
end

local buzz = require "buzz"

local T0 = 1800000000                        -- epoch seconds
local clock = buzz.manual_clock(T0)

local function say(fmt, ...)
  print(("t+%ds  " .. fmt):format(clock:now() - T0, ...))
end

local function plural(n, word)
  return ("%d %s%s"):format(n, word, n == 1 and "" or "s")
end

-- Every failed attempt, as on_error saw it: "T2 build 1".
local failed_attempts = {}

local bus = assert(buzz.new{
  clock = clock,
  -- Each failed attempt comes here first; the retry policy then decides
  -- whether there is another one.
  on_error = function(err, ev)
    local step = ev.type:match("^step%.(.-)%.run$")
    failed_attempts[#failed_attempts + 1] =
      ("%s %s %d"):format(ev.payload.task_id, step, ev.attempt)
    say("  %-6s %s attempt %d failed: %s", step, ev.payload.task_id,
        ev.attempt, tostring(err))
  end,
})

-- ------------------------------------------------------------ the world

local STEPS = { "agent", "build" }           -- in order
local NEXT = { agent = "build" }

-- A step gets 3 attempts: at +0 s, +1 s and +3 s (base * factor^(n-1)).
local RETRY = { max = 3, base = 1, factor = 2, jitter = 0 }

-- What the outside world does to each task: how many attempts of a step
-- fail before one succeeds (math.huge: none does), and with what error.
local FLAKY = { T2 = { build = 2 }, T3 = { agent = math.huge } }
local ERRORS = { agent = "the model's patch does not apply",
                 build = "linker killed (out of memory)" }

-- ------------------------------------------------------------ the steps

-- A step worker does its job for one task and reports success. It fails
-- by raising; the bus retries it, then dead-letters the event. (A step
-- that knows retrying is pointless raises buzz.fatal(err) instead: one
-- attempt, same dead-letter path.)
local attempts = {}                          -- "T2 build" -> attempts made
for _, step in ipairs(STEPS) do
  bus:on("step." .. step .. ".run", { name = step, retry = RETRY })(
    function(ev)
      local id = ev.payload.task_id
      attempts[id .. " " .. step] = ev.attempt
      local fails = FLAKY[id] and FLAKY[id][step] or 0
      if ev.attempt <= fails then error(ERRORS[step], 0) end
      say("  %-6s %s attempt %d succeeded", step, id, ev.attempt)
      bus:publish("step." .. step .. ".done", {
        task_id = id, step = step, status = "succeeded",
        attempts = ev.attempt })
    end)
end

-- A step that ran out of attempts: its dead letter, published by the bus
-- on "$DLQ.step.<name>.run", becomes the step's "failed" completion. It
-- inherits the task's correlation id like any follow-up event.
bus:route("$DLQ.step.>")
  :map(function(ev)
    local dead = ev.payload                  -- the dead-letter record
    return { task_id = dead.event.payload.task_id,
             step = dead.event.type:match("^step%.(.-)%.run$"),
             status = "failed", attempts = #dead.attempts,
             error = dead.error, reason = dead.reason }
  end)
  :handle(function(ev)
    local p = ev.payload
    say("  %-6s %s dead-lettered (%s after %s)", p.step, p.task_id,
        p.reason, plural(p.attempts, "attempt"))
    bus:publish("step." .. p.step .. ".done", p)
  end)

-- ------------------------------------------------------------ orchestrator

local tasks = {}                             -- task_id -> its state
local order = {}                             -- task ids, in launch order

bus:on("task:start")(function(ev)
  local id = ev.payload.task_id
  tasks[id] = { title = ev.payload.title, status = "running" }
  order[#order + 1] = id
  bus:publish("step." .. STEPS[1] .. ".run", { task_id = id })
end)

-- Every completion, success or failure, is called back to the launcher.
bus:on("step.*.done")(function(ev)
  local p = ev.payload
  bus:publish("task:callback", { task_id = p.task_id, step = p.step,
                                 status = p.status, attempts = p.attempts })
end)

-- A step succeeded: on to the next one, or the task is done.
bus:route("step.*.done"):where{ ["payload.status"] = "succeeded" }
  :handle(function(ev)
    local p = ev.payload
    local step = NEXT[p.step]
    if step then
      bus:publish("step." .. step .. ".run", { task_id = p.task_id })
    else
      tasks[p.task_id].status = "succeeded"
      bus:publish("task:done", { task_id = p.task_id, status = "succeeded" })
    end
  end)

-- A step failed for good: the task is marked failed, and someone is told.
bus:route("step.*.done"):where{ ["payload.status"] = "failed" }
  :handle(function(ev)
    local p = ev.payload
    tasks[p.task_id].status = "failed"
    bus:publish("task:done", { task_id = p.task_id, status = "failed" })
    bus:publish("notify.task.failed", { task_id = p.task_id, step = p.step,
                                        error = p.error })
  end)

-- ------------------------------------------------------------ launcher

local callbacks = {}                         -- "T1 agent" -> times called
bus:on("task:callback")(function(ev)
  local p = ev.payload
  local k = p.task_id .. " " .. p.step
  callbacks[k] = (callbacks[k] or 0) + 1
  say("callback %s %s: %s (%s)", p.task_id, p.step, p.status,
      plural(p.attempts, "attempt"))
end)

local finished = {}                          -- task_id -> final status
bus:on("task:done")(function(ev)
  finished[ev.payload.task_id] = ev.payload.status
  say("task %s %s", ev.payload.task_id, ev.payload.status)
end)

local notified = {}
bus:on("notify.>")(function(ev)
  notified[#notified + 1] = ev.payload.task_id
  say("notify: task %s failed at %s: %s", ev.payload.task_id,
      ev.payload.step, ev.payload.error)
end)

-- Audit: every event but the engine's own, by correlation id.
local by_corr = {}
bus:on(">")(function(ev)
  local c = ev.correlation_id or "none"
  by_corr[c] = by_corr[c] or {}
  local n = by_corr[c]
  n[ev.type] = (n[ev.type] or 0) + 1
end)
local dead_corr = {}                         -- what "$DLQ.>" carried
bus:on("$DLQ.>")(function(ev) dead_corr[#dead_corr + 1] = ev.correlation_id end)

-- ------------------------------------------------------------ the run

print("== three tasks, each an agent step then a build step; "
      .. "3 attempts a step")
for _, t in ipairs {
  { "T1", "fix a typo in the README" },
  { "T2", "bump libuv" },
  { "T3", "port the core to Plan 9" },
} do
  bus:publish("task:start", { task_id = t[1], title = t[2] },
              { correlation_id = "task-" .. t[1] })
  say("launch %s %q  corr=task-%s", t[1], t[2], t[1])
end
bus:drain()
while bus:stats().timers > 0 do              -- retries still to come
  clock:advance(1)                           -- each fires at its own time
end

-- ------------------------------------------------------------ the checks

print()
print("== outcome")
for _, id in ipairs(order) do
  local a, b = attempts[id .. " agent"], attempts[id .. " build"]
  print(("%s %-9s agent %s, build %s"):format(
        id, tasks[id].status, plural(a, "attempt"),
        b and plural(b, "attempt") or "never ran"))
end

local function check(cond, what)
  if not cond then error("orchestrator: " .. what, 2) end
end

check(table.concat(order, " ") == "T1 T2 T3", "every task started")
check(tasks.T1.status == "succeeded" and finished.T1 == "succeeded", "T1")
check(tasks.T2.status == "succeeded" and finished.T2 == "succeeded", "T2")
check(tasks.T3.status == "failed" and finished.T3 == "failed", "T3")

-- Attempts: what the steps counted, and what on_error saw fail.
check(attempts["T1 agent"] == 1 and attempts["T1 build"] == 1, "T1 tries")
check(attempts["T2 agent"] == 1 and attempts["T2 build"] == 3, "T2 tries")
check(attempts["T3 agent"] == 3 and attempts["T3 build"] == nil, "T3 tries")
check(table.concat(failed_attempts, ", ")
      == "T3 agent 1, T2 build 1, T3 agent 2, T2 build 2, T3 agent 3",
      "failed attempts: " .. table.concat(failed_attempts, ", "))

-- One callback per step outcome, and none for a step that never ran.
local keys = {}
for k, n in pairs(callbacks) do
  check(n == 1, k .. " was called back " .. plural(n, "time"))
  keys[#keys + 1] = k
end
table.sort(keys)
check(table.concat(keys, ", ") == "T1 agent, T1 build, T2 agent, "
      .. "T2 build, T3 agent", "callbacks: " .. table.concat(keys, ", "))

-- The notification only for the failed task; one dead letter, for T3.
check(#notified == 1 and notified[1] == "T3", "notifications")
local dead = bus:dead_letters()
check(#dead == 1 and dead[1].subscription == "agent"
      and dead[1].reason == "exhausted" and #dead[1].attempts == 3
      and dead[1].event.payload.task_id == "T3", "dead letters")

-- Correlation: every event of a task carries its task's id, the dead
-- letter's included; nothing went uncorrelated.
check(by_corr.none == nil, "an event without a correlation id")
local FLOW = {                               -- events per task, by type
  T1 = { ["task:start"] = 1, ["step.agent.run"] = 1, ["step.agent.done"] = 1,
         ["step.build.run"] = 1, ["step.build.done"] = 1,
         ["task:callback"] = 2, ["task:done"] = 1 },
  T3 = { ["task:start"] = 1, ["step.agent.run"] = 1, ["step.agent.done"] = 1,
         ["task:callback"] = 1, ["task:done"] = 1,
         ["notify.task.failed"] = 1 },
}
FLOW.T2 = FLOW.T1                            -- retries are not new events
for id, want in pairs(FLOW) do
  local got = by_corr["task-" .. id] or {}
  for etype, n in pairs(want) do
    check(got[etype] == n, ("%s: %s x%s"):format(id, etype,
                                                  tostring(got[etype])))
  end
  for etype in pairs(got) do check(want[etype], id .. ": " .. etype) end
end
check(#dead_corr == 1 and dead_corr[1] == "task-T3", "dead letter's corr")

print(("%d callbacks, %d notification, %d dead letter; all checks passed")
      :format(#keys, #notified, #dead))
assert(bus:close() == 0)

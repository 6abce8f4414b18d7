--- buzz example: the task orchestrator as a saga, with compensation.
--
--   lua5.4 examples/saga.lua     (or luajit examples/saga.lua)
--
-- "task:start" starts a saga per task_id (a second start of the same task
-- starts nothing). Its steps: reserve a build slot, ask an agent to run
-- the task (publish "agent:run", wait for "agent:complete"), then compile
-- (publish "compile:run", wait for "compile:complete"). When a step fails
-- for good (after its retries), the steps already done are undone in
-- reverse order: the agent's work is discarded, the slot released. Every
-- outcome is announced on $SYS.saga.build, which becomes the launcher's
-- "task:callback". The saga's record is in the store, so a crash resumes
-- it where it was (spec/saga_spec.lua SIGKILLs one to check). A manual
-- clock makes the retries' waits take no time. It checks its own trace
-- and exits non-zero if buzz misbehaves.

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

local path = os.tmpname()
local clock = buzz.manual_clock(1800000000)
local bus = assert(buzz.new{ store = path, clock = clock,
                             on_error = function() end })  -- (in records)
local trace = {}
local function say(s) trace[#trace + 1] = s print(s) end

-- the workers: an agent, and a compiler that fails T2's build for good
bus:subscribe("agent:run", function(ev)
  bus:publish("agent:complete", { task_id = ev.payload.task_id })
end)
bus:subscribe("compile:run", function(ev)
  local ok = ev.payload.task_id ~= "T2"
  bus:publish("compile:complete", { task_id = ev.payload.task_id, ok = ok })
end)

bus:saga("build", {
  on = "task:start",
  id = function(ev) return ev.payload.task_id end,
  retry = { max = 2, base = 1, jitter = 0 },   -- each step: 2 attempts
  timeout = 30,                                 -- seconds for a reply
  steps = {
    { name = "slot",
      run = function(ctx) say(ctx.id .. ": slot reserved") end,
      undo = function(ctx) say(ctx.id .. ": slot released") end },
    { name = "agent",
      run = function(ctx)
        ctx:request("agent:run", { task_id = ctx.id },
                    { reply = "agent:complete" })
        ctx.data.agent = "done"
        say(ctx.id .. ": agent done")
      end,
      undo = function(ctx) say(ctx.id .. ": agent's work discarded") end },
    { name = "compile",
      run = function(ctx)
        local reply = ctx:request("compile:run", { task_id = ctx.id },
                                  { reply = "compile:complete" })
        if not reply.payload.ok then
          say(("%s: compile failed (attempt %d)"):format(ctx.id, ctx.attempt))
          error("compile failed")
        end
        say(ctx.id .. ": compiled")
      end },
  },
})

-- the launcher: one callback per task
bus:subscribe("$SYS.saga.build", function(ev)
  bus:publish("task:callback", { task_id = ev.payload.id,
                                 status = ev.payload.status })
end)
bus:subscribe("task:callback", function(ev)
  say(("callback %s %s"):format(ev.payload.task_id, ev.payload.status))
end)

for _, id in ipairs { "T1", "T2", "T1" } do      -- T1 twice: one saga
  bus:publish("task:start", { task_id = id })
end
bus:drain()
while bus:stats().timers > 0 do    -- retries and reply timeouts to come
  clock:advance(1)                 -- each fires at its own time
end
bus:close()
for _, suffix in ipairs { "", "-wal", "-shm", "-lock" } do
  os.remove(path .. suffix)
end

-- the sagas run side by side: each task's lines, in order
local expected = {
  T1 = { "T1: slot reserved", "T1: agent done", "T1: compiled",
         "callback T1 completed" },
  T2 = { "T2: slot reserved", "T2: agent done",
         "T2: compile failed (attempt 1)", "T2: compile failed (attempt 2)",
         "T2: agent's work discarded", "T2: slot released",
         "callback T2 compensated" },
}
for task, lines in pairs(expected) do
  local got = {}
  for _, line in ipairs(trace) do
    if line:find(task, 1, true) then got[#got + 1] = line end
  end
  if table.concat(got, "\n") ~= table.concat(lines, "\n") then
    io.stderr:write(("unexpected trace for %s:\n  %s\n")
                    :format(task, table.concat(got, "\n  ")))
    os.exit(1)
  end
end

--- buzz benchmarks: `make bench`, or `lua5.4 bench/run.lua` from the root.
-- Runs every benchmark in one interpreter, buzz and its peers side by side,
-- and prints events per CPU second with ratios and targets. The memory
-- probe re-runs this script as `bench/run.lua --memory-probe <variant>`.
-- @module bench.run

-- The repository root, from this script's path ("bench/run.lua" -> "").
local root = (arg and arg[0] or ""):match("^(.-)bench/run%.lua$") or ""
local flavour = type(jit) == "table" and "luajit" or "lua5.4"
package.path = root .. "lua/?.lua;" .. root .. "lua/?/init.lua;"
               .. root .. "?.lua;" .. package.path
package.cpath = root .. "build/" .. flavour .. "/?.so;" .. package.cpath

local util = require "bench.util"
local memory = require "bench.memory"

if arg and arg[1] == "--memory-probe" then
  print(memory.encode(memory.probe(arg[2])))
  return
end

local dispatch = require "bench.dispatch"
local match = require "bench.match"
local buzz = require "buzz"
local clock, format, write = os.clock, string.format, io.write

local function cpu_model()
  local f = io.open("/proc/cpuinfo", "r")
  if not f then return "unknown CPU" end
  local s = f:read("*a")
  f:close()
  return s:match("model name%s*:%s*([^\n]+)") or "unknown CPU"
end

local t0 = clock()
local title = format("buzz %s benchmarks on %s", buzz._VERSION,
                     util.interpreter())
write(title, "\n", string.rep("=", #title), "\n")
util.note(format("%s; CPU time (os.clock), best of %d runs of ~%.1f s each, "
                 .. "after a warm-up", cpu_model(), util.RUNS,
                 util.RUN_SECONDS))
if util.is_jit then
  util.note("* the targets are set for Lua 5.4; under LuaJIT they are shown "
            .. "for information")
end

dispatch.run()
match.run()
memory.run(arg and arg[-1], arg and arg[0])
require("bench.store").run()
require("bench.failure").run()
require("bench.filter").run()
require("bench.aggregate").run()
require("bench.hosts").run()
require("bench.batch").run()

-- Issue 14's goals that were met before it and must stay met.
util.section("kept goals")
for _, list in ipairs { match.goals or {}, memory.goals or {} } do
  for _, g in ipairs(list) do
    write(format("  %-80s %s\n", g[1], util.verdict(g[2])))
  end
end

write(format("\n(%.1f s CPU in this process)\n", clock() - t0))

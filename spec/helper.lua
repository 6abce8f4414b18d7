--- Test helper, loaded by busted before every spec file (.busted).
-- Points package.cpath at the build for the running interpreter and gives
-- specs a small harness in the global H (after luv's test harness):
--   H.bus(opts)        a bus that H.done() will check and close
--   H.counter(n)       a function that must be called exactly n times
--   H.done()           asserts every counter met its count, closes buses
--   H.flavour          "lua5.4" or "luajit"; H.lua the interpreter command
--   H.run(code)        runs Lua code in a child interpreter of the same
--                      flavour with the project's paths; ok, output
local flavour = jit and "luajit" or "lua5.4"
local build = os.getenv("BUZZ_BUILD") or ("build/" .. flavour)

package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = build .. "/?.so;" .. package.cpath

local H = { flavour = flavour, lua = flavour, build = build }
local buses, counters = {}, {}

function H.bus(opts)
  local buzz = require "buzz"
  local bus = assert(buzz.new(opts))
  buses[#buses + 1] = bus
  return bus
end

function H.counter(expected, fn)
  local c = { expected = expected, calls = 0, where = debug.traceback("", 2) }
  counters[#counters + 1] = c
  return function(...)
    c.calls = c.calls + 1
    if fn then return fn(...) end
  end
end

function H.done()
  local cs, bs = counters, buses
  counters, buses = {}, {}
  for _, bus in ipairs(bs) do bus:close() end
  for _, c in ipairs(cs) do
    if c.calls ~= c.expected then
      error(("callback called %d times, expected %d%s")
            :format(c.calls, c.expected, c.where), 2)
    end
  end
  for _, bus in ipairs(bs) do
    assert(bus:is_closed(), "a bus was left open")
  end
end

-- Runs code in a fresh interpreter of the same flavour; returns the exit
-- status (true on success) and everything it printed.
function H.run(code, env)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write(code)
  f:close()
  local cmd = ("%s LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
               .. "LUA_CPATH='%s/?.so;;' %s %s 2>&1; echo \"__exit=$?\"")
              :format(env or "", build, H.lua, path)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  os.remove(path)
  local status = tonumber(out:match("__exit=(%d+)%s*$"))
  out = out:gsub("__exit=%d+%s*$", "")
  return status == 0, out, status
end

_G.H = H

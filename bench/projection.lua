--- Benchmark: projections (issue 18). On a store of N events (1,000 keys):
-- the fold rate of a projection made over the whole log against a plain
-- replay of it (target: at least 50%), the cost of a snapshot of 1,000
-- keys, and the time a restarting projection takes with a snapshot (it
-- reads only the tail) and without one (it folds the whole log); the
-- live fold against a plain subscriber; then publish with stream and
-- expect against a plain publish.
-- `lua5.4 bench/projection.lua [N]` (default 200000); `make bench-state`.
-- CPU time (os.clock), best of 3.
-- @module bench.projection

package.path = (arg and arg[0] or ""):gsub("bench/[%w_]+%.lua$", "?.lua")
               .. ";" .. package.path      -- finds bench.util from anywhere
local util = require "bench.util"
util.standalone("projection")
local buzz = require "buzz"
local clock, format = os.clock, string.format

local N = tonumber(arg and arg[1]) or 200000
local KEYS = 1000
local TAIL = 1000

local function best_of(runs, fn)
  local best = math.huge
  for _ = 1, runs do
    util.full_gc()
    local t0 = clock()
    fn()
    best = math.min(best, clock() - t0)
  end
  return best
end

local function opts(extra)
  local o = {
    types = "order.*", by = "key",
    init = function() return { n = 0, cents = 0 } end,
    apply = function(s, ev)
      s.n, s.cents = s.n + 1, s.cents + ev.payload.cents
    end,
  }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

local path = os.tmpname()
os.remove(path)
path = path .. ".db"
local function remove_store()
  for _, s in ipairs { "", "-wal", "-shm", "-lock" } do os.remove(path .. s) end
end

local title = format("projections on %s, a log of %d events, %d keys",
                     util.interpreter(), N, KEYS)
io.write(title, "\n", string.rep("=", #title), "\n")

local bus = assert(buzz.new{ store = path })
for i = 1, N do
  assert(bus:publish("order.paid", { cents = i % 100 },
                     { key = "cust-" .. i % KEYS }))
  if i % 10000 == 0 then bus:drain() end
end
assert(bus:flush())

local count = 0
local t_replay = best_of(3, function()
  count = bus:replay{ types = "order.*", handler = function() end }
end)
assert(count == N)
local t_fold = best_of(3, function()
  local p = assert(bus:projection("bench", opts{ snapshot_every = false }))
  assert(p:position() == N)
  p:close()
end)
local replay_rate, fold_rate = N / t_replay, N / t_fold
io.write(format("  replay (no-op handler)        %10.0f events/s\n",
                replay_rate))
io.write(format("  projection fold (1,000 keys)  %10.0f events/s  %.2fx "
                .. "replay (target >= 0.5)  %s\n", fold_rate,
                fold_rate / replay_rate,
                fold_rate / replay_rate >= 0.5 and "met" or "MISS"))

-- a snapshot of every key, then a restart with TAIL events after it
local p = assert(bus:projection("snap", opts{ snapshot_every = false }))
local t_snap = best_of(3, function()
  for tag in pairs(p.states) do p.dirty[tag] = true end
  assert(p:snapshot())
  assert(bus:flush())
end)
p:close()
for i = 1, TAIL do
  assert(bus:publish("order.paid", { cents = 1 }, { key = "cust-" .. i }))
end
assert(bus:flush())
bus:close()
io.write(format("  snapshot of %d keys           %10.2f ms (encode, hash, "
                .. "commit)\n", KEYS, t_snap * 1000))

local function restart(name, extra, runs)
  return best_of(runs, function()
    local b = assert(buzz.new{ store = path })
    local q = assert(b:projection(name, opts(extra)))
    assert(q:position() == N + TAIL)
    b:close()
  end)
end
-- "snap" restarts once (its close writes the tail's keys, so a second
-- run would read nothing); "scratch" never writes a snapshot
local t_with = restart("snap", {}, 1)
local t_without = restart("scratch", { snapshot_every = false }, 3)
io.write(format("  restart with a snapshot       %10.2f ms (reads the "
                .. "tail only)\n", t_with * 1000))
io.write(format("  restart without one           %10.2f ms (folds all %d "
                .. "events)\n", t_without * 1000, N + TAIL))
remove_store()

-- live: events published and drained in batches of 1,000, folded as they
-- are delivered, against a plain subscriber that does nothing
local function live(with_projection)
  return best_of(3, function()
    remove_store()
    local b = assert(buzz.new{ store = path })
    if with_projection then
      assert(b:projection("live", opts{ snapshot_every = false }))
    else
      b:subscribe("order.*", function() end)
    end
    for i = 1, N do
      local _, _, code = b:publish("order.paid", { cents = 1 },
                                   { key = "cust-" .. i % KEYS })
      if code == "EFULL" then
        assert(b:flush())
        assert(b:publish("order.paid", { cents = 1 },
                         { key = "cust-" .. i % KEYS }))
      end
      if i % 1000 == 0 then b:drain() end
    end
    assert(b:flush())
    b:drain()
    b:close()
  end)
end
local t_plain, t_live = live(false), live(true)
io.write(format("  live fold as delivered        %10.0f events/s  %.2fx "
                .. "a plain subscriber (%.0f/s)\n", N / t_live,
                t_plain / t_live, N / t_plain))

-- publish with stream + expect (1,000 streams) against a plain publish,
-- on a store (batch durability) and in memory
local function appends(with_store, is_checked)
  return best_of(3, function()
    remove_store()
    local versions = {}
    local b = assert(buzz.new{ store = with_store and path or nil,
                               queue_limit = N + 1 })
    -- a publish the writer's back-pressure refuses (EFULL) waits for it
    -- and goes again: it used up neither an id nor a version
    local function publish(o)
      local id, err, code = b:publish("order.paid", { cents = 1 }, o)
      if code == "EFULL" then
        assert(b:flush())
        id, err = b:publish("order.paid", { cents = 1 }, o)
      end
      assert(id, err)
    end
    for i = 1, N do
      local s = "order-" .. i % KEYS
      if is_checked then
        local v = versions[s] or 0
        publish{ key = s, stream = s, expect = v }
        versions[s] = v + 1
      else
        publish{ key = s }
      end
    end
    if with_store then assert(b:flush()) end
    b:close()
  end)
end
for _, with_store in ipairs { true, false } do
  local plain = appends(with_store, false)
  local checked = appends(with_store, true)
  io.write(format("  publish with stream + expect  %10.0f events/s  %.2fx "
                  .. "plain publish (%.0f/s, %s)\n", N / checked,
                  plain / checked, N / plain,
                  with_store and "a store" or "in memory"))
end
remove_store()

-- bus:redis across real processes (tagged #cluster: make test-redis, which
-- CI runs, not make test): three
-- worker processes in one consumer group (spec/redis/worker.lua) share
-- 10,000 events, each handled once; a worker killed with SIGKILL
-- mid-handler has its pending events claimed by the others.
local buzz = require "buzz"
local S = require "spec.redis.server"

local srv, dir
setup(function()
  srv = S.start()
  dir = H.mktemp_dir()
end)
teardown(function()
  if srv then srv:remove() end
  if dir then H.remove_dir(dir) end
end)

local function spawn(stream, group, out, name, slow, min_idle, env)
  local _, pid = H.sh(("%s %s LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
    .. "LUA_CPATH='%s/?.so;;' %s spec/redis/worker.lua %s %s %s %s %s %d %s "
    .. "> %s/%s.log 2>&1 & echo $!")
    :format(os.getenv("LD_PRELOAD") and ("LD_PRELOAD=" .. H.quote(
              os.getenv("LD_PRELOAD"))) or "", env or "",
            H.build, H.lua, srv.url, stream, group, out, name, slow or 0,
            min_idle or 1, dir, name))
  return assert(tonumber(pid:match("%d+")), pid)
end

local function spawn_leader(stream, out, name, lease)
  local _, pid = H.sh(("%s LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
    .. "LUA_CPATH='%s/?.so;;' %s spec/redis/leader.lua %s %s %s %s %s "
    .. "> %s/%s.log 2>&1 & echo $!")
    :format(os.getenv("LD_PRELOAD") and ("LD_PRELOAD=" .. H.quote(
              os.getenv("LD_PRELOAD"))) or "",
            H.build, H.lua, srv.url, stream, out, name, lease, dir, name))
  return assert(tonumber(pid:match("%d+")), pid)
end

local function kill(pid, sig)
  H.sh(("%skill -%s %d 2>/dev/null"):format(H.tool, sig or "TERM", pid))
end

-- payload -> how many times it was handled, and by whom.
local function handled(out)
  local times, by = {}, {}
  for line in (H.slurp(out) or ""):gmatch("[^\n]+") do
    local p, who = line:match("^(%d+) (%S+)$")
    p = tonumber(p)
    times[p] = (times[p] or 0) + 1
    by[who] = (by[who] or 0) + 1
  end
  return times, by
end

local function count_lines(out)
  local k = 0
  for _ in (H.slurp(out) or ""):gmatch("\n") do k = k + 1 end
  return k
end

local function wait_consumers(stream, group, names)
  H.eventually(function()
    local info = srv:cli("XINFO", "CONSUMERS", stream, group)
    for _, nm in ipairs(names) do
      if not info:find(nm, 1, true) then return false end
    end
    return true
  end, 20, "the workers to join the group")
end

local function publish_all(stream, n)
  local bus = buzz.new()
  local r = bus:redis{ url = srv.url, stream = stream, fanout = false }
  for i = 1, n do assert(r:publish("job.run", i)) end
  S.until_(bus, function() return r:pending() == 0 end, 60)
  assert.equal(n, r:stats().published)
  bus:close()
end

describe("a consumer group across processes #redis #cluster", function()
  it("three workers handle 10,000 events, each once", function()
    local stream, out = "procs1", dir .. "/out1"
    srv:cli("XGROUP", "CREATE", stream, "workers", "$", "MKSTREAM")
    local pids = {}
    for i = 1, 3 do pids[i] = spawn(stream, "workers", out, "w" .. i) end
    wait_consumers(stream, "workers", { "w1", "w2", "w3" })
    publish_all(stream, 10000)
    H.eventually(function() return count_lines(out) >= 10000 end, 60,
                 "10,000 events handled")
    os.execute(H.tool .. "sleep 0.3")         -- (a duplicate would show)
    for _, pid in ipairs(pids) do kill(pid) end
    local times, by = handled(out)
    for i = 1, 10000 do
      if times[i] ~= 1 then
        error(("event %d handled %s times"):format(i, tostring(times[i])))
      end
    end
    assert.is_true((by.w1 or 0) > 0 and (by.w2 or 0) > 0 and (by.w3 or 0) > 0,
                   require("buzz.core").json_encode(by))
    H.eventually(function()
      return srv:cli("XPENDING", stream, "workers"):match("^0") end, 10,
      "every entry acked")
  end)

  it("a worker killed mid-handler: the others claim its events within "
     .. "min_idle", function()
    local stream, out = "procs2", dir .. "/out2"
    srv:cli("XGROUP", "CREATE", stream, "workers", "$", "MKSTREAM")
    local pids = {}
    for i = 1, 3 do
      pids[i] = spawn(stream, "workers", out, "k" .. i, 20, 1)
    end
    wait_consumers(stream, "workers", { "k1", "k2", "k3" })
    publish_all(stream, 600)
    H.eventually(function()
      local _, by = handled(out)
      return (by.k1 or 0) >= 20
    end, 30, "k1 to handle some events")
    kill(pids[1], "KILL")
    local killed_at = os.time()
    local summary = srv:cli("XPENDING", stream, "workers")
    assert.matches("k1", summary)               -- it held events
    H.eventually(function() return count_lines(out) >= 600 end, 60,
                 "600 events handled")
    H.eventually(function()
      return not srv:cli("XPENDING", stream, "workers"):find("k1", 1, true)
    end, 10, "k1's pending entries claimed")
    -- min_idle 1 s, claims every 0.2 s: well within 1 s + margin
    assert.is_true(os.time() - killed_at <= 8)
    for i = 2, 3 do kill(pids[i]) end
    local times = handled(out)
    local dups = 0
    for i = 1, 600 do
      assert.is_true((times[i] or 0) >= 1, "event " .. i .. " lost")
      dups = dups + times[i] - 1
    end
    -- handled but not yet acked when it died: at most its concurrency
    assert.is_true(dups <= 8, dups .. " handled twice")
  end)

  it("a leader killed: another takes over within the lease, never two "
     .. "at once", function()
    local out = dir .. "/leaders"
    local pids = {}
    for i = 1, 3 do pids["l" .. i] = spawn_leader("lead", out, "l" .. i, 1) end
    local function lines()
      local t = {}
      for line in (H.slurp(out) or ""):gmatch("[^\n]+") do
        local who, ms = line:match("^(%S+) (%d+)$")
        t[#t + 1] = { who = who, ms = tonumber(ms) }
      end
      return t
    end
    local first = H.eventually(function()
      local t = lines()
      return #t >= 10 and t[1].who
    end, 20, "a leader")
    kill(pids[first], "KILL")
    local killed_ms = lines()[#lines()].ms
    local second = H.eventually(function()
      local t = lines()
      return t[#t].who ~= first and #t > 0 and t[#t].who
    end, 20, "a new leader")
    os.execute(H.tool .. "sleep 0.5")
    for who, pid in pairs(pids) do if who ~= first then kill(pid) end end
    local t = lines()
    -- one leader at a time: once the second leads, the first never
    -- writes again, and no third one writes in between
    local last_first, first_second = 0, math.huge
    for _, l in ipairs(t) do
      assert.is_true(l.who == first or l.who == second, l.who)
      if l.who == first then last_first = math.max(last_first, l.ms) end
      if l.who == second then first_second = math.min(first_second, l.ms) end
    end
    assert.is_true(last_first < first_second)
    -- within the lease (1 s) and a renewal period (1/3 s), plus margin
    assert.is_true(first_second - killed_ms <= 2500,
                   "took over after " .. (first_second - killed_ms) .. " ms")
  end)

  it("partitions: per-key order across three workers, one killed and "
     .. "its partitions moved", function()
    local stream, out = "procs3", dir .. "/out3"
    local pids = {}
    for i = 1, 3 do
      pids[i] = spawn(stream, "workers", out, "p" .. i, 10, 1,
                      "PARTITIONS=4")
    end
    -- every partition owned (their groups exist) before publishing
    H.eventually(function()
      for i = 0, 3 do
        if not srv:cli("GET", stream .. ":" .. i .. ":owner:workers")
               :match("^p%d") then return false end
      end
      return true
    end, 20, "the partitions to be owned")
    local bus = buzz.new()
    local r = bus:redis{ url = srv.url, stream = stream, fanout = false,
                         partitions = 4 }
    local N, KEYS = 1200, 12
    for s = 1, N do
      local k = s % KEYS
      assert(r:publish("job.run", ("k%d:%d"):format(k, s), { key = "k" .. k }))
    end
    assert(r:flush(10))
    bus:close()
    H.eventually(function() return count_lines(out) >= 150 end, 30,
                 "some events handled")
    -- the owner of a partition that has events goes (SIGKILL)
    local victim
    for i = 0, 3 do
      local owner = srv:cli("GET", stream .. ":" .. i .. ":owner:workers")
      if owner:match("^p%d$") and srv:cli("XLEN", stream .. ":" .. i) ~= "0"
      then victim = owner break end
    end
    assert.is_truthy(victim, "no partition with events has an owner")
    kill(pids[tonumber(victim:sub(2))], "KILL")
    local function seen()
      local per, total, moved = {}, {}, false
      local by = {}
      for line in (H.slurp(out) or ""):gmatch("[^\n]+") do
        local k, s, who = line:match("^k(%d+):(%d+) (%S+)")
        k, s = tonumber(k), tonumber(s)
        per[k] = per[k] or {}
        per[k][#per[k] + 1] = s
        total[s] = true
        if by[k] == victim and who ~= victim then moved = true end
        by[k] = who
      end
      return per, total, moved
    end
    H.eventually(function()
      local _, total = seen()
      for s = 1, N do if not total[s] then return false end end
      return true
    end, 60, "every event handled")
    for _, pid in ipairs(pids) do kill(pid) end
    local per, _, moved = seen()
    assert.is_true(moved, "no key of " .. victim .. "'s moved to another "
                   .. "worker")
    for k, list in pairs(per) do
      for j = 2, #list do        -- in order; a repeat only at the kill
        assert.is_true(list[j] >= list[j - 1], ("key k%d: %d after %d")
                       :format(k, list[j], list[j - 1]))
      end
    end
  end)
end)

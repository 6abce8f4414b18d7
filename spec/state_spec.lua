-- bus:state: a keyed document written by several writers, concurrent
-- writes resolved per field (lua/buzz/state.lua).
local buzz = require "buzz"

-- Two buses on two stores, a state on each (nodes "a" and "b"), and a
-- way to exchange their writes (each merges the other's store).
local function replicas(paths, opts_a, opts_b)
  local a = H.bus{ store = paths[1] }
  local b = H.bus{ store = paths[2] }
  local sa = a:state("profile", opts_a)
  local sb = b:state("profile", opts_b)
  local function sync()
    assert(a:flush())
    assert(b:flush())
    assert(sa:merge(paths[2]))
    assert(sb:merge(paths[1]))
    a:drain()
    b:drain()
  end
  return sa, sb, sync
end

describe("bus:state", function()
  local paths
  before_each(function() paths = { H.tmp_store(), H.tmp_store() } end)
  after_each(function()
    H.done()
    for _, p in ipairs(paths) do H.remove_store(p) end
  end)

  it("applies one writer's writes in order, field by field", function()
    local bus = H.bus{ store = paths[1] }
    local st = bus:state("profile", { node = "a" })
    assert(st:set("u1", { name = "Ann", city = "Oslo" }))
    assert.same({ name = "Ann", city = "Oslo" }, st:get("u1"))
    assert(st:set("u1", { city = "Bergen" }))          -- a partial update
    assert.same({ name = "Ann", city = "Bergen" }, st:get("u1"))
    assert.equal(require("buzz.projection").hash({ city = "Bergen",
                                                   name = "Ann" }),
                 st:version("u1"))
    assert.is_nil(st:get("u2"))
    assert.is_nil(st:version("u2"))
    assert.same({}, st:conflicts())
    assert.same({ "u1" }, st:keys())
    assert.equal("a", st:node_id())
    bus:close()
    bus = H.bus{ store = paths[1] }                     -- kept in the log
    st = bus:state("profile", { node = "a" })
    assert.same({ name = "Ann", city = "Bergen" }, st:get("u1"))
    assert(st:set("u1", { city = "Tromsø" }))           -- supersedes
    assert.same({ name = "Ann", city = "Tromsø" }, st:get("u1"))
  end)

  local cases = {
    { "timestamp", {}, {}, "Anna" },             -- b wrote last
    { "priority", { priority = 5 }, { priority = 1 }, "Ann" },
    { "a merge function",
      { resolve = function(_, cands) return #cands .. " names" end },
      { resolve = function(_, cands) return #cands .. " names" end },
      "2 names" },
  }
  for _, case in ipairs(cases) do
    it("resolves concurrent writes by " .. case[1] .. ", the same on "
       .. "both replicas", function()
      local oa, ob = case[2], case[3]
      oa.resolve = oa.resolve or (case[1] ~= "a merge function" and case[1])
      ob.resolve = ob.resolve or (case[1] ~= "a merge function" and case[1])
      oa.node, ob.node = "a", "b"
      local sa, sb, sync = replicas(paths, oa, ob)
      sa:set("u1", { name = "Ann", city = "Oslo" })
      sb:set("u1", { name = "Anna", email = "anna@example.org" })
      sync()
      local want = { name = case[4], city = "Oslo",
                     email = "anna@example.org" }
      assert.same(want, sa:get("u1"))
      assert.same(want, sb:get("u1"))
      assert.equal(sa:version("u1"), sb:version("u1"))
      assert.equal(select(2, sa:hash()), select(2, sb:hash()))
      -- a write after seeing both supersedes both, wherever it was made
      sb:set("u1", { name = "Anne" })
      sync()
      assert.equal("Anne", sa:get("u1").name)
      assert.equal(sa:version("u1"), sb:version("u1"))
    end)
  end

  it("keeps manual conflicts open, announced, until resolved", function()
    local sa, sb, sync = replicas(paths, { resolve = "manual", node = "a" },
                                  { resolve = "manual", node = "b" })
    local announced = {}
    sa.bus:subscribe("$SYS.conflict", function(ev)
      announced[#announced + 1] = ev.payload.key .. "." .. ev.payload.field
                                  .. " x" .. #ev.payload.values
    end)
    sa:set("u1", { name = "Ann", city = "Oslo" })
    sb:set("u1", { name = "Anna" })
    sync()
    local c = sa:conflicts()
    assert.equal(1, #c)
    assert.equal("u1", c[1].key)
    assert.equal("name", c[1].field)
    local values = { c[1].values[1].value, c[1].values[2].value }
    table.sort(values)
    assert.same({ "Ann", "Anna" }, values)
    assert.same(c, sb:conflicts("u1"))
    assert.same({ "u1.name x2" }, announced)
    assert.equal(sa:version("u1"), sb:version("u1"))
    assert(sa:resolve("u1", "name", "Ann-Marie"))
    sync()
    assert.same({}, sa:conflicts())
    assert.same({}, sb:conflicts())
    assert.equal("Ann-Marie", sb:get("u1").name)
  end)

  it("reaches one state whatever order the writes arrive in (random "
     .. "histories)", function()
    math.randomseed(7)
    for round = 1, 20 do
      -- a history: writes by three nodes, each having seen some earlier
      -- writes of a field (or none: concurrent)
      local writes, stamps = {}, {}
      for i = 1, math.random(3, 12) do
        local f = ({ "x", "y" })[math.random(2)]
        local seen = {}
        for _, st in ipairs(stamps[f] or {}) do
          if math.random(2) == 1 then seen[#seen + 1] = st end
        end
        local stamp = ("%015d.%06d.%s"):format(1000 + math.random(5), i,
                                               ({ "a", "b", "c" })[i % 3 + 1])
        stamps[f] = stamps[f] or {}
        table.insert(stamps[f], stamp)
        writes[i] = { key = "k", fields = { [f] = i }, seen = { [f] = seen },
                      stamp = stamp, node = stamp:sub(-1),
                      priority = math.random(3) }
      end
      for _, strategy in ipairs { "timestamp", "priority", "manual" } do
        local outs = {}
        for trial = 1, 3 do
          local bus = buzz.new()
          local st = bus:state("p", { resolve = strategy, node = "z" })
          local order = {}
          for i = 1, #writes do order[i] = i end
          for i = #order, 2, -1 do           -- shuffle
            local j = math.random(i)
            order[i], order[j] = order[j], order[i]
          end
          for _, i in ipairs(order) do
            bus:publish("state.p.set", writes[i], { key = "k" })
          end
          bus:drain()
          outs[trial] = st:version("k") .. " " .. #st:conflicts()
          bus:close()
        end
        assert.equal(outs[1], outs[2], "round " .. round .. " " .. strategy)
        assert.equal(outs[1], outs[3], "round " .. round .. " " .. strategy)
      end
    end
  end)

  it("stamps a write after every stamp it has seen, even with a clock "
     .. "behind", function()
    local clock = buzz.manual_clock(1000)          -- 1,000,000 ms
    local bus = H.bus{ clock = clock }
    local st = bus:state("p", { node = "slow" })
    local stamps = {}
    bus:subscribe("state.p.set", function(ev)
      stamps[#stamps + 1] = ev.payload.stamp
    end)
    local remote = "000000009000000.000003.fast"   -- from a clock ahead
    bus:publish("state.p.set", { key = "k", fields = { x = "remote" },
                                 seen = { x = {} }, stamp = remote,
                                 node = "fast", priority = 0 })
    bus:drain()
    assert(st:set("k", { y = "local" }))
    assert.equal("000000009000000.000004.slow", stamps[2])
    -- a concurrent write with an earlier stamp loses by timestamp
    bus:publish("state.p.set", { key = "k", fields = { x = "other" },
                                 seen = { x = {} },
                                 stamp = "000000009000000.000001.zzz",
                                 node = "zzz", priority = 0 })
    bus:drain()
    assert.equal("remote", st:get("k").x)
    assert(st:set("k", { x = "mine" }))              -- has seen both
    assert.equal("mine", st:get("k").x)
    assert.equal("000000009000000.000005.slow", stamps[4])
  end)

  it("raises on misuse, naming the fix", function()
    local bus = H.bus()
    assert.has_error(function() bus:state("a.b") end,
      "bad name to state: expected letters, digits, _ or - (it names the "
      .. "events state.NAME.set)")
    assert.has_error(function() bus:state("p", { resolve = "vote" }) end,
      'bad resolve to state: expected "timestamp", "priority", "manual" or '
      .. "a function(field, candidates, key)")
    assert.has_error(function() bus:state("p", { node = "a b" }) end,
      "bad node to state: expected a non-empty string without spaces (this "
      .. "writer's id)")
    assert.has_error(function() bus:state("p", { priority = 1.5 }) end,
      "bad priority to state: expected an integer (this writer's priority)")
    assert.has_error(function() bus:state("p", { nodes = 1 }) end,
      'unknown option "nodes" to state (known options: node, priority, '
      .. "resolve, snapshot_every)")
    local st = bus:state("p")
    assert.matches("^%x+$", st:node_id())
    assert.has_error(function() st:set({}, { a = 1 }) end,
      "bad key to st:set: expected a string or an integer, got table")
    assert.has_error(function() st:set("k", {}) end,
      "bad fields to st:set: expected a table of field = value")
    assert.has_error(function() st:set("k", { 1 }) end,
      "bad fields to st:set: field names are strings")
    assert.has_error(function() st.get("k") end,
      "use st:get(...), not st.get(...)")
    assert.has_error(function() st:resolve("k", 1, 2) end,
      "bad field to st:resolve: expected a string")
    assert.has_error(function() st:merge(1) end,
      "bad path to st:merge: expected the path of a store")
    local n, err, code = st:merge("/nonexistent/x.db")
    assert.is_nil(n)
    assert.equal("ESTORE", code)
    assert.is_string(err)
  end)
end)

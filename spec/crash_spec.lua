-- Crash safety, for real: a child process publishes with durability
-- "sync" and acknowledges through a durable consumer; it is killed with
-- SIGKILL at a different moment each round, and the store must hold
-- every event the child was told was published, intact and in order, and
-- the consumer must resume right after its last acknowledged event.
local CHILD = [[
local buzz = require "buzz"
io.stdout:setvbuf("no")
local bus = assert(buzz.new{ store = arg[1], durability = "sync" })
bus:subscribe("job.*", function(ev)
  print("handled " .. ev.id)
end, { durable = "worker" })
local i = tonumber(arg[2])
while true do
  i = i + 1
  local id = assert(bus:publish("job.run", { i = i,
                                             body = ("x"):rep(i % 97) }))
  print(("published %d %d"):format(id, i))
  bus:step(3)
  print("acked " .. bus:consumers()[1].acked)
end
]]

local read, spit = H.read, H.spit

-- Runs the child for about `secs` seconds, then SIGKILLs it; returns what
-- it printed, complete lines only (the kill may cut the last one).
local function run_and_kill(script, store, start, secs, out)
  local cmd = ("LUA_PATH='lua/?.lua;lua/?/init.lua;;' LUA_CPATH='%s/?.so;;' "
               .. "%s %s %s %d > %s 2>&1 & pid=$!; sleep %.2f; "
               .. "kill -9 $pid; wait $pid 2>/dev/null; true")
              :format(H.build, H.lua, script, store, start, out, secs)
  os.execute(cmd)
  local text = read(out)
  return text:match("^(.*\n)") or ""
end

describe("a store after SIGKILL", function()
  local dir, store, script, out

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute(("mkdir -p %q"):format(dir)))
    store = dir .. "/events.db"
    script = dir .. "/child.lua"
    out = dir .. "/out.txt"
    spit(script, CHILD)
  end)

  after_each(function()
    H.done()
    os.execute(("rm -rf %q"):format(dir))
  end)

  it("keeps every reported event and resumes the consumer exactly",
     function()
    local expected = {}          -- id -> i, over every round
    local last_i, prev_pos = 0, 0
    local kill_points = { 0.25, 0.4, 0.55, 0.7, 0.9, 0.33 }
    for round, secs in ipairs(kill_points) do
      local text = run_and_kill(script, store, last_i, secs, out)
      local acked, handled, published = prev_pos, prev_pos, 0
      for line in text:gmatch("([^\n]*)\n") do
        local id, i = line:match("^published (%d+) (%d+)$")
        if id then
          expected[tonumber(id)] = tonumber(i)
          published = published + 1
        end
        local a = line:match("^acked (%d+)$")
        if a then acked = tonumber(a) end
        local h = line:match("^handled (%d+)$")
        if h then handled = tonumber(h) end
      end
      assert.is_true(published > 0, ("round %d: the child published "
                                      .. "nothing:\n%s"):format(round, text))
      local p = assert(io.popen(("sqlite3 %q 'PRAGMA integrity_check'")
                                :format(store)))
      assert.equal("ok\n", p:read("*a"))
      p:close()

      local bus = H.bus{ store = store }
      -- every reported id is there, intact, and ids come in order
      local prev, seen = 0, {}
      for ev in bus:events() do
        assert.is_true(ev.id > prev)
        prev = ev.id
        seen[ev.id] = ev.payload
      end
      for id, i in pairs(expected) do
        local payload = seen[id]
        assert.is_table(payload, ("round %d: event %d is missing")
                                 :format(round, id))
        assert.equal(i, payload.i)
        assert.equal(("x"):rep(i % 97), payload.body)
      end
      for _, payload in pairs(seen) do
        if payload.i > last_i then last_i = payload.i end
      end
      -- the position is at least what the child saw committed, never
      -- past what it handled, and delivery resumes right after it
      local pos = bus:consumers()[1].acked
      assert.is_true(pos >= acked, ("round %d: position %d is behind the "
                                    .. "acknowledged %d"):format(round, pos,
                                                                 acked))
      assert.is_true(pos <= math.max(handled, acked))
      local first
      local sub = bus:subscribe("job.*", function(ev)
        first = first or ev.id
      end, { durable = "worker" })
      bus:step(1)
      local after = {}
      for ev in bus:events{ from = pos + 1, limit = 1 } do after[1] = ev.id end
      assert.equal(after[1], first)
      sub:unsubscribe()
      prev_pos = bus:consumers()[1].acked
      bus:close()
    end
  end)
end)
